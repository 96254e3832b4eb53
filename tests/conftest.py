"""Shared fixtures: configs, in-process apps on a real SQLite file, HTTP sessions."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import tomli_w
from aiohttp.test_utils import TestClient

from daemon import logging as daemon_logging
from daemon.app import create_app
from daemon.config import Config, parse
from tests.helpers import Api, config_dict, free_port

AppClient = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture(autouse=True, scope="session")
def _logging() -> None:
    """In-process apps log through the daemon's own pipeline (redaction included)."""
    daemon_logging.configure("debug", "json")


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
