"""kinod.plugins.sdxl.results: how the sdxl and comfyui plugins turn a job's end into its
PluginResult (both plugins call it; their own tests cover it against a server)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from kinod.plugins.base_plugin import BasePlugin, PluginResult
from kinod.plugins.comfyui.loader import ComfyuiPlugin
from kinod.plugins.sdxl.errors import InvalidJob, PromptLost
from kinod.plugins.sdxl.loader import SdxlPlugin
from kinod.plugins.sdxl.results import STOPPED, plugin_result

Reports = list[tuple[Any, ...]]


def end_with(outcome: Any) -> tuple[PluginResult, Reports, list[bool]]:
    """Run ``plugin_result`` on work that returns ``outcome``, or raises it."""
    plugin = BasePlugin()
    reports: Reports = []
    running: list[bool] = []

    async def work() -> dict[str, Any] | None:
        running.append(plugin.is_running)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    result = asyncio.run(plugin_result(plugin, "sdxl", "job1", work,
                                       lambda *report: reports.append(report),
                                       lambda data: f"{len(data['images'])} image(s)"))
    running.append(plugin.is_running)
    return result, reports, running


def test_a_result_is_a_success_at_100_percent() -> None:
    result, reports, running = end_with({"images": ["a.png", "b.png"]})
    assert result.success and result.data == {"images": ["a.png", "b.png"]}
    assert reports == [(100.0, "2 image(s)")]
    assert running == [True, False]


def test_none_is_a_stop_on_request() -> None:
    result, reports, running = end_with(None)
    assert (result.success, result.error, result.retryable) == (False, STOPPED, False)
    assert reports == [] and running == [True, False]


@pytest.mark.parametrize(("error", "retryable"), [(InvalidJob("data.steps: too many"), False),
                                                  (PromptLost("the server forgot it"), True)])
def test_an_sdxl_error_is_the_jobs_error_retryable_as_it_says(error: Exception,
                                                               retryable: bool) -> None:
    result, reports, running = end_with(error)
    assert (result.success, result.error, result.retryable) == (False, str(error), retryable)
    assert reports == [] and running == [True, False]


def test_any_other_error_is_unexpected_in_one_line() -> None:
    result, _, running = end_with(KeyError("line one\nline two"))
    assert not result.success and not result.retryable
    assert result.error.startswith("unexpected KeyError: ")
    assert "\n" not in result.error
    assert running == [True, False]


@pytest.mark.parametrize("plugin", [SdxlPlugin, ComfyuiPlugin])
def test_both_plugins_report_a_bad_job_through_it(plugin: type[BasePlugin]) -> None:
    result = asyncio.run(plugin().generate("job1", {}))
    assert not result.success and not result.retryable
    assert result.error and not result.error.startswith("unexpected")
