"""The blender plugin's settings, the paths a job may name, and Blender's command line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kinod.chunks import format_frames, parse_frames
from kinod.params import format_validation_error

FORMATS = {"PNG": "png", "OPEN_EXR": "exr", "JPEG": "jpg"}
ENGINES = ["CYCLES", "BLENDER_EEVEE", "BLENDER_EEVEE_NEXT", "BLENDER_WORKBENCH"]
DEFAULT_OUTPUT = "frame_####"
# Printed by SCENE_SCRIPT before the render: where each frame goes, and Blender's version.
FRAME_TAG = "KINOD_FRAME "
VERSION_TAG = "KINOD_BLENDER "

# Run by Blender once the file is loaded (kinod's own code: Python inside the .blend never
# runs). It sets what Blender's command line cannot, checks the scene and camera, and prints
# the path Blender will write each frame to, so kinod checks exactly those files.
SCENE_SCRIPT = """\
import json, sys
import bpy
o = json.loads(sys.argv[sys.argv.index("--") + 1])
def fail(text):
    print("Error: " + text, flush=True)
    sys.exit(3)
print("KINOD_BLENDER " + bpy.app.version_string, flush=True)
scene = bpy.context.scene
if o["scene"] is not None and scene.name != o["scene"]:
    fail("no scene %r in the file (scenes: %s)" % (o["scene"], ", ".join(bpy.data.scenes.keys())))
r = scene.render
r.use_file_extension = True
if o["camera"] is not None:
    camera = bpy.data.objects.get(o["camera"])
    if camera is None or camera.type != "CAMERA":
        fail("no camera %r in the file" % o["camera"])
    scene.camera = camera
if o["resolution_percent"] is not None:
    r.resolution_percentage = o["resolution_percent"]
if o["samples"] is not None:
    if r.engine == "CYCLES":
        scene.cycles.samples = o["samples"]
    elif r.engine.startswith("BLENDER_EEVEE"):
        scene.eevee.taa_render_samples = o["samples"]
for part in o["frames"].split(","):
    first, _, last = part.partition("-")
    for frame in range(int(first), int(last or first) + 1):
        print("KINOD_FRAME %d %s" % (frame, r.frame_path(frame=frame)), flush=True)
"""


class BlenderSettings(BaseModel):
    """``plugins.blender``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    executable: str = "blender"
    # kinod passes the top-level `projects` setting here unless plugins.blender sets it;
    # without either, the `projects` folder beside the models folder.
    projects: Path | None = None
    # Blender's status lines (Fra:..., Sample ...) go into the job's log at most this often.
    log_interval_s: float = Field(default=5.0, ge=0)

    @classmethod
    def from_plugin(cls, settings: dict[str, Any]) -> Self:
        try:
            return cls.model_validate(settings)
        except ValidationError as exc:
            raise JobError("; ".join(format_validation_error(exc, "plugins.blender"))) from None


class JobError(Exception):
    """A job that cannot run as asked: the message is the job's error."""


@dataclass(frozen=True)
class Render:
    """One job's render, checked: what Blender is told."""

    blend_file: Path
    frames: list[int]
    output: Path  # the absolute pattern handed to -o
    file_format: str
    engine: str | None
    samples: int | None
    resolution_percent: int | None
    scene: str | None
    camera: str | None
    threads: int | None

    def argv(self, executable: str) -> list[str]:
        """Blender's command line. Its options act in order: the file, then what changes the
        scene, then ``-f``, which renders; the scene script's own values follow ``--``."""
        argv = [executable, "--background", "--disable-autoexec", str(self.blend_file)]
        if self.scene is not None:
            argv += ["--scene", self.scene]
        if self.engine is not None:
            argv += ["--engine", self.engine]
        argv += ["--render-output", str(self.output), "--render-format", self.file_format]
        if self.threads is not None:
            argv += ["--threads", str(self.threads)]
        options = {"scene": self.scene, "camera": self.camera, "samples": self.samples,
                   "resolution_percent": self.resolution_percent,
                   # As ranges: one argument may not exceed 128 KiB (Linux's MAX_ARG_STRLEN).
                   "frames": format_frames(self.frames)}
        argv += ["--python-exit-code", "3", "--python-expr", SCENE_SCRIPT,
                 "--render-frame", format_frames(self.frames, ".."),
                 "--", json.dumps(options)]
        return argv


def check_render(data: dict[str, Any], projects: Path, output_dir: Path) -> Render:
    """The job's data as a ``Render``, or JobError naming what is wrong."""
    try:
        frames = parse_frames(data.get("frames"))
    except ValueError as exc:
        raise JobError(f"data.frames: {exc}") from None
    return Render(
        blend_file=_blend_file(data.get("blend_file"), projects),
        frames=frames,
        output=output_dir / _output_pattern(data.get("output") or DEFAULT_OUTPUT),
        file_format=data.get("format") or "PNG",
        engine=data.get("engine"), samples=data.get("samples"),
        resolution_percent=data.get("resolution_percent"), scene=data.get("scene"),
        camera=data.get("camera"), threads=data.get("threads"))


def _blend_file(name: Any, projects: Path) -> Path:
    if not isinstance(name, str) or not name.strip():
        raise JobError("data.blend_file: the path of a .blend file in the projects folder "
                       "is required")
    if "\0" in name:
        raise JobError("data.blend_file: must not hold a NUL character")
    root = projects.resolve()
    path = (root / name).resolve()  # links followed: where it really is counts
    if root not in path.parents:
        raise JobError(f"data.blend_file: {name!r} is outside the projects folder")
    if not path.is_file():
        raise JobError(f"data.blend_file: no file {name!r} in the projects folder {projects}")
    return path


def _output_pattern(pattern: Any) -> str:
    """The output pattern, relative to the job's folder; it can never leave it."""
    if not isinstance(pattern, str):
        raise JobError("data.output: must be text such as frame_####")
    parts = PurePosixPath(pattern).parts
    if (pattern.startswith(("/", "//")) or "\\" in pattern or not parts
            or any(part in (".", "..") for part in parts)
            or not pattern.isprintable() or pattern.endswith("/")):
        raise JobError(f"data.output: {pattern!r} must be a relative file pattern inside the "
                       "job's folder, such as frame_#### or beauty/frame_####")
    return pattern
