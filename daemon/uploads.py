"""Files peers send here: upload sessions, resumable appends streamed to disk, crash recovery.

A peer opens a session with a ``sharedchannel_upload`` message carrying Mattermost's
``UploadSession`` (the sender's session id and ``req_file_id`` are kept; the session is bound
to that remote; ``file_size`` is checked against ``uploads.max_file_size`` and against the free
disk space minus what open sessions may still write, which must stay above
``uploads.min_free_bytes``). When a ``[[topics]]`` route for ``sharedchannel_upload`` exists,
the local application approves (2xx) or refuses (4xx) each session first.

Appends (``POST /api/v4/remotecluster/upload/{id}``) follow the durability rule *write, fsync,
commit, answer*: the committed offset in SQLite never runs ahead of bytes on disk. Beyond
Mattermost, an append may carry ``Upload-Offset`` (409 with the committed offset when it is
not the committed one, and nothing is written) and ``HEAD`` tells the committed offset. One
writer per session: a new append asks the current one to stop (it commits what it has) and
then goes on, so a client resuming over a new connection never waits for a dead one to time
out. An interrupted append keeps what it received, and a body that pauses for a second has
what arrived committed (so ``HEAD`` shows it). A body longer than what remains is refused
before a byte is written when its Content-Length says so; a chunked body that runs past the
declared size gets 413, and the chunk that crossed the end is not written. The body is written
by :mod:`daemon.appender` (1 MiB blocks by a worker thread, committed every
``uploads.commit_every`` bytes and at the end); memory use does not depend on the file's size.

Completion is atomic and idempotent: the full offset is committed, the ``.part`` file is
fsynced and renamed into ``files/<remote>/<upload id>``, the folder fsynced, the session
marked complete with its FileInfo (``id`` = ``req_file_id``), and ``file.received`` sent.
At start-up every partial file is cut back to its committed offset, and a completion cut short
by a crash is finished. Unfinished sessions expire after ``uploads.session_ttl``.
"""

from __future__ import annotations

import asyncio
import contextlib
import mimetypes
import os
import sqlite3
import unicodedata
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import structlog

from daemon.appender import Appender, stream_into
from daemon.errors import (
    BadRequest,
    Conflict,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
)
from daemon.events import EventSink
from daemon.filestore import FILES, INCOMING, FileStore
from daemon.ids import is_valid_id, new_id
from daemon.inbound import Inbound
from daemon.metrics import Metrics
from daemon.models import (
    UPLOAD_TOPIC,
    Msg,
    PeerResponse,
    Remote,
    UploadSession,
    file_info_json,
    now_ms,
)
from daemon.settings import Settings
from daemon.store import Database

log = structlog.get_logger(__name__)

RELEASE_TIMEOUT = 10.0
JANITOR_PERIOD = 600.0
NULL = msgspec.Raw(b"null")
T = TypeVar("T")


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


@dataclass(frozen=True, slots=True)
class AppendResult:
    """What an append ended with: the committed offset, and the FileInfo once complete."""

    offset: int
    size: int
    file_info: bytes | None


@dataclass(slots=True)
class _Writer:
    task: asyncio.Task[object] | None
    released: asyncio.Event


def _refuse(reason: str) -> PeerResponse:
    return PeerResponse(status="FAIL", err=reason, payload=NULL)


def _accepted(session: Session) -> PeerResponse:
    return PeerResponse(
        status="OK", err="", payload=msgspec.Raw(msgspec.json.encode(session.wire()))
    )


def display_name(filename: str) -> str:
    """The peer's filename as metadata only: NFC, base name, no control characters, ≤255 bytes."""
    name = unicodedata.normalize("NFC", filename).replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C").strip()
    while len(name.encode("utf-8")) > 255:
        name = name[:-1]
    return name if name not in ("", ".", "..") else "file"


class Uploads:
    """Upload sessions opened by peers and the bytes they send."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        store: FileStore,
        events: EventSink,
        metrics: Metrics,
        inbound: Inbound,
    ) -> None:
        self._settings = settings
        self._db = db
        self._store = store
        self._events = events
        self._metrics = metrics
        self._inbound = inbound
        self._writers: dict[str, _Writer] = {}
        self._janitor: asyncio.Task[None] | None = None
        # Commits and completions that must finish even if their request is cancelled;
        # stop() waits for them, so the store never closes under one.
        self._finishing: set[asyncio.Future[Any]] = set()
        inbound.register(UPLOAD_TOPIC, self.open_session)

    async def start(self) -> None:
        """Repair what a crash left, then start the janitor."""
        await self._recover()
        self._janitor = asyncio.create_task(self._expire_forever(), name="uploads.janitor")

    async def stop(self) -> None:
        """Stop the janitor; wait for the commits of appends the shutdown cut off."""
        if self._janitor is not None:
            self._janitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._janitor
        await asyncio.gather(*self._finishing, return_exceptions=True)

    async def _unstoppable(self, work: Awaitable[T]) -> T:
        """Run ``work`` to its end even if the caller is cancelled (and tracked for stop())."""
        future = asyncio.ensure_future(work)
        self._finishing.add(future)
        future.add_done_callback(self._finishing.discard)
        return await asyncio.shield(future)

    def part_path(self, session: Session) -> Path:
        """Where a session's bytes are written until it completes."""
        return self._store.path(INCOMING, session.remote_id, session.upload_id, suffix=".part")

    def final_path(self, session: Session) -> Path:
        """Where a completed file lives."""
        return self._store.path(FILES, session.remote_id, session.upload_id)

    async def get(self, upload_id: str) -> Session | None:
        """A session by id, if it exists."""
        row = await self._db.fetchone("SELECT * FROM uploads_in WHERE upload_id = ?", (upload_id,))
        return None if row is None else Session(**dict(row))

    async def owned(self, remote: Remote, upload_id: str) -> Session:
        """A session that belongs to ``remote``: 404 unknown, 401 another remote's."""
        session = await self.get(upload_id) if is_valid_id(upload_id) else None
        if session is None:
            raise NotFound("Upload session not found.", error_id="app.upload.get.app_error")
        if session.remote_id != remote.remote_id:
            raise Unauthorized(
                "The upload session belongs to another secure connection.",
                error_id="api.context.remote_id_mismatch.app_error",
            )
        return session

    # --- opening a session (the built-in sharedchannel_upload topic) ----------------------

    async def open_session(self, remote: Remote, msg: Msg) -> PeerResponse:  # noqa: PLR0911
        """Create (or find again) the upload session a peer asks for."""
        try:
            us = msgspec.json.decode(bytes(msg.payload), type=UploadSession)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return _refuse("invalid upload session")
        cfg = self._settings.config.uploads
        if why := _check(us, cfg.max_file_size):
            log.info("upload.refused", remote_id=remote.remote_id, upload_id=us.id[:64], reason=why)
            return _refuse(why)
        existing = await self.get(us.id)
        if existing is not None:
            if existing.remote_id != remote.remote_id:
                return _refuse("the upload session id is already in use")
            return PeerResponse(
                status="OK", err="", payload=msgspec.Raw(msgspec.json.encode(existing.wire()))
            )
        route = self._inbound.route_for(UPLOAD_TOPIC, wildcard=False)
        if route is not None:
            approval = await self._inbound.forward(route, remote, msg)
            if approval.status != "OK":
                log.info(
                    "upload.refused",
                    remote_id=remote.remote_id,
                    upload_id=us.id,
                    reason=approval.err,
                )
                return approval
        if why := await self._check_space(us.file_size):
            log.warning("upload.refused", remote_id=remote.remote_id, upload_id=us.id, reason=why)
            return _refuse(why)
        now = now_ms()
        session = Session(
            upload_id=us.id, remote_id=remote.remote_id, type=us.type, user_id=us.user_id,
            channel_id=us.channel_id, filename=us.filename, file_size=us.file_size, committed=0,
            req_file_id=us.req_file_id or new_id(), create_at=now,
            expires_at=now + int(cfg.session_ttl * 1000), state="receiving", file_info=None,
            update_at=now,
        )  # fmt: skip
        columns, marks = ", ".join(Session.__slots__), ", ".join("?" * len(Session.__slots__))
        await self._db.execute(
            f"INSERT INTO uploads_in ({columns}) VALUES ({marks})",  # noqa: S608
            [getattr(session, c) for c in Session.__slots__],
        )
        self._metrics.upload_sessions.labels("opened").inc()
        log.info(
            "upload.opened",
            remote_id=remote.remote_id,
            upload_id=session.upload_id,
            file_size=session.file_size,
        )
        return PeerResponse(
            status="OK", err="", payload=msgspec.Raw(msgspec.json.encode(session.wire()))
        )

    async def _check_space(self, file_size: int) -> str:
        outstanding = await self._db.scalar(
            "SELECT coalesce(sum(file_size - committed), 0) FROM uploads_in "
            "WHERE state = 'receiving'"
        )
        free = await asyncio.to_thread(self._store.free_bytes)
        if free - outstanding - file_size < self._settings.config.uploads.min_free_bytes:
            return "not enough disk space for this upload"
        return ""

    # --- appending ------------------------------------------------------------------------

    async def append(
        self,
        session: Session,
        chunks: AsyncIterator[bytes],
        *,
        expected_offset: int | None,
        content_length: int | None,
    ) -> AppendResult:
        """Write the body after the committed offset (see the module doc for the rules)."""
        async with self._exclusive(session.upload_id):
            current = await self.get(session.upload_id)
            if current is None:
                raise NotFound("Upload session not found.", error_id="app.upload.get.app_error")
            if expected_offset is not None and expected_offset != current.committed:
                raise _offset_conflict(current.committed)
            if current.complete:
                return AppendResult(current.committed, current.file_size, current.file_info)
            if current.committed == current.file_size:
                # Every byte is in: finish a completion that was cut short.
                info = await self._unstoppable(self._complete(current))
                return AppendResult(current.committed, current.file_size, info)
            remaining = current.file_size - current.committed
            if content_length is not None and content_length > remaining:
                raise BadRequest(
                    f"The body is longer than the {remaining} bytes the upload still expects.",
                    error_id="api.upload.upload_data.invalid_content_length",
                )
            offset, overflow = await self._write(current, chunks)
            if offset == current.file_size:
                info = await self._unstoppable(self._complete(current))
                return AppendResult(offset, current.file_size, info)
            if overflow:
                raise PayloadTooLarge(
                    detail=f"the body runs past the declared size; {offset} bytes are committed",
                    headers={"Upload-Offset": str(offset)},
                )
            return AppendResult(offset, current.file_size, None)

    @contextlib.asynccontextmanager
    async def _exclusive(self, upload_id: str) -> AsyncIterator[None]:
        """One writer per session; a newcomer asks the current writer to stop first."""
        while (holder := self._writers.get(upload_id)) is not None:
            if holder.task is not None:
                holder.task.cancel()
            try:
                async with asyncio.timeout(RELEASE_TIMEOUT):
                    await holder.released.wait()
            except TimeoutError:
                raise Conflict("Another append to this upload is still running.") from None
        me = _Writer(asyncio.current_task(), asyncio.Event())
        self._writers[upload_id] = me
        try:
            yield
        finally:
            del self._writers[upload_id]
            me.released.set()

    async def _write(self, session: Session, chunks: AsyncIterator[bytes]) -> tuple[int, bool]:
        """Stream ``chunks`` to the part file; commit progress however the request ends.

        Returns the committed offset and whether the body ran past the declared size.
        """
        cfg = self._settings.config.uploads
        fd = await self._store.open_for_write(self.part_path(session))

        async def record(offset: int, previous: int) -> None:
            await self._db.execute(
                "UPDATE uploads_in SET committed = ?, update_at = ? WHERE upload_id = ?",
                (offset, now_ms(), session.upload_id),
            )
            self._metrics.upload_bytes.inc(offset - previous)

        appender = Appender(self._store, fd, offset=session.committed, record=record,
                            name=session.upload_id)  # fmt: skip
        try:
            # Bytes past the committed offset were never acknowledged: drop them.
            if await self._store.cut_back(fd, session.committed) < session.committed:
                raise await self._lost_bytes(session, fd)
            overflow = await stream_into(
                appender,
                chunks,
                limit=session.file_size,
                commit_every=cfg.commit_every,
                progress_timeout=cfg.progress_timeout,
            )
        finally:
            # Also on cancellation (client gone, a newer writer, shutdown): keep what arrived.
            committed = await self._unstoppable(appender.close())
        return committed, overflow

    async def _lost_bytes(self, session: Session, fd: int) -> Conflict:
        """The file is shorter than its committed offset (the disk lost data): roll back."""
        size = os.fstat(fd).st_size
        await self._db.execute(
            "UPDATE uploads_in SET committed = ? WHERE upload_id = ?", (size, session.upload_id)
        )
        log.error("upload.rolled_back", upload_id=session.upload_id, to=size, was=session.committed)
        return _offset_conflict(size)

    async def _complete(self, session: Session) -> bytes:
        """Move the file into place, record the FileInfo, announce it (idempotent)."""
        name = display_name(session.filename)
        info = file_info_json(
            file_id=session.req_file_id,
            user_id=session.user_id,
            channel_id=session.channel_id,
            create_at=now_ms(),
            name=name,
            extension=Path(name).suffix.lstrip(".").lower(),
            size=session.file_size,
            mime_type=mimetypes.guess_type(name)[0] or "application/octet-stream",
            remote_id=session.remote_id,
        )
        part, final = self.part_path(session), self.final_path(session)
        if await self._store.size(part) is not None:
            await self._store.complete(part, final)
        changed = await self._db.execute(
            "UPDATE uploads_in SET state = 'complete', file_info = ?, update_at = ? "
            "WHERE upload_id = ? AND state = 'receiving'",
            (info, now_ms(), session.upload_id),
        )
        if changed:
            self._metrics.upload_sessions.labels("completed").inc()
            log.info(
                "file.received",
                remote_id=session.remote_id,
                upload_id=session.upload_id,
                file_id=session.req_file_id,
                size=session.file_size,
            )
            self._events.emit(
                "file.received",
                None,
                remote_id=session.remote_id,
                upload_id=session.upload_id,
                file_info=msgspec.Raw(info),
                path=str(final),
            )
        return info

    # --- recovery and expiry ----------------------------------------------------------------

    async def _recover(self) -> None:
        rows = await self._db.fetchall("SELECT * FROM uploads_in WHERE state = 'receiving'")
        for session in (Session(**dict(row)) for row in rows):
            part = self.part_path(session)
            size = await self._store.size(part)
            if session.committed == session.file_size:
                await self._complete(session)
                continue
            if size is not None and size > session.committed:
                fd = await self._store.open_for_write(part)
                try:
                    await self._store.cut_back(fd, session.committed)
                finally:
                    await self._store.close(fd)
                log.info(
                    "upload.truncated", upload_id=session.upload_id, to=session.committed, was=size
                )
            elif (size or 0) < session.committed:
                await self._db.execute(
                    "UPDATE uploads_in SET committed = ? WHERE upload_id = ?",
                    (size or 0, session.upload_id),
                )
                log.warning(
                    "upload.rolled_back",
                    upload_id=session.upload_id,
                    to=size or 0,
                    was=session.committed,
                )

    async def _expire_forever(self) -> None:
        while True:
            try:
                await self.expire()
            except (sqlite3.Error, OSError):
                log.exception("uploads.janitor_failed")
            await asyncio.sleep(JANITOR_PERIOD)

    async def expire(self) -> int:
        """Remove unfinished sessions past their time, and old completed records."""
        now = now_ms()
        rows = await self._db.fetchall(
            "SELECT * FROM uploads_in WHERE state = 'receiving' AND expires_at < ?", (now,)
        )
        for session in (Session(**dict(row)) for row in rows):
            if session.upload_id in self._writers:
                continue
            await self._store.remove(self.part_path(session))
            await self._db.execute(
                "DELETE FROM uploads_in WHERE upload_id = ?", (session.upload_id,)
            )
            log.info("upload.expired", remote_id=session.remote_id, upload_id=session.upload_id,
                     committed=session.committed)  # fmt: skip
        keep_ms = int(self._settings.config.uploads.keep_done * 1000)
        await self._db.execute(
            "DELETE FROM uploads_in WHERE state = 'complete' AND update_at < ?", (now - keep_ms,)
        )
        return len(rows)


def _check(us: UploadSession, max_file_size: int) -> str:
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


def _offset_conflict(committed: int) -> Conflict:
    return Conflict(
        "Upload-Offset does not match the committed offset.",
        error_id="api.upload.upload_data.offset_mismatch",
        headers={"Upload-Offset": str(committed)},
    )
