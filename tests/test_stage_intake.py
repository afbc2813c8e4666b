"""The intake stage alone: from a name in the inbox to a job held in the spool. The other
stages are fakes; the inbox, spool and outbox are real folders under tmp_path."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from kinod.models import JobState
from kinod.stages.intake import INTAKE_BATCH, TURN_BUDGET_S, Intake
from tests.helpers import Clock
from tests.stage_fakes import (
    OTHER_NODE,
    QUICK_JOB,
    FaultySpool,
    Rig,
    disk_full,
    eventually,
    job_of,
    make_rig,
    sidecar_in,
    write_job,
)


def intake_rig(tmp_path: Path, **settings: object) -> tuple[Rig, Intake]:
    rig = make_rig(tmp_path, **settings)
    rig.ctx.intake = intake = Intake(rig.ctx)
    return rig, intake


def look_at(intake: Intake, path: Path, renamed: bool = True) -> None:
    intake.arrived(str(path), renamed)
    intake.take_turn()


def write_in_place(path: Path, text: str) -> float:
    """Written where it stands, as cp or scp do; returns its mtime."""
    path.write_text(text)
    return path.stat().st_mtime


def begun(rig: Rig) -> list[str]:
    return [job.id for job, *_ in rig.running.called("begin")]


def test_dot_names_and_tmp_files_are_ignored(tmp_path: Path) -> None:
    rig, intake = intake_rig(tmp_path)
    rig.scheduler.can_start = True
    for name in (".hidden.json", "job.json.tmp"):
        write_in_place(rig.inbox / name, json.dumps(QUICK_JOB))
        look_at(intake, rig.inbox / name)
    assert (rig.inbox / ".hidden.json").exists() and (rig.inbox / "job.json.tmp").exists()
    assert rig.running.calls == rig.scheduler.calls == rig.ending.calls == []


def test_a_bad_id_is_set_aside_to_invalid(tmp_path: Path) -> None:
    rig, intake = intake_rig(tmp_path)
    path = write_job(rig.inbox, "bad id")
    look_at(intake, path)
    assert not path.exists() and (rig.spool.invalid / "bad id.json").exists()
    assert rig.sidecar("bad id") is None and rig.ending.calls == []


def test_a_stop_file_goes_to_the_stops_stage(tmp_path: Path) -> None:
    rig, intake = intake_rig(tmp_path)
    stop = rig.inbox / "j1.stop"
    stop.touch()
    look_at(intake, stop)
    assert rig.stops.called("on_stop_file") == [(stop, "j1")]


@pytest.mark.parametrize("quiet_by", ["mtime", "seen unchanged"])
def test_a_file_written_in_place_waits_for_settle_s_and_is_looked_at_again(
        tmp_path: Path, quiet_by: str) -> None:
    rig, intake = intake_rig(tmp_path, settle_s=0.05)
    rig.scheduler.can_start = True
    path = rig.inbox / "inplace.json"

    async def body() -> None:
        rig.ctx.loop = asyncio.get_running_loop()
        rig.wall.now = write_in_place(path, json.dumps(QUICK_JOB))  # written just now
        look_at(intake, path, renamed=False)
        assert begun(rig) == [] and not intake.idle()  # a look again is planned
        await eventually(intake.has_pending, what="the look again")
        intake.take_turn()
        assert begun(rig) == []  # neither clock moved: not quiet yet
        if quiet_by == "mtime":
            rig.wall.now += 0.06
        else:  # a file server's clock may run ahead: our own clock counts too
            rig.clock.now += 0.06
        await eventually(intake.has_pending, what="the next look again")
        intake.take_turn()
        assert begun(rig) == ["inplace"]
        assert intake.idle()

    asyncio.run(body())


def test_an_invalid_file_written_in_place_gets_three_settle_times_before_it_fails(
        tmp_path: Path) -> None:
    rig, intake = intake_rig(tmp_path, settle_s=0.05)
    path = rig.inbox / "slow.json"

    async def body() -> None:
        rig.ctx.loop = asyncio.get_running_loop()
        mtime = write_in_place(path, '{"type": "scripted", "data": {"steps": ')
        rig.wall.now = mtime + 0.06  # settled, but a slow writer may only have paused
        look_at(intake, path, renamed=False)
        assert rig.ending.ends() == [] and path.exists()
        rig.wall.now = mtime + 0.16
        await eventually(intake.has_pending, what="the look again")
        intake.take_turn()
        (end,) = rig.ending.ends()
        assert end.state is JobState.FAILED and end.error.code == "invalid_job"
        assert end.path == rig.spool.running / "slow.json"

    asyncio.run(body())


def test_an_invalid_file_from_a_server_running_ahead_fails_once_seen_unchanged_long_enough(
        tmp_path: Path) -> None:
    rig, intake = intake_rig(tmp_path, settle_s=0.05)
    path = rig.inbox / "ahead.json"

    async def body() -> None:
        rig.ctx.loop = asyncio.get_running_loop()
        rig.wall.now = write_in_place(path, '{"type": "scripted", "data": ') - 100
        try:
            look_at(intake, path, renamed=False)
            rig.clock.now += 0.06  # settled: seen unchanged for settle_s
            look_at(intake, path, renamed=False)
            rig.clock.now += 0.2  # seen unchanged past 3 x settle_s
            look_at(intake, path, renamed=False)
            assert [end.job_id for end in rig.ending.ends()] == ["ahead"]
        finally:
            intake.cancel_timers()

    asyncio.run(body())


def test_a_renamed_valid_job_with_a_free_worker_begins_at_once(tmp_path: Path) -> None:
    rig, intake = intake_rig(tmp_path)
    rig.scheduler.can_start = True
    path = write_job(rig.inbox, "now")
    look_at(intake, path)
    ((job, held, sidecar, published),) = rig.running.called("begin")
    assert held == rig.spool.running / "now.json" and held.exists() and not path.exists()
    assert job.id == "now" and job.path == held and job.data["steps"] == 1
    assert sidecar.state is JobState.QUEUED and not published  # no queued sidecar written
    assert rig.sidecar("now") is None
    assert rig.scheduler.called("hold") == [(job,)]


@pytest.mark.parametrize("alone", [False, True], ids=["shared", "alone"])
def test_a_valid_job_without_a_free_worker_gets_a_queued_sidecar_and_is_admitted(
        tmp_path: Path, alone: bool) -> None:
    rig, intake = intake_rig(tmp_path)
    rig.fleet.alone = alone  # then it waits in this node's running/, not in queued/
    look_at(intake, write_job(rig.inbox, "later"))
    waits = (rig.spool.running if alone else rig.spool.queued) / "later.json"
    assert waits.exists() and rig.sidecar("later").state is JobState.QUEUED
    ((job,),) = rig.scheduler.called("admit")
    assert job.path == waits and job.spec is None  # it waits light
    assert begun(rig) == []


def test_a_job_of_a_plugin_this_node_does_not_serve_is_queued_and_passed_over(
        tmp_path: Path) -> None:
    rig, intake = intake_rig(tmp_path, serves=["example"])
    look_at(intake, write_job(rig.inbox, "notmine"))
    queued = rig.spool.queued / "notmine.json"
    assert queued.exists() and rig.scheduler.called("admit") == []
    assert rig.recovery.called("pass_over") == [(queued, queued.stat().st_mtime_ns)]


def test_a_job_admitted_with_its_stop_file_already_there_goes_to_stops(tmp_path: Path) -> None:
    rig, intake = intake_rig(tmp_path)
    (rig.inbox / "halt.stop").touch()
    look_at(intake, write_job(rig.inbox, "halt"))
    assert rig.stops.called("on_stop_file") == [(rig.inbox / "halt.stop", "halt")]


def test_an_invalid_job_is_ended_failed_with_the_reason(tmp_path: Path) -> None:
    rig, intake = intake_rig(tmp_path)
    body = {"type": "scripted", "colour": "red", "data": {"steps": "2"}}
    look_at(intake, write_job(rig.inbox, "bad", body))
    (end,) = rig.ending.ends()
    assert end.job_id == "bad" and end.state is JobState.FAILED
    assert end.path == rig.spool.running / "bad.json" and end.path.exists()
    assert end.error.code == "invalid_job"
    assert "colour: unknown key" in end.error.message and "data.steps" in end.error.message
    assert end.sidecar.task == body and not end.published


def test_a_job_for_a_plugin_only_another_node_has_is_left_in_the_inbox(tmp_path: Path) -> None:
    rig, intake = intake_rig(tmp_path)
    rig.fleet.elsewhere = {"gpu"}
    path = write_job(rig.inbox, "forgpu", {"type": "gpu"})
    look_at(intake, path)
    assert path.exists() and rig.ending.ends() == [] and rig.sidecar("forgpu") is None


@pytest.mark.parametrize("holder", ["queued here", "running on another node"])
def test_an_id_already_active_is_set_aside_as_a_duplicate(tmp_path: Path, holder: str) -> None:
    rig, intake = intake_rig(tmp_path)
    rig.scheduler.can_start = True
    if holder == "queued here":
        rig.scheduler.held["dup"] = job_of(rig.ctx, write_job(rig.spool.queued, "dup"))
    else:
        write_job(rig.spool.running_root / OTHER_NODE, "dup")
        rig.ctx.outbox.publish(sidecar_in(JobState.RUNNING, "dup", node=OTHER_NODE))
    path = write_job(rig.inbox, "dup")
    look_at(intake, path)
    assert not path.exists() and (rig.spool.duplicates / "dup" / "1.json").exists()
    assert begun(rig) == [] and rig.ending.ends() == []


def test_an_id_with_no_sidecar_is_not_looked_for_in_other_nodes_running_folders(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every job another node runs has a sidecar: without one, that node's folder is left
    # out of the look, which then costs the same however many nodes share the spool.
    rig, intake = intake_rig(tmp_path)
    rig.scheduler.can_start = True
    for node in ("n3", "n4", "n5"):
        (rig.spool.running_root / node).mkdir(parents=True)
    looked_in: list[str] = []
    lexists = os.path.lexists
    monkeypatch.setattr(os.path, "lexists",
                        lambda p: looked_in.append(os.path.dirname(p)) or lexists(p))
    look_at(intake, write_job(rig.inbox, "fresh"))
    assert begun(rig) == ["fresh"]
    folders = {os.path.basename(folder) for folder in looked_in}
    assert rig.spool.running.name in folders and {"queued", "held"} <= folders
    assert not folders & {OTHER_NODE, "n3", "n4", "n5"}


def test_the_inbox_name_of_a_file_another_node_is_moving_in_is_left_to_that_node(
        tmp_path: Path) -> None:
    # A move by link and unlink (NFS) between its two steps: the file has both names.
    rig, intake = intake_rig(tmp_path)
    held = write_job(rig.spool.running_root / OTHER_NODE, "moving")
    path = rig.inbox / "moving.json"
    os.link(held, path)

    async def body() -> None:
        rig.ctx.loop = asyncio.get_running_loop()
        look_at(intake, path)
        assert path.exists() and not rig.spool.duplicates.joinpath("moving").exists()
        assert not intake.idle()  # looked at again once the mover has had its time
        look_at(intake, path)  # the mover is slow: still left to it
        assert path.exists() and not rig.spool.duplicates.joinpath("moving").exists()
        path.unlink()  # the mover's unlink: the race is decided, nothing is left to do
        look_at(intake, path)
        assert held.exists() and not rig.spool.duplicates.joinpath("moving").exists()

    asyncio.run(body())
    assert begun(rig) == [] and rig.ending.calls == []


def test_a_job_file_hard_linked_from_elsewhere_is_taken_in_every_time(
        tmp_path: Path) -> None:
    # A pipeline may link one template into the inbox again and again.
    rig, intake = intake_rig(tmp_path)
    rig.scheduler.can_start = True
    template = write_job(tmp_path, "template")
    os.link(template, rig.inbox / "linked.json")
    look_at(intake, rig.inbox / "linked.json")
    rig.spool.finish(rig.spool.running / "linked.json", "linked")  # its run ended
    del rig.scheduler.held["linked"]
    os.link(template, rig.inbox / "linked.json")
    look_at(intake, rig.inbox / "linked.json")
    assert begun(rig) == ["linked", "linked"]
    assert not rig.spool.duplicates.joinpath("linked").exists()


def test_a_resubmission_as_its_last_run_ends_waits_and_is_taken_in_once_filed_away(
        tmp_path: Path) -> None:
    rig, intake = intake_rig(tmp_path)
    rig.scheduler.can_start = True
    last = job_of(rig.ctx, write_job(rig.spool.running, "again"))
    rig.scheduler.held["again"] = rig.running.running["again"] = last
    rig.ending.ended.add("again")  # its final sidecar is written, its file not yet in done/
    path = write_job(rig.inbox, "again")
    look_at(intake, path)
    assert path.exists() and not rig.spool.duplicates.joinpath("again").exists()
    assert begun(rig) == []
    # The last run is filed away: then the ending stage hands the new one back.
    del rig.scheduler.held["again"], rig.running.running["again"]
    rig.ending.ended.clear()
    rig.spool.finish(last.path, "again")
    wakes = rig.wake.count
    intake.take_in_resubmitted("again")
    assert intake.has_pending() and rig.wake.count == wakes + 1
    intake.take_turn()
    assert begun(rig) == ["again"] and not path.exists()


def test_a_disk_fault_while_taking_in_leaves_the_file_for_the_next_rescan(
        tmp_path: Path) -> None:
    rig = make_rig(tmp_path, spool=FaultySpool)
    rig.ctx.intake = intake = Intake(rig.ctx)
    rig.scheduler.can_start = True
    assert isinstance(rig.spool, FaultySpool)
    rig.spool.faults["accept"] = disk_full()
    path = write_job(rig.inbox, "full")
    look_at(intake, path)
    assert path.exists() and rig.retry_soon.count == 1 and begun(rig) == []
    rig.spool.faults.clear()
    intake.scan()
    intake.take_turn()
    assert begun(rig) == ["full"]


def test_a_node_that_loses_a_file_to_another_leaves_the_winners_sidecar_alone(
        tmp_path: Path) -> None:
    # Another node took the file in and ran it to its end while this one was reading it:
    # the sidecar on disk is the winner's, not a run before to archive.
    rig = make_rig(tmp_path, spool=FaultySpool)
    rig.ctx.intake = intake = Intake(rig.ctx)
    assert isinstance(rig.spool, FaultySpool)
    rig.spool.faults["accept"] = FileNotFoundError("taken by another node")
    rig.ctx.outbox.publish(sidecar_in(JobState.SUCCEEDED, "won", node=OTHER_NODE))
    look_at(intake, write_job(rig.inbox, "won"))
    assert rig.sidecar("won").state is JobState.SUCCEEDED
    assert not (rig.ctx.outbox.archive / "won").exists()


def test_a_turn_looks_at_no_more_than_intake_batch_paths(tmp_path: Path) -> None:
    rig, intake = intake_rig(tmp_path)
    for n in range(INTAKE_BATCH + 2):  # bad ids: each look leaves a file in invalid/
        intake.arrived(str(write_job(rig.inbox, f"bad {n}")), True)
    intake.take_turn()
    assert len(os.listdir(rig.spool.invalid)) == INTAKE_BATCH and intake.has_pending()
    intake.take_turn()
    assert len(os.listdir(rig.spool.invalid)) == INTAKE_BATCH + 2
    assert not intake.has_pending()


def test_a_scan_reads_the_inbox_a_batch_at_a_time(tmp_path: Path) -> None:
    rig, intake = intake_rig(tmp_path)
    for n in range(2 * INTAKE_BATCH + 2):  # bad ids: each look leaves a file in invalid/
        write_job(rig.inbox, f"bad {n}")
    intake.scan()
    assert intake.has_pending() and not intake.idle()
    assert intake._pending == {}  # nothing read yet: the turns read the listing
    intake.take_turn()  # .kinod, the spool, may be among the names read
    assert INTAKE_BATCH - 1 <= len(os.listdir(rig.spool.invalid)) <= INTAKE_BATCH
    assert intake.has_pending()
    intake.take_turn()
    intake.take_turn()
    assert len(os.listdir(rig.spool.invalid)) == 2 * INTAKE_BATCH + 2
    assert not intake.has_pending() and intake.idle()


def test_a_scan_made_again_while_one_is_under_way_starts_the_listing_again(
        tmp_path: Path) -> None:
    rig, intake = intake_rig(tmp_path)
    for n in range(INTAKE_BATCH + 2):
        write_job(rig.inbox, f"bad {n}")
    intake.scan()
    intake.take_turn()
    intake.scan()  # sees only what is left
    intake.take_turn()
    assert len(os.listdir(rig.spool.invalid)) == INTAKE_BATCH + 2
    assert not intake.has_pending()


class Ticking(Clock):
    """A clock that moves on at every look: each costs 0.6 of the turn's budget."""

    def __call__(self) -> float:
        self.now += TURN_BUDGET_S * 0.6
        return self.now


def test_a_turn_stops_looking_once_its_time_budget_is_spent(tmp_path: Path) -> None:
    rig, intake = intake_rig(tmp_path)
    rig.ctx.clock = Ticking()
    for n in range(3):
        intake.arrived(str(write_job(rig.inbox, f"bad {n}")), True)
    intake.take_turn()
    assert len(os.listdir(rig.spool.invalid)) == 1 and intake.has_pending()
