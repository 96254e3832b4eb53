"""The sending side of one upload to a peer: open the session, ask the offset, stream the bytes.

Each call is one step of :class:`daemon.filesend.FileSender`'s loop and says what to do next
by what it raises:

* :class:`~daemon.delivery.Retry`: a transient failure; try again after the backoff
  (:class:`OffsetMismatch` carries the offset the peer holds);
* :class:`StartOver`: the peer's session is gone, or the peer cannot tell how much it has (a
  Mattermost server has no ``HEAD``); open a fresh session and send the whole file again;
* :class:`Refused`: the peer refused the file for good.

The bytes go with ``Upload-Offset`` and a Content-Length, read from disk in 1 MiB blocks by a
worker thread. There is no cap on the whole transfer's time; a watchdog cuts it when no block
was taken by the connection for ``progress_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import msgspec

from daemon.delivery import Retry, frame_bytes, is_retryable, send_frame
from daemon.filemodels import UploadSession
from daemon.ids import new_id
from daemon.models import UPLOAD_TOPIC, Remote, now_ms, parse_decimal
from daemon.peers import PeerClient

UPLOAD_PATH = "api/v4/remotecluster/upload/"
READ_BLOCK = 1024 * 1024


class Refused(Exception):
    """The peer refused the file for good."""


class StartOver(Exception):
    """The peer's session is gone or cannot resume: open a fresh one, send everything."""


class OffsetMismatch(Retry):
    """The peer holds ``offset`` bytes, not what was sent from."""

    def __init__(self, offset: int) -> None:
        super().__init__("the peer holds a different offset")
        self.offset = offset


async def open_session(
    peers: PeerClient, remote: Remote, session: UploadSession, timeout: float
) -> None:
    """Open the upload session on the peer with a ``sharedchannel_upload`` message."""
    payload = msgspec.json.encode(session)
    frame = frame_bytes(remote.remote_id, new_id(), UPLOAD_TOPIC, now_ms(), payload)
    state, answer = await send_frame(peers, remote, frame, timeout=timeout)
    if state != "delivered":
        raise Refused(answer.err or "the peer refused the upload session")


async def peer_offset(
    peers: PeerClient, remote: Remote, session_id: str, timeout: float
) -> int | None:
    """The peer's committed offset, or None when it cannot tell (no ``HEAD``, or gone)."""
    reply = await peers.request(
        "HEAD",
        remote.site_url,
        UPLOAD_PATH + session_id,
        remote_id=remote.remote_id,
        token=remote.remote_token,
        timeout=aiohttp.ClientTimeout(total=timeout),
    )
    offset = parse_decimal(reply.headers.get("Upload-Offset", ""))
    if reply.status == 200 and offset is not None:
        return offset
    if is_retryable(reply.status):
        raise Retry(f"asking the offset: HTTP {reply.status}")
    return None  # 404 (session gone) or 405 (a peer without resume): start over


async def send_bytes(
    peers: PeerClient,
    remote: Remote,
    session_id: str,
    path: Path,
    *,
    offset: int,
    size: int,
    progress_timeout: float,
) -> bytes:
    """Stream ``path[offset:]`` to the peer; return the FileInfo of the completed upload."""
    progress = _Progress()
    request = asyncio.ensure_future(
        peers.request(
            "POST",
            remote.site_url,
            UPLOAD_PATH + session_id,
            remote_id=remote.remote_id,
            token=remote.remote_token,
            body=_read_from(path, offset, progress),
            headers={
                "Upload-Offset": str(offset),
                "Content-Length": str(size - offset),
                "Content-Type": "application/octet-stream",
            },
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=progress_timeout),
        )
    )
    try:
        while not request.done():
            await asyncio.wait({request}, timeout=min(progress_timeout, 1.0))
            if time.monotonic() - progress.at > progress_timeout and not request.done():
                request.cancel()
                raise Retry(f"no progress for {progress_timeout:g}s after {progress.sent} bytes")
    finally:
        if not request.done():
            request.cancel()
    reply = request.result()
    if reply.status == 200:
        return reply.body
    current = parse_decimal(reply.headers.get("Upload-Offset", ""))
    if reply.status == 409 and current is not None:
        raise OffsetMismatch(current)
    if reply.status == 204:
        raise Retry("the peer wants more bytes")
    if reply.status == 404:
        raise StartOver("the peer no longer knows the upload session")
    if is_retryable(reply.status):
        raise Retry(f"sending the bytes: HTTP {reply.status}")
    raise Refused(f"the peer refused the bytes: HTTP {reply.status}")


class _Progress:
    """How many bytes a transfer handed to the connection, and when it last moved."""

    def __init__(self) -> None:
        self.sent = 0
        self.at = time.monotonic()

    def mark(self, size: int) -> None:
        """The connection took another block."""
        self.sent += size
        self.at = time.monotonic()


async def _read_from(path: Path, offset: int, progress: _Progress) -> AsyncIterator[bytes]:
    fd = await asyncio.to_thread(os.open, path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        position = offset
        while block := await asyncio.to_thread(os.pread, fd, READ_BLOCK, position):
            position += len(block)
            progress.mark(len(block))
            yield block
    finally:
        await asyncio.to_thread(os.close, fd)
