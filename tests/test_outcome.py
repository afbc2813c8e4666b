"""outcome.judge: how a plugin run ended decides the job's state and error."""

from __future__ import annotations

import asyncio

import pytest

from kinod.errors import JobStalled, JobStopped, JobTimeout, PluginCrashed, PluginFailed
from kinod.models import JobState
from kinod.outcome import Outcome, StopReason, Verdict, judge
from kinod.plugins.base_plugin import PluginResult


def test_success() -> None:
    verdict = judge(Outcome(result=PluginResult(success=True, data={"output": "/a.png"})))
    assert verdict == Verdict(JobState.SUCCEEDED, result={"output": "/a.png"})
    assert verdict.error is None
    assert verdict.retryable is False


def test_success_result_is_a_copy_and_never_none() -> None:
    data = {"output": "/a.png"}
    verdict = judge(Outcome(result=PluginResult(success=True, data=data)))
    assert verdict.result == data
    assert verdict.result is not data
    assert judge(Outcome(result=PluginResult(success=True, data=None))).result == {}


def test_success_wins_over_a_late_stop_request() -> None:
    # The plugin finished before it noticed the stop: its work is done and kept.
    outcome = Outcome(result=PluginResult(success=True), stop_reason=StopReason.USER)
    assert judge(outcome).state is JobState.SUCCEEDED


def test_stop_by_user() -> None:
    verdict = judge(Outcome(result=PluginResult(success=False, error="Stopped by user"),
                            stop_reason=StopReason.USER))
    assert verdict.state is JobState.STOPPED
    assert isinstance(verdict.error, JobStopped)
    assert verdict.error.code == "stopped"
    assert verdict.error.message == "stopped on request"
    assert verdict.retryable is False


def test_stop_by_user_forced() -> None:
    verdict = judge(Outcome(exception=asyncio.CancelledError(), stop_reason=StopReason.USER,
                            forced=True))
    assert verdict.state is JobState.STOPPED
    assert "did not stop within the grace period" in verdict.error.message


def test_forced_cancel_is_never_a_success() -> None:
    outcome = Outcome(result=PluginResult(success=True), stop_reason=StopReason.USER,
                      forced=True)
    assert judge(outcome).state is JobState.STOPPED


def test_timeout() -> None:
    verdict = judge(Outcome(result=PluginResult(success=False, error="Stopped by user"),
                            stop_reason=StopReason.TIMEOUT, limit_s=3600))
    assert verdict.state is JobState.FAILED
    assert isinstance(verdict.error, JobTimeout)
    assert verdict.error.code == "timeout"
    assert "timeout of 3600 s" in verdict.error.message
    assert verdict.retryable is False


def test_timeout_forced() -> None:
    verdict = judge(Outcome(stop_reason=StopReason.TIMEOUT, limit_s=1.5, forced=True))
    assert verdict.state is JobState.FAILED
    assert "timeout of 1.5 s" in verdict.error.message
    assert "cancelled" in verdict.error.message


def test_stall() -> None:
    verdict = judge(Outcome(result=PluginResult(success=False), stop_reason=StopReason.STALL,
                            limit_s=600))
    assert verdict.state is JobState.FAILED
    assert isinstance(verdict.error, JobStalled)
    assert verdict.error.code == "stalled"
    assert "no progress for 600 s" in verdict.error.message


def test_shutdown_hands_the_job_back() -> None:
    for outcome in (Outcome(result=PluginResult(success=False), stop_reason=StopReason.SHUTDOWN),
                    Outcome(exception=asyncio.CancelledError(),
                            stop_reason=StopReason.SHUTDOWN, forced=True)):
        verdict = judge(outcome)
        assert verdict.state is None
        assert verdict.error is None
        assert verdict.retryable is False


def test_exception() -> None:
    verdict = judge(Outcome(exception=ValueError("bad seed")))
    assert verdict.state is JobState.FAILED
    assert isinstance(verdict.error, PluginCrashed)
    assert verdict.error.code == "plugin_error"
    assert verdict.error.message == "plugin raised ValueError: bad seed"
    assert verdict.retryable is False


def test_exception_without_a_message() -> None:
    verdict = judge(Outcome(exception=RuntimeError()))
    assert verdict.error.message == "plugin raised RuntimeError: (no message)"


def test_exception_during_a_stop_is_still_a_stop() -> None:
    verdict = judge(Outcome(exception=RuntimeError("interrupted"), stop_reason=StopReason.USER))
    assert verdict.state is JobState.STOPPED


@pytest.mark.parametrize(("result", "kind"), [
    (None, "NoneType"), ({"success": True}, "dict"), (True, "bool"), ("done", "str"),
])
def test_something_other_than_a_plugin_result(result: object, kind: str) -> None:
    verdict = judge(Outcome(result=result))
    assert verdict.state is JobState.FAILED
    assert isinstance(verdict.error, PluginCrashed)
    assert verdict.error.message == f"generate() returned {kind}, not a PluginResult"


def test_failure() -> None:
    verdict = judge(Outcome(result=PluginResult(success=False, error="CUDA out of memory")))
    assert verdict.state is JobState.FAILED
    assert isinstance(verdict.error, PluginFailed)
    assert verdict.error.code == "plugin_failed"
    assert verdict.error.message == "CUDA out of memory"
    assert verdict.retryable is False
    assert verdict.result is None


def test_failure_without_a_reason() -> None:
    verdict = judge(Outcome(result=PluginResult(success=False)))
    assert verdict.error.message == "the plugin reported failure without a reason"


def test_retryable_failure() -> None:
    verdict = judge(Outcome(result=PluginResult(success=False, error="server busy",
                                                retryable=True)))
    assert verdict.state is JobState.FAILED
    assert verdict.retryable is True
    assert verdict.error.retryable is True



def test_a_result_that_cannot_be_json_fails_instead_of_breaking_the_sidecar() -> None:
    circular: dict = {}
    circular["self"] = circular
    for data in (circular, {"text": "\ud800"}):
        verdict = judge(Outcome(result=PluginResult(success=True, data=data)))
        assert verdict.state is JobState.FAILED
        assert "cannot be stored as JSON" in verdict.error.message


def test_values_json_cannot_hold_are_kept_as_text() -> None:
    verdict = judge(Outcome(result=PluginResult(success=True, data={"s": {1}, "o": object()})))
    assert verdict.state is JobState.SUCCEEDED
    assert verdict.result["s"] == [1]
    assert verdict.result["o"].startswith("<object object")
