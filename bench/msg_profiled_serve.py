"""Run ``daemon serve`` under cProfile, profiling only between SIGUSR1 and SIGUSR2.

``python -m cProfile -m daemon serve`` profiles the whole life of the process (imports,
start-up, idle waits, shutdown); the message benchmark wants the load window only. This wrapper
starts the daemon's own command line in the same process with a profiler that is off until
SIGUSR1 and is stopped and written to ``--out`` at SIGUSR2 (again at exit if still running).

Only the main thread (the event loop) is profiled; aiosqlite's worker thread is not. The timer
is the main thread's CPU time by default (``--timer thread``): idle waits in ``epoll`` and the
time the CPU spends in other threads (on a pinned core) are then not charged to whatever the
event loop happened to be doing. ``--timer wall`` is cProfile's usual clock.

Usage (``msg_throughput.py --profile`` starts it for you)::

    python bench/msg_profiled_serve.py --out OUT.prof [--timer thread|wall] --config PATH
"""

from __future__ import annotations

import argparse
import cProfile
import signal
import sys
import time
from types import FrameType

from daemon.cli import main as daemon_main

TIMERS = {"thread": time.thread_time, "wall": time.perf_counter}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", required=True, help="where the pstats file goes")
    parser.add_argument("--timer", choices=sorted(TIMERS), default="thread")
    parser.add_argument("--config", required=True, help="the daemon's TOML config file")
    args = parser.parse_args()
    profiler = cProfile.Profile(TIMERS[args.timer])
    running = False

    def start(_signum: int, _frame: FrameType | None) -> None:
        nonlocal running
        if not running:
            running = True
            profiler.enable()

    def stop(_signum: int | None = None, _frame: FrameType | None = None) -> None:
        nonlocal running
        if running:
            profiler.disable()
            running = False
            profiler.dump_stats(args.out)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    try:
        return daemon_main(["serve", "--config", args.config])
    finally:
        stop()


if __name__ == "__main__":
    sys.exit(main())
