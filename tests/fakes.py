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
from tests.helpers import eventually


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
        self.frames.append(await request.json())
        return web.json_response({"status": "OK", "err": "", "payload": None})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/api/v4/remotecluster/confirm_invite", self._confirm)
        app.router.add_post("/api/v4/remotecluster/msg", self._msg)
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
