"""``GET /healthz``: answers once the store is open and the listener serves."""

from __future__ import annotations

from aiohttp import web

from daemon.handlers.common import json_response


async def healthz(_request: web.Request) -> web.Response:
    """Liveness for operators and load balancers; needs no credentials."""
    return json_response({"status": "ok"})
