"""The scheduler stage alone: which waiting job starts next, within the worker and plugin
slots, and when (not_before, a disk fault). The running stage is a fake whose start takes
the job's slot."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, timedelta
from pathlib import Path

import pytest
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from kinod.models import utc_now
from kinod.stages.scheduler import Scheduler
from tests.stage_fakes import Rig, bare_job, disk_full, eventually, make_rig


def scheduler_rig(tmp_path: Path, **settings: object) -> tuple[Rig, Scheduler]:
    rig = make_rig(tmp_path, **settings)
    rig.ctx.scheduler = scheduler = Scheduler(rig.ctx)
    return rig, scheduler


@contextlib.asynccontextmanager
async def running_timers(rig: Rig) -> AsyncIterator[AsyncIOScheduler]:
    """The context's timers, started on the running loop, as the daemon starts them."""
    rig.ctx.timers = timers = AsyncIOScheduler(event_loop=asyncio.get_running_loop(),
                                               timezone=UTC)
    timers.start()
    try:
        yield timers
    finally:
        timers.shutdown(wait=False)


def started(rig: Rig) -> list[str]:
    return [job.id for (job,) in rig.running.called("start")]


def test_dispatch_starts_higher_priority_first_then_older(tmp_path: Path) -> None:
    rig, scheduler = scheduler_rig(tmp_path, workers=4)
    for job_id, priority, submitted_ns in (("old", 0, 1), ("urgent", 5, 3), ("new", 0, 2),
                                           ("newest", 0, 4)):
        scheduler.admit(bare_job(rig.ctx, job_id, priority=priority, submitted_ns=submitted_ns))
    scheduler.dispatch()
    assert started(rig) == ["urgent", "old", "new", "newest"]


def test_dispatch_starts_no_more_jobs_than_workers(tmp_path: Path) -> None:
    rig, scheduler = scheduler_rig(tmp_path, workers=2)
    for n in range(3):
        scheduler.admit(bare_job(rig.ctx, f"j{n}", submitted_ns=n))
    scheduler.dispatch()
    assert started(rig) == ["j0", "j1"]
    assert scheduler.queued() == 1


def test_max_concurrency_holds_back_its_plugin_but_not_the_others(tmp_path: Path) -> None:
    rig, scheduler = scheduler_rig(tmp_path, workers=4,
                                   plugins={"scripted": {"max_concurrency": 1}})
    scheduler.admit(bare_job(rig.ctx, "s1", submitted_ns=1))
    scheduler.admit(bare_job(rig.ctx, "s2", submitted_ns=2))
    scheduler.admit(bare_job(rig.ctx, "e1", plugin="example", submitted_ns=3))
    scheduler.dispatch()
    assert started(rig) == ["s1", "e1"]
    assert not scheduler.has_room("scripted") and scheduler.has_room("example")


def test_a_freed_slot_lets_the_next_job_start_and_counts_once(tmp_path: Path) -> None:
    rig, scheduler = scheduler_rig(tmp_path, workers=1)
    first = bare_job(rig.ctx, "first", submitted_ns=1)
    for job in (first, bare_job(rig.ctx, "second", submitted_ns=2),
                bare_job(rig.ctx, "third", submitted_ns=3)):
        scheduler.admit(job)
    scheduler.dispatch()
    assert started(rig) == ["first"]
    wakes = rig.wake.count
    scheduler.free_slot(first)
    scheduler.free_slot(first)  # its thread and the loop both free it: one slot only
    assert rig.wake.count == wakes + 1
    scheduler.dispatch()
    assert started(rig) == ["first", "second"]


def test_dispatch_skips_a_job_removed_while_queued(tmp_path: Path) -> None:
    rig, scheduler = scheduler_rig(tmp_path, workers=1)
    scheduler.admit(bare_job(rig.ctx, "gone", submitted_ns=1))
    scheduler.admit(bare_job(rig.ctx, "next", submitted_ns=2))
    scheduler.remove("gone")  # ended (e.g. stopped) without leaving the queue
    scheduler.dispatch()
    assert started(rig) == ["next"]


def test_a_disk_fault_at_start_requeues_the_job_and_holds_starts_until_resume(
        tmp_path: Path) -> None:
    rig, scheduler = scheduler_rig(tmp_path, workers=2)
    for job in (bare_job(rig.ctx, "full", submitted_ns=1),
                bare_job(rig.ctx, "later", submitted_ns=2)):
        scheduler.hold(job)  # kept whole, as a retry or a not_before release queues it
        scheduler.enqueue(job)
    rig.running.start_fault = disk_full()
    scheduler.dispatch()
    assert started(rig) == ["full"]  # tried once, then no other start on a failing disk
    assert scheduler.queued() == 2 and rig.retry_soon.count == 1
    rig.running.start_fault = None
    scheduler.dispatch()
    assert started(rig) == ["full"]  # held until the retry
    scheduler.resume()
    scheduler.dispatch()
    assert started(rig) == ["full", "full", "later"]


def test_a_disk_fault_at_the_claim_of_a_light_job_requeues_it(tmp_path: Path) -> None:
    rig, scheduler = scheduler_rig(tmp_path, workers=1)
    scheduler.admit(bare_job(rig.ctx, "light"))  # waits light, as every queued job does
    rig.running.start_fault = disk_full()
    scheduler.dispatch()
    assert scheduler.queued() == 1 and rig.retry_soon.count == 1


def test_not_before_keeps_a_job_out_of_the_queue_until_its_time(tmp_path: Path) -> None:
    rig, scheduler = scheduler_rig(tmp_path)

    async def body() -> None:
        async with running_timers(rig):
            job = bare_job(rig.ctx, "later", not_before=utc_now() + timedelta(seconds=0.3))
            scheduler.admit(job)
            assert "later" in scheduler and scheduler.queued() == 0
            scheduler.dispatch()
            assert started(rig) == []
            await eventually(lambda: scheduler.queued() == 1, what="the not_before release")
            assert job.spec is None  # it waited light, like any queued job
            scheduler.dispatch()
            assert started(rig) == ["later"]

    asyncio.run(body())


def test_forget_drops_a_job_from_the_queue_and_its_not_before_timer(tmp_path: Path) -> None:
    rig, scheduler = scheduler_rig(tmp_path)

    async def body() -> None:
        async with running_timers(rig) as timers:
            queued = bare_job(rig.ctx, "queued")
            waiting = bare_job(rig.ctx, "waiting", not_before=utc_now() + timedelta(hours=1))
            scheduler.admit(queued)
            scheduler.admit(waiting)
            scheduler.forget(queued)
            scheduler.forget(waiting)
            assert len(scheduler) == 0 and scheduler.queued() == 0
            assert timers.get_job("not_before:waiting") is None
            scheduler.dispatch()
            assert started(rig) == []

    asyncio.run(body())


def test_remove_if_keeps_a_newer_job_of_the_same_id(tmp_path: Path) -> None:
    rig, scheduler = scheduler_rig(tmp_path)
    old, new = bare_job(rig.ctx, "same"), bare_job(rig.ctx, "same")
    scheduler.hold(old)
    scheduler.hold(new)
    scheduler.remove_if(old)
    assert scheduler.get("same") is new


def test_can_start_now_when_nothing_stands_in_the_way(tmp_path: Path) -> None:
    rig, scheduler = scheduler_rig(tmp_path, workers=1)
    job = bare_job(rig.ctx, "now")
    assert scheduler.can_start_now("now", job.spec, "scripted")


@pytest.mark.parametrize("obstacle", ["stop file", "a job queued", "workers busy",
                                      "plugin at its limit", "not_before ahead",
                                      "plugin not served", "daemon stopping"])
def test_can_start_now_is_false_when(tmp_path: Path, obstacle: str) -> None:
    rig, scheduler = scheduler_rig(
        tmp_path, workers=2, plugins={"scripted": {"max_concurrency": 1}},
        serves=["example"] if obstacle == "plugin not served" else None)
    job = bare_job(rig.ctx, "now", not_before=utc_now() + timedelta(hours=1)
                   if obstacle == "not_before ahead" else None)
    if obstacle == "stop file":
        Path(rig.ctx.stop_file("now")).touch()
    elif obstacle == "a job queued":
        scheduler.admit(bare_job(rig.ctx, "before", plugin="example"))
    elif obstacle == "workers busy":
        for n in range(2):
            scheduler.take_slot(bare_job(rig.ctx, f"e{n}", plugin="example"))
    elif obstacle == "plugin at its limit":
        scheduler.take_slot(bare_job(rig.ctx, "s"))
    elif obstacle == "daemon stopping":
        rig.ctx.stopping = lambda: True
    assert not scheduler.can_start_now("now", job.spec, "scripted")
