"""The outbox: sidecars written whole, read back safely, earlier runs archived."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from kinod import outbox as outbox_module
from kinod.models import JobState, Sidecar, SidecarError
from kinod.outbox import Outbox

FOLDER = Path("/farm/outbox")
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.fixture
def outbox(fs) -> Outbox:
    box = Outbox(FOLDER)
    box.ensure_folder()
    return box


def sidecar(job_id: str = "job1", state: JobState = JobState.QUEUED, **changes) -> Sidecar:
    return Sidecar(id=job_id, state=state, created_at=T0, updated_at=T0, **changes)


def test_ensure_folder_creates_it(fs) -> None:
    Outbox(FOLDER).ensure_folder()
    assert FOLDER.is_dir()


def test_paths(outbox: Outbox) -> None:
    assert outbox.sidecar_path("job1") == FOLDER / "job1.json"
    assert outbox.log_path("job1") == FOLDER / "job1.log"


def test_publish_writes_a_complete_sidecar(outbox: Outbox) -> None:
    outbox.publish(sidecar(name="Shot 010", type="example", progress=42.5, attempt=2,
                           task={"type": "example", "data": {"prompt": "p"}}))
    document = json.loads((FOLDER / "job1.json").read_text())
    assert document["schema"] == "kinod.sidecar/1"
    assert document["id"] == "job1"
    assert document["name"] == "Shot 010"
    assert document["type"] == "example"
    assert document["state"] == "queued"
    assert document["progress"] == 42.5
    assert document["attempt"] == 2
    assert document["task"] == {"type": "example", "data": {"prompt": "p"}}
    assert datetime.fromisoformat(document["created_at"]) == T0
    assert sorted(os.listdir(FOLDER)) == ["job1.json", "job1.log"]  # no temporary left


def test_publish_writes_error_and_result(outbox: Outbox) -> None:
    outbox.publish(sidecar(state=JobState.FAILED,
                           error=SidecarError(code="timeout", message="too slow")))
    outbox.publish(sidecar("job2", state=JobState.SUCCEEDED, result={"output": "/x.png"}))
    failed = json.loads((FOLDER / "job1.json").read_text())
    succeeded = json.loads((FOLDER / "job2.json").read_text())
    assert failed["error"] == {"code": "timeout", "message": "too slow"}
    assert succeeded["result"] == {"output": "/x.png"}


def test_publish_replaces_the_previous_sidecar(outbox: Outbox) -> None:
    queued = sidecar()
    outbox.publish(queued)
    outbox.publish(queued.model_copy(update={"state": JobState.RUNNING, "progress": 50.0}),
                   queued)
    document = json.loads((FOLDER / "job1.json").read_text())
    assert (document["state"], document["progress"]) == ("running", 50.0)


def test_publish_then_read_round_trips(outbox: Outbox) -> None:
    original = sidecar(state=JobState.STOPPED, message="bye", node="n1", pid=123,
                       error=SidecarError(code="stopped", message="stopped on request"))
    outbox.publish(original)
    assert outbox.read("job1") == original


@pytest.mark.parametrize(("state", "durable"), [
    (JobState.QUEUED, False), (JobState.RUNNING, False),
    (JobState.SUCCEEDED, True), (JobState.FAILED, True), (JobState.STOPPED, True),
])
def test_only_final_states_are_flushed_to_disk(outbox: Outbox, monkeypatch: pytest.MonkeyPatch,
                                               state: JobState, durable: bool) -> None:
    seen: list[bool] = []
    real = outbox_module.atomic_write

    def recording(path: Path, data: bytes, *, durable: bool = False,
                  folder_flush: object = None) -> None:
        seen.append(durable)
        real(path, data, durable=durable, folder_flush=folder_flush)

    monkeypatch.setattr(outbox_module, "atomic_write", recording)
    outbox.publish(sidecar(state=state))
    assert seen == [durable]
    assert json.loads((FOLDER / "job1.json").read_text())["state"] == state.value


def test_publish_logs_each_state_change_once(outbox: Outbox, caplog_loguru) -> None:
    queued = sidecar()
    outbox.publish(queued)
    running = queued.model_copy(update={"state": JobState.RUNNING})
    outbox.publish(running, queued)
    outbox.publish(running.model_copy(update={"progress": 10.0}), running)  # no change of state
    outbox.publish(running.model_copy(update={"progress": 20.0}), running)
    failed = running.model_copy(update={
        "state": JobState.FAILED, "error": SidecarError(code="plugin_failed", message="oops")})
    outbox.publish(failed, running)
    messages = [r.getMessage() for r in caplog_loguru.records if "job job1" in r.getMessage()]
    assert messages == [
        "job job1 new -> queued (attempt 1)",
        "job job1 queued -> running (attempt 1)",
        "job job1 running -> failed (attempt 1): plugin_failed: oops",
    ]
    failed_record = [r for r in caplog_loguru.records if "-> failed" in r.getMessage()][0]
    assert failed_record.levelname == "WARNING"


def test_read_of_a_missing_sidecar_is_none(outbox: Outbox) -> None:
    assert outbox.read("nobody") is None


@pytest.mark.parametrize("content", [
    b"", b"not json at all", b'{"id": "job1", "state": "queu', b"\xff\xfe\x00garbage",
    b"[]", b'{"id": "job1"}',  # JSON, but not a sidecar
    b'{"id": "job1", "state": "exploded", "created_at": "2026-01-01T00:00:00Z", '
    b'"updated_at": "2026-01-01T00:00:00Z"}',
])
def test_read_of_garbage_is_none(outbox: Outbox, content: bytes) -> None:
    (FOLDER / "job1.json").write_bytes(content)
    assert outbox.read("job1") is None


def test_read_of_a_folder_in_the_way_is_none(outbox: Outbox) -> None:
    (FOLDER / "job1.json").mkdir()
    assert outbox.read("job1") is None


def test_archive_with_nothing_to_archive_does_nothing(outbox: Outbox) -> None:
    outbox.archive_previous_run("job1")
    assert os.listdir(FOLDER) == []


def test_archive_moves_sidecar_and_log_and_numbers_runs(outbox: Outbox) -> None:
    archive = FOLDER / "archive" / "job1"
    for run in (1, 2, 3):
        (FOLDER / "job1.json").write_text(f"sidecar {run}")
        (FOLDER / "job1.log").write_text(f"log {run}")
        outbox.archive_previous_run("job1")
        assert not (FOLDER / "job1.json").exists()
        assert not (FOLDER / "job1.log").exists()
    assert sorted(os.listdir(archive)) == ["1.json", "1.log", "2.json", "2.log",
                                          "3.json", "3.log"]
    for run in (1, 2, 3):
        assert (archive / f"{run}.json").read_text() == f"sidecar {run}"
        assert (archive / f"{run}.log").read_text() == f"log {run}"


def test_archive_of_only_a_log_or_only_a_sidecar(outbox: Outbox) -> None:
    archive = FOLDER / "archive" / "job1"
    (FOLDER / "job1.log").write_text("log only")
    outbox.archive_previous_run("job1")
    (FOLDER / "job1.json").write_text("sidecar only")
    outbox.archive_previous_run("job1")
    # Run 1 had only a log; the next run still gets its own number.
    assert sorted(os.listdir(archive)) == ["1.log", "2.json"]
    assert (archive / "1.log").read_text() == "log only"
    assert (archive / "2.json").read_text() == "sidecar only"


def test_archive_keeps_other_jobs_alone(outbox: Outbox) -> None:
    (FOLDER / "job1.json").write_text("one")
    (FOLDER / "job2.json").write_text("two")
    outbox.archive_previous_run("job1")
    assert (FOLDER / "job2.json").read_text() == "two"
    assert not (FOLDER / "archive" / "job2").exists()


def test_archive_never_overwrites_an_archived_run(outbox: Outbox) -> None:
    archive = FOLDER / "archive" / "job1"
    archive.mkdir(parents=True)
    (archive / "1.json").write_text("old run")
    (FOLDER / "job1.json").write_text("new run")
    outbox.archive_previous_run("job1")
    assert (archive / "1.json").read_text() == "old run"
    assert (archive / "2.json").read_text() == "new run"
