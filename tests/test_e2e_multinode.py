"""End to end: several daemons, each its own node, on one shared folder.

Every job must run exactly once (counted by the plugin's own runs, not only by
sidecars), spread over the nodes, and a sidecar that says a job ended is never followed by
another state; a node killed mid-run has its jobs finished by the others once its lease
runs out; a node paused past its lease and resumed clobbers nothing. Job files end in
.yaml, .YAML, .yml, .Yml, .json and .JSON, as users write them; files move by renameat2, or
(KINOD_PORTABLE_RENAME=1, as on NFS, CephFS and FUSE) by a link and an unlink.
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import (
    TERMINAL,
    DaemonProcess,
    OutboxWatch,
    drop_job,
    executions,
    kinod_cli,
    run_starts,
    runs_log,
    scripted,
    spool_files,
    wait_end,
    wait_for,
    when,
)

# As users write them; the spool keeps each in lower case.
SUFFIXES = (".yaml", ".YAML", ".yml", ".json", ".Yml", ".JSON")


def drop_as(inbox: Path, job_id: str, body: dict[str, Any], n: int) -> str:
    """Drop the job under the n-th of SUFFIXES; the suffix its file keeps in the spool."""
    suffix = SUFFIXES[n % len(SUFFIXES)]
    text = json.dumps(body) if suffix.lower() == ".json" else yaml.safe_dump(body)
    drop_job(inbox, job_id + suffix, text)
    return suffix.lower()


def assert_ended_once(daemon: DaemonProcess, job_id: str, suffix: str = ".yaml"
                      ) -> dict[str, Any]:
    """One terminal sidecar, one file in done/, and no run began after the job ended."""
    sidecar = daemon.sidecar(job_id)
    assert sidecar is not None and sidecar["state"] in TERMINAL, sidecar
    assert spool_files(daemon, "done", job_id) == [f"1{suffix}"], job_id
    began = run_starts(daemon.frames, job_id)
    assert began and max(began) < when(sidecar["finished_at"]).timestamp(), (job_id, began)
    return sidecar


@pytest.mark.parametrize("portable", [False, True], ids=["renameat2", "portable"])
def test_three_nodes_run_a_thousand_jobs_each_exactly_once(
        kinod_root: Path, nodes: Callable[..., DaemonProcess], portable: bool) -> None:
    inbox = kinod_root / "inbox"
    env = {"KINOD_PORTABLE_RENAME": "1"} if portable else {}
    ids = [f"j{i:04d}" for i in range(1000)]
    suffixes: dict[str, str] = {}
    for n, job_id in enumerate(ids[:400]):  # waiting before any node starts: all race for them
        suffixes[job_id] = drop_as(inbox, job_id, scripted(steps=0), n)
    daemons = [nodes(name, env=env, workers=4) for name in ("a", "b", "c")]
    watch = OutboxWatch(kinod_root / "outbox", ids)
    for n, job_id in enumerate(ids[400:], start=400):
        suffixes[job_id] = drop_as(inbox, job_id, scripted(steps=0), n)
        if n % 50 == 0:
            watch.look()
    first = daemons[0]
    watch.wait_all_ended(120)
    ran_on: Counter[str] = Counter()
    for job_id in ids:
        sidecar = assert_ended_once(first, job_id, suffixes[job_id])
        assert sidecar["state"] == "succeeded", sidecar
        assert executions(first, job_id) == 1, job_id
        assert sidecar["result"]["executions"] == 1
        ran_on[sidecar["node"]] += 1
    assert set(ran_on) == {"a", "b", "c"}, ran_on
    assert min(ran_on.values()) >= 50, ran_on  # spread, not one node doing it all
    assert spool_files(first, "queued") == []
    assert spool_files(first, "duplicates") == []
    # Every node says who it is.
    listing = kinod_cli("nodes", "--config", str(first.config))
    assert listing.returncode == 0, listing.stderr
    rows = [line.split("\t") for line in listing.stdout.splitlines()[1:]]
    assert sorted((row[0], row[1]) for row in rows) == [("a", "up"), ("b", "up"), ("c", "up")]
    for daemon in daemons:
        assert daemon.stop() == 0
    watch.look()
    assert watch.changed_after_their_end() == {}


def completed_runs(daemon: DaemonProcess, job_id: str) -> int:
    """Runs of the scripted plugin that reached their end (a run killed midway never does)."""
    return sum(1 for line in runs_log(daemon.frames, job_id) if line.startswith("end "))


def test_a_killed_nodes_jobs_finish_on_the_others_after_its_lease(
        kinod_root: Path, nodes: Callable[..., DaemonProcess]) -> None:
    # Short, but long enough that three busy daemons on two cores never miss a lease.
    lease = 5
    inbox = kinod_root / "inbox"
    gate = kinod_root / "gate"
    doomed = nodes("doomed", workers=4, lease=lease)
    held = [f"held{i}" for i in range(3)]  # running on the doomed node when it is killed
    suffixes: dict[str, str] = {}
    for n, job_id in enumerate(held, start=1):
        suffixes[job_id] = drop_as(inbox, job_id, scripted(steps=0, gate=str(gate)), n)
    for job_id in held:
        wait_for(lambda j=job_id: executions(doomed, j) == 1, 15, what=f"{job_id} to start")
    survivors = [nodes(name, workers=4, lease=lease) for name in ("b", "c")]
    ids = [f"k{i:04d}" for i in range(1000)]
    for n, job_id in enumerate(ids):
        suffixes[job_id] = drop_as(inbox, job_id, scripted(steps=1, step_s=0.01), n)
    watch = OutboxWatch(kinod_root / "outbox", held + ids)
    wait_for(lambda: sum(1 for j in ids[:300] if survivors[0].sidecar(j) and
                         survivors[0].sidecar(j)["state"] == "succeeded") >= 100, 60,
             what="work under way on every node")
    doomed.kill()
    gate.touch()
    watch.wait_all_ended(120)  # while the others take the doomed node's jobs back
    taken_back = 0
    for job_id in held + ids:
        sidecar = assert_ended_once(doomed, job_id, suffixes[job_id])
        assert sidecar["state"] == "succeeded", sidecar
        # The run recorded is the last one to begin: nothing ran after the job ended.
        assert sidecar["result"]["executions"] == executions(doomed, job_id), job_id
        if sidecar["attempt"] == 1:
            assert completed_runs(doomed, job_id) == 1, job_id  # ran exactly once
        else:
            # Held by the doomed node when it died: its plugin had not begun, was midway,
            # or had even finished with the end not yet recorded. Then once more, here.
            taken_back += 1
            assert sidecar["attempt"] == 2 and sidecar["node"] in ("b", "c"), sidecar
            assert executions(doomed, job_id) in (1, 2), job_id
    for job_id in held:
        assert doomed.sidecar(job_id)["attempt"] == 2
    assert taken_back >= len(held)
    assert spool_files(doomed, "running", "doomed") == []
    log = survivors[0].log() + survivors[1].log()
    assert "node doomed lost its lease" in log
    for daemon in survivors:
        assert daemon.stop() == 0
    watch.look()
    assert watch.changed_after_their_end() == {}


def start_alone_with_a_backlog(kinod_root: Path, nodes: Callable[..., DaemonProcess],
                               waiting: list[str], lease: float) -> DaemonProcess:
    """Node a, alone on the inbox, its one worker held by the job ``first`` (until the gate
    file appears), and ``waiting`` taken in behind it."""
    inbox = kinod_root / "inbox"
    a = nodes("a", workers=1, lease=lease)
    drop_job(inbox, "first.yaml", scripted(steps=0, gate=str(kinod_root / "gate")))
    wait_for(lambda: executions(a, "first") == 1, 15, what="first to start")
    for job_id in waiting:
        drop_job(inbox, f"{job_id}.yaml", scripted(steps=1, step_s=0))
    wait_for(lambda: all((a.sidecar(j) or {}).get("state") == "queued" for j in waiting), 15,
             what="every job taken in")
    files = sorted(f"{j}.yaml" for j in waiting)
    if os.environ.get("KINOD_WATCH") == "poll":  # it would see another node start late
        assert spool_files(a, "queued") == files
    else:  # alone: it keeps them in its own running/ folder, where no other node claims
        assert spool_files(a, "queued") == []
        assert spool_files(a, "running", "a") == sorted(["first.yaml", *files])
    return a


def test_a_node_alone_hands_its_backlog_to_queued_when_another_node_comes(
        kinod_root: Path, nodes: Callable[..., DaemonProcess]) -> None:
    waiting = [f"w{i:02d}" for i in range(20)]
    # A lease of a minute: a would see b's heartbeat only after 15 s.
    a = start_alone_with_a_backlog(kinod_root, nodes, waiting, lease=60)
    b = nodes("b", workers=2)
    # a sees b start (its lock file written) and moves its backlog to queued/ at once; its
    # own worker stays held, so every one of them runs on b.
    for job_id in waiting:
        sidecar = wait_end(b, job_id, timeout_s=10)
        assert (sidecar["state"], sidecar["node"]) == ("succeeded", "b"), sidecar
    (kinod_root / "gate").touch()
    assert wait_end(a, "first")["node"] == "a"
    assert a.stop() == 0 and b.stop() == 0  # every file filed away by then
    for job_id in ["first", *waiting]:
        assert_ended_once(a, job_id)
        assert completed_runs(a, job_id) == 1, job_id


def test_a_killed_nodes_backlog_kept_in_its_running_folder_runs_elsewhere_once(
        kinod_root: Path, nodes: Callable[..., DaemonProcess]) -> None:
    waiting = [f"w{i:02d}" for i in range(20)]
    a = start_alone_with_a_backlog(kinod_root, nodes, waiting, lease=2)
    a.kill()
    b = nodes("b", workers=2, lease=2)
    for job_id in waiting:  # taken back after a's lease, as jobs that never began
        sidecar = wait_end(b, job_id, timeout_s=30)
        assert (sidecar["state"], sidecar["node"], sidecar["attempt"]) == (
            "succeeded", "b", 1), sidecar
    (kinod_root / "gate").touch()
    sidecar = wait_end(b, "first", timeout_s=30)  # it was running: a crash, then a second try
    assert (sidecar["state"], sidecar["node"], sidecar["attempt"]) == ("succeeded", "b", 2)
    assert b.stop() == 0  # every file filed away by then
    for job_id in waiting:
        assert_ended_once(b, job_id)
        assert completed_runs(b, job_id) == 1, job_id
    assert spool_files(b, "running", "a") == []


def test_a_node_paused_past_its_lease_clobbers_nothing_when_it_resumes(
        kinod_root: Path, nodes: Callable[..., DaemonProcess]) -> None:
    lease = 2
    gate = kinod_root / "gate"
    sleeper = nodes("sleeper", workers=1, lease=lease)
    drop_job(kinod_root / "inbox", "napped.yaml", scripted(steps=0, gate=str(gate)))
    wait_for(lambda: executions(sleeper, "napped") == 1, 15, what="napped to start")
    taker = nodes("taker", workers=1, lease=lease)
    sleeper.signal(signal.SIGSTOP)
    try:
        wait_for(lambda: (taker.sidecar("napped") or {}).get("node") == "taker"
                 and executions(taker, "napped") == 2, 20, what="the taker to run it")
        gate.touch()
        sidecar = wait_end(taker, "napped")
    finally:
        sleeper.signal(signal.SIGCONT)
    assert (sidecar["state"], sidecar["node"], sidecar["attempt"]) == ("succeeded", "taker", 2)
    # The sleeper wakes, finds its job taken over, and stops it without a word to disk.
    wait_for(lambda: "another node took it over" in sleeper.log(), 15,
             what="the sleeper to see it lost the job")
    assert taker.sidecar("napped") == sidecar
    assert_ended_once(taker, "napped")
    drop_job(kinod_root / "inbox", "after.yaml", scripted(steps=0))  # both still serve
    assert wait_end(taker, "after")["state"] == "succeeded"
    assert taker.sidecar("napped") == sidecar
    for daemon in (sleeper, taker):
        assert daemon.stop() == 0


def test_a_node_only_claims_jobs_of_the_plugins_it_serves(
        kinod_root: Path, nodes: Callable[..., DaemonProcess]) -> None:
    cpu = nodes("cpu", serves=["example"])
    gpu = nodes("gpu", serves=["scripted"])
    for i in range(10):
        drop_as(kinod_root / "inbox", f"s{i}", scripted(steps=0), i)
        drop_as(kinod_root / "inbox", f"e{i}", {"type": "example",
                                                "data": {"prompt": "p", "steps": 1}}, i + 3)
    for i in range(10):
        assert wait_end(cpu, f"s{i}")["node"] == "gpu"
        assert wait_end(cpu, f"e{i}")["node"] == "cpu"
    for daemon in (cpu, gpu):
        assert daemon.stop() == 0


def test_a_busy_node_forgets_jobs_another_node_claimed_ran_or_stopped(
        kinod_root: Path, nodes: Callable[..., DaemonProcess]) -> None:
    inbox = kinod_root / "inbox"
    busy_gate, other_gate = kinod_root / "busy_gate", kinod_root / "other_gate"
    busy = nodes("busy", workers=1)
    drop_job(inbox, "hog.yaml", scripted(steps=0, gate=str(busy_gate)))
    wait_for(lambda: executions(busy, "hog") == 1, 15, what="the busy node's own job")
    free = nodes("free", workers=2)
    # Queued on both nodes; only the free one can run them.
    drop_job(inbox, "quick.yaml", scripted(steps=0, tag="first"))
    drop_job(inbox, "held.yaml", scripted(steps=0, gate=str(other_gate)))
    assert wait_end(free, "quick")["result"]["tag"] == "first"
    wait_for(lambda: (free.sidecar("held") or {}).get("state") == "running", 15,
             what="held to run on the free node")
    # A resubmission of an ended id runs, with its own data, wherever it is taken in.
    drop_job(inbox, "quick.yaml", scripted(steps=0, tag="second"))
    # One read per look: the first run's sidecar is moved to archive/ as the second is
    # taken in, so a second read may find none.
    wait_for(lambda: ((free.sidecar("quick") or {}).get("result") or {}).get("tag") == "second",
             15, what="the second run")
    assert spool_files(free, "duplicates") == []
    # A stop for a job running on the other node: the busy node leaves it to its owner.
    (inbox / "held.stop").touch()
    assert wait_end(free, "held")["state"] == "stopped"
    busy_gate.touch()  # the busy node's worker frees: nothing stale may be dispatched
    assert wait_end(busy, "hog")["state"] == "succeeded"
    drop_job(inbox, "after.yaml", scripted(steps=0))
    assert wait_end(busy, "after")["state"] == "succeeded"
    for daemon in (busy, free):
        assert daemon.proc.poll() is None, daemon.log()[-2000:]
        assert daemon.stop() == 0
    other_gate.touch()
