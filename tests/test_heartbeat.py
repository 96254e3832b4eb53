"""Heartbeats with real daemons: liveness transitions, isolation from a hanging peer, batching."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from daemon.ids import hash_token, new_id
from daemon.keys import DATABASE
from daemon.models import now_ms
from tests.fakes import FakePeer, fake_peers, local_app
from tests.helpers import (
    API,
    Api,
    DaemonProcess,
    eventually,
    link,
    metrics,
    ping_frame,
    running,
    sample,
    transport_call,
)
from tests.test_management import add_remote

pytestmark = pytest.mark.timeout(180)

INTERVAL, OFFLINE_AFTER = 0.2, 1.0
HEARTBEAT = {"interval": INTERVAL, "timeout": 0.5, "offline_after": OFFLINE_AFTER, "jitter": 0.0}


async def _last_ping(api: Api, rid: str) -> int:
    status, body = await api.call("GET", f"{API}/{rid}")
    assert status == 200
    return int(body["last_ping_at"])


async def _advances(api: Api, rid: str) -> None:
    first = 0

    async def seen() -> bool:
        nonlocal first
        first = await _last_ping(api, rid)
        return first > 0

    await eventually(seen, timeout=5)

    async def later() -> bool:
        return await _last_ping(api, rid) > first

    await eventually(later, timeout=INTERVAL * 5)


async def _ok_pings(session: aiohttp.ClientSession, url: str, result: str = "ok") -> float:
    return sample(
        await metrics(session, url), "remoteclusterd_heartbeat_pings_total", result=result
    )


async def test_liveness_transitions_are_announced_once(tmp_path: Path) -> None:
    async with local_app() as hooks, aiohttp.ClientSession() as session:
        a = DaemonProcess(
            tmp_path, "a", heartbeat=HEARTBEAT, events={"forward_url": hooks.url + "/events"}
        )
        b = DaemonProcess(tmp_path, "b", heartbeat=HEARTBEAT)
        async with running(a, b):
            api_a, api_b = Api(session, a.url), Api(session, b.url)
            rid = await link(api_a, api_b)

            # Both sides' last_ping_at advance within an interval or so.
            await asyncio.gather(_advances(api_a, rid), _advances(api_b, rid))
            (online,) = await hooks.wait_events("remote.online", 1)
            assert online["remote_id"] == rid and online["remote_name"] == "peer-b"
            # The ping loop started during the confirm request, but is not labelled with it.
            lines = [
                json.loads(line) for line in a.logs().splitlines() if '"remote.online"' in line
            ]
            assert lines and all("request_id" not in line for line in lines)
            assert [r["remote_id"] for r in await api_a.remotes(exclude_offline="true")] == [rid]

            # B stops: A says offline within offline_after + one interval, once.
            stopped_at = now_ms()
            assert await b.stop() == 0
            (offline,) = await hooks.wait_events("remote.offline", 1)
            assert offline["at"] - stopped_at <= (OFFLINE_AFTER + INTERVAL) * 1000 + 200
            assert "no successful ping" in offline["reason"]
            assert await api_a.remotes(exclude_offline="true") == []

            # B starts again: online within one interval, once.
            await b.start()
            healthy_at = now_ms()
            online_again = (await hooks.wait_events("remote.online", 2))[1]
            assert online_again["at"] - healthy_at <= INTERVAL * 1000 + 200
            before = await _ok_pings(session, a.url)
            await eventually(lambda: _ok_pings_more(session, a.url, before, 3), timeout=5)
            assert (
                len(hooks.events("remote.online")) == 2 and len(hooks.events("remote.offline")) == 1
            )

            # B stops again; A is restarted while B is down: B is not reported online.
            await b.stop()
            await hooks.wait_events("remote.offline", 2)
            last_seen = await _last_ping(api_a, rid)
            await a.stop()
            await a.start()
            await eventually(
                lambda: _ok_pings_more(session, a.url, 0, 3, result="unreachable"), timeout=5
            )
            assert len(hooks.events("remote.online")) == 2
            assert await api_a.remotes(exclude_offline="true") == []
            assert await _last_ping(api_a, rid) == last_seen

            # B comes back while A runs, then A stops and B dies while A is down: at start A
            # finds B offline and says so, once.
            await b.start()
            await hooks.wait_events("remote.online", 3)
            await a.stop()
            await b.stop()
            row = a.row(
                "SELECT last_ping_at, online_announced FROM remote_clusters WHERE remote_id = ?",
                (rid,),
            )
            assert row is not None and row["online_announced"] == 1
            await eventually(
                lambda: now_ms() > row["last_ping_at"] + OFFLINE_AFTER * 1000, timeout=5
            )
            await a.start()
            offline_at_start = (await hooks.wait_events("remote.offline", 3))[2]
            assert "start-up" in offline_at_start["reason"]
            assert (
                len(hooks.events("remote.offline")) == 3 and len(hooks.events("remote.online")) == 3
            )


async def _ok_pings_more(
    session: aiohttp.ClientSession, url: str, before: float, more: int, result: str = "ok"
) -> bool:
    return await _ok_pings(session, url, result) >= before + more


async def test_hanging_peer_does_not_delay_the_others(tmp_path: Path) -> None:
    """A peer that accepts and never answers gets one ping at a time; the others stay on time."""
    heartbeat = {
        "interval": INTERVAL,
        "timeout": 2.0,
        "offline_after": 30.0,
        "jitter": 0.0,
        "max_clock_skew": 5.0,
    }
    hanging, skewed = FakePeer(hang=True), FakePeer(skew_ms=10_000)
    healthy = [FakePeer() for _ in range(3)]
    async with fake_peers(hanging, skewed, *healthy), aiohttp.ClientSession() as session:
        a = DaemonProcess(tmp_path, "a", heartbeat=heartbeat)
        async with running(a):
            api = Api(session, a.url)
            # Encrypting an invite takes a while: do it off this loop, which serves the peers.
            codes = [
                await asyncio.to_thread(p.invite, "peer-password")
                for p in (hanging, skewed, *healthy)
            ]
            for i, code in enumerate(codes):
                status, body = await api.accept(code, "peer-password", name=f"peer{i}")
                assert status == 201, body
            started = time.monotonic()
            flushes_before = sample(
                await metrics(session, a.url),
                "remoteclusterd_heartbeat_liveness_transactions_total",
            )

            def measured(peer: FakePeer) -> list[float]:
                return [t for t in peer.pings if t > started]

            await eventually(lambda: all(len(measured(p)) >= 15 for p in healthy), timeout=15)
            elapsed = time.monotonic() - started
            for peer in healthy:
                times = measured(peer)
                gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
                assert max(gaps) < INTERVAL + 0.1, gaps  # on schedule: not held up by the hang
            assert hanging.max_in_flight == 1
            assert 1 <= len(hanging.pings) <= elapsed / 2.0 + 2

            samples = await metrics(session, a.url)
            skew = sample(samples, "remoteclusterd_remote_clock_skew_seconds", remote="peer1")
            assert 9.5 < skew < 10.5
            assert sample(samples, "remoteclusterd_remote_up", remote="peer2") == 1.0
            assert sample(samples, "remoteclusterd_remote_up", remote="peer0") == 0.0
            ok = sample(samples, "remoteclusterd_heartbeat_pings_total", result="ok")
            flushes = (
                sample(samples, "remoteclusterd_heartbeat_liveness_transactions_total")
                - flushes_before
            )
            assert ok >= 4 * 15 - 4
            # One transaction per interval (plus one per transition: none after set-up),
            # against more than fifty pings.
            assert flushes <= elapsed / INTERVAL + 2
        assert len(re.findall(r'"event": "heartbeat.clock_skew"', a.logs())) == 1


async def test_ping_does_not_write_to_the_database(
    client: TestClient[Any, Any], session: aiohttp.ClientSession
) -> None:
    token = new_id()
    remote = await add_remote(client, token_sha256=hash_token(token))
    db = client.server.app[DATABASE]
    before = db.total_changes
    for _ in range(20):
        status, _ = await transport_call(
            session, str(client.make_url("")).rstrip("/"), f"{API}/ping",
            ping_frame(remote.remote_id, new_id()), remote_id=remote.remote_id, token=token,
        )  # fmt: skip
        assert status == 200
    assert db.total_changes == before
