"""End to end: the real daemon, real folders, real file events; jobs from drop to sidecar.

Each test starts ``kinod run`` in a child process on its own temporary folder and
waits on conditions with deadlines. The ``scripted`` test plugin
(tests/plugin_fixtures/working/scripted) does what a job's data says and appends a
line to ``data/frames/<id>/runs.log`` each time it starts, so executions are counted.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import (
    TERMINAL,
    DaemonProcess,
    assert_done,
    executions,
    runs_log,
    scripted,
    wait_end,
    wait_for,
    when,
)

SIDECAR_FIELDS = {"schema", "id", "name", "type", "state", "progress", "message", "created_at",
                  "started_at", "finished_at", "updated_at", "attempt", "node", "pid", "result",
                  "error", "task"}


def wait_log(daemon: DaemonProcess, job_id: str, *texts: str) -> str:
    """outbox/<id>.log once it holds every one of ``texts`` (a state change is logged just
    after its sidecar is written)."""
    path = daemon.outbox / f"{job_id}.log"

    def holds() -> str | None:
        text = path.read_text() if path.exists() else ""
        return text if all(t in text for t in texts) else None

    try:
        return wait_for(holds, 5, what=f"{path.name} to hold {texts}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; it holds:\n{path.read_text()}") from None


def max_overlap(intervals: list[tuple[datetime, datetime]] | list[tuple[float, float]]) -> int:
    """Most intervals open at one moment (one ending as another starts do not overlap)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    most = current = 0
    for _, delta in events:
        current += delta
        most = max(most, current)
    return most


def plugin_run(daemon: DaemonProcess, job_id: str) -> tuple[float, float]:
    """When the scripted plugin's generate() began and returned for this job (its runs.log):
    what ``workers`` and ``max_concurrency`` limit."""
    times = {line.split()[0]: float(line.split()[2])
             for line in runs_log(daemon.frames, job_id)}
    return times["start"], times["end"]


# --- 1. the seed's example job -------------------------------------------------------


def test_seed_example_job_succeeds_with_a_complete_sidecar(
        start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon()
    job = {"name": "Shot 010 key art", "type": "example",
           "data": {"prompt": "beautiful landscape", "steps": 10}}
    dropped_at = datetime.now(UTC)
    daemon.drop("seed_json.json", job)
    daemon.drop("seed_yaml.yaml", job)
    seen: dict[str, list[tuple[str, float]]] = {"seed_json": [], "seed_yaml": []}

    def all_ended() -> bool:
        ended = True
        for job_id, states in seen.items():
            sidecar = daemon.sidecar(job_id)
            if sidecar is None:
                ended = False
                continue
            states.append((sidecar["state"], sidecar["progress"]))
            ended = ended and sidecar["state"] in TERMINAL
        return ended

    wait_for(all_ended, 30, what="both seed jobs to end")
    for job_id, ext in (("seed_json", "json"), ("seed_yaml", "yaml")):
        sidecar = daemon.sidecar(job_id)
        assert sidecar["state"] == "succeeded", sidecar
        assert set(sidecar) >= SIDECAR_FIELDS, sorted(SIDECAR_FIELDS - set(sidecar))
        assert sidecar["schema"] == "kinod.sidecar/1"
        assert (sidecar["id"], sidecar["name"], sidecar["type"]) == (
            job_id, "Shot 010 key art", "example")
        assert sidecar["progress"] == 100
        assert sidecar["attempt"] == 1
        assert sidecar["node"] == "testnode"
        assert sidecar["pid"] == daemon.proc.pid
        assert sidecar["task"] == job
        assert sidecar["error"] is None
        assert sidecar["result"]["prompt"] == "beautiful landscape"
        assert sidecar["result"]["steps"] == 10
        created, started = when(sidecar["created_at"]), when(sidecar["started_at"])
        finished, updated = when(sidecar["finished_at"]), when(sidecar["updated_at"])
        assert dropped_at - timedelta(seconds=1) <= created <= started <= finished <= updated
        assert finished - started >= timedelta(seconds=0.9)  # 10 steps of 0.1 s

        # Progress was written while it ran, rising, strictly between 0 and 100.
        running = [p for state, p in seen[job_id] if state == "running"]
        assert running == sorted(running), running
        assert len({p for p in running if 0 < p < 100}) >= 2, seen[job_id]

        log = wait_log(daemon, job_id, "running", "succeeded").splitlines()
        assert len(log) >= 2, log

        assert_done(daemon, job_id, [f"1.{ext}"])
        assert not (daemon.inbox / f"{job_id}.{ext}").exists()
        kept = (daemon.inbox / ".kinod" / "done" / job_id / f"1.{ext}").read_text()
        assert (json.loads(kept) if ext == "json" else yaml.safe_load(kept)) == job
    assert daemon.stop() == 0


# --- 2. invalid jobs ----------------------------------------------------------------------

INVALID_JOBS: dict[str, tuple[dict[str, Any] | str, list[str]]] = {
    # job id: (body, what the error must name)
    "unknown_key": ({"type": "example", "data": {"prompt": "p"}, "colour": "red"},
                    ["colour:"]),
    "missing_type": ({"data": {"prompt": "p"}}, ["type:"]),
    "unknown_plugin": ({"type": "no_such_plugin", "data": {}}, ["type:", "no_such_plugin"]),
    "bad_data_type": ({"type": "example", "data": {"prompt": "p", "steps": "many"}},
                      ["data.steps:"]),
    "missing_param": ({"type": "example", "data": {"steps": 2}}, ["data.prompt:"]),
    "data_not_a_map": ({"type": "example", "data": "prompt"}, ["data:"]),
    "all_wrong": ({"type": "example", "data": {"steps": "many", "size": 3}, "colour": 1,
                   "priority": "high", "timeout": -5},
                  ["colour:", "priority:", "timeout:", "data.steps:", "data.prompt:",
                   "data.size:"]),
    "bad_yaml": ("type: example\ndata: {prompt: [unclosed\n", ["YAML"]),
}


def test_invalid_jobs_fail_at_once_naming_every_offending_field(
        start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon()
    for job_id, (body, _) in INVALID_JOBS.items():
        daemon.drop(f"{job_id}.yaml", body)
    daemon.drop("bad_json.json", '{"type": "example", "data": ')
    daemon.drop("bad name.yaml", {"type": "example", "data": {"prompt": "p"}})
    daemon.drop(f"{'x' * 129}.yaml", {"type": "example", "data": {"prompt": "p"}})

    for job_id, (_, named) in [*INVALID_JOBS.items(), ("bad_json", ("", ["JSON"]))]:
        sidecar = daemon.wait_state(job_id, *TERMINAL, timeout_s=10)
        assert sidecar["state"] == "failed", sidecar
        assert sidecar["error"]["code"] == "invalid_job", sidecar
        message = sidecar["error"]["message"]
        for field in named:
            assert field in message, f"{job_id}: {field!r} not named in {message!r}"
        assert sidecar["started_at"] is None, sidecar  # it never ran
        assert sidecar["finished_at"] is not None
        ext = "json" if job_id == "bad_json" else "yaml"
        assert_done(daemon, job_id, [f"1.{ext}"])
    wait_log(daemon, "all_wrong", "all_wrong", "invalid_job")

    # Names that are no job id are set aside, and the daemon keeps serving.
    invalid = daemon.inbox / ".kinod" / "invalid"
    wait_for(lambda: (invalid / "bad name.yaml").exists()
             and (invalid / f"{'x' * 129}.yaml").exists(),
             10, what="bad ids to be set aside")
    assert not (daemon.inbox / "bad name.yaml").exists()
    assert not (daemon.outbox / "bad name.json").exists()
    daemon.drop("after_invalid.yaml", {"type": "example", "data": {"prompt": "p", "steps": 1}})
    assert wait_end(daemon, "after_invalid")["state"] == "succeeded"
    assert daemon.proc.poll() is None
    assert "not a valid job id" in daemon.log()
    assert daemon.stop() == 0


def test_links_pipes_and_folders_in_the_inbox_are_not_run(
        kinod_root: Path, start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon()
    outside = kinod_root / "outside.yaml"
    outside.write_text(yaml.safe_dump({"type": "example", "data": {"prompt": "p"}}))
    os.symlink(outside, daemon.inbox / "link.yaml")
    os.mkfifo(daemon.inbox / "pipe.yaml")  # opening it for reading must not hang the daemon
    (daemon.inbox / "folder.yaml").mkdir()
    daemon.drop("after_odd.yaml", {"type": "example", "data": {"prompt": "p", "steps": 1}})
    assert wait_end(daemon, "after_odd")["state"] == "succeeded"
    for job_id in ("link", "pipe"):
        wait_for(lambda job_id=job_id: not os.path.lexists(daemon.inbox / f"{job_id}.yaml"),
                 10, what=f"{job_id}.yaml to leave the inbox")
        sidecar = daemon.sidecar(job_id)
        if sidecar is not None:  # failed as invalid, or set aside without a sidecar
            assert (sidecar["state"], sidecar["error"]["code"]) == ("failed", "invalid_job")
            assert sidecar["started_at"] is None
    assert outside.read_text() == yaml.safe_dump({"type": "example", "data": {"prompt": "p"}})
    assert (daemon.inbox / "folder.yaml").is_dir()
    assert daemon.sidecar("folder") is None
    assert daemon.stop() == 0


# --- 3. files written in place, names kinod ignores ---------------------------------


def test_a_file_written_in_chunks_in_place_is_not_read_early(
        start_daemon: Callable[..., DaemonProcess]) -> None:
    # Each prefix of this file is itself a valid job, with other data: read early, the
    # job would run (and succeed) on the wrong prompt and steps.
    chunks = ["type: example\ndata:\n  prompt: part-1", "-part-2", "-part-3\n",
              "  steps: 2\nname: chunked\n"]
    daemon = start_daemon(settle_s=1.0)
    path = daemon.inbox / "chunked.yaml"
    with open(path, "w") as f:  # like cp or an SMB client: in place, no rename
        for n, chunk in enumerate(chunks):
            if n:
                time.sleep(0.2)  # a slow writer; together well under settle_s
            f.write(chunk)
            f.flush()
    sidecar = wait_end(daemon, "chunked")
    assert sidecar["state"] == "succeeded", sidecar
    assert sidecar["task"] == {"type": "example", "name": "chunked",
                               "data": {"prompt": "part-1-part-2-part-3", "steps": 2}}
    assert sidecar["result"]["prompt"] == "part-1-part-2-part-3"
    assert sidecar["result"]["steps"] == 2
    assert_done(daemon, "chunked", ["1.yaml"])
    assert not (daemon.inbox / ".kinod" / "duplicates" / "chunked").exists()
    assert not (daemon.outbox / "archive").exists()
    assert daemon.stop() == 0


def test_a_writer_that_sets_attributes_before_writing_is_not_read_early(
        start_daemon: Callable[..., DaemonProcess]) -> None:
    # SMB servers and some copy tools create the file, set its mode or extended
    # attributes, and only then write the data. Setting attributes moves ctime past
    # mtime, but the file is not complete.
    daemon = start_daemon(settle_s=1.0)
    path = daemon.inbox / "attrs_first.yaml"
    with open(path, "w") as f:
        time.sleep(0.05)  # the writer sets attributes a moment after creating the file
        os.chmod(path, 0o640)
        time.sleep(0.3)   # then sends the data; together well under settle_s
        f.write("type: example\ndata:\n  prompt: all-of-it\n  steps: 1\n")
    sidecar = wait_end(daemon, "attrs_first")
    assert sidecar["state"] == "succeeded", sidecar
    assert sidecar["result"]["prompt"] == "all-of-it"
    assert daemon.stop() == 0


IGNORED_NAMES = [".hidden.yaml", "x.yaml.tmp", "x.part", "x.yaml~"]
IGNORED_LATER = [".hidden2.json", "y.json.tmp", "y.part", "y.yml~", "z.yaml.part"]


def test_ignored_names_are_never_touched(kinod_root: Path,
                                         start_daemon: Callable[..., DaemonProcess]) -> None:
    body = yaml.safe_dump({"type": "example", "data": {"prompt": "p", "steps": 1}})
    inbox = kinod_root / "inbox"
    for name in IGNORED_NAMES:  # there before the daemon starts: its first scan sees them
        (inbox / name).write_text(body)
    daemon = start_daemon(rescan_interval_s=0.2)
    for name in IGNORED_LATER:  # written in place while it runs: file events see them
        (inbox / name).write_text(body)
    before = {name: os.stat(inbox / name) for name in IGNORED_NAMES + IGNORED_LATER}
    # A job dropped after them, long enough for several rescans, shows they were looked at.
    daemon.drop("sentinel.yaml", {"type": "example", "data": {"prompt": "p", "steps": 8}})
    assert wait_end(daemon, "sentinel")["state"] == "succeeded"
    for name, st in before.items():
        now = os.stat(inbox / name)
        assert (now.st_ino, now.st_mtime_ns, now.st_size) == (
            st.st_ino, st.st_mtime_ns, st.st_size), name
        assert (inbox / name).read_text() == body
    assert sorted(p.name for p in daemon.outbox.iterdir()) == ["sentinel.json", "sentinel.log"]
    spool = daemon.inbox / ".kinod"
    assert_done(daemon, "sentinel", ["1.yaml"])
    assert sorted(p.name for p in (spool / "done").iterdir()) == ["sentinel"]
    assert list((spool / "invalid").iterdir()) == []
    assert list((spool / "duplicates").iterdir()) == []
    assert daemon.stop() == 0


# --- 4. queue order and concurrency limits --------------------------------------------


def test_queue_runs_highest_priority_first_then_oldest(
        kinod_root: Path, start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon(workers=1)
    gate = kinod_root / "gate"
    daemon.drop("occupier.yaml", scripted(steps=0, gate=str(gate)))
    daemon.wait_state("occupier", "running")
    submitted = [("low_old", 0), ("high_old", 5), ("low_new", 0), ("mid", 2),
                 ("high_new", 5), ("negative", -1)]
    for job_id, priority in submitted:
        daemon.drop(f"{job_id}.yaml", {**scripted(steps=1, step_s=0.01), "priority": priority})
        daemon.wait_state(job_id, "queued")  # taken in before the next one is written
    gate.touch()
    sidecars = {job_id: wait_end(daemon, job_id) for job_id, _ in submitted}
    assert all(s["state"] == "succeeded" for s in sidecars.values()), sidecars
    order = sorted(sidecars, key=lambda job_id: when(sidecars[job_id]["started_at"]))
    assert order == ["high_old", "high_new", "mid", "low_old", "low_new", "negative"]
    occupier = wait_end(daemon, "occupier")
    assert all(when(occupier["finished_at"]) <= when(s["started_at"])
               for s in sidecars.values())
    assert daemon.stop() == 0


def test_never_more_than_workers_jobs_run_at_once(
        start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon(workers=2)
    ids = [f"w{n}" for n in range(6)]
    for job_id in ids:
        daemon.drop(f"{job_id}.yaml", scripted(steps=4, step_s=0.1))
    sidecars = [wait_end(daemon, job_id) for job_id in ids]
    assert all(s["state"] == "succeeded" for s in sidecars), sidecars
    # The plugin itself, and the runs as their sidecars date them: two at once, never three.
    assert max_overlap([plugin_run(daemon, job_id) for job_id in ids]) == 2
    assert max_overlap([(when(s["started_at"]), when(s["finished_at"]))
                        for s in sidecars]) == 2
    assert daemon.stop() == 0


def test_plugin_max_concurrency_limits_only_that_plugin(
        start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon(workers=3, plugins={"scripted": {"max_concurrency": 1}})
    scripted_ids = ["s0", "s1", "s2"]
    example_ids = ["e0", "e1"]
    for job_id in scripted_ids:
        daemon.drop(f"{job_id}.yaml", scripted(steps=4, step_s=0.1))
    for job_id in example_ids:
        daemon.drop(f"{job_id}.yaml", {"type": "example", "data": {"prompt": "p", "steps": 3}})
    sidecars = {i: wait_end(daemon, i) for i in scripted_ids + example_ids}
    assert all(s["state"] == "succeeded" for s in sidecars.values()), sidecars
    assert max_overlap([plugin_run(daemon, i) for i in scripted_ids]) == 1
    spans = {i: (when(s["started_at"]), when(s["finished_at"])) for i, s in sidecars.items()}
    assert max_overlap([spans[i] for i in scripted_ids]) == 1
    assert max_overlap(list(spans.values())) >= 2  # the example jobs did not wait for them
    assert max_overlap(list(spans.values())) <= 3
    assert daemon.stop() == 0


# --- 5. a plugin that blocks its thread ------------------------------------------------


def test_a_blocking_plugin_does_not_freeze_the_daemon(
        kinod_root: Path, start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon(workers=2)
    daemon.drop("blocker.yaml", scripted(steps=0, blocking=True, gate=str(kinod_root / "never"),
                                         max_wait_s=30))
    daemon.wait_state("blocker", "running")
    wait_for(lambda: executions(daemon, "blocker") == 1, 10, what="the blocker to start")

    daemon.drop("alongside.yaml", scripted(steps=10, step_s=0.05))
    progress: list[float] = []

    def alongside_ended() -> bool:
        sidecar = daemon.sidecar("alongside")
        if sidecar is None:
            return False
        progress.append(sidecar["progress"])
        return sidecar["state"] in TERMINAL

    wait_for(alongside_ended, 20, what="the job beside the blocker to end")
    assert daemon.sidecar("alongside")["state"] == "succeeded"
    assert any(0 < p < 100 for p in progress), progress

    daemon.drop("pickup.yaml", {"type": "example", "data": {"prompt": "p", "steps": 1}})
    assert wait_end(daemon, "pickup")["state"] == "succeeded"
    assert daemon.sidecar("blocker")["state"] == "running"

    asked_at = datetime.now(UTC)
    (daemon.inbox / "blocker.stop").touch()
    sidecar = wait_end(daemon, "blocker", timeout_s=15)
    assert sidecar["state"] == "stopped", sidecar
    assert sidecar["error"]["code"] == "stopped"
    assert when(sidecar["finished_at"]) - asked_at < timedelta(seconds=2 + 1.5)
    wait_for(lambda: not (daemon.inbox / "blocker.stop").exists(), 5,
             what="the .stop file to be removed")
    assert daemon.stop() == 0


# --- 6. limits, retries and not_before ----------------------------------------------------


def test_timeouts_retries_and_not_before(kinod_root: Path,
                                          start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon(workers=8)
    never = str(kinod_root / "never")
    not_before = (datetime.now(UTC) + timedelta(seconds=2)).replace(microsecond=0)
    jobs = {
        "times_out": {**scripted(steps=0, gate=never), "timeout": 1},
        "stalls": {**scripted(steps=1, gate=never), "stall_timeout": 1},
        "retried": {**scripted(steps=1, outcome="fail_retryable"), "retries": 2},
        "recovers": {**scripted(steps=1, script=["fail_retryable", "succeed"]), "retries": 3},
        "not_retryable": {**scripted(steps=1, outcome="fail"), "retries": 3},
        "raises": {**scripted(steps=1, outcome="raise"), "retries": 2},
        "healthy": {**scripted(steps=3, step_s=0.1), "timeout": 30, "stall_timeout": 5},
        "later": {**scripted(steps=1), "not_before": not_before.isoformat()},
    }
    for job_id, body in jobs.items():
        daemon.drop(f"{job_id}.json", body)
    waiting = daemon.wait_state("later", "queued", "running", *TERMINAL, timeout_s=5)
    assert waiting["state"] == "queued" and datetime.now(UTC) < not_before, waiting
    assert waiting["started_at"] is None
    sidecars = {job_id: wait_end(daemon, job_id) for job_id in jobs}

    def span(job_id: str) -> timedelta:
        s = sidecars[job_id]
        return when(s["finished_at"]) - when(s["started_at"])

    s = sidecars["times_out"]
    assert (s["state"], s["error"]["code"]) == ("failed", "timeout"), s
    assert timedelta(seconds=1) <= span("times_out") < timedelta(seconds=1 + 2 + 1.5)

    s = sidecars["stalls"]
    assert (s["state"], s["error"]["code"]) == ("failed", "stalled"), s
    assert timedelta(seconds=1) <= span("stalls") < timedelta(seconds=1 + 2 + 1.5)

    s = sidecars["retried"]
    assert (s["state"], s["error"]["code"], s["attempt"]) == ("failed", "plugin_failed", 3), s
    assert executions(daemon, "retried") == 3

    s = sidecars["recovers"]
    assert (s["state"], s["attempt"]) == ("succeeded", 2), s
    assert s["result"]["executions"] == executions(daemon, "recovers") == 2

    s = sidecars["not_retryable"]
    assert (s["state"], s["error"]["code"], s["attempt"]) == ("failed", "plugin_failed", 1), s
    assert "scripted failure" in s["error"]["message"]
    assert executions(daemon, "not_retryable") == 1

    s = sidecars["raises"]
    assert (s["state"], s["error"]["code"], s["attempt"]) == ("failed", "plugin_error", 1), s
    assert "scripted explosion" in s["error"]["message"]
    assert executions(daemon, "raises") == 1

    assert sidecars["healthy"]["state"] == "succeeded", sidecars["healthy"]

    s = sidecars["later"]
    assert s["state"] == "succeeded", s
    assert when(s["started_at"]) >= not_before
    for job_id in jobs:
        assert_done(daemon, job_id, ["1.json"])
    assert daemon.stop() == 0


def test_a_retried_job_reports_progress_again(kinod_root: Path,
                                              start_daemon: Callable[..., DaemonProcess]
                                              ) -> None:
    """The end of a failed attempt closes its progress; the next attempt's is written."""
    daemon = start_daemon()
    gate = kinod_root / "open"
    daemon.drop("again.json", {**scripted(steps=2, step_s=0.05, gate=str(gate),
                                          script=["fail_retryable", "wait"]), "retries": 1})

    def second_attempt_progress() -> dict | None:
        s = daemon.sidecar("again")
        return s if s and s["attempt"] == 2 and s["progress"] >= 90 else None

    s = wait_for(second_attempt_progress, what="progress of the second attempt")
    assert (s["state"], s["message"]) == ("running", "step 2/2"), s
    gate.touch()
    s = wait_end(daemon, "again")
    assert (s["state"], s["attempt"], s["progress"]) == ("succeeded", 2, 100.0), s


# --- 9. resubmission -------------------------------------------------------------------------


def test_resubmitting_an_ended_job_starts_a_new_run_and_keeps_the_old_one(
        start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon()
    daemon.drop("again.yaml", scripted(tag="first"))
    first = wait_end(daemon, "again")
    assert first["state"] == "succeeded", first
    first_log = (daemon.outbox / "again.log").read_text()

    daemon.drop("again.yaml", scripted(tag="second"))

    def second_run_ended() -> dict[str, Any] | None:
        s = daemon.sidecar("again")
        return s if s and s["task"]["data"]["tag"] == "second" and s["state"] in TERMINAL \
            else None

    second = wait_for(second_run_ended, 20, what="the second run to end")
    assert second["state"] == "succeeded", second
    assert second["attempt"] == 1
    assert second["result"]["tag"] == "second"
    assert when(second["created_at"]) > when(first["finished_at"])
    archive = daemon.outbox / "archive" / "again"
    assert json.loads((archive / "1.json").read_text()) == first
    assert (archive / "1.log").read_text().startswith(first_log)
    wait_log(daemon, "again", "succeeded")
    assert_done(daemon, "again", ["1.yaml", "2.yaml"])
    done = daemon.inbox / ".kinod" / "done" / "again"
    assert yaml.safe_load((done / "1.yaml").read_text())["data"]["tag"] == "first"
    assert yaml.safe_load((done / "2.yaml").read_text())["data"]["tag"] == "second"
    assert executions(daemon, "again") == 2
    assert daemon.stop() == 0


def test_a_job_resubmitted_the_moment_its_run_ends_runs_again(
        start_daemon: Callable[..., DaemonProcess]) -> None:
    """A pipeline resubmits the moment it reads the final sidecar, when the file of the run
    that ended may not be filed away yet: the new run is taken in once it is, never set
    aside as a duplicate of a run that has ended."""
    daemon = start_daemon()
    rounds = 8
    for n in range(1, rounds + 1):
        daemon.drop("loop.yaml", scripted(tag=str(n)))

        def ended(tag: str = str(n)) -> dict[str, Any] | None:
            s = daemon.sidecar("loop")
            return s if s and s["task"]["data"]["tag"] == tag and s["state"] in TERMINAL \
                else None

        assert wait_for(ended, 20, what=f"run {n} to end")["state"] == "succeeded"
    assert executions(daemon, "loop") == rounds
    assert_done(daemon, "loop", [f"{n}.yaml" for n in range(1, rounds + 1)])
    assert daemon.stop() == 0


def test_resubmitting_an_active_job_sets_the_duplicate_aside(
        kinod_root: Path, start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon(workers=1)
    gate = kinod_root / "gate"
    daemon.drop("busy.yaml", scripted(steps=0, gate=str(gate), tag="first"))
    running = daemon.wait_state("busy", "running")
    daemon.drop("waiting.yaml", scripted(tag="first"))
    queued = daemon.wait_state("waiting", "queued")

    daemon.drop("busy.yaml", scripted(tag="second"))
    daemon.drop("busy.json", scripted(tag="third"))
    daemon.drop("waiting.yaml", scripted(tag="second"))
    duplicates = daemon.inbox / ".kinod" / "duplicates"
    wait_for(lambda: {p.name for p in (duplicates / "busy").glob("*")} == {"1.yaml", "2.json"}
             and (duplicates / "waiting" / "1.yaml").exists(),
             10, what="the duplicates to be set aside")
    assert yaml.safe_load((duplicates / "waiting" / "1.yaml").read_text())["data"]["tag"] \
        == "second"

    # The active runs are untouched, and each job's log says why its duplicate was set aside.
    assert daemon.sidecar("busy") == running
    assert daemon.sidecar("waiting") == queued
    for job_id, state in (("busy", "running"), ("waiting", "queued")):
        wait_log(daemon, job_id, f"still {state}", "set aside")

    gate.touch()
    for job_id in ("busy", "waiting"):
        sidecar = wait_end(daemon, job_id)
        assert sidecar["state"] == "succeeded", sidecar
        assert sidecar["result"]["tag"] == "first"
        assert executions(daemon, job_id) == 1
        assert_done(daemon, job_id, ["1.yaml"])
    assert not (daemon.outbox / "archive").exists()
    assert daemon.stop() == 0
