"""End to end: faults of the machine around the real daemon: its inbox deleted and made
again while it runs, and a shutdown with jobs running and hundreds queued."""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from tests.helpers import (
    DaemonProcess,
    assert_done,
    executions,
    scripted,
    spool_files,
    wait_end,
    wait_for,
)


def test_the_inbox_deleted_and_made_again_is_served(
        kinod_root: Path, start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon(workers=1, rescan_interval_s=30)  # events, not the rescan, notice
    gate = kinod_root / "gate"
    daemon.drop("running.yaml", scripted(steps=0, gate=str(gate)))
    daemon.wait_state("running", "running")
    daemon.drop("queued.yaml", scripted(steps=1))
    daemon.wait_state("queued", "queued")

    shutil.rmtree(daemon.inbox)  # job files, spool and all
    wait_for(lambda: "the inbox " in daemon.log() and " is gone" in daemon.log(), 10,
             what="the lost inbox logged")
    daemon.inbox.mkdir()
    wait_for(lambda: "was made again; serving the new one" in daemon.log(), 15,
             what="the new inbox taken up")
    daemon.drop("after.yaml", scripted(steps=1))
    daemon.wait_state("after", "queued")
    gate.touch()  # frees the one worker
    assert wait_end(daemon, "after")["state"] == "succeeded"
    assert_done(daemon, "after", ["1.yaml"])
    # The jobs whose files were deleted end with a clear word, not silence.
    assert wait_end(daemon, "running")["state"] == "succeeded"
    wait_for(lambda: "was removed while the job was active" in daemon.log(), 5,
             what="the missing file logged")
    queued = wait_end(daemon, "queued")
    assert queued["state"] == "failed" and queued["error"]["code"] == "lost", queued
    assert daemon.proc.poll() is None
    assert daemon.stop() == 0


def test_sigterm_under_load_exits_in_the_grace_and_a_restart_runs_every_job_once(
        kinod_root: Path, start_daemon: Callable[..., DaemonProcess]) -> None:
    grace_s = 2
    settings = {"workers": 4, "stop_grace": grace_s}
    daemon = start_daemon(**settings)
    gate = kinod_root / "gate"
    # Four long jobs hold the workers; two of them ignore stop requests.
    held = [f"held{i}" for i in range(4)]
    for i, job_id in enumerate(held):
        daemon.drop(f"{job_id}.yaml", scripted(steps=0, gate=str(gate), obey_stop=i % 2 == 0))
    for job_id in held:
        wait_for(lambda job_id=job_id: executions(daemon, job_id) == 1, 10,
                 what=f"{job_id} to start")
    queued = [f"q{i:03d}" for i in range(300)]
    for job_id in queued:
        daemon.drop(f"{job_id}.yaml", scripted(steps=1, step_s=0))
    # Accepted: each has its queued sidecar. Serving the inbox alone, the daemon keeps them
    # in its running/ folder, and hands them to queued/ when it stops.
    wait_for(lambda: all((daemon.sidecar(job_id) or {}).get("state") == "queued"
                         for job_id in queued), 30, what="every job accepted")

    sent_at = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.proc.wait(grace_s + 15) == 0, daemon.log()[-3000:]
    # Deaf plugins are cancelled at the grace; the exit follows within a second or so.
    assert time.monotonic() - sent_at < grace_s + 3, daemon.log()[-3000:]
    assert spool_files(daemon, "running", "testnode") == []
    assert len(spool_files(daemon, "queued")) == len(held) + len(queued)

    gate.touch()
    daemon = start_daemon("daemon2.log", **settings)
    for job_id in held + queued:
        sidecar = wait_end(daemon, job_id, timeout_s=60)
        assert sidecar["state"] == "succeeded", sidecar
    for job_id in held:
        assert executions(daemon, job_id) == 2, job_id  # handed back once, run again once
    for job_id in queued:
        assert executions(daemon, job_id) == 1, job_id
    assert spool_files(daemon, "done") == sorted(held + queued)
    assert all(spool_files(daemon, "done", job_id) == ["1.yaml"] for job_id in held + queued)
    assert daemon.stop() == 0


def test_isolated_plugins_that_end_or_hang_their_process_fail_only_their_job(
        start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon(workers=8, stop_grace=1,
                          plugins={"crashy": {"isolation": "process", "colour": "red"}})
    expected = {
        # job id: (job, error code, text the message must hold)
        "os_exit": ({"action": "os_exit", "code": 7}, "plugin_error", "exited with code 7"),
        "killed": ({"action": "kill_self"}, "plugin_error", "killed by signal SIGKILL"),
        "sys_exit": ({"action": "sys_exit", "code": 3}, "plugin_error", "SystemExit"),
        "raises": ({"action": "raise"}, "plugin_error", "RuntimeError: crashy explosion"),
        "hangs": ({"action": "hang"}, "timeout", "did not stop within the grace"),
    }
    for job_id, (data, _, _) in expected.items():
        timeout = {"timeout": 1} if job_id == "hangs" else {}
        daemon.drop(f"{job_id}.yaml", {"type": "crashy", "data": data, **timeout})
    daemon.drop("fine.yaml", {"type": "crashy", "data": {}})
    daemon.drop("threaded.yaml", scripted(steps=1))  # a thread-mode plugin beside them
    for job_id, (_, code, text) in expected.items():
        sidecar = wait_end(daemon, job_id)
        assert sidecar["state"] == "failed", sidecar
        assert sidecar["error"]["code"] == code, sidecar
        assert text in sidecar["error"]["message"], sidecar
    fine = wait_end(daemon, "fine")
    assert fine["state"] == "succeeded", fine
    assert fine["result"]["pid"] != daemon.proc.pid  # it ran in a process of its own
    assert fine["result"]["settings"] == {"colour": "red"}
    assert fine["progress"] == 100.0
    assert "crashy fine: done" in (daemon.outbox / "fine.log").read_text()
    assert wait_end(daemon, "threaded")["state"] == "succeeded"
    # The hung plugin's process was killed, not left behind.
    hung_pid = int((daemon.outbox / "hangs.log").read_text().split("hang in process ")[1]
                   .split()[0])
    assert not Path(f"/proc/{hung_pid}").exists()
    assert daemon.proc.poll() is None
    assert daemon.stop() == 0


def test_in_a_thread_a_plugin_calling_os_exit_ends_the_daemon_until_the_job_fails(
        kinod_root: Path, start_daemon: Callable[..., DaemonProcess]) -> None:
    """What isolation: process is for. Without it, each start dies with the plugin (as a
    systemd unit would, then be restarted) until max_crash_attempts fails the job."""
    settings = {"max_crash_attempts": 2}
    gate = kinod_root / "gate"
    job = {"type": "crashy", "data": {"action": "os_exit", "code": 9, "gate": str(gate)}}
    (kinod_root / "inbox" / "exits.yaml").write_text(yaml.safe_dump(job))
    for n in (1, 2):
        gate.unlink(missing_ok=True)
        daemon = start_daemon(f"daemon{n}.log", **settings)
        daemon.wait_state("exits", "running")
        gate.touch()
        assert daemon.proc.wait(20) == 9  # the plugin's exit status is the daemon's
    daemon = start_daemon("daemon3.log", **settings)
    sidecar = wait_end(daemon, "exits", timeout_s=10)
    assert (sidecar["state"], sidecar["error"]["code"]) == ("failed", "crashed"), sidecar
    assert "died 2 times" in sidecar["error"]["message"]
    assert_done(daemon, "exits", ["1.yaml"])
    assert daemon.stop() == 0
