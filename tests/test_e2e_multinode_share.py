"""End to end: polling daemons on one folder share the queue out (kinod.stages.fleet).

Each queued job has an owner among the live nodes, which claims it first and hears of it
by mail; the nodes take turns at listing the inbox and queued/. None of it may cost a job:
every job runs exactly once whichever node owns it; a job whose owner was killed runs on
another node long before the owner's lease runs out; a stop file reaches a job running on
a node whose turn it is not.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from tests.helpers import (
    DaemonProcess,
    OutboxWatch,
    drop_job,
    executions,
    scripted,
    spool_files,
    wait_end,
    wait_for,
)

POLL = {"watch": "poll", "poll_interval_s": 0.2}


def poll_nodes(nodes: Callable[..., DaemonProcess], names: tuple[str, ...],
               **settings: object) -> list[DaemonProcess]:
    env = {"KINOD_WATCH": "poll", "KINOD_POLL_INTERVAL_S": "0.2"}
    return [nodes(name, env=env, **POLL, **settings) for name in names]


def drop_all(inbox: Path, ids: list[str], **data: object) -> None:
    for job_id in ids:
        drop_job(inbox, f"{job_id}.json", json.dumps(scripted(**data)))


def assert_each_ran_once(daemon: DaemonProcess, ids: list[str]) -> Counter[str]:
    ran_on: Counter[str] = Counter()
    for job_id in ids:
        sidecar = daemon.sidecar(job_id)
        assert sidecar is not None and sidecar["state"] == "succeeded", (job_id, sidecar)
        assert sidecar["attempt"] == 1, sidecar
        assert executions(daemon, job_id) == 1, job_id
        assert spool_files(daemon, "done", job_id) == ["1.json"], job_id
        ran_on[sidecar["node"]] += 1
    assert spool_files(daemon, "queued") == []
    assert spool_files(daemon, "duplicates") == []
    return ran_on


def test_three_polling_nodes_sharing_the_queue_run_every_job_once(
        kinod_root: Path, nodes: Callable[..., DaemonProcess]) -> None:
    inbox = kinod_root / "inbox"
    # A short lease: each node learns of the others within a second of their start.
    daemons = poll_nodes(nodes, ("a", "b", "c"), workers=2, lease=4)
    ids = [f"s{i:03d}" for i in range(300)]
    watch = OutboxWatch(kinod_root / "outbox", ids)
    drop_all(inbox, ids[:150], steps=0)
    watch.look()
    drop_all(inbox, ids[150:], steps=1, step_s=0.01)
    watch.wait_all_ended(120)
    ran_on = assert_each_ran_once(daemons[0], ids)
    assert len(ran_on) >= 2, ran_on  # shared out, not all on one node
    # A node that queued another node's job told it so by mail (kinod.share_mail).
    mail = {path.name: path.read_text().split()
            for path in (inbox / ".kinod" / "mail").iterdir()}
    assert mail and set(mail) <= {"a", "b", "c"}, mail
    assert {name for names in mail.values() for name in names} <= {f"{i}.json" for i in ids}
    for daemon in daemons:
        assert daemon.stop() == 0
    watch.look()
    assert watch.changed_after_their_end() == {}


def test_the_share_of_a_killed_node_runs_on_the_others_before_its_lease_runs_out(
        kinod_root: Path, nodes: Callable[..., DaemonProcess]) -> None:
    inbox = kinod_root / "inbox"
    # A lease far longer than the test may take: the killed node, started first, is an
    # owner in the others' eyes from their start to the end of the test, so its share
    # runs only if they take it over.
    doomed = poll_nodes(nodes, ("doomed",), workers=2, lease=600)[0]
    survivors = poll_nodes(nodes, ("a", "b"), workers=2, lease=600)
    doomed.kill()
    ids = [f"d{i:03d}" for i in range(120)]
    watch = OutboxWatch(kinod_root / "outbox", ids)
    drop_all(inbox, ids, steps=0)
    watch.wait_all_ended(120)
    ran_on = assert_each_ran_once(survivors[0], ids)
    assert set(ran_on) <= {"a", "b"}, ran_on
    assert "lost its lease" not in survivors[0].log() + survivors[1].log()


def test_a_stop_file_reaches_a_job_running_on_any_polling_node(
        kinod_root: Path, nodes: Callable[..., DaemonProcess]) -> None:
    inbox = kinod_root / "inbox"
    gate = kinod_root / "gate"
    daemons = poll_nodes(nodes, ("a", "b", "c"), workers=1, lease=4)
    ids = [f"w{i}" for i in range(3)]  # one running on each node, waiting on the gate
    drop_all(inbox, ids, steps=0, gate=str(gate))
    first = daemons[0]
    wait_for(lambda: all(executions(first, j) == 1 for j in ids), 30, what="three runs")
    running_on = {first.sidecar(j)["node"] for j in ids}
    assert running_on == {"a", "b", "c"}, running_on
    for job_id in ids:
        (inbox / f"{job_id}.stop").touch()
    for job_id in ids:
        assert wait_end(first, job_id, 30)["state"] == "stopped"
    gate.touch()
    wait_for(lambda: not any(os.path.lexists(inbox / f"{j}.stop") for j in ids), 10,
             what="the stop files removed")
    for daemon in daemons:
        assert daemon.stop() == 0
