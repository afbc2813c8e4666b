"""A plugin that does nothing and succeeds: what benchmarks run to measure kinod itself."""
from typing import Any

from kinod.plugins.base_plugin import BasePlugin, PluginResult


class NoopPlugin(BasePlugin):
    """Succeeds at once."""

    async def generate(self, task_id: str, data: dict[str, Any],
                       progress_callback=None) -> PluginResult:
        self.update_progress(100.0, progress_callback)
        return PluginResult(success=True, data={})

    @classmethod
    def get_plugin_info(cls) -> dict[str, Any]:
        return {"name": "noop", "version": "1.0.0", "description": "Succeeds at once",
                "parameters": {}}
