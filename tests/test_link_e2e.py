"""Two real daemon processes linked through the management API, as an operator would."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from daemon import invites
from daemon.ids import hash_token, new_id
from tests.helpers import API, Api, DaemonProcess, daemons, ping_frame, transport_call

pytestmark = pytest.mark.timeout(120)
PASSWORD = "correct-horse-battery"


def _files_contain(proc: DaemonProcess, secret: str) -> bool:
    needle = secret.encode()
    return any(needle in path.read_bytes() for path in proc.data_dir.iterdir() if path.is_file())


async def test_link_two_daemons(tmp_path: Path) -> None:
    async with daemons(tmp_path, "a", "b") as (a, b), aiohttp.ClientSession() as session:
        api_a, api_b = Api(session, a.url), Api(session, b.url)
        created = await api_a.create("site-b", password=PASSWORD)
        invite = invites.decrypt(created["invite"], PASSWORD)
        x, t1 = invite.remote_id, invite.token
        assert invite.site_url == a.url

        status, accepted = await api_b.accept(created["invite"], PASSWORD, name="site-a")
        assert status == 201, accepted
        assert accepted["remote_id"] == x and accepted["site_url"] == a.url

        # Both sides confirmed, each pointing at the other.
        (rc_a,) = await api_a.remotes(only_confirmed="true")
        (rc_b,) = await api_b.remotes(only_confirmed="true")
        assert rc_a["remote_id"] == rc_b["remote_id"] == x
        assert rc_a["site_url"] == b.url and rc_b["site_url"] == a.url

        # Tokens rotated: A presents what B expects and the other way round.
        row_a = a.row(
            "SELECT token_sha256, remote_token FROM remote_clusters WHERE remote_id = ?", (x,)
        )
        row_b = b.row(
            "SELECT token_sha256, remote_token FROM remote_clusters WHERE remote_id = ?", (x,)
        )
        assert row_a is not None and row_b is not None
        t2, t3 = row_a["remote_token"], row_b["remote_token"]
        assert hash_token(t2) == row_b["token_sha256"] and hash_token(t3) == row_a["token_sha256"]
        assert len({t1, t2, t3}) == 3
        # Issued tokens are kept only as digests: A never stored T1 or T3, B never stored T2.
        assert not _files_contain(a, t1) and not _files_contain(a, t3) and not _files_contain(b, t2)

        # Each side can ping the other with its stored token.
        status, pong = await transport_call(
            session, a.url, f"{API}/ping", ping_frame(x, new_id(), 5), remote_id=x, token=t3
        )
        assert status == 200 and pong["sent_at"] == 5
        status, pong = await transport_call(
            session, b.url, f"{API}/ping", ping_frame(x, new_id(), 6), remote_id=x, token=t2
        )
        assert status == 200 and pong["sent_at"] == 6

        # Old, wrong, missing and deleted-remote credentials: 401 with one body.
        bodies = []
        for rid, token in [(x, t1), (x, new_id()), (None, None), (x, None), (None, t3)]:
            status, body = await transport_call(
                session, a.url, f"{API}/ping", ping_frame(x, new_id()), remote_id=rid, token=token
            )
            assert status == 401
            bodies.append(body)
        status, _ = await api_a.call("DELETE", f"{API}/{x}")
        assert status == 204
        status, body = await transport_call(
            session, a.url, f"{API}/ping", ping_frame(x, new_id()), remote_id=x, token=t3
        )
        assert status == 401
        bodies.append(body)
        assert len({b_["request_id"] for b_ in bodies}) == len(
            bodies
        )  # only the request id differs
        assert all({**b_, "request_id": ""} == {**bodies[0], "request_id": ""} for b_ in bodies)

    # Nothing secret reached either daemon's log.
    for proc in (a, b):
        logs = proc.logs()
        assert "remote.confirmed" in logs
        for secret in (t1, t2, t3, PASSWORD, created["invite"], created["invite"][:40]):
            assert secret not in logs


async def test_failed_accept_can_be_retried(tmp_path: Path) -> None:
    """The inviter is down during accept: 502, nothing left behind, and the retry links."""
    async with daemons(tmp_path, "a", "b") as (a, b), aiohttp.ClientSession() as session:
        api_a, api_b = Api(session, a.url), Api(session, b.url)
        created = await api_a.create("site-b", password=PASSWORD)
        assert await a.stop() == 0
        status, err = await api_b.accept(created["invite"], PASSWORD, name="site-a")
        assert status == 502 and err["id"] == "api.remote_cluster.accept_invitation_error"
        assert await api_b.remotes(include_deleted="true") == []
        await a.start()
        status, accepted = await api_b.accept(created["invite"], PASSWORD, name="site-a")
        assert status == 201, accepted
        (rc_a,) = await api_a.remotes(only_confirmed="true")
        assert rc_a["site_url"] == b.url
