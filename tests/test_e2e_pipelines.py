"""End to end: holding and releasing, pausing, and dependencies (SPEC §8, §9), on the real
daemon with real folders and file events (and, under `make test-poll`, in poll mode)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from tests.helpers import (
    DaemonProcess,
    executions,
    kinod_cli,
    scripted,
    spool_files,
    wait_end,
    wait_for,
    when,
)

QUICK = scripted(outcome="succeed", steps=0)


def gated(gate: Path, **data) -> dict:
    """A job that runs until ``gate`` exists."""
    return scripted(steps=0, gate=str(gate), max_wait_s=60, **data)


def cli(daemon: DaemonProcess, *args: str):
    return kinod_cli(*args, "--config", str(daemon.config))


# --- holding and releasing ------------------------------------------------------------------


def test_a_held_job_waits_in_held_until_released(start_daemon: Callable[..., DaemonProcess]
                                                  ) -> None:
    daemon = start_daemon()
    daemon.drop("h1.yaml", {**QUICK, "hold": True})
    held = daemon.wait_state("h1", "held")
    assert "release" in held["message"]
    assert spool_files(daemon, "held") == ["h1.yaml"]
    assert executions(daemon, "h1") == 0

    result = cli(daemon, "release", "h1")
    assert result.returncode == 0, result.stderr
    assert wait_end(daemon, "h1")["state"] == "succeeded"
    assert executions(daemon, "h1") == 1
    assert spool_files(daemon, "held") == []
    assert not (daemon.inbox / "h1.release").exists()


def test_hold_takes_a_queued_job_out_of_the_queue_and_release_puts_it_back(
        start_daemon: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    daemon = start_daemon(workers=1)
    daemon.drop("busy.yaml", gated(gate))
    daemon.wait_state("busy", "running")
    daemon.drop("next.yaml", QUICK)
    daemon.wait_state("next", "queued")

    assert cli(daemon, "hold", "next").returncode == 0
    daemon.wait_state("next", "held")
    gate.touch()
    assert wait_end(daemon, "busy")["state"] == "succeeded"
    assert daemon.sidecar("next")["state"] == "held"  # the free worker does not take it
    assert executions(daemon, "next") == 0

    assert cli(daemon, "release", "next").returncode == 0
    assert wait_end(daemon, "next")["state"] == "succeeded"


def test_a_hold_does_not_touch_a_running_job_and_hold_needs_a_queued_one(
        start_daemon: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    daemon = start_daemon()
    daemon.drop("r.yaml", gated(gate))
    daemon.wait_state("r", "running")
    (daemon.inbox / "r.hold").touch()
    wait_for(lambda: not (daemon.inbox / "r.hold").exists(), what="the .hold to be removed")
    assert daemon.sidecar("r")["state"] == "running"
    gate.touch()
    assert wait_end(daemon, "r")["state"] == "succeeded"

    refused = cli(daemon, "hold", "r")
    assert refused.returncode == 3
    assert "not queued (succeeded)" in refused.stderr
    assert cli(daemon, "release", "nosuchjob").returncode == 3


def test_a_held_job_can_be_stopped(start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon()
    daemon.drop("hs.json", {**QUICK, "hold": True})
    daemon.wait_state("hs", "held")
    assert cli(daemon, "stop", "hs").returncode == 0
    ended = wait_end(daemon, "hs")
    assert ended["state"] == "stopped"
    assert "while held" in ended["error"]["message"]
    assert executions(daemon, "hs") == 0
    assert spool_files(daemon, "held") == []
    wait_for(lambda: spool_files(daemon, "done", "hs") == ["1.json"], what="hs filed away")


def test_a_hold_outlives_a_restart_and_a_release_made_while_down_is_seen(
        start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon()
    daemon.drop("keep.yaml", {**QUICK, "hold": True})
    daemon.wait_state("keep", "held")
    assert daemon.stop() == 0

    daemon = start_daemon(log_name="second.log")
    assert daemon.sidecar("keep")["state"] == "held"
    assert daemon.stop() == 0

    (daemon.inbox / "keep.release").touch()  # released while no daemon runs
    daemon = start_daemon(log_name="third.log")
    assert wait_end(daemon, "keep")["state"] == "succeeded"


def test_a_job_released_before_it_was_taken_in_runs(start_daemon: Callable[..., DaemonProcess]
                                                    ) -> None:
    # The API creates a held job and may release it before any daemon has seen it.
    daemon = start_daemon()
    assert daemon.stop() == 0
    (daemon.inbox / "early.release").touch()
    daemon.drop("early.yaml", {**QUICK, "hold": True})
    daemon = start_daemon(log_name="second.log")
    assert wait_end(daemon, "early")["state"] == "succeeded"
    assert not (daemon.inbox / "early.release").exists()


# --- pausing --------------------------------------------------------------------------------


def test_pause_lets_running_jobs_finish_and_starts_nothing_until_resumed(
        start_daemon: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    daemon = start_daemon(workers=1)
    daemon.drop("before.yaml", gated(gate))
    daemon.wait_state("before", "running")
    daemon.drop("waiting.yaml", QUICK)
    assert daemon.wait_state("waiting", "queued")["message"] is None

    result = cli(daemon, "pause")
    assert result.returncode == 0, result.stderr
    assert (daemon.inbox / ".pause").exists()
    wait_for(lambda: "paused by" in daemon.log(), what="the daemon to see the pause")
    wait_for(lambda: "paused" in (daemon.sidecar("waiting")["message"] or ""),
             what="the queued job's sidecar to say the farm is paused")
    daemon.drop("during.yaml", QUICK)
    queued = daemon.wait_state("during", "queued")
    assert "paused" in queued["message"]
    status = cli(daemon, "status")
    assert "the farm is paused" in status.stderr
    nodes = cli(daemon, "nodes", "--json")
    assert [node["paused"] for node in json.loads(nodes.stdout)] == [True]
    gate.touch()
    assert wait_end(daemon, "before")["state"] == "succeeded"  # running jobs go on
    assert daemon.sidecar("waiting")["state"] == "queued"

    assert daemon.stop() == 0  # the pause outlives a restart
    daemon = start_daemon(log_name="second.log")
    assert daemon.sidecar("during")["state"] == "queued"
    assert executions(daemon, "during") == 0

    assert cli(daemon, "resume").returncode == 0
    assert wait_end(daemon, "during")["state"] == "succeeded"
    assert wait_end(daemon, "waiting")["state"] == "succeeded"


def test_a_resume_is_seen_at_once_not_at_the_next_rescan(
        start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon(rescan_interval_s=600)  # a removal makes no file event
    assert cli(daemon, "pause").returncode == 0
    wait_for(lambda: "paused by" in daemon.log(), what="the daemon to see the pause")
    daemon.drop("soon.yaml", QUICK)
    daemon.wait_state("soon", "queued")
    assert cli(daemon, "resume").returncode == 0
    assert wait_end(daemon, "soon", timeout_s=10)["state"] == "succeeded"


def test_a_node_paused_alone_leaves_the_work_to_the_others(
        nodes: Callable[..., DaemonProcess]) -> None:
    a = nodes("a")
    b = nodes("b")
    result = kinod_cli("pause", "--node", "a", "--config", str(a.config))
    assert result.returncode == 0, result.stderr
    wait_for(lambda: "paused by" in a.log(), what="node a to see its pause")
    for n in range(6):
        a.drop(f"p{n}.yaml", QUICK)
    for n in range(6):
        assert wait_end(a, f"p{n}")["node"] == "b"
    assert "paused by" not in b.log()
    assert kinod_cli("resume", "--node", "a", "--config", str(a.config)).returncode == 0
    wait_for(lambda: "resumed" in a.log(), what="node a to resume")


# --- dependencies ---------------------------------------------------------------------------


def test_a_job_runs_after_the_jobs_it_names_and_waits_for_ones_not_seen_yet(
        start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon(workers=4)
    daemon.drop("encode.yaml", {**QUICK, "after": ["render", "denoise"]})
    waiting = daemon.wait_state("encode", "queued")
    assert waiting["message"] == "waiting for render, denoise to succeed"
    daemon.drop("render.yaml", scripted(outcome="succeed", steps=3, step_s=0.05))
    daemon.drop("denoise.yaml", {**QUICK, "after": ["render"]})
    ends = {job: wait_end(daemon, job) for job in ("render", "denoise", "encode")}
    assert all(end["state"] == "succeeded" for end in ends.values())
    assert when(ends["render"]["finished_at"]) <= when(ends["denoise"]["started_at"])
    assert when(ends["denoise"]["finished_at"]) <= when(ends["encode"]["started_at"])


def test_a_failed_dependency_fails_the_jobs_after_it_naming_it(
        start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon()
    daemon.drop("bad.yaml", scripted(outcome="fail"))
    assert wait_end(daemon, "bad")["state"] == "failed"
    daemon.drop("next.yaml", {**QUICK, "after": ["bad"]})
    daemon.drop("last.yaml", {**QUICK, "after": ["next"]})
    for job in ("next", "last"):
        ended = wait_end(daemon, job)
        assert ended["state"] == "failed"
        assert ended["error"]["code"] == "dependency_failed"
    assert "job bad" in daemon.sidecar("next")["error"]["message"]
    assert "job next" in daemon.sidecar("last")["error"]["message"]
    assert executions(daemon, "next") == executions(daemon, "last") == 0


def test_a_circle_of_jobs_and_a_job_after_itself_fail_as_cycles(
        start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon()
    daemon.drop("self.yaml", {**QUICK, "after": ["self"]})
    daemon.drop("c1.yaml", {**QUICK, "after": ["c3"]})
    daemon.drop("c2.yaml", {**QUICK, "after": ["c1"]})
    daemon.drop("c3.yaml", {**QUICK, "after": ["c2"]})
    daemon.drop("outside.yaml", {**QUICK, "after": ["c1"]})
    for job in ("self", "c1", "c2", "c3"):
        ended = wait_end(daemon, job)
        assert (ended["state"], ended["error"]["code"]) == ("failed", "dependency_cycle"), job
    # Waiting on a circle, not in it: its dependency failed.
    assert wait_end(daemon, "outside")["error"]["code"] == "dependency_failed"


def test_a_resubmitted_dependency_counts_by_its_latest_run(
        start_daemon: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    daemon = start_daemon()
    daemon.drop("base.yaml", scripted(outcome="fail"))
    assert wait_end(daemon, "base")["state"] == "failed"
    daemon.drop("base.yaml", gated(gate))  # its new run
    daemon.wait_state("base", "running")
    daemon.drop("top.yaml", {**QUICK, "after": ["base"]})
    daemon.wait_state("top", "queued")
    gate.touch()
    assert wait_end(daemon, "base")["state"] == "succeeded"
    assert wait_end(daemon, "top")["state"] == "succeeded"


def test_a_chain_survives_a_restart_and_an_end_while_no_daemon_ran(
        start_daemon: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    daemon = start_daemon()
    daemon.drop("s1.yaml", gated(gate))
    daemon.drop("s2.yaml", {**QUICK, "after": ["s1"]})
    daemon.drop("s3.yaml", {**QUICK, "after": ["s2"]})
    daemon.wait_state("s1", "running")
    daemon.wait_state("s3", "queued")
    assert daemon.stop() == 0  # s1 goes back to the queue
    gate.touch()
    daemon = start_daemon(log_name="second.log")
    for job in ("s1", "s2", "s3"):
        assert wait_end(daemon, job)["state"] == "succeeded"


def test_dependencies_across_two_nodes_fan_out_and_in(nodes: Callable[..., DaemonProcess]
                                                      ) -> None:
    a = nodes("a", workers=2)
    b = nodes("b", workers=2)
    a.drop("root.yaml", scripted(outcome="succeed", steps=2, step_s=0.05))
    for n in range(6):
        (a if n % 2 else b).drop(f"leaf{n}.yaml", {**QUICK, "after": ["root"]})
    a.drop("join.yaml", {**QUICK, "after": [f"leaf{n}" for n in range(6)]})
    join = wait_end(a, "join", timeout_s=60)
    assert join["state"] == "succeeded"
    leaves = [wait_end(a, f"leaf{n}") for n in range(6)]
    root = a.sidecar("root")
    assert all(when(root["finished_at"]) <= when(leaf["started_at"]) for leaf in leaves)
    assert all(when(leaf["finished_at"]) <= when(join["started_at"]) for leaf in leaves)
    assert {leaf["node"] for leaf in leaves} | {join["node"]} <= {"a", "b"}


def test_a_chain_of_a_thousand_and_a_fan_in_of_a_thousand_run_in_order(
        start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon(workers=8)
    count = 1000
    daemon.drop("chain0000.json", QUICK)
    for n in range(1, count):
        daemon.drop(f"chain{n:04d}.json", {**QUICK, "after": [f"chain{n - 1:04d}"]})
    for n in range(count):
        daemon.drop(f"fan{n:04d}.json", QUICK)
    daemon.drop("fanin.json", {**QUICK, "after": [f"fan{n:04d}" for n in range(count)]})
    last = wait_end(daemon, f"chain{count - 1:04d}", timeout_s=90)
    fanin = wait_end(daemon, "fanin", timeout_s=30)
    assert last["state"] == fanin["state"] == "succeeded"
    previous = None
    for n in range(count):
        sidecar = daemon.sidecar(f"chain{n:04d}")
        assert sidecar["state"] == "succeeded"
        if previous is not None:
            assert when(previous["finished_at"]) <= when(sidecar["started_at"])
        previous = sidecar
    latest_fan = max(when(daemon.sidecar(f"fan{n:04d}")["finished_at"]) for n in range(count))
    assert latest_fan <= when(fanin["started_at"])
    assert not os.listdir(daemon.inbox / ".kinod" / "queued")
