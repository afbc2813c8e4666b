# broken_params/loader.py: declares a parameter of a type kinod does not know.
import os
import sys
from typing import Any

# Add parent directory to path for imports
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from base_plugin import BasePlugin, PluginResult  # noqa: E402


class BrokenParamsPlugin(BasePlugin):
    async def generate(self, task_id, data, progress_callback=None) -> PluginResult:
        return PluginResult(success=True, data={})

    @classmethod
    def get_plugin_info(cls) -> dict[str, Any]:
        return {"name": "broken_params", "version": "1.0.0",
                "parameters": {"colour": {"type": "colour", "required": True}}}
