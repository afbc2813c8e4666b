# param_names/loader.py: parameters whose names are ordinary for a generator but are
# also names of attributes on pydantic models (model_config, schema, copy, json).
import os
import sys
from typing import Any

# Add parent directory to path for imports
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from base_plugin import BasePlugin, PluginResult  # noqa: E402


class ParamNamesPlugin(BasePlugin):
    """Echoes its data back as its result."""

    async def generate(self, task_id, data, progress_callback=None) -> PluginResult:
        return PluginResult(success=True, data={"echo": dict(data)})

    @classmethod
    def get_plugin_info(cls) -> dict[str, Any]:
        return {
            "name": "param_names",
            "version": "1.0.0",
            "parameters": {
                "model_config": {"type": "string", "required": True,
                                 "description": "the model's config file"},
                "schema": {"type": "string", "default": "v1",
                           "description": "output naming schema"},
                "copy": {"type": "boolean", "default": False,
                         "description": "copy the inputs beside the output"},
                "json": {"type": "boolean", "default": True,
                         "description": "also write a JSON report"},
            },
        }
