"""One worker task per remote: started on demand, woken by new work or by the peer coming back.

The outbox (messages) and the file sender (files) both deliver a remote's queue in order with
one task per remote. :class:`RemoteWorkers` owns those tasks: it starts one when work is
queued, stops it when the remote is deleted, wakes it when the heartbeat sees the peer come
back online (cutting a retry backoff short) and stops them all with the app.

A worker that fails on something unexpected is logged with its traceback and started again
after :data:`RESTART_PAUSE` (from the oldest queued item, which the peer's inbox dedupes),
never left dead with its remote's queue stalled.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import structlog

from daemon.models import Remote
from daemon.remotes import Change
from daemon.tasks import background

log = structlog.get_logger(__name__)

RESTART_PAUSE = 5.0


@dataclass(slots=True)
class Worker:
    """A remote's worker: its task, its wake-up events, and how much waits for it."""

    remote_id: str
    task: asyncio.Task[None] | None = None
    work: asyncio.Event = field(default_factory=asyncio.Event)
    online: asyncio.Event = field(default_factory=asyncio.Event)
    queued: int = 0

    async def backoff(self, seconds: float) -> bool:
        """Sleep ``seconds``, or less if the peer comes back online; True in that case."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(seconds, 0.0)):
                await self.online.wait()
        came_back = self.online.is_set()
        self.online.clear()
        return came_back


class RemoteWorkers:
    """The workers of one kind (``name``), each running ``run(worker)``."""

    def __init__(self, name: str, run: Callable[[Worker], Coroutine[Any, Any, None]]) -> None:
        self._name = name
        self._run = run
        self._workers: dict[str, Worker] = {}
        self._retired: set[asyncio.Task[None]] = set()  # cancelled on deletion, awaited at stop

    def __iter__(self) -> Any:
        return iter(list(self._workers.values()))

    def ensure(self, remote_id: str) -> Worker:
        """The remote's worker, started if it is not running."""
        worker = self._workers.get(remote_id)
        if worker is None:
            worker = self._workers[remote_id] = Worker(remote_id)
        if worker.task is None or worker.task.done():
            worker.task = background(self._supervise(worker), name=f"{self._name}:{remote_id}")
        return worker

    async def _supervise(self, worker: Worker) -> None:
        while True:
            try:
                await self._run(worker)
            except Exception:
                log.exception(f"{self._name}.worker_failed", remote_id=worker.remote_id,
                              restart_in_s=RESTART_PAUSE)  # fmt: skip
                await asyncio.sleep(RESTART_PAUSE)
            else:
                return

    def wake(self, remote: Remote, online: bool) -> None:
        """Heartbeat listener: a peer back online is retried at once."""
        worker = self._workers.get(remote.remote_id)
        if online and worker is not None:
            worker.online.set()

    def on_change(self, change: Change, remote: Remote) -> None:
        """Remotes listener: a deleted remote's worker stops."""
        worker = self._workers.pop(remote.remote_id, None) if change is Change.DELETED else None
        if worker is not None and worker.task is not None:
            worker.task.cancel()
            self._retired.add(worker.task)
            worker.task.add_done_callback(self._retired.discard)

    async def stop(self) -> None:
        """Stop every worker and wait for them (what is queued stays queued)."""
        tasks = [w.task for w in self._workers.values() if w.task is not None]
        tasks += self._retired
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
