"""Running the server process: listener, signals, systemd notifications, reload, shutdown.

Order of events:

1. ``runner.setup()`` runs the cleanup contexts' start: store opened and migrated, clients
   and background services started.
2. The TCP site starts listening; only then ``READY=1`` goes to systemd. When systemd set a
   watchdog, ``WATCHDOG=1`` follows at half its period from a task on the event loop, and only
   while the store answers: a stalled loop or a stuck database misses the deadline and systemd
   restarts the service.
3. SIGHUP: ``RELOADING=1``; the config file is read again and, if valid, made live (see
   :func:`daemon.app.apply_config`); an invalid one is logged and the old one stays; ``READY=1``.
4. SIGTERM or SIGINT: ``STOPPING=1``; the listener closes, in-flight requests get
   ``server.shutdown_grace`` seconds, then are cancelled (an upload keeps what it committed);
   the cleanup contexts stop loops and workers, flush what is pending and close the store.
   Exit 0. A second SIGTERM or SIGINT during shutdown exits at once with status 1.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sqlite3
import time
from pathlib import Path

import structlog
from aiohttp import web

from daemon import __version__
from daemon.app import apply_config, create_app
from daemon.config import Config, load
from daemon.errors import ConfigError, DaemonError
from daemon.keys import DATABASE
from daemon.middleware import AccessLogger
from daemon.systemd import notify, watchdog_period

log = structlog.get_logger(__name__)


async def serve(config: Config, config_path: str | Path | None = None) -> int:
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
    background: set[asyncio.Task[None]] = set()

    def on_stop(signum: signal.Signals) -> None:
        if stop.is_set():
            log.warning("daemon.forced_exit", signal=signum.name)
            os._exit(1)
        log.info("daemon.stopping", signal=signum.name)
        stop.set()

    reloading = asyncio.Lock()  # one reload at a time, in signal order: the newest file wins

    def on_reload() -> None:
        if config_path is None or stop.is_set():
            return
        task = asyncio.create_task(_reload(app, config_path, reloading))
        background.add(task)
        task.add_done_callback(background.discard)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_stop, signum)
    loop.add_signal_handler(signal.SIGHUP, on_reload)
    try:
        try:
            await runner.setup()
            site = web.TCPSite(runner, config.listen_host, config.listen_port, reuse_address=True)
            await site.start()
        except (OSError, sqlite3.Error, DaemonError) as exc:
            log.error("daemon.start_failed", reason=str(exc))
            await runner.cleanup()
            return 1
        log.info(
            "daemon.started",
            listen=config.server.listen,
            site_url=config.server.site_url,
            version=__version__,
            pid=os.getpid(),
        )
        _tune_gc()
        notify("READY=1", f"STATUS=listening on {config.server.listen}")
        if (period := watchdog_period()) is not None:
            background.add(asyncio.create_task(_watchdog(app, period), name="systemd.watchdog"))
        await stop.wait()
        notify("STOPPING=1")
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await runner.cleanup()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
    log.info("daemon.stopped")
    return 0


def _tune_gc() -> None:
    """Fewer, cheaper garbage collections for a long-running server.

    What exists once the daemon is up (modules, the remotes) lives as long as the process, so
    it is moved out of the collector's sight (``gc.freeze``); and the youngest generation is
    collected every 10,000 allocations rather than 700. Full collections used to pause the loop
    for 15-35 ms every few seconds under a thousand pings a second.
    """
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(10_000, middle, oldest)


async def _reload(app: web.Application, config_path: str | Path, lock: asyncio.Lock) -> None:
    """Re-read the config file; apply it if valid, keep the running one if not."""
    async with lock:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        notify("RELOADING=1", f"MONOTONIC_USEC={usec}")
        try:
            new = await asyncio.to_thread(load, config_path)
        except ConfigError as exc:
            log.error("config.reload_failed", reason=str(exc), kept="the running configuration")
        else:
            fixed = apply_config(app, new)
            log.info("config.reloaded", path=str(config_path))
            if fixed:
                log.warning("config.restart_needed", keys=fixed,
                            reason="these apply at the next start")  # fmt: skip
        notify("READY=1")


async def _watchdog(app: web.Application, period: float) -> None:
    """``WATCHDOG=1`` every ``period`` seconds while the event loop and the store respond."""
    db = app[DATABASE]
    while True:
        await asyncio.sleep(period)
        try:
            async with asyncio.timeout(period):
                await db.scalar("SELECT 1")
        except (TimeoutError, sqlite3.Error) as exc:
            log.warning("systemd.watchdog_skipped", reason=type(exc).__name__)
            continue
        notify("WATCHDOG=1")
