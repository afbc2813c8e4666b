"""The running stage alone: a job's run from its claim to its judged end. The plugin's run is
a FakeRun put in place of PluginRun, which ends when the test says; the other stages are
fakes, the spool and outbox real folders under tmp_path."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

import kinod.stages.running as running_stage
from kinod.models import JobState
from kinod.outcome import StopReason
from kinod.plugins.base_plugin import PluginResult
from kinod.stages.job import Job
from kinod.stages.running import Running
from tests.stage_fakes import (
    NODE,
    FakeRun,
    FaultyOutbox,
    Rig,
    RunMaker,
    disk_full,
    eventually,
    job_of,
    make_rig,
    sidecar_in,
    write_job,
)

SUCCESS = PluginResult(success=True, data={"out": 1})


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> RunMaker:
    maker = RunMaker()
    monkeypatch.setattr(running_stage, "PluginRun", maker)
    return maker


def running_rig(tmp_path: Path, **settings: object) -> tuple[Rig, Running]:
    rig = make_rig(tmp_path, **settings)
    rig.ctx.running = running = Running(rig.ctx)
    return rig, running


def on_loop(rig: Rig, body: Callable[[], Awaitable[None]]) -> None:
    """Run ``body`` on a loop of its own, which the stage's context uses."""

    async def main() -> None:
        rig.ctx.loop = asyncio.get_running_loop()
        await body()

    asyncio.run(main())


def queued_job(rig: Rig, job_id: str, body: dict | None = None) -> Job:
    return job_of(rig.ctx, write_job(rig.spool.queued, job_id, body))


def begin_held(rig: Rig, running: Running, job_id: str, body: dict | None = None) -> Job:
    """A job taken in here, its file in running/, begun at once."""
    job = job_of(rig.ctx, write_job(rig.spool.running, job_id, body))
    running.begin(job, job.path, job.sidecar)
    return job


async def run_of(runs: RunMaker, job_id: str) -> FakeRun:
    return await eventually(lambda: runs.runs.get(job_id), what=f"the run of {job_id}")


async def recorded(rig: Rig, count: int = 1) -> list[tuple]:
    """The ends handed to the ending stage, once there are ``count``."""
    return await eventually(lambda: (calls := rig.ending.called("record")) and
                            len(calls) >= count and calls, what="the end recorded")


def test_begin_writes_a_running_sidecar_and_takes_a_slot(tmp_path: Path, runs: RunMaker) -> None:
    rig, running = running_rig(tmp_path)

    async def body() -> None:
        job = begin_held(rig, running, "go")
        sidecar = rig.sidecar("go")
        assert sidecar.state is JobState.RUNNING and sidecar.attempt == 1
        assert sidecar.started_at is not None and sidecar.node == NODE
        assert running.is_running("go") and rig.scheduler.called("take_slot") == [(job,)]
        (await run_of(runs, "go")).finish(SUCCESS)
        await recorded(rig)

    on_loop(rig, body)


def test_a_finished_run_writes_its_end_frees_its_slot_and_hands_the_end_on(
        tmp_path: Path, runs: RunMaker) -> None:
    rig, running = running_rig(tmp_path)

    async def body() -> None:
        job = begin_held(rig, running, "done")
        (await run_of(runs, "done")).finish(SUCCESS)
        ((ended, verdict, again),) = await recorded(rig)
        assert ended is job and verdict.state is JobState.SUCCEEDED and not again
        assert verdict.result == {"out": 1}
        # Written here, off the loop: the ending stage only files the job away.
        assert job.final is not None and rig.sidecar("done") == job.final
        assert job.final.state is JobState.SUCCEEDED
        assert not running.is_running("done") and (job,) in rig.scheduler.called("free_slot")

    on_loop(rig, body)


def test_a_retryable_failure_runs_again_while_its_retries_last(
        tmp_path: Path, runs: RunMaker) -> None:
    rig, running = running_rig(tmp_path)
    busy = PluginResult(success=False, data={}, error="busy", retryable=True)

    async def body() -> None:
        job = begin_held(rig, running, "flaky", {"type": "scripted", "retries": 1})
        (await run_of(runs, "flaky")).finish(busy)
        ((_, verdict, again),) = await recorded(rig)
        assert verdict.state is JobState.FAILED and verdict.retryable and again
        assert job.final is None and rig.sidecar("flaky").state is JobState.RUNNING
        running.begin(job, job.path, rig.sidecar("flaky"))  # as the ending stage requeued it
        assert rig.sidecar("flaky").attempt == 2
        del runs.runs["flaky"]
        (await run_of(runs, "flaky")).finish(busy)
        (_, (_, verdict, again)) = await recorded(rig, 2)
        assert not again and rig.sidecar("flaky").state is JobState.FAILED

    on_loop(rig, body)


def test_start_of_a_job_whose_file_is_gone_goes_to_claimed_elsewhere(tmp_path: Path) -> None:
    rig, running = running_rig(tmp_path)
    job = queued_job(rig, "gone")
    job.path.unlink()
    running.start(job)
    assert rig.ending.called("claimed_elsewhere") == [(job,)]
    assert not running.is_running("gone") and rig.sidecar("gone") is None


def test_start_of_a_job_whose_sidecar_has_ended_files_it_away(tmp_path: Path) -> None:
    rig, running = running_rig(tmp_path)
    job = queued_job(rig, "old")
    rig.ending.sidecars["old"] = sidecar_in(JobState.SUCCEEDED, "old")  # run elsewhere
    running.start(job)
    claimed = rig.spool.running / "old.json"
    assert claimed.exists() and rig.ending.called("file_away") == [(claimed, "old")]
    assert rig.scheduler.called("remove") == [("old",)] and not running.is_running("old")


def test_a_light_job_is_made_whole_from_its_file_at_claim(tmp_path: Path,
                                                          runs: RunMaker) -> None:
    rig, running = running_rig(tmp_path)

    async def body() -> None:
        job = queued_job(rig, "light", {"type": "scripted", "data": {"steps": 2}})
        job.wait_light()  # as it waited in the queue
        running.start(job)
        assert job.spec is not None and job.sidecar is not None
        assert job.data["steps"] == 2 and job.data["step_s"] == 0.05  # defaults filled in
        # Read again as claimed, as every waiting job is: the file on disk is the truth.
        assert rig.intake.called("read_held") == [(rig.spool.running / "light.json",)]
        run = await run_of(runs, "light")
        assert run.data == job.data
        run.finish(SUCCESS)
        await recorded(rig)

    on_loop(rig, body)


def test_a_file_replaced_while_queued_is_read_again(tmp_path: Path, runs: RunMaker) -> None:
    rig, running = running_rig(tmp_path)

    async def body() -> None:
        job = queued_job(rig, "swap", {"type": "scripted", "data": {"tag": "first"}})
        job.wait_light()
        write_job(rig.spool.queued, "swap", {"type": "scripted", "data": {"tag": "second"}})
        running.start(job)
        assert rig.intake.called("read_held") == [(rig.spool.running / "swap.json",)]
        assert job.data["tag"] == "second"
        (await run_of(runs, "swap")).finish(SUCCESS)
        await recorded(rig)

    on_loop(rig, body)


def test_a_file_replaced_by_an_invalid_one_while_queued_fails(tmp_path: Path) -> None:
    rig, running = running_rig(tmp_path)
    job = queued_job(rig, "swap")
    write_job(rig.spool.queued, "swap", {"type": "scripted", "colour": "red"})
    running.start(job)
    (end,) = rig.ending.ends()
    assert end.state is JobState.FAILED and end.error.code == "invalid_job"
    assert end.path == rig.spool.running / "swap.json"
    assert rig.scheduler.called("remove") == [("swap",)] and not running.is_running("swap")


def test_a_file_replaced_by_one_for_a_plugin_not_served_here_goes_back_for_others(
        tmp_path: Path) -> None:
    rig, running = running_rig(tmp_path, serves=["scripted"])
    job = queued_job(rig, "swap")
    write_job(rig.spool.queued, "swap", {"type": "example", "data": {"prompt": "x"}})
    running.start(job)
    assert (rig.spool.queued / "swap.json").exists()
    assert rig.scheduler.called("forget") == [(job,)] and not running.is_running("swap")
    assert rig.sidecar("swap") is None


def test_a_disk_fault_writing_the_running_sidecar_puts_the_file_back_in_queued(
        tmp_path: Path) -> None:
    rig = make_rig(tmp_path, outbox=FaultyOutbox)
    rig.ctx.running = running = Running(rig.ctx)
    job = queued_job(rig, "full")
    assert isinstance(rig.ctx.outbox, FaultyOutbox)
    rig.ctx.outbox.fault = disk_full()
    with pytest.raises(OSError):
        running.start(job)
    assert job.path == rig.spool.queued / "full.json" and job.path.exists()
    assert not running.is_running("full") and rig.scheduler.called("take_slot") == []


def test_progress_is_throttled_by_the_clock_and_the_last_report_wins(
        tmp_path: Path, runs: RunMaker) -> None:
    rig, running = running_rig(tmp_path, progress_interval_s=0.2)

    async def body() -> None:
        job = begin_held(rig, running, "p")
        run = await run_of(runs, "p")
        # The first write is planned one interval after the running sidecar's, at its start.
        planned = job.progress_timer
        assert planned is not None
        assert planned.when() - asyncio.get_running_loop().time() <= 0.2
        rig.clock.now += 0.1  # half the interval since the running sidecar was written
        for percent in (10.0, 20.0, 30.0):
            run.on_progress(percent, f"at {percent:g}")
        await asyncio.sleep(0)  # the reports' turn of the loop: none written, the plan stands
        assert rig.sidecar("p").progress == 0 and job.progress_timer is planned
        await eventually(lambda: rig.sidecar("p").progress == 30, what="the throttled write")
        assert rig.sidecar("p").message == "at 30"
        rig.clock.now += 0.3  # the interval has passed, by the stage's clock
        run.on_progress(40.0, None)
        await asyncio.sleep(0)  # the report's turn of the loop: written then, no timer
        assert rig.sidecar("p").progress == 40 and job.progress_timer is None
        run.finish(SUCCESS)
        await recorded(rig)

    on_loop(rig, body)


def test_progress_of_a_job_another_node_took_over_fences_it_instead(
        tmp_path: Path, runs: RunMaker) -> None:
    rig, running = running_rig(tmp_path)

    async def body() -> None:
        job = begin_held(rig, running, "lost")
        run = await run_of(runs, "lost")
        rig.fleet.taken.add("lost")
        run.on_progress(50.0, None)
        await eventually(lambda: rig.fleet.called("fence"), what="the fence")
        assert rig.fleet.called("fence") == [(job,)] and rig.sidecar("lost").progress == 0
        run.finish(SUCCESS)
        await recorded(rig)
        assert job.final is None  # its end is the other node's to write
        assert rig.sidecar("lost").state is JobState.RUNNING

    on_loop(rig, body)


@pytest.mark.parametrize("when", ["before its run is made", "while it runs"])
def test_a_stop_request_reaches_the_run(tmp_path: Path, runs: RunMaker, when: str) -> None:
    rig, running = running_rig(tmp_path, stop_grace=1)

    async def body() -> None:
        job = begin_held(rig, running, "halt")
        if when == "while it runs":
            await run_of(runs, "halt")
        running.stop(job)
        run = await run_of(runs, "halt")
        ((_, verdict, _),) = await recorded(rig)
        assert run.stops == [(StopReason.USER, 1.0)] and job.stop_requested
        assert verdict.state is JobState.STOPPED

    on_loop(rig, body)


def test_stop_all_asks_every_run_to_stop_for_shutdown_and_waits_for_them(
        tmp_path: Path, runs: RunMaker) -> None:
    rig, running = running_rig(tmp_path)

    async def body() -> None:
        for job_id in ("a", "b"):
            begin_held(rig, running, job_id)
            await run_of(runs, job_id)
        await running.stop_all()
        assert len(running) == 0
        assert [run.stops for run in runs.runs.values()] == [[(StopReason.SHUTDOWN, 1.0)]] * 2
        assert [verdict.state for _, verdict, _ in rig.ending.called("record")] == [None, None]
        assert rig.sidecar("a").state is JobState.RUNNING  # back in the queue: ending's to say

    on_loop(rig, body)
