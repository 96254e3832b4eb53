"""Baseline for the message benchmark: the least aiohttp code that answers a ``/msg`` frame.

One route, ``POST /api/v4/remotecluster/msg``: read the body, parse the frame as JSON (msgspec,
the parser the daemon uses; ``--parser json`` for the standard library's) and answer 200
``{"status":"OK","err":"","payload":null}`` as ``application/json``. No authentication, no
database, no logging (access log off). The ``web.Application`` and the keep-alive timeout are
the daemon's defaults, so the difference in throughput against the daemon is the daemon's own
work per message.

With ``--forward URL`` it also does the one thing the daemon must do besides answering: it
POSTs ``{"remote_id","remote_name","msg"}`` to the local application at ``URL`` through one
shared ``aiohttp.ClientSession`` (at most 64 connections, as the daemon's) and answers
``{"status":"OK","err":"","payload":<the application's JSON>}``. That is a second baseline,
for how much of the daemon's cost the forwarding itself takes.

Usage (``msg_throughput.py`` starts it for you)::

    python bench/msg_bare_server.py --port PORT [--parser msgspec|json] [--forward URL]

It runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

MSG_PATH = "/api/v4/remotecluster/msg"
ANSWER = b'{"status":"OK","err":"","payload":null}'
KEEPALIVE_TIMEOUT = 75.0  # the daemon's default server.keepalive_timeout
SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("session", aiohttp.ClientSession)


def make_app(parse: Callable[[bytes], Any], forward_url: str | None) -> web.Application:
    async def receive(request: web.Request) -> web.Response:
        frame = parse(await request.read())
        if not isinstance(frame, dict):
            return web.Response(status=400, body=b'{"error":"not a frame"}')
        return web.Response(body=ANSWER, content_type="application/json")

    async def receive_and_forward(request: web.Request) -> web.Response:
        frame = parse(await request.read())
        if not isinstance(frame, dict):
            return web.Response(status=400, body=b'{"error":"not a frame"}')
        doc = {"remote_id": frame["remote_id"], "remote_name": "bench", "msg": frame["msg"]}
        assert forward_url is not None
        async with request.app[SESSION].post(
            forward_url,
            data=msgspec.json.encode(doc),
            headers={"Content-Type": "application/json"},
        ) as resp:
            answer = await resp.read()
            if resp.status != 200:
                return web.Response(status=503, body=b'{"error":"local application"}')
        body = b'{"status":"OK","err":"","payload":' + (answer or b"null") + b"}"
        return web.Response(body=body, content_type="application/json")

    async def client(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=64)
        async with aiohttp.ClientSession(connector=connector) as session:
            app[SESSION] = session
            yield

    app = web.Application()
    if forward_url:
        app.cleanup_ctx.append(client)
        app.router.add_post(MSG_PATH, receive_and_forward)
    else:
        app.router.add_post(MSG_PATH, receive)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--parser", choices=("msgspec", "json"), default="msgspec")
    parser.add_argument("--forward", metavar="URL", help="also forward to this local app")
    args = parser.parse_args()
    parse = msgspec.json.decode if args.parser == "msgspec" else json.loads
    # run_app stops on SIGTERM and SIGINT (it turns them into GracefulExit).
    web.run_app(
        make_app(parse, args.forward),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        keepalive_timeout=KEEPALIVE_TIMEOUT,
        shutdown_timeout=1.0,
    )


if __name__ == "__main__":
    main()
