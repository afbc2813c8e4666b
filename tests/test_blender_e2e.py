"""The blender plugin in the real daemon, rendering with the real Blender: progress in the
sidecar, stop and timeout, a crash, chunks on two workers with a job after them, and no
Blender process left behind by any of it."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests.helpers import DaemonProcess, kinod_cli, wait_end, wait_for
from tests.test_blender_scenes import SCENES, blender_processes, need_blender, scenes

__all__ = ["scenes"]  # the fixture


@pytest.fixture
def projects(scenes: Path, kinod_root: Path) -> Path:
    """The scenes, copied into the test folder's projects/ (the default setting)."""
    folder = kinod_root / "projects"
    folder.mkdir()
    for name in SCENES:
        shutil.copy(scenes / name, folder / name)
    return folder


def render_job(blend_file: str = "cube.blend", frames: str = "1-6", **more) -> dict:
    return {"type": "blender", "data": {"blend_file": blend_file, "frames": frames, **more}}


def follow(daemon: DaemonProcess, job_id: str, timeout_s: float = 60) -> list[dict]:
    """Every distinct sidecar of the job until it ends."""
    seen: list[dict] = []

    def ended() -> bool:
        sidecar = daemon.sidecar(job_id)
        if sidecar is not None and (not seen or sidecar != seen[-1]):
            seen.append(sidecar)
        return sidecar is not None and sidecar["state"] in ("succeeded", "failed", "stopped")

    wait_for(ended, timeout_s, interval_s=0.01, what=f"job {job_id} to end")
    return seen


def no_blender_left(root: Path) -> None:
    wait_for(lambda: not blender_processes(str(root)), 10,
             what="no Blender process to be left")


def test_a_render_job_succeeds_with_every_frame_and_rising_progress(
        start_daemon: Callable[..., DaemonProcess], projects: Path) -> None:
    # Every report written: at the 0.5 s default, a fast render on an idle machine can end
    # within two writes, and "rising" would depend on the machine's speed.
    daemon = start_daemon(progress_interval_s=0)
    daemon.drop("shot.yaml", render_job())

    seen = follow(daemon, "shot")

    final = seen[-1]
    assert final["state"] == "succeeded", final
    frames = final["result"]["frames"]
    assert [f["file"] for f in frames] == [f"frame_000{n}.png" for n in range(1, 7)]
    for f in frames:
        with Image.open(daemon.frames / "shot" / f["file"]) as image:
            assert image.size == (32, 24)
    running = [s for s in seen if s["state"] == "running"]
    progress = [s["progress"] for s in running]
    # Rising, never falling. How many steps are seen depends on how fast the machine
    # renders these tiny frames (several can end within one read of Blender's output);
    # every report, a step for each frame and sample, is checked where each is seen:
    # test_blender_plugin.py (real Blender) and test_blender_output.py.
    assert progress == sorted(progress) and progress[-1] > progress[0], progress
    assert any((s["message"] or "").startswith("frame ") and "/6)" in s["message"]
               for s in running)
    log = (daemon.outbox / "shot.log").read_text()
    assert "blender: Saved: " in log and "blender job shot: 6 frame(s)" in log
    assert log.count("blender: Fra:") < 40  # Blender printed hundreds
    assert "STREAM b'IHDR'" not in log  # Pillow's lines about each PNG chunk it reads
    no_blender_left(daemon.root)


def test_python_inside_the_blend_file_never_runs_under_the_daemon(
        start_daemon: Callable[..., DaemonProcess], projects: Path, scenes: Path) -> None:
    marker = scenes / "autorun-marker"  # the script inside writes here when it runs
    marker.unlink(missing_ok=True)
    daemon = start_daemon()
    daemon.drop("auto.yaml", render_job("autorun.blend", "1"))
    assert wait_end(daemon, "auto", 60)["state"] == "succeeded"
    assert not marker.exists()


def test_stop_in_the_middle_of_a_slow_frame(start_daemon: Callable[..., DaemonProcess],
                                            projects: Path) -> None:
    daemon = start_daemon(stop_grace=2)
    daemon.drop("slow.yaml", render_job("slow.blend", "1-3"))
    wait_for(lambda: ", sample " in ((daemon.sidecar("slow") or {}).get("message") or ""), 60,
             what="the slow frame to be sampling")
    assert blender_processes(str(daemon.root))

    asked = time.monotonic()
    assert kinod_cli("stop", "slow", "--config", str(daemon.config)).returncode == 0
    sidecar = wait_end(daemon, "slow", 20)

    assert sidecar["state"] == "stopped", sidecar
    assert time.monotonic() - asked < 2 + 3  # the grace, and the stop file's round trip
    assert blender_processes(str(daemon.root)) == []


def test_a_timeout_ends_blender_and_fails_the_job(start_daemon: Callable[..., DaemonProcess],
                                                  projects: Path) -> None:
    daemon = start_daemon()
    daemon.drop("slow.yaml", {**render_job("slow.blend", "1"), "timeout": 2})
    sidecar = wait_end(daemon, "slow", 30)
    assert sidecar["state"] == "failed" and sidecar["error"]["code"] == "timeout", sidecar
    no_blender_left(daemon.root)


def test_a_crash_or_a_missing_file_fails_only_its_own_job(
        start_daemon: Callable[..., DaemonProcess], projects: Path) -> None:
    daemon = start_daemon(workers=3)
    daemon.drop("broken.yaml", render_job("nocamera.blend", "1-2"))
    daemon.drop("missing.yaml", render_job("nowhere.blend", "1"))
    daemon.drop("good.yaml", render_job(frames="1-2"))

    broken = wait_end(daemon, "broken", 60)
    missing = wait_end(daemon, "missing", 60)
    assert broken["state"] == "failed" and broken["error"] == {
        "code": "plugin_failed", "message": "Blender exited with code 1: Cannot render, "
                                            "no camera (0 of 2 frame(s) written)"}
    assert missing["state"] == "failed"
    assert missing["error"]["message"].startswith(
        "data.blend_file: no file 'nowhere.blend' in the projects folder")
    assert wait_end(daemon, "good", 60)["state"] == "succeeded"
    assert daemon.proc.poll() is None


def test_chunks_on_two_workers_then_the_final_job(start_daemon: Callable[..., DaemonProcess],
                                                  projects: Path, kinod_root: Path) -> None:
    daemon = start_daemon(workers=2)
    job = kinod_root / "film.yaml"
    job.write_text(yaml.safe_dump({
        **render_job(frames="1-8", samples=64),
        "then": {"type": "example", "data": {"prompt": "encode", "steps": 1}}}))

    submitted = kinod_cli("submit", "--chunk", "2", str(job), "--config", str(daemon.config))
    assert submitted.returncode == 0, submitted.stderr
    chunks = ["film.0001-0002", "film.0003-0004", "film.0005-0006", "film.0007-0008"]
    running_together: set[str] = set()

    def two_at_once() -> bool:
        now = {i for i in chunks if (daemon.sidecar(i) or {}).get("state") == "running"}
        if len(now) >= 2:
            running_together.update(now)
        return all((daemon.sidecar(i) or {}).get("state") == "succeeded" for i in chunks)

    wait_for(two_at_once, 120, interval_s=0.01, what="every chunk to succeed")
    assert len(running_together) >= 2, "the two workers never rendered chunks at once"
    final = wait_end(daemon, "film", 30)
    assert final["state"] == "succeeded", final
    assert final["started_at"] >= max(daemon.sidecar(i)["finished_at"] for i in chunks)
    for first, chunk in zip((1, 3, 5, 7), chunks, strict=True):
        assert sorted(p.name for p in (daemon.frames / chunk).iterdir()) == [
            f"frame_{first:04d}.png", f"frame_{first + 1:04d}.png"]
    no_blender_left(daemon.root)


def test_no_blender_outlives_a_daemon_killed_mid_render(
        start_daemon: Callable[..., DaemonProcess], projects: Path) -> None:
    daemon = start_daemon()
    daemon.drop("slow.yaml", render_job("slow.blend", "1"))
    wait_for(lambda: blender_processes(str(daemon.root)), 60, what="Blender to start")
    daemon.signal(signal.SIGKILL)
    daemon.proc.wait(10)
    no_blender_left(daemon.root)


def test_a_daemon_shutting_down_ends_blender_and_hands_the_job_back(
        start_daemon: Callable[..., DaemonProcess], projects: Path) -> None:
    daemon = start_daemon()
    daemon.drop("slow.yaml", render_job("slow.blend", "1"))
    wait_for(lambda: blender_processes(str(daemon.root)), 60, what="Blender to start")
    assert daemon.stop() == 0
    assert blender_processes(str(daemon.root)) == []
    assert daemon.sidecar("slow")["state"] == "queued"


def test_isolated_in_a_process_of_its_own_a_stop_leaves_no_blender(
        start_daemon: Callable[..., DaemonProcess], projects: Path) -> None:
    daemon = start_daemon(plugins={"blender": {"isolation": "process"}})
    daemon.drop("fine.yaml", render_job(frames="1-2"))
    assert wait_end(daemon, "fine", 60)["state"] == "succeeded"
    daemon.drop("slow.yaml", render_job("slow.blend", "1"))
    wait_for(lambda: ", sample " in ((daemon.sidecar("slow") or {}).get("message") or ""), 60,
             what="the slow frame to be sampling")
    (daemon.inbox / "slow.stop").touch()
    assert wait_end(daemon, "slow", 20)["state"] == "stopped"
    no_blender_left(daemon.root)


EXAMPLE = Path(__file__).parent.parent / "projects" / "example"


def test_the_example_project_renders_as_the_readme_says(
        start_daemon: Callable[..., DaemonProcess], kinod_root: Path) -> None:
    folder = kinod_root / "projects" / "example"
    folder.mkdir(parents=True)
    made = subprocess.run([need_blender(), "--background", "--factory-startup", "--python",
                           str(EXAMPLE / "make_turntable.py"), "--",
                           str(folder / "turntable.blend")],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0 and (folder / "turntable.blend").is_file(), made.stdout
    job = shutil.copy(EXAMPLE / "turntable.yaml", kinod_root / "turntable.yaml")
    daemon = start_daemon(workers=2)

    done = kinod_cli("submit", "--chunk", "12", str(job), "--wait", "--config",
                     str(daemon.config), timeout_s=300)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "submitted turntable.0001-0012" in done.stdout
    frames = sorted(p.name for p in (daemon.frames / "turntable.0013-0024").iterdir())
    assert frames == [f"turntable_{n:04d}.png" for n in range(13, 25)]
