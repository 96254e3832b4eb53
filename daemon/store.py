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
from pathlib import Path
from typing import Any

import aiosqlite
import structlog

from daemon.errors import StoreError
from daemon.migrations import MIGRATIONS

log = structlog.get_logger(__name__)

DB_FILE = "remoteclusterd.db"
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


_Item = tuple[str | None, Params, "asyncio.Future[None] | None"]


class GroupCommit:
    """Group commit for single statements.

    ``await write(sql, params)`` returns once a transaction holding the statement committed
    (use it before acknowledging anything). ``write_later`` queues without waiting, for
    bookkeeping that is safe to redo after a crash; it returns a future that completes at the
    commit. Statements commit in the order they were queued. A failed batch fails the futures
    of its statements; a failed ``write_later`` is logged.
    """

    def __init__(self, db: Database, *, max_batch: int = 2000) -> None:
        self._db = db
        self._max_batch = max_batch
        self._queue: list[_Item] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.commits = 0

    def start(self) -> None:
        """Start the committing task."""
        self._task = asyncio.create_task(self._run(), name="store.group_commit")

    async def stop(self) -> None:
        """Commit everything queued, then stop."""
        await self.flush()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def write(self, sql: str, params: Params = ()) -> None:
        """Queue a statement and wait until it is committed."""
        await self.write_later(sql, params)

    def write_later(self, sql: str, params: Params = ()) -> asyncio.Future[None]:
        """Queue a statement; the returned future completes when it is committed."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((sql, params, future))
        self._wakeup.set()
        return future

    async def flush(self) -> None:
        """Wait until everything queued so far is committed (or failed)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((None, (), future))
        self._wakeup.set()
        if self._task is None or self._task.done():
            await self._commit_all()
        await future

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await self._commit_all()

    async def _commit_all(self) -> None:
        while self._queue:
            batch = self._queue[: self._max_batch]
            del self._queue[: self._max_batch]
            try:
                async with self._db.transaction() as conn:
                    for sql, rows in _grouped(batch):
                        await conn.executemany(sql, rows)
            except Exception as exc:
                log.exception("store.group_commit_failed", error=str(exc), statements=len(batch))
                for _, _, future in batch:
                    if future is not None and not future.done():
                        future.set_exception(exc)
                        future.exception()  # a write_later nobody awaits must not warn
                continue
            self.commits += 1
            for _, _, future in batch:
                if future is not None and not future.done():
                    future.set_result(None)


def _grouped(batch: list[_Item]) -> list[tuple[str, list[Params]]]:
    """Runs of the same statement, in order, so each run is one ``executemany``."""
    groups: list[tuple[str, list[Params]]] = []
    for sql, params, _ in batch:
        if sql is None:
            continue
        if groups and groups[-1][0] == sql:
            groups[-1][1].append(params)
        else:
            groups.append((sql, [params]))
    return groups


def _prepare_files(data_dir: Path, path: Path) -> None:
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Create the file with a private mode before SQLite does; its -wal and -shm files
    # inherit the database file's permissions.
    os.close(os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600))


def _split(script: str) -> list[str]:
    """Split a migration script into statements (migrations contain no ``;`` in literals)."""
    return [part.strip() for part in script.split(";") if part.strip()]
