"""One sdxl job on ComfyUI: choose a server, post the workflow, follow it, save the images."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loguru import logger
from pydantic import ValidationError

from .comfyui_client import ComfyUIClient, EventStream, new_http_client
from .errors import ExecutionFailed, Interrupted, OutputMissing
from .explain import describe_failure, one_line
from .messages import HistoryEntry, ImageRef, NodeFailureData
from .outputs import save_images
from .parameters import JobParams
from .servers import SdxlSettings, ServerClaim, queue_lengths
from .tracking import PromptTracker, Report
from .workflow import build_txt2img, filename_prefix_for


class ComfyJob:
    """Runs one job; ``run()`` returns the result's data, or None once stopped on request."""

    def __init__(self, task_id: str, params: JobParams, settings: SdxlSettings,
                 output_path: Callable[[str], Path], stop_requested: Callable[[], bool],
                 report: Report, clock: Callable[[], float] = time.monotonic) -> None:
        self.task_id = task_id
        self.params = params
        self.settings = settings
        self._output_path = output_path
        self._stop_requested = stop_requested
        self._report = report
        self._clock = clock
        self._client_id = str(uuid.uuid4())

    async def run(self) -> dict[str, Any] | None:
        begun = self._clock()
        if self._stop_requested():
            return None
        timeout_s = self.settings.request_timeout_s
        async with new_http_client(timeout_s) as http:
            lengths = await queue_lengths(http, self.settings.comfyui_urls, timeout_s)
            claim = ServerClaim.least_busy(lengths)
            try:
                stream = await self._open_stream(claim.url)
                try:
                    return await self._run_on(ComfyUIClient(claim.url, http), stream, claim,
                                              begun)
                finally:
                    if stream is not None:
                        await stream.close()
            finally:
                claim.release()

    async def _open_stream(self, url: str) -> EventStream | None:
        try:
            return await EventStream.open(url, self._client_id, self.settings.request_timeout_s)
        except Exception as exc:  # noqa: BLE001 - any failure: the job can go on by polling
            logger.warning("no websocket to {} ({}); following the prompt through /history",
                           url, one_line(str(exc)) or type(exc).__name__)
            return None

    async def _run_on(self, client: ComfyUIClient, stream: EventStream | None,
                      claim: ServerClaim, begun: float) -> dict[str, Any] | None:
        if self._stop_requested():
            return None
        workflow = build_txt2img(self.params, filename_prefix_for(self.task_id))
        prompt_id = await client.submit(workflow, self._client_id)
        claim.release()  # now counted in the server's own queue
        posted = self._clock()
        logger.info("prompt {} queued on {} (seed {})", prompt_id, client.url, self.params.seed)
        self._report(None, f"queued on {client.url}")
        tracker = PromptTracker(client, prompt_id, self.settings, self._stop_requested,
                                self._report, self._clock)
        entry = await tracker.follow(stream)
        if entry is None or self._stop_requested():  # a stop that came as it ended: no images
            return None
        ended = self._clock()
        images = _images_of(entry, tracker.failure, client.url, prompt_id)
        self._report(None, f"saving {len(images)} image(s)")
        names = await save_images(client, images, prompt_id, self._output_path)
        saved = self._clock()
        started = tracker.started_at
        return {
            "images": names,
            "output_dir": str(self._output_path(".")),
            "seed": self.params.seed,
            "parameters": self.params.as_dict(),
            "prompt_id": prompt_id,
            "server": client.url,
            "timings": {
                "queued_s": _seconds(posted, started),
                "generation_s": _seconds(started, ended),
                "download_s": _seconds(ended, saved),
                "total_s": _seconds(begun, saved),
            },
        }


def _images_of(entry: HistoryEntry, ws_failure: NodeFailureData | None, url: str,
               prompt_id: str) -> list[ImageRef]:
    """The images of a prompt that ended; raises why there are none."""
    status = entry.status
    if status is not None and status.status_str not in (None, "success"):
        if status.message("execution_interrupted") is not None:
            raise Interrupted(f"ComfyUI at {url} interrupted prompt {prompt_id}, though this job "
                              "did not ask it to (someone interrupted it on the server)")
        failure = ws_failure
        recorded = status.message("execution_error")
        if recorded is not None:
            try:
                failure = NodeFailureData.model_validate(recorded)
            except ValidationError:
                pass
        raise ExecutionFailed(describe_failure(url, failure))
    if not entry.images:
        raise OutputMissing(f"ComfyUI at {url} finished prompt {prompt_id} but lists no images")
    return entry.images


def _seconds(start: float | None, end: float | None) -> float | None:
    if start is None or end is None:
        return None
    return round(max(0.0, end - start), 3)
