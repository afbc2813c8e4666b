"""A backlog costs the daemon little memory: a waiting job keeps none of its file's bytes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.helpers import DaemonProcess, scripted, wait_for

BIG_JOBS = 150
TAG_BYTES = 400_000  # each job file is this big: 60 MB in all


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_queued_jobs_keep_no_copy_of_their_files_in_memory(
        kinod_root: Path, start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon(workers=1)
    gate = kinod_root / "gate"
    daemon.drop("blocker.yaml", scripted(gate=str(gate), max_wait_s=60))
    daemon.wait_state("blocker", "running")
    before_mb = _rss_mb(daemon.proc.pid)
    for n in range(BIG_JOBS):
        daemon.drop(f"big{n}.json", scripted(tag="x" * TAG_BYTES))
    wait_for(lambda: all((daemon.sidecar(f"big{n}") or {}).get("state") == "queued"
                         for n in range(BIG_JOBS)), 60, what="every big job to be queued")
    grown_mb = _rss_mb(daemon.proc.pid) - before_mb
    # Kept in memory, their bytes alone would be 60 MB.
    assert grown_mb < BIG_JOBS * TAG_BYTES / 2**20 / 3, f"the daemon grew {grown_mb:.0f} MB"
    gate.touch()
    daemon.wait_state("big0", "succeeded")  # made whole again from its file when claimed
    assert daemon.sidecar("big0")["task"]["data"]["tag"] == "x" * TAG_BYTES
    assert daemon.stop() == 0
