"""Faults of the machine's disks: a full outbox, a read-only outbox, an outbox that vanishes.

The daemon runs in this process on a pyfakefs file system, which can be made full or
read-only at will. The watcher is left out (inotify cannot see a fake file system): the
daemon's own rescan finds new files, as it does on file systems without events.
Each test checks that the daemon says so in its log, keeps the job file, tries again,
and ends the job normally once the disk is writable again.
"""

from __future__ import annotations

import asyncio
import errno
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyfakefs.fake_filesystem import FakeFilesystem
from pyfakefs.fake_filesystem_unittest import Patcher

import kinod.daemon as daemon_module
import kinod.stages.running as running_stage
from kinod.config import Settings
from kinod.daemon import Daemon
from kinod.plugins.plugin_loader import PluginRegistry
from tests.helpers import WORKING_PLUGINS, scripted, wait_for

ROOT = Path("/farm")
OUTBOX_DISK_ROOT = Path("/disk2")  # the outbox lives on a disk of its own
OUTBOX_DISK = 64 * 1024  # bytes: room for a few sidecars and logs


class _NoWatcher:
    def __init__(self, *_: Any) -> None:
        pass

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        pass

    def stop(self) -> None:
        pass


class Farm:
    """A daemon serving /farm on a fake file system, its outbox on a disk of its own."""

    def __init__(self, fs: FakeFilesystem, registry: PluginRegistry,
                 log: list[str], **settings: Any) -> None:
        self.fs = fs
        self.inbox, self.outbox = ROOT / "inbox", OUTBOX_DISK_ROOT / "outbox"
        fs.add_mount_point(str(OUTBOX_DISK_ROOT), total_size=OUTBOX_DISK)
        for folder in (self.inbox, self.outbox, ROOT / "frames", ROOT / "models"):
            fs.create_dir(folder)
        settings = Settings(inbox=self.inbox, outbox=self.outbox, frames=ROOT / "frames",
                            models=ROOT / "models", node="n1", settle_s=0, stop_grace=1,
                            rescan_interval_s=0.1, progress_interval_s=0, **settings)
        self.daemon = Daemon(settings, registry)
        self.log = log
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._serve, name="farm-daemon")
        self._failure: BaseException | None = None

    def _serve(self) -> None:
        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            await self.daemon.run()

        try:
            asyncio.run(serve())
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self._failure = exc

    def start(self) -> None:
        self._thread.start()
        wait_for(lambda: any("kinod ready" in line for line in self.log), 10,
                 what="the daemon to start")

    def stop(self) -> None:
        if self._loop is not None and self._thread.is_alive():  # a test may stop it first
            self._loop.call_soon_threadsafe(self.daemon.request_shutdown)
        self._thread.join(15)
        assert not self._thread.is_alive(), "the daemon did not stop"
        assert self._failure is None, f"the daemon died: {self._failure!r}"

    def drop(self, job_id: str, body: dict[str, Any]) -> None:
        tmp = self.inbox / f".{job_id}.tmp"
        tmp.write_text(json.dumps(body))
        tmp.rename(self.inbox / f"{job_id}.json")

    def sidecar(self, job_id: str) -> dict[str, Any] | None:
        try:
            return json.loads((self.outbox / f"{job_id}.json").read_text())
        except FileNotFoundError:
            return None

    def state(self, job_id: str) -> str | None:
        sidecar = self.sidecar(job_id)
        return sidecar["state"] if sidecar else None

    def wait_state(self, job_id: str, state: str, timeout_s: float = 15) -> dict[str, Any]:
        wait_for(lambda: self.state(job_id) == state, timeout_s,
                 what=f"{job_id} to be {state} (it is {self.state(job_id)})")
        return self.sidecar(job_id)

    def fill_outbox(self) -> None:
        disk = str(OUTBOX_DISK_ROOT)
        self.fs.set_disk_usage(self.fs.get_disk_usage(disk).used, path=disk)

    def free_outbox(self) -> None:
        self.fs.set_disk_usage(OUTBOX_DISK * 16, path=str(OUTBOX_DISK_ROOT))

    def spool(self, *parts: str) -> list[str]:
        folder = self.inbox.joinpath(".kinod", *parts)
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    def logged(self, text: str) -> bool:
        return any(text in line for line in self.log)


@pytest.fixture
def farm(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Farm]:
    """The farm, serving; ``indirect`` parameters are settings of its own."""
    registry = PluginRegistry([WORKING_PLUGINS])  # loaded from the real disk, before faking
    monkeypatch.setattr(daemon_module, "InboxWatcher", _NoWatcher)
    monkeypatch.setattr(daemon_module, "RETRY_S", 0.2)
    log: list[str] = []
    sink = daemon_module.logger.add(lambda m: log.append(str(m)), level="DEBUG",
                                    format="{level} {message}")
    try:
        with Patcher(allow_root_user=False) as patcher:  # permissions apply, even to root
            farm = Farm(patcher.fs, registry, log, **getattr(request, "param", {}))
            farm.start()
            try:
                yield farm
            finally:
                farm.stop()
    finally:
        daemon_module.logger.remove(sink)


def assert_filed_away(farm: Farm, job_id: str) -> None:
    """The job's file is in done/ (it moves just after the final sidecar), no other waits."""
    wait_for(lambda: farm.spool("done", job_id) == ["1.json"] and farm.spool("queued") == []
             and farm.spool("running", "n1") == [], 5, what=f"{job_id}'s file in done/")


def test_a_job_dropped_on_a_full_outbox_waits_and_runs_when_space_is_back(farm: Farm) -> None:
    farm.fill_outbox()
    farm.drop("full", scripted(steps=1, step_s=0))
    wait_for(lambda: farm.logged("No space left on device"), what="the full disk logged")
    assert farm.sidecar("full") is None
    # Kept: still in the inbox, or held by the daemon taking it in; never dropped.
    assert ["full.json"] in ([p.name for p in farm.inbox.glob("*.json")], farm.spool("queued"),
                             farm.spool("running", "n1"))
    farm.free_outbox()
    assert farm.wait_state("full", "succeeded")["attempt"] == 1
    assert_filed_away(farm, "full")


def test_a_job_ending_on_a_full_outbox_is_recorded_when_space_is_back(farm: Farm) -> None:
    gate = ROOT / "gate"
    farm.drop("ending", scripted(gate=str(gate), step_s=0))
    farm.wait_state("ending", "running")
    farm.fill_outbox()
    gate.touch()
    wait_for(lambda: farm.logged("cannot record its end"), what="the failed end logged")
    assert farm.state("ending") == "running"  # the last complete sidecar, still readable
    assert farm.spool("running", "n1") == ["ending.json"]  # the job file stays put
    farm.drop("meanwhile", scripted(steps=1, step_s=0))  # waits for space too
    farm.free_outbox()
    sidecar = farm.wait_state("ending", "succeeded")
    assert sidecar["result"]["executions"] == 1  # recorded, not run again
    farm.wait_state("meanwhile", "succeeded")
    assert_filed_away(farm, "ending")


@pytest.mark.parametrize("farm", [{"workers": 1}], indirect=True)
def test_a_stop_leaves_a_job_whose_end_is_unrecorded_where_it_ran(farm: Farm) -> None:
    """The jobs waiting in this node's running/ go to queued/ when the daemon stops; a job
    that ran there, its end not recorded, stays: the next start takes it up as a job its
    daemon was running (a crash counted), never as one that waited."""
    gate = ROOT / "gate"
    farm.drop("ending", scripted(gate=str(gate), step_s=0))
    farm.wait_state("ending", "running")
    farm.drop("waiting", scripted(steps=1, step_s=0))
    farm.wait_state("waiting", "queued")
    assert farm.spool("running", "n1") == ["ending.json", "waiting.json"]  # both held here
    farm.fill_outbox()
    gate.touch()
    wait_for(lambda: farm.logged("cannot record its end"), what="the failed end logged")
    farm.stop()
    assert farm.spool("running", "n1") == ["ending.json"]
    assert farm.spool("queued") == ["waiting.json"]
    assert farm.state("ending") == "running"  # its last complete sidecar: it runs again


def test_a_job_file_that_cannot_be_filed_away_waits_beside_its_final_sidecar(
        farm: Farm) -> None:
    done = farm.inbox / ".kinod" / "done"
    done.chmod(0o555)
    farm.drop("unfiled", scripted(steps=1, step_s=0))
    assert farm.wait_state("unfiled", "succeeded")["attempt"] == 1
    wait_for(lambda: farm.logged("cannot file away"), what="the refused move logged")
    assert farm.spool("running", "n1") == ["unfiled.json"]  # kept, and never run again
    done.chmod(0o755)
    assert_filed_away(farm, "unfiled")
    assert farm.sidecar("unfiled")["attempt"] == 1


def test_a_job_resubmitted_before_its_ended_run_is_filed_away_runs_once_it_is(
        farm: Farm) -> None:
    done = farm.inbox / ".kinod" / "done"
    done.chmod(0o555)
    farm.drop("again", scripted(steps=1, step_s=0, tag="first"))
    farm.wait_state("again", "succeeded")
    wait_for(lambda: farm.logged("cannot file away"), what="the refused move logged")
    farm.drop("again", scripted(steps=1, step_s=0, tag="second"))
    wait_for(lambda: farm.logged("resubmitted") or farm.logged("set aside"),
             what="the resubmission noticed")
    # Not set aside as a duplicate: its run has ended. It waits in the inbox meanwhile.
    assert farm.spool("duplicates") == []
    assert [p.name for p in farm.inbox.glob("*.json")] == ["again.json"]
    assert farm.sidecar("again")["task"]["data"]["tag"] == "first"
    done.chmod(0o755)
    wait_for(lambda: (farm.sidecar("again") or {}).get("task", {}).get("data", {}).get("tag")
             == "second" and farm.state("again") == "succeeded", 10, what="the second run")
    wait_for(lambda: farm.spool("done", "again") == ["1.json", "2.json"], 5,
             what="both runs' files in done/")


def test_a_read_only_outbox_holds_jobs_back_until_it_is_writable(farm: Farm) -> None:
    farm.outbox.chmod(0o555)
    farm.drop("readonly", scripted(steps=1, step_s=0))
    wait_for(lambda: farm.logged("Permission denied"), what="the read-only outbox logged")
    assert farm.sidecar("readonly") is None
    farm.outbox.chmod(0o755)
    farm.wait_state("readonly", "succeeded")
    assert_filed_away(farm, "readonly")


def test_an_outbox_that_vanishes_is_made_again(farm: Farm) -> None:
    gate = ROOT / "gate"
    farm.drop("orphan", scripted(gate=str(gate), step_s=0))
    farm.wait_state("orphan", "running")
    farm.fs.remove_object(str(farm.outbox))
    gate.touch()
    sidecar = farm.wait_state("orphan", "succeeded")
    assert sidecar["attempt"] == 1
    assert farm.logged("is gone; making it again")
    assert_filed_away(farm, "orphan")


def test_a_success_is_recorded_only_once_its_output_is_on_disk(
        farm: Farm, monkeypatch: pytest.MonkeyPatch) -> None:
    flushed: list[tuple[Path, str | None]] = []

    def recording_flush(folder: Path) -> int:
        flushed.append((folder, farm.state("flushed")))
        return 0

    monkeypatch.setattr(running_stage, "flush_tree", recording_flush)
    farm.drop("flushed", scripted(steps=1, step_s=0))
    farm.wait_state("flushed", "succeeded")
    assert flushed == [(ROOT / "frames" / "flushed", "running")]


def test_output_that_cannot_be_flushed_fails_the_job(
        farm: Farm, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_flush(folder: Path) -> int:
        raise OSError(errno.EIO, "Input/output error", str(folder))

    monkeypatch.setattr(running_stage, "flush_tree", failing_flush)
    farm.drop("unflushed", scripted(steps=1, step_s=0))
    sidecar = farm.wait_state("unflushed", "failed")
    assert "its output could not be flushed to disk" in sidecar["error"]["message"]
    assert "Input/output error" in sidecar["error"]["message"]
    assert_filed_away(farm, "unflushed")
