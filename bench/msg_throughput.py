"""Message throughput benchmark: inbound ``/msg`` frames per second, and outbox delivery A→B.

What it measures, in one run:

(a) **Inbound, through the daemon.** A real ``python -m daemon serve`` process with one
    confirmed remote (written straight into a fresh database with the daemon's own code, no
    invite handshake) and a ``[[topics]]`` route ``bench`` to a local application
    (``bench/msg_local_app.py``, a separate process answering 200 ``{}``). ``wrk`` POSTs
    Mattermost frames to ``/api/v4/remotecluster/msg`` with the remote's credentials; every frame
    has a new 26-character message id (``bench/lua/msg_frame.lua``), so each one is routed,
    forwarded to the local application and its answer committed to the inbox.
(b) **Inbound, bare aiohttp.** ``bench/msg_bare_server.py``: one aiohttp route that reads the
    body, parses the JSON (msgspec) and answers ``{"status":"OK","err":"","payload":null}``.
    The same wrk command (same script, threads, connections and duration) drives it.
(b') **Bare aiohttp plus forwarding** (extra, ``--skip-forward-baseline`` leaves it out): the
    same script with ``--forward``, which also POSTs each message to the local application
    with one aiohttp client session. It shows what the forwarding alone costs; the goal's
    ratio is (a)/(b).
(c) **End to end, A→B.** Two daemons linked through the management API (create on A,
    ``accept_invite`` on B); B routes topic ``bench`` to the local application. With B stopped,
    ``--messages`` messages are queued at A through ``POST /api/v4/remotecluster/{id}/msg``;
    A is then killed with SIGKILL and restarted (the queue must survive: it comes from disk),
    and B is started. The time runs from B answering ``/healthz`` to the local application
    receiving the last message. The local application records the message ids in arrival
    order: they must be A's queue order (``seq``), each exactly once; A's outbox must end with
    every message ``delivered`` and B's inbox with one row per message.

(a), (b) and (b') alternate, ``--repeats`` times each after a short warm-up of each, and the
table shows the medians: requests per second, latency p50/p99 (wrk), non-2xx answers (must be
0; a 2xx without ``"status":"OK"`` counts too), and the CPU seconds per request of the server
process (utime + stime of every thread, from ``/proc/PID/stat``; "loop" is its main thread,
the event loop, the rest is aiosqlite's thread), of the local application and of wrk. The
daemon and the bare servers run on CPU 0; wrk, the local application and this script on CPU 1
(``taskset``). In (c), A runs on CPU 0, B and the local application on CPU 1.
Goals: (a) >= 0.5 x (b), and (c) >= 500 messages/s with order and durability kept.

Usage::

    .venv/bin/python bench/msg_throughput.py [--connections 32] [--duration 15] [--repeats 3]
        [--messages 5000] [--profile]

It needs ``wrk`` and ``taskset`` on the PATH. It prints a table and writes
``bench/results/msg_throughput.json``; the exit status is 1 when a run was not valid (errors,
non-2xx, lost, repeated or reordered messages). ``--profile`` then repeats a shorter (a) and
(c) with the daemons under cProfile (``bench/msg_profiled_serve.py``: the event loop thread
only, its CPU time as the clock, during the load only) and prints the top functions by own
time and by cumulative time, per request or message; those runs are slower and are not the
measurement. The ``.prof`` files stay in ``bench/results/``. Everything else lives in a
temporary directory removed at the end; every process started is stopped (SIGTERM, then
SIGKILL), also on errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import pstats
import re
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import tomli_w

from daemon import __version__ as daemon_version
from daemon import logging as daemon_logging
from daemon.ids import hash_token, new_id
from daemon.models import Remote, now_ms
from daemon.remotes import Remotes, creator_id_for
from daemon.store import DB_FILE, Database

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_OUTPUT = RESULTS_DIR / "msg_throughput.json"
LUA_SCRIPT = BENCH_DIR / "lua" / "msg_frame.lua"
LOCAL_APP = BENCH_DIR / "msg_local_app.py"
BARE_SERVER = BENCH_DIR / "msg_bare_server.py"
PROFILED_SERVE = BENCH_DIR / "msg_profiled_serve.py"

LOOPBACK = "127.0.0.1"
API = "/api/v4/remotecluster"
MSG_PATH = f"{API}/msg"
TOPIC = "bench"
SERVER_CPU, CLIENT_CPU = 0, 1
GOAL_RATIO, GOAL_E2E_RATE = 0.5, 500.0
_LIBRARY_PATH = re.compile(r".*(?:site-packages|python3\.\d+)/(.+)$")
NOISE_PERCENT = 10.0  # CPU % of one core used by other processes that makes a run noisy
PAYLOAD_TEXT = "x" * 150  # (c): a payload of about 200 bytes, as in the wrk frames


# --- processes -------------------------------------------------------------------------------


class Processes:
    """Every child started, so that all of them are stopped whatever happens."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], log_path: Path, cpu: int | None) -> subprocess.Popen[bytes]:
        pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [*pin, *argv], stdout=log, stderr=log, cwd=REPO_DIR, start_new_session=True
            )
        self._procs.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
        """SIGTERM, wait, then SIGKILL; return the exit status."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    @staticmethod
    def kill(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    def stop_all(self) -> None:
        for proc in reversed(self._procs):
            with contextlib.suppress(Exception):
                self.stop(proc, timeout=10.0)


def pinning(enabled: bool) -> tuple[int | None, int | None]:
    """CPUs for the servers and for the clients, or (None, None) when pinning is not possible."""
    allowed = os.sched_getaffinity(0)
    if enabled and shutil.which("taskset") and {SERVER_CPU, CLIENT_CPU} <= allowed:
        return SERVER_CPU, CLIENT_CPU
    return None, None


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (every thread), in seconds."""
    return cpu_seconds_of(Path(f"/proc/{pid}/stat"))


def cpu_seconds_of(stat: Path) -> float:
    """utime + stime from a ``/proc/.../stat`` file, in seconds."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    # After the command name, field 3 is at index 0: utime (14) and stime (15) are 11 and 12.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds of the main thread (the event loop) and of all other threads together."""
    main = others = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            seconds = cpu_seconds_of(task / "stat")
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that just ended
        if task.name == str(pid):
            main += seconds
        else:
            others += seconds
    return main, others


def machine_cpu() -> tuple[float, float]:
    """CPU seconds all CPUs spent in processes since boot, and the seconds stolen from them.

    Interrupt and softirq time (loopback traffic is partly handled there) is left out: the
    kernel charges it to no process, so it would look like someone else's load.
    """
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = fields
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system) / tick, steal / tick


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Quietness:
    """How much CPU processes other than ours used during a window (and how much was stolen)."""

    def __init__(self) -> None:
        self._busy0, self._steal0 = machine_cpu()
        self._self0 = self_cpu()
        self._t0 = time.monotonic()

    def result(self, ours: float) -> dict[str, float]:
        """``ours``: CPU seconds our other processes used in the window."""
        busy, steal = machine_cpu()
        elapsed = time.monotonic() - self._t0
        others = (busy - self._busy0) - ours - (self_cpu() - self._self0)
        return {
            "others_cpu_percent": max(0.0, 100 * others / elapsed),
            "steal_cpu_percent": 100 * (steal - self._steal0) / elapsed,
        }


def children_cpu() -> float:
    """utime + stime of the children waited for so far (wrk, once its run is over)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}:\n{tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args} not ready within {timeout:g}s:\n{tail(log)}")
        time.sleep(0.02)


# --- HTTP ------------------------------------------------------------------------------------


def http(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> tuple[int, bytes]:
    data = body if body is not None else (b"" if method == "POST" else None)
    request = urllib.request.Request(url, method=method, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def answers(url: str, method: str = "GET", **kwargs: Any) -> bool:
    try:
        status, _ = http(method, url, timeout=2.0, **kwargs)
    except (urllib.error.URLError, OSError):
        return False
    return 200 <= status < 300


def get_json(url: str) -> Any:
    status, body = http("GET", url)
    if status != 200:
        raise RuntimeError(f"GET {url}: HTTP {status}")
    return json.loads(body)


def frame(remote_id: str, msg_id: str) -> bytes:
    doc = {
        "remote_id": remote_id,
        "msg": {"id": msg_id, "topic": TOPIC, "create_at": 1, "payload": {"text": "probe"}},
    }
    return json.dumps(doc).encode()


# --- the daemons -----------------------------------------------------------------------------


async def create_receiver_db(data_dir: Path, remote_id: str, token: str) -> None:
    """A fresh database with one confirmed remote that presents ``token``."""
    db = await Database.open(data_dir)
    try:
        await Remotes(db).add(
            Remote(
                remote_id=remote_id,
                name="bench-sender",
                display_name="Bench sender",
                site_url="http://127.0.0.1:9",  # discard port: never called back during (a)
                default_team_id=new_id(),
                create_at=now_ms(),
                creator_id=creator_id_for("bench"),
                token_sha256=hash_token(token),
                remote_token=new_id(),
            )
        )
    finally:
        await db.close()


def write_config(
    path: Path, data_dir: Path, port: int, operator_token: str, **sections: Any
) -> None:
    cfg: dict[str, Any] = {
        "server": {"listen": f"{LOOPBACK}:{port}", "site_url": f"http://{LOOPBACK}:{port}"},
        "storage": {"data_dir": str(data_dir)},
        "log": {"format": "json", "level": "warning"},
        "operators": [
            {
                "name": "bench",
                "token_sha256": hash_token(operator_token),
                "permissions": ["manage_secure_connections", "manage_shared_channels"],
            }
        ],
        **sections,
    }
    path.write_text(tomli_w.dumps(cfg))


class Daemon:
    """One daemon's files and process."""

    def __init__(self, root: Path, name: str, cpu: int | None) -> None:
        self.root = root / name
        self.root.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.cpu = cpu
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.data_dir = self.root / "var"
        self.config = self.root / "config.toml"
        self.log = self.root / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.profile: Path | None = None

    def start(self, procs: Processes, profile: Path | None = None, timer: str = "thread") -> None:
        """Start and wait for ``/healthz``; with ``profile``, under the profiling wrapper."""
        if profile is None:
            argv = [sys.executable, "-m", "daemon", "serve", "--config", str(self.config)]
        else:
            profile.unlink(missing_ok=True)
            argv = [sys.executable, str(PROFILED_SERVE), "--out", str(profile)]
            argv += ["--timer", timer, "--config", str(self.config)]
        self.profile = profile
        self.proc = procs.start(argv, self.log, self.cpu)
        wait_until(lambda: answers(f"{self.url}/healthz"), self.proc, self.log, 60.0)

    def profile_on(self) -> None:
        os.kill(self.pid, signal.SIGUSR1)

    def profile_off(self) -> None:
        """Stop the profiler and wait until its file is written."""
        assert self.profile is not None
        assert self.proc is not None
        os.kill(self.pid, signal.SIGUSR2)
        profile = self.profile
        wait_until(lambda: profile.exists() and profile.stat().st_size > 0, self.proc, self.log, 60)
        time.sleep(0.5)  # dump_stats writes in one go, but let it finish

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def db(self) -> sqlite3.Connection:
        """A read connection to the daemon's SQLite file (WAL allows it while it runs)."""
        conn = sqlite3.connect(self.data_dir / DB_FILE, timeout=10)
        conn.row_factory = sqlite3.Row
        return conn

    def scalar(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        with contextlib.closing(self.db()) as conn:
            return conn.execute(sql, params).fetchone()[0]


def start_local_app(procs: Processes, tmp: Path, cpu: int | None) -> tuple[str, int]:
    port = free_port()
    log = tmp / "local_app.log"
    proc = procs.start([sys.executable, str(LOCAL_APP), "--port", str(port)], log, cpu)
    url = f"http://{LOOPBACK}:{port}"
    wait_until(lambda: answers(f"{url}/stats"), proc, log, 30.0)
    return url, proc.pid


# --- (a) and (b): wrk against the daemon and the bare server ---------------------------------


def run_wrk(
    args: argparse.Namespace, url: str, remote_id: str, token: str, prefix: str, seconds: float
) -> dict[str, Any]:
    pin = ["taskset", "-c", str(args.client_cpu)] if args.client_cpu is not None else []
    argv = [
        *pin,
        "wrk",
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{seconds:g}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA_SCRIPT),
        url + MSG_PATH,
        "--",
        remote_id,
        token,
        prefix,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("MSGBENCH "):
            return dict(json.loads(line.removeprefix("MSGBENCH ")))
    raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


def measure(
    args: argparse.Namespace,
    target: str,
    url: str,
    server_pid: int,
    app: tuple[str, int],
    remote_id: str,
    token: str,
    prefix: str,
) -> dict[str, Any]:
    """One wrk run against ``url``, with the CPU the server and the local app spent on it."""
    app_url, app_pid = app
    http("POST", f"{app_url}/reset")
    quiet = Quietness()
    split0, app0, wrk0 = thread_cpu(server_pid), cpu_seconds(app_pid), children_cpu()
    wrk = run_wrk(args, url, remote_id, token, prefix, args.duration)
    split1, app1, wrk1 = thread_cpu(server_pid), cpu_seconds(app_pid), children_cpu()
    server0, server1 = sum(split0), sum(split1)
    load = quiet.result((server1 - server0) + (app1 - app0) + (wrk1 - wrk0))
    stats = get_json(f"{app_url}/stats")
    requests = max(1, wrk["requests"])
    errors = wrk["errors"]
    socket_errors = errors["connect"] + errors["read"] + errors["write"] + errors["timeout"]
    forwarded_ok = True
    if target in ("daemon", "bare_fwd"):
        # Every answered frame was forwarded once; frames cut off by wrk's stop may add a few.
        forwarded_ok = (
            wrk["requests"] <= stats["count"] <= wrk["requests"] + args.connections
            and stats["duplicates"] == 0
        )
    return {
        "target": target,
        "prefix": prefix,
        "requests": wrk["requests"],
        "seconds": wrk["duration_us"] / 1e6,
        "rps": wrk["requests"] / (wrk["duration_us"] / 1e6),
        "latency_ms": {k: v / 1000 for k, v in wrk["latency_us"].items()},
        "non2xx": wrk["non2xx"],
        "not_ok": wrk["not_ok"],
        "socket_errors": errors,
        "server_cpu_ms_per_req": 1000 * (server1 - server0) / requests,
        "server_main_thread_cpu_ms_per_req": 1000 * (split1[0] - split0[0]) / requests,
        "app_cpu_ms_per_req": 1000 * (app1 - app0) / requests,
        "wrk_cpu_ms_per_req": 1000 * (wrk1 - wrk0) / requests,
        "server_cpu_percent": 100 * (server1 - server0) / (wrk["duration_us"] / 1e6),
        "wrk_cpu_percent": 100 * (wrk1 - wrk0) / (wrk["duration_us"] / 1e6),
        "forwarded": stats["count"],
        "duplicates": stats["duplicates"],
        **load,
        "valid": wrk["non2xx"] == 0 and wrk["not_ok"] == 0 and socket_errors == 0 and forwarded_ok,
    }


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(get: Callable[[dict[str, Any]], float]) -> float:
        return float(statistics.median(get(r) for r in runs))

    return {
        "rps": med(lambda r: r["rps"]),
        "p50_ms": med(lambda r: r["latency_ms"]["p50"]),
        "p99_ms": med(lambda r: r["latency_ms"]["p99"]),
        "non2xx_total": sum(r["non2xx"] + r["not_ok"] for r in runs),
        "server_cpu_ms_per_req": med(lambda r: r["server_cpu_ms_per_req"]),
        "server_main_thread_cpu_ms_per_req": med(lambda r: r["server_main_thread_cpu_ms_per_req"]),
        "app_cpu_ms_per_req": med(lambda r: r["app_cpu_ms_per_req"]),
        "wrk_cpu_ms_per_req": med(lambda r: r["wrk_cpu_ms_per_req"]),
        "server_cpu_percent": med(lambda r: r["server_cpu_percent"]),
        "wrk_cpu_percent": med(lambda r: r["wrk_cpu_percent"]),
        "all_valid": all(r["valid"] for r in runs),
    }


def part_ab(
    args: argparse.Namespace, procs: Processes, tmp: Path, app: tuple[str, int]
) -> dict[str, Any]:
    remote_id, token = new_id(), new_id()
    daemon = Daemon(tmp, "receiver", args.server_cpu)
    asyncio.run(create_receiver_db(daemon.data_dir, remote_id, token))
    route = {"name": TOPIC, "forward_url": f"{app[0]}/hook"}
    write_config(daemon.config, daemon.data_dir, daemon.port, new_id(), topics=[route])
    daemon.start(procs)

    probe = frame(remote_id, new_id())
    servers = {"bare": []} if args.skip_forward_baseline else {"bare": [], "bare_fwd": []}
    if "bare_fwd" in servers:
        servers["bare_fwd"] = ["--forward", f"{app[0]}/hook"]
    targets = {"daemon": (daemon.url, daemon.pid)}
    bare_procs = {}
    for name, extra in servers.items():
        port = free_port()
        url = f"http://{LOOPBACK}:{port}"
        log = tmp / f"{name}_server.log"
        argv = [sys.executable, str(BARE_SERVER), "--port", str(port), *extra]
        proc = bare_procs[name] = procs.start(argv, log, args.server_cpu)
        wait_until(lambda u=url: answers(u + MSG_PATH, "POST", body=probe), proc, log, 30.0)
        targets[name] = (url, proc.pid)

    print(f"(a)/(b): warm-up, {args.warmup:g}s each", flush=True)
    for name, (url, _) in targets.items():
        run_wrk(args, url, remote_id, token, f"{name[-1]}w00", args.warmup)
    runs: list[dict[str, Any]] = []
    for i in range(1, args.repeats + 1):
        for name, (url, pid) in targets.items():
            time.sleep(1.0)
            run = measure(args, name, url, pid, app, remote_id, token, f"{name[-1]}{i:03d}")
            runs.append(run)
            print(
                f"  run {i} {name:8} {run['rps']:9.0f} req/s"
                f"  p99 {run['latency_ms']['p99']:7.2f} ms"
                f"  non-2xx {run['non2xx'] + run['not_ok']}  valid {run['valid']}",
                flush=True,
            )
    result: dict[str, Any] = {
        name: median_of([r for r in runs if r["target"] == name]) for name in targets
    }
    result["runs"] = runs
    result["ratio"] = result["daemon"]["rps"] / result["bare"]["rps"]
    # The same ratio from CPU per request (what one core could serve), which depends less on
    # what else the machine is doing than req/s does.
    result["cpu_ratio"] = (
        result["bare"]["server_cpu_ms_per_req"] / result["daemon"]["server_cpu_ms_per_req"]
    )
    result["inbox_rows"] = daemon.scalar("SELECT count(*) FROM inbox")
    assert daemon.proc is not None
    result["exit_status"] = {"daemon": Processes.stop(daemon.proc)}
    for name, proc in bare_procs.items():
        result["exit_status"][name] = Processes.stop(proc)
    if args.profile:
        result["profile"] = profile_a(args, procs, daemon, app, remote_id, token)
    return result


def profile_a(
    args: argparse.Namespace,
    procs: Processes,
    daemon: Daemon,
    app: tuple[str, int],
    remote_id: str,
    token: str,
) -> dict[str, Any]:
    """(a) again, shorter, with the daemon's event loop under cProfile during the wrk run."""
    out = RESULTS_DIR / "msg_profile_inbound.prof"
    print(f"(a) under cProfile, {args.profile_duration:g}s", flush=True)
    daemon.start(procs, profile=out, timer=args.profile_timer)
    assert daemon.proc is not None
    run_wrk(args, daemon.url, remote_id, token, "pw00", min(args.warmup, 2.0))
    http("POST", f"{app[0]}/reset")
    daemon.profile_on()
    wrk = run_wrk(args, daemon.url, remote_id, token, "p001", args.profile_duration)
    daemon.profile_off()
    Processes.stop(daemon.proc)
    return {
        "file": out.name,
        "timer": args.profile_timer,
        "requests": wrk["requests"],
        "rps_under_profiler": wrk["requests"] / (wrk["duration_us"] / 1e6),
        "top": top_functions(out, wrk["requests"], args.profile_top),
    }


# --- (c): outbox A→B -------------------------------------------------------------------------


async def link(a: Daemon, b: Daemon, auth: str) -> str:
    """Create the connection on A, accept the invite on B; return the shared remote id."""
    headers = {"Authorization": f"Bearer {auth}"}
    password, team = new_id(), new_id()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        async with session.post(
            a.url + API,
            json={"name": "peer-b", "default_team_id": team, "password": password},
            headers=headers,
        ) as resp:
            created = await resp.json()
            if resp.status != 201:
                raise RuntimeError(f"create on A: HTTP {resp.status} {created}")
        async with session.post(
            f"{b.url}{API}/accept_invite",
            json={
                "name": "peer-a",
                "default_team_id": team,
                "invite": created["invite"],
                "password": password,
            },
            headers=headers,
        ) as resp:
            accepted = await resp.json()
            if resp.status != 201:
                raise RuntimeError(f"accept on B: HTTP {resp.status} {accepted}")
    return str(accepted["remote_id"])


async def enqueue(a: Daemon, remote_id: str, auth: str, n: int, concurrency: int) -> list[str]:
    """Queue ``n`` messages at A with ``concurrency`` requests in flight; return their ids."""
    url = f"{a.url}{API}/{remote_id}/msg"
    headers = {"Authorization": f"Bearer {auth}"}
    ids: list[str] = []
    numbers = iter(range(n))

    async def worker(session: aiohttp.ClientSession) -> None:
        for i in numbers:
            body = {"topic": TOPIC, "payload": {"n": i, "text": PAYLOAD_TEXT}}
            async with session.post(url, json=body, headers=headers) as resp:
                answer = await resp.json()
                if resp.status != 202:
                    raise RuntimeError(f"enqueue at A: HTTP {resp.status} {answer}")
                ids.append(answer["id"])

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return ids


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:g}s")
        time.sleep(every)


def part_c(
    args: argparse.Namespace,
    procs: Processes,
    root: Path,
    app: tuple[str, int],
    n: int,
    profile: str | None = None,
) -> dict[str, Any]:
    app_url, _ = app
    auth = new_id()
    a = Daemon(root, "a", args.server_cpu)
    b = Daemon(root, "b", args.client_cpu)
    # A retries a refused delivery within 50-250 ms, so B is found soon after it comes up.
    write_config(a.config, a.data_dir, a.port, auth, outbox={"retry_base": 0.05, "retry_max": 0.25})
    route = {"name": TOPIC, "forward_url": f"{app_url}/hook"}
    write_config(b.config, b.data_dir, b.port, auth, topics=[route])
    a.start(procs)
    b.start(procs)
    assert a.proc is not None
    assert b.proc is not None
    remote_id = asyncio.run(link(a, b, auth))
    b_stop = Processes.stop(b.proc)
    started = time.monotonic()
    ids = asyncio.run(enqueue(a, remote_id, auth, n, args.enqueue_concurrency))
    enqueue_seconds = time.monotonic() - started
    with contextlib.closing(a.db()) as conn:
        queue = [
            row["msg_id"]
            for row in conn.execute(
                "SELECT msg_id FROM outbox WHERE remote_id = ? AND state = 'queued' ORDER BY seq",
                (remote_id,),
            )
        ]
    if sorted(queue) != sorted(ids):
        raise RuntimeError("A's queue does not hold exactly the messages it acknowledged")
    if not args.no_kill:
        Processes.kill(a.proc)  # the queue must survive a crash
    elif profile:
        Processes.stop(a.proc)
    timer = args.profile_timer
    if a.proc.poll() is not None:
        a.start(procs, profile=RESULTS_DIR / f"{profile}_a.prof" if profile else None, timer=timer)
    http("POST", f"{app_url}/reset")

    b_started = time.monotonic()
    b.start(procs, profile=RESULTS_DIR / f"{profile}_b.prof" if profile else None, timer=timer)
    ready = time.monotonic()
    if profile:
        a.profile_on()
        b.profile_on()
    quiet = Quietness()
    a_cpu0, b_cpu0, app_cpu0 = thread_cpu(a.pid), thread_cpu(b.pid), cpu_seconds(app[1])
    deadline = max(120.0, n / 20)
    wait_for(lambda: get_json(f"{app_url}/stats")["count"] >= n, deadline, "delivery", 0.1)
    a_cpu1, b_cpu1, app_cpu1 = thread_cpu(a.pid), thread_cpu(b.pid), cpu_seconds(app[1])
    cpu_window = time.monotonic() - ready
    ours = sum(a_cpu1) - sum(a_cpu0) + sum(b_cpu1) - sum(b_cpu0) + app_cpu1 - app_cpu0
    load = quiet.result(ours)
    if profile:
        a.profile_off()
        b.profile_off()
    stats = get_json(f"{app_url}/stats")

    # Durability of the outcomes: A records them with group commits of its own.
    def all_delivered() -> bool:
        return bool(
            a.scalar(
                "SELECT count(*) FROM outbox WHERE remote_id = ? AND state = 'delivered'",
                (remote_id,),
            )
            == n
        )

    wait_for(all_delivered, 30.0, "A's outbox to show every message delivered")
    time.sleep(0.5)  # a duplicate would arrive late: give it the chance
    arrived = get_json(f"{app_url}/ids")
    inbox_rows = b.scalar("SELECT count(*) FROM inbox WHERE remote_id = ?", (remote_id,))
    seconds = stats["last_at"] - ready
    steady = stats["last_at"] - stats["first_at"]
    result: dict[str, Any] = {
        "messages": n,
        "enqueue_seconds": enqueue_seconds,
        "enqueue_rate": n / enqueue_seconds,
        "b_start_seconds": ready - b_started,
        "seconds": seconds,
        "rate": n / seconds,
        "steady_rate": (n - 1) / steady if steady > 0 else float("nan"),
        "first_arrival_after_ready_s": stats["first_at"] - ready,
        "arrived": len(arrived),
        "duplicates": stats["duplicates"],
        "exactly_once": len(arrived) == n and len(set(arrived)) == n,
        "in_order": arrived == queue,
        "a_delivered": n,
        "b_inbox_rows": inbox_rows,
        "a_cpu_ms_per_msg": 1000 * (sum(a_cpu1) - sum(a_cpu0)) / n,
        "b_cpu_ms_per_msg": 1000 * (sum(b_cpu1) - sum(b_cpu0)) / n,
        "a_main_thread_cpu_ms_per_msg": 1000 * (a_cpu1[0] - a_cpu0[0]) / n,
        "b_main_thread_cpu_ms_per_msg": 1000 * (b_cpu1[0] - b_cpu0[0]) / n,
        "a_cpu_percent": 100 * (sum(a_cpu1) - sum(a_cpu0)) / cpu_window,
        "b_cpu_percent": 100 * (sum(b_cpu1) - sum(b_cpu0)) / cpu_window,
        "app_cpu_ms_per_msg": 1000 * (app_cpu1 - app_cpu0) / n,
        **load,
        "a_killed_and_restarted": not args.no_kill,
        "b_stop_status": b_stop,
    }
    result["valid"] = result["exactly_once"] and result["in_order"] and inbox_rows == n
    result["exit_status"] = {"a": Processes.stop(a.proc), "b": Processes.stop(b.proc)}
    return result


def c_runs(
    args: argparse.Namespace, procs: Processes, tmp: Path, app: tuple[str, int]
) -> dict[str, Any]:
    """(c) ``--c-repeats`` times, each with a new pair of daemons; medians."""
    runs = []
    for i in range(1, args.c_repeats + 1):
        print(f"(c) run {i}: {args.messages} messages A→B", flush=True)
        run = part_c(args, procs, tmp / f"c{i}", app, args.messages)
        runs.append(run)
        print(
            f"  {run['rate']:.0f} msgs/s, in order {run['in_order']}, "
            f"exactly once {run['exactly_once']}",
            flush=True,
        )
    numeric = [
        k for k, v in runs[0].items() if isinstance(v, int | float) and not isinstance(v, bool)
    ]
    median = {k: statistics.median(r[k] for r in runs) for k in numeric}
    median.update(
        in_order=all(r["in_order"] for r in runs),
        exactly_once=all(r["exactly_once"] for r in runs),
    )
    return {"median": median, "runs": runs, "all_valid": all(r["valid"] for r in runs)}


def profile_c(
    args: argparse.Namespace, procs: Processes, tmp: Path, app: tuple[str, int]
) -> dict[str, Any]:
    n = args.profile_messages
    print(f"(c) under cProfile, {n} messages", flush=True)
    run = part_c(args, procs, tmp / "c-profile", app, n, profile="msg_profile_e2e")
    return {
        "messages": n,
        "rate_under_profiler": run["rate"],
        "valid": run["valid"],
        "a": {
            "file": "msg_profile_e2e_a.prof",
            "top": top_functions(RESULTS_DIR / "msg_profile_e2e_a.prof", n, args.profile_top),
        },
        "b": {
            "file": "msg_profile_e2e_b.prof",
            "top": top_functions(RESULTS_DIR / "msg_profile_e2e_b.prof", n, args.profile_top),
        },
    }


# --- profiles --------------------------------------------------------------------------------


def _where(filename: str, line: int, func: str) -> str:
    if filename == "~":
        return func  # a built-in
    if (inside := _LIBRARY_PATH.search(filename)) is not None:
        filename = inside.group(1)  # a module of the standard library or of a package
    else:
        with contextlib.suppress(ValueError):
            filename = str(Path(filename).resolve().relative_to(REPO_DIR))
    return f"{filename}:{line}({func})"


def top_functions(path: Path, units: int, top: int) -> dict[str, list[dict[str, Any]]]:
    """The ``top`` functions by own time and by cumulative time, in µs per request/message."""
    raw = pstats.Stats(str(path)).stats
    rows = [
        {
            "function": _where(*key),
            "ncalls": nc,
            "calls_per_unit": nc / units,
            "tottime_s": tt,
            "cumtime_s": ct,
            "tottime_us_per_unit": 1e6 * tt / units,
            "cumtime_us_per_unit": 1e6 * ct / units,
        }
        for key, (_cc, nc, tt, ct, _callers) in raw.items()
    ]
    by_tot = sorted(rows, key=lambda r: r["tottime_s"], reverse=True)
    by_cum = sorted(rows, key=lambda r: r["cumtime_s"], reverse=True)
    return {
        "total_us_per_unit": [{"value": sum(r["tottime_us_per_unit"] for r in rows)}],
        "tottime": by_tot[:top],
        "cumtime": by_cum[:top],
        "cumtime_daemon": [r for r in by_cum if r["function"].startswith("daemon/")][:top],
    }


def profile_table(title: str, top: dict[str, list[dict[str, Any]]], unit: str) -> str:
    total = top["total_us_per_unit"][0]["value"]
    lines = [f"{title}: {total:.0f} µs of profiled time per {unit} in all"]
    for key, label in (
        ("tottime", "own time"),
        ("cumtime", "cumulative time"),
        ("cumtime_daemon", "cumulative time, daemon code"),
    ):
        column = "cumtime" if key.startswith("cumtime") else "tottime"
        lines.append(f"{title}: top by {label} (µs per {unit}, under the profiler)")
        lines.append(f"  {'µs/' + unit:>9} {'calls/' + unit:>10}  function")
        for row in top[key]:
            lines.append(
                f"  {row[f'{column}_us_per_unit']:9.1f} {row['calls_per_unit']:10.2f}  "
                f"{row['function']}"
            )
    return "\n".join(lines)


# --- report ----------------------------------------------------------------------------------


def wrk_version() -> str:
    done = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    return (done.stdout + done.stderr).splitlines()[0].split(" Copyright")[0].strip()


def machine_facts(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "daemon_version": daemon_version,
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "pinned": args.server_cpu is not None,
        "wrk": wrk_version(),
    }


def _noise_warning(runs: list[dict[str, Any]]) -> list[str]:
    worst = max(max(r["others_cpu_percent"], r["steal_cpu_percent"]) for r in runs)
    if worst <= NOISE_PERCENT:
        return []
    return [
        f"  WARNING: other processes (or the hypervisor) took up to {worst:.0f}% of a CPU "
        "during these runs: the machine was not quiet, the figures are noisy"
    ]


def _mark(ok: bool) -> str:
    return "met" if ok else "MISSED"


def table(args: argparse.Namespace, report: dict[str, Any]) -> str:
    out: list[str] = []
    pin = (
        f"server on CPU {SERVER_CPU}; wrk, local app and this script on CPU {CLIENT_CPU}"
        if args.server_cpu is not None
        else "not pinned"
    )
    if (ab := report.get("ab")) is not None:
        out.append(
            f"Inbound /msg: wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s, "
            f"medians of {args.repeats} runs ({pin})"
        )
        out.append(
            f"  {'target':<32} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'non-2xx':>7} "
            f"{'server CPU':>10} {'of it':>7} {'server':>7} {'app CPU':>8} {'wrk CPU':>8}  valid"
        )
        out.append(
            f"  {'':<32} {'':>8} {'':>7} {'':>7} {'':>7} {'ms/req':>10} {'loop':>7} "
            f"{'CPU %':>7} {'ms/req':>8} {'%':>8}"
        )
        for key, label in (
            ("daemon", "(a) daemon, forwarding to app"),
            ("bare", "(b) bare aiohttp handler"),
            ("bare_fwd", "(b') bare handler + forwarding"),
        ):
            if (m := ab.get(key)) is None:
                continue
            out.append(
                f"  {label:<32} {m['rps']:8.0f} {m['p50_ms']:7.2f} {m['p99_ms']:7.2f} "
                f"{m['non2xx_total']:7d} {m['server_cpu_ms_per_req']:10.3f} "
                f"{m['server_main_thread_cpu_ms_per_req']:7.3f} {m['server_cpu_percent']:7.0f} "
                f"{m['app_cpu_ms_per_req']:8.3f} "
                f"{m['wrk_cpu_percent']:8.0f}  {m['all_valid']}"
            )
        out.append(
            f"  ratio (a)/(b) = {ab['ratio']:.3f}   goal >= {GOAL_RATIO}: "
            f"{_mark(ab['ratio'] >= GOAL_RATIO)}   (from server CPU per request: "
            f"{ab['cpu_ratio']:.3f})"
        )
        out.append("  runs:")
        for r in ab["runs"]:
            out.append(
                f"    {r['target']:<8} {r['rps']:8.0f} req/s  p50 {r['latency_ms']['p50']:6.2f}"
                f"  p99 {r['latency_ms']['p99']:6.2f} ms  non-2xx {r['non2xx'] + r['not_ok']}"
                f"  server {r['server_cpu_ms_per_req']:.3f} ms/req"
                f"  forwarded {r['forwarded']}  others {r['others_cpu_percent']:.0f}%"
                f"  valid {r['valid']}"
            )
        out.extend(_noise_warning(ab["runs"]))
    if (c := report.get("c")) is not None:
        pin_c = (
            f"A on CPU {SERVER_CPU}; B, the local app and this script on CPU {CLIENT_CPU}"
            if args.server_cpu is not None
            else "not pinned"
        )
        queued = "queued at A while B was stopped"
        if not args.no_kill:
            queued += ", A then SIGKILLed and restarted"
        out.append("")
        out.append(f"End to end A→B (c): {args.messages} messages {queued} ({pin_c})")
        out.append(
            "  timed from B's /healthz answering to the last arrival at B's local app; "
            f"median of {len(c['runs'])} runs"
        )
        out.append(
            f"  {'':<8} {'seconds':>8} {'msgs/s':>8} {'steady':>8} {'in order':>8} "
            f"{'once':>5} {'A CPU':>8} {'B CPU':>8} {'app CPU':>8} {'others':>7}"
        )
        out.append(
            f"  {'':<8} {'':>8} {'':>8} {'msgs/s':>8} {'':>8} {'':>5} {'ms/msg':>8} "
            f"{'ms/msg':>8} {'ms/msg':>8} {'CPU %':>7}"
        )
        for label, r in [("median", c["median"])] + [
            (f"run {i}", run) for i, run in enumerate(c["runs"], start=1)
        ]:
            out.append(
                f"  {label:<8} {r['seconds']:8.2f} {r['rate']:8.0f} {r['steady_rate']:8.0f} "
                f"{r['in_order']!s:>8} {r['exactly_once']!s:>5} {r['a_cpu_ms_per_msg']:8.3f} "
                f"{r['b_cpu_ms_per_msg']:8.3f} {r['app_cpu_ms_per_msg']:8.3f} "
                f"{r['others_cpu_percent']:7.0f}"
            )
        m = c["median"]
        out.append(
            f"  event-loop thread: A {m['a_main_thread_cpu_ms_per_msg']:.3f} ms/msg, "
            f"B {m['b_main_thread_cpu_ms_per_msg']:.3f} ms/msg (the rest: aiosqlite's thread); "
            f"A used {m['a_cpu_percent']:.0f}% of a CPU, B {m['b_cpu_percent']:.0f}%"
        )
        serial = m["a_cpu_ms_per_msg"] + m["b_cpu_ms_per_msg"] + m["app_cpu_ms_per_msg"]
        out.append(
            f"  one message at a time: A + B + app CPU = {serial:.3f} ms/msg "
            f"({1000 / serial:.0f} msgs/s if all of it were on the path; A's outcome commits "
            "overlap the next send)"
        )
        out.append(
            f"  enqueue at A: {m['enqueue_rate']:.0f} msgs/s ({args.enqueue_concurrency} in "
            f"flight); every run: B inbox rows = A outbox delivered = messages: "
            f"{all(r['b_inbox_rows'] == r['messages'] for r in c['runs'])}"
        )
        out.extend(_noise_warning(c["runs"]))
        out.append(
            f"  goal >= {GOAL_E2E_RATE:g} msgs/s with order and durability: "
            f"{_mark(m['rate'] >= GOAL_E2E_RATE and c['all_valid'])}"
        )
    return "\n".join(out)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--connections", type=int, default=32, help="wrk -c (default 32)")
    parser.add_argument("--threads", type=int, default=1, help="wrk -t (default 1)")
    parser.add_argument("--duration", type=float, default=15.0, help="wrk -d, seconds")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of wrk per target")
    parser.add_argument("--repeats", type=int, default=3, help="runs of (a) and of (b)")
    parser.add_argument("--messages", type=int, default=5000, help="messages for (c)")
    parser.add_argument("--c-repeats", type=int, default=3, help="runs of (c)")
    parser.add_argument("--enqueue-concurrency", type=int, default=32)
    parser.add_argument("--no-kill", action="store_true", help="(c): do not SIGKILL A")
    parser.add_argument(
        "--skip-forward-baseline",
        action="store_true",
        help="leave out (b'), the bare handler that also forwards to the local app",
    )
    parser.add_argument("--parts", default="abc", help="'ab', 'c' or 'abc' (default)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--profile", action="store_true", help="then profile (a) and (c)")
    parser.add_argument("--profile-duration", type=float, default=10.0)
    parser.add_argument("--profile-messages", type=int, default=2000)
    parser.add_argument("--profile-top", type=int, default=25)
    parser.add_argument(
        "--profile-timer",
        choices=("thread", "wall"),
        default="thread",
        help="the profiler's clock: the event loop thread's CPU time (default) or wall time",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    if min(args.repeats, args.c_repeats, args.threads, args.connections) < 1 or args.messages < 2:
        parser.error("repeats, threads and connections must be at least 1, messages at least 2")
    if args.threads > 99 or args.repeats > 999:
        parser.error("at most 99 wrk threads and 999 repeats (message ids are 26 characters)")
    return args


def _raise_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    args = parse_args()
    for tool in ("wrk",):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (Debian: apt-get install {tool})", file=sys.stderr)
            return 2
    args.server_cpu, args.client_cpu = pinning(not args.no_pin)
    if args.client_cpu is not None:
        os.sched_setaffinity(0, {args.client_cpu})
    signal.signal(signal.SIGTERM, _raise_exit)
    daemon_logging.configure(level="warning")  # the store's own log lines while set up
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": machine_facts(args), "settings": vars(args).copy()}
    report["settings"]["output"] = args.output.name
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="msg_throughput-"))
    try:
        app = start_local_app(procs, tmp, args.client_cpu)
        if "a" in args.parts or "b" in args.parts:
            report["ab"] = part_ab(args, procs, tmp, app)
        if "c" in args.parts:
            report["c"] = c_runs(args, procs, tmp, app)
            if args.profile:
                report["c"]["profile"] = profile_c(args, procs, tmp, app)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(table(args, report))
    if args.profile:
        if (prof := report.get("ab", {}).get("profile")) is not None:
            print()
            print(f"(a) profile: {prof['requests']} requests, {prof['rps_under_profiler']:.0f}/s")
            print(profile_table("(a) daemon", prof["top"], "req"))
        if (prof := report.get("c", {}).get("profile")) is not None:
            print()
            print(f"(c) profile: {prof['messages']} messages, {prof['rate_under_profiler']:.0f}/s")
            print(profile_table("(c) daemon A", prof["a"]["top"], "msg"))
            print(profile_table("(c) daemon B", prof["b"]["top"], "msg"))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    ok = True
    if "ab" in report:
        ok &= all(
            report["ab"][name]["all_valid"]
            for name in ("daemon", "bare", "bare_fwd")
            if name in report["ab"]
        )
    if "c" in report:
        ok &= report["c"]["all_valid"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
