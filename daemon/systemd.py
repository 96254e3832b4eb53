"""The few lines of systemd's notify protocol the daemon needs (no libsystemd).

:func:`notify` sends ``READY=1``, ``STOPPING=1``, ``WATCHDOG=1``... as one datagram to
``$NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract namespace). Outside systemd it does
nothing. A failure to notify is logged, never raised: the daemon keeps serving.
"""

from __future__ import annotations

import os
import socket

import structlog

log = structlog.get_logger(__name__)


def notify(*states: str) -> bool:
    """Send ``states`` to systemd; return whether a notify socket was there to send to."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(states).encode("utf-8"))
    except OSError as exc:
        log.warning("systemd.notify_failed", states=list(states), error=str(exc))
        return False
    return True


def watchdog_period() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half the deadline), or ``None`` when off."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    return int(usec) / 2_000_000
