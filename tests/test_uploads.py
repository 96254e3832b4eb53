"""Receiving uploads in-process: sessions, appends with offsets, interruptions, recovery, images."""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from daemon.appender import BLOCK, Appender, stream_into
from daemon.filestore import FILES, IMAGES, INCOMING, FileStore
from daemon.ids import hash_token, new_id
from daemon.images import ImageError, inspect
from daemon.keys import DATABASE, FILESTORE, UPLOADS
from tests.conftest import AppClient
from tests.fakes import Answer, scripted_app
from tests.helpers import API, eventually
from tests.test_management import add_remote
from tests.uploads_helpers import GIF_1X1, JPEG_HEADER, PeerSide, png, sha

pytestmark = pytest.mark.timeout(120)


async def peer_side(
    client: TestClient[Any, Any], session: aiohttp.ClientSession, name: str = "sender"
) -> PeerSide:
    token = new_id()
    remote = await add_remote(client, name=name, token_sha256=hash_token(token))
    return PeerSide(session, str(client.make_url("")).rstrip("/"), remote.remote_id, token)


async def opened(peer: PeerSide, size: int, **fields: Any) -> dict[str, Any]:
    status, answer = await peer.open(size, **fields)
    assert status == 200 and answer["status"] == "OK", answer
    return dict(answer["payload"])


async def test_session_is_opened_as_mattermost_does(
    client: TestClient[Any, Any], session: aiohttp.ClientSession
) -> None:
    peer = await peer_side(client, session)
    upload_id, file_id = new_id(), new_id()
    us = await opened(peer, 1234, id=upload_id, req_file_id=file_id, filename="../../etc/passwd")
    assert us["id"] == upload_id and us["req_file_id"] == file_id
    assert us["remote_id"] == peer.remote_id and us["file_offset"] == 0 and us["file_size"] == 1234
    assert us["create_at"] > 1 and us["type"] == "attachment"
    # Opening the same session again is answered the same way.
    _status, again = await peer.open(
        1234, id=upload_id, req_file_id=file_id, filename="../../etc/passwd"
    )
    assert again["payload"] == us


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"file_size": 200 * 1024 * 1024}, "upload too large"),
        ({"type": "import"}, "only attachment uploads"),
        ({"channel_id": "bad"}, "invalid channel_id"),
        ({"filename": ""}, "missing filename"),
        ({"file_size": 0}, "invalid file_size"),
        ({"id": "../x"}, "invalid upload session id"),
    ],
)
async def test_bad_sessions_are_refused(
    client: TestClient[Any, Any],
    session: aiohttp.ClientSession,
    fields: dict[str, Any],
    reason: str,
) -> None:
    peer = await peer_side(client, session)
    size = fields.pop("file_size", 10)
    status, answer = await peer.open(size, **fields)
    assert status == 200 and answer["status"] == "FAIL" and reason in answer["err"]
    assert await client.server.app[DATABASE].scalar("SELECT count(*) FROM uploads_in") == 0


async def test_session_ids_are_bound_to_their_remote(
    client: TestClient[Any, Any], session: aiohttp.ClientSession
) -> None:
    owner, other = (
        await peer_side(client, session, "owner"),
        await peer_side(client, session, "other"),
    )
    us = await opened(owner, 10)
    status, answer = await other.open(10, id=us["id"])
    assert answer["status"] == "FAIL" and "already in use" in answer["err"]
    status, _, body = await other.append(us["id"], b"0123456789")
    assert status == 401 and body["id"] == "api.context.remote_id_mismatch.app_error"
    async with session.head(f"{other.url}{API}/upload/{us['id']}", headers=other.headers) as resp:
        assert resp.status == 401
    assert (await owner.offset(us["id"]))[0] == 0
    assert (await owner.append(new_id(), b"x"))[0] == 404
    assert (await owner.append("not-an-id", b"x"))[0] == 404


async def test_local_application_approves_or_refuses_sessions(
    app_client: AppClient, session: aiohttp.ClientSession
) -> None:
    async with scripted_app() as app:
        client = await app_client(
            topics=[
                {"name": "sharedchannel_upload", "forward_url": app.url + "/uploads"},
                {"name": "*", "forward_url": app.url + "/any"},
            ]
        )
        peer = await peer_side(client, session)
        assert (await peer.open(10))[1]["status"] == "OK"
        app.answers["/uploads"] = Answer(403, b'{"error": "channel not shared"}')
        _status, answer = await peer.open(10)
        assert answer == {"status": "FAIL", "err": "channel not shared", "payload": None}
        assert (
            len(app.messages("/uploads")) == 1 and app.messages("/any") == []
        )  # "*" never matches it
        assert await client.server.app[DATABASE].scalar("SELECT count(*) FROM uploads_in") == 1


async def test_disk_reserve(app_client: AppClient, session: aiohttp.ClientSession) -> None:
    client = await app_client(uploads={"min_free_bytes": 1 << 60})
    peer = await peer_side(client, session)
    _status, answer = await peer.open(10)
    assert answer["status"] == "FAIL" and "disk space" in answer["err"]


async def test_whole_file_in_one_post_without_content_type(
    client: TestClient[Any, Any], session: aiohttp.ClientSession
) -> None:
    """What a Mattermost sender does: session by message, then the whole file, chunked, no type."""
    peer = await peer_side(client, session)
    data = os.urandom(3 * 1024 * 1024 + 17)
    us = await opened(peer, len(data), filename="Q3 report.pdf")

    async def body() -> Any:
        for i in range(0, len(data), 100_000):
            yield data[i : i + 100_000]

    status, headers, info = await peer.append(us["id"], body())
    assert status == 200 and headers["Upload-Offset"] == str(len(data))
    assert (
        info["id"] == us["req_file_id"]
        and info["size"] == len(data)
        and info["name"] == "Q3 report.pdf"
    )
    assert info["extension"] == "pdf" and info["mime_type"] == "application/pdf"
    assert info["remote_id"] == peer.remote_id and info["channel_id"] == us["channel_id"]
    store = client.server.app[FILESTORE]
    final = store.path(FILES, peer.remote_id, us["id"])
    assert sha(final.read_bytes()) == sha(data)
    assert not store.path(INCOMING, peer.remote_id, us["id"], suffix=".part").exists()
    # Completion is idempotent.
    status, _, again = await peer.append(us["id"], b"")
    assert status == 200 and again == info


async def test_chunks_with_offsets_and_a_duplicate(
    client: TestClient[Any, Any], session: aiohttp.ClientSession
) -> None:
    peer = await peer_side(client, session)
    data = os.urandom(5 * 1024 * 1024 + 3)
    us = await opened(peer, len(data))
    step = 1024 * 1024
    for start in range(0, len(data), step):
        status, headers, body = await peer.append(
            us["id"], data[start : start + step], offset=start
        )
        done = start + step >= len(data)
        assert status == (200 if done else 204), body
        assert headers["Upload-Offset"] == str(min(start + step, len(data)))
        if start == 2 * step:
            # A chunk sent again after a lost answer: refused, nothing written.
            status, headers, body = await peer.append(us["id"], data[step : 2 * step], offset=step)
            assert status == 409 and headers["Upload-Offset"] == str(3 * step)
            assert (await peer.offset(us["id"])) == (3 * step, len(data))
    final = client.server.app[FILESTORE].path(FILES, peer.remote_id, us["id"])
    assert sha(final.read_bytes()) == sha(data)


async def test_body_longer_than_remaining_is_refused_before_writing(
    client: TestClient[Any, Any], session: aiohttp.ClientSession
) -> None:
    peer = await peer_side(client, session)
    us = await opened(peer, 100)
    await peer.append(us["id"], b"a" * 60)
    status, _, body = await peer.append(us["id"], b"b" * 41)
    assert status == 400 and body["id"] == "api.upload.upload_data.invalid_content_length"
    assert await peer.offset(us["id"]) == (60, 100)
    part = client.server.app[FILESTORE].path(INCOMING, peer.remote_id, us["id"], suffix=".part")
    assert part.read_bytes() == b"a" * 60

    async def too_long() -> Any:  # chunked: no length to check first
        yield b"c" * 41

    status, headers, _ = await peer.append(us["id"], too_long())
    assert status == 413 and headers["Upload-Offset"] == "60"
    assert part.read_bytes() == b"a" * 60  # the chunk crossing the end is not written


async def test_multipart_first_part_is_the_data(
    client: TestClient[Any, Any], session: aiohttp.ClientSession
) -> None:
    peer = await peer_side(client, session)
    data = os.urandom(70_000)
    us = await opened(peer, len(data))
    form = aiohttp.FormData()
    form.add_field("file", data, filename="x.bin", content_type="application/octet-stream")
    form.add_field("ignored", "zzz")
    status, _, info = await peer.append(us["id"], form)
    assert status == 200 and info["size"] == len(data)
    assert client.server.app[FILESTORE].path(FILES, peer.remote_id, us["id"]).read_bytes() == data


async def _send_partial(
    url: str, path: str, headers: dict[str, str], declared: int, chunk: bytes
) -> None:
    """Send a request that announces ``declared`` bytes, send ``chunk``, then hang up."""
    host, port = url.removeprefix("http://").split(":")
    _reader, writer = await asyncio.open_connection(host, int(port))
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {declared}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    writer.write(head.encode() + chunk)
    await writer.drain()
    writer.close()
    await writer.wait_closed()


async def test_interrupted_request_keeps_what_arrived(
    client: TestClient[Any, Any], session: aiohttp.ClientSession
) -> None:
    peer = await peer_side(client, session)
    data = os.urandom(2_000_000)
    us = await opened(peer, len(data))
    await _send_partial(
        peer.url, f"{API}/upload/{us['id']}", peer.headers, len(data), data[:700_000]
    )

    async def kept() -> bool:
        return (await peer.offset(us["id"]))[0] == 700_000

    await eventually(kept, timeout=10)
    status, _, info = await peer.append(us["id"], data[700_000:], offset=700_000)
    assert status == 200 and info["size"] == len(data)
    assert sha(
        client.server.app[FILESTORE].path(FILES, peer.remote_id, us["id"]).read_bytes()
    ) == sha(data)


async def test_a_new_writer_stops_a_stalled_one(
    client: TestClient[Any, Any], session: aiohttp.ClientSession
) -> None:
    """A resumed upload need not wait for the stalled request to time out."""
    peer = await peer_side(client, session)
    data = os.urandom(300_000)
    us = await opened(peer, len(data))
    stall = asyncio.Event()

    async def stalled() -> Any:
        yield data[:100_000]
        await stall.wait()
        yield data[100_000:]

    first = asyncio.create_task(peer.append(us["id"], stalled()))
    # A paused body has what arrived committed: HEAD shows it.
    await eventually(lambda: _offset_is(peer, us["id"], 100_000), timeout=5)
    assert _writer_active(client, us["id"])
    status, headers, _ = await peer.append(us["id"], data[100_000:], offset=100_000)
    assert status == 200, headers
    stall.set()
    with pytest.raises(aiohttp.ClientError):
        await first  # the stalled request was stopped
    assert sha(
        client.server.app[FILESTORE].path(FILES, peer.remote_id, us["id"]).read_bytes()
    ) == sha(data)


def _writer_active(client: TestClient[Any, Any], upload_id: str) -> bool:
    return upload_id in client.server.app[UPLOADS]._writers


async def _offset_is(peer: PeerSide, upload_id: str, value: int) -> bool:
    return (await peer.offset(upload_id))[0] == value


async def test_start_up_cuts_partial_files_back(
    app_client: AppClient, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    client = await app_client()
    peer = await peer_side(client, session)
    us = await opened(peer, 1000)
    await peer.append(us["id"], b"x" * 400)
    part = client.server.app[FILESTORE].path(INCOMING, peer.remote_id, us["id"], suffix=".part")
    with part.open("ab") as f:  # bytes written but never committed (a crash before the commit)
        f.write(b"y" * 300)
    uploads = client.server.app[UPLOADS]
    await uploads._recover()
    assert part.stat().st_size == 400 and part.read_bytes() == b"x" * 400
    assert (await peer.offset(us["id"]))[0] == 400


async def test_unfinished_sessions_expire(
    client: TestClient[Any, Any], session: aiohttp.ClientSession
) -> None:
    peer = await peer_side(client, session)
    us = await opened(peer, 1000)
    await peer.append(us["id"], b"x" * 10)
    db = client.server.app[DATABASE]
    await db.execute("UPDATE uploads_in SET expires_at = 1 WHERE upload_id = ?", (us["id"],))
    assert await client.server.app[UPLOADS].expire() == 1
    assert (await peer.append(us["id"], b"x"))[0] == 404
    assert (
        not client.server.app[FILESTORE]
        .path(INCOMING, peer.remote_id, us["id"], suffix=".part")
        .exists()
    )


# --- profile images ----------------------------------------------------------------------------


async def _image(
    peer: PeerSide, user_id: str, data: bytes, field: str = "image"
) -> tuple[int, Any]:
    form = aiohttp.FormData()
    form.add_field(field, io.BytesIO(data), filename="profile.png", content_type="image/png")
    async with peer.session.post(
        f"{peer.url}{API}/{user_id}/image", data=form, headers=peer.headers
    ) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_profile_images(client: TestClient[Any, Any], session: aiohttp.ClientSession) -> None:
    a, b = await peer_side(client, session, "a"), await peer_side(client, session, "b")
    user = new_id()
    store = client.server.app[FILESTORE]
    for data in (png(3, 2), GIF_1X1, JPEG_HEADER):
        assert await _image(a, user, data) == (200, {"status": "OK"})
        assert store.path(IMAGES, a.remote_id, user).read_bytes() == data
    # Another remote writes only under its own name: a's image is untouched.
    assert (await _image(b, user, png(1, 1)))[0] == 200
    assert store.path(IMAGES, a.remote_id, user).read_bytes() == JPEG_HEADER
    assert store.path(IMAGES, b.remote_id, user).read_bytes() == png(1, 1)


@pytest.mark.parametrize(
    ("data", "field", "status"),
    [
        (b"not an image at all", "image", 400),
        (png(claim=(100_000, 100_000)), "image", 400),
        (png()[:20], "image", 400),
        (png(), "avatar", 400),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * (7 * 1024 * 1024), "image", 413),
    ],
)
async def test_bad_profile_images(
    client: TestClient[Any, Any],
    session: aiohttp.ClientSession,
    data: bytes,
    field: str,
    status: int,
) -> None:
    peer = await peer_side(client, session)
    user = new_id()
    got, body = await _image(peer, user, data, field)
    assert got == status, body
    assert not client.server.app[FILESTORE].path(IMAGES, peer.remote_id, user).exists()
    assert (await _image(peer, "bad-id", png()))[0] == 400


def test_image_inspection() -> None:
    assert inspect(png(3, 2), 100).width == 3
    assert inspect(GIF_1X1, 100).format == "gif"
    info = inspect(JPEG_HEADER, 1000)
    assert (info.format, info.width, info.height) == ("jpeg", 32, 16)
    with pytest.raises(ImageError, match="more than the limit"):
        inspect(png(20, 20), 100)
    bad_crc = bytearray(png())
    bad_crc[30] ^= 0xFF
    with pytest.raises(ImageError, match="damaged"):
        inspect(bytes(bad_crc), 100)


async def test_cancelled_append_never_records_bytes_not_on_disk(tmp_path: Path) -> None:
    """A request cancelled while a block waits for the thread pool keeps that block.

    The pool is filled with blocked jobs so that the first block's write is queued, not
    running, when the second block arrives and the request is cancelled.
    """
    loop = asyncio.get_running_loop()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    loop.set_default_executor(pool)
    store = FileStore(tmp_path)
    path = tmp_path / "f.part"
    fd = await store.open_for_write(path)
    recorded: list[int] = []

    async def record(offset: int, previous: int) -> None:
        recorded.append(offset)

    appender = Appender(store, fd, offset=0, record=record, name="f")

    async def body() -> AsyncIterator[bytes]:
        yield b"A" * BLOCK
        yield b"B" * BLOCK
        await asyncio.Event().wait()

    async def request() -> int:
        try:
            await stream_into(appender, body(), limit=4 * BLOCK, commit_every=4 * BLOCK,
                              progress_timeout=60)  # fmt: skip
        finally:
            return await asyncio.shield(appender.close())  # noqa: B012

    gate = threading.Event()
    blockers = [loop.run_in_executor(None, gate.wait) for _ in range(2)]
    task = asyncio.create_task(request())
    await eventually(lambda: appender.received == 2 * BLOCK)  # now waiting for block one
    task.cancel()
    gate.set()
    committed = await task
    await asyncio.gather(*blockers)
    data = path.read_bytes()
    assert committed == recorded[-1] == len(data) == 2 * BLOCK
    assert data == b"A" * BLOCK + b"B" * BLOCK


async def test_malformed_headers_and_multipart_bodies_get_400_and_change_nothing(
    client: TestClient[Any, Any], session: aiohttp.ClientSession
) -> None:
    peer = await peer_side(client, session)
    us = await opened(peer, 100)
    user = new_id()
    garbage = "multipart/form-data; boundary=zz"
    cases = [
        ("upload", b"a" * 10, {"Upload-Offset": "²"}),  # a digit to str.isdigit, not to int
        ("upload", b"a" * 10, {"Content-Type": "multipart/form-data"}),  # no boundary
        ("upload", b"a" * 10, {"Content-Type": garbage}),  # no such boundary in the body
        ("image", png(), {"Content-Type": "multipart/form-data"}),
        ("image", png(), {"Content-Type": garbage}),
    ]
    for target, body, headers in cases:
        url = f"{peer.url}{API}/upload/{us['id']}" if target == "upload" else (
            f"{peer.url}{API}/{user}/image"
        )  # fmt: skip
        async with session.post(url, data=body, headers={**peer.headers, **headers}) as resp:
            answer = await resp.json()
            assert resp.status == 400 and answer["status_code"] == 400, (headers, answer)
    assert await peer.offset(us["id"]) == (0, 100)
    store = client.server.app[FILESTORE]
    assert not store.path(IMAGES, peer.remote_id, user).exists()


async def test_concurrent_profile_images_of_one_user(
    client: TestClient[Any, Any], session: aiohttp.ClientSession
) -> None:
    """Each write has its own temporary file: both succeed and the survivor is whole."""
    peer = await peer_side(client, session)
    user = new_id()
    images = [png(40 + i, 40) for i in range(8)]
    results = await asyncio.gather(*(_image(peer, user, data) for data in images))
    assert all(result == (200, {"status": "OK"}) for result in results)
    path = client.server.app[FILESTORE].path(IMAGES, peer.remote_id, user)
    assert path.read_bytes() in images
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
