"""Background-work helpers: work that outlives a cancelled caller, janitors, worker restarts."""

from __future__ import annotations

import asyncio

import pytest

from daemon import workers
from daemon.tasks import Unstoppable, periodic
from daemon.workers import RemoteWorkers, Worker
from tests.helpers import eventually

pytestmark = pytest.mark.timeout(30)


async def test_unstoppable_work_finishes_and_its_caller_waits_for_it() -> None:
    finishing = Unstoppable()
    release = asyncio.Event()
    steps: list[str] = []

    async def work() -> str:
        await release.wait()
        steps.append("work done")
        return "result"

    async def caller() -> None:
        try:
            await finishing.run(work())
        finally:
            steps.append("caller released")

    task = asyncio.create_task(caller())
    await eventually(lambda: len(finishing._running) == 1)
    task.cancel()
    task.cancel()  # twice: the caller still waits for the work's end
    await asyncio.sleep(0)
    assert steps == [] and not task.done()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task  # the cancellation is not swallowed
    assert steps == ["work done", "caller released"]
    assert await finishing.run(asyncio.sleep(0, "x")) == "x"
    await finishing.wait()


async def test_periodic_work_goes_on_after_a_failing_round() -> None:
    rounds: list[int] = []

    async def work() -> None:
        rounds.append(len(rounds))
        if len(rounds) == 1:
            raise OSError("disk trouble")

    task = periodic(work, 0.01, name="test.janitor", at_start=True)
    await eventually(lambda: len(rounds) >= 3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_failing_worker_is_restarted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers, "RESTART_PAUSE", 0.01)
    runs: list[str] = []
    served = asyncio.Event()

    async def run(worker: Worker) -> None:
        runs.append(worker.remote_id)
        if len(runs) == 1:
            raise ValueError("a peer sent something unexpected")
        served.set()
        await asyncio.Event().wait()

    pool = RemoteWorkers("test", run)
    first = pool.ensure("r" * 26)
    await asyncio.wait_for(served.wait(), timeout=5)
    assert runs == ["r" * 26, "r" * 26]
    assert pool.ensure("r" * 26) is first and not first.task.done()  # type: ignore[union-attr]
    await pool.stop()
    assert first.task is not None and first.task.cancelled()
