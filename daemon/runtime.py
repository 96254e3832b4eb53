"""Running the server process: listener, signals, readiness and graceful shutdown.

Order of events:

1. ``runner.setup()`` runs the cleanup contexts' start: store opened and migrated, clients
   and background services started.
2. The TCP site starts listening; only then ``READY=1`` goes to systemd.
3. SIGTERM or SIGINT: ``STOPPING=1``; the listener closes, in-flight requests get
   ``server.shutdown_grace`` seconds, then are cancelled; the cleanup contexts stop background
   tasks and close the store. Exit 0.
4. A second SIGTERM or SIGINT during shutdown exits at once with status 1.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3

import structlog
from aiohttp import web

from daemon import __version__
from daemon.app import create_app
from daemon.config import Config
from daemon.errors import DaemonError
from daemon.middleware import AccessLogger
from daemon.systemd import notify

log = structlog.get_logger(__name__)


async def serve(config: Config) -> int:
    """Serve until SIGTERM or SIGINT; return the process exit status."""
    app = create_app(config)
    runner = web.AppRunner(
        app,
        access_log_class=AccessLogger,
        handler_cancellation=True,
        shutdown_timeout=config.server.shutdown_grace,
        keepalive_timeout=config.server.keepalive_timeout,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: signal.Signals) -> None:
        if stop.is_set():
            log.warning("daemon.forced_exit", signal=signum.name)
            os._exit(1)
        log.info("daemon.stopping", signal=signum.name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        try:
            await runner.setup()
            site = web.TCPSite(runner, config.listen_host, config.listen_port, reuse_address=True)
            await site.start()
        except (OSError, sqlite3.Error, DaemonError) as exc:
            log.error("daemon.start_failed", reason=str(exc))  # noqa: TRY400 - no traceback for a known cause
            await runner.cleanup()
            return 1
        log.info(
            "daemon.started",
            listen=config.server.listen,
            site_url=config.server.site_url,
            version=__version__,
            pid=os.getpid(),
        )
        notify("READY=1", f"STATUS=listening on {config.server.listen}")
        await stop.wait()
        notify("STOPPING=1")
        await runner.cleanup()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    log.info("daemon.stopped")
    return 0
