"""The outbox: messages for peers, durable before they are acknowledged, delivered in order.

``enqueue`` commits the message to the ``outbox`` table (group commit) before the local
application gets its 202. One worker per remote then delivers that remote's messages in the
order they were queued, one at a time, to the peer's ``/msg`` as Mattermost frames:

* The peer's answer is final (:mod:`daemon.delivery` says which answers are): ``OK`` →
  ``delivered``; ``FAIL`` → ``rejected`` (its ``err`` kept as ``last_error``).
* A transient failure is retried after a capped exponential backoff with full jitter
  (``outbox.retry_base`` doubling up to ``outbox.retry_max``; a ``Retry-After`` is honoured up
  to the cap). Attempts, the next attempt time and the last error are kept in the row, so the
  schedule survives restarts.
* After ``outbox.max_attempts`` attempts (0: no limit) or ``outbox.max_age`` seconds the
  message is ``dead``: an event ``msg.dead`` goes out and the next message goes on.
* When the heartbeat sees the peer come back online, its worker retries at once instead of
  waiting out the backoff.

Why one at a time is enough: every per-message cost except the round trip itself is taken off
the path. Outcomes are recorded with ``write_later`` (batched into the next group commit; the
worker does not wait for the disk), and the next messages are read ahead in pages. A crash
can lose an outcome that was not yet committed; the message is then sent again and the peer
answers it from its inbox, without delivering it twice (at-least-once on the wire, once to
the application).
"""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog

from daemon.delivery import Retry, backoff_delay, frame_bytes, send_frame
from daemon.errors import Conflict, NotFound, PayloadTooLarge, TooManyRequests
from daemon.events import EventSink
from daemon.ids import new_id
from daemon.metrics import Metrics
from daemon.models import PeerResponse, Remote, now_ms
from daemon.peers import PeerClient
from daemon.remotes import Change, Remotes
from daemon.settings import Settings
from daemon.store import Database, GroupCommit
from daemon.tasks import Unstoppable, background, periodic, unstoppable
from daemon.workers import RemoteWorkers, Worker

log = structlog.get_logger(__name__)

PAGE = 256
JANITOR_PERIOD = 3600.0


@dataclass(slots=True)
class _Message:
    seq: int
    msg_id: str
    topic: str
    payload: bytes
    create_at: int
    attempts: int
    next_attempt_at: int
    last_error: str


class Outbox:
    """Queues messages for peers and delivers them."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        writer: GroupCommit,
        remotes: Remotes,
        peers: PeerClient,
        events: EventSink,
        metrics: Metrics,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._settings = settings
        self._db = db
        self._writer = writer
        self._remotes = remotes
        self._peers = peers
        self._events = events
        self._metrics = metrics
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not crypto
        self._workers = RemoteWorkers("outbox", self._run)
        self.finishing = Unstoppable()  # enqueue and retry: commit and wake-up go together
        self._janitor: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        # Outcomes recorded but not yet committed, so a status read never goes back in time.
        self._pending: dict[str, dict[str, Any]] = {}

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Resume delivery of what is queued; give up on messages of deleted remotes."""
        rows = await self._db.fetchall(
            "SELECT remote_id, count(*) AS n FROM outbox WHERE state = 'queued' GROUP BY remote_id"
        )
        for row in rows:
            remote = self._remotes.get(row["remote_id"])
            if remote is None or remote.is_deleted:
                await self._bury_all(row["remote_id"], "the remote was deleted")
                continue
            self._workers.ensure(row["remote_id"]).queued = row["n"]
        self._remotes.subscribe(self._workers.on_change)
        self._remotes.subscribe(self._bury_deleted)
        self._metrics.watch_outbox(self._depths)
        self._janitor = periodic(self._prune, JANITOR_PERIOD, name="outbox.prune")

    async def stop(self) -> None:
        """Stop every worker (what is queued stays queued)."""
        await self.finishing.wait()
        tasks = list(self._background)
        if self._janitor is not None:
            tasks.append(self._janitor)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._workers.stop()

    def wake(self, remote: Remote, online: bool) -> None:
        """Heartbeat listener: a peer back online is retried at once."""
        self._workers.wake(remote, online)

    def _bury_deleted(self, change: Change, remote: Remote) -> None:
        if change is Change.DELETED:
            task = background(
                self._bury_all(remote.remote_id, "the remote was deleted"), name="outbox.bury"
            )
            self._background.add(task)  # a reference until it finishes; awaited at stop
            task.add_done_callback(self._background.discard)

    def _depths(self) -> dict[tuple[str, str], int]:
        depths = {}
        for worker in self._workers:
            if (remote := self._remotes.get(worker.remote_id)) is not None:
                depths[remote.name, remote.remote_id] = worker.queued
        return depths

    # --- the local application's side ----------------------------------------------------

    @unstoppable
    async def enqueue(self, remote: Remote, topic: str, payload: bytes) -> str:
        """Commit a message for ``remote`` and return its id (the frame's ``msg.id``)."""
        if not remote.is_confirmed:
            raise Conflict("The secure connection is not confirmed yet.")
        cfg = self._settings.config
        frame_size = len(payload) + len(topic) + 160
        if frame_size > cfg.server.max_frame_size:
            raise PayloadTooLarge(
                detail=f"the frame would be larger than {cfg.server.max_frame_size} bytes"
            )
        worker = self._workers.ensure(remote.remote_id)
        if worker.queued >= cfg.outbox.max_queued:
            raise TooManyRequests(
                f"The outbox for this remote is full ({cfg.outbox.max_queued} messages queued).",
                error_id="api.remote_cluster.outbox_full.app_error",
                headers={"Retry-After": str(max(1, round(cfg.outbox.retry_base * 4)))},
            )
        msg_id, now = new_id(), now_ms()
        worker.queued += 1
        try:
            await self._writer.write(
                "INSERT INTO outbox (msg_id, remote_id, topic, payload, create_at, update_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (msg_id, remote.remote_id, topic, payload, now, now),
            )
        except BaseException:
            worker.queued -= 1
            raise
        worker.work.set()
        self._metrics.outbox_messages.labels("queued").inc()
        if (current := self._remotes.get(remote.remote_id)) is None or current.is_deleted:
            await self._bury_all(remote.remote_id, "the remote was deleted")  # while committing
        return msg_id

    async def status(self, remote_id: str, msg_id: str) -> dict[str, Any]:
        """The message's state for the status endpoint (404 when unknown)."""
        row = await self._db.fetchone(
            "SELECT msg_id, topic, state, attempts, response, last_error FROM outbox "
            "WHERE msg_id = ? AND remote_id = ?",
            (msg_id, remote_id),
        )
        if row is None:
            raise NotFound("Message not found.", error_id="api.remote_cluster.msg_not_found")
        doc = {"id": row["msg_id"]} | {k: row[k] for k in row.keys()[1:]}
        doc.update(self._pending.get(msg_id, {}))
        response = doc["response"]
        doc["response"] = msgspec.Raw(response) if response else None
        return doc

    async def recent(self, remote_id: str, state: str, limit: int) -> list[dict[str, Any]]:
        """The most recent messages for a remote, optionally of one state."""
        rows = await self._db.fetchall(
            "SELECT msg_id, topic, state, attempts, last_error, create_at, update_at FROM outbox "
            "WHERE remote_id = ? AND (? = '' OR state = ?) ORDER BY seq DESC LIMIT ?",
            (remote_id, state, state, limit),
        )
        docs = [{"id": row["msg_id"]} | {k: row[k] for k in row.keys()[1:]} for row in rows]
        for doc in docs:
            doc.update(self._pending.get(doc["id"], {}))
            doc.pop("response", None)
        return docs

    @unstoppable
    async def retry(self, remote: Remote, msg_id: str) -> dict[str, Any]:
        """Queue a dead message again, behind what is queued now, with a fresh attempt count."""
        now = now_ms()
        async with self._db.transaction() as conn:
            cursor = await conn.execute(
                "SELECT topic, payload, state FROM outbox WHERE msg_id = ? AND remote_id = ?",
                (msg_id, remote.remote_id),
            )
            row = await cursor.fetchone()
            if row is None:
                raise NotFound("Message not found.", error_id="api.remote_cluster.msg_not_found")
            if row["state"] != "dead" or msg_id in self._pending:
                raise Conflict("Only dead messages can be retried.")
            await conn.execute("DELETE FROM outbox WHERE msg_id = ?", (msg_id,))
            await conn.execute(
                "INSERT INTO outbox (msg_id, remote_id, topic, payload, create_at, update_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (msg_id, remote.remote_id, row["topic"], row["payload"], now, now),
            )
        worker = self._workers.ensure(remote.remote_id)
        worker.queued += 1
        worker.work.set()
        log.info("msg.retried", remote_id=remote.remote_id, remote_name=remote.name, msg_id=msg_id)
        return {"id": msg_id, "state": "queued"}

    # --- delivery ------------------------------------------------------------------------

    async def _run(self, worker: Worker) -> None:
        cursor = 0
        while True:
            worker.work.clear()
            try:
                page = await self._page(worker.remote_id, cursor)
            except sqlite3.Error:
                log.exception("outbox.read_failed", remote_id=worker.remote_id)
                await asyncio.sleep(1.0)
                continue
            if not page:
                await worker.work.wait()
                continue
            for message in page:
                await self._deliver(worker, message)
                cursor = message.seq

    async def _page(self, remote_id: str, after: int) -> list[_Message]:
        rows = await self._db.fetchall(
            "SELECT seq, msg_id, topic, payload, create_at, attempts, next_attempt_at, last_error "
            "FROM outbox WHERE remote_id = ? AND state = 'queued' AND seq > ? ORDER BY seq LIMIT ?",
            (remote_id, after, PAGE),
        )
        return [_Message(*row) for row in rows]

    async def _deliver(self, worker: Worker, message: _Message) -> None:
        """Send one message until it is delivered, rejected or dead."""
        frame = b""
        while True:
            remote = self._remotes.get(worker.remote_id)
            if remote is None or remote.is_deleted:
                return
            cfg = self._settings.config.outbox
            now = now_ms()
            expires = message.create_at + int(cfg.max_age * 1000)
            if (cfg.max_attempts and message.attempts >= cfg.max_attempts) or now >= expires:
                self._bury(worker, remote, message)
                return
            if message.next_attempt_at > now:
                if await worker.backoff((min(message.next_attempt_at, expires) - now) / 1000):
                    message.next_attempt_at = 0
                continue
            frame = frame or frame_bytes(
                remote.remote_id, message.msg_id, message.topic, message.create_at, message.payload
            )
            message.attempts += 1
            try:
                state, response = await send_frame(
                    self._peers, remote, frame, timeout=cfg.send_timeout
                )
            except Retry as exc:
                self._retry(remote, message, exc)
                continue
            self._finish(worker, remote, message, state, response)
            return

    def _retry(self, remote: Remote, message: _Message, exc: Retry) -> None:
        cfg = self._settings.config.outbox
        delay = backoff_delay(message.attempts, cfg.retry_base, cfg.retry_max, self._rng)
        if exc.retry_after is not None:
            delay = max(delay, min(exc.retry_after, cfg.retry_max))
        message.next_attempt_at = now_ms() + int(delay * 1000)
        message.last_error = exc.reason
        self._metrics.outbox_attempts.labels("retry").inc()
        log.log(
            logging.WARNING if message.attempts == 1 else logging.INFO,
            "msg.retry",
            remote_id=remote.remote_id,
            remote_name=remote.name,
            msg_id=message.msg_id,
            attempts=message.attempts,
            reason=exc.reason,
            retry_in_s=round(delay, 3),
        )
        self._record(
            message.msg_id,
            "UPDATE outbox SET attempts = ?, next_attempt_at = ?, last_error = ?, update_at = ? "
            "WHERE seq = ?",
            (message.attempts, message.next_attempt_at, exc.reason, now_ms(), message.seq),
            {"attempts": message.attempts, "last_error": exc.reason},
        )

    def _finish(
        self, worker: Worker, remote: Remote, message: _Message, state: str, response: PeerResponse
    ) -> None:
        last_error = response.err if state == "rejected" else ""
        raw = msgspec.json.encode(response)
        worker.queued -= 1
        self._metrics.outbox_attempts.labels("final").inc()
        self._metrics.outbox_messages.labels(state).inc()
        if state == "rejected":
            log.warning(
                "msg.rejected",
                remote_id=remote.remote_id,
                remote_name=remote.name,
                msg_id=message.msg_id,
                err=last_error,
            )
        self._record(
            message.msg_id,
            "UPDATE outbox SET state = ?, attempts = ?, last_error = ?, response = ?, "
            "update_at = ? WHERE seq = ?",
            (state, message.attempts, last_error, raw, now_ms(), message.seq),
            {
                "state": state,
                "attempts": message.attempts,
                "last_error": last_error,
                "response": raw,
            },
        )

    def _bury(self, worker: Worker, remote: Remote, message: _Message) -> None:
        worker.queued -= 1
        self._metrics.outbox_messages.labels("dead").inc()
        log.warning(
            "msg.dead",
            remote_id=remote.remote_id,
            remote_name=remote.name,
            msg_id=message.msg_id,
            attempts=message.attempts,
            last_error=message.last_error,
        )
        self._events.emit("msg.dead", remote, msg_id=message.msg_id, topic=message.topic,
                          attempts=message.attempts, last_error=message.last_error)  # fmt: skip
        self._record(
            message.msg_id,
            "UPDATE outbox SET state = 'dead', attempts = ?, update_at = ? WHERE seq = ?",
            (message.attempts, now_ms(), message.seq),
            {"state": "dead", "attempts": message.attempts},
        )

    def _record(
        self, msg_id: str, sql: str, params: tuple[Any, ...], overlay: dict[str, Any]
    ) -> None:
        """Queue an outcome for the next group commit, visible to status reads meanwhile."""
        self._pending.setdefault(msg_id, {}).update(overlay)
        committed = self._writer.write_later(sql, params)
        committed.add_done_callback(lambda _: self._forget_pending(msg_id, overlay))

    def _forget_pending(self, msg_id: str, overlay: dict[str, Any]) -> None:
        current = self._pending.get(msg_id)
        if current is not None and all(current.get(k) is v for k, v in overlay.items()):
            del self._pending[msg_id]

    async def _bury_all(self, remote_id: str, reason: str) -> None:
        changed = await self._db.execute(
            "UPDATE outbox SET state = 'dead', last_error = ?, update_at = ? "
            "WHERE remote_id = ? AND state = 'queued'",
            (reason, now_ms(), remote_id),
        )
        if changed:
            log.warning("msg.dead", remote_id=remote_id, messages=changed, last_error=reason)

    async def _prune(self) -> None:
        cutoff = now_ms() - int(self._settings.config.outbox.keep_done * 1000)
        removed = await self._db.execute(
            "DELETE FROM outbox WHERE state != 'queued' AND update_at < ?", (cutoff,)
        )
        if removed:
            log.info("outbox.pruned", removed=removed)
