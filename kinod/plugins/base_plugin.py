"""The plugin contract every generator implements (kept as in the seed).

A plugin is a subclass of ``BasePlugin`` living in ``<plugin folder>/loader.py``.
kinod creates one instance per job, sets ``output_dir`` and ``settings`` on it,
then awaits ``generate()``. ``stop()`` may be awaited while ``generate()`` runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ProgressCallback = Callable[..., None]


@dataclass
class PluginResult:
    """What ``generate()`` returns.

    ``retryable`` (a kinod addition, default False) marks a failure worth running
    again when the job asked for ``retries``.
    """

    success: bool
    data: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    retryable: bool = False


class BasePlugin:
    """Base class of all generator plugins."""

    def __init__(self) -> None:
        self.is_running = False
        self.should_stop = False
        self.progress = 0.0
        # Set by kinod before generate(): the job's own output folder
        # (data/frames/<id>/, see ``output_dir``), this plugin's settings from
        # config.yaml (plugins.<name>) and the models folder (models_storage/).
        self.output_dir = None
        self.settings: dict[str, Any] = {}
        self.models_dir: Path | None = None

    @property
    def output_dir(self) -> Path | None:
        """The job's own output folder, made the first time it is asked for: a job whose
        plugin writes nothing there makes no folder (on some file systems, the dearest
        thing a job would make)."""
        folder = self.__dict__.get("_output_dir")
        if folder is not None and not self.__dict__.get("_output_dir_made"):
            os.makedirs(folder, exist_ok=True)
            self._output_dir_made = True
        return folder

    @output_dir.setter
    def output_dir(self, folder: Path | None) -> None:
        self._output_dir = folder
        self._output_dir_made = False

    async def generate(
        self,
        task_id: str,
        data: dict[str, Any],
        progress_callback: ProgressCallback | None = None,
    ) -> PluginResult:
        """Run one job; report progress through ``update_progress``."""
        raise NotImplementedError

    async def stop(self) -> None:
        """Ask the running ``generate()`` to end soon."""
        self.should_stop = True
        self.is_running = False

    def update_progress(
        self,
        value: float,
        callback: ProgressCallback | None = None,
        message: str | None = None,
        *,
        waiting: bool | None = None,
    ) -> None:
        """Record progress (0 to 100) and pass it on; ``message`` is optional status text.

        ``waiting`` (a kinod addition; optional): True while the job waits for something
        outside kinod before its work begins (e.g. a turn in a server's queue), False once
        the work begins. The job's ``timeout`` and ``stall_timeout`` are held while it
        waits and count from the moment it stops waiting. A plugin that never says so is
        timed from its start, as always. Passed on only to callbacks that take it (kinod's
        do: they have ``accepts_waiting``).
        """
        self.progress = max(0.0, min(100.0, float(value)))
        if callback is not None:
            if waiting is not None and getattr(callback, "accepts_waiting", False):
                callback(self.progress, message, waiting=waiting)
            elif message is None:
                callback(self.progress)
            else:
                callback(self.progress, message)

    def output_path(self, *parts: str) -> Path:
        """A path inside this job's output folder; refuses anything that would leave it."""
        if self.output_dir is None:
            raise RuntimeError("output_dir is set by kinod before generate()")
        root = self.output_dir.resolve()
        path = root.joinpath(*parts).resolve()
        if path != root and root not in path.parents:
            raise ValueError(f"output path {'/'.join(parts)!r} leaves the job's folder")
        return path

    @classmethod
    def get_plugin_info(cls) -> dict[str, Any]:
        """Name, version, description, author and declared ``parameters``."""
        return {
            "name": cls.__name__,
            "version": "0.0.0",
            "description": (cls.__doc__ or "").strip(),
            "parameters": {},
        }
