"""Lifecycle events reach the local application, with the remote's fields."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from tests.conftest import AppClient
from tests.fakes import scripted_app
from tests.helpers import API, Api
from tests.test_filesend import api_of, link, send, wait_state


async def test_lifecycle_events(app_client: AppClient) -> None:
    async with scripted_app() as hooks:
        a = await app_client(events={"forward_url": hooks.url + "/events"})
        b = await app_client(events={"forward_url": hooks.url + "/events"})
        rid = await link(a, b)
        confirmed = await hooks.wait_events("remote.confirmed", 2)
        assert {e["remote_name"] for e in confirmed} == {"a", "b"}
        assert all(e["remote_id"] == rid and isinstance(e["at"], int) for e in confirmed)

        data = os.urandom(1000)
        status, queued = await send(api_of(a), rid, data, filename="notes.txt")
        assert status == 202
        await wait_state(api_of(a), rid, queued["file_id"], "completed")
        (received,) = await hooks.wait_events("file.received", 1)
        assert received["remote_id"] == rid and received["remote_name"] == "a"
        assert (
            received["file_info"]["id"] == queued["file_id"]
            and received["file_info"]["size"] == 1000
        )
        assert await asyncio.to_thread(Path(received["path"]).read_bytes) == data
        (sent,) = await hooks.wait_events("file.sent", 1)
        assert sent["remote_name"] == "b" and sent["file_id"] == queued["file_id"]

        status, _ = await Api(a.session, str(a.make_url("")).rstrip("/")).call(
            "DELETE", f"{API}/{rid}"
        )
        assert status == 204
        (deleted,) = await hooks.wait_events("remote.deleted", 1)
        assert deleted["remote_id"] == rid and deleted["remote_name"] == "b"
