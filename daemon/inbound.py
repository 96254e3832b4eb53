"""Messages from peers: topic routing to local applications, and answers given once.

A frame on ``/msg`` is routed by its topic:

1. a built-in topic (``sharedchannel_upload``, registered by the uploads module) goes to its
   handler, which may itself consult the topic's ``[[topics]]`` route;
2. otherwise a ``[[topics]]`` entry of that name, else the ``"*"`` entry (never for built-in
   topics), forwards ``{"remote_id","remote_name","msg"}`` to the local application;
3. a topic with no route is answered ``{"status":"OK","err":"","payload":null}`` (Mattermost).

The local application's answer maps to the peer's: 2xx → OK with its JSON body as payload
(null when empty), 4xx → FAIL with a short reason (final), 5xx/timeout/unreachable → 503 with
``Retry-After`` (the sender retries). A final outcome (OK or FAIL) is committed to the
``inbox`` table before the peer gets it; a frame repeating that message id from that remote
is answered from there without forwarding twice, for ``inbox.dedupe_window``. A repeat that
arrives while the first is still being forwarded waits for the first one's outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec
import structlog

from daemon.config import TopicConfig
from daemon.errors import PeerError
from daemon.httplite import LiteClient
from daemon.models import INVITATION_TOPIC, PING_TOPIC, Msg, PeerResponse, Remote, now_ms
from daemon.settings import Settings
from daemon.store import Database, GroupCommit
from daemon.tasks import periodic

log = structlog.get_logger(__name__)

RESERVED_TOPICS = frozenset({PING_TOPIC, INVITATION_TOPIC})
NULL = msgspec.Raw(b"null")
JANITOR_PERIOD = 3600.0


class LocalUnavailable(Exception):
    """The local application could not take the message now; the peer should retry."""


class ForwardedMessage(msgspec.Struct):
    """What a local application receives for each inbound message."""

    remote_id: str
    remote_name: str
    msg: Msg


TopicHandler = Callable[[Remote, Msg], Awaitable[PeerResponse]]


@dataclass(frozen=True, slots=True)
class _Key:
    remote_id: str
    msg_id: str


class Inbound:
    """Routes inbound messages and remembers final answers."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        writer: GroupCommit,
        client: LiteClient,
    ) -> None:
        self._settings = settings
        self._db = db
        self._writer = writer
        self._client = client
        self._builtin: dict[str, TopicHandler] = {}
        self._in_flight: dict[_Key, asyncio.Future[PeerResponse]] = {}  # deliveries under way
        self._janitor: asyncio.Task[None] | None = None

    def register(self, topic: str, handler: TopicHandler) -> None:
        """Handle ``topic`` in the daemon itself (a built-in topic)."""
        self._builtin[topic] = handler

    def route_for(self, topic: str, *, wildcard: bool = True) -> TopicConfig | None:
        """The configured route of a topic (``"*"`` as fallback when ``wildcard``)."""
        fallback = None
        for route in self._settings.config.topics:
            if route.name == topic:
                return route
            if route.name == "*":
                fallback = route
        return fallback if wildcard and topic not in self._builtin else None

    def start(self) -> None:
        """Start the janitor that forgets answers older than the dedupe window."""
        self._janitor = periodic(self._prune, JANITOR_PERIOD, name="inbox.prune")

    async def stop(self, grace: float) -> None:
        """Stop the janitor; give deliveries under way ``grace`` seconds, then cancel them."""
        if self._janitor is not None:
            self._janitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._janitor
        deliveries = list(self._in_flight.values())
        if deliveries:
            _, late = await asyncio.wait(deliveries, timeout=grace)
            for delivery in late:
                delivery.cancel()
            await asyncio.gather(*deliveries, return_exceptions=True)

    async def receive(self, remote: Remote, msg: Msg) -> PeerResponse:
        """Answer one inbound message; raises :class:`LocalUnavailable` for a retry.

        The delivery (lookup, forward, inbox commit) runs in a task of its own that the
        request cannot cancel: a peer that hangs up after the local application took the
        message must not make its retry forward it again because the answer was not yet
        committed. A repeat arriving meanwhile waits for that same task.
        """
        handler = self._builtin.get(msg.topic)
        route = None if handler else self.route_for(msg.topic)
        if handler is None and route is None:
            return PeerResponse(status="OK", err="", payload=NULL)
        key = _Key(remote.remote_id, msg.id)
        delivery = self._in_flight.get(key)
        if delivery is None:
            # Registered before any await: a repeat arriving meanwhile waits for this one.
            delivery = asyncio.ensure_future(self._deliver(key, remote, msg, handler, route))
            self._in_flight[key] = delivery
            delivery.add_done_callback(lambda _: self._in_flight.pop(key, None))
        try:
            return await asyncio.shield(delivery)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if delivery.cancelled() and not (task and task.cancelling()):
                # Cut short by shutdown, not this request: unanswered, so it will come again.
                raise LocalUnavailable("the delivery was interrupted") from None
            raise

    async def _deliver(
        self,
        key: _Key,
        remote: Remote,
        msg: Msg,
        handler: TopicHandler | None,
        route: TopicConfig | None,
    ) -> PeerResponse:
        stored = await self._stored(key)
        if stored is not None:
            log.info("msg.repeated", remote_id=remote.remote_id, msg_id=msg.id, topic=msg.topic)
            return stored
        if handler is not None:
            answer = await handler(remote, msg)
        else:
            assert route is not None
            answer = await self.forward(route, remote, msg)
        try:
            await self._writer.write(
                "INSERT OR REPLACE INTO inbox "
                "(remote_id, msg_id, topic, status, err, payload, answered_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (remote.remote_id, msg.id, msg.topic, answer.status, answer.err,
                 bytes(answer.payload), now_ms()),
            )  # fmt: skip
        except sqlite3.Error as exc:
            raise LocalUnavailable(f"the answer could not be stored: {exc}") from None
        return answer

    async def _stored(self, key: _Key) -> PeerResponse | None:
        row = await self._db.fetchone(
            "SELECT status, err, payload FROM inbox WHERE remote_id = ? AND msg_id = ?",
            (key.remote_id, key.msg_id),
        )
        if row is None:
            return None
        return PeerResponse(
            status=row["status"], err=row["err"], payload=msgspec.Raw(row["payload"])
        )

    async def forward(self, route: TopicConfig, remote: Remote, msg: Msg) -> PeerResponse:
        """POST the message to a local application and map its answer (see module doc)."""
        body = msgspec.json.encode(
            ForwardedMessage(remote_id=remote.remote_id, remote_name=remote.name, msg=msg)
        )
        try:
            reply = await self._client.post(
                route.forward_url,
                headers={},
                body=body,
                timeout=route.timeout,
                max_answer=self._settings.config.server.max_frame_size,
            )
        except PeerError as exc:
            if exc.status is not None and 200 <= exc.status < 300:
                # It took the message but its answer is unusable (too large): asking the peer
                # to retry would have it take the message again and again.
                log.warning("msg.answer_unusable", topic=msg.topic, route=route.name,
                            msg_id=msg.id, reason=exc.detail)  # fmt: skip
                return PeerResponse(status="OK", err="", payload=NULL)
            raise LocalUnavailable(f"{route.name}: {exc}") from None
        if 200 <= reply.status < 300:
            return PeerResponse(status="OK", err="", payload=_json_or_null(reply.body, route))
        if 400 <= reply.status < 500:
            return PeerResponse(status="FAIL", err=_reason(reply.status, reply.body), payload=NULL)
        raise LocalUnavailable(f"{route.name}: HTTP {reply.status}")

    async def _prune(self) -> None:
        cutoff = now_ms() - int(self._settings.config.inbox.dedupe_window * 1000)
        removed = await self._db.execute("DELETE FROM inbox WHERE answered_at < ?", (cutoff,))
        if removed:
            log.info("inbox.pruned", removed=removed)


def _json_or_null(body: bytes, route: TopicConfig) -> msgspec.Raw:
    if not body.strip():
        return NULL
    try:
        msgspec.json.decode(body)
    except msgspec.DecodeError:
        log.warning("msg.local_answer_not_json", topic_route=route.name)
        return NULL
    return msgspec.Raw(body)


def _reason(status: int, body: bytes) -> str:
    """A short reason for a local refusal: its ``error``/``message``/``err`` text, or the status."""
    text = ""
    with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        doc = msgspec.json.decode(body)
        if isinstance(doc, dict):
            text = next((str(doc[k]) for k in ("err", "error", "message") if doc.get(k)), "")
        elif isinstance(doc, str):
            text = doc
    if not text:
        with contextlib.suppress(UnicodeDecodeError):
            text = body.decode("utf-8").strip()
    text = " ".join(text.split())[:200]
    return text or f"the local application answered HTTP {status}"
