"""Stub Mattermost peers for the heartbeat benchmark, run as a process of their own.

Serves N stub peers on 127.0.0.1, ``--per-port`` peers per port, peer ``i`` under the path
prefix ``/p{i}`` (so every peer has its own site URL, ``http://127.0.0.1:PORT/p{i}``). Each
answers ``POST /p{i}/api/v4/remotecluster/ping`` as Mattermost does: after checking the
``X-RemoteCluster-Id`` and ``X-RemoteCluster-Token`` headers against the peer's expected
values, 200 with ``{"sent_at": <msg.payload.sent_at echoed>, "recv_at": <now, epoch ms>}``.
A refused ping gets 401 and is counted, not recorded.

The arrival time (``time.monotonic()``, the same clock in every process) of every accepted
ping is recorded per peer. A control listener (its own port) serves:

* ``GET /stats``: ``{"now", "arrivals": {index: [monotonic seconds, ...]}, "rejected", ...}``
* ``POST /reset``: forget every arrival and counter (between two measured runs).

Usage (``heartbeat_fanout.py`` starts it for you)::

    python bench/stub_peers.py --peers-file PEERS.json --ready-file READY.json [--per-port 20]

``PEERS.json`` is a list of ``{"remote_id": ..., "token": ...}``, one entry per peer: the id
and token the pinging side presents to that peer. Once every port listens, the script writes
``{"pid", "control_port", "ports": [...], "per_port"}`` to ``READY.json`` (atomically). It runs
until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

from aiohttp import web

HOST = "127.0.0.1"
PING_SUFFIX = "/api/v4/remotecluster/ping"


class Stub:
    """Expected credentials and recorded arrivals of every stub peer."""

    def __init__(self, peers: list[dict[str, str]], per_port: int) -> None:
        self.peers = peers
        self.per_port = per_port
        self.ports: list[int] = []
        self.arrivals: list[list[float]] = [[] for _ in peers]
        self.rejected: dict[str, int] = {}

    def reset(self) -> None:
        self.arrivals = [[] for _ in self.peers]
        self.rejected = {}

    def _reject(self, reason: str, status: int) -> web.Response:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        return web.json_response({"error": reason}, status=status)

    async def ping(self, request: web.Request) -> web.Response:
        arrived = time.monotonic()
        name = request.match_info["peer"]
        index = int(name[1:]) if name[1:].isdigit() else -1
        if not 0 <= index < len(self.peers):
            return self._reject("unknown_peer", 404)
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        if sockname is None or sockname[1] != self.ports[index // self.per_port]:
            return self._reject("wrong_port", 404)
        expected = self.peers[index]
        if request.headers.get("X-RemoteCluster-Id") != expected["remote_id"]:
            return self._reject("bad_remote_id", 401)
        if request.headers.get("X-RemoteCluster-Token") != expected["token"]:
            return self._reject("bad_token", 401)
        try:
            frame = json.loads(await request.read())
            sent_at = int(frame["msg"]["payload"]["sent_at"])
            if frame["remote_id"] != expected["remote_id"] or frame["msg"]["topic"] != "ping":
                return self._reject("bad_frame", 400)
        except (ValueError, KeyError, TypeError):
            return self._reject("bad_frame", 400)
        self.arrivals[index].append(arrived)
        return web.json_response({"sent_at": sent_at, "recv_at": time.time_ns() // 1_000_000})

    async def stats(self, _request: web.Request) -> web.Response:
        body: dict[str, Any] = {
            "now": time.monotonic(),
            "peers": len(self.peers),
            "arrivals": {str(i): times for i, times in enumerate(self.arrivals) if times},
            "rejected": self.rejected,
        }
        return web.json_response(body)

    async def reset_handler(self, _request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"now": time.monotonic()})


async def serve(peers: list[dict[str, str]], ready_file: Path, per_port: int) -> None:
    stub = Stub(peers, per_port)

    peer_app = web.Application()
    peer_app.router.add_post("/{peer}" + PING_SUFFIX, stub.ping)
    control_app = web.Application()
    control_app.router.add_get("/stats", stub.stats)
    control_app.router.add_post("/reset", stub.reset_handler)

    peer_runner = web.AppRunner(peer_app, access_log=None)
    control_runner = web.AppRunner(control_app, access_log=None)
    await peer_runner.setup()
    await control_runner.setup()
    try:
        groups = (len(peers) + per_port - 1) // per_port
        for _ in range(groups):
            sock = _listening_socket()
            await web.SockSite(peer_runner, sock).start()
            stub.ports.append(sock.getsockname()[1])
        control_sock = _listening_socket()
        await web.SockSite(control_runner, control_sock).start()
        ready = {
            "pid": os.getpid(),
            "control_port": control_sock.getsockname()[1],
            "ports": stub.ports,
            "per_port": per_port,
        }
        _write_atomically(ready_file, json.dumps(ready))

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        await control_runner.cleanup()
        await peer_runner.cleanup()


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _listening_socket() -> socket.socket:
    """A TCP socket bound to a free port of 127.0.0.1 (the site listens on it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))
    return sock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--peers-file", type=Path, required=True)
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--per-port", type=int, default=20)
    args = parser.parse_args()
    peers = json.loads(args.peers_file.read_text())
    asyncio.run(serve(peers, args.ready_file, args.per_port))


if __name__ == "__main__":
    main()
