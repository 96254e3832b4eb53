"""Background work: started without its starter's context, or finished despite its starter.

A worker started while a request is being handled (a ping loop after a confirmation, an
outbox worker after the first message) would otherwise inherit that request's contextvars,
and its request id would label every log line the worker writes for the rest of its life:
:func:`background` starts it in a fresh context.

Janitors (pruning old rows, expiring sessions) are :func:`periodic` tasks: one loop, one
failure policy (log it, try again next round).

Some steps of a request must not be cut in half when the request is cancelled (its client
went away, a newer request took over, shutdown): committing an upload's bytes, finishing an
accepted invite the peer has already confirmed. :class:`Unstoppable` runs those to their end.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

import structlog

log = structlog.get_logger(__name__)

T = TypeVar("T")
P = ParamSpec("P")


def background(coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
    """Start ``coro`` as a task in a fresh, empty context."""
    return asyncio.create_task(coro, name=name, context=contextvars.Context())


def periodic(
    work: Callable[[], Awaitable[object]], period: float, *, name: str, at_start: bool = False
) -> asyncio.Task[None]:
    """Run ``work()`` every ``period`` seconds (first at once when ``at_start``) until cancelled.

    A round that fails is logged as ``<name>.failed``; the next round runs as planned.
    """

    async def loop() -> None:
        if not at_start:
            await asyncio.sleep(period)
        while True:
            try:
                await work()
            except Exception:
                log.exception(f"{name}.failed")
            await asyncio.sleep(period)

    return background(loop(), name=name)


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


class Finishing(Protocol):
    """An object whose :func:`unstoppable` methods run to their end (awaited by its stop)."""

    finishing: Unstoppable


F = TypeVar("F", bound=Finishing)


def unstoppable(
    method: Callable[Concatenate[F, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[F, P], Coroutine[Any, Any, T]]:
    """Make a coroutine method run to its end even if its caller is cancelled.

    For a write to the store and the in-memory state that mirrors it: cancelled between the
    two (a client that went away, the shutdown grace running out), memory would disagree with
    the disk until a restart.
    """

    async def run_to_end(self: F, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self.finishing.run(method(self, *args, **kwargs))

    return functools.update_wrapper(run_to_end, method)
