"""Messages in-process: topic routing, answers given once, the outbox endpoints and its policy."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from daemon.delivery import backoff_delay
from daemon.ids import hash_token, new_id
from daemon.keys import DATABASE, OUTBOX, WRITER
from tests.conftest import AppClient
from tests.fakes import Answer, FakePeer, ScriptedApp, fake_peers, scripted_app
from tests.helpers import API, Api, eventually, metrics, sample, transport_call
from tests.test_management import add_remote

MSG = f"{API}/msg"


def frame(
    remote_id: str, topic: str = "sync", payload: Any = None, msg_id: str | None = None
) -> dict[str, Any]:
    return {
        "remote_id": remote_id,
        "msg": {
            "id": msg_id or new_id(),
            "topic": topic,
            "create_at": 17,
            "payload": payload if payload is not None else {"n": 1},
        },
    }


class Receiver:
    """An in-process daemon with one linked remote whose credentials the test holds."""

    def __init__(self, client: TestClient[Any, Any], remote_id: str, token: str) -> None:
        self.client, self.remote_id, self.token = client, remote_id, token
        self.url = str(client.make_url("")).rstrip("/")

    async def send(self, session: aiohttp.ClientSession, body: dict[str, Any]) -> tuple[int, Any]:
        return await transport_call(
            session, self.url, MSG, body, remote_id=self.remote_id, token=self.token
        )


async def receiver(app_client: AppClient, app: ScriptedApp, **sections: Any) -> Receiver:
    topics = sections.pop(
        "topics", [{"name": "sync", "forward_url": app.url + "/topic", "timeout": 0.5}]
    )
    client = await app_client(topics=topics, inbox={"retry_after": 2}, **sections)
    token = new_id()
    remote = await add_remote(client, name="sender", token_sha256=hash_token(token))
    return Receiver(client, remote.remote_id, token)


async def test_forwarded_message_and_answers(
    app_client: AppClient, session: aiohttp.ClientSession
) -> None:
    async with scripted_app() as app:
        rx = await receiver(app_client, app)
        app.answers["/topic"] = Answer(200, b'{"accepted": [1, 2]}')
        body = frame(rx.remote_id, payload={"posts": ["a"], "n": 3})
        status, answer = await rx.send(session, body)
        assert status == 200 and answer == {
            "status": "OK",
            "err": "",
            "payload": {"accepted": [1, 2]},
        }
        (forwarded,) = app.messages()
        assert forwarded == {"remote_id": rx.remote_id, "remote_name": "sender", "msg": body["msg"]}

        app.answers["/topic"] = Answer(204)
        status, answer = await rx.send(session, frame(rx.remote_id))
        assert status == 200 and answer == {"status": "OK", "err": "", "payload": None}

        app.answers["/topic"] = Answer(422, b'{"error": "channel is no longer shared"}')
        status, answer = await rx.send(session, frame(rx.remote_id))
        assert status == 200 and answer == {
            "status": "FAIL",
            "err": "channel is no longer shared",
            "payload": None,
        }

        app.answers["/topic"] = Answer(400, b"plain reason")
        status, answer = await rx.send(session, frame(rx.remote_id))
        assert answer["status"] == "FAIL" and answer["err"] == "plain reason"


@pytest.mark.parametrize("answer", [Answer(500), Answer(503), Answer(200, delay=2.0)])
async def test_local_outage_answers_503_with_retry_after(
    app_client: AppClient, session: aiohttp.ClientSession, answer: Answer
) -> None:
    async with scripted_app() as app:
        rx = await receiver(app_client, app)
        app.answers["/topic"] = answer
        body = frame(rx.remote_id)
        async with session.post(
            rx.url + MSG,
            json=body,
            headers={"X-RemoteCluster-Id": rx.remote_id, "X-RemoteCluster-Token": rx.token},
        ) as resp:
            assert resp.status == 503 and resp.headers["Retry-After"] == "2"
            assert (await resp.json())["id"] == "api.remote_cluster.local_unavailable.app_error"
        # Not final: the same message is forwarded again once the application is back.
        app.answers["/topic"] = Answer(200, b'"done"')
        status, reply = await rx.send(session, body)
        assert status == 200 and reply["payload"] == "done"


async def test_unreachable_local_application_is_503(
    app_client: AppClient, session: aiohttp.ClientSession
) -> None:
    async with scripted_app() as app:
        rx = await receiver(
            app_client, app, topics=[{"name": "*", "forward_url": "http://127.0.0.1:9/x"}]
        )
        status, body = await rx.send(session, frame(rx.remote_id))
        assert status == 503 and body["status_code"] == 503


async def test_routing_wildcard_and_unknown_topics(
    app_client: AppClient, session: aiohttp.ClientSession
) -> None:
    async with scripted_app() as app:
        rx = await receiver(
            app_client, app,
            topics=[{"name": "sync", "forward_url": app.url + "/topic"}, {"name": "*", "forward_url": app.url + "/any"}],
        )  # fmt: skip
        await rx.send(session, frame(rx.remote_id, topic="sync"))
        await rx.send(session, frame(rx.remote_id, topic="other"))
        assert len(app.messages("/topic")) == 1 and len(app.messages("/any")) == 1
        rx2 = await receiver(app_client, app)  # only "sync" is routed here
        status, answer = await rx2.send(session, frame(rx2.remote_id, topic="unrouted"))
        assert status == 200 and answer == {"status": "OK", "err": "", "payload": None}
        assert len(app.received) == 2


async def test_final_answers_are_given_once(
    app_client: AppClient, session: aiohttp.ClientSession
) -> None:
    """A repeated message id is answered from the stored outcome, without forwarding again."""
    async with scripted_app() as app:
        rx = await receiver(app_client, app)
        app.answers["/topic"] = Answer(200, b'{"v": 1}')
        ok_frame = frame(rx.remote_id)
        first = await rx.send(session, ok_frame)
        app.answers["/topic"] = Answer(400, b'{"error": "no"}')
        fail_frame = frame(rx.remote_id)
        failed = await rx.send(session, fail_frame)
        app.answers["/topic"] = Answer(200, b'{"v": 2}')
        assert await rx.send(session, ok_frame) == first
        assert await rx.send(session, fail_frame) == failed
        assert app.msg_ids() == [ok_frame["msg"]["id"]] and len(app.refused) == 1
        # Concurrent repeats of a new message: forwarded once, the same answer for all.
        app.answers["/topic"] = Answer(200, b'{"v": 3}', delay=0.2)
        twin = frame(rx.remote_id)
        answers = await asyncio.gather(*(rx.send(session, twin) for _ in range(5)))
        assert all(a == (200, {"status": "OK", "err": "", "payload": {"v": 3}}) for a in answers)
        assert app.msg_ids().count(twin["msg"]["id"]) == 1


async def test_a_peer_hanging_up_does_not_get_its_message_forwarded_twice(
    app_client: AppClient, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The application took the message; the peer gives up while the answer is being
    committed (a slow disk) and sends the message again at once: the retry waits for the
    first delivery, which goes on, instead of forwarding the message a second time."""
    async with scripted_app() as app:
        rx = await receiver(app_client, app)
        writer = rx.client.server.app[WRITER]
        commit_all = writer._commit_all

        async def slow_disk() -> bool:
            await asyncio.sleep(0.3)
            return await commit_all()

        monkeypatch.setattr(writer, "_commit_all", slow_disk)
        app.answers["/topic"] = Answer(200, b'{"v": 1}')
        body = frame(rx.remote_id)
        headers = {"X-RemoteCluster-Id": rx.remote_id, "X-RemoteCluster-Token": rx.token}
        with pytest.raises(TimeoutError):
            async with session.post(
                rx.url + MSG, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=0.1)
            ) as resp:
                await resp.read()
        assert app.msg_ids() == [body["msg"]["id"]]  # taken before the peer gave up
        status, answer = await rx.send(session, body)
        assert (status, answer["payload"]) == (200, {"v": 1})
        assert app.msg_ids() == [body["msg"]["id"]]


async def test_an_unusable_success_answer_is_not_retried(
    app_client: AppClient, session: aiohttp.ClientSession
) -> None:
    """A 2xx whose body is too large still means the application took the message."""
    async with scripted_app() as app:
        rx = await receiver(app_client, app)
        app.answers["/topic"] = Answer(200, b'{"x": "' + b"a" * 300_001 + b'"}')
        body = frame(rx.remote_id)
        ok = (200, {"status": "OK", "err": "", "payload": None})
        assert await rx.send(session, body) == ok
        assert await rx.send(session, body) == ok  # answered from the inbox
        assert app.msg_ids() == [body["msg"]["id"]]


@pytest.mark.parametrize(
    ("mutate", "status"),
    [
        (lambda f: f["msg"].update(id="x"), 400),
        (lambda f: f["msg"].update(topic=""), 400),
        (lambda f: f["msg"].pop("payload"), 400),
        (lambda f: f.update(remote_id=new_id()), 400),
        (lambda f: f["msg"].update(payload="x" * 300_001), 413),
    ],
)
async def test_bad_frames(
    app_client: AppClient, session: aiohttp.ClientSession, mutate: Any, status: int
) -> None:
    async with scripted_app() as app:
        rx = await receiver(app_client, app)
        body = frame(rx.remote_id)
        mutate(body)
        assert (await rx.send(session, body))[0] == status
        assert app.received == []


# --- the outbox extension --------------------------------------------------------------------


async def test_send_endpoint_validation(api: Api, client: TestClient[Any, Any]) -> None:
    linked = await add_remote(client, name="linked", site_url="http://127.0.0.1:9")
    pending = await add_remote(client, name="pending", site_url="pending_" + new_id())
    path = f"{API}/{linked.remote_id}/msg"
    for body, status in [
        ({"topic": "", "payload": 1}, 400),
        ({"topic": "ping", "payload": 1}, 400),
        ({"topic": "t" * 129, "payload": 1}, 400),
        ({"topic": "sync"}, 400),
        ({"topic": 5, "payload": 1}, 400),
        ({"topic": "sync", "payload": "x" * 299_900}, 413),
    ]:
        assert (await api.call("POST", path, json=body))[0] == status, body
    assert (
        await api.call("POST", f"{API}/{pending.remote_id}/msg", json={"topic": "t", "payload": 1})
    )[0] == 409
    assert (await api.call("POST", f"{API}/{new_id()}/msg", json={"topic": "t", "payload": 1}))[
        0
    ] == 404
    assert (await api.call("GET", f"{API}/{linked.remote_id}/msg/{new_id()}"))[0] == 404
    assert (
        await Api(api.session, api.base_url, None).call(
            "POST", path, json={"topic": "t", "payload": 1}
        )
    )[0] == 401


async def test_outbox_full_is_429(app_client: AppClient) -> None:
    client = await app_client(outbox={"max_queued": 2, "retry_base": 30, "retry_max": 60})
    api = Api(client.session, str(client.make_url("")).rstrip("/"))
    remote = await add_remote(client, name="down", site_url="http://127.0.0.1:9")
    path = f"{API}/{remote.remote_id}/msg"
    for _ in range(2):
        status, body = await api.call("POST", path, json={"topic": "t", "payload": {"a": 1}})
        assert status == 202 and body["state"] == "queued"
    status, body = await api.call("POST", path, json={"topic": "t", "payload": {"a": 1}})
    assert status == 429 and body["id"] == "api.remote_cluster.outbox_full.app_error"


async def test_outbox_depth_per_remote_even_when_names_repeat(
    app_client: AppClient, session: aiohttp.ClientSession
) -> None:
    client = await app_client(outbox={"retry_base": 30, "retry_max": 60})
    api = Api(client.session, str(client.make_url("")).rstrip("/"))
    twins = [await add_remote(client, name="twin", site_url="http://127.0.0.1:9") for _ in "ab"]
    for count, remote in enumerate(twins, start=1):
        for _ in range(count):
            status, _ = await api.call(
                "POST", f"{API}/{remote.remote_id}/msg", json={"topic": "t", "payload": 1}
            )
            assert status == 202
    samples = await metrics(session, api.base_url)
    for count, remote in enumerate(twins, start=1):
        depth = sample(
            samples, "remoteclusterd_outbox_queued", remote="twin", remote_id=remote.remote_id
        )
        assert depth == count


@pytest.mark.parametrize("steps", range(0, 12, 2))
async def test_a_cancelled_enqueue_is_counted_if_it_committed(
    app_client: AppClient, steps: int
) -> None:
    """A local application gone while its message commits: the message is queued (and counts
    against ``max_queued``) or it is not; the cap is never overshot."""
    client = await app_client(outbox={"max_queued": 2, "retry_base": 30, "retry_max": 60})
    api = Api(client.session, str(client.make_url("")).rstrip("/"))
    remote = await add_remote(client, name="down", site_url="http://127.0.0.1:9")
    enqueue = asyncio.ensure_future(client.server.app[OUTBOX].enqueue(remote, "t", b"1"))
    for _ in range(steps):
        await asyncio.sleep(0)  # let it get this far
    enqueue.cancel()
    await asyncio.gather(enqueue, return_exceptions=True)
    path = f"{API}/{remote.remote_id}/msg"
    while (await api.call("POST", path, json={"topic": "t", "payload": 1}))[0] == 202:
        pass
    db = client.server.app[DATABASE]
    assert await db.scalar("SELECT count(*) FROM outbox WHERE state = 'queued'") == 2


async def test_delivery_rejection_and_death(app_client: AppClient) -> None:
    """Between two in-process daemons: OK → delivered, FAIL → rejected (once), unreachable → dead."""
    async with scripted_app() as app:
        b = await app_client(topics=[{"name": "sync", "forward_url": app.url + "/topic"}])
        a = await app_client(
            outbox={"retry_base": 0.01, "retry_max": 0.05, "max_attempts": 3},
            events={"forward_url": app.url + "/events"},
        )
        api_a = Api(a.session, str(a.make_url("")).rstrip("/"))
        api_b = Api(b.session, str(b.make_url("")).rstrip("/"))
        created = await api_a.create("b", password="the-password")
        status, _ = await api_b.accept(created["invite"], "the-password", name="a")
        assert status == 201
        rid = created["remote_cluster"]["remote_id"]

        async def state(msg_id: str) -> dict[str, Any]:
            status, body = await api_a.call("GET", f"{API}/{rid}/msg/{msg_id}")
            assert status == 200
            return dict(body)

        app.answers["/topic"] = Answer(200, b'{"ok": true}')
        status, queued = await api_a.call(
            "POST", f"{API}/{rid}/msg", json={"topic": "sync", "payload": {"x": [1]}}
        )
        assert status == 202
        await eventually(lambda: _is(state, queued["id"], "delivered"))
        delivered = await state(queued["id"])
        assert delivered == {"id": queued["id"], "topic": "sync", "state": "delivered", "attempts": 1,
                             "response": {"status": "OK", "err": "", "payload": {"ok": True}}, "last_error": ""}  # fmt: skip
        assert app.msg_ids() == [queued["id"]]
        assert app.messages()[0]["msg"]["payload"] == {"x": [1]}

        app.answers["/topic"] = Answer(409, b'{"error": "duplicate post"}')
        _, refused = await api_a.call(
            "POST", f"{API}/{rid}/msg", json={"topic": "sync", "payload": 2}
        )
        await eventually(lambda: _is(state, refused["id"], "rejected"))
        rejected = await state(refused["id"])
        assert rejected["last_error"] == "duplicate post" and rejected["attempts"] == 1
        assert rejected["response"] == {"status": "FAIL", "err": "duplicate post", "payload": None}
        assert len(app.refused) == 1

        await b.close()  # the peer is gone: every attempt fails
        _, doomed = await api_a.call(
            "POST", f"{API}/{rid}/msg", json={"topic": "sync", "payload": 3}
        )
        await eventually(lambda: _is(state, doomed["id"], "dead"))
        dead = await state(doomed["id"])
        assert dead["attempts"] == 3 and dead["last_error"].startswith("unreachable")
        (event,) = await app.wait_events("msg.dead", 1)
        assert event["msg_id"] == doomed["id"] and event["remote_id"] == rid


async def _is(state: Any, msg_id: str, expected: str) -> bool:
    return (await state(msg_id))["state"] == expected


def test_backoff_is_capped_full_jitter() -> None:
    rng = random.Random(7)
    for attempt in range(1, 80):
        ceiling = min(60.0, 0.5 * 2 ** (attempt - 1))
        delays = [backoff_delay(attempt, 0.5, 60.0, rng) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # spread over the whole range, not a fixed step
    assert backoff_delay(0, 0.5, 60.0, rng) <= 0.5


async def test_frames_use_mattermost_shape(app_client: AppClient) -> None:
    """The outbox sends a RemoteClusterFrame with the payload embedded (not as a string)."""
    peer = FakePeer()
    async with fake_peers(peer):
        client = await app_client()
        api = Api(client.session, str(client.make_url("")).rstrip("/"))
        code = await asyncio.to_thread(peer.invite, "the-password")
        status, _ = await api.accept(code, "the-password", name="mm")
        assert status == 201
        _, queued = await api.call(
            "POST",
            f"{API}/{peer.remote_id}/msg",
            json={"topic": "sharedchannel_sync", "payload": {"posts": [{"id": "p"}]}},
        )
        await eventually(lambda: len(peer.frames) == 1)
        (received,) = peer.frames
        assert list(received) == ["remote_id", "msg"]
        assert received["remote_id"] == peer.remote_id
        assert list(received["msg"]) == ["id", "topic", "create_at", "payload"]
        assert (
            received["msg"]["id"] == queued["id"]
            and received["msg"]["topic"] == "sharedchannel_sync"
        )
        assert received["msg"]["payload"] == {"posts": [{"id": "p"}]}
        assert isinstance(received["msg"]["create_at"], int)
