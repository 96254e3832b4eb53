"""Baseline for ``bench/upload_throughput.py``: the least an aiohttp server does to receive a file.

``POST /upload/{name}`` drains the raw request body (``request.content.iter_any()``) into
``--out`` (created or truncated for every request), fsyncs once at the end and answers 200
``{"bytes": N}``. With ``--writes blocking`` (the default) every chunk is written with a plain
blocking ``os.write`` on the event loop; with ``--writes thread`` chunks are gathered into
1 MiB blocks and written by ``asyncio.to_thread``. There is no authentication, no session, no
offset bookkeeping and no commit before the end: it is the yardstick, not a design.

``GET /lag`` answers how late a 20 ms timer fired since the server started, as cumulative
counts per bucket bound (the daemon's ``remoteclusterd_event_loop_lag_seconds`` buckets), so
the benchmark can compare the event loop of both servers. ``GET /healthz`` answers 200.

Usage (the benchmark starts it; by hand)::

    .venv/bin/python bench/upload_bare_server.py --port 8081 --out received.bin
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

MiB = 1024 * 1024
LAG_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
LAG_PERIOD = 0.02

OUT = web.AppKey("out", Path)
WRITES = web.AppKey("writes", str)
LAG = web.AppKey("lag", list)


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def upload(request: web.Request) -> web.Response:
    """Drain the body into the output file, fsync once, answer 200."""
    path = request.app[OUT]
    threaded = request.app[WRITES] == "thread"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    received = 0
    block = bytearray()
    try:
        async for chunk in request.content.iter_any():
            received += len(chunk)
            if not threaded:
                _write_all(fd, chunk)
                continue
            block += chunk
            if len(block) >= MiB:
                await asyncio.to_thread(_write_all, fd, bytes(block))
                block.clear()
        if block:
            await asyncio.to_thread(_write_all, fd, bytes(block))
        await asyncio.to_thread(os.fsync, fd)
    finally:
        os.close(fd)
    return web.json_response({"bytes": received})


async def lag(request: web.Request) -> web.Response:
    """Cumulative counts of the loop-lag observations per bucket bound (Prometheus style)."""
    counts = request.app[LAG]
    cumulative, total = {}, 0
    for bound, count in zip((*LAG_BUCKETS, float("inf")), counts, strict=True):
        total += count
        cumulative["+Inf" if bound == float("inf") else repr(bound)] = total
    return web.json_response({"buckets": cumulative, "count": total})


async def healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _watch_lag(counts: list[int]) -> None:
    loop = asyncio.get_running_loop()
    while True:
        expected = loop.time() + LAG_PERIOD
        await asyncio.sleep(LAG_PERIOD)
        late = max(0.0, loop.time() - expected)
        counts[bisect.bisect_left(LAG_BUCKETS, late)] += 1


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(_watch_lag(app[LAG]))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def make_app(out: Path, writes: str) -> web.Application:
    app = web.Application()
    app[OUT] = out
    app[WRITES] = writes
    app[LAG] = [0] * (len(LAG_BUCKETS) + 1)
    app.cleanup_ctx.append(_lifecycle)
    app.router.add_post("/upload/{name}", upload)
    app.router.add_get("/lag", lag)
    app.router.add_get("/healthz", healthz)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True, help="file each upload is written to")
    parser.add_argument("--writes", choices=("blocking", "thread"), default="blocking")
    args = parser.parse_args()
    web.run_app(
        make_app(args.out, args.writes),
        host=args.host,
        port=args.port,
        print=None,
        access_log=None,
    )


if __name__ == "__main__":
    main()
