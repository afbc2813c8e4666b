"""The recovery stage alone: what a dead daemon left in running/, queued jobs no job here
stands for, and files whose taking in was cut short. Intake and ending are fakes (the fake
intake reads job files for real); the spool and outbox are real folders under tmp_path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kinod.models import JobState
from kinod.stages.recovery import Recovery
from tests.stage_fakes import Rig, disk_full, job_of, make_rig, sidecar_in, write_job


def recovery_rig(tmp_path: Path, **settings: object) -> tuple[Rig, Recovery]:
    rig = make_rig(tmp_path, **settings)
    rig.ctx.recovery = recovery = Recovery(rig.ctx)
    return rig, recovery


def left_running(rig: Rig, job_id: str, sidecar_state: JobState | None = None,
                 body: dict | None = None, node: str = "n0") -> Path:
    """A job file a dead daemon left in this node's running/, and its sidecar if any."""
    path = write_job(rig.spool.running, job_id, body)
    if sidecar_state is not None:
        rig.ctx.outbox.publish(sidecar_in(sidecar_state, job_id, node=node,
                                          started=sidecar_state is not JobState.QUEUED))
    return path


def test_a_running_file_whose_run_had_ended_is_filed_away(tmp_path: Path) -> None:
    rig, recovery = recovery_rig(tmp_path)
    path = left_running(rig, "ended", JobState.SUCCEEDED)
    recovery.recover_running(path)
    assert rig.ending.called("file_away") == [(path, "ended")]
    assert rig.intake.calls == [] and rig.sidecar("ended").state is JobState.SUCCEEDED


def test_a_new_submission_beside_the_last_runs_sidecar_is_taken_in_not_filed(
        tmp_path: Path) -> None:
    # The daemon died after taking the new file in and before archiving the sidecar of
    # the run before, whose file done/ holds already.
    rig, recovery = recovery_rig(tmp_path)
    path = left_running(rig, "again", JobState.SUCCEEDED)
    write_job(rig.spool.done / "again", "1")
    recovery.recover_running(path)
    assert rig.ending.calls == []
    assert [call[0] for call in rig.intake.calls if call[0] != "read_held"] == ["take_in"]
    assert rig.sidecar("again") is None  # archived: the new run writes its own
    assert (rig.ctx.outbox.archive / "again" / "1.json").exists()


@pytest.mark.parametrize(("case", "handed_to"), [
    ("no sidecar", "take_in"), ("a queued sidecar", "let_wait"),
    ("a queued sidecar, an invalid file", "take_in")])
def test_a_running_file_that_never_ran_goes_back_to_intake(
        tmp_path: Path, case: str, handed_to: str) -> None:
    rig, recovery = recovery_rig(tmp_path)
    body = {"type": "scripted", "colour": "red"} if case.endswith("invalid file") else None
    path = left_running(rig, "w", None if case == "no sidecar" else JobState.QUEUED, body)
    recovery.recover_running(path)
    handed = [call[0] for call in rig.intake.calls if call[0] in ("take_in", "let_wait")]
    assert handed == [handed_to]
    assert rig.intake.called(handed_to)[0][:2] == (path, "w")
    assert path.exists() and rig.ending.calls == []


def test_a_move_into_the_spool_a_crash_cut_short_is_finished(tmp_path: Path) -> None:
    # A link, then a crash before the unlink (NFS): the inbox name beside the held file.
    rig, recovery = recovery_rig(tmp_path)
    path = left_running(rig, "cut")
    inbox_name = rig.inbox / "cut.JSON"  # the suffix as the user wrote it
    os.link(path, inbox_name)
    unrelated = write_job(rig.inbox, "other")
    recovery.recover_running(path)
    assert not inbox_name.exists() and path.exists() and unrelated.exists()
    assert [call[0] for call in rig.intake.calls if call[0] != "read_held"] == ["take_in"]


def test_a_job_that_was_running_is_requeued_and_counted_as_a_crash(tmp_path: Path) -> None:
    rig, recovery = recovery_rig(tmp_path)
    path = left_running(rig, "crashed", JobState.RUNNING)
    recovery.recover_running(path)
    sidecar = rig.sidecar("crashed")
    assert sidecar.state is JobState.QUEUED
    assert sidecar.message == "back in the queue: the daemon on n0 died while running it"
    assert (rig.spool.queued / "crashed.json").exists() and not path.exists()
    assert json.loads((rig.spool.counts / "crashed.json").read_text()) == {"crashes": 1}
    assert rig.ending.calls == []


def test_a_claimed_job_that_had_not_begun_again_is_no_crash(tmp_path: Path) -> None:
    rig, recovery = recovery_rig(tmp_path)
    path = write_job(rig.spool.running, "again")
    rig.ctx.outbox.publish(sidecar_in(JobState.QUEUED, "again"))  # after attempt 1
    recovery.recover_running(path)
    assert not (rig.spool.counts / "again.json").exists()
    assert [call[0] for call in rig.intake.calls if call[0] != "read_held"] == ["let_wait"]


def test_a_job_past_max_crash_attempts_fails_as_crashed(tmp_path: Path) -> None:
    rig, recovery = recovery_rig(tmp_path, max_crash_attempts=2)
    path = left_running(rig, "doomed", JobState.RUNNING)
    rig.spool.count("doomed", "crashes")  # a daemon died running it once before
    recovery.recover_running(path)
    (end,) = rig.ending.ends()
    assert end.job_id == "doomed" and end.path == path and end.state is JobState.FAILED
    assert end.error.code == "crashed" and "died 2 times" in end.error.message
    assert not (rig.spool.queued / "doomed.json").exists()


def test_recover_orphans_takes_up_only_files_no_job_here_stands_for(tmp_path: Path) -> None:
    rig, recovery = recovery_rig(tmp_path)
    orphan = left_running(rig, "orphan")
    held = left_running(rig, "held")
    rig.scheduler.held["held"] = job_of(rig.ctx, held)
    left_running(rig, "unfiled")
    rig.ending.unfiled.add("unfiled")  # ended; the ending stage files it away
    recovery.recover_orphans()
    assert [args[:2] for args in rig.intake.called("take_in")] == [(orphan, "orphan")]


def test_adopt_queued_adopts_the_queued_files_no_job_here_stands_for(tmp_path: Path) -> None:
    rig, recovery = recovery_rig(tmp_path)
    theirs = write_job(rig.spool.queued, "theirs")
    rig.scheduler.held["mine"] = job_of(rig.ctx, write_job(rig.spool.queued, "mine"))
    recovery.adopt_queued()
    ((path, job_id, read),) = rig.intake.called("admit")
    assert (path, job_id) == (theirs, "theirs")
    assert read.error is None


def test_adopt_queued_sends_a_job_whose_file_left_queued_to_claimed_elsewhere(
        tmp_path: Path) -> None:
    rig, recovery = recovery_rig(tmp_path)
    job = job_of(rig.ctx, write_job(rig.spool.queued, "left"))
    rig.scheduler.held["left"] = job
    job.path.unlink()
    recovery.adopt_queued()
    assert rig.ending.called("claimed_elsewhere") == [(job,)]


def test_adopt_queued_passes_over_unserved_plugins_until_their_file_changes(
        tmp_path: Path) -> None:
    rig, recovery = recovery_rig(tmp_path, serves=["example"])
    path = write_job(rig.spool.queued, "notmine")
    recovery.adopt_queued()
    recovery.adopt_queued()
    assert rig.intake.called("read") == [(path,)] and rig.intake.called("admit") == []
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # rewritten
    recovery.adopt_queued()
    assert len(rig.intake.called("read")) == 2
    recovery.forget_passed_over()  # a reload: this node may serve it now
    recovery.adopt_queued()
    assert len(rig.intake.called("read")) == 3


def test_a_queued_file_too_big_for_this_node_is_passed_over_until_it_changes(
        tmp_path: Path) -> None:
    rig, recovery = recovery_rig(tmp_path, max_job_bytes=10)
    path = write_job(rig.spool.queued, "huge")  # for a node that allows bigger jobs
    recovery.adopt_queued()
    recovery.adopt_queued()
    assert rig.intake.called("read") == [(path,)]


def test_on_queued_adopts_a_job_another_node_took_in_and_wakes_the_loop(
        tmp_path: Path) -> None:
    rig, recovery = recovery_rig(tmp_path)
    path = write_job(rig.spool.queued, "theirs")
    recovery.on_queued(path, "theirs")
    recovery.on_queued(rig.spool.queued / "gone.json", "gone")  # claimed meanwhile
    assert [args[:2] for args in rig.intake.called("admit")] == [(path, "theirs")]
    assert rig.wake.count == 1


@pytest.mark.parametrize(("fault", "retries"), [
    (FileNotFoundError(), 0), (disk_full(), 1), (ValueError("unexpected"), 0)],
    ids=["taken meanwhile", "disk fault", "anything else"])
def test_guarded_keeps_one_file_from_stopping_recovery(tmp_path: Path, fault: Exception,
                                                       retries: int) -> None:
    rig, recovery = recovery_rig(tmp_path)

    def action(path: Path) -> None:
        raise fault

    recovery.guarded(action, rig.spool.running / "x.json")
    assert rig.retry_soon.count == retries


def admitting(rig: Rig) -> None:
    """The fake intake's admit keeps the job here, as the real one does."""
    record = rig.intake.admit

    def admit(queued: Path, job_id: str, *args: object) -> None:
        record(queued, job_id, *args)
        rig.scheduler.held[job_id] = job_of(rig.ctx, queued)

    rig.intake.admit = admit


def test_another_nodes_share_is_taken_only_once_it_waited_two_polls_oldest_first(
        tmp_path: Path) -> None:
    rig, recovery = recovery_rig(tmp_path, poll_interval_s=1)
    admitting(rig)
    rig.fleet.others = {"t1", "t2", "t3"}
    for job_id in ("t1", "mine", "t2"):
        write_job(rig.spool.queued, job_id)
    assert recovery.adopt_queued() == 1  # its own share only
    assert [args[1] for args in rig.intake.called("admit")] == ["mine"]
    rig.clock.now += 1
    write_job(rig.spool.queued, "t3")
    assert recovery.adopt_queued() == 0
    assert recovery.steal(5) == 0  # none has waited two polls yet
    rig.clock.now += 1
    assert recovery.steal(5) == 2  # t3 was first seen a poll later
    assert [args[1] for args in rig.intake.called("admit")] == ["mine", "t1", "t2"]
    rig.clock.now += 1
    assert recovery.steal(0) == 0  # this node wants no work
    assert recovery.steal(1) == 1


def test_a_job_this_node_queued_itself_is_kept_only_if_it_is_its_share(tmp_path: Path) -> None:
    rig, recovery = recovery_rig(tmp_path, poll_interval_s=1)
    admitting(rig)
    rig.fleet.others = {"theirs"}
    assert recovery.keeps(write_job(rig.spool.queued, "ours"), "ours")
    assert not recovery.keeps(write_job(rig.spool.queued, "theirs"), "theirs")
    assert rig.fleet.called("queued_for_another") == [("theirs.json", "theirs")]  # told
    rig.clock.now += 2  # its owner never claimed it
    assert recovery.steal(1) == 1
    assert [args[1] for args in rig.intake.called("admit")] == ["theirs"]
