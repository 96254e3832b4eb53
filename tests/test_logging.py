"""Logs: secrets are masked before rendering, whatever the nesting, and events keep their names."""

from __future__ import annotations

import json
import logging

import structlog

from daemon.logging import redact
from tests.conftest import COLLECTOR


def test_redact_masks_secret_keys_at_any_depth() -> None:
    event = {
        "event": "remote.invite_generated",
        "token": "t0ps3cret",
        "remote_token": "x",
        "nested": {"password": "p", "list": [{"Authorization": "Bearer abc"}], "ok": 1},
        "invite": "abc",
        "name": "visible",
    }
    masked = redact(None, "info", event)
    assert masked["event"] == "remote.invite_generated" and masked["name"] == "visible"
    assert masked["token"] == masked["remote_token"] == masked["invite"] == "[redacted]"
    assert masked["nested"]["password"] == "[redacted]" and masked["nested"]["ok"] == 1
    assert masked["nested"]["list"][0]["Authorization"] == "[redacted]"


def test_rendered_lines_never_carry_masked_values() -> None:
    start = len(COLLECTOR.lines)
    structlog.get_logger("test").warning(
        "test.secret", token="do-not-show-1234", detail={"password": "hunter2hunter2"}
    )
    logging.getLogger("aiohttp.test").warning(
        "plain %s", "line", extra={"cookie": "session=abcdefgh"}
    )
    lines = COLLECTOR.lines[start:]
    assert len(lines) == 2
    doc = json.loads(lines[0])
    assert doc["event"] == "test.secret" and doc["level"] == "warning"
    for secret in ("do-not-show-1234", "hunter2hunter2", "session=abcdefgh"):
        assert all(secret not in line for line in lines)
    del COLLECTOR.lines[start:]


def test_exception_logs_carry_no_local_variables() -> None:
    start = len(COLLECTOR.lines)
    secret = "local-secret-value-123"  # noqa: F841 - a local a traceback could show
    try:
        raise ValueError("boom")
    except ValueError:
        structlog.get_logger("test").exception("test.failed")
    (line,) = COLLECTOR.lines[start:]
    assert "local-secret-value-123" not in line and "boom" in line
    del COLLECTOR.lines[start:]


def test_aiosqlite_statements_stay_silent() -> None:
    """aiosqlite logs SQL with its parameters at debug: that logger stays at warning."""
    assert logging.getLogger().isEnabledFor(logging.DEBUG)  # the tests run at debug
    assert not logging.getLogger("aiosqlite").isEnabledFor(logging.INFO)
