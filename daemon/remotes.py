"""The remote clusters: rows of ``remote_clusters`` mirrored in memory.

Every change goes through :class:`Remotes`, which writes SQLite first and then updates its
in-memory copy, so lookups on hot paths (authentication of every transport call, the list
endpoint, the heartbeat) never touch the disk. Records are immutable :class:`Remote` values;
an update replaces the record.

Listeners registered with :meth:`Remotes.subscribe` hear about confirmations and deletions,
so the heartbeat supervisor and the event hook react without the management code knowing them.

Every write and the memory update after it run as one (:func:`~daemon.tasks.unstoppable`): a
request cancelled while SQLite commits must not leave, say, a deleted remote still
authenticating from memory.
"""

from __future__ import annotations

import dataclasses
import enum
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from daemon.ids import id_from_bytes, token_matches
from daemon.models import Remote, now_ms
from daemon.store import Database
from daemon.tasks import Unstoppable, unstoppable

log = structlog.get_logger(__name__)

_COLUMNS = tuple(f.name for f in dataclasses.fields(Remote))
# A digest no token has, so that an unknown id costs the same comparison as a wrong token.
_NO_TOKEN = "0" * 64


class Change(enum.Enum):
    """What happened to a remote, for listeners."""

    CONFIRMED = "confirmed"
    DELETED = "deleted"


Listener = Callable[[Change, Remote], None]


class AuthFailure(enum.Enum):
    """Why a transport call was refused; logged, never told to the caller."""

    MISSING_ID = "missing_id"
    UNKNOWN_REMOTE = "unknown_remote"
    DELETED_REMOTE = "deleted_remote"
    PENDING_REMOTE = "pending_remote"
    BAD_TOKEN = "bad_token"  # noqa: S105 - a reason, not a secret


class AlreadyExists(Exception):
    """A remote with this id already exists (deleted or not)."""


@dataclass(frozen=True, slots=True)
class ListFilter:
    """Mattermost's ``RemoteClusterQueryFilter`` (see the README for where we differ)."""

    exclude_offline: bool = False
    in_channel_ids: frozenset[str] | None = None
    not_in_channel_ids: frozenset[str] | None = None
    topic: str = ""
    creator_id: str = ""
    only_confirmed: bool = False
    plugin_id: str = ""
    only_plugins: bool = False
    exclude_plugins: bool = False
    include_deleted: bool = False


def _from_row(row: sqlite3.Row) -> Remote:
    values = {name: row[name] for name in _COLUMNS}
    values["accepting"] = bool(values["accepting"])
    values["online_announced"] = bool(values["online_announced"])
    return Remote(**values)


class Remotes:
    """All remote clusters, durable in SQLite and served from memory."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._by_id: dict[str, Remote] = {}
        self._listeners: list[Listener] = []
        self._liveness_dirty: set[str] = set()
        self.liveness_transactions = 0
        self.finishing = Unstoppable()

    async def stop(self) -> None:
        """Wait for writes whose caller was cancelled (before the store closes)."""
        await self.finishing.wait()

    async def load(self) -> None:
        """Load every row; drop remotes whose accept was cut short by a crash.

        Such a row was written before the confirm call to the inviter and its outcome is
        unknown; keeping it would block the operator's retry of the same invite.
        """
        for row in await self._db.fetchall(
            "SELECT remote_id, name FROM remote_clusters WHERE accepting = 1"
        ):
            await self.remove(row["remote_id"])
            log.warning(
                "remote.accept_abandoned",
                remote_id=row["remote_id"],
                remote_name=row["name"],
                reason="the daemon stopped while confirming the invite; accept it again",
            )
        rows = await self._db.fetchall("SELECT * FROM remote_clusters")
        self._by_id = {row["remote_id"]: _from_row(row) for row in rows}

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(change, remote)`` after every confirmation and deletion."""
        self._listeners.append(listener)

    def _notify(self, change: Change, remote: Remote) -> None:
        for listener in self._listeners:
            try:
                listener(change, remote)
            except Exception:
                log.exception("remote.listener_failed", change=change.value)

    def get(self, remote_id: str) -> Remote | None:
        """Return the remote with this id, deleted ones included."""
        return self._by_id.get(remote_id)

    def all(self) -> list[Remote]:
        """Return every remote, deleted ones included."""
        return list(self._by_id.values())

    def authenticate(
        self, remote_id: str, token: str, *, allow_pending: bool
    ) -> tuple[Remote | None, AuthFailure | None]:
        """Check transport credentials in constant time; return the remote or why not."""
        remote = self._by_id.get(remote_id) if remote_id else None
        ok = token_matches(token, remote.token_sha256 if remote else _NO_TOKEN)
        if not remote_id:
            return None, AuthFailure.MISSING_ID
        if remote is None:
            return None, AuthFailure.UNKNOWN_REMOTE
        if remote.is_deleted:
            return None, AuthFailure.DELETED_REMOTE
        if not ok:
            return None, AuthFailure.BAD_TOKEN
        if remote.is_pending and not allow_pending:
            return None, AuthFailure.PENDING_REMOTE
        return remote, None

    def query(self, flt: ListFilter, *, offline_after_ms: int) -> list[Remote]:
        """Filter and order (display name, then name) as Mattermost's store does."""
        now = now_ms()
        padded_topic = f" {flt.topic} "
        result = []
        for rc in self._by_id.values():
            if (
                (rc.is_deleted and not flt.include_deleted)
                or (flt.exclude_offline and not rc.is_online(now, offline_after_ms))
                or (flt.in_channel_ids is not None and rc.remote_id not in flt.in_channel_ids)
                or (flt.not_in_channel_ids is not None and rc.remote_id in flt.not_in_channel_ids)
                or (flt.topic and not (rc.topics == "*" or padded_topic in rc.topics))
                or (flt.creator_id and rc.creator_id != flt.creator_id)
                or (flt.only_confirmed and not rc.is_confirmed)
                or (flt.plugin_id and rc.plugin_id != flt.plugin_id)
                or (flt.only_plugins and not rc.plugin_id)
                or (flt.exclude_plugins and rc.plugin_id)
            ):
                continue
            result.append(rc)
        result.sort(key=lambda rc: (rc.display_name, rc.name))
        return result

    @unstoppable
    async def add(self, remote: Remote) -> None:
        """Insert a new remote; :class:`AlreadyExists` when its id is taken."""
        placeholders = ", ".join("?" for _ in _COLUMNS)
        try:
            await self._db.execute(
                f"INSERT INTO remote_clusters ({', '.join(_COLUMNS)}) VALUES ({placeholders})",  # noqa: S608
                [getattr(remote, name) for name in _COLUMNS],
            )
        except sqlite3.IntegrityError:
            raise AlreadyExists(remote.remote_id) from None
        self._by_id[remote.remote_id] = remote

    @unstoppable
    async def update(self, remote_id: str, /, **changes: object) -> Remote | None:
        """Change some columns of a remote that is not deleted; ``None`` if it is (or is gone).

        The in-memory record is read again after the write: whatever changed it meanwhile
        (a deletion, a ping) must not be overwritten by a copy taken before.
        """
        assignments = ", ".join(f"{name} = ?" for name in changes)
        changed = await self._db.execute(
            f"UPDATE remote_clusters SET {assignments} WHERE remote_id = ? AND delete_at = 0",  # noqa: S608
            [*changes.values(), remote_id],
        )
        current = self._by_id.get(remote_id)
        if changed != 1 or current is None:
            return None
        updated = dataclasses.replace(current, **changes)  # type: ignore[arg-type]
        self._by_id[remote_id] = updated
        return updated

    @unstoppable
    async def confirm(
        self,
        remote_id: str,
        *,
        expected_token_sha256: str,
        site_url: str,
        remote_token: str,
        token_sha256: str,
    ) -> Remote | None:
        """Confirm a pending remote once; ``None`` when it is no longer pending with that token.

        The check and the change are one conditional UPDATE, so of two concurrent
        confirmations exactly one succeeds.
        """
        changed = await self._db.execute(
            "UPDATE remote_clusters SET site_url = ?, remote_token = ?, token_sha256 = ? "
            "WHERE remote_id = ? AND delete_at = 0 AND token_sha256 = ? "
            "AND site_url LIKE 'pending\\_%' ESCAPE '\\'",
            [site_url, remote_token, token_sha256, remote_id, expected_token_sha256],
        )
        if changed != 1:
            return None
        remote = dataclasses.replace(
            self._by_id[remote_id],
            site_url=site_url,
            remote_token=remote_token,
            token_sha256=token_sha256,
        )
        self._by_id[remote_id] = remote
        self._notify(Change.CONFIRMED, remote)
        return remote

    @unstoppable
    async def reissue_invite_token(self, remote_id: str, token_sha256: str) -> bool:
        """Replace a pending remote's invite token; false if it is no longer pending."""
        changed = await self._db.execute(
            "UPDATE remote_clusters SET token_sha256 = ? WHERE remote_id = ? AND delete_at = 0 "
            "AND site_url LIKE 'pending\\_%' ESCAPE '\\'",
            [token_sha256, remote_id],
        )
        if changed == 1:
            self._by_id[remote_id] = dataclasses.replace(
                self._by_id[remote_id], token_sha256=token_sha256
            )
        return changed == 1

    async def finish_accept(self, remote_id: str) -> Remote | None:
        """Mark an accepted remote as linked once the inviter confirmed it (``None``: deleted)."""
        remote = await self.update(remote_id, accepting=False)
        if remote is not None:
            self._notify(Change.CONFIRMED, remote)
        return remote

    @unstoppable
    async def remove(self, remote_id: str) -> None:
        """Delete a remote's rows for good (only for an accept that did not complete)."""
        async with self._db.transaction() as conn:
            await conn.execute(
                "DELETE FROM shared_channel_remotes WHERE remote_id = ?", [remote_id]
            )
            await conn.execute("DELETE FROM remote_clusters WHERE remote_id = ?", [remote_id])
        self._by_id.pop(remote_id, None)

    @unstoppable
    async def soft_delete(self, remote_id: str) -> Remote | None:
        """Mark a remote and its shared channels deleted; ``None`` if absent or already so."""
        now = now_ms()
        async with self._db.transaction() as conn:
            cursor = await conn.execute(
                "UPDATE remote_clusters SET delete_at = ? WHERE remote_id = ? AND delete_at = 0",
                [now, remote_id],
            )
            if cursor.rowcount != 1:
                return None
            await conn.execute(
                "UPDATE shared_channel_remotes SET update_at = ?, delete_at = ? "
                "WHERE remote_id = ? AND delete_at = 0",
                [now, now, remote_id],
            )
        remote = dataclasses.replace(self._by_id[remote_id], delete_at=now)
        self._by_id[remote_id] = remote
        self._notify(Change.DELETED, remote)
        return remote

    def set_liveness(
        self, remote_id: str, *, last_ping_at: int | None = None, online: bool | None = None
    ) -> Remote | None:
        """Record a successful ping time and/or the announced liveness, in memory only.

        The change is written by the next :meth:`flush_liveness`, batched with every other
        remote's, so thousands of pings cost one transaction per flush, not one each.
        """
        remote = self._by_id.get(remote_id)
        if remote is None or remote.is_deleted:
            return None
        remote = dataclasses.replace(
            remote,
            last_ping_at=remote.last_ping_at if last_ping_at is None else last_ping_at,
            online_announced=remote.online_announced if online is None else online,
        )
        self._by_id[remote_id] = remote
        self._liveness_dirty.add(remote_id)
        return remote

    async def flush_liveness(self) -> int:
        """Write every pending liveness change in one transaction; return how many rows."""
        if not self._liveness_dirty:
            return 0
        dirty, self._liveness_dirty = self._liveness_dirty, set()
        rows = [
            (r.last_ping_at, int(r.online_announced), r.remote_id)
            for rid in dirty
            if (r := self._by_id.get(rid)) is not None
        ]
        try:
            await self._db.executemany(
                "UPDATE remote_clusters SET last_ping_at = ?, online_announced = ? "
                "WHERE remote_id = ?",
                rows,
            )
        except BaseException:
            self._liveness_dirty |= dirty  # written by the next flush
            raise
        self.liveness_transactions += 1
        return len(rows)

    async def share_channel(self, remote_id: str, channel_id: str) -> None:
        """Record that ``channel_id`` is shared with the remote (again, if it was unshared)."""
        now = now_ms()
        await self._db.execute(
            "INSERT INTO shared_channel_remotes (channel_id, remote_id, create_at, update_at) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (channel_id, remote_id) "
            "DO UPDATE SET update_at = excluded.update_at, delete_at = 0",
            [channel_id, remote_id, now, now],
        )

    async def unshare_channel(self, remote_id: str, channel_id: str) -> bool:
        """Mark the channel no longer shared with the remote; false if it was not shared."""
        now = now_ms()
        changed = await self._db.execute(
            "UPDATE shared_channel_remotes SET update_at = ?, delete_at = ? "
            "WHERE channel_id = ? AND remote_id = ? AND delete_at = 0",
            [now, now, channel_id, remote_id],
        )
        return changed == 1

    async def remotes_in_channel(self, channel_id: str) -> frozenset[str]:
        """Ids of the remotes the channel is currently shared with."""
        rows = await self._db.fetchall(
            "SELECT remote_id FROM shared_channel_remotes WHERE channel_id = ? AND delete_at = 0",
            [channel_id],
        )
        return frozenset(row["remote_id"] for row in rows)

    async def shared_channels(self, remote_id: str) -> list[dict[str, object]]:
        """The channels shared with a remote, as ``SharedChannelRemote``-like records."""
        rows = await self._db.fetchall(
            "SELECT channel_id, remote_id, create_at, update_at, delete_at "
            "FROM shared_channel_remotes WHERE remote_id = ? AND delete_at = 0 "
            "ORDER BY create_at, channel_id",
            [remote_id],
        )
        return [dict(row) for row in rows]


def creator_id_for(operator_name: str) -> str:
    """A stable 26-character creator id for an operator named in the config."""
    return id_from_bytes(f"operator:{operator_name}".encode())
