"""Sending files in-process: to a daemon (resuming after a cut) and to a Mattermost-like peer."""

from __future__ import annotations

import asyncio
import io
import os
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from daemon.filestore import FILES, OUTGOING
from daemon.ids import new_id
from daemon.keys import DATABASE, FILE_SENDER, FILESTORE
from tests.conftest import AppClient
from tests.fakes import Answer, FakePeer, FaultProxy, fake_peers, scripted_app
from tests.helpers import API, Api, eventually
from tests.uploads_helpers import sha

pytestmark = pytest.mark.timeout(120)
FAST = {"outbox": {"retry_base": 0.05, "retry_max": 0.2}}


def api_of(client: TestClient[Any, Any]) -> Api:
    return Api(client.session, str(client.make_url("")).rstrip("/"))


async def link(a: TestClient[Any, Any], b: TestClient[Any, Any]) -> str:
    created = await api_of(a).create("b", password="the-password")
    status, body = await api_of(b).accept(created["invite"], "the-password", name="a")
    assert status == 201, body
    return str(created["remote_cluster"]["remote_id"])


async def send(api: Api, rid: str, data: bytes, **params: str) -> tuple[int, Any]:
    query = {"filename": "report.pdf", **params}
    return await api.call("POST", f"{API}/{rid}/files", data=io.BytesIO(data), params=query)


async def state_of(api: Api, rid: str, file_id: str) -> dict[str, Any]:
    status, body = await api.call("GET", f"{API}/{rid}/files/{file_id}")
    assert status == 200, body
    return dict(body)


async def wait_state(
    api: Api, rid: str, file_id: str, state: str, timeout: float = 30
) -> dict[str, Any]:
    async def reached() -> bool:
        return (await state_of(api, rid, file_id))["state"] == state

    await eventually(reached, timeout=timeout)
    return await state_of(api, rid, file_id)


async def received_file(b: TestClient[Any, Any], rid: str, file_id: str) -> bytes:
    row = await b.server.app[DATABASE].fetchone(
        "SELECT upload_id FROM uploads_in WHERE remote_id = ? AND req_file_id = ? AND state = 'complete'",
        (rid, file_id),
    )
    assert row is not None
    return b.server.app[FILESTORE].path(FILES, rid, row["upload_id"]).read_bytes()


async def test_send_a_file_between_daemons(app_client: AppClient) -> None:
    async with scripted_app() as hooks:
        b = await app_client(events={"forward_url": hooks.url + "/events"})
        a = await app_client(**FAST)
        rid = await link(a, b)
        data = os.urandom(3 * 1024 * 1024 + 11)
        channel, user = new_id(), new_id()
        status, queued = await send(api_of(a), rid, data, channel_id=channel, user_id=user)
        assert status == 202 and queued["state"] == "queued"
        done = await wait_state(api_of(a), rid, queued["file_id"], "completed")
        assert done["offset"] == done["size"] == len(data) and done["last_error"] == ""
        info = done["file_info"]
        assert (
            info["id"] == queued["file_id"]
            and info["channel_id"] == channel
            and info["user_id"] == user
        )
        assert info["name"] == "report.pdf" and info["size"] == len(data)
        assert sha(await received_file(b, rid, queued["file_id"])) == sha(data)
        assert not a.server.app[FILESTORE].path(OUTGOING, queued["upload_id"]).exists()
        (event,) = await hooks.wait_events("file.received", 1)
        assert event["file_info"]["id"] == queued["file_id"] and event["remote_id"] == rid


async def test_send_file_validation(app_client: AppClient) -> None:
    b = await app_client()
    a = await app_client(uploads={"max_file_size": 1000})
    rid = await link(a, b)
    api = api_of(a)
    assert (await send(api, rid, b"x", filename=""))[0] == 400
    assert (await send(api, rid, b"x", channel_id="bad"))[0] == 400
    assert (await send(api, rid, b""))[0] == 400
    assert (await send(api, rid, b"x" * 1001))[0] == 413
    status, first = await send(api, rid, b"x", file_id=new_id())
    assert status == 202
    assert (await send(api, rid, b"y", file_id=first["file_id"]))[0] == 409
    assert (await send(api, new_id(), b"x"))[0] == 404
    assert (await api.call("GET", f"{API}/{rid}/files/{new_id()}"))[0] == 404
    assert list(a.server.app[FILESTORE].root.joinpath(OUTGOING).glob("*.part")) == []


async def test_resume_after_the_connection_breaks(app_client: AppClient) -> None:
    """The transfer is cut mid-body; the sender asks the offset and sends only the rest."""
    proxy = FaultProxy(0)
    await proxy.start()
    try:
        b = await app_client(server={"site_url": proxy.url}, uploads={"commit_every": 256 * 1024})
        proxy.target_port = b.server.port
        a = await app_client(**FAST)
        rid = await link(a, b)
        data = os.urandom(6 * 1024 * 1024)
        proxy.cut_after(2 * 1024 * 1024)
        status, queued = await send(api_of(a), rid, data)
        assert status == 202
        done = await wait_state(api_of(a), rid, queued["file_id"], "completed")
        assert proxy.cuts == 1 and done["size"] == len(data)
        assert sha(await received_file(b, rid, queued["file_id"])) == sha(data)
        # One session on the receiver: the transfer resumed instead of starting over.
        assert await b.server.app[DATABASE].scalar("SELECT count(*) FROM uploads_in") == 1
    finally:
        await proxy.stop()


async def test_a_mattermost_peer_gets_the_whole_file_again(app_client: AppClient) -> None:
    """Without HEAD there is no resume: a fresh session, and the whole file, once more."""
    peer = FakePeer(cut_first_upload_after=1024 * 1024)
    async with fake_peers(peer):
        a = await app_client(**FAST)
        code = await asyncio.to_thread(peer.invite, "the-password")
        assert (await api_of(a).accept(code, "the-password", name="mm"))[0] == 201
        data = os.urandom(3 * 1024 * 1024)
        status, queued = await send(api_of(a), peer.remote_id, data, channel_id=new_id())
        assert status == 202
        done = await wait_state(api_of(a), peer.remote_id, queued["file_id"], "completed")
        assert done["file_info"]["id"] == queued["file_id"]
        sessions = list(peer.upload_sessions.values())
        assert len(sessions) == 2 and all(s["req_file_id"] == queued["file_id"] for s in sessions)
        assert sessions[0]["id"] != sessions[1]["id"]
        assert bytes(peer.upload_data[sessions[1]["id"]]) == data
        assert len(peer.upload_data[sessions[0]["id"]]) < len(data)


async def test_rejected_and_dead_files(app_client: AppClient) -> None:
    async with scripted_app() as app:
        b = await app_client(
            topics=[{"name": "sharedchannel_upload", "forward_url": app.url + "/uploads"}]
        )
        a = await app_client(outbox={"retry_base": 0.01, "retry_max": 0.05, "max_attempts": 2},
                             events={"forward_url": app.url + "/events"})  # fmt: skip
        rid = await link(a, b)
        app.answers["/uploads"] = Answer(403, b'{"error": "not in a shared channel"}')
        status, queued = await send(api_of(a), rid, b"data")
        assert status == 202
        rejected = await wait_state(api_of(a), rid, queued["file_id"], "rejected")
        assert rejected["last_error"] == "not in a shared channel"
        assert (await app.wait_events("file.rejected", 1))[0]["file_id"] == queued["file_id"]
        await b.close()
        status, doomed = await send(api_of(a), rid, b"more data")
        assert status == 202
        dead = await wait_state(api_of(a), rid, doomed["file_id"], "dead")
        assert dead["last_error"].startswith("unreachable")
        assert (await app.wait_events("file.dead", 1))[0]["file_id"] == doomed["file_id"]


async def test_dead_files_can_be_retried(app_client: AppClient) -> None:
    async with scripted_app() as app:
        b = await app_client(
            topics=[{"name": "sharedchannel_upload", "forward_url": app.url + "/uploads"}]
        )
        a = await app_client(outbox={"retry_base": 0.01, "retry_max": 0.05, "max_attempts": 2})
        rid = await link(a, b)
        app.answers["/uploads"] = Answer(503)  # B's application is down: A retries, then gives up
        data = os.urandom(200_000)
        status, queued = await send(api_of(a), rid, data)
        assert status == 202
        file_id = queued["file_id"]
        await wait_state(api_of(a), rid, file_id, "dead")
        assert a.server.app[FILESTORE].path(OUTGOING, queued["upload_id"]).exists()  # kept
        retry = f"{API}/{rid}/files/{file_id}/retry"
        app.answers["/uploads"] = Answer(200)
        status, body = await api_of(a).call("POST", retry)
        assert status == 202 and body == {
            "file_id": file_id,
            "upload_id": queued["upload_id"],
            "state": "queued",
        }
        done = await wait_state(api_of(a), rid, file_id, "completed")
        assert done["offset"] == len(data) and done["last_error"] == ""
        assert sha(await received_file(b, rid, file_id)) == sha(data)
        # Only dead files go again; unknown ones are 404.
        assert (await api_of(a).call("POST", retry))[0] == 409
        assert (await api_of(a).call("POST", f"{API}/{rid}/files/{new_id()}/retry"))[0] == 404


async def test_deleting_a_remote_ends_its_files_and_removes_their_copies(
    app_client: AppClient,
) -> None:
    async with scripted_app() as app:
        b = await app_client(
            topics=[{"name": "sharedchannel_upload", "forward_url": app.url + "/uploads"}]
        )
        a = await app_client(**FAST)
        rid = await link(a, b)
        app.answers["/uploads"] = Answer(503)  # never accepted: the file stays queued
        status, queued = await send(api_of(a), rid, b"never sent")
        assert status == 202
        copy = a.server.app[FILESTORE].path(OUTGOING, queued["upload_id"])
        assert copy.exists()
        await eventually(lambda: any(path == "/uploads" for path, _ in app.refused))
        assert (await api_of(a).call("DELETE", f"{API}/{rid}"))[0] == 204
        dead = await wait_state(api_of(a), rid, queued["file_id"], "dead")
        assert dead["last_error"] == "the remote was deleted"
        await eventually(lambda: not copy.exists())
        # Finished rows are forgotten after outbox.keep_done.
        await a.server.app[DATABASE].execute("UPDATE uploads_out SET update_at = 0")
        await a.server.app[FILE_SENDER].prune()
        status, _ = await api_of(a).call("GET", f"{API}/{rid}/files/{queued['file_id']}")
        assert status == 404
