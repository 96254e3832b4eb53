"""Files peers send here: resumable appends streamed to disk, completion, crash recovery.

Sessions are opened by :mod:`daemon.upload_sessions`; this module writes into them.

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
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

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
from daemon.filemodels import (
    Session,
    display_name,
    file_info_json,
)
from daemon.filestore import FILES, INCOMING, FileStore
from daemon.ids import is_valid_id
from daemon.metrics import Metrics
from daemon.models import Remote, now_ms
from daemon.remotes import Remotes
from daemon.settings import Settings
from daemon.store import Database
from daemon.tasks import Unstoppable, periodic

log = structlog.get_logger(__name__)

RELEASE_TIMEOUT = 10.0
JANITOR_PERIOD = 600.0


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


class Uploads:
    """Upload sessions opened by peers and the bytes they send."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        store: FileStore,
        remotes: Remotes,
        events: EventSink,
        metrics: Metrics,
    ) -> None:
        self._settings = settings
        self._db = db
        self._store = store
        self._remotes = remotes
        self._events = events
        self._metrics = metrics
        self._writers: dict[str, _Writer] = {}
        self._janitor: asyncio.Task[None] | None = None
        # Commits and completions that must finish even if their request is cancelled;
        # stop() waits for them, so the store never closes under one.
        self._finishing = Unstoppable()

    async def start(self) -> None:
        """Repair what a crash left, then start the janitor."""
        await self._recover()
        self._janitor = periodic(self.expire, JANITOR_PERIOD, name="uploads.expire", at_start=True)

    async def stop(self) -> None:
        """Stop the janitor; wait for the commits of appends the shutdown cut off."""
        if self._janitor is not None:
            self._janitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._janitor
        await self._finishing.wait()

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
                info = await self._finishing.run(self._complete(current))
                return AppendResult(current.committed, current.file_size, info)
            remaining = current.file_size - current.committed
            if content_length is not None and content_length > remaining:
                raise BadRequest(
                    f"The body is longer than the {remaining} bytes the upload still expects.",
                    error_id="api.upload.upload_data.invalid_content_length",
                )
            offset, overflow = await self._write(current, chunks)
            if offset == current.file_size:
                info = await self._finishing.run(self._complete(current))
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
            committed = await self._finishing.run(appender.close())
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
            remote = self._remotes.get(session.remote_id)
            self._events.emit(
                "file.received",
                remote,
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


def _offset_conflict(committed: int) -> Conflict:
    return Conflict(
        "Upload-Offset does not match the committed offset.",
        error_id="api.upload.upload_data.offset_mismatch",
        headers={"Upload-Offset": str(committed)},
    )
