"""Streaming a request body into a file: no copies, blocks written off the loop, durable commits.

:class:`Appender` collects the body's chunks as they arrive (the bytes objects aiohttp hands
over, never copied) and, every :data:`BLOCK` bytes, has a worker thread write them with one
``pwritev`` while the loop reads on. :meth:`Appender.commit` is the durability step: wait for
the write, ``fsync``, then record the offset, so a recorded offset never runs ahead of the
disk. :func:`stream_into` drives one body: it commits every ``commit_every`` bytes and whenever
the body pauses for :data:`IDLE_COMMIT` seconds, stops a body that makes no progress for
``progress_timeout`` seconds, and never lets a chunk that would cross ``limit`` in.

A block of 1 MiB keeps each write short: a 4 MiB write held the (shared) CPU long enough to
delay the event loop by 20-100 ms on a 2-core machine; 1 MiB keeps that under 5 ms.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog

from daemon.errors import InsufficientStorage
from daemon.filestore import FileStore

log = structlog.get_logger(__name__)

BLOCK = 1024 * 1024
IDLE_COMMIT = 1.0  # a body that pauses this long has what arrived committed

Record = Callable[[int, int], Awaitable[None]]


class Appender:
    """One append's bytes: buffered, written up to ``offset``, committed up to ``committed``.

    A failed write (a full disk) stops the append: what reached the disk is unknown, so
    nothing more is committed, and :meth:`close` raises 507.
    """

    def __init__(
        self, store: FileStore, fd: int, *, offset: int, record: Record, name: str
    ) -> None:
        self._store, self._fd, self._record, self._name = store, fd, record, name
        self.offset = self.committed = offset
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._pending: asyncio.Future[None] | None = None
        self._failure: OSError | None = None

    @property
    def received(self) -> int:
        """Bytes received so far (written or buffered), counted from the file's start."""
        return self.offset + self._buffered

    async def add(self, data: bytes) -> None:
        """Buffer ``data``; have a block written once one is full."""
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered >= BLOCK:
            await self._spill()

    async def _spill(self) -> None:
        await self._settle()
        chunks, size = self._chunks, self._buffered
        self._chunks, self._buffered = [], 0
        self._pending = asyncio.ensure_future(self._store.pwritev(self._fd, chunks, self.offset))
        self.offset += size

    async def _settle(self) -> None:
        """Wait for the block being written.

        The write is shielded: a cancelled request must not cancel a write the thread pool
        may be running (or drop one it has not started while ``offset`` already counts it).
        It stays pending, and :meth:`close` waits for it before committing or closing.
        """
        pending = self._pending
        if pending is None:
            return
        try:
            await asyncio.shield(pending)
        except OSError as exc:
            self._failure, self.offset = exc, self.committed
            raise
        finally:
            if pending.done():
                self._pending = None

    async def commit(self) -> None:
        """Write what is buffered, fsync, and record the offset."""
        if self._chunks:
            await self._spill()
        await self._settle()
        if self.offset > self.committed:
            await self._store.fsync(self._fd)
            await self._record(self.offset, self.committed)
            self.committed = self.offset

    async def close(self) -> int:
        """Commit what arrived and close the file; return the committed offset.

        Run it to its end (shielded from the request's cancellation): the descriptor is
        closed only once no write is in flight.
        """
        try:
            if self._failure is None:
                try:
                    await self.commit()
                except OSError as exc:
                    self._failure = self._failure or exc
        finally:
            if self._pending is not None:  # only after a failure; wait before closing the fd
                await asyncio.gather(self._pending, return_exceptions=True)
            await self._store.close(self._fd)
        if self._failure is not None:
            log.error("upload.write_failed", upload_id=self._name, error=str(self._failure),
                      committed=self.committed)  # fmt: skip
            raise InsufficientStorage(
                "The upload could not be written to disk.",
                detail=self._failure.strerror or str(self._failure),
                headers={"Upload-Offset": str(self.committed)},
            )
        return self.committed


async def stream_into(
    appender: Appender,
    chunks: AsyncIterator[bytes],
    *,
    limit: int,
    commit_every: int,
    progress_timeout: float,
) -> bool:
    """Feed ``chunks`` to ``appender`` until the body ends; return True if it ran past ``limit``.

    The chunk that would cross ``limit`` is not added at all. The read in progress is never
    cancelled by the idle timer (cancelling an async generator ends it): it is awaited again.
    """
    iterator = aiter(chunks)
    waiting: asyncio.Future[bytes] | None = None
    idle = 0.0
    try:
        while True:
            waiting = waiting or asyncio.ensure_future(anext(iterator))
            done, _ = await asyncio.wait({waiting}, timeout=IDLE_COMMIT)
            if not done:
                idle += IDLE_COMMIT
                if idle >= progress_timeout:
                    log.info("upload.stalled", after_s=idle)
                    return False
                await appender.commit()  # a pause: make what arrived durable (and visible)
                continue
            idle, (arrived, waiting) = 0.0, (waiting, None)
            try:
                received = arrived.result()
            except StopAsyncIteration:
                return False
            if len(received) > limit - appender.received:
                return True
            await appender.add(received)
            if appender.offset - appender.committed >= commit_every:
                await appender.commit()
    finally:
        if waiting is not None:
            waiting.cancel()
            waiting.add_done_callback(_consume)


def _consume(future: asyncio.Future[bytes]) -> None:
    """Retrieve a cancelled read's outcome so that it is not reported as never retrieved."""
    if not future.cancelled():
        future.exception()
