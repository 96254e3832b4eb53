"""The store: safe file modes, versioned migrations, and start-up clean-up."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import stat
from pathlib import Path

import pytest

from daemon.errors import StoreError
from daemon.ids import hash_token, new_id
from daemon.migrations import MIGRATIONS
from daemon.models import Remote, now_ms
from daemon.remotes import Remotes
from daemon.store import DB_FILE, Database
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
