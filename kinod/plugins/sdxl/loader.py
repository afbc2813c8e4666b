"""The sdxl plugin: Stable Diffusion XL images from a ComfyUI server.

Nothing here connects anywhere until ``generate()`` runs: listing plugins needs no server.
"""

from __future__ import annotations

import copy
from typing import Any

from loguru import logger

from kinod.plugins.base_plugin import BasePlugin, PluginResult, ProgressCallback

from .checkpoints import require_checkpoint
from .job import ComfyJob
from .parameters import PARAMETERS, check_parameters
from .results import plugin_result
from .servers import SdxlSettings


class SdxlPlugin(BasePlugin):
    """Stable Diffusion XL through ComfyUI."""

    async def generate(self, task_id: str, data: dict[str, Any],
                       progress_callback: ProgressCallback | None = None) -> PluginResult:
        # should_stop is not reset here: kinod may have set it before generate() began.
        return await plugin_result(
            self, "sdxl", task_id, lambda: self._generate(task_id, data, progress_callback),
            progress_callback, lambda data_out: f"{len(data_out['images'])} image(s)")

    async def _generate(self, task_id: str, data: dict[str, Any],
                        progress_callback: ProgressCallback | None) -> dict[str, Any] | None:
        settings = SdxlSettings.from_plugin(self.settings)
        params = check_parameters(data)
        require_checkpoint(self.models_dir, params.model_name)
        logger.info("sdxl job {}: seed {}", task_id, params.seed)

        def report(percent: float | None, message: str, *,
                   waiting: bool | None = None) -> None:
            self.update_progress(self.progress if percent is None else percent,
                                 progress_callback, message, waiting=waiting)

        job = ComfyJob(task_id, params, settings, self.output_path,
                       lambda: self.should_stop, report)
        return await job.run()

    async def stop(self) -> None:
        # generate() sees the flag within a tenth of a second and takes the prompt off the
        # server: deleted while queued, interrupted while running.
        self.should_stop = True

    @classmethod
    def get_plugin_info(cls) -> dict[str, Any]:
        return {
            "name": "sdxl",
            "version": "1.0.0",
            "description": "Stable Diffusion XL images through a ComfyUI server",
            "author": "kinod",
            "parameters": copy.deepcopy(PARAMETERS),
        }
