"""Reading Blender's output, and its command line, without Blender."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from kinod.config import load_settings
from kinod.plugins.blender import verify
from kinod.plugins.blender.command import JobError, check_render
from kinod.plugins.blender.output import MAX_LOGGED_LINES, BlenderOutput
from kinod.runner import plugin_settings
from tests.helpers import Clock, write_config

CYCLES = """\
Blender 3.4.1
KINOD_BLENDER 3.4.1
KINOD_FRAME 3 /f/frame_0003.png
KINOD_FRAME 4 /f/frame_0004.png
Fra:3 Mem:9.04M (Peak 10.83M) | Time:00:00.00 | Scene, ViewLayer | Synchronizing object | Cube
Fra:3 Mem:9.90M (Peak 10.83M) | Time:00:00.05 | Mem:0.76M, Peak:0.76M | ViewLayer | Sample 0/4
Fra:3 Mem:9.94M (Peak 10.83M) | Time:00:00.05 | Remaining:00:00.00 | Scene, ViewLayer | Sample 1/4
Fra:3 Mem:9.95M (Peak 10.83M) | Time:00:00.05 | Mem:0.78M, Peak:0.78M | Scene, ViewLayer | Finished
Saved: '/f/frame_0003.png'
 Time: 00:00.23 (Saving: 00:00.17)

Fra:4 Mem:9.29M (Peak 10.83M) | Time:00:00.00 | Mem:0.00M, Peak:0.00M | ViewLayer | Sample 2/4
Saved: '/f/frame_0004.png'
 Time: 01:02:03.50 (Saving: 00:00.00)
"""


def feed_all(text: str, **kwargs) -> tuple[BlenderOutput, list[tuple[float, str]], list]:
    logged: list[tuple[str, str]] = []
    output = BlenderOutput([3, 4], lambda level, line: logged.append((level, line)), **kwargs)
    shown = []
    for line in text.splitlines():
        if output.feed(line):
            shown.append((output.percent(), output.message()))
    return output, shown, logged


def test_cycles_frames_samples_times_and_paths() -> None:
    output, shown, _ = feed_all(CYCLES)
    assert output.version == "3.4.1"
    assert output.paths == {3: "/f/frame_0003.png", 4: "/f/frame_0004.png"}
    assert [(d.frame, d.file, d.render_time_s) for d in output.done] == [
        (3, "/f/frame_0003.png", 0.23), (4, "/f/frame_0004.png", 3723.5)]
    assert shown == [
        (0.0, "frame 3 (1/2)"),
        (0.0, "frame 3 (1/2), sample 0/4"),
        (12.5, "frame 3 (1/2), sample 1/4"),
        (50.0, "frame 4 (2/2)"),
        (75.0, "frame 4 (2/2), sample 2/4"),
        (99.0, "2/2 frame(s) rendered"),
    ]


def test_eevee_samples() -> None:
    output, shown, _ = feed_all("Fra:3 Mem:10.75M (Peak 11.87M) | Time:00:03.15 | "
                                "Rendering 26 / 64 samples")
    assert shown[-1] == (26 / 64 * 50, "frame 3 (1/2), sample 26/64")


def test_the_last_error_line_is_kept() -> None:
    output, _, logged = feed_all("Error: first\nsomething\nError: Cannot render, no camera\n")
    assert output.last_error == "Cannot render, no camera"
    assert ("WARNING", "Error: Cannot render, no camera") in logged


def test_status_lines_are_logged_once_per_interval_and_at_each_new_frame() -> None:
    clock = Clock()
    logged: list[tuple[str, str]] = []
    output = BlenderOutput([1, 2], lambda level, line: logged.append((level, line)),
                           log_interval_s=5, clock=clock)
    for sample in range(100):
        output.feed(f"Fra:1 Mem:1M | Time:00:00.00 | Scene | Sample {sample}/100")
        clock.now += 0.1  # 10 s in all
    output.feed("Fra:2 Mem:1M | Scene | Sample 0/100")
    assert [line.rpartition("| ")[2] for _, line in logged] == [
        "Sample 0/100", "Sample 50/100", "Sample 0/100"]


def test_the_log_stops_taking_blenders_lines_past_its_limit() -> None:
    output, _, logged = feed_all("\n".join(f"line {n}" for n in range(MAX_LOGGED_LINES + 50)))
    assert len(logged) == MAX_LOGGED_LINES + 1
    assert "further output is not logged" in logged[-1][1]


def test_the_command_line_renders_last_and_never_runs_the_files_scripts(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "a.blend").write_bytes(b"BLENDER")
    render = check_render({"blend_file": "a.blend", "frames": "1-3,7", "scene": "S",
                           "camera": "C", "engine": "CYCLES", "samples": 8, "threads": 2,
                           "resolution_percent": 50, "format": "OPEN_EXR"},
                          tmp_path / "p", tmp_path / "out")
    argv = render.argv("blender")
    assert argv[:4] == ["blender", "--background", "--disable-autoexec",
                        str(tmp_path / "p" / "a.blend")]
    assert argv[argv.index("--render-output") + 1] == str(tmp_path / "out" / "frame_####")
    assert argv[argv.index("--render-format") + 1] == "OPEN_EXR"
    assert argv[argv.index("--scene") + 1] == "S"
    assert argv[argv.index("--engine") + 1] == "CYCLES"
    assert argv[argv.index("--threads") + 1] == "2"
    assert argv[-3:-1] == ["1..3,7", "--"]
    assert argv[-4] == "--render-frame"
    assert json.loads(argv[-1]) == {"scene": "S", "camera": "C", "samples": 8,
                                    "resolution_percent": 50, "frames": "1-3,7"}


@pytest.mark.parametrize("output", ["../x", "a/../../x", "/abs_#", "a\\b", "sub/", "a\nb",
                                    "."])
def test_an_output_pattern_cannot_leave_the_jobs_folder(tmp_path: Path, output: str) -> None:
    (tmp_path / "a.blend").write_bytes(b"BLENDER")
    with pytest.raises(JobError, match="data.output: "):
        check_render({"blend_file": "a.blend", "frames": "1", "output": output},
                     tmp_path, tmp_path / "out")


def test_a_link_out_of_the_projects_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret.blend").write_bytes(b"BLENDER")
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "link.blend").symlink_to(tmp_path / "secret.blend")
    with pytest.raises(JobError, match="is outside the projects folder"):
        check_render({"blend_file": "link.blend", "frames": "1"}, tmp_path / "p",
                     tmp_path / "out")


def test_the_projects_setting_reaches_the_plugin_unless_its_own_setting_says(
        tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path, projects="blends"))
    assert plugin_settings(settings, "blender") == {"projects": str(tmp_path / "blends")}
    settings = load_settings(write_config(tmp_path, plugins={"blender": {"projects": "/srv"}}))
    assert plugin_settings(settings, "blender")["projects"] == "/srv"


def test_a_long_range_fits_blenders_command_line(tmp_path: Path) -> None:
    (tmp_path / "a.blend").write_bytes(b"BLENDER")
    argv = check_render({"blend_file": "a.blend", "frames": "0-199999"}, tmp_path,
                        tmp_path / "out").argv("blender")
    assert max(len(arg.encode()) for arg in argv) < 8192  # one argument may hold 128 KiB


def test_a_second_file_of_the_same_frame_is_not_a_second_frame() -> None:
    output, shown, _ = feed_all("Fra:3 Mem:1M | Scene | Sample 4/4\n"
                                "Saved: '/f/depth_0003.exr'\n"
                                "Saved: '/f/frame_0003.png'\n"
                                " Time: 00:00.50 (Saving: 00:00.01)\n")
    assert [(d.frame, d.file, d.render_time_s) for d in output.done] == [
        (3, "/f/depth_0003.exr", 0.5)]
    assert shown[-1] == (50.0, "frame 4 (2/2)")


def test_a_frame_checked_early_is_read_again_only_if_its_file_changed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[str] = []
    read = verify._read
    monkeypatch.setattr(verify, "_read",
                        lambda path, file: reads.append(path.name) or read(path, file))
    frames = {n: tmp_path / f"frame_{n}.png" for n in range(1, 6)}
    for path in frames.values():
        Image.new("RGB", (16, 12), "red").save(path)
    checks = verify.FrameChecks()
    for path in frames.values():
        checks.early(path)
    assert len(reads) == 5
    reads.clear()
    frames[2].write_bytes(frames[2].read_bytes()[:-40])  # cut short
    frames[3].unlink()
    (tmp_path / "other").write_bytes(b"not an image, and longer than the frame was" * 20)
    os.replace(tmp_path / "other", frames[4])  # another file in its place
    frames[5].write_bytes(b"")
    assert checks.final(frames[1]) is None
    assert checks.final(frames[2]).startswith("is not a readable image (")
    assert checks.final(frames[3]) == "was not written"
    assert checks.final(frames[4]).startswith("is not a readable image (")
    assert checks.final(frames[5]) == "is empty"
    assert reads == ["frame_2.png", "frame_4.png"]  # 3 and 5: stat says it all


def test_a_frame_written_to_while_it_is_checked_early_is_checked_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "frame_1.png"
    Image.new("RGB", (16, 12), "red").save(path)
    read = verify._read

    def read_while_written(path: Path, file) -> str | None:
        with open(path, "ab") as more:
            more.write(b"\0")
        return read(path, file)

    monkeypatch.setattr(verify, "_read", read_while_written)
    checks = verify.FrameChecks()
    checks.early(path)
    reads: list[str] = []
    monkeypatch.setattr(verify, "_read",
                        lambda path, file: reads.append(path.name) or read(path, file))
    assert checks.final(path) is None  # a byte after IEND: still a readable image
    assert reads == ["frame_1.png"]
