"""Baseline for the heartbeat benchmark: the least code that pings N peers on a schedule.

One aiohttp ClientSession and one asyncio task per peer; each task sleeps until its ping is
due, POSTs the same ping frame the daemon sends (with the same ``X-RemoteCluster-*`` headers)
and parses the JSON answer. The schedule is the daemon's with no jitter: the first pings are
spread over ``min(interval, 5)`` seconds, then a peer's pings are ``interval`` apart, a slot
that a slow ping overran is skipped. The session is configured like the daemon's (connection
limits, no cookie jar, a User-Agent), so the difference in CPU is the daemon's own code. No
database, no metrics, no logging.

Usage (``heartbeat_fanout.py`` starts it for you)::

    python bench/bare_pinger.py --peers-file PEERS.json [--interval 1.0] [--summary OUT.json]

``PEERS.json`` is a list of ``{"url": site_url, "remote_id": ..., "token": ...}``. It runs until
SIGTERM or SIGINT, then writes ``{"ok": n, "errors": {reason: n}}`` to ``--summary`` if given.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import signal
import time
from pathlib import Path

import aiohttp

PING_PATH = "/api/v4/remotecluster/ping"
STARTUP_SPREAD = 5.0
_ALPHABET = "ybndrfg8ejkmcpqxot1uwisza345h769"
_TO_MM = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _ALPHABET)


def _new_id() -> str:
    """A Mattermost-style 26-character id, as the daemon puts in every frame."""
    return base64.b32encode(os.urandom(16)).decode("ascii").rstrip("=").translate(_TO_MM)


def _frame(remote_id: str, sent_at: int) -> bytes:
    return (
        f'{{"remote_id":"{remote_id}","msg":{{"id":"{_new_id()}","topic":"ping",'
        f'"create_at":{sent_at},"payload":{{"sent_at":{sent_at},"recv_at":0}}}}}}'
    ).encode()


class Pinger:
    def __init__(self, session: aiohttp.ClientSession, interval: float, timeout: float) -> None:
        self.session = session
        self.interval = interval
        self.timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, 30.0))
        self.ok = 0
        self.errors: dict[str, int] = {}

    def _error(self, reason: str) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1

    async def ping(self, peer: dict[str, str]) -> None:
        sent_at = time.time_ns() // 1_000_000
        headers = {
            "Content-Type": "application/json",
            "X-RemoteCluster-Id": peer["remote_id"],
            "X-RemoteCluster-Token": peer["token"],
        }
        try:
            async with self.session.post(
                peer["url"].rstrip("/") + PING_PATH,
                data=_frame(peer["remote_id"], sent_at),
                headers=headers,
                timeout=self.timeout,
                allow_redirects=False,
            ) as resp:
                body = await resp.read()
                if resp.status != 200:
                    self._error(f"http_{resp.status}")
                    return
            pong = json.loads(body)
            if pong.get("sent_at") != sent_at:
                self._error("bad_response")
                return
        except TimeoutError:
            self._error("timeout")
            return
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            self._error(type(exc).__name__)
            return
        self.ok += 1

    async def run(self, peer: dict[str, str], first_delay: float) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + first_delay
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            await self.ping(peer)
            due += self.interval
            now = loop.time()
            while due <= now:
                due += self.interval


async def amain(peers: list[dict[str, str]], interval: float, timeout: float) -> Pinger:
    connector = aiohttp.TCPConnector(limit=256, limit_per_host=8, enable_cleanup_closed=True)
    async with aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        headers={"User-Agent": "bare-pinger/1"},
    ) as session:
        pinger = Pinger(session, interval, timeout)
        rng = random.Random()
        spread = min(interval, STARTUP_SPREAD)
        tasks = [asyncio.create_task(pinger.run(p, rng.uniform(0, spread))) for p in peers]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return pinger


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--peers-file", type=Path, required=True)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--timeout", type=float, default=15.0)
    parser.add_argument("--summary", type=Path)
    args = parser.parse_args()
    peers = json.loads(args.peers_file.read_text())
    pinger = asyncio.run(amain(peers, args.interval, args.timeout))
    if args.summary is not None:
        args.summary.write_text(json.dumps({"ok": pinger.ok, "errors": pinger.errors}))


if __name__ == "__main__":
    main()
