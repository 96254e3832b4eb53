"""Files this daemon sends: kept on disk, then sent to the peer in a resumable way.

``POST /api/v4/remotecluster/{remote_id}/files`` streams the local application's file to
``outgoing/<upload id>``, fsyncs it and records it before the 202. One worker per remote then
sends that remote's files one after another (apart from the message outbox, so a large file
never holds messages back):

1. open the session on the peer with a ``sharedchannel_upload`` message (Mattermost's
   ``UploadSession``, our upload id as its id and the file id as ``req_file_id``); the peer's
   FAIL is final (``rejected``);
2. stream the bytes to ``/upload/{id}`` with ``Upload-Offset`` and a Content-Length; a 200 with
   the FileInfo is ``completed``;
3. after a failure, ask the peer where it stands (``HEAD``, beyond Mattermost) and go on from
   there; a peer that cannot tell (a Mattermost server) gets a fresh session and the whole file
   again, since appending blindly could duplicate bytes.

There is no cap on a transfer's total time (Mattermost gives a whole file one minute); a
transfer that makes no progress for ``uploads.progress_timeout`` seconds is cut and retried.
Retries follow the ``[outbox]`` policy (full-jitter backoff, ``max_attempts``, ``max_age``);
a peer back online is retried at once. Final states send ``file.sent``, ``file.rejected`` or
``file.dead`` events.

The local copy is removed once the file is sent or rejected. A dead file keeps it, so that
``POST …/files/{file_id}/retry`` can send it again (from the start, on a fresh session), until
its row is pruned ``outbox.keep_done`` seconds later; a deleted remote's files are dead at once
and their copies removed, since they can never be sent.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import structlog

from daemon import transfer
from daemon.delivery import Retry, backoff_delay
from daemon.errors import (
    BadRequest,
    Conflict,
    NotFound,
    PayloadTooLarge,
    PeerError,
)
from daemon.events import EventSink
from daemon.filemodels import UploadSession, display_name
from daemon.filestore import OUTGOING, FileStore
from daemon.ids import is_valid_id, new_id
from daemon.metrics import Metrics
from daemon.models import Remote, now_ms
from daemon.peers import PeerClient
from daemon.remotes import Change, Remotes
from daemon.settings import Settings
from daemon.store import Database
from daemon.tasks import Unstoppable, background, periodic, unstoppable
from daemon.workers import RemoteWorkers, Worker

log = structlog.get_logger(__name__)

JANITOR_PERIOD = 3600.0
NO_CHANNEL = "nochannelnochannelnochanne"  # a valid id for files sent without a channel


class FileSender:
    """Accepts files from local applications and sends them to peers."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        store: FileStore,
        remotes: Remotes,
        peers: PeerClient,
        events: EventSink,
        metrics: Metrics,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._settings = settings
        self._db = db
        self._store = store
        self._remotes = remotes
        self._peers = peers
        self._events = events
        self._metrics = metrics
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not crypto
        self._workers = RemoteWorkers("files", self._run)
        self.finishing = Unstoppable()
        self._janitor: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Resume what was being sent."""
        rows = await self._db.fetchall(
            "SELECT DISTINCT remote_id FROM uploads_out WHERE state IN ('queued', 'sending')"
        )
        for row in rows:
            remote = self._remotes.get(row["remote_id"])
            if remote is None or remote.is_deleted:
                await self._bury_all(row["remote_id"])
            else:
                self._workers.ensure(row["remote_id"])
        self._remotes.subscribe(self._workers.on_change)
        self._remotes.subscribe(self._bury_deleted)
        self._janitor = periodic(self.prune, JANITOR_PERIOD, name="files.prune")

    async def stop(self) -> None:
        """Stop every worker; transfers resume at the next start."""
        await self.finishing.wait()
        tasks = [*self._background, *([self._janitor] if self._janitor else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._workers.stop()

    def wake(self, remote: Remote, online: bool) -> None:
        """Heartbeat listener: retry at once when the peer is back."""
        self._workers.wake(remote, online)

    # --- the local application's side ---------------------------------------------------

    async def accept(
        self,
        remote: Remote,
        chunks: AsyncIterator[bytes],
        *,
        filename: str,
        content_length: int | None,
        channel_id: str = "",
        user_id: str = "",
        file_id: str = "",
    ) -> dict[str, Any]:
        """Keep the file on disk, record it, and queue it for ``remote`` (the 202's body)."""
        if not remote.is_confirmed:
            raise Conflict("The secure connection is not confirmed yet.")
        if not filename.strip():
            raise BadRequest("Missing filename parameter.")
        for name, value in (("channel_id", channel_id), ("user_id", user_id), ("file_id", file_id)):
            if value and not (is_valid_id(value) or (name == "user_id" and value == "nouser")):
                raise BadRequest(f"Invalid {name} parameter.")
        limit = self._settings.config.uploads.max_file_size
        if content_length is not None and content_length > limit:
            raise PayloadTooLarge(detail=f"files are limited to {limit} bytes")
        file_id = file_id or new_id()
        if await self._db.fetchone(
            "SELECT 1 FROM uploads_out WHERE remote_id = ? AND file_id = ?",
            (remote.remote_id, file_id),
        ):
            raise Conflict("This file id was already sent to this remote.")
        upload_id = new_id()
        size = await self._store.save(
            self._store.path(OUTGOING, upload_id),
            chunks,
            limit=limit,
            progress_timeout=self._settings.config.uploads.progress_timeout,
        )
        row = (upload_id, file_id, remote.remote_id, upload_id, display_name(filename),
               channel_id or NO_CHANNEL, user_id or "nouser", size)  # fmt: skip
        return await self._queue(remote, row)

    @unstoppable
    async def _queue(self, remote: Remote, row: tuple[str, str, str, str, str, str, str, int]
                     ) -> dict[str, Any]:  # fmt: skip
        """Record a saved file and wake its worker (together, even if the request goes)."""
        upload_id, file_id, size = row[0], row[1], row[7]
        now = now_ms()
        try:
            await self._db.execute(
                "INSERT INTO uploads_out (upload_id, file_id, remote_id, session_id, filename, "
                "channel_id, user_id, size, create_at, update_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (*row, now, now),
            )
        except sqlite3.IntegrityError:
            await self._store.remove(self._store.path(OUTGOING, upload_id))
            raise Conflict("This file id was already sent to this remote.") from None
        self._workers.ensure(remote.remote_id).work.set()
        log.info("file.queued", remote_id=remote.remote_id, file_id=file_id, upload_id=upload_id,
                 size=size)  # fmt: skip
        return {"file_id": file_id, "upload_id": upload_id, "state": "queued"}

    async def status(self, remote_id: str, file_id: str) -> dict[str, Any] | None:
        """The file's state for the status endpoint."""
        row = await self._db.fetchone(
            "SELECT * FROM uploads_out WHERE remote_id = ? AND file_id = ?", (remote_id, file_id)
        )
        if row is None:
            return None
        info = row["file_info"]
        return {
            "file_id": row["file_id"],
            "upload_id": row["upload_id"],
            "state": row["state"],
            "offset": row["sent"],
            "size": row["size"],
            "file_info": msgspec.Raw(info) if info else None,
            "last_error": row["last_error"],
        }

    async def retry(self, remote: Remote, file_id: str) -> dict[str, Any]:
        """Queue a dead file again: fresh attempts, a fresh session, behind what is queued."""
        now = now_ms()
        async with self._db.transaction() as conn:
            cursor = await conn.execute(
                "SELECT upload_id, state FROM uploads_out WHERE remote_id = ? AND file_id = ?",
                (remote.remote_id, file_id),
            )
            row = await cursor.fetchone()
            if row is None:
                raise NotFound("File not found.", error_id="api.remote_cluster.file_not_found")
            if row["state"] != "dead":
                raise Conflict("Only dead files can be retried.")
            await conn.execute(
                "UPDATE uploads_out SET state = 'queued', attempts = 0, next_attempt_at = 0, "
                "last_error = '', session_id = ?, session_created = 0, sent = 0, create_at = ?, "
                "update_at = ? WHERE upload_id = ?",
                (new_id(), now, now, row["upload_id"]),
            )
        self._workers.ensure(remote.remote_id).work.set()
        log.info("file.retried", remote_id=remote.remote_id, remote_name=remote.name,
                 file_id=file_id, upload_id=row["upload_id"])  # fmt: skip
        return {"file_id": file_id, "upload_id": row["upload_id"], "state": "queued"}

    def _bury_deleted(self, change: Change, remote: Remote) -> None:
        if change is Change.DELETED:
            task = background(self._bury_all(remote.remote_id), name="files.bury")
            self._background.add(task)  # a reference until it finishes; awaited at stop
            task.add_done_callback(self._background.discard)

    async def _bury_all(self, remote_id: str) -> None:
        """A deleted remote's unsent files are dead, and their copies go."""
        reason = "the remote was deleted"
        rows = await self._db.fetchall(
            "UPDATE uploads_out SET state = 'dead', last_error = ?, update_at = ? "
            "WHERE remote_id = ? AND state IN ('queued', 'sending', 'dead') RETURNING upload_id",
            (reason, now_ms(), remote_id),
        )
        for row in rows:
            await self._store.remove(self._store.path(OUTGOING, row["upload_id"]))
        if rows:
            log.warning("file.dead", remote_id=remote_id, files=len(rows), last_error=reason)

    async def prune(self) -> None:
        """Forget finished files after ``outbox.keep_done`` seconds (dead ones' copies too)."""
        cutoff = now_ms() - int(self._settings.config.outbox.keep_done * 1000)
        rows = await self._db.fetchall(
            "DELETE FROM uploads_out WHERE state IN ('completed', 'rejected', 'dead') "
            "AND update_at < ? RETURNING upload_id",
            (cutoff,),
        )
        for row in rows:
            await self._store.remove(self._store.path(OUTGOING, row["upload_id"]))
        if rows:
            log.info("files.pruned", removed=len(rows))

    # --- sending ---------------------------------------------------------------------------

    async def _run(self, worker: Worker) -> None:
        while True:
            worker.work.clear()
            try:
                rows = await self._db.fetchall(
                    "SELECT * FROM uploads_out WHERE remote_id = ? "
                    "AND state IN ('queued', 'sending') ORDER BY create_at, upload_id LIMIT 16",
                    (worker.remote_id,),
                )
            except sqlite3.Error:
                log.exception("file.read_failed", remote_id=worker.remote_id)
                await asyncio.sleep(1.0)
                continue
            if not rows:
                await worker.work.wait()
                continue
            for row in rows:
                await self._transfer(worker, dict(row))

    async def _transfer(self, worker: Worker, row: dict[str, Any]) -> None:
        """Send one file until it is completed, rejected or dead."""
        while True:
            remote = self._remotes.get(worker.remote_id)
            if remote is None or remote.is_deleted:
                return
            cfg = self._settings.config.outbox
            now = now_ms()
            expires = row["create_at"] + int(cfg.max_age * 1000)
            if (cfg.max_attempts and row["attempts"] >= cfg.max_attempts) or now >= expires:
                await self._finish(remote, row, "dead")
                return
            if row["next_attempt_at"] > now:
                if await worker.backoff((min(row["next_attempt_at"], expires) - now) / 1000):
                    row["next_attempt_at"] = 0
                continue
            row["attempts"] += 1
            await self._update(row, state="sending", attempts=row["attempts"])
            try:
                info = await self._attempt(remote, row)
            except transfer.Refused as exc:
                row["last_error"] = str(exc)
                await self._finish(remote, row, "rejected")
                return
            except transfer.StartOver as exc:
                # A fresh session on the peer, and the whole file again, after the backoff.
                await self._update(row, session_id=new_id(), session_created=0, sent=0)
                await self._retry(remote, row, str(exc))
                continue
            except (Retry, PeerError) as exc:
                await self._retry(remote, row, str(exc))
                continue
            row["file_info"] = info
            await self._finish(remote, row, "completed")
            return

    async def _attempt(self, remote: Remote, row: dict[str, Any]) -> bytes:
        """One try: open the session if needed, learn the offset, send the rest."""
        cfg = self._settings.config
        offset = 0
        if not row["session_created"]:
            session = UploadSession(
                id=row["session_id"], type="attachment", create_at=now_ms(),
                user_id=row["user_id"], channel_id=row["channel_id"], filename=row["filename"],
                file_size=row["size"], file_offset=0, remote_id=remote.remote_id,
                req_file_id=row["file_id"],
            )  # fmt: skip
            await transfer.open_session(self._peers, remote, session, cfg.outbox.send_timeout)
            await self._update(row, session_created=1, sent=0)
        elif row["sent"] or row["attempts"] > 1:
            known = await transfer.peer_offset(
                self._peers, remote, row["session_id"], cfg.heartbeat.timeout
            )
            if known is None:
                raise transfer.StartOver("the peer cannot tell how much it has (no resume)")
            offset = known
            await self._update(row, sent=offset)
        try:
            info = await transfer.send_bytes(
                self._peers, remote, row["session_id"],
                self._store.path(OUTGOING, row["upload_id"]), offset=offset, size=row["size"],
                progress_timeout=cfg.uploads.progress_timeout,
            )  # fmt: skip
        except transfer.OffsetMismatch as exc:
            await self._update(row, sent=exc.offset)
            raise
        self._metrics.files_sent_bytes.inc(row["size"] - offset)
        return info

    async def _retry(self, remote: Remote, row: dict[str, Any], reason: str) -> None:
        cfg = self._settings.config.outbox
        delay = backoff_delay(row["attempts"], cfg.retry_base, cfg.retry_max, self._rng)
        row["next_attempt_at"] = now_ms() + int(delay * 1000)
        log.log(
            30 if row["attempts"] == 1 else 20,
            "file.retry",
            remote_id=remote.remote_id,
            remote_name=remote.name,
            file_id=row["file_id"],
            attempts=row["attempts"],
            sent=row["sent"],
            reason=reason,
            retry_in_s=round(delay, 3),
        )
        await self._update(row, next_attempt_at=row["next_attempt_at"], last_error=reason)

    async def _finish(self, remote: Remote, row: dict[str, Any], state: str) -> None:
        fields: dict[str, Any] = {"state": state, "last_error": row["last_error"]}
        if state == "completed":
            fields.update(file_info=row["file_info"], sent=row["size"], last_error="")
        await self._update(row, **fields)
        self._metrics.files_sent.labels(state).inc()
        event = {"completed": "file.sent", "rejected": "file.rejected", "dead": "file.dead"}[state]
        log.log(20 if state == "completed" else 30, event, remote_id=remote.remote_id,
                remote_name=remote.name, file_id=row["file_id"], upload_id=row["upload_id"],
                size=row["size"], attempts=row["attempts"],
                last_error=row["last_error"] or None)  # fmt: skip
        extra: dict[str, Any] = {"file_id": row["file_id"], "upload_id": row["upload_id"]}
        if state == "completed":
            extra["file_info"] = msgspec.Raw(row["file_info"])
        else:
            extra["last_error"] = row["last_error"]
        self._events.emit(event, remote, **extra)
        if state != "dead":
            await self._store.remove(self._store.path(OUTGOING, row["upload_id"]))

    async def _update(self, row: dict[str, Any], **fields: Any) -> None:
        row.update(fields)
        fields["update_at"] = now_ms()
        assignments = ", ".join(f"{name} = ?" for name in fields)
        await self._db.execute(
            f"UPDATE uploads_out SET {assignments} WHERE upload_id = ?",  # noqa: S608
            [*fields.values(), row["upload_id"]],
        )
