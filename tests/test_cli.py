"""The operator CLI against real daemons: link, send a message and a file, read state back."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import scripted_app
from tests.helpers import OPERATOR_TOKEN, TEAM_ID, DaemonProcess, eventually, running

pytestmark = pytest.mark.timeout(180)


async def cli(
    *args: str, token: str | None = OPERATOR_TOKEN, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMOTECLUSTERD_")}
    if token is not None:
        env["REMOTECLUSTERD_TOKEN"] = token
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "daemon", *args], capture_output=True, text=True,
        env=env, timeout=120, input=stdin, check=False,
    )  # fmt: skip


async def cli_json(*args: str) -> Any:
    result = await cli(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


async def test_link_send_and_read_back_with_the_cli(tmp_path: Path) -> None:
    async with scripted_app() as app:
        fast = {
            "outbox": {"retry_base": 0.05, "retry_max": 0.3},
            "heartbeat": {"interval": 0.2, "offline_after": 1.0},
        }
        a = DaemonProcess(tmp_path, "a", **fast)
        b = DaemonProcess(
            tmp_path, "b", topics=[{"name": "sync", "forward_url": app.url + "/topic"}], **fast
        )
        async with running(a, b):
            (tmp_path / "password").write_text("a-long-password\n")
            created = await cli_json(
                "remote",
                "create",
                "site-b",
                "--team",
                TEAM_ID,
                "--password-file",
                str(tmp_path / "password"),
                "--url",
                a.url,
            )
            rid = created["remote_cluster"]["remote_id"]
            assert "password" not in created
            (tmp_path / "invite").write_text(created["invite"])
            accepted = await cli_json(
                "remote",
                "accept",
                "site-a",
                "--team",
                TEAM_ID,
                "--invite-file",
                str(tmp_path / "invite"),
                "--password-file",
                str(tmp_path / "password"),
                "--url",
                b.url,
            )
            assert accepted["remote_id"] == rid and accepted["site_url"] == a.url

            listed = await cli_json("remote", "list", "--url", a.url)
            assert [r["remote_id"] for r in listed] == [rid] and listed[0]["site_url"] == b.url
            table = await cli("remote", "list", "--url", a.url)
            assert table.returncode == 0 and "site-b" in table.stdout and "linked" in table.stdout

            (tmp_path / "payload.json").write_text('{"posts": [1, 2]}')
            queued = await cli_json(
                "send",
                rid,
                "sync",
                "--payload-file",
                str(tmp_path / "payload.json"),
                "--url",
                a.url,
            )
            data = os.urandom(300_000)
            (tmp_path / "photo.jpg").write_bytes(data)
            sent = await cli_json("send-file", rid, str(tmp_path / "photo.jpg"), "--url", a.url)

            async def delivered() -> bool:
                doc = await cli_json("msg-status", rid, queued["id"], "--url", a.url)
                return bool(doc["state"] == "delivered")

            async def completed() -> bool:
                doc = await cli_json("file-status", rid, sent["file_id"], "--url", a.url)
                return bool(doc["state"] == "completed")

            await eventually(delivered, timeout=30)
            await eventually(completed, timeout=30)
            assert app.messages()[0]["msg"]["payload"] == {"posts": [1, 2]}
            info = (await cli_json("file-status", rid, sent["file_id"], "--url", a.url))[
                "file_info"
            ]
            assert info["name"] == "photo.jpg" and info["size"] == len(data)

            # A dead message is listed and retried.
            assert await b.stop() == 0
            a.write_config(outbox={"retry_base": 0.05, "retry_max": 0.1, "max_attempts": 2})
            a.signal(1)  # SIGHUP: the new retry policy applies
            doomed = await cli_json(
                "send",
                rid,
                "sync",
                "--payload-file",
                str(tmp_path / "payload.json"),
                "--url",
                a.url,
            )

            doomed_file = await cli_json(
                "send-file", rid, str(tmp_path / "photo.jpg"), "--file-id", "f" * 26, "--url", a.url
            )

            async def dead() -> bool:
                docs = await cli_json("outbox", rid, "--state", "dead", "--url", a.url)
                return [d["id"] for d in docs] == [doomed["id"]]

            async def file_dead() -> bool:
                doc = await cli_json("file-status", rid, doomed_file["file_id"], "--url", a.url)
                return bool(doc["state"] == "dead")

            await eventually(dead, timeout=30)
            await eventually(file_dead, timeout=30)
            a.write_config(outbox={"retry_base": 0.05, "retry_max": 0.3, "max_attempts": 0})
            a.signal(1)
            await b.start()
            retried = await cli_json("retry", rid, doomed["id"], "--url", a.url)
            assert retried == {"id": doomed["id"], "state": "queued"}

            async def redelivered() -> bool:
                return doomed["id"] in app.msg_ids()

            await eventually(redelivered, timeout=30)
            again = await cli_json("retry-file", rid, doomed_file["file_id"], "--url", a.url)
            assert again["file_id"] == doomed_file["file_id"] and again["state"] == "queued"

            async def file_sent() -> bool:
                doc = await cli_json("file-status", rid, doomed_file["file_id"], "--url", a.url)
                return bool(doc["state"] == "completed")

            await eventually(file_sent, timeout=30)


async def test_exit_codes_and_errors(tmp_path: Path) -> None:
    a = DaemonProcess(tmp_path, "a")
    async with running(a):
        unknown = await cli("remote", "show", "a" * 26, "--url", a.url)
        assert unknown.returncode == 1 and "HTTP 404" in unknown.stderr
        no_token = await cli("remote", "list", "--url", a.url, token=None)
        assert no_token.returncode == 2 and "REMOTECLUSTERD_TOKEN" in no_token.stderr
        wrong = await cli("remote", "list", "--url", a.url, token="wrong")
        assert wrong.returncode == 1 and "HTTP 401" in wrong.stderr
        (tmp_path / "token").write_text(OPERATOR_TOKEN)
        from_file = await cli(
            "remote",
            "list",
            "--json",
            "--url",
            a.url,
            "--token-file",
            str(tmp_path / "token"),
            token=None,
        )
        assert from_file.returncode == 0 and json.loads(from_file.stdout) == []
        created = await cli_json("remote", "create", "gone", "--team", TEAM_ID, "--url", a.url)
        assert len(created["password"]) == 16
        rid = created["remote_cluster"]["remote_id"]
        unconfirmed = await cli("remote", "delete", rid, "--url", a.url, stdin="")
        assert unconfirmed.returncode == 2 and "--yes" in unconfirmed.stderr
        deleted = await cli("remote", "delete", rid, "--yes", "--url", a.url)
        assert deleted.returncode == 0
        shown = await cli_json("remote", "show", rid, "--url", a.url)
        assert shown["delete_at"] > 0
        unreachable = await cli("remote", "list", "--url", "http://127.0.0.1:9")
        assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr
        usage = await cli("remote", "create", "x", "--url", a.url)
        assert usage.returncode == 2
