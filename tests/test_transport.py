"""Transport endpoints: remote-cluster authentication, frame checks, ping and confirm_invite."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from daemon import invites
from daemon.ids import hash_token, new_id
from daemon.keys import REMOTES
from tests.helpers import API, Api, ping_frame, transport_call
from tests.test_management import add_remote

PING = f"{API}/ping"
CONFIRM = f"{API}/confirm_invite"


def base_url(client: TestClient[Any, Any]) -> str:
    return str(client.make_url("")).rstrip("/")


def without_request_id(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "request_id"}


async def test_ping_answers_the_bare_ping_object(
    client: TestClient[Any, Any], session: aiohttp.ClientSession
) -> None:
    token = new_id()
    remote = await add_remote(client, token_sha256=hash_token(token))
    status, body = await transport_call(
        session,
        base_url(client),
        PING,
        ping_frame(remote.remote_id, new_id(), sent_at=1234),
        remote_id=remote.remote_id,
        token=token,
    )
    assert status == 200 and set(body) == {"sent_at", "recv_at"}
    assert body["sent_at"] == 1234 and body["recv_at"] > 1234
    # Header names are case-insensitive (Go sends X-Remotecluster-Id).
    async with session.post(
        base_url(client) + PING,
        json=ping_frame(remote.remote_id, new_id()),
        headers={"x-remotecluster-id": remote.remote_id, "X-REMOTECLUSTER-TOKEN": token},
    ) as resp:
        assert resp.status == 200


async def test_bad_credentials_get_one_identical_401(
    client: TestClient[Any, Any], session: aiohttp.ClientSession
) -> None:
    """Missing id, unknown remote, deleted remote, wrong token: the same body (but its request id)."""
    token = new_id()
    remote = await add_remote(client, token_sha256=hash_token(token))
    gone_token = new_id()
    gone = await add_remote(client, token_sha256=hash_token(gone_token))
    await client.server.app[REMOTES].soft_delete(gone.remote_id)
    pending_token = new_id()
    pending = await add_remote(
        client, token_sha256=hash_token(pending_token), site_url="pending_" + new_id()
    )
    cases = [
        (None, token),
        ("", token),
        (new_id(), token),
        (remote.remote_id, None),
        (remote.remote_id, "wrong"),
        (remote.remote_id, token + "x"),
        (gone.remote_id, gone_token),
        (pending.remote_id, pending_token),  # an invite token is good for confirm_invite only
    ]
    bodies = []
    for rid, tok in cases:
        frame = ping_frame(rid or remote.remote_id, new_id())
        status, body = await transport_call(
            session, base_url(client), PING, frame, remote_id=rid, token=tok
        )
        assert status == 401, (rid, tok, body)
        bodies.append(without_request_id(body))
        assert token not in str(body) and (not tok or tok not in str(body))
    assert all(b == bodies[0] for b in bodies)
    assert bodies[0]["id"] == "api.context.invalid_token.error"


async def test_credentials_that_are_not_utf8_get_401(
    client: TestClient[Any, Any], session: aiohttp.ClientSession
) -> None:
    """Header bytes that are not UTF-8 are just a wrong token, on every kind of route."""
    remote = await add_remote(client, token_sha256=hash_token(new_id()))
    cases = [
        (b"GET", API, b"Authorization: Bearer \xff\xfe"),
        (b"GET", "/metrics", b"Authorization: Bearer \xff"),  # open here: 200, never a 500
        (b"POST", PING, b"X-RemoteCluster-Id: " + remote.remote_id.encode()
         + b"\r\nX-RemoteCluster-Token: \xff\xfe"),
    ]  # fmt: skip
    for method, path, header in cases:
        reader, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(
            method + b" " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n" + header
            + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )  # fmt: skip
        status_line = await reader.readline()
        writer.close()
        expected = b"200" if path == "/metrics" else b"401"
        assert status_line.split()[1] == expected, (path, status_line)


@pytest.mark.parametrize(
    ("mutate", "error_id"),
    [
        (lambda f: f.update(remote_id="short"), "api.remote_cluster.invalid_id.app_error"),
        (lambda f: f["msg"].update(id="bad"), "api.remote_cluster.invalid_id.app_error"),
        (lambda f: f["msg"].update(topic=""), "api.remote_cluster.invalid_topic.app_error"),
        (lambda f: f["msg"].pop("payload"), "api.context.invalid_body_param.app_error"),
        (
            lambda f: f["msg"].update(payload="not a ping"),
            "api.context.invalid_body_param.app_error",
        ),
        (lambda f: f["msg"].update(create_at="soon"), "api.context.invalid_body_param.app_error"),
        (lambda f: f.update(remote_id=new_id()), "api.context.remote_id_invalid.app_error"),
    ],
)
async def test_bad_frames_get_400(
    client: TestClient[Any, Any], session: aiohttp.ClientSession, mutate: Any, error_id: str
) -> None:
    token = new_id()
    remote = await add_remote(client, token_sha256=hash_token(token))
    frame = ping_frame(remote.remote_id, new_id())
    mutate(frame)
    status, body = await transport_call(
        session, base_url(client), PING, frame, remote_id=remote.remote_id, token=token
    )
    assert status == 400 and body["id"] == error_id


async def test_oversize_and_malformed_bodies(
    client: TestClient[Any, Any], session: aiohttp.ClientSession
) -> None:
    token = new_id()
    remote = await add_remote(client, token_sha256=hash_token(token))
    headers = {"X-RemoteCluster-Id": remote.remote_id, "X-RemoteCluster-Token": token}
    async with session.post(base_url(client) + PING, data=b"{" * 10, headers=headers) as resp:
        assert resp.status == 400
    big = b'{"remote_id": "' + b"x" * 300_001 + b'"}'
    async with session.post(base_url(client) + PING, data=big, headers=headers) as resp:
        assert resp.status == 413

    async def chunks() -> Any:
        for _ in range(400):
            yield b" " * 1000

    async with session.post(base_url(client) + PING, data=chunks(), headers=headers) as resp:
        assert resp.status == 413  # chunked, no Content-Length: counted while read


# --- confirm_invite -----------------------------------------------------------------------------


async def pending_remote(api: Api) -> tuple[str, str]:
    """Create a remote through the API; return its id and the invite token T1."""
    body = await api.create("accepter", password="the-password")
    invite = invites.decrypt(body["invite"], "the-password")
    return invite.remote_id, invite.token


def confirm_frame(rid: str, **payload: Any) -> dict[str, Any]:
    content = {
        "remote_id": rid,
        "remote_team_id": "",
        "site_url": "http://127.0.0.1:9/",
        "token": new_id(),
        "refreshed_token": new_id(),
        "version": 3,
        **payload,
    }
    return {
        "remote_id": rid,
        "msg": {"id": new_id(), "topic": "invitation", "create_at": 1, "payload": content},
    }


async def test_confirm_rotates_tokens_once(
    api: Api, client: TestClient[Any, Any], session: aiohttp.ClientSession
) -> None:
    rid, t1 = await pending_remote(api)
    t2, t3 = new_id(), new_id()
    frame = confirm_frame(rid, token=t2, refreshed_token=t3)
    status, body = await transport_call(
        session, base_url(client), CONFIRM, frame, remote_id=rid, token=t1
    )
    assert status == 200 and body == {"status": "OK"}
    stored = client.server.app[REMOTES].get(rid)
    assert stored is not None
    assert stored.site_url == "http://127.0.0.1:9" and stored.remote_token == t2
    assert stored.token_sha256 == hash_token(t3)
    # T1 is dead; T3 works on /ping; a second confirmation is refused.
    status, _ = await transport_call(
        session, base_url(client), CONFIRM, frame, remote_id=rid, token=t1
    )
    assert status == 401
    status, body = await transport_call(
        session, base_url(client), CONFIRM, confirm_frame(rid), remote_id=rid, token=t3
    )
    assert status == 400 and body["id"] == "api.remote_cluster.already_confirmed.app_error"
    status, _ = await transport_call(
        session, base_url(client), PING, ping_frame(rid, new_id()), remote_id=rid, token=t3
    )
    assert status == 200


async def test_concurrent_confirmations_succeed_once(
    api: Api, client: TestClient[Any, Any], session: aiohttp.ClientSession
) -> None:
    rid, t1 = await pending_remote(api)
    results = await asyncio.gather(
        *(
            transport_call(
                session, base_url(client), CONFIRM, confirm_frame(rid), remote_id=rid, token=t1
            )
            for _ in range(5)
        )
    )
    statuses = sorted(status for status, _ in results)
    # Exactly one wins; the others fail on the rotated token (401) or the confirmed state (400).
    assert statuses.count(200) == 1 and set(statuses) <= {200, 400, 401}


@pytest.mark.parametrize(
    ("payload", "frame_rid_other", "message"),
    [
        ({"remote_id": new_id()}, False, "another secure connection"),
        ({"site_url": "ftp://x"}, False, "Invalid site_url"),
        ({"token": ""}, False, "Invalid token"),
        ({"refreshed_token": ""}, False, "refreshed_token"),
        ({"version": 1}, False, "refreshed_token"),
        ({}, True, "Unable to find secure connection ID"),
    ],
)
async def test_confirm_checks(
    api: Api,
    client: TestClient[Any, Any],
    session: aiohttp.ClientSession,
    payload: dict[str, Any],
    frame_rid_other: bool,
    message: str,
) -> None:
    rid, t1 = await pending_remote(api)
    frame = confirm_frame(rid, **payload)
    if frame_rid_other:
        frame["remote_id"] = new_id()
    status, body = await transport_call(
        session, base_url(client), CONFIRM, frame, remote_id=rid, token=t1
    )
    assert status == 400 and message in body["message"], body
    assert client.server.app[REMOTES].get(rid).is_pending  # type: ignore[union-attr]


async def test_confirm_refuses_reused_token_and_expired_invites(
    api: Api, client: TestClient[Any, Any], session: aiohttp.ClientSession
) -> None:
    rid, t1 = await pending_remote(api)
    status, body = await transport_call(
        session,
        base_url(client),
        CONFIRM,
        confirm_frame(rid, refreshed_token=t1),
        remote_id=rid,
        token=t1,
    )
    assert status == 400 and "must be different" in body["message"]
    remotes = client.server.app[REMOTES]
    await remotes.update(rid, create_at=remotes.get(rid).create_at - 48 * 3600 * 1000 - 1)  # type: ignore[union-attr]
    status, body = await transport_call(
        session, base_url(client), CONFIRM, confirm_frame(rid), remote_id=rid, token=t1
    )
    assert status == 400 and body["id"] == "api.context.invitation_expired.error"
    assert remotes.get(rid).is_pending  # type: ignore[union-attr]
