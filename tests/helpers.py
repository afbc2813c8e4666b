"""Shared test tools: waiting on conditions with deadlines, and the real daemon in a process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

DEFAULT_TIMEOUT_S = 30.0
TERMINAL = ("succeeded", "failed", "stopped")
PLUGIN_FIXTURES = Path(__file__).parent / "plugin_fixtures"
WORKING_PLUGINS = PLUGIN_FIXTURES / "working"  # seed-style test plugins that load
BROKEN_PLUGINS = PLUGIN_FIXTURES / "broken"    # ... and ones that fail to


def wait_for(condition: Callable[[], Any], timeout_s: float = DEFAULT_TIMEOUT_S,
             interval_s: float = 0.02, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


class Clock:
    """A monotonic clock a test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def write_config(root: Path, **settings: Any) -> Path:
    """A config.yaml in ``root``; tests default to quick settling and a quiet node name."""
    values = {"node": "testnode", "settle_s": 0.3, "stop_grace": 3, "rescan_interval_s": 2,
              "progress_interval_s": 0.05}
    values.update(settings)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def drop_job(inbox: Path, name: str, body: dict[str, Any] | str) -> Path:
    """Drop a job file the recommended way: write under a dot-name, then rename into place."""
    text = body if isinstance(body, str) else (
        json.dumps(body) if name.endswith(".json") else yaml.safe_dump(body))
    tmp = inbox / f".{name}.tmp"
    tmp.write_text(text)
    final = inbox / name
    os.rename(tmp, final)
    return final


def read_sidecar(outbox: Path, job_id: str) -> dict[str, Any] | None:
    try:
        return json.loads((outbox / f"{job_id}.json").read_text())
    except FileNotFoundError:
        return None


class DaemonProcess:
    """``kinod run`` as a child process on a folder of its own."""

    def __init__(self, root: Path, config: Path, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.config = config
        self.inbox = root / "inbox"
        self.outbox = root / "outbox"
        self.frames = root / "data" / "frames"
        self.log_path = root / "daemon.log"
        self._env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> DaemonProcess:
        log = open(self.log_path, "a")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kinod", "run", "--config", str(self.config)],
            stdout=log, stderr=subprocess.STDOUT, env=self._env, cwd=self.root)
        log.close()
        wait_for(lambda: "kinod ready" in self.log() or self.proc.poll() is not None,
                 what="the daemon to start")
        assert self.proc.poll() is None, f"the daemon exited at start:\n{self.log()}"
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except FileNotFoundError:
            return ""

    def drop(self, name: str, body: dict[str, Any] | str) -> Path:
        return drop_job(self.inbox, name, body)

    def sidecar(self, job_id: str) -> dict[str, Any] | None:
        return read_sidecar(self.outbox, job_id)

    def wait_state(self, job_id: str, *states: str, timeout_s: float = DEFAULT_TIMEOUT_S
                   ) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            sidecar = self.sidecar(job_id)
            return sidecar if sidecar and sidecar["state"] in states else None

        try:
            return wait_for(reached, timeout_s, what=f"job {job_id} to be {'/'.join(states)}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; sidecar: {self.sidecar(job_id)}\n"
                                 f"daemon log:\n{self.log()[-4000:]}") from None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout_s: float = 20) -> int:
        """SIGTERM, then wait for a clean exit; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)


def kinod_cli(*args: str, cwd: Path | None = None, timeout_s: float = 60,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kinod", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout_s, env={**os.environ, **(env or {})})


# --- the scripted test plugin (plugin_fixtures/working/scripted) and job outcomes ---------


def scripted(**data: Any) -> dict[str, Any]:
    """A job for the scripted test plugin, which does what ``data`` says."""
    return {"type": "scripted", "data": data}


def runs_log(frames: Path, job_id: str) -> list[str]:
    """The scripted plugin's runs.log for this job: "start <id> <unix time> <pid>" as each
    run's generate() begins, "end ..." as it returns; none before its first run."""
    try:
        return (frames / job_id / "runs.log").read_text().splitlines()
    except FileNotFoundError:
        return []


def executions(daemon: DaemonProcess, job_id: str) -> int:
    """How many times the scripted plugin's generate() began for this job."""
    return sum(1 for line in runs_log(daemon.frames, job_id) if line.startswith("start "))


def run_starts(frames: Path, job_id: str) -> list[float]:
    """When each run of the scripted plugin began for this job."""
    return [float(line.split()[2]) for line in runs_log(frames, job_id)
            if line.startswith("start ")]


def wait_end(daemon: DaemonProcess, job_id: str, timeout_s: float = DEFAULT_TIMEOUT_S
             ) -> dict[str, Any]:
    return daemon.wait_state(job_id, *TERMINAL, timeout_s=timeout_s)


def when(text: str | None) -> datetime:
    """A sidecar time, which must be UTC."""
    assert text is not None
    moment = datetime.fromisoformat(text)
    assert moment.utcoffset() == timedelta(0), f"{text} is not UTC"
    return moment


def spool_files(daemon: DaemonProcess, *parts: str) -> list[str]:
    """The names in inbox/.kinod/<parts...>/."""
    folder = daemon.inbox.joinpath(".kinod", *parts)
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def assert_done(daemon: DaemonProcess, job_id: str, expected: list[str]) -> None:
    """inbox/.kinod/done/<id>/ holds exactly ``expected`` (the file moves there just after
    the final sidecar is written, so give it a moment)."""
    try:
        wait_for(lambda: spool_files(daemon, "done", job_id) == expected, 5,
                 what=f"done/{job_id}/ to hold {expected}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; it holds {spool_files(daemon, 'done', job_id)}") from None


class OutboxWatch:
    """Every job's sidecar, read again and again while the jobs run, as a pipeline polling
    the outbox would; each job's states in the order seen."""

    def __init__(self, outbox: Path, ids: list[str]) -> None:
        self.outbox = outbox
        self.seen: dict[str, list[tuple[str, str | None]]] = {job_id: [] for job_id in ids}

    def look(self) -> bool:
        """One read of every sidecar; True once every job has ended."""
        ended = 0
        for job_id, states in self.seen.items():
            sidecar = read_sidecar(self.outbox, job_id)
            if sidecar is None:
                continue
            state = (sidecar["state"], sidecar["finished_at"])
            if not states or states[-1] != state:
                states.append(state)
            ended += state[0] in TERMINAL
        return ended == len(self.seen)

    def wait_all_ended(self, timeout_s: float) -> None:
        wait_for(self.look, timeout_s, interval_s=0.05, what="every job to end")

    def changed_after_their_end(self) -> dict[str, list[tuple[str, str | None]]]:
        """The jobs whose sidecar said something else after it said the job ended."""
        return {job_id: states for job_id, states in self.seen.items()
                if any(state in TERMINAL for state, _ in states[:-1])}
