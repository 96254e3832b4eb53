"""Lifecycle events for local applications: POSTed, in order, to ``[events] forward_url``.

Each event is ``{"event": name, "at": epoch_ms, "remote_id", "remote_name", ...}``. Events wait
in a bounded in-memory queue and one sender task delivers them one at a time, retrying a failed
delivery with capped exponential backoff for up to ``RETRY_FOR`` seconds; an event that cannot
be delivered by then, or that finds the queue full, is logged as ``event.dropped`` with its name
and remote. Events are notifications, not a durable log: they are not kept across restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Any

import aiohttp
import msgspec
import structlog

from daemon.models import Remote, now_ms
from daemon.settings import Settings

log = structlog.get_logger(__name__)

QUEUE_SIZE = 10_000
RETRY_FOR = 60.0
POST_TIMEOUT = 10.0


class EventSink:
    """Queues events and delivers them to the configured hook."""

    def __init__(self, settings: Settings, session: aiohttp.ClientSession) -> None:
        self._settings = settings
        self._session = session
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE_SIZE)
        self._task: asyncio.Task[None] | None = None

    def emit(self, name: str, remote: Remote | None = None, **fields: Any) -> None:
        """Queue an event (a no-op when no hook is configured)."""
        if not self._settings.config.events.forward_url:
            return
        event: dict[str, Any] = {"event": name, "at": now_ms()}
        if remote is not None:
            event["remote_id"] = remote.remote_id
            event["remote_name"] = remote.name
        event.update(fields)  # may name a remote_id when the remote record is gone
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            log.warning("event.dropped", event_name=name, reason="queue full")

    def start(self) -> None:
        """Start the sender task."""
        self._task = asyncio.create_task(self._run(), name="events")

    async def stop(self) -> None:
        """Stop the sender; events still queued are logged as dropped."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while not self._queue.empty():
            event = self._queue.get_nowait()
            log.warning("event.dropped", event_name=event["event"], reason="shutting down")

    async def drain(self) -> None:
        """Wait until every queued event was delivered or dropped (for tests and shutdown)."""
        await self._queue.join()

    async def _run(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                await self._deliver(event)
            finally:
                self._queue.task_done()

    async def _deliver(self, event: dict[str, Any]) -> None:
        body = msgspec.json.encode(event)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RETRY_FOR
        delay = 0.2
        while True:
            url = self._settings.config.events.forward_url
            if not url:
                return
            try:
                async with self._session.post(
                    url,
                    data=body,
                    headers={"Content-Type": "application/json"},
                    timeout=aiohttp.ClientTimeout(total=POST_TIMEOUT),
                    allow_redirects=False,
                ) as resp:
                    if resp.status < 300:
                        return
                    reason = f"HTTP {resp.status}"
                    if 400 <= resp.status < 500:
                        log.warning("event.dropped", event_name=event["event"], reason=reason)
                        return
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                reason = type(exc).__name__
            if loop.time() + delay > deadline:
                log.warning(
                    "event.dropped",
                    event_name=event["event"],
                    remote_id=event.get("remote_id"),
                    reason=reason,
                )
                return
            await asyncio.sleep(random.uniform(0, delay))  # noqa: S311 - jitter, not crypto
            delay = min(delay * 2, 10.0)
