"""Crash torture: the real daemon is killed with SIGKILL at random moments, again and again,
while a few hundred jobs go through it. At the end every job has ended exactly once, no job
file is missing, and a reader polling the outbox all along never saw a half-written sidecar.

The moments are random; the seed is printed, and TORTURE_SEED replays a run.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.helpers import (
    TERMINAL,
    WORKING_PLUGINS,
    DaemonProcess,
    drop_job,
    run_starts,
    scripted,
    spool_files,
    wait_end,
    wait_for,
    when,
    write_config,
)

JOBS = 300
KILLS = 12


class OutboxReader(threading.Thread):
    """Reads every sidecar again and again, as a pipeline script polling the outbox would."""

    def __init__(self, outbox: Path) -> None:
        super().__init__(name="outbox-reader", daemon=True)
        self.outbox = outbox
        self.halt = threading.Event()
        self.rounds = 0
        self.reads = 0
        self.invalid: list[tuple[str, bytes]] = []
        self.first_end: dict[str, tuple[str, str]] = {}  # id -> (state, finished_at)
        self.changed_after_end: list[tuple[str, tuple[str, str], tuple[str, str]]] = []

    def run(self) -> None:
        while not self.halt.is_set():
            with os.scandir(self.outbox) as entries:
                names = [e.name for e in entries if e.name.endswith(".json")]
            for name in names:
                self._check(name)
            self.rounds += 1

    def _check(self, name: str) -> None:
        try:
            raw = (self.outbox / name).read_bytes()
        except FileNotFoundError:
            return
        self.reads += 1
        try:
            sidecar = json.loads(raw)
        except ValueError:
            self.invalid.append((name, raw[:200]))
            return
        end = (sidecar["state"], sidecar["finished_at"])
        seen = self.first_end.get(sidecar["id"])
        if seen is None:
            if sidecar["state"] in TERMINAL:
                self.first_end[sidecar["id"]] = end
        elif end != seen:
            self.changed_after_end.append((sidecar["id"], seen, end))

    def finish(self) -> None:
        self.halt.set()
        self.join(10)


def test_sigkill_again_and_again_loses_nothing_and_ends_every_job_once(
        kinod_root: Path) -> None:
    seed = int(os.environ.get("TORTURE_SEED", time.time_ns() % 1_000_000))
    print(f"torture seed {seed} (TORTURE_SEED={seed} replays it)")
    rng = random.Random(seed)
    config = write_config(kinod_root, plugin_dirs=[str(WORKING_PLUGINS)], workers=8,
                          stop_grace=1, max_crash_attempts=1000)
    daemon = DaemonProcess(kinod_root, config)
    inbox = daemon.inbox
    # One job is held open (its gate) through all the kills, so every kill lands mid-run.
    gate = kinod_root / "gate"
    drop_job(inbox, "held.yaml", scripted(gate=str(gate), step_s=0.01))
    expected = {"held": "succeeded"}
    jobs = []
    for i in range(JOBS):
        outcome = "fail" if i % 10 == 0 else "succeed"
        expected[f"job{i:03d}"] = {"fail": "failed", "succeed": "succeeded"}[outcome]
        jobs.append((f"job{i:03d}.yaml",
                     scripted(outcome=outcome, steps=2, step_s=rng.uniform(0.005, 0.08))))
    batches = [jobs[i::KILLS + 1] for i in range(KILLS + 1)]

    reader = OutboxReader(daemon.outbox)
    reader.start()
    live_kills = 0
    try:
        for kill in range(KILLS):
            half = len(batches[kill]) // 2
            for name, body in batches[kill][:half]:  # dropped while the daemon is down
                drop_job(inbox, name, body)
            log_path = kinod_root / f"run{kill}.log"
            with open(log_path, "w") as log:
                proc = subprocess.Popen([sys.executable, "-m", "kinod", "run", "--config",
                                         str(config)], stdout=log, stderr=subprocess.STDOUT)
            if rng.random() < 0.25:  # during start-up and recovery
                moment = time.monotonic() + rng.uniform(0.1, 1.0)
            else:  # while it runs jobs
                wait_for(lambda p=log_path: "kinod ready" in p.read_text(), what="the start")
                moment = time.monotonic() + rng.uniform(0.05, 1.2)
            for name, body in batches[kill][half:]:  # ... and while it is up
                drop_job(inbox, name, body)
                time.sleep(rng.uniform(0, 0.02))
            time.sleep(max(0.0, moment - time.monotonic()))  # a random moment, by design
            if proc.poll() is None:
                live_kills += 1
            proc.kill()
            proc.wait(10)
        for name, body in batches[KILLS]:
            drop_job(inbox, name, body)
        daemon.log_path = kinod_root / "final.log"
        daemon.start()
        gate.touch()
        for job_id in expected:
            wait_end(daemon, job_id, timeout_s=60)
        assert daemon.stop() == 0
    finally:
        reader.finish()
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.kill()

    assert live_kills >= 10, f"only {live_kills} kills hit a live daemon"
    # A reader never saw a half-written sidecar, nor a job that ended twice.
    assert reader.reads > JOBS, reader.reads
    assert reader.invalid == [], reader.invalid[:3]
    assert reader.changed_after_end == [], reader.changed_after_end[:3]
    for job_id, state in expected.items():
        sidecar = daemon.sidecar(job_id)
        assert sidecar is not None and sidecar["state"] == state, (job_id, sidecar)
        # Filed away exactly once, and no run began after the job had ended.
        assert spool_files(daemon, "done", job_id) == ["1.yaml"], job_id
        began = run_starts(daemon.frames, job_id)
        assert began, f"{job_id} never ran"
        assert max(began) < when(sidecar["finished_at"]).timestamp(), (job_id, began, sidecar)
        assert sidecar["attempt"] >= len(began), (job_id, sidecar["attempt"], began)
        if state == "succeeded":  # the run that succeeded was the last one to begin
            assert sidecar["result"]["executions"] == len(began), (job_id, sidecar, began)
    # Nothing left behind, nothing set aside, no run archived as if resubmitted.
    assert sorted(p.name for p in inbox.iterdir()) == [".kinod"]
    for folder in ("queued", "running/testnode", "duplicates", "invalid"):
        assert spool_files(daemon, *folder.split("/")) == [], folder
    assert spool_files(daemon, "done") == sorted(expected)
    assert not (daemon.outbox / "archive").exists()
    # Kills landed mid-run: the held job ran again after them.
    assert daemon.sidecar("held")["attempt"] > 1
