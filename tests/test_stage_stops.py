"""The stops stage alone: what an ``inbox/<id>.stop`` file means for the job it names. The
scheduler, running and ending stages are fakes; the inbox and spool are real folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from kinod.models import JobState
from kinod.stages.job import Job
from kinod.stages.stops import Stops
from tests.stage_fakes import OTHER_NODE, Rig, job_of, make_rig, write_job


def stops_rig(tmp_path: Path) -> tuple[Rig, Stops, Path]:
    rig = make_rig(tmp_path)
    rig.ctx.stops = stops = Stops(rig.ctx)
    stop = rig.inbox / "j.stop"
    stop.touch()
    return rig, stops, stop


def waiting_job(rig: Rig) -> Job:
    job = job_of(rig.ctx, write_job(rig.spool.queued, "j"))
    rig.scheduler.held["j"] = job
    return job


def test_a_stop_for_an_id_with_no_job_anywhere_is_removed(tmp_path: Path) -> None:
    rig, stops, stop = stops_rig(tmp_path)
    stops.on_stop_file(stop, "j")
    assert not stop.exists() and rig.ending.calls == []


@pytest.mark.parametrize("where", ["still in the inbox", "held by another node"])
def test_a_stop_for_a_job_this_node_does_not_hold_is_left_for_it(tmp_path: Path,
                                                                 where: str) -> None:
    rig, stops, stop = stops_rig(tmp_path)
    if where == "still in the inbox":
        write_job(rig.inbox, "j", suffix=".YAML")  # not taken in yet: any suffix case
    else:
        write_job(rig.spool.running_root / OTHER_NODE, "j")
    stops.on_stop_file(stop, "j")
    assert stop.exists() and rig.ending.calls == []


def test_a_stop_for_a_running_job_reaches_its_run(tmp_path: Path) -> None:
    rig, stops, stop = stops_rig(tmp_path)
    job = waiting_job(rig)
    rig.running.running["j"] = job
    stops.on_stop_file(stop, "j")
    assert rig.running.called("stop") == [(job,)]
    assert stop.exists() and rig.ending.calls == []  # removed once the job has ended


def test_a_stop_file_in_capitals_is_renamed_stop_before_it_is_acted_on(tmp_path: Path) -> None:
    rig, stops, stop = stops_rig(tmp_path)
    stop.rename(upper := rig.inbox / "j.STOP")
    job = waiting_job(rig)
    rig.running.running["j"] = job
    stops.on_stop_file(upper, "j")
    assert stop.exists() and not upper.exists()  # the one name the ending stage removes
    assert rig.running.called("stop") == [(job,)]


def test_a_stop_for_a_job_already_stopping_is_not_passed_on_again(tmp_path: Path) -> None:
    rig, stops, stop = stops_rig(tmp_path)
    job = waiting_job(rig)
    rig.running.running["j"] = job
    job.stop_requested = True
    stops.on_stop_file(stop, "j")
    assert rig.running.calls == [] and rig.ending.calls == []


def test_a_stop_for_a_waiting_job_ends_it_stopped_before_it_starts(tmp_path: Path) -> None:
    rig, stops, stop = stops_rig(tmp_path)
    job = waiting_job(rig)
    stops.on_stop_file(stop, "j")
    ((ended, state, error),) = rig.ending.called("end_waiting")
    assert (ended, state, error.code) == (job, JobState.STOPPED, "stopped")
    assert rig.running.called("stop") == []


def test_a_stop_for_a_held_job_claims_it_from_held_and_ends_it_stopped(tmp_path: Path) -> None:
    rig, stops, stop = stops_rig(tmp_path)
    write_job(rig.spool.held, "j")
    stops.on_stop_file(stop, "j")
    (end,) = rig.ending.ends()
    assert (end.job_id, end.path, end.state) == ("j", rig.spool.running / "j.json",
                                                 JobState.STOPPED)
    assert "while held" in end.error.message
    assert not (rig.spool.held / "j.json").exists()


def test_a_stop_for_a_job_whose_end_is_not_yet_recorded_leaves_that_end_alone(
        tmp_path: Path) -> None:
    rig, stops, stop = stops_rig(tmp_path)
    rig.scheduler.held["j"] = job_of(rig.ctx, write_job(rig.spool.running, "j"))
    rig.ending.unrecorded.add("j")  # its run is over; its end waits for the disk
    stops.on_stop_file(stop, "j")
    assert rig.running.called("claim") == [] and rig.ending.ends() == []
