"""End to end: stop requests, SIGTERM, kill -9 and restarts of the real daemon.

The ``scripted`` test plugin (tests/plugin_fixtures/working/scripted) waits on a gate
file when told to, may ignore stop requests or block its thread, and appends a line to
``data/frames/<id>/runs.log`` each time it starts, so executions are counted.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from kinod.runner import CANCEL_WAIT_S
from tests.helpers import (
    TERMINAL,
    DaemonProcess,
    assert_done,
    executions,
    runs_log,
    scripted,
    spool_files,
    wait_end,
    wait_for,
    when,
)

STOP_GRACE_S = 2
# The runner waits this long for a plugin's thread after cancelling it (kinod.runner).


def job_files_in_inbox(daemon: DaemonProcess) -> list[str]:
    return sorted(p.name for p in daemon.inbox.iterdir() if p.is_file())


# --- 7. stop requests ------------------------------------------------------------------


def test_stop_on_a_queued_job_means_it_never_starts(
        kinod_root: Path, start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon(workers=1)
    gate = kinod_root / "gate"
    daemon.drop("occupier.yaml", scripted(steps=0, gate=str(gate)))
    daemon.wait_state("occupier", "running")
    daemon.drop("victim.yaml", scripted(steps=1))
    daemon.wait_state("victim", "queued")

    (daemon.inbox / "victim.stop").touch()  # as `touch inbox/victim.stop` would
    sidecar = wait_end(daemon, "victim", timeout_s=10)
    assert sidecar["state"] == "stopped", sidecar
    assert sidecar["error"]["code"] == "stopped"
    assert sidecar["started_at"] is None
    wait_for(lambda: not (daemon.inbox / "victim.stop").exists(), 5,
             what="victim.stop to be removed")
    assert_done(daemon, "victim", ["1.yaml"])

    # A stop request for a job that does not exist is removed; the daemon goes on.
    (daemon.inbox / "ghost.stop").touch()
    wait_for(lambda: not (daemon.inbox / "ghost.stop").exists(), 10,
             what="ghost.stop to be removed")
    assert "ghost" in daemon.log()

    gate.touch()
    assert wait_end(daemon, "occupier")["state"] == "succeeded"
    daemon.drop("after.yaml", scripted(steps=1))
    assert wait_end(daemon, "after")["state"] == "succeeded"
    assert executions(daemon, "victim") == 0
    assert daemon.sidecar("victim") == sidecar  # still stopped: it never ran later either
    assert daemon.stop() == 0


def test_a_stop_file_with_its_suffix_in_capitals_is_acted_on_and_removed(
        kinod_root: Path, start_daemon: Callable[..., DaemonProcess]) -> None:
    # Rescans far apart: what is left in the inbox is left by the stop's own handling.
    daemon = start_daemon(workers=1, rescan_interval_s=300)
    gate = kinod_root / "gate"
    daemon.drop("occupier.yaml", scripted(steps=0, gate=str(gate)))
    daemon.wait_state("occupier", "running")
    daemon.drop("victim.yaml", scripted(steps=1))
    daemon.wait_state("victim", "queued")
    (daemon.inbox / "victim.STOP").touch()
    (daemon.inbox / "occupier.Stop").touch()
    assert wait_end(daemon, "victim", timeout_s=10)["state"] == "stopped"
    assert wait_end(daemon, "occupier", timeout_s=10)["state"] == "stopped"
    wait_for(lambda: job_files_in_inbox(daemon) == [], 5,
             what="both stop files to be removed with their jobs' ends")
    assert "no queued or running job" not in daemon.log()
    assert daemon.stop() == 0


def test_stop_reaches_jobs_that_are_waiting_or_still_being_written(
        start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon(settle_s=1.0)
    later = (datetime.now(UTC) + timedelta(seconds=60)).isoformat()
    daemon.drop("scheduled.yaml", {**scripted(steps=1), "not_before": later})
    daemon.wait_state("scheduled", "queued")
    # Written in place, so kinod waits for it to settle; the stop comes meanwhile.
    (daemon.inbox / "unsettled.yaml").write_text("type: scripted\ndata: {steps: 1}\n")
    (daemon.inbox / "unsettled.stop").touch()
    (daemon.inbox / "scheduled.stop").touch()
    for job_id in ("scheduled", "unsettled"):
        sidecar = wait_end(daemon, job_id, timeout_s=10)
        assert sidecar["state"] == "stopped", sidecar
        assert sidecar["started_at"] is None, sidecar
        assert executions(daemon, job_id) == 0
        wait_for(lambda job_id=job_id: not (daemon.inbox / f"{job_id}.stop").exists(), 5,
                 what=f"{job_id}.stop to be removed")
        assert_done(daemon, job_id, ["1.yaml"])
    assert daemon.stop() == 0


def test_stop_files_dropped_with_their_jobs_while_the_daemon_is_down(
        kinod_root: Path, start_daemon: Callable[..., DaemonProcess]) -> None:
    # Jobs submitted while no daemon runs, then cancelled before it starts: a queued job
    # asked to stop never starts, whatever order the folder lists the files in.
    inbox = kinod_root / "inbox"
    ids = [f"cancelled{n}" for n in range(10)]
    an_hour_ago = time.time() - 3600
    for job_id in ids:
        path = inbox / f"{job_id}.yaml"
        path.write_text("type: scripted\ndata: {steps: 1}\n")
        os.utime(path, (an_hour_ago, an_hour_ago))  # long complete: read at once
    for job_id in ids:
        (inbox / f"{job_id}.stop").touch()
    daemon = start_daemon()
    for job_id in ids:
        sidecar = wait_end(daemon, job_id, timeout_s=10)
        assert sidecar["state"] == "stopped", f"{job_id}: {sidecar}"
        assert executions(daemon, job_id) == 0, job_id
    # Each .stop goes a moment after its job's final sidecar is written.
    wait_for(lambda: not any(inbox.glob("*.stop")), 5, what="every .stop to be removed")
    assert daemon.stop() == 0


def test_stop_on_running_jobs_ends_them_stopped_within_the_grace(
        kinod_root: Path, start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon(workers=3)
    never = str(kinod_root / "never")
    jobs = {
        "polite": scripted(steps=0, gate=never),
        "deaf": scripted(steps=0, gate=never, obey_stop=False, max_wait_s=20),
        "deaf_blocking": scripted(steps=0, gate=never, obey_stop=False, blocking=True,
                                  max_wait_s=20),
    }
    for job_id, body in jobs.items():
        daemon.drop(f"{job_id}.yaml", body)
    for job_id in jobs:
        daemon.wait_state(job_id, "running")
        wait_for(lambda job_id=job_id: executions(daemon, job_id) == 1, 10,
                 what=f"{job_id} to start")

    asked_at = datetime.now(UTC)
    for job_id in jobs:
        (daemon.inbox / f"{job_id}.stop").touch()
    sidecars = {job_id: wait_end(daemon, job_id, timeout_s=20) for job_id in jobs}
    took = {job_id: when(s["finished_at"]) - asked_at for job_id, s in sidecars.items()}
    for job_id, sidecar in sidecars.items():
        assert sidecar["state"] == "stopped", sidecar
        assert sidecar["error"]["code"] == "stopped", sidecar
        wait_for(lambda job_id=job_id: not (daemon.inbox / f"{job_id}.stop").exists(), 5,
                 what=f"{job_id}.stop to be removed")
    grace = timedelta(seconds=STOP_GRACE_S)
    # A plugin that stops when asked ends at once.
    assert took["polite"] < timedelta(seconds=1.5), took
    # One that ignores the request is cancelled once the grace has passed.
    assert grace - timedelta(seconds=0.2) <= took["deaf"] < grace + timedelta(seconds=1.5), took
    assert "cancelled" in sidecars["deaf"]["error"]["message"]
    # One that also blocks its thread cannot be interrupted: kinod gives up waiting on it.
    limit = grace + timedelta(seconds=CANCEL_WAIT_S + 1.5)
    assert took["deaf_blocking"] < limit, took
    assert "ignores cancellation" in daemon.log()

    # The daemon keeps serving, with every worker free again.
    for n in range(3):
        daemon.drop(f"after{n}.yaml", scripted(steps=2))
    for n in range(3):
        assert wait_end(daemon, f"after{n}")["state"] == "succeeded"
    assert daemon.stop() == 0


def test_a_plugin_thread_given_up_on_never_writes_over_the_next_run(
        kinod_root: Path, start_daemon: Callable[..., DaemonProcess]) -> None:
    """A plugin that blocks its thread and ignores stop is given up on; when it returns at
    last, the id may be running again: its late end must not touch the new run."""
    daemon = start_daemon()
    first_gate, second_gate = kinod_root / "first", kinod_root / "second"
    daemon.drop("deaf.yaml", scripted(steps=0, gate=str(first_gate), obey_stop=False,
                                      blocking=True, max_wait_s=30, tag="first"))
    daemon.wait_state("deaf", "running")
    wait_for(lambda: executions(daemon, "deaf") == 1, 10, what="the first run to start")
    (daemon.inbox / "deaf.stop").touch()
    assert wait_end(daemon, "deaf", timeout_s=20)["state"] == "stopped"
    wait_for(lambda: "ignores cancellation" in daemon.log(), 10, what="the thread given up on")

    daemon.drop("deaf.yaml", scripted(steps=0, gate=str(second_gate), tag="second"))

    def second_run(state: str) -> dict | None:
        s = daemon.sidecar("deaf")
        return s if s and s["task"]["data"]["tag"] == "second" and s["state"] == state else None

    wait_for(lambda: second_run("running"), 10, what="the second run to start")
    first_gate.touch()  # the first run's thread wakes up and returns, long after its end
    wait_for(lambda: any(line.startswith("end ") for line in runs_log(daemon.frames, "deaf")),
             10, what="the first run's generate() to return")
    assert second_run("running"), daemon.sidecar("deaf")
    second_gate.touch()
    s = wait_end(daemon, "deaf")
    assert (s["state"], s["attempt"], s["task"]["data"]["tag"]) == ("succeeded", 1, "second"), s
    assert daemon.stop() == 0


# --- 8. SIGTERM, kill -9 and restarts ----------------------------------------------


def test_sigterm_hands_running_jobs_back_and_a_restart_runs_them(
        kinod_root: Path, start_daemon: Callable[..., DaemonProcess]) -> None:
    settings = {"workers": 2}
    daemon = start_daemon(**settings)
    gate = kinod_root / "gate"
    daemon.drop("worker.yaml", scripted(steps=0, gate=str(gate)))
    daemon.drop("deaf.yaml", scripted(steps=0, gate=str(gate), obey_stop=False))
    for job_id in ("worker", "deaf"):
        daemon.wait_state(job_id, "running")
        wait_for(lambda job_id=job_id: executions(daemon, job_id) == 1, 10,
                 what=f"{job_id} to start")
    daemon.drop("waiting.yaml", scripted(steps=1))
    daemon.wait_state("waiting", "queued")

    sent_at = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.proc.wait(STOP_GRACE_S + 10) == 0, daemon.log()
    # "deaf" ignores the stop request, so the daemon waits out the grace, and no longer.
    assert time.monotonic() - sent_at < STOP_GRACE_S + 3, daemon.log()
    for job_id in ("worker", "deaf", "waiting"):
        sidecar = daemon.sidecar(job_id)
        assert sidecar["state"] == "queued", sidecar
        assert sidecar["attempt"] == 1, sidecar
        assert sidecar["finished_at"] is None, sidecar
    assert spool_files(daemon, "queued") == ["deaf.yaml", "waiting.yaml", "worker.yaml"]
    assert spool_files(daemon, "running", "testnode") == []
    assert "kinod stopped" in daemon.log()

    gate.touch()
    daemon = start_daemon("daemon2.log", **settings)
    for job_id, attempt, runs in (("worker", 2, 2), ("deaf", 2, 2), ("waiting", 1, 1)):
        sidecar = wait_end(daemon, job_id)
        assert sidecar["state"] == "succeeded", sidecar
        assert sidecar["attempt"] == attempt, sidecar
        assert sidecar["pid"] == daemon.proc.pid
        assert executions(daemon, job_id) == runs, job_id
        assert_done(daemon, job_id, ["1.yaml"])
    assert daemon.stop() == 0


def test_kill_9_mid_job_and_restart_runs_it_again(
        kinod_root: Path, start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon(workers=1)
    gate = kinod_root / "gate"
    daemon.drop("crashy.yaml", scripted(steps=0, gate=str(gate)))
    daemon.wait_state("crashy", "running")
    wait_for(lambda: executions(daemon, "crashy") == 1, 10, what="crashy to start")
    daemon.drop("queued_one.yaml", scripted(steps=1))
    daemon.wait_state("queued_one", "queued")
    first_pid = daemon.proc.pid
    daemon.kill()

    # While no daemon runs: the gate opens, and queued_one is asked to stop.
    assert daemon.sidecar("crashy")["state"] == "running"  # what the dead daemon left
    gate.touch()
    (daemon.inbox / "queued_one.stop").touch()

    daemon = start_daemon("daemon2.log", workers=1)
    sidecar = wait_end(daemon, "crashy")
    assert sidecar["state"] == "succeeded", sidecar
    assert sidecar["attempt"] == 2
    assert sidecar["pid"] == daemon.proc.pid != first_pid
    assert executions(daemon, "crashy") == 2
    assert_done(daemon, "crashy", ["1.yaml"])

    stopped = wait_end(daemon, "queued_one")
    assert stopped["state"] == "stopped", stopped
    assert executions(daemon, "queued_one") == 0
    wait_for(lambda: not (daemon.inbox / "queued_one.stop").exists(), 5,
             what="queued_one.stop to be removed")
    assert_done(daemon, "queued_one", ["1.yaml"])
    assert daemon.stop() == 0


def test_kill_9_with_many_jobs_every_job_ends_exactly_once(
        start_daemon: Callable[..., DaemonProcess]) -> None:
    workers = 3
    daemon = start_daemon(workers=workers)
    ids = [f"job{n:02d}" for n in range(20)]
    for job_id in ids:
        daemon.drop(f"{job_id}.yaml", scripted(steps=4, step_s=0.05))

    def states() -> list[str | None]:
        return [(daemon.sidecar(i) or {}).get("state") for i in ids]

    def mid_way() -> bool:
        now = states()
        return sum(s in TERMINAL for s in now) >= 6 and now.count("running") == workers

    wait_for(mid_way, 30, what=f"a few jobs to end and {workers} to be running")
    daemon.kill()
    at_kill = {job_id: daemon.sidecar(job_id) for job_id in ids}
    cut_short = [i for i, s in at_kill.items() if s and s["state"] == "running"]
    assert any(s is None or s["state"] not in TERMINAL for s in at_kill.values()), \
        "every job had ended before the kill"
    assert 1 <= len(cut_short) <= workers

    daemon = start_daemon("daemon2.log", workers=workers)
    sidecars = {job_id: wait_end(daemon, job_id) for job_id in ids}
    for job_id, sidecar in sidecars.items():
        assert sidecar["state"] == "succeeded", sidecar
        runs = executions(daemon, job_id)
        before = at_kill[job_id]
        if before is not None and before["state"] in TERMINAL:
            assert sidecar == before, job_id  # ended before the kill: left as it was
            assert runs == 1, job_id
        elif job_id in cut_short:
            assert sidecar["attempt"] == 2, sidecar
            assert 1 <= runs <= 2, job_id
        else:
            assert sidecar["attempt"] == 1, sidecar
            assert runs == 1, job_id
        assert_done(daemon, job_id, ["1.yaml"])
    assert sorted(spool_files(daemon, "done")) == ids
    assert spool_files(daemon, "queued") == []
    assert spool_files(daemon, "running", "testnode") == []
    assert spool_files(daemon, "duplicates") == []
    assert spool_files(daemon, "invalid") == []
    assert job_files_in_inbox(daemon) == []
    assert not (daemon.outbox / "archive").exists()
    assert daemon.stop() == 0


def test_a_second_sigterm_stops_at_once(
        kinod_root: Path, start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon(stop_grace=30)
    daemon.drop("deaf.yaml", scripted(steps=0, gate=str(kinod_root / "never"),
                                      obey_stop=False, max_wait_s=60))
    daemon.wait_state("deaf", "running")
    wait_for(lambda: executions(daemon, "deaf") == 1, 10, what="deaf to start")
    daemon.signal(signal.SIGTERM)
    wait_for(lambda: "stopping:" in daemon.log(), 10, what="the daemon to begin stopping")
    sent_at = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.proc.wait(10) == 0, daemon.log()
    assert time.monotonic() - sent_at < 3, daemon.log()  # not the 30 s grace
    assert daemon.sidecar("deaf")["state"] == "queued"
    assert spool_files(daemon, "queued") == ["deaf.yaml"]


def test_a_job_the_daemon_keeps_dying_on_fails_as_crashed(
        kinod_root: Path, start_daemon: Callable[..., DaemonProcess]) -> None:
    settings = {"max_crash_attempts": 2}
    daemon = start_daemon(**settings)
    daemon.drop("doomed.yaml", scripted(steps=0, gate=str(kinod_root / "never")))
    for n in (1, 2):
        wait_for(lambda d=daemon, n=n: (d.sidecar("doomed") or {}).get("state") == "running"
                 and executions(d, "doomed") == n, 20, what=f"run {n} of doomed")
        daemon.kill()
        daemon = start_daemon(f"daemon{n + 1}.log", **settings)
    sidecar = wait_end(daemon, "doomed", timeout_s=10)
    assert (sidecar["state"], sidecar["error"]["code"]) == ("failed", "crashed"), sidecar
    assert executions(daemon, "doomed") == 2
    assert_done(daemon, "doomed", ["1.yaml"])
    assert daemon.stop() == 0


def test_a_crash_after_retryable_failures_is_one_crash_not_many(
        kinod_root: Path, start_daemon: Callable[..., DaemonProcess]) -> None:
    # Three retryable failures, then the daemon dies once during the fourth run: that is
    # one crash, well under max_crash_attempts (3), so the job runs again.
    gate = kinod_root / "gate"
    daemon = start_daemon()
    script = ["fail_retryable"] * 3 + ["wait"]
    daemon.drop("retrier.yaml", {**scripted(steps=0, gate=str(gate), script=script),
                                 "retries": 5})
    wait_for(lambda: (daemon.sidecar("retrier") or {}).get("state") == "running"
             and executions(daemon, "retrier") == 4, 20, what="the fourth run")
    daemon.kill()
    gate.touch()
    daemon = start_daemon("daemon2.log")
    sidecar = wait_end(daemon, "retrier")
    assert sidecar["state"] == "succeeded", sidecar
    assert executions(daemon, "retrier") == 5
    assert daemon.stop() == 0


def test_a_clean_restart_does_not_use_up_the_jobs_retries(
        kinod_root: Path, start_daemon: Callable[..., DaemonProcess]) -> None:
    # Handed back on SIGTERM during run 1 (not a failure), then one retryable failure:
    # with retries: 1, that failure is retried.
    gate = kinod_root / "gate"
    daemon = start_daemon()
    daemon.drop("patient.yaml", {**scripted(steps=0, gate=str(gate),
                                            script=["wait", "fail_retryable", "succeed"]),
                                 "retries": 1})
    wait_for(lambda: (daemon.sidecar("patient") or {}).get("state") == "running"
             and executions(daemon, "patient") == 1, 20, what="the first run")
    assert daemon.stop() == 0
    assert daemon.sidecar("patient")["state"] == "queued"
    daemon = start_daemon("daemon2.log")
    sidecar = wait_end(daemon, "patient")
    assert sidecar["state"] == "succeeded", sidecar
    assert executions(daemon, "patient") == 3
    assert daemon.stop() == 0


def test_a_job_waiting_for_not_before_survives_a_restart(
        start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon()
    not_before = datetime.now(UTC) + timedelta(seconds=3)
    daemon.drop("later.yaml", {**scripted(steps=1), "not_before": not_before.isoformat()})
    daemon.wait_state("later", "queued")
    assert daemon.stop() == 0
    daemon = start_daemon(log_name="restarted.log")
    sidecar = wait_end(daemon, "later")
    assert sidecar["state"] == "succeeded", sidecar
    assert when(sidecar["started_at"]) >= not_before
    assert executions(daemon, "later") == 1
    assert daemon.stop() == 0
