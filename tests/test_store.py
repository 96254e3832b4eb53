"""The store: safe file modes, versioned migrations, and start-up clean-up."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from daemon import store
from daemon.errors import StoreError
from daemon.ids import hash_token, new_id
from daemon.migrations import MIGRATIONS
from daemon.models import Remote, now_ms
from daemon.remotes import Remotes
from daemon.store import DB_FILE, Database, GroupCommit
from tests.helpers import DaemonProcess


async def test_creates_private_files_and_migrates(tmp_path: Path) -> None:
    data_dir = tmp_path / "state"
    db = await Database.open(data_dir)
    try:
        assert await db.scalar("PRAGMA user_version") == len(MIGRATIONS)
        assert await db.scalar("PRAGMA journal_mode") == "wal"
    finally:
        await db.close()
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    for path in data_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    # Opening again runs no migration twice.
    db = await Database.open(data_dir)
    await db.close()


async def test_refuses_a_newer_schema(tmp_path: Path) -> None:
    data_dir = tmp_path / "state"
    await (await Database.open(data_dir)).close()
    conn = sqlite3.connect(data_dir / DB_FILE)
    conn.execute("PRAGMA user_version = 999")
    conn.close()
    with pytest.raises(StoreError, match="newer than this daemon"):
        await Database.open(data_dir)


async def test_daemon_with_newer_schema_exits_1(tmp_path: Path) -> None:
    proc = DaemonProcess(tmp_path, "a")
    proc.data_dir.mkdir(parents=True)
    conn = sqlite3.connect(proc.data_dir / DB_FILE)
    conn.execute("PRAGMA user_version = 999")
    conn.close()
    await proc.start(wait=False)
    assert await proc.wait_exit() == 1
    assert "daemon.start_failed" in proc.logs() and "Traceback" not in proc.logs()


async def test_half_made_accept_is_removed_at_start(tmp_path: Path) -> None:
    """A remote still marked `accepting` (a crash mid-confirm) is gone after a restart."""
    db = await Database.open(tmp_path)
    try:
        remotes = Remotes(db)
        await remotes.load()
        keep, drop = new_id(), new_id()
        for rid, accepting in ((keep, False), (drop, True)):
            await remotes.add(
                Remote(
                    remote_id=rid, name=rid[:5], display_name="x", site_url="http://x",
                    default_team_id="", create_at=now_ms(), creator_id=new_id(),
                    token_sha256=hash_token(new_id()), accepting=accepting,
                )
            )  # fmt: skip
        await remotes.share_channel(drop, new_id())
        reloaded = Remotes(db)
        await reloaded.load()
        assert [r.remote_id for r in reloaded.all()] == [keep]
        assert await db.scalar("SELECT count(*) FROM shared_channel_remotes") == 0
    finally:
        await db.close()


@pytest.mark.parametrize("delete_first", [True, False])
async def test_concurrent_patch_and_delete_agree_with_the_store(
    tmp_path: Path, delete_first: bool
) -> None:
    """Memory and disk agree however a patch and a deletion interleave; deleted stays deleted."""
    db = await Database.open(tmp_path)
    try:
        remotes = Remotes(db)
        await remotes.load()
        rid, token = new_id(), new_id()
        await remotes.add(
            Remote(
                remote_id=rid, name="a", display_name="a", site_url="http://x",
                default_team_id="", create_at=now_ms(), creator_id=new_id(),
                token_sha256=hash_token(token),
            )
        )  # fmt: skip
        delete = lambda: remotes.soft_delete(rid)  # noqa: E731
        patch = lambda: remotes.update(rid, display_name="b")  # noqa: E731
        # Tasks start in creation order: the first takes the store's lock, the second waits.
        first, second = (delete, patch) if delete_first else (patch, delete)
        done = await asyncio.gather(asyncio.create_task(first()), asyncio.create_task(second()))
        patched = done[1] if delete_first else done[0]
        row = await db.fetchone(
            "SELECT delete_at, display_name FROM remote_clusters WHERE remote_id = ?", (rid,)
        )
        assert row is not None and row["delete_at"] > 0
        remote = remotes.get(rid)
        assert remote is not None
        assert (remote.delete_at, remote.display_name) == (row["delete_at"], row["display_name"])
        assert (patched is None) == delete_first
        assert remotes.authenticate(rid, token, allow_pending=False)[0] is None
    finally:
        await db.close()


async def test_group_commit_keeps_bookkeeping_through_a_disk_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed commit fails the awaited statements, keeps and retries the write_later ones."""
    monkeypatch.setattr(store, "RETRY_PAUSE", 0.01)
    db = await Database.open(tmp_path)
    writer = GroupCommit(db)
    original = db.transaction
    failures = [1]

    @contextlib.asynccontextmanager
    async def flaky() -> AsyncIterator[Any]:
        if failures:
            failures.pop()
            error = sqlite3.OperationalError("disk I/O error")
            error.sqlite_errorcode = 10  # type: ignore[attr-defined]  # SQLITE_IOERR
            raise error
        async with original() as conn:
            yield conn

    try:
        await db.execute("CREATE TABLE t (x INTEGER PRIMARY KEY)")
        monkeypatch.setattr(db, "transaction", flaky)
        later = writer.write_later("INSERT INTO t VALUES (1)")
        awaited = asyncio.ensure_future(writer.write("INSERT INTO t VALUES (2)"))
        writer.start()
        with pytest.raises(sqlite3.OperationalError):
            await awaited  # not acknowledged: the caller knows
        await asyncio.wait_for(later, timeout=5)  # committed on the next try
        assert [r[0] for r in await db.fetchall("SELECT x FROM t")] == [1]
        # A statement at fault fails alone; the rest of its batch commits.
        good = writer.write_later("INSERT INTO t VALUES (3)")
        bad = writer.write_later("INSERT INTO no_such_table VALUES (1)")
        await asyncio.wait_for(good, timeout=5)
        with pytest.raises(sqlite3.OperationalError):
            await bad
        assert [r[0] for r in await db.fetchall("SELECT x FROM t ORDER BY x")] == [1, 3]
    finally:
        await writer.stop()
        await db.close()


@pytest.mark.parametrize("steps", range(0, 40, 3))
async def test_a_cancelled_deletion_or_confirmation_leaves_memory_and_disk_agreeing(
    tmp_path: Path, steps: int
) -> None:
    """Cancelled at any point (a client gone, the shutdown grace over), a remote's write and
    its in-memory update happen together: a deleted remote never goes on authenticating."""
    db = await Database.open(tmp_path)
    try:
        remotes = Remotes(db)
        await remotes.load()
        rid, pending_id, token, refreshed = new_id(), new_id(), new_id(), new_id()
        for remote_id, site_url in ((rid, "http://x"), (pending_id, "pending_" + pending_id)):
            await remotes.add(
                Remote(
                    remote_id=remote_id, name="a", display_name="a", site_url=site_url,
                    default_team_id="", create_at=now_ms(), creator_id=new_id(),
                    token_sha256=hash_token(token),
                )
            )  # fmt: skip
        tasks = [
            asyncio.ensure_future(remotes.soft_delete(rid)),
            asyncio.ensure_future(
                remotes.confirm(pending_id, expected_token_sha256=hash_token(token),
                                site_url="http://y", remote_token=new_id(),
                                token_sha256=hash_token(refreshed))
            ),
        ]  # fmt: skip
        for _ in range(steps):
            await asyncio.sleep(0)  # let the writes get this far
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await remotes.stop()  # what was cut off has finished
        rows = {
            row["remote_id"]: row
            for row in await db.fetchall(
                "SELECT remote_id, delete_at, site_url FROM remote_clusters"
            )
        }
        deleted, confirmed = remotes.get(rid), remotes.get(pending_id)
        assert deleted is not None and confirmed is not None
        assert deleted.delete_at == rows[rid]["delete_at"]
        assert confirmed.site_url == rows[pending_id]["site_url"]
        if deleted.is_deleted:
            assert remotes.authenticate(rid, token, allow_pending=False)[0] is None
        if not confirmed.is_pending:
            assert remotes.authenticate(pending_id, refreshed, allow_pending=False)[0] is not None
    finally:
        await db.close()


@pytest.mark.parametrize("steps", range(16))
async def test_a_cancelled_transaction_never_leaves_one_open(tmp_path: Path, steps: int) -> None:
    """Cancelled at any point (also while BEGIN or COMMIT runs), the next transaction works."""
    db = await Database.open(tmp_path)
    try:

        async def write() -> None:
            async with db.transaction() as conn:
                await conn.execute("INSERT INTO inbox VALUES ('r', 'm', 't', 'OK', '', x'', 1)")

        task = asyncio.create_task(write())
        for _ in range(steps):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        async with db.transaction() as conn:
            await conn.execute("DELETE FROM inbox")
        assert await db.scalar("SELECT count(*) FROM inbox") == 0
    finally:
        await db.close()


async def test_cancelled_during_commit_stays_cancelled(tmp_path: Path) -> None:
    """A cancellation that lands while COMMIT runs is not swallowed by the failing rollback."""
    db = await Database.open(tmp_path)
    try:
        for steps in range(16):
            entered = asyncio.Event()

            async def write(entered: asyncio.Event) -> None:
                async with db.transaction() as conn:
                    await conn.execute("DELETE FROM inbox")
                    entered.set()

            task = asyncio.create_task(write(entered))
            await entered.wait()
            for _ in range(steps):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert task.cancelled() or task.exception() is None
    finally:
        await db.close()
