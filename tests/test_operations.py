"""Operating the daemon: systemd notifications, watchdog, shutdown, reload, metrics, the unit file."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from tests.fakes import FakePeer, fake_peers, scripted_app
from tests.helpers import (
    API,
    Api,
    DaemonProcess,
    eventually,
    link,
    metrics,
    running,
    sample,
    transport_call,
)
from tests.test_files_e2e import MiB, as_peer_of
from tests.test_messages import frame

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parent.parent


def log_docs(proc: DaemonProcess) -> list[dict[str, object]]:
    """The daemon's JSON log lines, parsed."""
    docs = []
    for line in proc.logs().splitlines():
        with contextlib.suppress(ValueError):
            docs.append(json.loads(line))
    return docs


class NotifySocket:
    """A datagram socket standing in for systemd's, recording what the daemon says."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[tuple[float, str]] = []

    async def receive(self, on_ready: object = None) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self.sock, 4096)
            self.messages.append((time.monotonic(), data.decode()))

    def states(self) -> list[str]:
        return [line for _, text in self.messages for line in text.split("\n")]


async def test_ready_watchdog_and_stopping(tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    reader = asyncio.create_task(notify.receive())
    proc = DaemonProcess(tmp_path, "a")
    try:
        async with aiohttp.ClientSession() as session:
            await proc.start(
                wait=False, env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "200000"}
            )
            await eventually(lambda: "READY=1" in notify.states(), timeout=20)
            # READY=1 comes only once the listener serves: the first request succeeds.
            async with session.get(proc.url + "/healthz") as resp:
                assert resp.status == 200
            await eventually(lambda: notify.states().count("WATCHDOG=1") >= 3, timeout=5)
            proc.signal(signal.SIGTERM)
            assert await proc.wait_exit() == 0
        states = notify.states()
        assert "STOPPING=1" in states
        assert states.index("READY=1") < states.index("STOPPING=1")
        assert all(
            s in ("READY=1", "WATCHDOG=1", "STOPPING=1") or s.startswith("STATUS=") for s in states
        )
    finally:
        reader.cancel()
        notify.sock.close()
        await proc.kill()


async def test_sigterm_during_an_upload_keeps_the_committed_offset(tmp_path: Path) -> None:
    data = os.urandom(64 * MiB)
    peer_app = FakePeer()
    async with fake_peers(peer_app), aiohttp.ClientSession() as session:
        b = DaemonProcess(
            tmp_path, "b", server={"shutdown_grace": 1.0}, uploads={"commit_every": 4 * MiB}
        )
        async with running(b):
            peer = await as_peer_of(b, session, peer_app)
            _, answer = await peer.open(len(data))
            upload_id = answer["payload"]["id"]

            async def slow() -> object:
                for start in range(0, len(data), MiB):
                    yield data[start : start + MiB]
                    await asyncio.sleep(0.05)

            sending = asyncio.create_task(peer.append(upload_id, slow()))

            async def progressing() -> bool:
                return (await peer.offset(upload_id))[0] >= 8 * MiB

            await eventually(progressing, timeout=60)
            seen = (await peer.offset(upload_id))[0]
            started = time.monotonic()
            b.signal(signal.SIGTERM)
            assert await b.wait_exit() == 0
            took = time.monotonic() - started
            assert took < 1.0 + 3.0  # the grace period, plus start-up of the shutdown itself
            with pytest.raises(aiohttp.ClientError):
                await sending
            await b.start()
            offset, _ = await peer.offset(upload_id)
            part = b.data_dir / "incoming" / peer.remote_id / f"{upload_id}.part"
            assert offset >= seen and part.stat().st_size == offset
            assert part.read_bytes() == data[:offset]


async def test_sighup_reloads_and_survives_a_broken_config(tmp_path: Path) -> None:
    async with scripted_app() as app, aiohttp.ClientSession() as session:
        peer_app = FakePeer()
        async with fake_peers(peer_app):
            b = DaemonProcess(tmp_path, "b", log={"level": "info", "format": "json"})
            async with running(b):
                peer = await as_peer_of(b, session, peer_app)
                body = frame(peer.remote_id, topic="sync")
                status, answer = await transport_call(
                    session, b.url, f"{API}/msg", body, remote_id=peer.remote_id, token=peer.token
                )
                assert answer == {"status": "OK", "err": "", "payload": None} and app.received == []

                # A new topic route and the debug level, applied by SIGHUP.
                b.write_config(
                    log={"level": "debug", "format": "json"},
                    topics=[{"name": "sync", "forward_url": app.url + "/topic"}],
                )
                b.signal(signal.SIGHUP)
                await eventually(lambda: '"config.reloaded"' in b.logs(), timeout=10)
                body = frame(peer.remote_id, topic="sync")
                status, answer = await transport_call(
                    session, b.url, f"{API}/msg", body, remote_id=peer.remote_id, token=peer.token
                )
                assert status == 200 and app.msg_ids() == [body["msg"]["id"]]
                async with session.get(b.url + "/healthz") as resp:
                    assert resp.status == 200
                await eventually(
                    lambda: any(
                        doc.get("event") == "http.request" and doc.get("path") == "/healthz"
                        for doc in log_docs(b)
                    ),
                    timeout=5,
                )

                # A broken config is refused; the daemon keeps running on the old one.
                b.config_path.write_text("[server]\nlisten = 'nope'\n")
                b.signal(signal.SIGHUP)
                await eventually(lambda: '"config.reload_failed"' in b.logs(), timeout=10)
                body = frame(peer.remote_id, topic="sync")
                status, _ = await transport_call(
                    session, b.url, f"{API}/msg", body, remote_id=peer.remote_id, token=peer.token
                )
                assert status == 200 and app.msg_ids()[-1] == body["msg"]["id"]
                assert b.proc is not None and b.proc.poll() is None


async def test_metrics_show_the_link_going_down_and_up(tmp_path: Path) -> None:
    fast = {"heartbeat": {"interval": 0.2, "timeout": 0.5, "offline_after": 1.0}}
    async with aiohttp.ClientSession() as session:
        a = DaemonProcess(tmp_path, "a", **fast)
        b = DaemonProcess(tmp_path, "b", **fast)
        async with running(a, b):
            await link(Api(session, a.url), Api(session, b.url))

            async def up(value: float) -> bool:
                return (
                    sample(
                        await metrics(session, a.url), "remoteclusterd_remote_up", remote="peer-b"
                    )
                    == value
                )

            await eventually(lambda: up(1.0), timeout=10)
            samples = await metrics(session, a.url)
            assert (
                sample(
                    samples,
                    "remoteclusterd_http_requests_total",
                    route="remotes.create",
                    status="201",
                )
                == 1.0
            )
            assert sample(samples, "remoteclusterd_remote_ping_rtt_seconds", remote="peer-b") > 0
            assert (
                sample(samples, "remoteclusterd_remote_last_ping_age_seconds", remote="peer-b")
                < 1.0
            )
            await b.stop()
            await eventually(lambda: up(0.0), timeout=10)
            assert (
                sample(
                    await metrics(session, a.url),
                    "remoteclusterd_remote_transitions_total",
                    to="offline",
                )
                == 1.0
            )
            await b.start()
            await eventually(lambda: up(1.0), timeout=10)
            status, _ = await Api(session, a.url, "wrong-token").call("GET", API)
            assert status == 401
            samples = await metrics(session, a.url)
            assert (
                sample(
                    samples,
                    "remoteclusterd_auth_failures_total",
                    kind="operator",
                    reason="missing_or_unknown_token",
                )
                == 1.0
            )
            assert sample(samples, "remoteclusterd_remote_transitions_total", to="online") == 2.0


async def test_metrics_access_can_be_restricted(app_client: object) -> None:
    client = await app_client(metrics={"token_sha256": "0" * 64})  # type: ignore[operator]
    async with client.get("/metrics") as resp:
        assert resp.status == 401
    client = await app_client(metrics={"allow_from": ["10.0.0.0/8"]})  # type: ignore[operator]
    async with client.get("/metrics") as resp:
        assert resp.status == 403
    client = await app_client(metrics={"allow_from": ["127.0.0.1"]})  # type: ignore[operator]
    async with client.get("/metrics") as resp:
        assert resp.status == 200 and "remoteclusterd_event_loop_lag_seconds" in await resp.text()


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)
def test_unit_file_passes_systemd_analyze(tmp_path: Path) -> None:
    """The unit, pointed at this checkout's command, passes ``systemd-analyze verify``."""
    command = Path(sys.executable).parent / "remoteclusterd"
    unit = (ROOT / "systemd" / "remoteclusterd.service").read_text()
    assert (
        "Type=notify" in unit and "RestartPreventExitStatus=78" in unit and "WatchdogSec=" in unit
    )
    grace = 20.0
    stop = float(re.search(r"^TimeoutStopSec=(\d+)", unit, re.M).group(1))  # type: ignore[union-attr]
    assert stop > grace
    path = tmp_path / "remoteclusterd.service"
    path.write_text(unit.replace("/opt/remoteclusterd/venv/bin/remoteclusterd", str(command)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if "remoteclusterd.service" in line
    ]
    assert result.returncode == 0 and problems == [], result.stdout + result.stderr
