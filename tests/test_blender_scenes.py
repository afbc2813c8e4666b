"""The .blend files the blender tests render, built by Blender itself (no binary file is kept
in the repository), and the checks that they are what the tests take them for."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

BLENDER = shutil.which("blender")

# Run by `blender --background --factory-startup --python-expr`: Blender's default scene (a
# cube, a camera, a light), made tiny and quick on the CPU, saved under a few variants.
BUILD_SCRIPT = """\
import sys
import bpy
folder, marker = sys.argv[sys.argv.index("--") + 1:]
scene = bpy.context.scene
scene.render.engine = "CYCLES"
scene.cycles.device = "CPU"
scene.cycles.samples = 4
scene.cycles.use_denoising = False
scene.cycles.use_adaptive_sampling = False
scene.render.resolution_x, scene.render.resolution_y = 32, 24
scene.render.resolution_percentage = 100
scene.frame_start, scene.frame_end = 1, 6
camera = bpy.data.objects["Camera"]
second = bpy.data.objects.new("SideCamera", camera.data.copy())
scene.collection.objects.link(second)
bpy.ops.wm.save_as_mainfile(filepath=folder + "/cube.blend", copy=True)

text = bpy.data.texts.new("autorun.py")
text.write("open(%r, 'w').write('ran')\\n" % marker)
text.use_module = True  # registered: runs when the file loads, if scripts may auto-run
bpy.ops.wm.save_as_mainfile(filepath=folder + "/autorun.blend", copy=True)
bpy.data.texts.remove(text)

scene.cycles.samples = 1000000
scene.render.resolution_x, scene.render.resolution_y = 320, 240
bpy.ops.wm.save_as_mainfile(filepath=folder + "/slow.blend", copy=True)

scene.cycles.samples = 4
scene.render.resolution_x, scene.render.resolution_y = 32, 24
scene.camera = None
bpy.data.objects.remove(camera)
bpy.data.objects.remove(second)
bpy.ops.wm.save_as_mainfile(filepath=folder + "/nocamera.blend", copy=True)
"""

SCENES = ("cube.blend", "autorun.blend", "slow.blend", "nocamera.blend")


def need_blender() -> str:
    """Blender's path; the test is skipped without it, or fails where CI is set."""
    if BLENDER is None:
        if os.environ.get("CI"):
            pytest.fail("blender is not installed, and CI must run the blender tests")
        pytest.skip("blender is not installed (Debian: apt-get install blender)")
    return BLENDER


def build_scenes(folder: Path, marker: Path) -> None:
    """Write SCENES into ``folder``; ``autorun.blend`` writes ``marker`` if its script runs."""
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [need_blender(), "--background", "--factory-startup", "--python-exit-code", "1",
         "--python-expr", BUILD_SCRIPT, "--", str(folder), str(marker)],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in SCENES:
        assert (folder / name).is_file(), f"{name} was not built:\n{done.stdout[-3000:]}"


def blender_processes(needle: str) -> list[str]:
    """Command lines of running processes that name ``needle`` (a test's own folder)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as file:
                argv = file.read().split(b"\0")
        except OSError:
            continue  # ended meanwhile
        if needle.encode() in b" ".join(argv) and b"blender" in argv[0]:
            found.append(b" ".join(argv).decode(errors="replace")[:200])
    return found


@pytest.fixture(scope="session")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding SCENES, built once per test session."""
    need_blender()
    folder = tmp_path_factory.mktemp("scenes")
    build_scenes(folder, folder / "autorun-marker")
    return folder


def test_the_autorun_scene_runs_its_script_when_scripts_may_run(scenes: Path,
                                                                tmp_path: Path) -> None:
    # The control for the plugin's test: with auto-run allowed (-y), loading the file writes
    # the marker, so a marker never written under kinod means kinod forbade it.
    marker = scenes / "autorun-marker"
    marker.unlink(missing_ok=True)
    done = subprocess.run([need_blender(), "--background", "--enable-autoexec",
                           str(scenes / "autorun.blend")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout[-2000:]
    assert marker.read_text() == "ran"
    marker.unlink()


def test_the_nocamera_scene_fails_to_render(scenes: Path, tmp_path: Path) -> None:
    done = subprocess.run([need_blender(), "--background", "--disable-autoexec",
                           str(scenes / "nocamera.blend"), "--render-output",
                           str(tmp_path / "f_#"), "--render-frame", "1"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "Error: Cannot render, no camera" in done.stdout
