"""End to end: job files whose suffix is not lower case (``u1.YAML``), on two nodes that share
one folder.

The suffix may be written in any case. Every node must see such a job as the job it is,
wherever its file is in the spool: a node that finds the file gone from queued/ must know
that another node claimed it (not fail it as lost), and a raw drop of the same id under
another spelling of the suffix must be set aside as a duplicate of the running job.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.helpers import (
    DaemonProcess,
    OutboxWatch,
    drop_job,
    executions,
    runs_log,
    scripted,
    spool_files,
    wait_end,
    wait_for,
)


def test_upper_case_suffixes_on_two_nodes_end_once_and_never_change_after_their_end(
        kinod_root: Path, nodes: Callable[..., DaemonProcess]) -> None:
    inbox, outbox = kinod_root / "inbox", kinod_root / "outbox"
    daemons = [nodes(name, workers=1) for name in ("a", "b")]
    ids = [f"u{i}" for i in range(1, 7)]
    for job_id in ids:
        drop_job(inbox, f"{job_id}.YAML", scripted(steps=3, step_s=0.05))
    # Every sidecar read while the jobs run: once one says the job ended, no later one may
    # say anything else (a `failed` then a `succeeded` is the fault this guards against).
    watch = OutboxWatch(outbox, ids)

    def finished() -> bool:
        watch.look()
        # Done when every run has returned and every file is filed away for good.
        return all(spool_files(daemons[0], "done", job_id)
                   and any(line.startswith("end ") for line in runs_log(daemons[0].frames, job_id))
                   for job_id in ids)

    wait_for(finished, 60, interval_s=0.005, what="every job to run and be filed away")
    watch.look()  # one more look, after the last file was filed
    assert watch.changed_after_their_end() == {}
    for job_id in ids:
        states = watch.seen[job_id]
        assert states and states[-1][0] == "succeeded", (job_id, states,
                                                          daemons[0].log()[-3000:])
        assert executions(daemons[0], job_id) == 1, job_id
        assert spool_files(daemons[0], "done", job_id) == ["1.yaml"]
    assert spool_files(daemons[0], "duplicates") == []
    for daemon in daemons:
        assert "lost" not in daemon.log()
        assert daemon.stop() == 0


def test_a_raw_drop_under_another_suffix_case_of_a_job_running_elsewhere_is_a_duplicate(
        kinod_root: Path, nodes: Callable[..., DaemonProcess]) -> None:
    inbox, gate = kinod_root / "inbox", kinod_root / "gate"
    # The job runs on a node that looks at the inbox only every minute, so the other
    # node, which watches it, is the one that finds the second drop. As environment
    # variables, which win over `make test-poll`'s.
    drop_job(inbox, "g.YAML", scripted(steps=0, gate=str(gate)))
    slow = nodes("slow", workers=1, rescan_interval_s=60,
                 env={"KINOD_WATCH": "poll", "KINOD_POLL_INTERVAL_S": "60"})
    wait_for(lambda: executions(slow, "g") == 1, 15, what="g to start on the slow node")
    fast = nodes("fast", workers=1, env={"KINOD_WATCH": "inotify"})
    for n, name in enumerate(["g.yaml", "g.Yml", "g.JSON"], start=1):
        drop_job(inbox, name, scripted(steps=0, tag="again"))
        # Set aside, or (the fault) taken in as a new run of g beside the running one.
        wait_for(lambda n=n: len(spool_files(fast, "duplicates", "g")) == n
                 or executions(fast, "g") > 1 or spool_files(fast, "running", "fast"), 15,
                 what=f"{name} to be set aside")
        assert executions(fast, "g") == 1
        assert spool_files(fast, "running", "fast") == []
    assert spool_files(fast, "duplicates", "g") == ["1.yaml", "2.yml", "3.json"]
    assert fast.log().count("this resubmission was set aside") == 3
    gate.touch()
    sidecar = wait_end(slow, "g")
    assert sidecar["state"] == "succeeded", sidecar
    assert sidecar["node"] == "slow" and sidecar["attempt"] == 1
    assert sidecar["result"]["tag"] is None  # the first submission's run, not the duplicate's
    assert executions(slow, "g") == 1
    wait_for(lambda: spool_files(slow, "done", "g") == ["1.yaml"], 5, what="g to be filed")
    assert not (kinod_root / "outbox" / "archive" / "g").exists()
    for daemon in (slow, fast):
        assert daemon.stop() == 0
