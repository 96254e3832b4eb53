"""Opening upload sessions: the built-in ``sharedchannel_upload`` topic.

A peer opens a session with a ``sharedchannel_upload`` message carrying Mattermost's
``UploadSession``. The sender's session id and ``req_file_id`` are kept and the session is
bound to that remote; it is checked as Mattermost checks it, ``file_size`` against
``uploads.max_file_size``, and the free disk space minus what open sessions may still write
must stay above ``uploads.min_free_bytes``. When a ``[[topics]]`` route for
``sharedchannel_upload`` exists, the local application approves (2xx) or refuses (4xx) each
session first. The answer's payload is the session as saved (Mattermost's answer); opening
the same session again answers the same.
"""

from __future__ import annotations

import asyncio

import msgspec
import structlog

from daemon.filemodels import Session, UploadSession, check_upload_session
from daemon.filestore import FileStore
from daemon.ids import new_id
from daemon.inbound import Inbound
from daemon.metrics import Metrics
from daemon.models import UPLOAD_TOPIC, Msg, PeerResponse, Remote, now_ms
from daemon.settings import Settings
from daemon.store import Database
from daemon.uploads import Uploads

log = structlog.get_logger(__name__)

NULL = msgspec.Raw(b"null")


def _refuse(reason: str) -> PeerResponse:
    return PeerResponse(status="FAIL", err=reason, payload=NULL)


def _accepted(session: Session) -> PeerResponse:
    payload = msgspec.Raw(msgspec.json.encode(session.wire()))
    return PeerResponse(status="OK", err="", payload=payload)


class UploadSessions:
    """Handles ``sharedchannel_upload`` messages for the inbound router."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        store: FileStore,
        metrics: Metrics,
        inbound: Inbound,
        uploads: Uploads,
    ) -> None:
        self._settings = settings
        self._db = db
        self._store = store
        self._metrics = metrics
        self._inbound = inbound
        self._uploads = uploads
        inbound.register(UPLOAD_TOPIC, self.open)

    async def open(self, remote: Remote, msg: Msg) -> PeerResponse:
        """Create (or find again) the upload session a peer asks for."""
        try:
            us = msgspec.json.decode(bytes(msg.payload), type=UploadSession)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return _refuse("invalid upload session")
        existing = await self._uploads.get(us.id) if us.id else None
        if existing is not None:
            if existing.remote_id != remote.remote_id:
                return _refuse("the upload session id is already in use")
            return _accepted(existing)
        why = check_upload_session(us, self._settings.config.uploads.max_file_size)
        if not why:
            route = self._inbound.route_for(UPLOAD_TOPIC, wildcard=False)
            if route is not None:
                approval = await self._inbound.forward(route, remote, msg)
                if approval.status != "OK":
                    log.info("upload.refused", remote_id=remote.remote_id, upload_id=us.id,
                             reason=approval.err)  # fmt: skip
                    return approval
            why = await self._check_space(us.file_size)
        if why:
            log.info("upload.refused", remote_id=remote.remote_id, upload_id=us.id[:64], reason=why)
            return _refuse(why)
        session = await self._insert(remote, us)
        log.info("upload.opened", remote_id=remote.remote_id, upload_id=session.upload_id,
                 file_size=session.file_size)  # fmt: skip
        return _accepted(session)

    async def _insert(self, remote: Remote, us: UploadSession) -> Session:
        now = now_ms()
        session = Session(
            upload_id=us.id, remote_id=remote.remote_id, type=us.type, user_id=us.user_id,
            channel_id=us.channel_id, filename=us.filename, file_size=us.file_size, committed=0,
            req_file_id=us.req_file_id or new_id(), create_at=now,
            expires_at=now + int(self._settings.config.uploads.session_ttl * 1000),
            state="receiving", file_info=None, update_at=now,
        )  # fmt: skip
        columns, marks = ", ".join(Session.__slots__), ", ".join("?" * len(Session.__slots__))
        await self._db.execute(
            f"INSERT INTO uploads_in ({columns}) VALUES ({marks})",  # noqa: S608
            [getattr(session, c) for c in Session.__slots__],
        )
        self._metrics.upload_sessions.labels("opened").inc()
        return session

    async def _check_space(self, file_size: int) -> str:
        outstanding = await self._db.scalar(
            "SELECT coalesce(sum(file_size - committed), 0) FROM uploads_in "
            "WHERE state = 'receiving'"
        )
        free = await asyncio.to_thread(self._store.free_bytes)
        if free - outstanding - file_size < self._settings.config.uploads.min_free_bytes:
            return "not enough disk space for this upload"
        return ""
