"""The files users see: the job file and the sidecar, as pydantic models."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

SIDECAR_SCHEMA = "kinod.sidecar/1"
JOB_ID_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


MAX_AFTER = 10_000  # ids one job may wait on: a fan-in of thousands, not an unbounded list
JOB_ID_RULES = "letters, digits, '.', '_', '-'; at most 128 characters; not starting with '.'"


def clean_text(text: str) -> str:
    """``text`` that can be written as UTF-8 (lone surrogates become U+FFFD)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def is_valid_job_id(job_id: str) -> bool:
    return JOB_ID_RE.fullmatch(job_id) is not None


def utc_now() -> datetime:
    return datetime.now(UTC)


class JobState(StrEnum):
    HELD = "held"  # accepted, waiting to be released (SPEC §8)
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"

    @property
    def is_terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.STOPPED)


class JobSpec(BaseModel):
    """A job file (``inbox/<id>.yaml|.yml|.json``): the seed's task plus scheduling keys."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    type: str = Field(min_length=1)
    data: dict[str, Any] = Field(default_factory=dict)
    priority: int = 0
    timeout: float | None = Field(default=None, gt=0)
    stall_timeout: float | None = Field(default=None, gt=0)
    retries: int = Field(default=0, ge=0, le=100)
    not_before: datetime | None = None
    hold: bool = False  # accepted but held until released (SPEC §8)
    # Ids whose latest run must have succeeded before this job starts (SPEC §9).
    after: list[str] = Field(default_factory=list, max_length=MAX_AFTER)

    @field_validator("after")
    @classmethod
    def _job_ids(cls, value: list[str]) -> list[str]:
        for job_id in value:
            if not is_valid_job_id(job_id):
                raise ValueError(f"{job_id!r} is not a job id ({JOB_ID_RULES})")
        return list(dict.fromkeys(value))  # each once, in order

    @field_validator("not_before")
    @classmethod
    def _assume_utc(cls, value: datetime | None) -> datetime | None:
        # A time without a zone is taken as UTC, the zone of every sidecar time.
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        try:
            if value.astimezone(UTC).year < 9999:
                return value
        except OverflowError:
            pass
        raise ValueError("must be before the year 9999")


class SidecarError(BaseModel):
    code: str
    message: str


class Sidecar(BaseModel):
    """``outbox/<id>.json``: a job's state as users and scripts read it."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: str = Field(default=SIDECAR_SCHEMA, alias="schema")
    id: str
    name: str | None = None
    type: str | None = None
    state: JobState
    progress: float = Field(default=0.0, ge=0, le=100)
    message: str | None = None
    created_at: AwareDatetime
    started_at: AwareDatetime | None = None
    finished_at: AwareDatetime | None = None
    updated_at: AwareDatetime
    attempt: int = Field(default=1, ge=1)
    node: str | None = None
    pid: int | None = None
    result: dict[str, Any] | None = None
    error: SidecarError | None = None
    task: dict[str, Any] | None = None

    def with_progress(self, report: tuple[float, str | None] | None) -> Sidecar:
        """This sidecar with a plugin's progress report in it (no text keeps the old message)."""
        if report is None:
            return self
        percent, message = report
        if self.progress == percent and (message is None or self.message == message):
            return self
        return self.model_copy(update={
            "progress": percent, "message": message if message is not None else self.message})

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True, indent=2).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes | str) -> Sidecar:
        return cls.model_validate_json(raw)
