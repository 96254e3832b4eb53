"""Starting background work without the context of whoever started it.

A worker started while a request is being handled (a ping loop after a confirmation, an
outbox worker after the first message) would otherwise inherit that request's contextvars,
and its request id would label every log line the worker writes for the rest of its life.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def background(coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
    """Start ``coro`` as a task in a fresh, empty context."""
    return asyncio.create_task(coro, name=name, context=contextvars.Context())
