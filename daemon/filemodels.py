"""File models: Mattermost's ``UploadSession`` and ``FileInfo``, and the record of an upload.

``UploadSession`` travels in ``sharedchannel_upload`` messages (both ways); ``FileInfo`` is the
answer to a completed upload; :class:`Session` is one row of ``uploads_in`` (a session a peer
opened here). :func:`check_upload_session` is Mattermost's ``UploadSession.IsValid`` for
attachments, plus the size limit; :func:`display_name` turns a peer's filename into metadata
that can never name a path.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import msgspec

from daemon.ids import is_valid_id


class UploadSession(msgspec.Struct, kw_only=True):
    """Mattermost's ``UploadSession`` as it travels in a ``sharedchannel_upload`` message."""

    id: str = ""
    type: str = ""
    create_at: int = 0
    user_id: str = ""
    channel_id: str = ""
    filename: str = ""
    file_size: int = 0
    file_offset: int = 0
    remote_id: str = ""
    req_file_id: str = ""


def file_info_json(
    *,
    file_id: str,
    user_id: str,
    channel_id: str,
    create_at: int,
    name: str,
    extension: str,
    size: int,
    mime_type: str,
    remote_id: str,
) -> bytes:
    """Mattermost's ``FileInfo`` JSON (its omitempty fields left out, as Go does)."""
    return msgspec.json.encode(
        {
            "id": file_id,
            "user_id": user_id,
            "channel_id": channel_id,
            "create_at": create_at,
            "update_at": create_at,
            "delete_at": 0,
            "name": name,
            "extension": extension,
            "size": size,
            "mime_type": mime_type,
            "mini_preview": None,
            "remote_id": remote_id,
            "archived": False,
        }
    )


@dataclass(frozen=True, slots=True)
class Session:
    """One row of ``uploads_in``."""

    upload_id: str
    remote_id: str
    type: str
    user_id: str
    channel_id: str
    filename: str
    file_size: int
    committed: int
    req_file_id: str
    create_at: int
    expires_at: int
    state: str
    file_info: bytes | None
    update_at: int

    @property
    def complete(self) -> bool:
        """All bytes are in and the file is in place."""
        return self.state == "complete"

    def wire(self) -> UploadSession:
        """The session as Mattermost sends it back to the peer."""
        return UploadSession(
            id=self.upload_id, type=self.type, create_at=self.create_at, user_id=self.user_id,
            channel_id=self.channel_id, filename=self.filename, file_size=self.file_size,
            file_offset=self.committed, remote_id=self.remote_id, req_file_id=self.req_file_id,
        )  # fmt: skip


def display_name(filename: str) -> str:
    """The peer's filename as metadata only: NFC, base name, no control characters, ≤255 bytes."""
    name = unicodedata.normalize("NFC", filename).replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C").strip()
    while len(name.encode("utf-8")) > 255:
        name = name[:-1]
    return name if name not in ("", ".", "..") else "file"


def check_upload_session(us: UploadSession, max_file_size: int) -> str:
    """Mattermost's ``UploadSession.IsValid`` for attachments, plus the size limit."""
    problems = (
        (not is_valid_id(us.id), "invalid upload session id"),
        (us.type != "attachment", "only attachment uploads are accepted"),
        (us.user_id != "nouser" and not is_valid_id(us.user_id), "invalid user_id"),
        (not is_valid_id(us.channel_id), "invalid channel_id"),
        (bool(us.req_file_id) and not is_valid_id(us.req_file_id), "invalid req_file_id"),
        (not us.filename, "missing filename"),
        (us.file_size <= 0, "invalid file_size"),
        (
            us.file_size > max_file_size,
            f"upload too large: {us.file_size} bytes, the limit is {max_file_size}",
        ),
    )
    return next((why for failed, why in problems if failed), "")
