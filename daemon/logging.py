"""Structured logs: structlog over the standard library, one stream on stderr.

Event names are stable dotted identifiers (``remote.confirmed``, ``http.request``,
``auth.refused``) with key/value context; the request id is bound through contextvars and so
appears on every line a request causes. ``json`` renders one JSON object per line (for
journald and log shippers); ``console`` renders aligned, readable lines.

Secrets never reach a renderer: :func:`redact` masks every value whose key names a token,
password, secret, invite or authorization, recursively. Under systemd (``JOURNAL_STREAM``
set) each line starts with its syslog priority (``<4>`` for warnings), so
``journalctl -p warning`` works on JSON lines.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

_SECRET_KEY = re.compile(r"token|password|passwd|secret|invite|authorization|cookie", re.I)
_MASK = "[redacted]"
# Event names may mention invites ("remote.invite_generated"); only values are secrets.
_NOT_SECRET = frozenset({"event"})


def _mask(value: Any) -> Any:
    if isinstance(value, MutableMapping):
        return {k: _MASK if _is_secret(k) else _mask(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mask(v) for v in value]
    return value


def _is_secret(key: object) -> bool:
    return isinstance(key, str) and key not in _NOT_SECRET and bool(_SECRET_KEY.search(key))


def redact(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Mask the values of secret-looking keys, at any depth."""
    return {k: _MASK if _is_secret(k) else _mask(v) for k, v in event_dict.items()}


class _PriorityFormatter(structlog.stdlib.ProcessorFormatter):
    """Prefix each line with ``<N>`` so journald files it under the right priority."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        level = record.levelno
        priority = 3 if level >= logging.ERROR else 4 if level >= logging.WARNING else 6
        if level < logging.INFO:
            priority = 7
        return f"<{priority}>{line}"


def configure(level: str = "info", fmt: str = "console") -> None:
    """Set up structlog and the stdlib root logger (called again on reload).

    The structlog chain is the same for both formats (so loggers can be cached); the format
    lives in the handler's formatter, which a reload replaces.
    """
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    final: list[Processor]
    if fmt == "json":
        # Tracebacks without local variables: a frame's locals can hold a token.
        tracebacks = structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        )
        final = [tracebacks, structlog.processors.JSONRenderer()]
    else:
        final = [
            structlog.dev.ConsoleRenderer(
                colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
            )
        ]
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.processors.StackInfoRenderer(),
            redact,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter_class = (
        _PriorityFormatter
        if os.environ.get("JOURNAL_STREAM")
        else structlog.stdlib.ProcessorFormatter
    )
    formatter = formatter_class(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder(), redact],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiohttp's own access logger is replaced by daemon.middleware.AccessLogger, and
    # aiosqlite's debug lines carry SQL parameters (tokens among them): never below warning.
    for name in ("aiohttp.access", "aiosqlite"):
        logging.getLogger(name).setLevel(logging.WARNING)
