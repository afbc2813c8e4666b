"""The ending stage alone: a job's end recorded (or the job put back in the queue) and its
file filed away in done/, and what the disk refused tried again. The other stages are fakes;
the spool and outbox are real folders under tmp_path, made to fail where a test says."""

from __future__ import annotations

from pathlib import Path

import pytest

from kinod.errors import DependencyFailed, JobStopped, PluginFailed
from kinod.models import JobState
from kinod.outcome import Verdict
from kinod.stages.ending import Ending
from kinod.stages.job import Job, final_sidecar
from tests.stage_fakes import (
    NODE,
    OTHER_NODE,
    FaultyOutbox,
    FaultySpool,
    Rig,
    disk_full,
    job_of,
    make_rig,
    sidecar_in,
    write_job,
)

BUSY = Verdict(JobState.FAILED, error=PluginFailed("busy", retryable=True))


def ending_rig(tmp_path: Path) -> tuple[Rig, Ending]:
    rig = make_rig(tmp_path, spool=FaultySpool, outbox=FaultyOutbox)
    rig.ctx.ending = ending = Ending(rig.ctx)
    return rig, ending


def running_job(rig: Rig, job_id: str) -> Job:
    """A job running here: its file in running/, its running sidecar written."""
    job = job_of(rig.ctx, write_job(rig.spool.running, job_id))
    job.sidecar = sidecar_in(JobState.RUNNING, job_id)
    rig.ctx.outbox.publish(job.sidecar)
    return job


def spool(rig: Rig) -> FaultySpool:
    assert isinstance(rig.spool, FaultySpool)
    return rig.spool


def outbox(rig: Rig) -> FaultyOutbox:
    assert isinstance(rig.ctx.outbox, FaultyOutbox)
    return rig.ctx.outbox


def test_end_writes_the_final_sidecar_files_the_job_and_removes_its_stop_file(
        tmp_path: Path) -> None:
    rig, ending = ending_rig(tmp_path)
    job = running_job(rig, "fin")
    stop = Path(rig.ctx.stop_file("fin"))
    stop.touch()
    ending.end("fin", job.path, job.sidecar, JobState.FAILED, error=PluginFailed("no"))
    sidecar = rig.sidecar("fin")
    assert sidecar.state is JobState.FAILED and sidecar.error.code == "plugin_failed"
    assert sidecar.finished_at is not None
    assert (rig.spool.done / "fin" / "1.json").exists() and not job.path.exists()
    assert not stop.exists()
    assert rig.scheduler.called("remove") == [("fin",)]
    assert rig.intake.called("take_in_resubmitted") == [("fin",)]
    assert not ending.has_ended("fin")


def test_a_refused_filing_keeps_the_job_unfiled_asks_for_a_retry_and_retry_files_it(
        tmp_path: Path) -> None:
    rig, ending = ending_rig(tmp_path)
    job = running_job(rig, "stuck")
    spool(rig).faults["finish"] = disk_full()
    ending.end("stuck", job.path, job.sidecar, JobState.SUCCEEDED)
    assert rig.sidecar("stuck").state is JobState.SUCCEEDED  # only the move was refused
    assert job.path.exists() and ending.is_unfiled("stuck") and ending.has_ended("stuck")
    assert rig.retry_soon.count == 1
    assert rig.intake.called("take_in_resubmitted") == []  # a resubmission waits for it
    spool(rig).faults.clear()
    ending.retry()
    assert (rig.spool.done / "stuck" / "1.json").exists() and not ending.is_unfiled("stuck")
    assert rig.intake.called("take_in_resubmitted") == [("stuck",)]


def test_a_refused_final_sidecar_keeps_the_end_unrecorded_until_the_retry(
        tmp_path: Path) -> None:
    rig, ending = ending_rig(tmp_path)
    job = running_job(rig, "full")
    outbox(rig).fault = disk_full()
    ending.record(job, Verdict(JobState.SUCCEEDED, result={"a": 1}), again=False)
    assert ending.is_unrecorded("full") and rig.retry_soon.count == 1
    assert rig.sidecar("full").state is JobState.RUNNING and job.path.exists()
    outbox(rig).fault = None
    ending.retry()
    sidecar = rig.sidecar("full")
    assert sidecar.state is JobState.SUCCEEDED and sidecar.result == {"a": 1}
    assert not ending.is_unrecorded("full") and (rig.spool.done / "full" / "1.json").exists()


def test_an_end_that_cannot_be_written_at_all_is_recorded_as_failed(tmp_path: Path) -> None:
    rig, ending = ending_rig(tmp_path)
    job = running_job(rig, "odd")
    ending.record(job, Verdict(JobState.SUCCEEDED, result={"image": object()}), again=False)
    assert ending.is_unrecorded("odd") and rig.retry_soon.count == 1
    ending.retry()
    sidecar = rig.sidecar("odd")
    assert sidecar.state is JobState.FAILED and sidecar.result is None
    assert sidecar.error.message.startswith("its end could not be recorded")


def test_an_end_already_written_on_the_runs_thread_is_not_written_again(
        tmp_path: Path) -> None:
    rig, ending = ending_rig(tmp_path)
    job = running_job(rig, "quick")
    job.final = final_sidecar(job.sidecar, JobState.SUCCEEDED, None, {})
    rig.ctx.outbox.write(job.final)  # as the running stage's settling did
    outbox(rig).fault = disk_full()  # a second write would fail
    ending.record(job, Verdict(JobState.SUCCEEDED, result={}), again=False)
    assert not ending.is_unrecorded("quick") and rig.retry_soon.count == 0
    assert (rig.spool.done / "quick" / "1.json").exists()


def test_record_again_requeues_the_job_and_enqueues_it(tmp_path: Path) -> None:
    rig, ending = ending_rig(tmp_path)
    job = running_job(rig, "flaky")
    ending.record(job, BUSY, again=True)
    sidecar = rig.sidecar("flaky")
    assert sidecar.state is JobState.QUEUED
    assert sidecar.message == "attempt 1 failed (busy); it runs again"
    assert job.path == rig.spool.queued / "flaky.json" and job.path.exists()
    assert rig.scheduler.called("enqueue") == [(job,)]


def test_record_of_a_stopping_daemons_job_puts_it_back_in_the_queue(tmp_path: Path) -> None:
    rig, ending = ending_rig(tmp_path)
    job = running_job(rig, "later")
    ending.record(job, Verdict(None), again=False)
    sidecar = rig.sidecar("later")
    assert sidecar.state is JobState.QUEUED
    assert sidecar.message == f"back in the queue: the daemon on {NODE} stopped"
    assert (rig.spool.queued / "later.json").exists()
    assert rig.scheduler.called("remove") == [("later",)]
    assert rig.scheduler.called("enqueue") == []  # the next start takes it up


def test_a_requeue_the_disk_refused_at_first_is_logged_once_recorded(tmp_path: Path) -> None:
    rig, ending = ending_rig(tmp_path)
    job = running_job(rig, "flaky")
    outbox(rig).fault = disk_full()
    ending.record(job, BUSY, again=True)
    outbox(rig).fault = None
    ending.retry()
    assert rig.sidecar("flaky").state is JobState.QUEUED
    assert "job flaky running -> queued" in rig.ctx.outbox.log_path("flaky").read_text()


@pytest.mark.parametrize("how", ["fenced", "taken over"])
def test_record_of_a_job_another_node_took_over_writes_nothing(tmp_path: Path,
                                                               how: str) -> None:
    rig, ending = ending_rig(tmp_path)
    job = running_job(rig, "theirs")
    if how == "fenced":
        job.fenced = True
    else:
        rig.fleet.taken.add("theirs")
    before = rig.sidecar("theirs")
    ending.record(job, Verdict(JobState.SUCCEEDED, result={}), again=False)
    assert rig.sidecar("theirs") == before and job.path.exists()
    assert outbox(rig).writes == 1  # the running sidecar only
    assert rig.fleet.called("fence") == [(job,)]
    assert rig.scheduler.called("remove_if") == [(job,)]
    assert rig.intake.called("take_in_resubmitted") == [("theirs",)]


def test_claimed_elsewhere_with_no_other_holder_fails_the_job_as_lost(tmp_path: Path) -> None:
    rig, ending = ending_rig(tmp_path)
    job = job_of(rig.ctx, write_job(rig.spool.queued, "lost"))
    job.path.unlink()
    ending.claimed_elsewhere(job)
    sidecar = rig.sidecar("lost")
    assert sidecar.state is JobState.FAILED and sidecar.error.code == "lost"
    assert rig.scheduler.called("forget") == [(job,)]


@pytest.mark.parametrize("where", ["held by another node", "ended on another node"])
def test_claimed_elsewhere_by_another_node_records_nothing(tmp_path: Path, where: str) -> None:
    rig, ending = ending_rig(tmp_path)
    job = job_of(rig.ctx, write_job(rig.spool.queued, "theirs"))
    if where == "held by another node":
        (rig.spool.running_root / OTHER_NODE).mkdir()
        job.path.rename(rig.spool.running_root / OTHER_NODE / "theirs.json")
    else:
        job.path.unlink()
        rig.ctx.outbox.publish(sidecar_in(JobState.SUCCEEDED, "theirs", node=OTHER_NODE))
    writes = outbox(rig).writes
    ending.claimed_elsewhere(job)
    assert outbox(rig).writes == writes
    assert rig.scheduler.called("forget") == [(job,)]


def test_end_waiting_claims_the_file_then_ends_the_job(tmp_path: Path) -> None:
    rig, ending = ending_rig(tmp_path)
    job = job_of(rig.ctx, write_job(rig.spool.queued, "w"))
    claimed = rig.spool.running / "w.json"
    rig.running.claimed["w"] = claimed
    ending.end_waiting(job, JobState.FAILED, DependencyFailed("job a ended failed"))
    assert rig.scheduler.called("unqueue") == [(job,)]
    final = rig.sidecar("w")
    assert (final.state, final.error.code) == (JobState.FAILED, "dependency_failed")
    assert rig.ctx.dependencies.called("ended") == [("w", JobState.FAILED)]


def test_end_waiting_leaves_a_job_another_node_claimed_to_that_node(tmp_path: Path) -> None:
    rig, ending = ending_rig(tmp_path)
    job = job_of(rig.ctx, write_job(rig.spool.queued, "w"))
    rig.running.claimed["w"] = None  # the claim lost the race
    ending.end_waiting(job, JobState.STOPPED, JobStopped("stop"))
    assert rig.sidecar("w") is None
    assert rig.scheduler.called("forget") == [(job,)]


def test_has_ended_once_the_final_sidecar_is_stamped_until_the_file_is_filed(
        tmp_path: Path) -> None:
    rig, ending = ending_rig(tmp_path)
    job = running_job(rig, "r")
    rig.running.running["r"] = job
    assert not ending.has_ended("r")
    job.final = final_sidecar(job.sidecar, JobState.SUCCEEDED, None, {})
    assert ending.has_ended("r")
    assert not ending.has_ended("unknown")
