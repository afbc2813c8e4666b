"""The sdxl plugin: Stable Diffusion XL images from a ComfyUI server.

Nothing here connects anywhere until ``generate()`` runs: listing plugins needs no server.
"""

from __future__ import annotations

import copy
from typing import Any

from loguru import logger

from kinod.plugins.base_plugin import BasePlugin, PluginResult, ProgressCallback

from .checkpoints import require_checkpoint
from .errors import SdxlError
from .explain import one_line
from .job import ComfyJob
from .parameters import PARAMETERS, check_parameters
from .servers import SdxlSettings

STOPPED = "stopped on request"


class SdxlPlugin(BasePlugin):
    """Stable Diffusion XL through ComfyUI."""

    async def generate(self, task_id: str, data: dict[str, Any],
                       progress_callback: ProgressCallback | None = None) -> PluginResult:
        self.is_running = True
        # should_stop is not reset here: kinod may have set it before generate() began.
        try:
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
            data_out = await job.run()
        except SdxlError as exc:
            return PluginResult(success=False, error=str(exc), retryable=exc.retryable)
        except Exception as exc:  # noqa: BLE001 - the job's error is one readable line
            logger.opt(exception=exc).error("sdxl job {} failed unexpectedly", task_id)
            return PluginResult(success=False, error=f"unexpected {type(exc).__name__}: "
                                                             f"{one_line(str(exc))}")
        finally:
            self.is_running = False
        if data_out is None:
            return PluginResult(success=False, error=STOPPED)
        self.update_progress(100.0, progress_callback, f"{len(data_out['images'])} image(s)")
        return PluginResult(success=True, data=data_out)

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
