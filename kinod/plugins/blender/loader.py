"""The blender plugin: renders a frame range of a .blend file with Blender's command line.

Blender runs headless (``--background``) in a process group of its own, never running the
Python a .blend file holds (``--disable-autoexec``). Its output is read as it renders for
progress (frames done, plus the samples of the current frame) and for the job's log; the job
succeeds only once every frame it asked for is a readable image in ``data/frames/<id>/``.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

from loguru import logger

from kinod.plugins.base_plugin import BasePlugin, PluginResult, ProgressCallback

from .command import DEFAULT_OUTPUT, ENGINES, FORMATS, BlenderSettings, JobError, check_render
from .output import BlenderOutput
from .process import BlenderProcess
from .verify import FrameChecks

STOPPED = "stopped on request"

PARAMETERS: dict[str, dict[str, Any]] = {
    "blend_file": {"type": "string", "required": True,
                   "description": "The .blend file, a path in the projects folder"},
    "frames": {"type": "any", "required": True,
               "description": 'Frames to render: "1-250", "1,5,10-20", or one frame'},
    "output": {"type": "string", "default": DEFAULT_OUTPUT,
               "description": "File pattern inside data/frames/<id>/; the last run of # is "
                              "the frame number"},
    "format": {"type": "string", "default": "PNG", "enum": list(FORMATS),
               "description": "Image format"},
    "engine": {"type": "string", "enum": ENGINES,
               "description": "Render engine (default: the file's)"},
    "samples": {"type": "integer", "minimum": 1, "maximum": 1_000_000,
                "description": "Samples per pixel, Cycles or Eevee (default: the file's)"},
    "resolution_percent": {"type": "integer", "minimum": 1, "maximum": 1000,
                           "description": "Resolution scale in percent (default: the file's)"},
    "scene": {"type": "string", "description": "Scene to render (default: the file's)"},
    "camera": {"type": "string", "description": "Camera object (default: the scene's)"},
    "threads": {"type": "integer", "minimum": 0, "maximum": 1024,
                "description": "Render threads, 0 for every core (default: the file's)"},
}


class BlenderPlugin(BasePlugin):
    """Renders frames of a .blend file with Blender."""

    def __init__(self) -> None:
        super().__init__()
        self._process: BlenderProcess | None = None

    async def generate(self, task_id: str, data: dict[str, Any],
                       progress_callback: ProgressCallback | None = None) -> PluginResult:
        self.is_running = True
        try:
            return await self._render(task_id, data, progress_callback)
        except JobError as exc:
            return PluginResult(success=False, error=str(exc))
        finally:
            self.is_running = False

    async def _render(self, task_id: str, data: dict[str, Any],
                      progress_callback: ProgressCallback | None) -> PluginResult:
        settings = BlenderSettings.from_plugin(self.settings)
        render = check_render(data, self._projects(settings), self._job_folder())
        argv = render.argv(settings.executable)
        output = BlenderOutput(render.frames, _job_log, settings.log_interval_s)
        logger.info("blender job {}: {} frame(s) of {}", task_id, len(render.frames),
                    render.blend_file.name)
        if self.should_stop:
            return PluginResult(success=False, error=STOPPED)
        self.update_progress(0.0, progress_callback, output.message())
        begun = time.monotonic()
        process = BlenderProcess(argv, self._job_folder())
        try:
            await process.start()
        except OSError as exc:
            raise JobError(f"cannot run Blender ({settings.executable}): "
                           f"{exc.strerror or exc}") from None
        self._process = process
        checks, saved, root = FrameChecks(), 0, self._job_folder().resolve()
        try:
            if self.should_stop:  # asked while it started: stop() found no process yet
                process.signal_group(signal.SIGTERM)
            async for line in process.lines():
                if output.feed(line):
                    self.update_progress(output.percent(), progress_callback,
                                         output.message())
                    while saved < len(output.done):  # checked while Blender renders on
                        _check_early(output.done[saved].frame, output, root, checks)
                        saved += 1
            code = await process.wait()
        finally:
            await process.finish()
        elapsed_s = time.monotonic() - begun
        if self.should_stop:
            return PluginResult(success=False, error=STOPPED)
        if code != 0:
            return PluginResult(success=False, error=_failure(code, output))
        frames = self._check_frames(render.frames, output, checks, root)
        logger.info("blender job {}: {} frame(s) in {:.1f} s", task_id, len(frames), elapsed_s)
        return PluginResult(success=True, data={
            "frames": frames,
            "output_dir": str(self._job_folder()),
            "blender_version": output.version,
            "command": argv,
            "render_time_s": round(elapsed_s, 3),
        })

    def _check_frames(self, frames: list[int], output: BlenderOutput, checks: FrameChecks,
                      root: Path) -> list[dict[str, Any]]:
        """Every frame asked for, as a readable image inside the job's folder. Those checked
        as Blender saved them are read again only if their file changed since. ``root``:
        the job's folder, resolved."""
        times = {done.frame: done.render_time_s for done in output.done}
        checked: list[dict[str, Any]] = []
        for frame in frames:
            path = _frame_path(frame, output, root)
            problem = checks.final(path)
            if problem is not None:
                raise JobError(f"frame {frame}: {path.relative_to(root)} {problem}")
            checked.append({"frame": frame, "file": str(path.relative_to(root)),
                            "render_time_s": times.get(frame)})
        return checked

    def _projects(self, settings: BlenderSettings) -> Path:
        if settings.projects is not None:
            return settings.projects
        if self.models_dir is None:
            raise JobError("the models folder is not set (kinod sets it before generate())")
        return Path(self.models_dir).parent / "projects"

    def _job_folder(self) -> Path:
        if self.output_dir is None:
            raise JobError("output_dir is set by kinod before generate()")
        return Path(self.output_dir)

    async def stop(self) -> None:
        # Blender ends on SIGTERM at once; kinod cancels generate() after the stop grace,
        # and the cancel kills the group (SIGKILL) before generate() lets go.
        self.should_stop = True
        self.is_running = False
        if self._process is not None:
            self._process.signal_group(signal.SIGTERM)

    @classmethod
    def get_plugin_info(cls) -> dict[str, Any]:
        return {
            "name": "blender",
            "version": "1.0.0",
            "description": "Renders frames of a .blend file with Blender's command line",
            "author": "kinod",
            "parameters": PARAMETERS,
        }


def _check_early(frame: int, output: BlenderOutput, root: Path, checks: FrameChecks) -> None:
    """Check a frame Blender has just saved; what is wrong is said once it has ended."""
    try:
        checks.early(_frame_path(frame, output, root))
    except JobError:
        pass


def _frame_path(frame: int, output: BlenderOutput, root: Path) -> Path:
    """Where ``frame`` is, resolved: inside ``root``, the job's folder, resolved."""
    reported = output.paths.get(frame)
    if reported is None:
        raise JobError(f"frame {frame}: Blender did not say where it would write it")
    path = Path(reported).resolve()
    if root not in path.parents:
        raise JobError(f"frame {frame}: Blender wrote it outside the job's folder ({reported})")
    return path


def _job_log(level: str, line: str) -> None:
    logger.log(level, "blender: {}", line)


def _failure(code: int, output: BlenderOutput) -> str:
    """Why Blender failed, in one line: its last ``Error:`` line, and how it ended."""
    if code < 0:
        try:
            how = f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed by signal {-code}"
    else:
        how = f"exited with code {code}"
    done = f"{len(output.done)} of {len(output.frames)} frame(s) written"
    if output.last_error:
        return f"Blender {how}: {output.last_error} ({done})"
    return f"Blender {how} ({done})"
