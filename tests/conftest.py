"""Shared fixtures: configs, in-process apps on a real SQLite file, HTTP sessions."""

from __future__ import annotations

import contextlib
import logging
import re
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import tomli_w
from aiohttp.test_utils import TestClient

from daemon import invites
from daemon import logging as daemon_logging
from daemon.app import create_app
from daemon.config import Config, parse
from daemon.errors import InviteError
from tests.helpers import INVITES, SECRETS, Api, config_dict, free_port

AppClient = Callable[..., Awaitable[TestClient[Any, Any]]]


class _Collector(logging.Handler):
    """Keeps every formatted log line of in-process apps, for the secrets check."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


COLLECTOR = _Collector()


@pytest.fixture(autouse=True, scope="session")
def _logging() -> None:
    """In-process apps log through the daemon's own pipeline (redaction included)."""
    daemon_logging.configure("debug", "json")
    root = logging.getLogger()
    COLLECTOR.setFormatter(root.handlers[0].formatter)
    root.addHandler(COLLECTOR)


def _tokens_in_databases(root: Path) -> set[str]:
    """The plaintext tokens daemons keep (the ones they present to peers)."""
    found: set[str] = set()
    for path in root.rglob("remoteclusterd.db"):
        with contextlib.closing(sqlite3.connect(path)) as conn, contextlib.suppress(sqlite3.Error):
            found.update(
                row[0] for row in conn.execute("SELECT remote_token FROM remote_clusters") if row[0]
            )
    return found


@pytest.fixture(autouse=True)
def _no_secret_in_logs(tmp_path: Path) -> Iterator[None]:
    """After every test: no log line (in-process or a daemon process's) holds a secret.

    The secrets are every token, password and invite the test handled or a daemon stores,
    and the invite tokens inside the invites the test saw.
    """
    start = len(COLLECTOR.lines)
    invites_before = len(INVITES)
    yield
    secrets = set(SECRETS) | _tokens_in_databases(tmp_path)
    for code, password in INVITES[invites_before:]:
        with contextlib.suppress(InviteError):
            secrets.add(invites.decrypt(code, password).token)
    lines = COLLECTOR.lines[start:]
    for log_file in tmp_path.rglob("daemon.log"):
        lines += log_file.read_text(errors="replace").splitlines()
    pattern = re.compile("|".join(re.escape(s) for s in sorted(secrets) if len(s) >= 8))
    leaks = [line for line in lines if pattern.search(line)]
    assert not leaks, f"secret in a log line: {leaks[0][:300]}"
    del COLLECTOR.lines[start:]


def make_config(data_dir: Path, port: int = 8065, **sections: dict[str, Any]) -> Config:
    """A validated Config for an in-process app."""
    return parse(tomli_w.dumps(config_dict(data_dir, port, **sections)), data_dir.parent)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def app_client(aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path) -> AppClient:
    """Start an in-process daemon app (real SQLite under tmp_path) and return its client."""
    count = 0

    async def start(**sections: dict[str, Any]) -> TestClient[Any, Any]:
        nonlocal count
        count += 1
        port = free_port()
        config = make_config(tmp_path / f"app{count}" / "var", port, **sections)
        server = await aiohttp_server(create_app(config), port=port)
        client: TestClient[Any, Any] = await aiohttp_client(server)
        return client

    return start


@pytest.fixture
async def client(app_client: AppClient) -> TestClient[Any, Any]:
    return await app_client()


@pytest.fixture
def api(client: TestClient[Any, Any]) -> Api:
    """The operator API of the default in-process app."""
    return Api(client.session, str(client.make_url("")).rstrip("/"))
