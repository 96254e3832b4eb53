"""Files between real daemon processes: large files, chunks with offsets, crashes, cut bodies."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from daemon.ids import new_id
from tests.fakes import FakePeer, fake_peers
from tests.helpers import API, Api, DaemonProcess, eventually, link, running
from tests.test_uploads import _send_partial
from tests.uploads_helpers import PeerSide

pytestmark = pytest.mark.timeout(300)
MiB = 1024 * 1024


def file_sha(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(MiB):
            digest.update(block)
    return digest.hexdigest()


def received_path(proc: DaemonProcess, rid: str, file_id: str) -> Path:
    row = proc.row(
        "SELECT upload_id FROM uploads_in WHERE remote_id = ? AND req_file_id = ? AND state = 'complete'",
        (rid, file_id),
    )
    assert row is not None
    return proc.data_dir / "files" / rid / row["upload_id"]


async def as_peer_of(
    proc: DaemonProcess, session: aiohttp.ClientSession, peer: FakePeer
) -> PeerSide:
    """``proc`` accepts the scripted peer's invite; return the peer's side of the link."""
    code = await asyncio.to_thread(peer.invite, "the-password")
    status, body = await Api(session, proc.url).accept(
        code, "the-password", name=f"p{new_id()[:6]}"
    )
    assert status == 201, body
    return PeerSide(session, proc.url, peer.remote_id, peer.token_for_daemon)


async def test_large_file_and_chunked_resends(tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    with source.open("wb") as f:
        for _ in range(256):
            f.write(os.urandom(MiB))
    expected = file_sha(source)
    other = FakePeer()
    async with fake_peers(other), aiohttp.ClientSession() as session:
        a = DaemonProcess(
            tmp_path,
            "a",
            outbox={"retry_base": 0.05, "retry_max": 0.5},
            uploads={"max_file_size": 512 * MiB},
        )
        b = DaemonProcess(tmp_path, "b", uploads={"max_file_size": 512 * MiB})
        async with running(a, b):
            api_a = Api(session, a.url)
            rid = await link(api_a, Api(session, b.url))

            # 256 MiB through A's file extension: same sha256 at B.
            with source.open("rb") as body:
                status, queued = await api_a.call(
                    "POST", f"{API}/{rid}/files", data=body, params={"filename": "big.bin"}
                )
            assert status == 202, queued

            async def completed() -> bool:
                _, state = await api_a.call("GET", f"{API}/{rid}/files/{queued['file_id']}")
                return bool(state["state"] == "completed")

            await eventually(completed, timeout=180)
            assert file_sha(received_path(b, rid, queued["file_id"])) == expected

            # The same file again as 1 MiB chunks with offsets, sent as A would (A's token).
            token = a.row("SELECT remote_token FROM remote_clusters WHERE remote_id = ?", (rid,))[
                "remote_token"
            ]  # type: ignore[index]
            peer = PeerSide(session, b.url, rid, token)
            file_id = new_id()
            status, answer = await peer.open(256 * MiB, req_file_id=file_id, filename="big.bin")
            upload_id = answer["payload"]["id"]
            intruder = await as_peer_of(b, session, other)
            with source.open("rb") as f:
                for index in range(256):
                    chunk = f.read(MiB)
                    status, headers, _ = await peer.append(upload_id, chunk, offset=index * MiB)
                    assert status == (200 if index == 255 else 204), (index, status)
                    if index == 100:
                        # A chunk sent twice: 409 with the committed offset, nothing changes.
                        f.seek(50 * MiB)
                        status, headers, _ = await peer.append(
                            upload_id, f.read(MiB), offset=50 * MiB
                        )
                        assert status == 409 and headers["Upload-Offset"] == str(101 * MiB)
                        f.seek(101 * MiB)
                        # Another remote's credentials on this session: 401.
                        assert (await intruder.append(upload_id, b"x"))[0] == 401
                        # A body longer than what remains: refused, nothing written.
                        status, _, _ = await peer.append(
                            upload_id, b"y" * (155 * MiB + 1), offset=101 * MiB
                        )
                        assert status == 400
                        assert await peer.offset(upload_id) == (101 * MiB, 256 * MiB)
            assert file_sha(received_path(b, rid, file_id)) == expected


async def _slow_body(data: bytes, step: int, pause: float) -> AsyncIterator[bytes]:
    for start in range(0, len(data), step):
        yield data[start : start + step]
        await asyncio.sleep(pause)


async def test_sigkill_of_the_receiver_mid_upload(tmp_path: Path) -> None:
    """Killed mid-body and started again: what it reports is on disk, and the resume completes."""
    data = os.urandom(64 * MiB)
    peer_app = FakePeer()
    async with fake_peers(peer_app), aiohttp.ClientSession() as session:
        b = DaemonProcess(tmp_path, "b", uploads={"commit_every": 4 * MiB})
        async with running(b):
            peer = await as_peer_of(b, session, peer_app)
            status, answer = await peer.open(len(data))
            upload_id = answer["payload"]["id"]
            sending = asyncio.create_task(peer.append(upload_id, _slow_body(data, MiB, 0.02)))

            async def some_committed() -> bool:
                return (await peer.offset(upload_id))[0] >= 16 * MiB

            await eventually(some_committed, timeout=60)
            b.signal(signal.SIGKILL)
            await b.wait_exit()
            with pytest.raises(aiohttp.ClientError):
                await sending
            await b.start()
            offset, size = await peer.offset(upload_id)
            part = b.data_dir / "incoming" / peer.remote_id / f"{upload_id}.part"
            assert 16 * MiB <= offset < size and part.stat().st_size == offset
            assert part.read_bytes() == data[:offset]
            status, _, info = await peer.append(upload_id, data[offset:], offset=offset)
            assert status == 200 and info["size"] == len(data)
            final = b.data_dir / "files" / peer.remote_id / upload_id
            assert final.read_bytes() == data


async def test_cut_body_then_resume(tmp_path: Path) -> None:
    data = os.urandom(8 * MiB)
    peer_app = FakePeer()
    async with fake_peers(peer_app), aiohttp.ClientSession() as session:
        b = DaemonProcess(tmp_path, "b")
        async with running(b):
            peer = await as_peer_of(b, session, peer_app)
            status, answer = await peer.open(len(data))
            upload_id = answer["payload"]["id"]
            await _send_partial(
                b.url, f"{API}/upload/{upload_id}", peer.headers, len(data), data[: 3 * MiB]
            )

            async def kept() -> bool:
                return (await peer.offset(upload_id))[0] > 0

            await eventually(kept, timeout=20)
            offset = (await peer.offset(upload_id))[0]
            assert offset <= 3 * MiB
            status, _, info = await peer.append(upload_id, data[offset:], offset=offset)
            assert status == 200 and info["size"] == len(data)
            assert (b.data_dir / "files" / peer.remote_id / upload_id).read_bytes() == data


async def test_mattermost_sender(tmp_path: Path) -> None:
    """Protocol §6.1 as a Mattermost sender plays it: a session by message, then one whole-file
    POST without a Content-Type (chunked); the answer is 200 with the FileInfo."""
    data = os.urandom(3 * MiB)
    peer_app = FakePeer()
    async with fake_peers(peer_app), aiohttp.ClientSession() as session:
        b = DaemonProcess(tmp_path, "b")
        async with running(b):
            peer = await as_peer_of(b, session, peer_app)
            file_id, channel = new_id(), new_id()
            status, answer = await peer.open(
                len(data), req_file_id=file_id, channel_id=channel, filename="photo.jpg"
            )
            assert status == 200 and answer["status"] == "OK"
            upload_id = answer["payload"]["id"]

            async def body() -> AsyncIterator[bytes]:
                for start in range(0, len(data), 32 * 1024):
                    yield data[start : start + 32 * 1024]

            async with session.post(
                f"{b.url}{API}/upload/{upload_id}",
                data=body(),
                headers=peer.headers,
                skip_auto_headers=["Content-Type"],
            ) as resp:
                info: dict[str, Any] = await resp.json()
                assert resp.status == 200
            assert (
                info["id"] == file_id
                and info["channel_id"] == channel
                and info["size"] == len(data)
            )
            assert info["mime_type"] == "image/jpeg" and info["remote_id"] == peer.remote_id
