"""How a plugin run ended, and what that means for the job: one small function."""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic_core import to_jsonable_python

from kinod.errors import (
    JobStalled,
    JobStopped,
    JobTimeout,
    KinodError,
    PluginCrashed,
    PluginFailed,
)
from kinod.models import JobState, clean_text
from kinod.plugins.base_plugin import PluginResult


class StopReason(StrEnum):
    USER = "user"          # a .stop file
    TIMEOUT = "timeout"    # the job's timeout passed
    STALL = "stall"        # no progress for stall_timeout
    SHUTDOWN = "shutdown"  # the daemon is stopping; the job goes back to the queue


@dataclass
class Outcome:
    """What came back from one run of a plugin."""

    result: Any = None                      # what generate() returned
    exception: BaseException | None = None  # what generate() raised instead
    stop_reason: StopReason | None = None   # why kinod asked it to stop, if it did
    forced: bool = False                    # it did not stop within the grace and was cancelled
    limit_s: float | None = None            # the timeout or stall limit that was passed
    exit_code: int | None = None            # its process died without a result; -N: signal N


@dataclass(frozen=True)
class Verdict:
    state: JobState | None  # None: back to the queue (daemon shutdown)
    result: dict[str, Any] | None = None
    error: KinodError | None = None

    @property
    def retryable(self) -> bool:
        return self.error is not None and self.error.retryable


def judge(outcome: Outcome) -> Verdict:
    """Decide the job's end from the plugin's outcome."""
    result = outcome.result
    if isinstance(result, PluginResult) and result.success and not outcome.forced:
        data = result.data if result.data is not None else {}
        if not isinstance(data, dict):
            return Verdict(JobState.FAILED, error=PluginCrashed(
                f"PluginResult.data must be a mapping, not {type(data).__name__}"))
        # Values JSON cannot hold (an image, a tensor, a set) are kept as their text.
        try:
            jsonable = to_jsonable_python(data, fallback=str)
            # Lone surrogates and the like fail here, not when the sidecar is written.
            json.dumps(jsonable, ensure_ascii=False).encode("utf-8")
        except (ValueError, TypeError) as exc:
            return Verdict(JobState.FAILED, error=PluginCrashed(
                f"its result cannot be stored as JSON: {clean_text(str(exc))}"))
        return Verdict(JobState.SUCCEEDED, result=jsonable)
    reason = outcome.stop_reason
    forced = ""
    if outcome.forced:
        forced = " (it did not stop within the grace period and was cancelled)"
    if reason is StopReason.SHUTDOWN:
        return Verdict(None)
    if reason is StopReason.USER:
        return Verdict(JobState.STOPPED, error=JobStopped(f"stopped on request{forced}"))
    if reason is StopReason.TIMEOUT:
        return Verdict(JobState.FAILED, error=JobTimeout(
            f"ran longer than its timeout of {outcome.limit_s:g} s{forced}"))
    if reason is StopReason.STALL:
        return Verdict(JobState.FAILED, error=JobStalled(
            f"no progress for {outcome.limit_s:g} s (stall_timeout){forced}"))
    if outcome.exit_code is not None:
        return Verdict(JobState.FAILED, error=PluginCrashed(
            f"the plugin's process {_process_end(outcome.exit_code)}"))
    if outcome.exception is not None:
        exc = outcome.exception
        text = clean_text(str(exc)) or "(no message)"
        return Verdict(JobState.FAILED,
                       error=PluginCrashed(f"plugin raised {type(exc).__name__}: {text}"))
    if not isinstance(result, PluginResult):
        return Verdict(JobState.FAILED, error=PluginCrashed(
            f"generate() returned {type(result).__name__}, not a PluginResult"))
    return Verdict(JobState.FAILED, error=PluginFailed(
        clean_text(str(result.error or "the plugin reported failure without a reason")),
        retryable=bool(getattr(result, "retryable", False))))


def _process_end(exit_code: int) -> str:
    if exit_code >= 0:
        return f"exited with code {exit_code}"
    try:
        name = signal.Signals(-exit_code).name
    except ValueError:
        name = str(-exit_code)
    return f"was killed by signal {name}"
