"""One job on ComfyUI: choose a server, post the workflow, follow it, save what it made."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger
from pydantic import ValidationError

from .comfyui_client import ComfyUIClient, EventStream, new_http_client
from .errors import (
    ExecutionFailed,
    Interrupted,
    OutputMissing,
    PromptLost,
    UnexpectedAnswer,
    Unreachable,
)
from .explain import describe_failure, one_line
from .messages import HistoryEntry, ImageRef, NodeFailureData
from .outputs import save_images
from .parameters import JobParams
from .servers import SdxlSettings
from .slots import ServerClaim, claim_server
from .tracking import PromptTracker, Report
from .workflow import build_txt2img, filename_prefix_for

if TYPE_CHECKING:
    import httpx


Prepare = Callable[[ComfyUIClient], Awaitable[dict[str, Any]]]


@dataclass
class FinishedPrompt:
    """A prompt that ran to its end on ``client``'s server; its files are not fetched yet."""

    client: ComfyUIClient
    prompt_id: str
    entry: HistoryEntry
    failure: NodeFailureData | None
    posted: float
    started: float | None
    ended: float


class ComfyJob:
    """Runs one job; ``run()`` returns the result's data, or None once stopped on request.

    The sdxl plugin and the comfyui plugin share it: ``run_prompt()`` chooses a server, posts
    the graph that ``prepare`` makes for it and follows the prompt to its end.
    """

    def __init__(self, task_id: str, params: JobParams | None, settings: SdxlSettings,
                 output_path: Callable[[str], Path], stop_requested: Callable[[], bool],
                 report: Report, clock: Callable[[], float] = time.monotonic,
                 node_count: int | None = None) -> None:
        self.task_id = task_id
        self.params = params
        self.settings = settings
        self._output_path = output_path
        self._stop_requested = stop_requested
        self._report = report
        self._clock = clock
        self._node_count = node_count  # set: progress is over all nodes, not the sampler's

    async def run(self) -> dict[str, Any] | None:
        """The sdxl job: its txt2img graph, its images and its result."""
        params = self.params
        assert params is not None
        begun = self._clock()

        async def prepare(client: ComfyUIClient) -> dict[str, Any]:
            return build_txt2img(params, filename_prefix_for(self.task_id))

        async with new_http_client(self.settings.request_timeout_s) as http:
            done = await self.run_prompt(http, prepare)
            if done is None:
                return None
            images = _images_of(done.entry, done.failure, done.client.url, done.prompt_id)
            self._report(None, f"saving {len(images)} image(s)")
            names = await save_images(done.client, images, done.prompt_id, self._output_path)
        return {
            "images": names,
            "output_dir": str(self._output_path(".")),
            "seed": params.seed,
            "parameters": params.as_dict(),
            "prompt_id": done.prompt_id,
            "server": done.client.url,
            "timings": timings(done, begun, self._clock()),
        }

    async def run_prompt(self, http: httpx.AsyncClient, prepare: Prepare) -> FinishedPrompt | None:
        """Post the graph ``prepare`` makes to the least busy server with room (waiting for one
        while each has ``queue_ahead`` prompts waiting) and follow it to its end; None once
        stopped on request."""
        if self._stop_requested():
            return None
        # Until the prompt starts on a server, the job waits: kinod's clocks do not run.
        self._report(None, "choosing a server", waiting=True)
        claim = await claim_server(http, self.settings, self._stop_requested, self._report,
                                   clock=self._clock)
        if claim is None:
            return None
        handoff = True
        try:
            client = ComfyUIClient(claim.url, http)
            workflow = await prepare(client)
            stream = await self._open_stream(claim.url)
            try:
                return await self._run_on(client, stream, claim, workflow)
            finally:
                if stream is not None:
                    await stream.close()
        except (Unreachable, PromptLost, UnexpectedAnswer):
            handoff = False  # the server failed: no job in line is handed it
            raise
        finally:
            claim.release(handoff)

    async def _open_stream(self, url: str) -> EventStream | None:
        try:
            return await EventStream.open(url, self.settings.request_timeout_s)
        except Exception as exc:  # noqa: BLE001 - any failure: the job can go on by polling
            logger.warning("no websocket to {} ({}); following the prompt through /history",
                           url, one_line(str(exc)) or type(exc).__name__)
            return None

    async def _run_on(self, client: ComfyUIClient, stream: EventStream | None,
                      claim: ServerClaim, workflow: dict[str, Any]) -> FinishedPrompt | None:
        if self._stop_requested():
            return None
        # Each socket has a clientId of its own (two sockets with one id silence each other);
        # without a socket, a fresh id that no socket listens on.
        client_id = stream.client_id if stream is not None else str(uuid.uuid4())
        prompt_id = await client.submit(workflow, client_id, str(uuid.uuid4()))
        claim.posted()  # now counted in the server's own queue
        posted = self._clock()
        logger.info("prompt {} queued on {}", prompt_id, client.url)
        self._report(None, f"queued on {client.url}")
        tracker = PromptTracker(client, prompt_id, self.settings, self._stop_requested,
                                self._report, self._clock, node_count=self._node_count,
                                on_started=claim.release)  # its place goes to the next job
        entry = await tracker.follow(stream)
        if entry is None or self._stop_requested():  # a stop that came as it ended: no files
            return None
        return FinishedPrompt(client, prompt_id, entry, tracker.failure, posted,
                              tracker.started_at, self._clock())


def timings(done: FinishedPrompt, begun: float, saved: float) -> dict[str, float | None]:
    return {
        "queued_s": _seconds(done.posted, done.started),
        "generation_s": _seconds(done.started, done.ended),
        "download_s": _seconds(done.ended, saved),
        "total_s": _seconds(begun, saved),
    }


def check_outcome(entry: HistoryEntry, ws_failure: NodeFailureData | None, url: str) -> None:
    """Raises why a prompt that ended did not succeed."""
    status = entry.status
    if status is not None and status.status_str not in (None, "success"):
        if status.message("execution_interrupted") is not None:
            raise Interrupted(f"ComfyUI at {url} interrupted the prompt, though this job "
                              "did not ask it to (someone interrupted it on the server)")
        failure = ws_failure
        recorded = status.message("execution_error")
        if recorded is not None:
            try:
                failure = NodeFailureData.model_validate(recorded)
            except ValidationError:
                pass
        raise ExecutionFailed(describe_failure(url, failure))


def _images_of(entry: HistoryEntry, ws_failure: NodeFailureData | None, url: str,
               prompt_id: str) -> list[ImageRef]:
    """The images of a prompt that ended; raises why there are none."""
    check_outcome(entry, ws_failure, url)
    if not entry.images:
        raise OutputMissing(f"ComfyUI at {url} finished prompt {prompt_id} but lists no images")
    return entry.images


def _seconds(start: float | None, end: float | None) -> float | None:
    if start is None or end is None:
        return None
    return round(max(0.0, end - start), 3)
