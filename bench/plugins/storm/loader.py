"""A plugin that reports progress as fast as it can, then succeeds: the progress storm."""
import time
from typing import Any

from kinod.plugins.base_plugin import BasePlugin, PluginResult


class StormPlugin(BasePlugin):
    """Calls update_progress ``reports`` times in a tight loop."""

    async def generate(self, task_id: str, data: dict[str, Any],
                       progress_callback=None) -> PluginResult:
        reports = data["reports"]
        started = time.perf_counter()
        for i in range(1, reports + 1):
            if self.should_stop:
                return PluginResult(success=False, error="stopped")
            self.update_progress(i * 100 / reports, progress_callback)
        return PluginResult(success=True, data={
            "reports": reports, "seconds": time.perf_counter() - started})

    @classmethod
    def get_plugin_info(cls) -> dict[str, Any]:
        return {"name": "storm", "version": "1.0.0",
                "description": "Reports progress as fast as it can, then succeeds",
                "parameters": {"reports": {"type": "integer", "required": False,
                                           "default": 100_000, "minimum": 1,
                                           "maximum": 100_000_000,
                                           "description": "progress reports to make"}}}
