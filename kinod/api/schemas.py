"""What the API takes and gives, as pydantic models: they check requests and document
responses in ``/openapi.json``."""

from __future__ import annotations

import math
from typing import Annotated, Any

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field, field_validator

from kinod.chunks import MAX_FRAMES
from kinod.models import JobSpec, JobState, Sidecar
from kinod.nodes import Heartbeat

# A job id as the folder contract allows it (kinod.models.JOB_ID_RE), anchored.
JOB_ID_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$"
JobId = Annotated[str, Path(pattern=JOB_ID_PATTERN, max_length=128,
                            description="the job's id: letters, digits, '.', '_', '-'")]


class TaskCreate(JobSpec):
    """``POST /tasks``: the seed's task (name, type, data), any job-file key, and two of the
    API's own: ``id`` (default: the next free integer) and ``start``."""

    # No infinities or NaN: a job file is JSON, which cannot hold them.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra={
        "examples": [{"name": "Test", "type": "example", "data": {"prompt": "hello", "steps": 20}},
                     {"id": "shot010", "type": "example", "data": {"prompt": "key art"},
                      "priority": 5, "start": True}]})

    id: str | None = Field(default=None, pattern=JOB_ID_PATTERN, max_length=128)
    start: bool = Field(default=False, description="run at once instead of being held")
    chunk: int | None = Field(default=None, ge=1, le=MAX_FRAMES, description=(
        "split `data.frames` into one task per chunk of this many frames, "
        "`<id>.<first>-<last>`; answers `{\"tasks\": [...]}`"))
    then: dict[str, Any] | None = Field(default=None, description=(
        "with `chunk`: a task (`type`, `data`, ...) run after every chunk, under the id"))

    @field_validator("data")
    @classmethod
    def _finite_numbers(cls, value: dict[str, Any]) -> dict[str, Any]:
        where = _non_finite(value)
        if where is not None:
            raise ValueError(f"{where or 'a value'} is not a finite number")
        return value


def _non_finite(value: Any, where: str = "") -> str | None:
    """Where in ``value`` a NaN or an infinity hides (Python's json reads them), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return where
    items = (value.items() if isinstance(value, dict)
             else enumerate(value) if isinstance(value, list) else ())
    for key, item in items:
        found = _non_finite(item, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


class ErrorDetail(BaseModel):
    code: str
    message: str
    fields: dict[str, str] = Field(description="each offending field, and what is wrong with it")


class ErrorBody(BaseModel):
    error: ErrorDetail


class TaskPage(BaseModel):
    tasks: list[Sidecar] = Field(description="sidecars, newest first")
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; "
                                    "null on the last one")


class TaskBatch(BaseModel):
    tasks: list[Sidecar] = Field(description="the chunks in frame order, then the `then` task")


class ControlAccepted(BaseModel):
    id: str
    action: str = Field(description="release, stop or hold")
    state: JobState | None = Field(description="the job's state when the request was made; "
                                   "null while it waits in the inbox")


class OutputFile(BaseModel):
    path: str = Field(description="relative to data/frames/<id>/")
    size: int
    modified_at: float = Field(description="seconds since the epoch")


class NodeView(Heartbeat):
    heartbeat_age_s: float = Field(description="since its last heartbeat, by this node's clock")
    paused: bool


class NodesView(BaseModel):
    paused: bool = Field(description="the whole farm is paused (inbox/.pause)")
    nodes: list[NodeView]


# Documented on every route: the error format.
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text} for status, text in (
        (400, "bad request (broken JSON, a bad cursor)"),
        (401, "missing or wrong bearer token"),
        (404, "no such job or file"),
        (409, "the job's state does not allow it"),
        (413, "body larger than max_job_bytes"),
        (422, "invalid fields, each named"),
    )
}
