"""ComfyUI's answers, read through small models: websocket messages, /prompt, /queue, /history.

Every model allows extra keys (servers add fields between versions); what this plugin needs is
checked, what it does not know is ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from loguru import logger
from pydantic import BaseModel, ConfigDict, RootModel


class _Answer(BaseModel):
    model_config = ConfigDict(extra="allow")


# --- websocket messages ------------------------------------------------------------------

class WsMessage(_Answer):
    type: str
    data: dict[str, Any] = {}


class ProgressData(_Answer):
    value: float
    max: float
    prompt_id: str | None = None
    node: str | None = None


class ExecutingData(_Answer):
    node: str | None = None
    prompt_id: str | None = None


class PromptEventData(_Answer):
    prompt_id: str | None = None


class CachedData(_Answer):
    prompt_id: str | None = None
    nodes: list[str] = []


class NodeFailureData(_Answer):
    """``execution_error`` and ``execution_interrupted``."""

    prompt_id: str | None = None
    node_id: str | None = None
    node_type: str | None = None
    exception_message: str = ""
    exception_type: str = ""


@dataclass(frozen=True)
class Progress:
    prompt_id: str
    value: float
    maximum: float
    node: str | None = None


@dataclass(frozen=True)
class Started:
    """The prompt began running (``node`` None), or began running ``node``."""

    prompt_id: str
    node: str | None = None


@dataclass(frozen=True)
class Cached:
    """Nodes the server will not run again: their earlier outputs stand."""

    prompt_id: str
    nodes: tuple[str, ...]


@dataclass(frozen=True)
class Ended:
    """The server says the prompt is over; its outcome is read from /history."""

    prompt_id: str
    how: str  # "finished", "error" or "interrupted"
    failure: NodeFailureData | None = None


Event = Progress | Started | Ended | Cached

_ENDINGS = {"execution_success": "finished", "execution_error": "error",
            "execution_interrupted": "interrupted"}


def parse_ws_message(raw: str | bytes) -> Event | None:
    """The event a websocket message carries, or None for anything else (binary preview
    frames, broadcasts such as ``status``, message types this plugin does not know, junk)."""
    if not isinstance(raw, str):
        return None
    try:
        return _event_of(raw)
    except Exception as exc:  # noqa: BLE001 - the server's text: no failure may end the job
        # Not only ValueError and ValidationError: a deeply nested message raises
        # RecursionError. Only the kind of failure is logged: the text is the server's, and
        # may be huge.
        logger.debug("skipped a websocket message that could not be read ({} characters: {})",
                     len(raw), type(exc).__name__)
        return None


def _event_of(raw: str) -> Event | None:
    message = WsMessage.model_validate(json.loads(raw))
    kind, data = message.type, message.data
    if kind == "progress":
        progress = ProgressData.model_validate(data)
        if progress.prompt_id is None or progress.max <= 0:
            return None
        return Progress(progress.prompt_id, progress.value, progress.max, progress.node)
    if kind == "executing":
        executing = ExecutingData.model_validate(data)
        if executing.prompt_id is None:
            return None
        if executing.node is None:  # older servers' only end-of-run message
            return Ended(executing.prompt_id, "finished")
        return Started(executing.prompt_id, executing.node)
    if kind == "execution_cached":
        cached = CachedData.model_validate(data)
        return Cached(cached.prompt_id, tuple(cached.nodes)) if cached.prompt_id else None
    if kind == "execution_start":
        started = PromptEventData.model_validate(data)
        return Started(started.prompt_id) if started.prompt_id else None
    if kind in _ENDINGS:
        failure = NodeFailureData.model_validate(data)
        if failure.prompt_id is None:
            return None
        return Ended(failure.prompt_id, _ENDINGS[kind],
                     failure if kind != "execution_success" else None)
    return None


# --- POST /prompt ----------------------------------------------------------------------------

class UploadedImage(_Answer):
    name: str
    subfolder: str = ""
    type: str = "input"


class PromptAccepted(_Answer):
    prompt_id: str
    number: int | None = None


class ErrorItem(_Answer):
    type: str = ""
    message: str = ""
    details: str = ""


class NodeErrors(_Answer):
    errors: list[ErrorItem] = []
    class_type: str | None = None


class PromptRejection(_Answer):
    error: ErrorItem | str | None = None
    node_errors: dict[str, NodeErrors] | list[Any] = {}


# --- GET /queue and /history -------------------------------------------------------------

class QueueState(_Answer):
    queue_running: list[Any] = []
    queue_pending: list[Any] = []

    @staticmethod
    def _ids(entries: list[Any]) -> list[str]:
        # Each entry is [number, prompt_id, prompt, extra_data, outputs_to_execute].
        return [str(e[1]) for e in entries if isinstance(e, list) and len(e) > 1]

    @property
    def running_ids(self) -> list[str]:
        return self._ids(self.queue_running)

    @property
    def pending_ids(self) -> list[str]:
        return self._ids(self.queue_pending)

    @property
    def length(self) -> int:
        return len(self.queue_running) + len(self.queue_pending)


class ImageRef(_Answer):
    filename: str
    subfolder: str = ""
    type: str = "output"


class NodeOutput(_Answer):
    """What one output node made: ``images``, and under other keys (``gifs`` for video nodes,
    ``audio``, ...) lists of files alike."""

    images: list[ImageRef] = []

    def files(self) -> list[tuple[str, ImageRef]]:
        """(key, file) for every file of every kind, previews (type ``temp``) left out."""
        found = [("images", image) for image in self.images]
        for key, value in (self.model_extra or {}).items():
            if not isinstance(value, list):
                continue
            for item in value:
                if isinstance(item, dict) and isinstance(item.get("filename"), str):
                    try:
                        found.append((key, ImageRef.model_validate(item)))
                    except ValueError:
                        continue
        return [(key, ref) for key, ref in found if ref.type != "temp"]


class HistoryStatus(_Answer):
    status_str: str | None = None
    completed: bool = False
    messages: list[Any] = []

    def message(self, name: str) -> dict[str, Any] | None:
        """The data of the first message ``name`` (messages are ``[name, data]`` pairs)."""
        for entry in self.messages:
            if (isinstance(entry, list) and len(entry) == 2 and entry[0] == name
                    and isinstance(entry[1], dict)):
                return entry[1]
        return None


class HistoryEntry(_Answer):
    outputs: dict[str, NodeOutput] = {}
    status: HistoryStatus | None = None

    @property
    def images(self) -> list[ImageRef]:
        return [image for output in self.outputs.values() for image in output.images]


class History(RootModel[dict[str, HistoryEntry]]):
    pass
