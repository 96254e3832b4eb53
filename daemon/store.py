"""The embedded store: one aiosqlite connection to one SQLite file in WAL mode.

Every statement goes through one :class:`asyncio.Lock`, so a read can never observe another
task's half-done transaction on the shared connection, and multi-statement writes run inside
``BEGIN IMMEDIATE … COMMIT`` (:meth:`Database.transaction`). Transactions never await anything
but the database: no network call happens while the lock is held.

``synchronous=FULL``: a commit is on disk before the daemon acknowledges what it recorded
(a queued message, an upload offset), even across a power loss.

The schema is versioned with ``PRAGMA user_version``; :data:`daemon.migrations.MIGRATIONS` is
append-only and each step runs in its own transaction at start-up, before the listener opens.
A database newer than the code is refused.

:class:`GroupCommit` lets many tasks share one transaction (and one fsync): what is queued
while a commit is on disk goes into the next one, so durable acknowledgements scale with
concurrency instead of costing a disk flush each.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
import structlog

from daemon.errors import StoreError
from daemon.migrations import MIGRATIONS

log = structlog.get_logger(__name__)

DB_FILE = "remoteclusterd.db"
RETRY_PAUSE = 1.0  # seconds before a failed group commit is tried again
# SQLITE_BUSY, _LOCKED, _NOMEM, _READONLY, _IOERR, _FULL, _CANTOPEN, _PROTOCOL
_TRANSIENT_CODES = frozenset({5, 6, 7, 8, 10, 13, 14, 15})
Params = Sequence[Any] | dict[str, Any]


class Database:
    """The daemon's single SQLite connection with serialised access."""

    def __init__(self, conn: aiosqlite.Connection, path: Path) -> None:
        self._conn = conn
        self._lock = asyncio.Lock()
        self.path = path

    @classmethod
    async def open(cls, data_dir: Path) -> Database:
        """Create ``data_dir`` (0700) and the database file (0600) if needed, then migrate."""
        path = data_dir / DB_FILE
        await asyncio.to_thread(_prepare_files, data_dir, path)
        conn = await aiosqlite.connect(path, isolation_level=None, timeout=5.0)
        try:
            conn.row_factory = sqlite3.Row
            for pragma in (
                "PRAGMA journal_mode=WAL",
                "PRAGMA synchronous=FULL",
                "PRAGMA foreign_keys=ON",
            ):
                await conn.execute(pragma)
            db = cls(conn, path)
            await db._migrate()
        except BaseException:
            await conn.close()
            raise
        return db

    @property
    def total_changes(self) -> int:
        """Rows changed through this connection since it opened (a write counter)."""
        return self._conn.total_changes

    async def close(self) -> None:
        """Close the connection; waits for the statement in progress."""
        async with self._lock:
            await self._conn.close()

    async def _migrate(self) -> None:
        version = await self.scalar("PRAGMA user_version")
        if version > len(MIGRATIONS):
            raise StoreError(
                f"the database schema is version {version}, newer than this daemon "
                f"knows ({len(MIGRATIONS)}); refusing to start"
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            async with self.transaction() as conn:
                for statement in _split(script):
                    await conn.execute(statement)
                await conn.execute(f"PRAGMA user_version = {number}")
            log.info("store.migrated", version=number)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """Run the block in ``BEGIN IMMEDIATE … COMMIT``; roll back if anything raises.

        Cancellation can strike at any ``await``, also while ``BEGIN`` or ``COMMIT`` runs in
        the database thread; the rollback is then queued behind it before the lock is let go,
        so the connection is never handed on with a transaction open.
        """
        async with self._lock:
            try:
                await self._conn.execute("BEGIN IMMEDIATE")
                yield self._conn
                await self._conn.execute("COMMIT")
            except BaseException:
                await self._rollback()
                raise

    async def _rollback(self) -> None:
        """Roll back, never raising: the exception being handled is the one that counts.

        (A rollback that raised would replace it; had it been a cancellation, the cancelled
        task would carry on as if nothing happened.)
        """
        rollback = asyncio.ensure_future(self._conn.execute("ROLLBACK"))
        while not rollback.done():
            with contextlib.suppress(asyncio.CancelledError, sqlite3.Error):
                await asyncio.shield(rollback)
        with contextlib.suppress(asyncio.CancelledError, sqlite3.Error):
            rollback.result()  # "no transaction is active" when COMMIT got through

    async def execute(self, sql: str, params: Params = ()) -> int:
        """Run one statement (its own transaction) and return the number of rows changed."""
        async with self._lock, self._conn.execute(sql, params) as cursor:
            return cursor.rowcount

    async def executemany(self, sql: str, rows: Iterable[Params]) -> None:
        """Run one statement for many parameter rows in one transaction."""
        async with self.transaction() as conn:
            await conn.executemany(sql, rows)

    async def fetchall(self, sql: str, params: Params = ()) -> list[sqlite3.Row]:
        """Run a query and return every row (one trip to the database thread)."""
        async with self._lock:
            return list(await self._conn.execute_fetchall(sql, params))

    async def fetchone(self, sql: str, params: Params = ()) -> sqlite3.Row | None:
        """Run a query and return its first row, if any."""
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    async def scalar(self, sql: str, params: Params = ()) -> Any:
        """Run a query and return the first column of its first row."""
        row = await self.fetchone(sql, params)
        return None if row is None else row[0]


@dataclass(slots=True)
class _Item:
    sql: str | None  # None: a marker for flush()
    params: Params
    future: asyncio.Future[None]
    keep: bool  # a write_later: kept and tried again when its batch fails


class GroupCommit:
    """Group commit for single statements.

    ``await write(sql, params)`` returns once a transaction holding the statement committed
    (use it before acknowledging anything); if its batch fails, it raises and the caller
    acknowledges nothing. ``write_later`` queues without waiting, for bookkeeping whose
    outcome is already acted on (a message marked delivered); it returns a future that
    completes at the commit. Statements commit in the order they were queued.

    When the disk fails (full, I/O error), a batch fails its awaited statements but keeps its
    ``write_later`` ones, which are tried again, ahead of newer ones, after
    :data:`RETRY_PAUSE`: bookkeeping is never silently dropped while the daemon runs. Only
    :meth:`stop` gives up on them (logged); a restart then redoes that work. When a statement
    itself is at fault (a bug), the batch is committed statement by statement so that only
    that one fails.
    """

    def __init__(self, db: Database, *, max_batch: int = 2000) -> None:
        self._db = db
        self._max_batch = max_batch
        self._queue: list[_Item] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.commits = 0

    def start(self) -> None:
        """Start the committing task."""
        self._task = asyncio.create_task(self._run(), name="store.group_commit")

    async def stop(self) -> None:
        """Commit everything queued (one try), then stop."""
        self._stopping = True
        try:
            await self.flush()
        finally:
            if self._task is not None:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task

    async def write(self, sql: str, params: Params = ()) -> None:
        """Queue a statement and wait until it is committed."""
        await self._queued(sql, params, keep=False)

    def write_later(self, sql: str, params: Params = ()) -> asyncio.Future[None]:
        """Queue a statement; the returned future completes when it is committed."""
        return self._queued(sql, params, keep=True)

    def _queued(self, sql: str | None, params: Params, *, keep: bool) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Item(sql, params, future, keep))
        self._wakeup.set()
        return future

    async def flush(self) -> None:
        """Wait until everything queued so far is committed (or failed)."""
        future = self._queued(None, (), keep=False)
        if self._task is None or self._task.done():
            await self._commit_all()
        await future

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if not await self._commit_all():
                await asyncio.sleep(RETRY_PAUSE)
                self._wakeup.set()

    async def _commit_all(self) -> bool:
        """Commit what is queued, batch by batch; False after a failure of the disk."""
        while self._queue:
            batch = self._queue[: self._max_batch]
            del self._queue[: self._max_batch]
            failure = await self._try(batch)
            if failure is not None and not _transient(failure) and len(batch) > 1:
                # A statement is at fault, not the disk: each alone, so that it fails alone.
                for index, item in enumerate(batch):
                    failure = await self._try([item])
                    if failure is not None and _transient(failure):
                        self._give_back(batch[index:], failure)
                        return False
                    if failure is not None:
                        self._fail([item], failure)
            elif failure is not None and _transient(failure):
                self._give_back(batch, failure)
                return False
            elif failure is not None:
                self._fail(batch, failure)
        return True

    async def _try(self, batch: list[_Item]) -> Exception | None:
        """Commit ``batch`` in one transaction; the exception if that failed."""
        try:
            async with self._db.transaction() as conn:
                for sql, rows in _grouped(batch):
                    await conn.executemany(sql, rows)
        except Exception as exc:
            return exc
        self.commits += 1
        for item in batch:
            if not item.future.done():
                item.future.set_result(None)
        return None

    def _give_back(self, batch: list[_Item], exc: Exception) -> None:
        """The disk failed: keep the ``write_later`` statements, ahead of newer ones."""
        kept = [item for item in batch if item.keep and not self._stopping]
        self._fail([item for item in batch if not item.keep or self._stopping], exc)
        self._queue[:0] = kept
        log.error("store.commit_failed", error=str(exc), kept=len(kept),
                  retry_in_s=RETRY_PAUSE)  # fmt: skip

    @staticmethod
    def _fail(batch: list[_Item], exc: Exception) -> None:
        statements = [item for item in batch if not item.future.done()]
        for item in statements:
            item.future.set_exception(exc)
            item.future.exception()  # a write_later nobody awaits must not warn
        if statements:
            log.error("store.statements_failed", error=str(exc), statements=len(statements))


def _transient(exc: Exception) -> bool:
    """Whether a failure is the disk's or the file's (worth another try), not a statement's."""
    code = getattr(exc, "sqlite_errorcode", None)
    return (
        isinstance(exc, sqlite3.OperationalError)
        and code is not None
        and (code & 0xFF in _TRANSIENT_CODES)
    )


def _grouped(batch: list[_Item]) -> list[tuple[str, list[Params]]]:
    """Runs of the same statement, in order, so each run is one ``executemany``."""
    groups: list[tuple[str, list[Params]]] = []
    for item in batch:
        if item.sql is None:
            continue
        if groups and groups[-1][0] == item.sql:
            groups[-1][1].append(item.params)
        else:
            groups.append((item.sql, [item.params]))
    return groups


def _prepare_files(data_dir: Path, path: Path) -> None:
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Create the file with a private mode before SQLite does; its -wal and -shm files
    # inherit the database file's permissions.
    os.close(os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600))


def _split(script: str) -> list[str]:
    """Split a migration script into statements (migrations contain no ``;`` in literals)."""
    return [part.strip() for part in script.split(";") if part.strip()]
