"""The comfyui plugin: any ComfyUI workflow saved in API format, run on a ComfyUI server.

It shares the sdxl plugin's machinery (servers, the client, following a prompt, stopping it);
only the graph and the files it saves are its own. Nothing connects anywhere until
``generate()`` runs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from loguru import logger

from kinod.plugins.base_plugin import BasePlugin, PluginResult, ProgressCallback
from kinod.plugins.sdxl.comfyui_client import ComfyUIClient, new_http_client
from kinod.plugins.sdxl.errors import InvalidJob, SdxlError
from kinod.plugins.sdxl.job import ComfyJob, check_outcome, timings
from kinod.plugins.sdxl.results import plugin_result
from kinod.plugins.sdxl.servers import SdxlSettings

from .files import image_sources, save_outputs, upload_images
from .node_types import check_against_server
from .workflows import apply_inputs, check_classes, load_workflow, randomize_seeds

PARAMETERS: dict[str, dict[str, Any]] = {
    "workflow": {"type": "string", "required": True,
                 "description": "An API-format workflow file in the workflows folder"},
    "inputs": {"type": "object", "default": {},
               "description": 'Overrides: {"<node id or title>.<input>": value}'},
    "images": {"type": "object", "default": {},
               "description": "LoadImage node (id or title) -> an image file under the "
                              "frames or models folder, uploaded to the server"},
    "randomize_seeds": {"type": "boolean", "default": True,
                        "description": "Give every seed input the job does not set a fresh "
                                       "value (the result records each)"},
}


class ComfySettings(SdxlSettings):
    """``plugins.comfyui``: the sdxl plugin's keys, and where the workflows are."""

    # kinod passes the top-level `workflows` setting here (kinod.runner.plugin_settings)
    # unless plugins.comfyui sets it; without either, the folder beside the models folder.
    workflows: Path | None = None


class ComfyuiPlugin(BasePlugin):
    """Any API-format ComfyUI workflow."""

    async def generate(self, task_id: str, data: dict[str, Any],
                       progress_callback: ProgressCallback | None = None) -> PluginResult:
        return await plugin_result(
            self, "comfyui", task_id, lambda: self._generate(task_id, data, progress_callback),
            progress_callback, lambda data_out: f"{len(data_out['files'])} file(s)")

    async def _generate(self, task_id: str, data: dict[str, Any],
                        progress_callback: ProgressCallback | None) -> dict[str, Any] | None:
        begun = time.monotonic()
        settings = ComfySettings.from_plugin(self.settings, "comfyui")
        for key, kind in (("inputs", dict), ("images", dict)):
            if not isinstance(data.get(key, {}), kind):
                raise InvalidJob(f"data.{key}: must be an object")
        name = data.get("workflow")
        if not isinstance(name, str):
            raise InvalidJob("data.workflow: the name of a workflow file is required")
        workflow = load_workflow(self._workflows_folder(settings), name)
        # Checked before a server is chosen: a bad job never reaches one.
        chosen = apply_inputs(workflow, data.get("inputs") or {})
        sources = image_sources(workflow, data.get("images") or {}, self._image_folders())
        seeds = randomize_seeds(workflow, chosen, data.get("randomize_seeds", True))
        uploaded: dict[str, str] = {}

        def check(info: dict[str, Any]) -> None:
            check_classes(workflow, info)
            apply_inputs(workflow, data.get("inputs") or {}, info)

        async def prepare(client: ComfyUIClient) -> dict[str, Any]:
            try:
                await check_against_server(client, check)
            except InvalidJob:
                raise
            except SdxlError as exc:  # the post will tell; the checks need a readable answer
                logger.warning("could not read {}'s node types: {}", client.url, exc)
            uploaded.update(await upload_images(client, workflow, sources))
            return workflow

        def report(percent: float | None, message: str, *,
                   waiting: bool | None = None) -> None:
            self.update_progress(self.progress if percent is None else percent,
                                 progress_callback, message, waiting=waiting)

        logger.info("comfyui job {}: workflow {}, seeds {}", task_id, name, seeds)
        job = ComfyJob(task_id, None, settings, self.output_path, lambda: self.should_stop,
                       report, node_count=len(workflow))
        async with new_http_client(settings.request_timeout_s) as http:
            done = await job.run_prompt(http, prepare)
            if done is None:
                return None
            check_outcome(done.entry, done.failure, done.client.url)
            report(None, "saving the outputs")
            files = await save_outputs(done.client, done.entry, done.prompt_id,
                                       self.output_path)
        return {
            "files": files,
            "output_dir": str(self.output_path(".")),
            "workflow": name,
            "inputs": chosen,
            "images": uploaded,
            "seeds": seeds,
            "prompt_id": done.prompt_id,
            "server": done.client.url,
            "timings": timings(done, begun, time.monotonic()),
        }

    def _workflows_folder(self, settings: ComfySettings) -> Path:
        if settings.workflows is not None:
            return settings.workflows
        if self.models_dir is None:
            raise InvalidJob("the models folder is not set (kinod sets it before generate())")
        return Path(self.models_dir).parent / "workflows"

    def _image_folders(self) -> list[Path]:
        folders = [Path(self.models_dir)] if self.models_dir is not None else []
        if self.output_dir is not None:
            folders.append(Path(self.output_dir).parent)  # the frames folder
        return folders

    async def stop(self) -> None:
        # generate() sees the flag within a tenth of a second and takes the prompt off the
        # server: deleted while queued, interrupted while running.
        self.should_stop = True

    @classmethod
    def get_plugin_info(cls) -> dict[str, Any]:
        return {
            "name": "comfyui",
            "version": "1.0.0",
            "description": "Any API-format ComfyUI workflow through a ComfyUI server",
            "author": "kinod",
            "parameters": {k: dict(v) for k, v in PARAMETERS.items()},
        }
