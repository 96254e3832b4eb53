"""Heartbeats: one outbound ping loop per confirmed remote, and liveness operators can trust.

Each confirmed remote gets its own task, so a slow or dead peer never delays another's pings
(Mattermost pings remotes one after another). Pings travel over :mod:`daemon.httplite`, a
lean keep-alive client, since a thousand peers mean a thousand requests a second.

A loop pings at ``heartbeat.interval`` with a random jitter of ±``heartbeat.jitter`` so that
many peers do not fire together, keeps to its schedule after failures (a heartbeat is not a
retry storm), and never has more than one ping in flight: a slot that a slow ping overran is
skipped. A newly confirmed remote is pinged at
once; at start-up the first pings are spread over the first seconds.

Liveness follows Mattermost's rule: a remote is online while its last successful outbound
ping is younger than ``heartbeat.offline_after`` (only our own pings count). Every change of
that state is announced once (``remote.online`` / ``remote.offline``, a log line and an
event), including a peer that dies between two pings (a timer fires at the exact moment the
last ping ages out, even while a ping hangs) and changes that happened while the daemon was
stopped (the announced state is stored and compared at start-up).

``last_ping_at`` changes in memory at every ping and is written for all remotes in one
transaction per ``heartbeat.interval`` (and at once on a transition, and at shutdown), so a
restart loses at most one interval of it.

Clock skew is estimated per ping as ``recv_at - (sent_at + rtt/2)`` (positive: the peer's
clock is ahead); a warning is logged once each time it goes beyond ``heartbeat.max_clock_skew``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import msgspec
import structlog

from daemon.errors import PeerError
from daemon.events import EventSink
from daemon.httplite import LiteClient
from daemon.ids import new_id
from daemon.metrics import Metrics, RemoteGauges
from daemon.models import PING_TOPIC, Ping, Remote, now_ms
from daemon.peers import HEADER_REMOTE_ID, HEADER_REMOTE_TOKEN, PING_PATH, join_url
from daemon.remotes import Change, Remotes
from daemon.settings import Settings
from daemon.tasks import background

log = structlog.get_logger(__name__)

LivenessListener = Callable[[Remote, bool], None]
STARTUP_SPREAD = 5.0  # seconds over which the first pings after start-up are spread
PING_ANSWER_MAX = 64 * 1024  # a ping's answer is two numbers


@dataclass(slots=True)
class _Peer:
    remote_id: str
    task: asyncio.Task[None] | None = None
    deadline: asyncio.TimerHandle | None = None  # fires when the last ping ages out
    failures: int = 0
    last_error: str = ""
    rtt_ms: float | None = None
    skew_ms: float | None = None
    skew_warned: bool = False


def _ping_frame(remote_id: str, sent_at: int) -> bytes:
    # Ids are ASCII letters and digits: nothing to escape.
    return (
        f'{{"remote_id":"{remote_id}","msg":{{"id":"{new_id()}","topic":"{PING_TOPIC}",'
        f'"create_at":{sent_at},"payload":{{"sent_at":{sent_at},"recv_at":0}}}}}}'
    ).encode()


class Heartbeat:
    """Owns every ping loop and the liveness of every remote."""

    def __init__(
        self,
        settings: Settings,
        remotes: Remotes,
        events: EventSink,
        metrics: Metrics,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._settings = settings
        self._remotes = remotes
        self._events = events
        self._metrics = metrics
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not crypto
        self._peers_by_id: dict[str, _Peer] = {}
        self._retired: set[asyncio.Task[None]] = set()  # loops of deleted remotes
        self._listeners: list[LivenessListener] = []
        self._urgent_flush = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._pinger = LiteClient()
        self._pings_ok = metrics.pings.labels("ok")

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Announce transitions that happened while stopped, then start every loop."""
        spread = min(self._settings.config.heartbeat.interval, STARTUP_SPREAD)
        for remote in self._remotes.all():
            if self._pingable(remote):
                peer = self._peers_by_id.setdefault(remote.remote_id, _Peer(remote.remote_id))
                self._evaluate(peer, restart=True)
                self._start_loop(peer, first_delay=self._rng.uniform(0, spread))
        self._remotes.subscribe(self._on_change)
        self._flusher = asyncio.create_task(self._flush_loop(), name="heartbeat.flush")
        self._metrics.watch_remotes(self._gauges)

    async def stop(self) -> None:
        """Stop every loop and write the liveness still in memory."""
        for peer in self._peers_by_id.values():
            if peer.deadline is not None:
                peer.deadline.cancel()
        tasks = [p.task for p in self._peers_by_id.values() if p.task is not None]
        tasks += self._retired
        if self._flusher is not None:
            tasks.append(self._flusher)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._pinger.close()
        await self._flush()

    def subscribe(self, listener: LivenessListener) -> None:
        """Call ``listener(remote, online)`` on every announced transition."""
        self._listeners.append(listener)

    def is_online(self, remote_id: str) -> bool:
        """The announced liveness of a remote."""
        remote = self._remotes.get(remote_id)
        return remote is not None and remote.online_announced

    def peer_stats(self, remote_id: str) -> tuple[float | None, float | None]:
        """The last round trip and clock skew estimate of a remote, in milliseconds."""
        peer = self._peers_by_id.get(remote_id)
        return (peer.rtt_ms, peer.skew_ms) if peer else (None, None)

    @staticmethod
    def _pingable(remote: Remote) -> bool:
        return remote.is_confirmed and not remote.is_deleted and not remote.is_plugin

    def _on_change(self, change: Change, remote: Remote) -> None:
        if change is Change.CONFIRMED and self._pingable(remote):
            peer = self._peers_by_id.setdefault(remote.remote_id, _Peer(remote.remote_id))
            self._start_loop(peer, first_delay=0.0)
        elif change is Change.DELETED:
            gone = self._peers_by_id.pop(remote.remote_id, None)
            if gone is not None and gone.task is not None:
                gone.task.cancel()
                self._retired.add(gone.task)  # awaited at stop
                gone.task.add_done_callback(self._retired.discard)
            if gone is not None and gone.deadline is not None:
                gone.deadline.cancel()

    def _start_loop(self, peer: _Peer, first_delay: float) -> None:
        if peer.task is not None and not peer.task.done():
            return
        peer.task = background(self._run(peer, first_delay), name=f"heartbeat:{peer.remote_id}")

    # --- the loop --------------------------------------------------------------------------

    def _next_interval(self) -> float:
        cfg = self._settings.config.heartbeat
        return cfg.interval * self._rng.uniform(1 - cfg.jitter, 1 + cfg.jitter)

    async def _run(self, peer: _Peer, first_delay: float) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + first_delay
        while True:
            if (delay := due - loop.time()) > 0:
                await asyncio.sleep(delay)
            self._metrics.ping_lateness.observe(max(0.0, loop.time() - due))
            try:
                await self._ping(peer)
                self._evaluate(peer)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("heartbeat.loop_error", remote_id=peer.remote_id)
            # Keep to the schedule; skip slots a slow ping overran (one ping in flight).
            due += self._next_interval()
            now = loop.time()
            while due <= now:
                due += self._next_interval()

    def _arm_deadline(self, peer: _Peer) -> None:
        """While a remote is online, a timer fires when its last ping ages out.

        The timer is not moved by each ping: when it fires it looks at the latest ping and
        either announces the remote offline or sets itself for the new deadline.
        """
        remote = self._remotes.get(peer.remote_id)
        if peer.deadline is not None or remote is None or not remote.online_announced:
            return
        left = (remote.last_ping_at + self._settings.offline_after_ms - now_ms()) / 1000
        loop = asyncio.get_running_loop()
        peer.deadline = loop.call_later(max(left, 0.0) + 0.001, self._deadline_reached, peer)

    def _deadline_reached(self, peer: _Peer) -> None:
        peer.deadline = None
        if self._peers_by_id.get(peer.remote_id) is peer:
            self._evaluate(peer)

    async def _ping(self, peer: _Peer) -> None:
        remote = self._remotes.get(peer.remote_id)
        if remote is None or not self._pingable(remote):
            return
        sent_at = now_ms()
        started = time.perf_counter()
        try:
            pong = await self._exchange(remote, sent_at)
        except PeerError as exc:
            self._failed(peer, remote, exc)
            return
        rtt = time.perf_counter() - started
        self._remotes.set_liveness(remote.remote_id, last_ping_at=now_ms())
        self._pings_ok.inc()
        self._metrics.ping_seconds.observe(rtt)
        peer.failures, peer.last_error = 0, ""
        peer.rtt_ms = rtt * 1000
        if pong.recv_at:
            peer.skew_ms = pong.recv_at - (sent_at + peer.rtt_ms / 2)
            self._check_skew(peer, remote)
        log.debug("heartbeat.ok", remote_id=remote.remote_id, rtt_ms=round(peer.rtt_ms, 2))

    async def _exchange(self, remote: Remote, sent_at: int) -> Ping:
        """POST one ping frame (protocol §4) and return the peer's answer."""
        reply = await self._pinger.post(
            join_url(remote.site_url, PING_PATH),
            headers={HEADER_REMOTE_ID: remote.remote_id, HEADER_REMOTE_TOKEN: remote.remote_token},
            body=_ping_frame(remote.remote_id, sent_at),
            timeout=self._settings.config.heartbeat.timeout,
            max_answer=PING_ANSWER_MAX,
        )
        if reply.status != 200:
            raise PeerError(f"http_{reply.status}", f"the peer answered HTTP {reply.status}")
        try:
            return msgspec.json.decode(reply.body, type=Ping)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise PeerError("bad_response", "the answer is not a ping") from None

    def _failed(self, peer: _Peer, remote: Remote, exc: PeerError) -> None:
        peer.failures += 1
        changed = exc.reason != peer.last_error
        peer.last_error = exc.reason
        # By status class: a label per status a peer can make up would grow without bound.
        label = f"http_{exc.reason[5]}xx" if exc.reason.startswith("http_") else exc.reason
        self._metrics.pings.labels(label).inc()
        log.log(
            30 if peer.failures == 1 or changed else 20,
            "heartbeat.failed",
            remote_id=remote.remote_id,
            remote_name=remote.name,
            reason=exc.reason,
            detail=exc.detail,
            consecutive=peer.failures,
        )

    def _check_skew(self, peer: _Peer, remote: Remote) -> None:
        assert peer.skew_ms is not None
        bound_ms = self._settings.config.heartbeat.max_clock_skew * 1000
        if abs(peer.skew_ms) > bound_ms and not peer.skew_warned:
            peer.skew_warned = True
            log.warning(
                "heartbeat.clock_skew",
                remote_id=remote.remote_id,
                remote_name=remote.name,
                skew_ms=round(peer.skew_ms),
                bound_ms=round(bound_ms),
            )
        elif abs(peer.skew_ms) <= bound_ms and peer.skew_warned:
            peer.skew_warned = False
            log.info(
                "heartbeat.clock_skew_ok", remote_id=remote.remote_id, skew_ms=round(peer.skew_ms)
            )

    # --- liveness ------------------------------------------------------------------------

    def _evaluate(self, peer: _Peer, *, restart: bool = False) -> None:
        """Announce a transition when the remote's liveness differs from the announced one."""
        remote = self._remotes.get(peer.remote_id)
        if remote is None or remote.is_deleted:
            return
        now = now_ms()
        online = remote.is_online(now, self._settings.offline_after_ms)
        if online == remote.online_announced:
            self._arm_deadline(peer)
            return
        updated = self._remotes.set_liveness(remote.remote_id, online=online)
        if updated is None:
            return
        self._urgent_flush.set()
        name = "remote.online" if online else "remote.offline"
        if online:
            reason = "a ping succeeded"
        elif remote.last_ping_at:
            reason = f"no successful ping for {(now - remote.last_ping_at) / 1000:.1f}s"
        else:
            reason = "never answered a ping"
        if restart:
            reason += " (found at start-up)"
        fields = {
            "reason": reason,
            "last_ping_at": remote.last_ping_at,
            "last_error": peer.last_error or None,
            "rtt_ms": round(peer.rtt_ms, 2) if online and peer.rtt_ms is not None else None,
            "clock_skew_ms": round(peer.skew_ms) if online and peer.skew_ms is not None else None,
        }
        log.log(
            20 if online else 30,
            name,
            remote_id=remote.remote_id,
            remote_name=remote.name,
            **fields,
        )
        self._metrics.transitions.labels("online" if online else "offline").inc()
        self._events.emit(name, updated, **{k: v for k, v in fields.items() if v is not None})
        for listener in self._listeners:
            try:
                listener(updated, online)
            except Exception:
                log.exception("heartbeat.listener_failed", remote_id=remote.remote_id)
        self._arm_deadline(peer)

    async def _flush_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._settings.config.heartbeat.interval):
                    await self._urgent_flush.wait()
            self._urgent_flush.clear()
            await self._flush()

    async def _flush(self) -> None:
        try:
            written = await self._remotes.flush_liveness()
        except sqlite3.Error as exc:
            log.warning("heartbeat.flush_failed", error=str(exc))
            return
        if written:
            self._metrics.liveness_transactions.inc()

    def _gauges(self) -> Iterator[RemoteGauges]:
        now = now_ms()
        for peer in list(self._peers_by_id.values()):
            remote = self._remotes.get(peer.remote_id)
            if remote is None or remote.is_deleted:
                continue
            yield RemoteGauges(
                name=remote.name,
                remote_id=remote.remote_id,
                up=remote.online_announced,
                last_ping_age_seconds=(now - remote.last_ping_at) / 1000
                if remote.last_ping_at
                else None,
                rtt_seconds=peer.rtt_ms / 1000 if peer.rtt_ms is not None else None,
                clock_skew_seconds=peer.skew_ms / 1000 if peer.skew_ms is not None else None,
            )
