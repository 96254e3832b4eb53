"""``GET /healthz`` (answers once the store is open and the listener serves) and ``/metrics``."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from daemon.handlers.common import json_response
from daemon.keys import METRICS


async def healthz(_request: web.Request) -> web.Response:
    """Liveness for operators and load balancers; needs no credentials."""
    return json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format; open or behind the ``[metrics]`` token."""
    return web.Response(
        body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )
