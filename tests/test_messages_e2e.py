"""Messages between real daemon processes: exactly once, in order, across restarts and crashes."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from daemon.ids import new_id
from tests.fakes import Answer, FakePeer, ScriptedApp, fake_peers, scripted_app
from tests.helpers import (
    API,
    Api,
    DaemonProcess,
    eventually,
    link,
    metrics,
    running,
    sample,
    transport_call,
)

pytestmark = pytest.mark.timeout(240)

FAST: dict[str, Any] = {
    "outbox": {"retry_base": 0.05, "retry_max": 0.5},
    "heartbeat": {"interval": 0.2, "timeout": 0.5, "offline_after": 1.0},
    "inbox": {"retry_after": 1},
}


def pair(tmp_path: Path, app: ScriptedApp) -> tuple[DaemonProcess, DaemonProcess]:
    a = DaemonProcess(tmp_path, "a", **FAST)
    b = DaemonProcess(
        tmp_path, "b", topics=[{"name": "sync", "forward_url": app.url + "/topic"}], **FAST
    )
    return a, b


async def send(api: Api, rid: str, n: int) -> str:
    status, body = await api.call(
        "POST", f"{API}/{rid}/msg", json={"topic": "sync", "payload": {"n": n}}
    )
    assert status == 202, body
    return str(body["id"])


async def retries(session: aiohttp.ClientSession, proc: DaemonProcess) -> float:
    return sample(
        await metrics(session, proc.url), "remoteclusterd_outbox_attempts_total", result="retry"
    )


async def wait_more_retries(session: aiohttp.ClientSession, proc: DaemonProcess) -> None:
    before = await retries(session, proc)

    async def more() -> bool:
        return await retries(session, proc) > before

    await eventually(more, timeout=20)


async def assert_all_delivered(api: Api, rid: str, ids: list[str]) -> None:
    for msg_id in ids:
        status, body = await api.call("GET", f"{API}/{rid}/msg/{msg_id}")
        assert status == 200 and body["state"] == "delivered", body
        assert body["response"] == {"status": "OK", "err": "", "payload": None}


async def test_1000_messages_once_and_in_order_while_the_peer_restarts(tmp_path: Path) -> None:
    async with scripted_app() as app, aiohttp.ClientSession() as session:
        a, b = pair(tmp_path, app)
        async with running(a, b):
            api_a = Api(session, a.url)
            rid = await link(api_a, Api(session, b.url))
            ids: list[str] = []

            async def produce() -> None:
                for n in range(1000):
                    ids.append(await send(api_a, rid, n))

            producer = asyncio.create_task(produce())
            for threshold in (150, 500):
                await eventually(lambda t=threshold: len(app.messages()) >= t, timeout=60)
                assert await b.stop() == 0
                await wait_more_retries(session, a)
                await b.start()
            await producer
            await eventually(lambda: len(app.messages()) >= 1000, timeout=120)
            assert app.msg_ids() == ids  # each exactly once, in the order sent
            assert [m["msg"]["payload"]["n"] for m in app.messages()] == list(range(1000))
            await eventually(lambda: _all_delivered(api_a, rid, ids), timeout=10)
            await assert_all_delivered(api_a, rid, ids)


async def _all_delivered(api: Api, rid: str, ids: list[str]) -> bool:
    status, body = await api.call("GET", f"{API}/{rid}/msg/{ids[-1]}")
    return status == 200 and body["state"] == "delivered"


async def test_local_application_outage_is_retried(tmp_path: Path) -> None:
    """B's application answers 503 for a while: every message still arrives once, in order."""
    async with scripted_app() as app, aiohttp.ClientSession() as session:
        a, b = pair(tmp_path, app)
        async with running(a, b):
            api_a = Api(session, a.url)
            rid = await link(api_a, Api(session, b.url))
            ids = [await send(api_a, rid, n) for n in range(100)]
            await eventually(lambda: len(app.messages()) >= 30, timeout=30)
            app.answers["/topic"] = Answer(503)
            await wait_more_retries(session, a)
            await wait_more_retries(session, a)
            del app.answers["/topic"]
            ids += [await send(api_a, rid, n) for n in range(100, 200)]
            await eventually(lambda: len(app.messages()) >= 200, timeout=60)
            assert app.msg_ids() == ids
            assert len(app.refused) >= 2
            await eventually(lambda: _all_delivered(api_a, rid, ids), timeout=10)
            await assert_all_delivered(api_a, rid, ids)


async def test_fail_is_final(tmp_path: Path) -> None:
    async with scripted_app() as app, aiohttp.ClientSession() as session:
        a, b = pair(tmp_path, app)
        async with running(a, b):
            api_a = Api(session, a.url)
            rid = await link(api_a, Api(session, b.url))
            app.answers["/topic"] = Answer(400, b'{"error": "unknown channel"}')
            msg_id = await send(api_a, rid, 1)

            async def rejected() -> bool:
                _, body = await api_a.call("GET", f"{API}/{rid}/msg/{msg_id}")
                return bool(body["state"] == "rejected")

            await eventually(rejected, timeout=10)
            _, body = await api_a.call("GET", f"{API}/{rid}/msg/{msg_id}")
            assert body["last_error"] == "unknown channel" and body["attempts"] == 1
            assert body["response"] == {"status": "FAIL", "err": "unknown channel", "payload": None}
            # Later messages go on; the rejected one is never sent again.
            del app.answers["/topic"]
            later = await send(api_a, rid, 2)
            await eventually(lambda: app.msg_ids() == [later], timeout=10)
            assert len(app.refused) == 1


async def test_sigkill_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    async with scripted_app() as app, aiohttp.ClientSession() as session:
        a, b = pair(tmp_path, app)
        async with running(a, b):
            api_a = Api(session, a.url)
            rid = await link(api_a, Api(session, b.url))
            # Killed while delivering: outcomes not yet committed are sent again, and B
            # answers those from its inbox without forwarding them twice.
            ids = [await send(api_a, rid, n) for n in range(400)]
            await eventually(lambda: len(app.messages()) >= 50, timeout=30)
            a.signal(signal.SIGKILL)
            await a.wait_exit()
            # Killed with everything still queued (B down).
            await b.stop()
            await a.start()
            ids += [await send(api_a, rid, n) for n in range(400, 500)]
            a.signal(signal.SIGKILL)
            await a.wait_exit()
            await b.start()
            await a.start()
            await eventually(lambda: len(app.messages()) >= 500, timeout=60)
            assert app.msg_ids() == ids
            await eventually(lambda: _all_delivered(api_a, rid, ids), timeout=10)
            await assert_all_delivered(api_a, rid, ids)


async def test_replayed_frame_is_answered_from_the_inbox(tmp_path: Path) -> None:
    """A peer (here a scripted one) sends the same frame twice: one delivery, one answer."""
    peer = FakePeer()
    async with scripted_app() as app, fake_peers(peer), aiohttp.ClientSession() as session:
        b = DaemonProcess(
            tmp_path, "b", topics=[{"name": "*", "forward_url": app.url + "/topic"}], **FAST
        )
        async with running(b):
            code = await asyncio.to_thread(peer.invite, "the-password")
            status, _ = await Api(session, b.url).accept(code, "the-password", name="mm")
            assert status == 201
            app.answers["/topic"] = Answer(200, b'{"users_syncd": ["u1"]}')
            frame = {
                "remote_id": peer.remote_id,
                "msg": {
                    "id": new_id(),
                    "topic": "sharedchannel_sync",
                    "create_at": 1,
                    "payload": {"channel_id": "c"},
                },
            }
            first = await transport_call(
                session,
                b.url,
                f"{API}/msg",
                frame,
                remote_id=peer.remote_id,
                token=peer.token_for_daemon,
            )
            app.answers["/topic"] = Answer(200, b'{"users_syncd": ["changed"]}')
            second = await transport_call(
                session,
                b.url,
                f"{API}/msg",
                frame,
                remote_id=peer.remote_id,
                token=peer.token_for_daemon,
            )
            assert (
                first
                == second
                == (200, {"status": "OK", "err": "", "payload": {"users_syncd": ["u1"]}})
            )
            assert app.msg_ids() == [frame["msg"]["id"]]
            assert await b.stop() == 0
            await b.start()  # the answer is durable
            third = await transport_call(
                session,
                b.url,
                f"{API}/msg",
                frame,
                remote_id=peer.remote_id,
                token=peer.token_for_daemon,
            )
            assert third == first and len(app.messages()) == 1
