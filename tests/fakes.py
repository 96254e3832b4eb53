"""Small real servers the daemons talk to: a scripted peer and a local event/topic application.

They run in the test process on 127.0.0.1 and speak real HTTP; they stand in for the parts a
test cannot run (a Mattermost server, a peer that hangs, an operator's application).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from daemon import invites
from daemon.ids import new_id
from daemon.models import InvitePayload, now_ms
from tests.helpers import SECRETS, eventually


@dataclass
class FakePeer:
    """A peer that plays the inviter's side of the handshake and answers pings.

    ``hang`` makes ``/ping`` accept the request and never answer; ``skew_ms`` shifts the
    ``recv_at`` it reports, as a peer with a wrong clock would.
    """

    hang: bool = False
    skew_ms: int = 0
    remote_id: str = field(default_factory=new_id)
    invite_token: str = field(default_factory=new_id)
    expected_token: str = ""  # what the daemon presents after the handshake (T3)
    token_for_daemon: str = ""  # what we present to the daemon (T2)
    daemon_url: str = ""
    pings: list[float] = field(default_factory=list)
    frames: list[dict[str, Any]] = field(default_factory=list)
    # Mattermost's upload receiver: sessions by id, their bytes, and a one-time cut-off.
    upload_sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    upload_data: dict[str, bytearray] = field(default_factory=dict)
    cut_first_upload_after: int | None = None
    in_flight: int = 0
    max_in_flight: int = 0
    url: str = ""
    _runner: web.AppRunner | None = None
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    def invite(self, password: str) -> str:
        payload = InvitePayload(
            remote_id=self.remote_id, site_url=self.url, token=self.invite_token, version=3
        )
        return invites.encrypt(payload, password)

    def _authorized(self, request: web.Request, token: str) -> bool:
        return (
            request.headers.get("X-RemoteCluster-Id") == self.remote_id
            and request.headers.get("X-RemoteCluster-Token") == token
            and "Authorization" not in request.headers
            and "Cookie" not in request.headers
        )

    async def _confirm(self, request: web.Request) -> web.Response:
        if not self._authorized(request, self.invite_token):
            return web.json_response({"id": "api.context.invalid_token.error"}, status=401)
        frame = await request.json()
        payload = frame["msg"]["payload"]
        self.expected_token = payload["refreshed_token"]
        self.token_for_daemon = payload["token"]
        SECRETS.update({self.expected_token, self.token_for_daemon})
        self.daemon_url = payload["site_url"]
        return web.json_response({"status": "OK"})

    async def _ping(self, request: web.Request) -> web.Response:
        if not self._authorized(request, self.expected_token):
            return web.json_response({"id": "api.context.invalid_token.error"}, status=401)
        self.pings.append(time.monotonic())
        frame = await request.json()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.hang:
                await self._release.wait()
        finally:
            self.in_flight -= 1
        return web.json_response(
            {"sent_at": frame["msg"]["payload"]["sent_at"], "recv_at": now_ms() + self.skew_ms}
        )

    async def _msg(self, request: web.Request) -> web.Response:
        if not self._authorized(request, self.expected_token):
            return web.json_response({"id": "api.context.invalid_token.error"}, status=401)
        frame = await request.json()
        self.frames.append(frame)
        if frame["msg"]["topic"] == "sharedchannel_upload":
            session = dict(frame["msg"]["payload"])
            self.upload_sessions[session["id"]] = session
            self.upload_data[session["id"]] = bytearray()
            return web.json_response({"status": "OK", "err": "", "payload": session})
        return web.json_response({"status": "OK", "err": "", "payload": None})

    async def _upload(self, request: web.Request) -> web.StreamResponse:
        """Mattermost's uploadRemoteData: append at its own offset; no Upload-Offset, no HEAD."""
        if not self._authorized(request, self.expected_token):
            return web.json_response({"id": "api.context.invalid_token.error"}, status=401)
        upload_id = request.match_info["upload_id"]
        session = self.upload_sessions.get(upload_id)
        if session is None:
            return web.json_response({"id": "app.upload.get.app_error"}, status=404)
        data = self.upload_data[upload_id]
        cut = self.cut_first_upload_after
        async for chunk in request.content.iter_any():
            data += chunk
            if cut is not None and len(data) >= cut:
                self.cut_first_upload_after = None
                assert request.transport is not None
                request.transport.abort()  # the connection breaks mid-body; bytes kept
                return web.Response(status=500)
        if len(data) < session["file_size"]:
            return web.Response(status=204)
        info = {
            "id": session["req_file_id"],
            "size": len(data),
            "name": session["filename"],
            "remote_id": self.remote_id,
        }
        return web.json_response(info)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/api/v4/remotecluster/confirm_invite", self._confirm)
        app.router.add_post("/api/v4/remotecluster/msg", self._msg)
        app.router.add_post("/api/v4/remotecluster/upload/{upload_id}", self._upload)
        app.router.add_post("/api/v4/remotecluster/ping", self._ping)
        # A request the daemon gives up on is cancelled here too, so in_flight stays true.
        self._runner = web.AppRunner(app, shutdown_timeout=0.1, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()


@asynccontextmanager
async def fake_peers(*peers: FakePeer) -> AsyncIterator[tuple[FakePeer, ...]]:
    try:
        for peer in peers:
            await peer.start()
        yield peers
    finally:
        for peer in peers:
            await peer.stop()


class LocalApp:
    """A local application: records every JSON document POSTed to it, by path."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _record(self, request: web.Request) -> web.Response:
        self.received.append((request.path, json.loads(await request.read())))
        return web.Response(status=204)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        return [
            doc
            for path, doc in self.received
            if path == "/events" and (name is None or doc.get("event") == name)
        ]

    async def wait_events(
        self, name: str, count: int, timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        await eventually(lambda: len(self.events(name)) >= count, timeout=timeout)
        return self.events(name)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._record)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@asynccontextmanager
async def local_app() -> AsyncIterator[LocalApp]:
    app = LocalApp()
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


@dataclass
class Answer:
    """How a :class:`ScriptedApp` answers: a status and a body, after an optional delay."""

    status: int = 200
    body: bytes = b""
    delay: float = 0.0


class ScriptedApp(LocalApp):
    """A local application whose answers a test sets per path (default: 200, empty body)."""

    def __init__(self) -> None:
        super().__init__()
        self.answers: dict[str, Answer] = {}
        self.refused: list[tuple[str, dict[str, Any]]] = []

    def messages(self, path: str = "/topic") -> list[dict[str, Any]]:
        """The messages the application took (answered 2xx), in arrival order."""
        return [doc for p, doc in self.received if p == path]

    def msg_ids(self, path: str = "/topic") -> list[str]:
        return [doc["msg"]["id"] for doc in self.messages(path)]

    async def _record(self, request: web.Request) -> web.Response:
        answer = self.answers.get(
            request.path, Answer(status=204 if request.path == "/events" else 200)
        )
        if answer.delay:
            await asyncio.sleep(answer.delay)
        doc = json.loads(await request.read())
        (self.received if answer.status < 300 else self.refused).append((request.path, doc))
        return web.Response(status=answer.status, body=answer.body, content_type="application/json")


@asynccontextmanager
async def scripted_app() -> AsyncIterator[ScriptedApp]:
    app = ScriptedApp()
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


class FaultProxy:
    """A TCP proxy to a daemon that can break a request after some bytes.

    After ``cut_after(n)``, the first connection (new or kept alive) that carries ``n`` more
    bytes from the client to the server is dropped there (a network failure mid-body).
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._cut: int | None = None
        self._server: asyncio.Server | None = None
        self.cuts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut_after(self, size: int) -> None:
        self._cut = size

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: bool
    ) -> None:
        carried = 0
        armed_at: int | None = None
        try:
            while data := await reader.read(65536):
                if upstream and self._cut is not None:
                    armed_at = carried if armed_at is None else armed_at
                    room = self._cut - (carried - armed_at)
                    if len(data) >= room:
                        self._cut = None
                        writer.write(data[:room])
                        await writer.drain()
                        self.cuts += 1
                        break
                carried += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.close()
            return
        upstream = asyncio.create_task(self._pipe(client_r, server_w, True))
        downstream = asyncio.create_task(self._pipe(server_r, client_w, False))
        await asyncio.wait({upstream, downstream}, return_when=asyncio.FIRST_COMPLETED)
        for task in (upstream, downstream):
            task.cancel()
        client_w.close()
        server_w.close()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
