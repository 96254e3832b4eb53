"""The management API: every seed operation, its errors, and bad input that changes nothing.

These run the real app in-process on a real SQLite file (see ``conftest.py``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from daemon import invites
from daemon.handlers import common
from daemon.ids import hash_token, new_id, token_matches
from daemon.keys import REMOTES
from daemon.models import InvitePayload, Remote, now_ms
from tests.helpers import API, OPERATOR_TOKEN, READER_TOKEN, TEAM_ID, Api

pytestmark = pytest.mark.timeout(120)

REMOTE_KEYS = [
    "remote_id", "remote_team_id", "name", "display_name", "site_url", "default_team_id",
    "create_at", "delete_at", "last_ping_at", "last_global_user_sync_at", "token",
    "remote_token", "topics", "creator_id", "plugin_id", "options",
]  # fmt: skip


async def add_remote(client: TestClient[Any, Any], **fields: Any) -> Remote:
    """Insert a remote straight into the store (for list filters and confirmed states)."""
    values: dict[str, Any] = {
        "remote_id": new_id(),
        "name": "r" + new_id()[:6],
        "display_name": "",
        "site_url": "http://127.0.0.1:1",
        "default_team_id": TEAM_ID,
        "create_at": now_ms(),
        "creator_id": new_id(),
        "token_sha256": hash_token(new_id()),
        "remote_token": new_id(),
    }
    values.update(fields)
    values["display_name"] = values["display_name"] or values["name"]
    remote = Remote(**values)
    await client.server.app[REMOTES].add(remote)
    return remote


def reader(api: Api) -> Api:
    return Api(api.session, api.base_url, READER_TOKEN)


# --- create -----------------------------------------------------------------------------------


async def test_create_returns_sanitized_remote_invite_and_generated_password(
    api: Api, client: TestClient[Any, Any]
) -> None:
    """201 with the remote (pending, no tokens), an invite, and the password we generated."""
    body = await api.create("Peer.One_-x", display_name="Peer One")
    rc = body["remote_cluster"]
    assert list(rc) == REMOTE_KEYS
    assert rc["name"] == "peer.one_-x" and rc["display_name"] == "Peer One"
    assert rc["site_url"].startswith("pending_") and len(rc["site_url"]) == 8 + 26
    assert rc["token"] == "" and rc["remote_token"] == "" and rc["default_team_id"] == TEAM_ID
    assert len(rc["creator_id"]) == 26 and rc["create_at"] > 0 and rc["delete_at"] == 0
    assert len(body["password"]) == 16
    invite = invites.decrypt(body["invite"], body["password"])
    assert invite.remote_id == rc["remote_id"] and invite.version == 3
    assert invite.site_url == f"http://127.0.0.1:{client.server.port}"
    assert await api.remotes() == [rc]


async def test_create_with_password_does_not_echo_it(api: Api) -> None:
    body = await api.create("peer", password="a-good-password")
    assert "password" not in body
    assert (
        invites.decrypt(body["invite"], "a-good-password").remote_id
        == body["remote_cluster"]["remote_id"]
    )
    assert body["remote_cluster"]["display_name"] == "peer"


@pytest.mark.parametrize(
    "payload",
    [
        {"name": "", "default_team_id": TEAM_ID},
        {"name": "a" * 65, "default_team_id": TEAM_ID},
        {"name": "bad name", "default_team_id": TEAM_ID},
        {"name": "bad/name", "default_team_id": TEAM_ID},
        {"name": "ok"},
        {"name": "ok", "default_team_id": "short"},
        {"name": 5, "default_team_id": TEAM_ID},
        {"name": "ok", "default_team_id": TEAM_ID, "password": "short"},
        {"name": "ok", "default_team_id": TEAM_ID, "display_name": "d" * 65},
        ["not", "an", "object"],
    ],
)
async def test_create_rejects_bad_input_and_changes_nothing(api: Api, payload: Any) -> None:
    status, body = await api.call("POST", API, json=payload)
    assert status == 400, body
    assert set(body) == {"id", "message", "detailed_error", "request_id", "status_code"}
    assert body["status_code"] == 400
    assert await api.remotes(include_deleted="true") == []


async def test_malformed_json_and_oversize_body(api: Api) -> None:
    status, body = await api.call(
        "POST", API, data=b'{"name": "x",', headers={"Content-Type": "application/json"}
    )
    assert status == 400 and body["id"] == "api.context.invalid_body_param.app_error"
    big = b'{"name": "x", "default_team_id": "' + b"a" * 300_001 + b'"}'
    status, body = await api.call("POST", API, data=big)
    assert status == 413 and body["id"] == "api.context.request_body_too_large.app_error"
    assert await api.remotes(include_deleted="true") == []


async def test_a_stalled_body_gets_408(
    client: TestClient[Any, Any], api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that stops sending mid-body does not hold its handler for ever."""
    monkeypatch.setattr(common, "BODY_TIMEOUT", 0.3)
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        f"POST {API} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {OPERATOR_TOKEN}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n".encode()
        + b'{"name": "x"'  # and then nothing more
    )
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), timeout=10)
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 408 ")
    assert await api.remotes(include_deleted="true") == []


# --- auth -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "reader_status"),
    [
        ("GET", API, 200),
        ("POST", API, 403),
        ("POST", f"{API}/accept_invite", 403),
        ("GET", f"{API}/{'a' * 26}", 404),
        ("PATCH", f"{API}/{'a' * 26}", 403),
        ("DELETE", f"{API}/{'a' * 26}", 403),
        ("POST", f"{API}/{'a' * 26}/generate_invite", 403),
    ],
)
async def test_every_operation_needs_an_operator_token(
    api: Api, method: str, path: str, reader_status: int
) -> None:
    """No or unknown token: 401; a token without the permission: 403; list and get take either."""
    for token in (None, "wrong-token"):
        status, body = await Api(api.session, api.base_url, token).call(method, path, json={})
        assert status == 401 and body["status_code"] == 401
    status, _ = await reader(api).call(method, path, json={})
    assert status == reader_status
    status, _ = await Api(api.session, api.base_url, None).call(
        method, path, json={}, headers={"Authorization": "Basic b3BzOnB3"}
    )
    assert status == 401


# --- list -------------------------------------------------------------------------------------


async def test_list_orders_by_display_name_then_name_and_pages(
    api: Api, client: TestClient[Any, Any]
) -> None:
    for name, display in [("c", "b"), ("a", "b"), ("z", "a"), ("m", "c")]:
        await add_remote(client, name=name, display_name=display)
    names = [rc["name"] for rc in await api.remotes()]
    assert names == ["z", "a", "c", "m"]
    assert [rc["name"] for rc in await api.remotes(page="1", per_page="2")] == ["c", "m"]
    assert await api.remotes(page="2", per_page="2") == []
    assert await api.remotes(per_page="0") == []


async def test_list_per_page_defaults_to_60_and_caps_at_200(
    api: Api, client: TestClient[Any, Any]
) -> None:
    for i in range(205):
        await add_remote(client, name=f"n{i:03d}")
    assert len(await api.remotes()) == 60
    assert len(await api.remotes(per_page="1000")) == 200
    assert len(await api.remotes(page="1", per_page="200")) == 5


async def test_list_filters(api: Api, client: TestClient[Any, Any]) -> None:
    now = now_ms()
    online = await add_remote(client, name="online", last_ping_at=now)
    stale = await add_remote(client, name="stale", last_ping_at=now - 301_000)
    pending = await add_remote(client, name="pending", site_url="pending_" + new_id())
    deleted = await add_remote(client, name="deleted", delete_at=now)
    plugin = await add_remote(client, name="plugin", plugin_id="com.example.plugin")
    topical = await add_remote(client, name="topical", topics=" sync files ")
    creator = await add_remote(client, name="mine", creator_id="c" * 26)

    async def names(**params: str) -> set[str]:
        return {rc["name"] for rc in await api.remotes(**params)}

    everyone = {"online", "stale", "pending", "plugin", "topical", "mine"}
    assert await names() == everyone
    assert await names(exclude_offline="true") == {"online"}
    assert await names(only_confirmed="true") == everyone - {"pending"}
    assert await names(include_deleted="1") == everyone | {"deleted"}
    assert await names(only_plugins="t") == {"plugin"}
    assert await names(exclude_plugins="TRUE") == everyone - {"plugin"}
    assert await names(topic="files") == {"topical"}
    assert await names(creator_id="c" * 26) == {"mine"}
    channel = new_id()
    for rc in (online, stale):
        status, _ = await api.call("POST", f"{API}/{rc.remote_id}/channels/{channel}/invite")
        assert status == 200
    assert await names(in_channel=channel) == {"online", "stale"}
    assert await names(not_in_channel=channel) == everyone - {"online", "stale"}
    status, _ = await api.call("POST", f"{API}/{stale.remote_id}/channels/{channel}/uninvite")
    assert status == 200
    assert await names(in_channel=channel) == {"online"}
    assert {pending.name, deleted.name, plugin.name, topical.name, creator.name} <= everyone | {
        "deleted"
    }


@pytest.mark.parametrize(
    "params",
    [
        {"page": "-1"},
        {"page": "²"},  # str.isdigit() says yes, int() says no
        {"per_page": "x"},
        {"per_page": "١٢"},
        {"exclude_offline": "yes"},
        {"in_channel": "short"},
        {"topic": "*"},
        {"creator_id": "bad"},
    ],
)
async def test_list_rejects_bad_parameters(api: Api, params: dict[str, str]) -> None:
    status, body = await api.call("GET", API, params=params)
    assert status == 400 and body["status_code"] == 400


# --- get, patch, delete -----------------------------------------------------------------------


async def test_get_patch_delete(api: Api) -> None:
    rc = (await api.create("peer"))["remote_cluster"]
    rid = rc["remote_id"]
    status, body = await api.call("GET", f"{API}/{rid}")
    assert status == 200 and body == rc
    assert (await reader(api).call("GET", f"{API}/{rid}"))[0] == 200

    other_team = new_id()
    status, body = await api.call(
        "PATCH", f"{API}/{rid}", json={"display_name": "Peer!", "default_team_id": other_team}
    )
    assert (
        status == 200 and body["display_name"] == "Peer!" and body["default_team_id"] == other_team
    )
    assert body["token"] == "" and body["remote_token"] == ""
    status, body = await api.call("PATCH", f"{API}/{rid}", json={"display_name": None})
    assert status == 200 and body["display_name"] == "Peer!"
    status, body = await api.call("PATCH", f"{API}/{rid}", json={"display_name": ""})
    assert status == 200 and body["display_name"] == "peer"

    status, body = await api.call("DELETE", f"{API}/{rid}")
    assert status == 204 and body is None
    status, body = await api.call("GET", f"{API}/{rid}")
    assert status == 200 and body["delete_at"] > 0
    assert await api.remotes() == []
    assert [r["remote_id"] for r in await api.remotes(include_deleted="true")] == [rid]
    for method in ("DELETE", "PATCH"):
        status, body = await api.call(method, f"{API}/{rid}", json={})
        assert status == 404 and body["id"] == "api.remote_cluster.get.not_found"


async def test_get_patch_delete_errors(api: Api) -> None:
    rid = (await api.create("peer"))["remote_cluster"]["remote_id"]
    unknown = new_id()
    for method in ("GET", "PATCH", "DELETE"):
        assert (await api.call(method, f"{API}/{unknown}", json={}))[0] == 404
        assert (await api.call(method, f"{API}/not-an-id", json={}))[0] == 400
    before = await api.remotes()
    for patch in ({"display_name": "x" * 65}, {"default_team_id": "bad"}, {"display_name": 3}, []):
        status, _ = await api.call("PATCH", f"{API}/{rid}", json=patch)
        assert status == 400
    assert await api.remotes() == before


# --- generate_invite --------------------------------------------------------------------------


async def test_generate_invite_issues_a_new_token(api: Api, client: TestClient[Any, Any]) -> None:
    body = await api.create("peer", password="first-password")
    rid = body["remote_cluster"]["remote_id"]
    first = invites.decrypt(body["invite"], "first-password")
    status, code = await api.call(
        "POST", f"{API}/{rid}/generate_invite", json={"password": "second-password"}
    )
    assert status == 201 and isinstance(code, str)
    second = invites.decrypt(code, "second-password")
    assert second.remote_id == rid and second.version == 3 and second.token != first.token
    stored = client.server.app[REMOTES].get(rid)
    assert stored is not None
    assert token_matches(second.token, stored.token_sha256)
    assert not token_matches(first.token, stored.token_sha256)


async def test_generate_invite_errors(api: Api, client: TestClient[Any, Any]) -> None:
    rid = (await api.create("peer"))["remote_cluster"]["remote_id"]
    for payload in ({}, {"password": ""}, {"password": "short"}, {"password": 1}):
        status, _ = await api.call("POST", f"{API}/{rid}/generate_invite", json=payload)
        assert status == 400
    status, _ = await api.call(
        "POST", f"{API}/{new_id()}/generate_invite", json={"password": "long-enough"}
    )
    assert status == 404
    confirmed = await add_remote(client, name="linked")
    status, body = await api.call(
        "POST", f"{API}/{confirmed.remote_id}/generate_invite", json={"password": "long-enough"}
    )
    assert status == 400 and body["id"] == "api.remote_cluster.generate_invite_cluster_is_confirmed"


# --- accept_invite ----------------------------------------------------------------------------


async def test_accept_rejects_bad_invites_and_changes_nothing(api: Api) -> None:
    body = await api.create("peer", password="the-password")
    invite = body["invite"]
    rid = body["remote_cluster"]["remote_id"]
    cases = [
        (invite, "wrong-password", "api.remote_cluster.invite_decrypt_error"),
        (invite[:40], "the-password", "api.remote_cluster.base64_decode_error"),
        ("%%%not-base64%%%", "the-password", "api.remote_cluster.base64_decode_error"),
        ("", "the-password", "api.context.invalid_param.app_error"),
        (invite, "", "api.context.invalid_param.app_error"),
    ]
    for code, password, error_id in cases:
        status, err = await api.accept(code, password, name="other")
        assert status == 400 and err["id"] == error_id, (code, err)
    for payload in (
        {"name": "bad name", "default_team_id": TEAM_ID, "invite": invite, "password": "x"},
        {"name": "ok", "invite": invite, "password": "x"},
    ):
        assert (await api.call("POST", f"{API}/accept_invite", json=payload))[0] == 400
    # An invite naming a port that cannot exist.
    bad_port = invites.encrypt(
        InvitePayload(
            remote_id=new_id(), site_url="http://127.0.0.1:99999", token=new_id(), version=3
        ),
        "the-password",
    )
    status, err = await api.accept(bad_port, "the-password", name="other")
    assert status == 400 and err["id"] == "api.remote_cluster.invalid_invite.app_error"
    # Our own invite: its remote id exists here already.
    status, err = await api.accept(invite, "the-password", name="self")
    assert status == 409 and err["status_code"] == 409
    assert [r["remote_id"] for r in await api.remotes(include_deleted="true")] == [rid]


async def test_accept_against_unreachable_inviter_leaves_nothing(api: Api, app_client: Any) -> None:
    """A failed confirm call answers 502 and leaves no row, so the same invite can be retried."""
    inviter = await app_client(server={"site_url": "http://127.0.0.1:9"})
    inviter_api = Api(inviter.session, str(inviter.make_url("")).rstrip("/"))
    body = await inviter_api.create("b", password="the-password")
    status, err = await api.accept(body["invite"], "the-password")
    assert status == 502 and err["id"] == "api.remote_cluster.accept_invitation_error"
    assert "unreachable" in err["detailed_error"]
    assert await api.remotes(include_deleted="true") == []


async def test_two_in_process_apps_link(
    api: Api, client: TestClient[Any, Any], app_client: Any
) -> None:
    """Create on A, accept on B: both confirmed, each with the other's site URL."""
    b_client = await app_client()
    b_api = Api(b_client.session, str(b_client.make_url("")).rstrip("/"))
    a_url = f"http://127.0.0.1:{client.server.port}"
    body = await api.create("b", password="the-password")
    status, rc_b = await b_api.accept(body["invite"], "the-password", name="a")
    assert status == 201, rc_b
    assert rc_b["remote_id"] == body["remote_cluster"]["remote_id"]
    assert rc_b["site_url"] == a_url
    (rc_a,) = await api.remotes()
    assert rc_a["site_url"] == f"http://127.0.0.1:{b_client.server.port}"
    (listed,) = await b_api.remotes()
    assert {**listed, "last_ping_at": 0} == {**rc_b, "last_ping_at": 0}  # pings start at once
    status, err = await b_api.accept(body["invite"], "the-password", name="again")
    assert status == 409 and err["id"] == "api.remote_cluster.invite_already_accepted.app_error"


# --- channels ---------------------------------------------------------------------------------


async def test_channel_sharing_extension(api: Api, client: TestClient[Any, Any]) -> None:
    remote = await add_remote(client, name="linked")
    channel = new_id()
    base = f"{API}/{remote.remote_id}"
    assert (await api.call("POST", f"{base}/channels/{channel}/invite"))[0] == 200
    assert (await api.call("POST", f"{base}/channels/{channel}/invite"))[0] == 200  # idempotent
    status, rows = await api.call("GET", f"{base}/sharedchannelremotes")
    assert status == 200 and [r["channel_id"] for r in rows] == [channel]
    assert (await api.call("POST", f"{base}/channels/{channel}/uninvite"))[0] == 200
    assert (await api.call("POST", f"{base}/channels/{channel}/uninvite"))[0] == 404
    assert (await api.call("POST", f"{base}/channels/bad/invite"))[0] == 400
    assert (await api.call("POST", f"{API}/{new_id()}/channels/{channel}/invite"))[0] == 404
    assert (await reader(api).call("POST", f"{base}/channels/{channel}/invite"))[0] == 403
    assert (await reader(api).call("GET", f"{base}/sharedchannelremotes"))[0] == 200
