"""The blender plugin on its own, rendering with the real Blender (no daemon)."""

from __future__ import annotations

import asyncio
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from kinod.plugins.blender import verify
from kinod.plugins.blender.loader import STOPPED, BlenderPlugin
from kinod.plugins.blender.process import BlenderProcess
from tests.helpers import wait_for
from tests.test_blender_scenes import blender_processes, need_blender, scenes

__all__ = ["scenes"]  # the fixture, shared with the scenes' own tests


class Progress:
    def __init__(self) -> None:
        self.reports: list[tuple[float, str | None]] = []

    def __call__(self, value: float, message: str | None = None) -> None:
        self.reports.append((value, message))


def new_plugin(tmp_path: Path, projects: Path, **settings: Any) -> BlenderPlugin:
    plugin = BlenderPlugin()
    plugin.output_dir = tmp_path / "frames" / "job"
    plugin.models_dir = tmp_path / "models"
    plugin.settings = {"projects": str(projects), **settings}
    return plugin


def render(plugin: BlenderPlugin, progress: Progress | None = None, **data: Any):
    return asyncio.run(plugin.generate("job", data, progress))


def wrapper(tmp_path: Path, body: str) -> str:
    """An executable that stands for Blender: ``body`` runs with "$@" as Blender's arguments."""
    path = tmp_path / "blender-wrapper"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_renders_every_frame_with_rising_progress(scenes: Path, tmp_path: Path) -> None:
    progress = Progress()
    plugin = new_plugin(tmp_path, scenes)
    result = render(plugin, progress, blend_file="cube.blend", frames="1-6")
    assert result.success, result.error
    folder = tmp_path / "frames" / "job"
    assert sorted(p.name for p in folder.iterdir()) == [f"frame_000{n}.png" for n in range(1, 7)]
    for n in range(1, 7):
        with Image.open(folder / f"frame_000{n}.png") as image:
            assert image.size == (32, 24)
    data = result.data
    assert [f["frame"] for f in data["frames"]] == [1, 2, 3, 4, 5, 6]
    assert data["frames"][0]["file"] == "frame_0001.png"
    assert all(f["render_time_s"] is not None and f["render_time_s"] >= 0
               for f in data["frames"])
    assert data["blender_version"].startswith(("3.", "4.", "5."))
    assert "--disable-autoexec" in data["command"]
    values = [value for value, _ in progress.reports]
    assert values == sorted(values), "progress went backwards"
    assert len(set(values)) >= 6 and values[-1] < 100
    messages = [m for _, m in progress.reports if m]
    assert "frame 1 (1/6)" in messages
    assert any(m.startswith("frame 6 (6/6), sample ") and m.endswith("/4") for m in messages)


def test_a_list_of_frames_other_formats_and_a_pattern_in_a_subfolder(
        scenes: Path, tmp_path: Path) -> None:
    plugin = new_plugin(tmp_path, scenes)
    result = render(plugin, blend_file="cube.blend", frames="2,5", format="OPEN_EXR",
                    output="exr/shot_##", samples=2, resolution_percent=50)
    assert result.success, result.error
    assert [f["file"] for f in result.data["frames"]] == ["exr/shot_02.exr", "exr/shot_05.exr"]
    result = render(plugin, blend_file="cube.blend", frames=3, format="JPEG",
                    camera="SideCamera")
    assert result.success, result.error
    with Image.open(tmp_path / "frames" / "job" / "frame_0003.jpg") as image:
        assert image.format == "JPEG" and image.size == (32, 24)


def test_python_inside_the_blend_file_never_runs(scenes: Path, tmp_path: Path) -> None:
    marker = scenes / "autorun-marker"
    marker.unlink(missing_ok=True)
    result = render(new_plugin(tmp_path, scenes), blend_file="autorun.blend", frames="1")
    assert result.success, result.error
    assert not marker.exists(), "the script inside the .blend file ran"


@pytest.mark.parametrize(("blend_file", "expected"), [
    ("missing.blend", "data.blend_file: no file 'missing.blend' in the projects folder"),
    ("../outside.blend", "data.blend_file: '../outside.blend' is outside the projects folder"),
    ("/etc/hostname", "data.blend_file: '/etc/hostname' is outside the projects folder"),
])
def test_a_file_missing_or_outside_the_projects_folder_fails(
        scenes: Path, tmp_path: Path, blend_file: str, expected: str) -> None:
    (scenes.parent / "outside.blend").write_bytes(b"BLENDER")
    result = render(new_plugin(tmp_path, scenes), blend_file=blend_file, frames="1")
    assert not result.success and result.error.startswith(expected), result.error


@pytest.mark.parametrize(("data", "expected"), [
    ({"output": "../elsewhere_####"}, "data.output: '../elsewhere_####' must be a relative"),
    ({"output": "/tmp/x_####"}, "data.output: '/tmp/x_####' must be a relative"),
    ({"frames": "5-1"}, "data.frames: '5-1': the range 5-1 runs backwards"),
    ({"frames": [1, 2]}, "data.frames: must be a frame range"),
    ({"scene": "Nope"}, "Blender exited with code 3: no scene 'Nope' in the file"),
    ({"camera": "Nope"}, "Blender exited with code 3: no camera 'Nope' in the file"),
])
def test_bad_parameters_fail_the_job_and_say_why(scenes: Path, tmp_path: Path,
                                                 data: dict[str, Any], expected: str) -> None:
    job = {"blend_file": "cube.blend", "frames": "1", **data}
    result = render(new_plugin(tmp_path, scenes), **job)
    assert not result.success and result.error.startswith(expected), result.error
    assert not (tmp_path / "elsewhere_0001.png").exists()


def test_a_render_error_fails_with_blenders_last_error_line(scenes: Path,
                                                            tmp_path: Path) -> None:
    result = render(new_plugin(tmp_path, scenes), blend_file="nocamera.blend", frames="1-2")
    assert not result.success
    assert result.error == ("Blender exited with code 1: Cannot render, no camera "
                            "(0 of 2 frame(s) written)")


def test_a_crash_fails_the_job_with_the_signal_and_the_last_error(scenes: Path,
                                                                  tmp_path: Path) -> None:
    executable = wrapper(tmp_path, 'echo "Error: out of memory"; kill -SEGV $$')
    result = render(new_plugin(tmp_path, scenes, executable=executable),
                    blend_file="cube.blend", frames="1")
    assert not result.success
    assert result.error == ("Blender was killed by signal SIGSEGV: out of memory "
                            "(0 of 1 frame(s) written)")


def test_a_missing_or_empty_frame_fails_the_job_naming_it(scenes: Path, tmp_path: Path) -> None:
    frames = tmp_path / "frames" / "job"
    executable = wrapper(tmp_path, f'"{need_blender()}" "$@" || exit $?\n'
                                   f': > "{frames}/frame_0002.png"\n'
                                   f'rm "{frames}/frame_0003.png"')
    result = render(new_plugin(tmp_path, scenes, executable=executable),
                    blend_file="cube.blend", frames="1-3")
    assert not result.success and result.error == "frame 2: frame_0002.png is empty"
    (frames / "frame_0002.png").unlink()
    executable = wrapper(tmp_path, f'"{need_blender()}" "$@" || exit $?\n'
                                   f'rm "{frames}/frame_0003.png"')
    result = render(new_plugin(tmp_path, scenes, executable=executable),
                    blend_file="cube.blend", frames="1-3")
    assert not result.success and result.error == "frame 3: frame_0003.png was not written"


def test_frames_are_read_once_unless_they_changed_after_blender_saved_them(
        scenes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each frame is checked as Blender says it saved it; after Blender ends, a frame still
    # the same file is not read again, and one cut short since fails the job naming it.
    reads: list[str] = []
    read = verify._read
    monkeypatch.setattr(verify, "_read",
                        lambda path, file: reads.append(path.name) or read(path, file))
    result = render(new_plugin(tmp_path, scenes), blend_file="cube.blend", frames="1-3")
    assert result.success, result.error
    assert reads == ["frame_0001.png", "frame_0002.png", "frame_0003.png"]

    reads.clear()
    frames = tmp_path / "frames" / "job"
    executable = wrapper(tmp_path, f'"{need_blender()}" "$@" || exit $?\n'
                                   f'truncate -s -100 "{frames}/frame_0002.png"')
    result = render(new_plugin(tmp_path, scenes, executable=executable),
                    blend_file="cube.blend", frames="1-3")
    assert not result.success
    assert result.error.startswith("frame 2: frame_0002.png is not a readable image ("), \
        result.error
    assert reads == ["frame_0001.png", "frame_0002.png", "frame_0003.png", "frame_0002.png"]


def test_no_blender_executable(scenes: Path, tmp_path: Path) -> None:
    result = render(new_plugin(tmp_path, scenes, executable=str(tmp_path / "nope")),
                    blend_file="cube.blend", frames="1")
    assert not result.success
    assert result.error.startswith(f"cannot run Blender ({tmp_path / 'nope'}): ")


def test_a_bad_setting_fails_the_job_naming_it(scenes: Path, tmp_path: Path) -> None:
    result = render(new_plugin(tmp_path, scenes, colour="red"), blend_file="cube.blend",
                    frames="1")
    assert not result.success and "plugins.blender.colour" in result.error, result.error


async def _start_slow(plugin: BlenderPlugin, progress: Progress) -> asyncio.Task:
    task = asyncio.create_task(plugin.generate("job", {"blend_file": "slow.blend",
                                                       "frames": "1-3"}, progress))
    deadline = asyncio.get_running_loop().time() + 60
    while not any(m and ", sample " in m for _, m in progress.reports):
        assert not task.done(), task.result()
        assert asyncio.get_running_loop().time() < deadline, "the slow frame never started"
        await asyncio.sleep(0.05)
    return task


def test_stop_in_the_middle_of_a_frame_ends_blender_at_once(scenes: Path,
                                                            tmp_path: Path) -> None:
    plugin = new_plugin(tmp_path, scenes)

    async def scenario():
        task = await _start_slow(plugin, Progress())
        assert blender_processes(str(scenes))
        await plugin.stop()
        return await asyncio.wait_for(task, 10)

    result = asyncio.run(scenario())
    assert not result.success and result.error == STOPPED
    assert blender_processes(str(scenes)) == []


def test_a_cancel_kills_blender_before_generate_lets_go(scenes: Path, tmp_path: Path) -> None:
    # What kinod does once the stop grace is over, here without asking Blender to stop first.
    plugin = new_plugin(tmp_path, scenes)

    async def scenario() -> None:
        task = await _start_slow(plugin, Progress())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)

    asyncio.run(scenario())
    assert blender_processes(str(scenes)) == []


def test_blender_dies_with_the_process_that_started_it(scenes: Path, tmp_path: Path) -> None:
    # A daemon killed by SIGKILL cannot stop its jobs: the kernel ends Blender for it.
    script = tmp_path / "starter.py"
    script.write_text(
        "import asyncio, os, sys\n"
        "from kinod.plugins.blender.process import BlenderProcess\n"
        "async def main():\n"
        "    p = BlenderProcess(sys.argv[1:], os.getcwd())\n"
        "    await p.start()\n"
        "    print(p.proc.pid, flush=True)\n"
        "    await p.wait()\n"
        "asyncio.run(main())\n")
    starter = subprocess.Popen(
        [sys.executable, str(script), need_blender(), "--background", "--disable-autoexec",
         str(scenes / "slow.blend"), "--render-output", str(tmp_path / "f_#"),
         "--render-frame", "1"], stdout=subprocess.PIPE, text=True, cwd=Path.cwd())
    try:
        assert int(starter.stdout.readline()) > 0
        wait_for(lambda: blender_processes(str(scenes)), 30, what="Blender to start")
        starter.kill()
        starter.wait(10)
        wait_for(lambda: not blender_processes(str(scenes)), 30,
                 what="Blender to die with its parent")
        # (Its pid is not looked at again: on a busy machine another process may have it.)
    finally:
        starter.kill()
        starter.wait(10)
        starter.stdout.close()


def test_blenders_status_lines_are_throttled_in_the_log(scenes: Path, tmp_path: Path,
                                                        caplog_loguru) -> None:
    result = render(new_plugin(tmp_path, scenes), blend_file="cube.blend", frames="1-3")
    assert result.success, result.error
    lines = [r.getMessage() for r in caplog_loguru.records]
    status = [line for line in lines if line.startswith("blender: Fra:")]
    assert 1 <= len(status) <= 3 * 2, status  # Blender printed dozens a frame
    assert sum("blender: Saved: " in line for line in lines) == 3



def test_every_line_blender_prints_is_read_until_it_ends(tmp_path: Path) -> None:
    # Read in batches, not line by line: nothing is lost, a pause does not end the
    # reading, and a last line without its newline still comes.
    script = ('printf "one\\rtwo\\n"; i=0; while [ $i -lt 3000 ]; do echo "line $i"; '
              'i=$((i+1)); done; sleep 0.3; printf "last"')

    async def scenario() -> tuple[list[str], int]:
        process = BlenderProcess(["sh", "-c", script], tmp_path)
        await process.start()
        try:
            lines = [line async for line in process.lines()]
            return lines, await process.wait()
        finally:
            await process.finish()

    lines, code = asyncio.run(scenario())
    assert code == 0
    assert lines == ["one", "two", *(f"line {n}" for n in range(3000)), "last"]
