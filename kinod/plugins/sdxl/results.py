"""How a ComfyUI job's end becomes its ``PluginResult``, the same for the sdxl and comfyui
plugins: an ``SdxlError`` is the job's error (retryable as it says), anything else an
unexpected error in one readable line, None a stop on request, and a result's data a
success."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from loguru import logger

from kinod.plugins.base_plugin import BasePlugin, PluginResult, ProgressCallback

from .errors import SdxlError
from .explain import one_line

STOPPED = "stopped on request"


async def plugin_result(plugin: BasePlugin, kind: str, task_id: str,
                        work: Callable[[], Awaitable[dict[str, Any] | None]],
                        progress_callback: ProgressCallback | None,
                        done_message: Callable[[dict[str, Any]], str]) -> PluginResult:
    """Run ``work`` (the job; None once stopped on request) with ``plugin.is_running`` set,
    and say how it ended. A success reports 100 % with ``done_message(data)`` first."""
    plugin.is_running = True
    try:
        data_out = await work()
    except SdxlError as exc:
        return PluginResult(success=False, error=str(exc), retryable=exc.retryable)
    except Exception as exc:  # noqa: BLE001 - the job's error is one readable line
        logger.opt(exception=exc).error("{} job {} failed unexpectedly", kind, task_id)
        return PluginResult(success=False, error=f"unexpected {type(exc).__name__}: "
                                                 f"{one_line(str(exc))}")
    finally:
        plugin.is_running = False
    if data_out is None:
        return PluginResult(success=False, error=STOPPED)
    plugin.update_progress(100.0, progress_callback, done_message(data_out))
    return PluginResult(success=True, data=data_out)
