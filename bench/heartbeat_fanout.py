"""Heartbeat fan-out benchmark: CPU, memory and ping punctuality of the daemon against N peers.

What it measures: a real ``python -m daemon serve`` process with N confirmed remotes pings N
stub peers (``bench/stub_peers.py``, a separate process) every ``--interval`` seconds with no
jitter. Over a ``--duration`` window that starts after a warm-up, it reports

* the pings the stub peers received,
* the daemon's CPU use (utime + stime of the whole process from ``/proc/PID/stat``, as a
  percentage of one core) and its peak RSS (``VmHWM``),
* the lateness of the pings as seen by the stub: a peer's k-th ping is due at
  ``t0 + k * interval``; ``t0`` is estimated per peer as ``min_k(arrival_k - k * interval)``
  over the window and ``lateness_k = arrival_k - k * interval - t0`` (k counts slots, so a
  slot the daemon skipped does not shift the following pings); p50, p99 and max over all pings,
* the disk transactions spent on ``last_ping_at`` and the daemon's own view
  (``remoteclusterd_heartbeat_lateness_seconds``, ``remoteclusterd_heartbeat_pings_total``),

and the same figures for a baseline (``bench/bare_pinger.py``: one aiohttp session and one task
per peer, nothing else) run against the same stub peers, on the same schedule and the same CPU
core, right after the daemon. The daemon and the baseline are pinned to CPU 0, the stub peers
and this script to CPU 1 (``taskset``), when the machine has both.

The CPU time that other processes used during each window is reported too (from
``/proc/stat``, good to a few percent either way); a window where it passes 8% of a CPU is
flagged, since then neither the CPU nor the lateness figures can be trusted: run again on a
quiet machine.

The remotes are written straight into a fresh database with the daemon's own code (no invite
handshake). Everything lives in a temporary directory that is removed at the end; every process
started is stopped (SIGTERM, then SIGKILL), also on errors.

Usage::

    .venv/bin/python bench/heartbeat_fanout.py [--peers 1000] [--interval 1.0] [--duration 30]

It prints a table and writes ``bench/results/heartbeat_fanout.json``. ``--profile OUT.prof``
runs the daemon under cProfile (its CPU figure then includes the profiler's overhead) and prints
the top functions; ``--skip-baseline`` leaves the baseline out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import itertools
import json
import math
import os
import platform
import pstats
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import tomli_w
from prometheus_client.parser import text_string_to_metric_families

from daemon import __version__ as daemon_version
from daemon import logging as daemon_logging
from daemon.ids import hash_token, new_id
from daemon.models import Remote, now_ms
from daemon.remotes import Remotes, creator_id_for
from daemon.store import Database

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
DEFAULT_OUTPUT = BENCH_DIR / "results" / "heartbeat_fanout.json"
LOOPBACK = "127.0.0.1"
PINGER_CPU = 0  # the daemon, then the baseline
STUB_CPU = 1  # the stub peers and this script
STARTUP_SPREAD = 5.0  # the daemon spreads its first pings over min(interval, this)
GOAL_PEERS, GOAL_INTERVAL, GOAL_DURATION = 1000, 1.0, 30.0
GOAL_CPU_PERCENT, GOAL_P99_MS = 25.0, 100.0
NOISE = 8.0  # % of a CPU used by other processes above which a window is flagged
PREFIX = "remoteclusterd_heartbeat_"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


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

    def stop_all(self) -> None:
        for proc in reversed(self._procs):
            with contextlib.suppress(Exception):
                self.stop(proc, timeout=10.0)


def pinning_cpus() -> tuple[int | None, int | None]:
    """CPUs for the pinger and the stub, or (None, None) when pinning is not possible."""
    allowed = os.sched_getaffinity(0)
    if shutil.which("taskset") and {PINGER_CPU, STUB_CPU} <= allowed:
        return PINGER_CPU, STUB_CPU
    return None, None


def cpu_times(pid: int) -> tuple[float, float]:
    """utime and stime of the whole process (every thread), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command name: field 3 is at index 0, so utime (14) and stime (15) are 11, 12.
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def busy_per_cpu() -> dict[str, float]:
    """Busy seconds (all but idle and iowait) of each CPU and in total, from /proc/stat."""
    tick = os.sysconf("SC_CLK_TCK")
    busy = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if not name.startswith("cpu"):
            break
        ticks = [int(v) for v in values[:8]]  # user nice system idle iowait irq softirq steal
        busy[name] = (sum(ticks) - ticks[3] - ticks[4]) / tick
    return busy


def peak_rss_mib(pid: int) -> float:
    """VmHWM (peak resident set) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return math.nan


def tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_until(
    predicate: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}:\n{tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args} not ready within {timeout:g}s:\n{tail(log)}")
        time.sleep(0.05)


# --- HTTP ------------------------------------------------------------------------------------


# Loopback only: never through an HTTP proxy named in the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(method: str, url: str, timeout: float = 30.0) -> bytes:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with _OPENER.open(request, timeout=timeout) as resp:
        return bytes(resp.read())


def healthy(url: str) -> bool:
    try:
        http("GET", f"{url}/healthz", timeout=2.0)
    except (urllib.error.URLError, OSError):
        return False
    return True


def scrape(url: str) -> Samples:
    """The daemon's ``/metrics``, parsed with prometheus-client's own parser."""
    samples: Samples = {}
    for family in text_string_to_metric_families(http("GET", f"{url}/metrics").decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


# --- set-up ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Peer:
    index: int
    remote_id: str
    token: str  # what the pinging side presents to this peer
    url: str = ""


async def create_database(data_dir: Path, peers: list[Peer]) -> None:
    """A fresh database with one confirmed remote per stub peer, written by the daemon's code."""
    db = await Database.open(data_dir)
    try:
        remotes = Remotes(db)
        creator = creator_id_for("bench")
        for peer in peers:
            await remotes.add(
                Remote(
                    remote_id=peer.remote_id,
                    name=f"bench-peer-{peer.index}",
                    display_name=f"Bench peer {peer.index}",
                    site_url=peer.url,
                    default_team_id=new_id(),
                    create_at=now_ms(),
                    creator_id=creator,
                    token_sha256=hash_token(new_id()),
                    remote_token=peer.token,
                )
            )
    finally:
        await db.close()


def write_config(path: Path, data_dir: Path, port: int, interval: float) -> None:
    cfg = {
        "server": {"listen": f"{LOOPBACK}:{port}", "site_url": f"http://{LOOPBACK}:{port}"},
        "storage": {"data_dir": str(data_dir)},
        "log": {"format": "json", "level": "warning"},
        "heartbeat": {"interval": interval, "timeout": 15.0, "offline_after": 300.0, "jitter": 0.0},
        "operators": [
            {
                "name": "bench",
                "token_sha256": hash_token(new_id()),
                "permissions": ["manage_secure_connections"],
            }
        ],
    }
    path.write_text(tomli_w.dumps(cfg))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


# --- measurement -----------------------------------------------------------------------------


@dataclass(slots=True)
class Run:
    """One measured window of one pinger (the daemon or the baseline)."""

    name: str
    peers: int
    interval: float
    duration: float
    pings_expected: int
    pings_seen: int = 0
    cpu_percent: float = math.nan
    cpu_user_percent: float = math.nan
    cpu_system_percent: float = math.nan
    peak_rss_mib: float = math.nan
    lateness_ms: dict[str, float] = field(default_factory=dict)
    skipped_slots: int = 0
    peers_seen: int = 0
    stub_rejected: dict[str, int] = field(default_factory=dict)
    stub_cpu_percent: float = math.nan
    other_load_percent: dict[str, float] = field(default_factory=dict)
    liveness_transactions: float | None = None
    daemon_view: dict[str, Any] = field(default_factory=dict)
    exit_status: int | None = None
    pinger_summary: dict[str, Any] = field(default_factory=dict)


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def lateness(
    arrivals: dict[str, list[float]], start: float, end: float, interval: float
) -> tuple[list[float], int, int]:
    """Lateness of every ping in [start, end) against its peer's schedule; skipped slots; peers.

    k is the slot of a ping: the first ping in the window has k = 0 and each next one is
    ``max(1, round(gap / interval))`` slots after the previous one.
    """
    late: list[float] = []
    skipped = 0
    peers = 0
    for times in arrivals.values():
        window = sorted(t for t in times if start <= t < end)
        if not window:
            continue
        peers += 1
        slots = [0]
        for prev, cur in itertools.pairwise(window):
            slots.append(slots[-1] + max(1, round((cur - prev) / interval)))
        t0 = min(t - k * interval for t, k in zip(window, slots, strict=True))
        late.extend(t - k * interval - t0 for t, k in zip(window, slots, strict=True))
        skipped += slots[-1] - (len(window) - 1)
    late.sort()
    return late, skipped, peers


def histogram_bucket(before: Samples, after: Samples, name: str, q: float) -> str:
    """The bucket of a histogram's window delta that holds its q-quantile, as "(lo, hi] s"."""
    total = delta(before, after, f"{name}_count")
    if total <= 0:
        return "no observations"
    buckets = sorted(
        (float(le), value - before.get((n, labels), 0.0))
        for (n, labels), value in after.items()
        if n == f"{name}_bucket" and (le := dict(labels).get("le")) is not None
    )
    lower = 0.0
    for bound, cumulative in buckets:
        if cumulative >= q * total:
            return f"({_fmt_bound(lower)}, {_fmt_bound(bound)}] s"
        lower = bound
    return "beyond the last bucket"


def _fmt_bound(value: float) -> str:
    return "+Inf" if math.isinf(value) else f"{value:g}"


@contextlib.contextmanager
def window(
    pid: int, stub_pid: int, control: str, run: Run, daemon_url: str | None, *, pinned: bool
) -> Iterator[None]:
    """Measure CPU, pings and metrics over the block (the block sleeps ``run.duration``)."""
    before = scrape(daemon_url) if daemon_url else {}
    http("POST", f"{control}/reset")
    start = time.monotonic()
    cpu0, stub0, busy0, self0 = cpu_times(pid), cpu_times(stub_pid), busy_per_cpu(), os.times()
    yield
    cpu1, stub1, busy1, self1 = cpu_times(pid), cpu_times(stub_pid), busy_per_cpu(), os.times()
    end = time.monotonic()
    after = scrape(daemon_url) if daemon_url else {}
    stats = json.loads(http("GET", f"{control}/stats"))

    elapsed = end - start
    run.cpu_user_percent = 100 * (cpu1[0] - cpu0[0]) / elapsed
    run.cpu_system_percent = 100 * (cpu1[1] - cpu0[1]) / elapsed
    run.cpu_percent = run.cpu_user_percent + run.cpu_system_percent
    run.stub_cpu_percent = 100 * (sum(stub1) - sum(stub0)) / elapsed
    # CPU time of anything but the pinger, the stub and this script: if it is not near zero,
    # something else ran on the machine and the figures are not reliable.
    mine = 100 * (self1.user + self1.system - self0.user - self0.system) / elapsed
    busy = {name: 100 * (busy1[name] - busy0[name]) / elapsed for name in busy1}
    run.other_load_percent = {"all": busy["cpu"] - run.cpu_percent - run.stub_cpu_percent - mine}
    if pinned:
        run.other_load_percent[f"cpu{PINGER_CPU}"] = busy[f"cpu{PINGER_CPU}"] - run.cpu_percent
        run.other_load_percent[f"cpu{STUB_CPU}"] = (
            busy[f"cpu{STUB_CPU}"] - run.stub_cpu_percent - mine
        )
    run.peak_rss_mib = peak_rss_mib(pid)
    late, run.skipped_slots, run.peers_seen = lateness(stats["arrivals"], start, end, run.interval)
    run.pings_seen = len(late)
    run.lateness_ms = {
        "p50": 1000 * percentile(late, 0.50),
        "p99": 1000 * percentile(late, 0.99),
        "max": 1000 * (late[-1] if late else math.nan),
    }
    run.stub_rejected = stats["rejected"]
    if daemon_url:
        run.liveness_transactions = delta(before, after, f"{PREFIX}liveness_transactions_total")
        results = sorted(
            {dict(labels)["result"] for (n, labels) in after if n == f"{PREFIX}pings_total"}
        )
        run.daemon_view = {
            "lateness_p99_bucket": histogram_bucket(
                before, after, f"{PREFIX}lateness_seconds", 0.99
            ),
            "lateness_p50_bucket": histogram_bucket(
                before, after, f"{PREFIX}lateness_seconds", 0.50
            ),
            "pings_total": {
                r: delta(before, after, f"{PREFIX}pings_total", result=r) for r in results
            },
        }


def warm_up(interval: float) -> float:
    """Seconds before the window: the start-up spread, then two intervals."""
    return min(interval, STARTUP_SPREAD) + 2 * interval


def run_daemon(
    args: argparse.Namespace,
    procs: Processes,
    tmp: Path,
    peers: list[Peer],
    stub_pid: int,
    control: str,
    cpu: int | None,
) -> Run:
    data_dir = tmp / "daemon" / "var"
    config = tmp / "daemon" / "config.toml"
    log = tmp / "daemon" / "daemon.log"
    data_dir.parent.mkdir()
    started = time.monotonic()
    asyncio.run(create_database(data_dir, peers))
    print(
        f"  database with {len(peers)} remotes written in {time.monotonic() - started:.1f}s",
        file=sys.stderr,
    )
    port = free_port()
    write_config(config, data_dir, port, args.interval)
    url = f"http://{LOOPBACK}:{port}"
    argv = [sys.executable]
    if args.profile:
        argv += ["-m", "cProfile", "-o", str(Path(args.profile).resolve())]
    argv += ["-m", "daemon", "serve", "--config", str(config)]
    proc = procs.start(argv, log, cpu)
    wait_until(lambda: healthy(url), proc, log, timeout=60.0)
    run = Run("daemon", len(peers), args.interval, args.duration, expected(args, len(peers)))
    time.sleep(warm_up(args.interval))
    with window(proc.pid, stub_pid, control, run, url, pinned=cpu is not None):
        time.sleep(args.duration)
    run.exit_status = Processes.stop(proc)
    if run.exit_status != 0:
        print(f"  the daemon exited with {run.exit_status}:\n{tail(log)}", file=sys.stderr)
    return run


def run_baseline(
    args: argparse.Namespace,
    procs: Processes,
    tmp: Path,
    peers: list[Peer],
    stub_pid: int,
    control: str,
    cpu: int | None,
) -> Run:
    peers_file = tmp / "baseline-peers.json"
    peers_file.write_text(
        json.dumps([{"url": p.url, "remote_id": p.remote_id, "token": p.token} for p in peers])
    )
    summary = tmp / "baseline-summary.json"
    log = tmp / "baseline.log"
    argv = [
        sys.executable,
        str(BENCH_DIR / "bare_pinger.py"),
        "--peers-file",
        str(peers_file),
        "--interval",
        str(args.interval),
        "--summary",
        str(summary),
    ]
    proc = procs.start(argv, log, cpu)
    run = Run("baseline", len(peers), args.interval, args.duration, expected(args, len(peers)))
    time.sleep(warm_up(args.interval))
    if proc.poll() is not None:
        raise RuntimeError(f"the baseline exited with {proc.returncode}:\n{tail(log)}")
    with window(proc.pid, stub_pid, control, run, None, pinned=cpu is not None):
        time.sleep(args.duration)
    run.exit_status = Processes.stop(proc)
    if summary.exists():
        run.pinger_summary = json.loads(summary.read_text())
    return run


def expected(args: argparse.Namespace, peers: int) -> int:
    return round(peers * args.duration / args.interval)


def start_stub(
    procs: Processes, tmp: Path, peers: list[Peer], per_port: int, cpu: int | None
) -> tuple[subprocess.Popen[bytes], str, list[Peer]]:
    spec = tmp / "stub-peers.json"
    spec.write_text(json.dumps([{"remote_id": p.remote_id, "token": p.token} for p in peers]))
    ready = tmp / "stub-ready.json"
    log = tmp / "stub.log"
    argv = [
        sys.executable,
        str(BENCH_DIR / "stub_peers.py"),
        "--peers-file",
        str(spec),
        "--ready-file",
        str(ready),
        "--per-port",
        str(per_port),
    ]
    proc = procs.start(argv, log, cpu)
    wait_until(ready.exists, proc, log, timeout=60.0)
    info = json.loads(ready.read_text())
    located = [
        Peer(
            p.index,
            p.remote_id,
            p.token,
            f"http://{LOOPBACK}:{info['ports'][p.index // per_port]}/p{p.index}",
        )
        for p in peers
    ]
    return proc, f"http://{LOOPBACK}:{info['control_port']}", located


# --- report ----------------------------------------------------------------------------------


def machine_facts(pinned: bool) -> dict[str, Any]:
    import aiosqlite  # noqa: PLC0415 - versions only
    import msgspec  # noqa: PLC0415
    import prometheus_client  # noqa: PLC0415

    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    commit, dirty = "", None
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        commit = _git("rev-parse", "--short", "HEAD")
        dirty = bool(_git("status", "--porcelain", "--", "daemon"))
    return {
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "aiohttp": aiohttp.__version__,
        "aiosqlite": aiosqlite.__version__,
        "msgspec": msgspec.__version__,
        "prometheus_client": _version_of(prometheus_client),
        "remoteclusterd": daemon_version,
        "commit": commit,
        "daemon_changed_since_commit": dirty,
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "machine": platform.machine(),
        "pinned": pinned,
        "pinger_cpu": PINGER_CPU if pinned else None,
        "stub_cpu": STUB_CPU if pinned else None,
    }


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=REPO_DIR, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def _version_of(module: Any) -> str:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version(module.__name__.replace("_", "-"))
    except PackageNotFoundError:
        return ""


def _num(value: float | None, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return format(value, fmt)


def table(runs: list[Run]) -> str:
    header = [
        "run",
        "peers",
        "interval s",
        "duration s",
        "pings seen",
        "CPU % core",
        "peak RSS MiB",
        "late p50 ms",
        "late p99 ms",
        "late max ms",
        "liveness tx",
    ]
    rows = [header]
    for r in runs:
        rows.append(
            [
                r.name,
                str(r.peers),
                _num(r.interval, "g"),
                _num(r.duration, "g"),
                f"{r.pings_seen}/{r.pings_expected}",
                _num(r.cpu_percent, ".1f"),
                _num(r.peak_rss_mib, ".1f"),
                _num(r.lateness_ms.get("p50"), ".2f"),
                _num(r.lateness_ms.get("p99"), ".2f"),
                _num(r.lateness_ms.get("max"), ".2f"),
                _num(r.liveness_transactions, ".0f"),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report(args: argparse.Namespace, runs: list[Run], facts: dict[str, Any]) -> dict[str, Any]:
    by_name = {r.name: r for r in runs}
    daemon, baseline = by_name.get("daemon"), by_name.get("baseline")
    ratio = None
    if daemon and baseline and baseline.cpu_percent > 0:
        ratio = daemon.cpu_percent / baseline.cpu_percent
    goal_setting = (args.peers, args.interval, args.duration) == (
        GOAL_PEERS,
        GOAL_INTERVAL,
        GOAL_DURATION,
    )
    goals: dict[str, Any] = {}
    if daemon:
        goals = {
            "applies": goal_setting,
            "cpu_percent_below": GOAL_CPU_PERCENT,
            "cpu_met": daemon.cpu_percent < GOAL_CPU_PERCENT,
            "lateness_p99_ms_below": GOAL_P99_MS,
            "lateness_met": daemon.lateness_ms.get("p99", math.inf) < GOAL_P99_MS,
        }

    print()
    print(table(runs))
    print()
    if ratio is not None:
        print(f"CPU ratio daemon/baseline: {ratio:.2f}x")
    if daemon:
        view = daemon.daemon_view
        pings = ", ".join(f"{k}={v:.0f}" for k, v in view.get("pings_total", {}).items())
        print(
            "daemon's own view over the window: lateness p50 in "
            f"{view.get('lateness_p50_bucket')}, p99 in {view.get('lateness_p99_bucket')}; "
            f"pings_total: {pings or 'none'}"
        )
        scope = "" if goal_setting else " (set for 1000 peers, 1 s, 30 s; this run differs)"
        print(
            f"goals{scope}: CPU < {GOAL_CPU_PERCENT:g}% of a core: "
            f"{'met' if goals['cpu_met'] else 'MISSED'} ({daemon.cpu_percent:.1f}%); "
            f"lateness p99 < {GOAL_P99_MS:g} ms: {'met' if goals['lateness_met'] else 'MISSED'} "
            f"({daemon.lateness_ms.get('p99', math.nan):.2f} ms)"
        )
    for r in runs:
        rejected = sum(r.stub_rejected.values())
        print(
            f"{r.name}: CPU {r.cpu_user_percent:.1f}% user + {r.cpu_system_percent:.1f}% system; "
            f"{r.peers_seen}/{r.peers} peers heard from, {r.skipped_slots} skipped "
            f"slots, {rejected} pings refused by the stub, stub CPU {r.stub_cpu_percent:.1f}%; "
            "CPU used by other processes: "
            + ", ".join(f"{k} {v:.1f}%" for k, v in r.other_load_percent.items())
            + (f", pinger summary {r.pinger_summary}" if r.pinger_summary else "")
        )
    noisy = [r.name for r in runs if max(r.other_load_percent.values(), default=0.0) > NOISE]
    if noisy:
        print(
            f"WARNING: other processes used more than {NOISE:g}% of a CPU during the window of "
            f"{', '.join(noisy)}: the machine was not quiet, run again"
        )
    pinning = (
        f"daemon/baseline on CPU {PINGER_CPU}, stub on CPU {STUB_CPU}"
        if facts["pinned"]
        else "no CPU pinning (taskset or a second CPU missing)"
    )
    tree = facts["commit"] + (
        " (daemon/ changed since)" if facts["daemon_changed_since_commit"] else ""
    )
    print(
        f"python {facts['python']}, aiohttp {facts['aiohttp']}, kernel {facts['kernel']}, "
        f"nproc {facts['nproc']}; {pinning}; commit {tree or 'unknown'}"
    )
    return {
        "benchmark": "heartbeat_fanout",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "params": {
            "peers": args.peers,
            "interval": args.interval,
            "duration": args.duration,
            "per_port": args.per_port,
            "warm_up": warm_up(args.interval),
            "profiled": bool(args.profile),
            "daemon_heartbeat": {
                "interval": args.interval,
                "timeout": 15.0,
                "offline_after": 300.0,
                "jitter": 0.0,
            },
        },
        "machine": facts,
        "runs": {r.name: asdict(r) for r in runs},
        "cpu_ratio_daemon_over_baseline": ratio,
        "goals": goals,
    }


def print_profile(path: Path, top: int) -> None:
    for order in ("cumulative", "tottime"):
        out = io.StringIO()
        stats = pstats.Stats(str(path), stream=out)
        stats.strip_dirs().sort_stats(order).print_stats(top)
        print(f"\n--- daemon profile, top {top} by {order} ---")
        print(out.getvalue().split("\n\n", 1)[-1].rstrip())


# --- main ------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--peers", type=int, default=GOAL_PEERS, help="stub peers (remotes)")
    parser.add_argument("--interval", type=float, default=GOAL_INTERVAL, help="ping interval, s")
    parser.add_argument("--duration", type=float, default=GOAL_DURATION, help="window, s")
    parser.add_argument("--per-port", type=int, default=20, help="stub peers per port")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="results JSON")
    parser.add_argument("--profile", metavar="OUT.prof", help="run the daemon under cProfile")
    parser.add_argument("--profile-top", type=int, default=25, help="functions to print")
    parser.add_argument("--skip-baseline", action="store_true", help="measure the daemon only")
    args = parser.parse_args()
    if args.peers < 1 or args.interval <= 0 or args.duration <= 0 or args.per_port < 1:
        parser.error("--peers, --interval, --duration and --per-port must be positive")
    return args


def main() -> int:
    args = parse_args()
    # A SIGTERM to this script stops it like Ctrl-C: through the finally blocks below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    daemon_logging.configure("warning", "json")  # the store's own logs during set-up
    pinger_cpu, stub_cpu = pinning_cpus()
    facts = machine_facts(pinned=pinger_cpu is not None)
    if stub_cpu is not None:
        os.sched_setaffinity(0, {stub_cpu})  # keep this script off the measured core
    procs = Processes()
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="heartbeat-fanout-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            peers = [Peer(i, new_id(), new_id()) for i in range(args.peers)]
            print(
                f"heartbeat fan-out: {args.peers} peers, interval {args.interval:g}s, "
                f"window {args.duration:g}s after {warm_up(args.interval):g}s of warm-up",
                file=sys.stderr,
            )
            stub, control, peers = start_stub(procs, tmp, peers, args.per_port, stub_cpu)
            print("  daemon ...", file=sys.stderr)
            runs.append(run_daemon(args, procs, tmp, peers, stub.pid, control, pinger_cpu))
            if not args.skip_baseline:
                print("  baseline ...", file=sys.stderr)
                runs.append(run_baseline(args, procs, tmp, peers, stub.pid, control, pinger_cpu))
        finally:
            procs.stop_all()  # before the temporary directory goes
    result = report(args, runs, facts)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"results written to {args.output}", file=sys.stderr)
    if args.profile:
        print_profile(Path(args.profile), args.profile_top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
