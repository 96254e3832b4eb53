"""Helpers for upload tests: a peer's side of the upload protocol, and small real images."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from typing import Any

import aiohttp

from daemon.ids import new_id
from tests.helpers import API, transport_call


class PeerSide:
    """The calls a peer makes to a daemon: open an upload session, append, ask the offset."""

    def __init__(
        self, session: aiohttp.ClientSession, url: str, remote_id: str, token: str
    ) -> None:
        self.session, self.url, self.remote_id, self.token = session, url, remote_id, token

    @property
    def headers(self) -> dict[str, str]:
        return {"X-RemoteCluster-Id": self.remote_id, "X-RemoteCluster-Token": self.token}

    async def open(self, size: int, **fields: Any) -> tuple[int, Any]:
        session = {
            "id": new_id(), "type": "attachment", "create_at": 1, "user_id": new_id(),
            "channel_id": new_id(), "filename": "report.pdf", "file_size": size,
            "file_offset": 0, "remote_id": self.remote_id, "req_file_id": new_id(),
        }  # fmt: skip
        session.update(fields)
        frame = {
            "remote_id": self.remote_id,
            "msg": {
                "id": new_id(),
                "topic": "sharedchannel_upload",
                "create_at": 1,
                "payload": session,
            },
        }
        return await transport_call(
            self.session, self.url, f"{API}/msg", frame, remote_id=self.remote_id, token=self.token
        )

    async def append(
        self,
        upload_id: str,
        data: Any,
        *,
        offset: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        extra = dict(headers or {})
        if isinstance(data, bytes) and len(data) > 1024 * 1024:
            data = io.BytesIO(data)
        if offset is not None:
            extra["Upload-Offset"] = str(offset)
        async with self.session.post(
            f"{self.url}{API}/upload/{upload_id}", data=data, headers={**self.headers, **extra}
        ) as resp:
            raw = await resp.read()
            body = await resp.json(content_type=None) if raw else None
            return resp.status, dict(resp.headers), body

    async def offset(self, upload_id: str) -> tuple[int, int]:
        async with self.session.head(
            f"{self.url}{API}/upload/{upload_id}", headers=self.headers
        ) as resp:
            assert resp.status == 200, resp.status
            assert resp.headers["Cache-Control"] == "no-store"
            return int(resp.headers["Upload-Offset"]), int(resp.headers["Upload-Length"])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def png(width: int = 2, height: int = 2, *, claim: tuple[int, int] | None = None) -> bytes:
    """A real PNG (RGB, filter 0); ``claim`` writes other dimensions into IHDR (a bomb header)."""
    w, h = claim or (width, height)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    raw = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


GIF_1X1 = bytes.fromhex(
    "47494638396101000100800000000000ffffff21f90401000000002c000000000100010000020144003b"
)
JPEG_HEADER = (
    b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    b"\xff\xc0\x00\x11\x08\x00\x10\x00\x20\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    b"\xff\xda\x00\x0c\x03\x01\x00\x02\x11\x03\x11\x00\x3f\x00\x00\xff\xd9"
)
