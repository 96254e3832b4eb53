"""Test helpers: configs, real daemon processes, waiting for conditions, API calls."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import tomli_w
from prometheus_client.parser import text_string_to_metric_families

OPERATOR_TOKEN = "test-operator-token-0123456789abcdef"
READER_TOKEN = "test-reader-token-0123456789abcdef"
TEAM_ID = "teamidteamidteamidteamid12"
API = "/api/v4/remotecluster"
DB_FILE = "remoteclusterd.db"


# Every token, password and invite a test handles: no log line may contain one.
SECRETS: set[str] = {OPERATOR_TOKEN, READER_TOKEN}
INVITES: list[tuple[str, str]] = []  # (invite, password): their tokens are checked too


def remember_secrets(*docs: Any) -> None:
    """Note the passwords and invites in API requests and answers."""
    found = {}
    for doc in docs:
        if isinstance(doc, dict):
            for key in ("password", "invite"):
                if isinstance(doc.get(key), str) and doc[key]:
                    found[key] = doc[key]
                    SECRETS.add(doc[key])
    if "invite" in found and "password" in found:
        INVITES.append((found["invite"], found["password"]))


def assert_no_tokens(body: Any) -> None:
    """No API answer carries a token: the keys stay, with empty strings."""
    if isinstance(body, dict):
        for key in ("token", "remote_token"):
            assert body.get(key, "") == "", f"{key} leaked in {body}"
        for value in body.values():
            assert_no_tokens(value)
    elif isinstance(body, list):
        for value in body:
            assert_no_tokens(value)


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def config_dict(data_dir: Path, port: int, **sections: dict[str, Any]) -> dict[str, Any]:
    """A daemon config as a dict; ``sections`` update (or add) whole tables."""
    cfg: dict[str, Any] = {
        "server": {"listen": f"127.0.0.1:{port}", "site_url": f"http://127.0.0.1:{port}"},
        "storage": {"data_dir": str(data_dir)},
        "log": {"format": "json", "level": "debug"},
        "operators": [
            {
                "name": "ops",
                "token_sha256": sha256(OPERATOR_TOKEN),
                "permissions": ["manage_secure_connections", "manage_shared_channels"],
            },
            {
                "name": "reader",
                "token_sha256": sha256(READER_TOKEN),
                "permissions": ["manage_shared_channels"],
            },
        ],
    }
    for name, table in sections.items():
        if isinstance(table, dict) and isinstance(cfg.get(name), dict):
            cfg[name] = {**cfg[name], **table}
        else:
            cfg[name] = table
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(tomli_w.dumps(cfg))
    return path


async def eventually(
    predicate: Callable[[], Awaitable[bool] | bool], *, timeout: float = 10.0, every: float = 0.02
) -> None:
    """Wait until ``predicate()`` is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(every)


class DaemonProcess:
    """A real ``python -m daemon serve`` process on a loopback port."""

    def __init__(self, root: Path, name: str, **sections: dict[str, Any]) -> None:
        self.root = root / name
        self.root.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = self.root / "var"
        self.config_path = self.root / "config.toml"
        self.log_path = self.root / "daemon.log"
        self.sections = sections
        self.proc: subprocess.Popen[bytes] | None = None
        self.write_config()

    def write_config(self, **sections: dict[str, Any]) -> None:
        self.sections = {**self.sections, **sections}
        write_config(self.config_path, config_dict(self.data_dir, self.port, **self.sections))

    async def start(self, *, wait: bool = True, env: dict[str, str] | None = None) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(  # noqa: ASYNC220 - the process outlives this call
            [sys.executable, "-m", "daemon", "serve", "--config", str(self.config_path)],
            stdout=log,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        log.close()
        if wait:
            await self.wait_healthy()

    async def wait_healthy(self, timeout: float = 20.0) -> None:
        async def healthy() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.logs()}"
                )
            try:
                async with aiohttp.ClientSession() as s, s.get(f"{self.url}/healthz") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await eventually(healthy, timeout=timeout, every=0.05)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    async def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        await eventually(
            lambda: self.proc is not None and self.proc.poll() is not None, timeout=timeout
        )
        return int(self.proc.returncode)

    async def stop(self) -> int:
        """SIGTERM and wait for the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.signal(signal.SIGTERM)
        return await self.wait_exit()

    async def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            await self.wait_exit()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def db(self) -> sqlite3.Connection:
        """A read connection to the daemon's SQLite file (WAL allows it while it runs)."""
        conn = sqlite3.connect(self.data_dir / DB_FILE, timeout=5)
        conn.row_factory = sqlite3.Row
        return conn

    def row(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Row | None:
        with contextlib.closing(self.db()) as conn:
            return conn.execute(sql, params).fetchone()


class Api:
    """A small client for one daemon's HTTP API."""

    def __init__(
        self, session: aiohttp.ClientSession, base_url: str, token: str | None = OPERATOR_TOKEN
    ):
        self.session = session
        self.base_url = base_url
        self.token = token

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return {**headers, **(extra or {})}

    async def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """Return (status, parsed JSON body or None)."""
        async with self.session.request(
            method,
            self.base_url + path,
            json=json,
            data=data,
            headers=self.headers(headers),
            params=params,
        ) as resp:
            raw = await resp.read()
            body = None
            if raw:
                try:
                    body = await resp.json(content_type=None)
                except ValueError:
                    body = raw
            assert_no_tokens(body)
            remember_secrets(json, body)
            return resp.status, body

    async def create(self, name: str = "peer", **extra: Any) -> dict[str, Any]:
        status, body = await self.call(
            "POST", API, json={"name": name, "default_team_id": TEAM_ID, **extra}
        )
        assert status == 201, body
        return dict(body)

    async def accept(self, invite: str, password: str, name: str = "inviter") -> tuple[int, Any]:
        return await self.call(
            "POST",
            f"{API}/accept_invite",
            json={"name": name, "default_team_id": TEAM_ID, "invite": invite, "password": password},
        )

    async def remotes(self, **params: str) -> list[dict[str, Any]]:
        status, body = await self.call("GET", API, params=params)
        assert status == 200, body
        return list(body)


async def transport_call(
    session: aiohttp.ClientSession,
    url: str,
    path: str,
    body: Any,
    *,
    remote_id: str | None,
    token: str | None,
) -> tuple[int, Any]:
    """POST to a transport endpoint with remote-cluster credentials (None: header absent)."""
    headers = {}
    if remote_id is not None:
        headers["X-RemoteCluster-Id"] = remote_id
    if token is not None:
        headers["X-RemoteCluster-Token"] = token
    async with session.post(url + path, json=body, headers=headers) as resp:
        raw = await resp.read()
        return resp.status, (await resp.json(content_type=None)) if raw else None


def ping_frame(remote_id: str, msg_id: str, sent_at: int = 1) -> dict[str, Any]:
    return {
        "remote_id": remote_id,
        "msg": {
            "id": msg_id,
            "topic": "ping",
            "create_at": sent_at,
            "payload": {"sent_at": sent_at, "recv_at": 0},
        },
    }


@contextlib.asynccontextmanager
async def daemons(
    root: Path, *names: str, **sections: dict[str, Any]
) -> AsyncIterator[list[DaemonProcess]]:
    """Start daemons side by side, all with the same config sections."""
    async with running(*(DaemonProcess(root, name, **sections) for name in names)) as procs:
        yield procs


@contextlib.asynccontextmanager
async def running(*procs: DaemonProcess) -> AsyncIterator[list[DaemonProcess]]:
    """Start daemon processes; stop them (SIGTERM, then SIGKILL) on exit."""
    try:
        await asyncio.gather(*(p.start() for p in procs))
        yield list(procs)
    finally:
        for p in procs:
            if p.proc is not None and p.proc.poll() is None:
                p.proc.send_signal(signal.SIGTERM)
        for p in procs:
            if p.proc is not None:
                try:
                    p.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.proc.kill()
                    p.proc.wait()


async def link(api_a: Api, api_b: Api, password: str = "correct-horse-battery") -> str:
    """Create on A, accept on B; return the shared remote id."""
    created = await api_a.create("peer-b", password=password)
    status, body = await api_b.accept(created["invite"], password, name="peer-a")
    assert status == 201, body
    return str(body["remote_id"])


async def metrics(
    session: aiohttp.ClientSession, url: str
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Scrape /metrics and parse it with prometheus-client's own parser."""
    async with session.get(url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def sample(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    """The value of the one series of ``name`` whose labels include ``labels`` (0 if none)."""
    wanted = set(labels.items())
    found = [v for (n, ls), v in samples.items() if n == name and wanted <= set(ls)]
    assert len(found) <= 1, f"{name} {labels} matches {len(found)} series"
    return found[0] if found else 0.0
