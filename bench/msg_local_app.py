"""The local application of the message benchmark: takes forwarded messages and records them.

``POST /hook`` receives what the daemon forwards for a topic route
(``{"remote_id","remote_name","msg":{"id",...}}``), records ``msg.id`` and the arrival time
(``time.monotonic()``, the same clock in every process of the machine) and answers 200 ``{}``.
A second arrival of an id already recorded is counted as a duplicate. Control routes on the
same port:

* ``GET /stats``: ``{"count", "duplicates", "first_at", "last_at", "now"}``
* ``GET /ids``: every recorded ``msg.id``, in arrival order (a JSON list)
* ``POST /reset``: forget everything recorded

Usage (``msg_throughput.py`` starts it for you)::

    python bench/msg_local_app.py --port PORT

It runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import time

import msgspec
from aiohttp import web

KEEPALIVE_TIMEOUT = 75.0


class _Msg(msgspec.Struct):
    id: str = ""


class _Forwarded(msgspec.Struct):
    msg: _Msg


class Recorder:
    """What arrived, in order."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.seen: set[str] = set()
        self.duplicates = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self._decode = msgspec.json.Decoder(_Forwarded).decode

    async def hook(self, request: web.Request) -> web.Response:
        try:
            msg_id = self._decode(await request.read()).msg.id
        except (msgspec.DecodeError, msgspec.ValidationError):
            return web.Response(status=400, body=b'{"error":"not a forwarded message"}')
        now = time.monotonic()
        if self.first_at is None:
            self.first_at = now
        self.last_at = now
        if msg_id in self.seen:
            self.duplicates += 1
        else:
            self.seen.add(msg_id)
        self.ids.append(msg_id)
        return web.Response(body=b"{}", content_type="application/json")

    async def stats(self, _request: web.Request) -> web.Response:
        return web.json_response(
            {
                "count": len(self.ids),
                "duplicates": self.duplicates,
                "first_at": self.first_at,
                "last_at": self.last_at,
                "now": time.monotonic(),
            }
        )

    async def all_ids(self, _request: web.Request) -> web.Response:
        return web.Response(body=msgspec.json.encode(self.ids), content_type="application/json")

    async def reset(self, _request: web.Request) -> web.Response:
        self.ids, self.seen, self.duplicates = [], set(), 0
        self.first_at = self.last_at = None
        return web.json_response({"status": "ok"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    recorder = Recorder()
    app = web.Application()
    app.router.add_post("/hook", recorder.hook)
    app.router.add_get("/stats", recorder.stats)
    app.router.add_get("/ids", recorder.all_ids)
    app.router.add_post("/reset", recorder.reset)
    web.run_app(
        app,
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        keepalive_timeout=KEEPALIVE_TIMEOUT,
        shutdown_timeout=1.0,
    )


if __name__ == "__main__":
    main()
