"""Background work: started without its starter's context, or finished despite its starter.

A worker started while a request is being handled (a ping loop after a confirmation, an
outbox worker after the first message) would otherwise inherit that request's contextvars,
and its request id would label every log line the worker writes for the rest of its life:
:func:`background` starts it in a fresh context.

Some steps of a request must not be cut in half when the request is cancelled (its client
went away, a newer request took over, shutdown): committing an upload's bytes, finishing an
accepted invite the peer has already confirmed. :class:`Unstoppable` runs those to their end.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def background(coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
    """Start ``coro`` as a task in a fresh, empty context."""
    return asyncio.create_task(coro, name=name, context=contextvars.Context())


class Unstoppable:
    """Runs work to its end even if the caller is cancelled; :meth:`wait` for all of it."""

    def __init__(self) -> None:
        self._running: set[asyncio.Future[Any]] = set()

    async def run(self, work: Awaitable[T]) -> T:
        """Run ``work`` to its end and wait for that end, even if the caller is cancelled.

        Waiting matters as much as finishing: the caller may hold something (an upload's
        writer slot) that must not pass to the next request while the work still runs. A
        cancellation that arrives meanwhile is raised once the work is done.
        """
        future = asyncio.ensure_future(work)
        self._running.add(future)
        future.add_done_callback(self._running.discard)
        cancelled = False
        while True:
            try:
                result = await asyncio.shield(future)
                break
            except asyncio.CancelledError:
                if future.done():  # the work itself was cancelled
                    raise
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError
        return result

    async def wait(self) -> None:
        """Wait for all work still running (at shutdown, before the store closes)."""
        await asyncio.gather(*self._running, return_exceptions=True)
