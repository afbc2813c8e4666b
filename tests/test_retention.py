"""Retention: ended jobs pruned after keep_ended_days, by a clock the test sets."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from kinod.config import Settings
from kinod.models import JobState, Sidecar
from kinod.retention import prune_ended

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def make_settings(root: Path, **values: Any) -> Settings:
    for folder in ("inbox", "outbox", "frames"):
        (root / folder).mkdir(exist_ok=True)
    values.setdefault("keep_ended_days", 7)
    return Settings.model_validate({"inbox": root / "inbox", "outbox": root / "outbox",
                                    "frames": root / "frames", "node": "n1", **values})


def done_folder(settings: Settings, job_id: str) -> Path:
    return settings.inbox / ".kinod" / "done" / job_id


def make_job(settings: Settings, job_id: str, state: str = "succeeded", days_ago: float = 10,
             after: list[str] | None = None) -> None:
    """A job as the daemon leaves it: its sidecar and log, an earlier run archived, two runs'
    job files in done/, and frames."""
    ended = NOW - timedelta(days=days_ago)
    terminal = JobState(state).is_terminal
    task: dict[str, Any] = {"type": "example", "data": {}}
    if after is not None:
        task["after"] = after
    sidecar = Sidecar(id=job_id, type="example", state=JobState(state), created_at=ended,
                      finished_at=ended if terminal else None, updated_at=ended, task=task)
    (settings.outbox / f"{job_id}.json").write_bytes(sidecar.to_json())
    (settings.outbox / f"{job_id}.log").write_text("a line\n")
    archive = settings.outbox / "archive" / job_id
    archive.mkdir(parents=True)
    (archive / "1.json").write_text("{}")
    (archive / "1.log").write_text("")
    if terminal:
        done = done_folder(settings, job_id)
        done.mkdir(parents=True)
        (done / "1.yaml").write_text("type: example\n")
        (done / "2.yaml").write_text("type: example\n")
    frames = settings.frames / job_id
    frames.mkdir()
    (frames / "0001.png").write_bytes(b"png")


def left_of(settings: Settings, job_id: str) -> list[str]:
    """What of the job is still on disk."""
    paths = {"sidecar": settings.outbox / f"{job_id}.json",
             "log": settings.outbox / f"{job_id}.log",
             "archive": settings.outbox / "archive" / job_id,
             "done": done_folder(settings, job_id), "frames": settings.frames / job_id}
    return [what for what, path in paths.items() if os.path.lexists(path)]


EVERYTHING = ["sidecar", "log", "archive", "done", "frames"]


def test_nothing_is_pruned_unless_keep_ended_days_is_set(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, keep_ended_days=None)
    make_job(settings, "old", days_ago=1000)
    assert prune_ended(settings, NOW) == 0
    assert left_of(settings, "old") == EVERYTHING


def test_jobs_ended_before_keep_ended_days_are_pruned_and_every_removal_logged(
        tmp_path: Path, caplog_loguru: pytest.LogCaptureFixture) -> None:
    settings = make_settings(tmp_path)
    for state in ("succeeded", "failed", "stopped"):
        make_job(settings, f"old-{state}", state, days_ago=7.5)
    make_job(settings, "recent", days_ago=6.5)

    assert prune_ended(settings, NOW) == 3
    for state in ("succeeded", "failed", "stopped"):
        assert left_of(settings, f"old-{state}") == ["frames"]  # keep_ended_frames: true
    assert left_of(settings, "recent") == EVERYTHING
    [line] = [r.message for r in caplog_loguru.records if "old-failed" in r.message]
    assert line.startswith("retention: pruned job old-failed (failed 7.5 days ago): removed ")
    for path in (settings.outbox / "archive" / "old-failed", done_folder(settings, "old-failed"),
                 settings.outbox / "old-failed.log", settings.outbox / "old-failed.json"):
        assert str(path) in line
    # The job's own log was not made again by the lines about it.
    assert not (settings.outbox / "old-failed.log").exists()

    # Time goes on: the recent one's turn comes.
    assert prune_ended(settings, NOW + timedelta(days=1)) == 1
    assert left_of(settings, "recent") == ["frames"]


def test_with_keep_ended_frames_false_frames_go_too_never_through_a_link(
        tmp_path: Path) -> None:
    settings = make_settings(tmp_path, keep_ended_frames=False)
    make_job(settings, "old")
    make_job(settings, "linked")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.png").write_bytes(b"png")
    for path in (settings.frames / "linked").iterdir():
        path.unlink()
    (settings.frames / "linked").rmdir()
    (settings.frames / "linked").symlink_to(precious)

    assert prune_ended(settings, NOW) == 2
    assert left_of(settings, "old") == left_of(settings, "linked") == []
    assert (precious / "keep.png").is_file()


def test_queued_held_and_running_jobs_are_never_pruned(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, keep_ended_frames=False)
    for state in ("queued", "held", "running"):
        make_job(settings, state, state, days_ago=100)
    assert prune_ended(settings, NOW) == 0
    for state in ("queued", "held", "running"):
        assert "sidecar" in left_of(settings, state)


def test_an_ended_job_with_a_new_run_waiting_is_never_pruned(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    spool = settings.inbox / ".kinod"
    (spool / "queued").mkdir(parents=True)
    (spool / "running" / "n2").mkdir(parents=True)
    for job_id in ("in-inbox", "in-queued", "in-running", "pruned"):
        make_job(settings, job_id)
    (settings.inbox / "in-inbox.YAML").write_text("type: example\n")
    (spool / "queued" / "in-queued.yaml").write_text("type: example\n")
    (spool / "running" / "n2" / "in-running.json").write_text('{"type": "example"}')

    assert prune_ended(settings, NOW) == 1
    for job_id in ("in-inbox", "in-queued", "in-running"):
        assert left_of(settings, job_id) == EVERYTHING
    assert left_of(settings, "pruned") == ["frames"]


def test_jobs_that_a_job_still_to_run_waits_on_are_never_pruned(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    make_job(settings, "render", days_ago=30)
    make_job(settings, "denoise", days_ago=30)
    make_job(settings, "upscale", days_ago=30)
    make_job(settings, "old-consumer", days_ago=20, after=["upscale"])  # ended: waits no more
    make_job(settings, "encode", "queued", days_ago=1, after=["render"])
    make_job(settings, "publish", "held", days_ago=1, after=["encode"])
    # A job file not taken in yet waits on denoise.
    (settings.inbox / "grade.yaml").write_text("type: example\nafter: [denoise]\n")

    assert prune_ended(settings, NOW) == 2
    assert left_of(settings, "render") == EVERYTHING
    assert left_of(settings, "denoise") == EVERYTHING
    assert left_of(settings, "upscale") == ["frames"]
    assert left_of(settings, "old-consumer") == ["frames"]


def test_a_batch_at_a_time_oldest_first(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    for n in range(5):
        make_job(settings, f"job{n}", days_ago=20 - n)  # job0 ended first
    assert prune_ended(settings, NOW, batch=2) == 2
    assert [bool(left_of(settings, f"job{n}") == EVERYTHING) for n in range(5)] == [
        False, False, True, True, True]
    assert prune_ended(settings, NOW, batch=2) == 2
    assert prune_ended(settings, NOW, batch=2) == 1  # less than a batch: done for now
    assert prune_ended(settings, NOW, batch=2) == 0


def test_a_pass_cut_short_is_finished_by_the_next(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    make_job(settings, "half")
    make_job(settings, "aside")
    make_job(settings, "replaced")
    # A crash after the job files went, before the sidecar did: it still reads as ended.
    for path in done_folder(settings, "half").iterdir():
        path.unlink()
    done_folder(settings, "half").rmdir()
    # A crash while the sidecar was set aside: it comes back, and is judged again.
    os.rename(settings.outbox / "aside.json", settings.outbox / ".aside.json.pruning")
    # ... and one whose id a new run took meanwhile: the new run's sidecar stays.
    os.rename(settings.outbox / "replaced.json", settings.outbox / ".replaced.json.pruning")
    new_run = Sidecar(id="replaced", type="example", state=JobState.QUEUED, created_at=NOW,
                      updated_at=NOW)
    (settings.outbox / "replaced.json").write_bytes(new_run.to_json())

    assert prune_ended(settings, NOW) == 2
    assert left_of(settings, "half") == left_of(settings, "aside") == ["frames"]
    assert json.loads((settings.outbox / "replaced.json").read_text())["state"] == "queued"
    assert not [n for n in os.listdir(settings.outbox) if n.endswith(".pruning")]


def test_files_that_are_not_kinods_sidecars_are_left_alone(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    (settings.outbox / "notes.json").write_text('{"hello": 1}')
    (settings.outbox / "broken.json").write_text("{")
    make_job(settings, "real")
    # A sidecar under another id's name is not taken for that id's.
    (settings.outbox / "other.json").write_bytes((settings.outbox / "real.json").read_bytes())
    assert prune_ended(settings, NOW) == 1
    assert sorted(os.listdir(settings.outbox)) == ["archive", "broken.json", "notes.json",
                                                   "other.json"]
