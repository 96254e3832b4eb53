"""``create_app(config)``: builds the aiohttp application without doing any I/O.

Resources and background tasks live in cleanup contexts, in dependency order: the store
first, then the outbound HTTP session and the event sender, then the services that use them.
aiohttp runs the contexts' exits in reverse and only for those whose start succeeded.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import msgspec
import structlog
from aiohttp import web

from daemon import __version__
from daemon import logging as daemon_logging
from daemon.auth import OperatorAuth
from daemon.config import Config
from daemon.events import EventSink
from daemon.filesend import FileSender
from daemon.filestore import FileStore
from daemon.heartbeat import Heartbeat
from daemon.httplite import LiteClient
from daemon.inbound import Inbound
from daemon.keys import (
    DATABASE,
    EVENTS,
    FILE_SENDER,
    FILESTORE,
    FORWARDER,
    HEARTBEAT,
    INBOUND,
    LINKS,
    LOCAL_HTTP,
    METRICS,
    OPERATORS,
    OUTBOX,
    PEERS,
    REMOTES,
    SETTINGS,
    UPLOADS,
    WRITER,
)
from daemon.links import LinkService
from daemon.metrics import Metrics
from daemon.middleware import auth_middleware, request_context
from daemon.models import Remote
from daemon.outbox import Outbox
from daemon.peers import PeerClient, client_session
from daemon.remotes import Change, Remotes
from daemon.routes import setup_routes
from daemon.settings import Settings
from daemon.store import Database, GroupCommit
from daemon.upload_sessions import UploadSessions
from daemon.uploads import Uploads

log = structlog.get_logger(__name__)


def create_app(config: Config) -> web.Application:
    """Build the daemon's application for ``config``; nothing starts until it runs."""
    app = web.Application(
        middlewares=[request_context, auth_middleware],
        client_max_size=config.server.max_frame_size,
    )
    settings = Settings(config)
    app[SETTINGS] = settings
    app[OPERATORS] = OperatorAuth(settings)
    app[METRICS] = Metrics()
    setup_routes(app)
    app.cleanup_ctx.append(_store)
    app.cleanup_ctx.append(_clients)
    app.cleanup_ctx.append(_services)
    return app


def apply_config(app: web.Application, new: Config) -> list[str]:
    """Make a reloaded config live; return the keys whose change needs a restart.

    Operators, topic routes, heartbeat timing, limits, the events hook, metrics access and the
    log level apply at once (every component reads the live config). The listener, the data
    folder and the server's connection settings stay as they were until the next start.
    """
    old = app[SETTINGS].config
    fixed = [
        f"{section}.{key}"
        for section, key in (
            ("server", "listen"),
            ("server", "keepalive_timeout"),
            ("server", "shutdown_grace"),
            ("storage", "data_dir"),
        )
        if getattr(getattr(old, section), key) != getattr(getattr(new, section), key)
    ]
    server = msgspec.structs.replace(
        new.server,
        listen=old.server.listen,
        keepalive_timeout=old.server.keepalive_timeout,
        shutdown_grace=old.server.shutdown_grace,
    )
    app[SETTINGS].config = msgspec.structs.replace(new, server=server, storage=old.storage)
    daemon_logging.configure(new.log.level, new.log.format)
    return fixed


async def _store(app: web.Application) -> AsyncIterator[None]:
    config = app[SETTINGS].config
    async with contextlib.AsyncExitStack() as opened:
        db = await Database.open(config.data_dir)
        # Closed last, also when a commit failed: the database thread must not outlive us.
        opened.push_async_callback(_close_store, db)
        app[DATABASE] = db
        writer = GroupCommit(db)
        app[WRITER] = writer
        writer.start()
        opened.push_async_callback(writer.stop)
        remotes = Remotes(db)
        opened.push_async_callback(remotes.stop)
        await remotes.load()
        app[REMOTES] = remotes
        log.info("store.opened", path=str(db.path), remotes=len(remotes.all()))
        yield


async def _close_store(db: Database) -> None:
    await db.close()
    log.info("store.closed")


async def _clients(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    agent = f"remoteclusterd/{__version__}"
    async with (
        client_session(agent, limit_per_host=8) as peer_session,
        client_session(agent, limit_per_host=64) as local_session,
    ):
        peer_lite = LiteClient()
        app[PEERS] = PeerClient(peer_session, peer_lite, settings)
        app[LOCAL_HTTP] = local_session
        app[FORWARDER] = forwarder = LiteClient()
        events = EventSink(settings, local_session)
        app[EVENTS] = events
        events.start()
        yield
        await events.stop()
        forwarder.close()
        peer_lite.close()


async def _services(app: web.Application) -> AsyncIterator[None]:
    remotes, events = app[REMOTES], app[EVENTS]
    app[LINKS] = LinkService(app[SETTINGS], remotes, app[PEERS])

    def on_change(change: Change, remote: Remote) -> None:
        events.emit(f"remote.{change.value}", remote)

    remotes.subscribe(on_change)
    heartbeat = Heartbeat(app[SETTINGS], remotes, events, app[METRICS])
    app[HEARTBEAT] = heartbeat
    inbound = Inbound(app[SETTINGS], app[DATABASE], app[WRITER], app[FORWARDER])
    app[INBOUND] = inbound
    outbox = Outbox(
        app[SETTINGS], app[DATABASE], app[WRITER], remotes, app[PEERS], events, app[METRICS]
    )
    app[OUTBOX] = outbox
    heartbeat.subscribe(outbox.wake)
    store = FileStore(app[SETTINGS].config.data_dir)
    app[FILESTORE] = store
    uploads = Uploads(app[SETTINGS], app[DATABASE], store, remotes, events, app[METRICS])
    app[UPLOADS] = uploads
    UploadSessions(app[SETTINGS], app[DATABASE], store, app[METRICS], inbound, uploads)
    sender = FileSender(
        app[SETTINGS], app[DATABASE], store, remotes, app[PEERS], events, app[METRICS]
    )
    app[FILE_SENDER] = sender
    heartbeat.subscribe(sender.wake)
    # Each service is stopped (in reverse) only if it started, and one failing to stop does
    # not keep the others running while the store and the client sessions close under them.
    async with contextlib.AsyncExitStack() as running:
        await uploads.start()
        running.push_async_callback(uploads.stop)
        await sender.start()
        running.push_async_callback(sender.stop)
        await outbox.start()
        running.push_async_callback(outbox.stop)
        inbound.start()
        running.push_async_callback(inbound.stop, app[SETTINGS].config.server.shutdown_grace)
        heartbeat.start()
        running.push_async_callback(heartbeat.stop)
        lag = asyncio.create_task(app[METRICS].watch_loop_lag(), name="metrics.loop_lag")
        running.push_async_callback(_cancel, lag)
        # First to stop: a confirmation it finishes starts a ping loop.
        running.push_async_callback(app[LINKS].stop)
        yield


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
