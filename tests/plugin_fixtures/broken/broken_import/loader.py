# broken_import/loader.py: imports a module that does not exist.
import os
import sys
from typing import Any

# Add parent directory to path for imports
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kinod_test_module_that_does_not_exist  # noqa: E402, F401
from base_plugin import BasePlugin, PluginResult  # noqa: E402


class BrokenImportPlugin(BasePlugin):
    async def generate(self, task_id, data, progress_callback=None) -> PluginResult:
        return PluginResult(success=True, data={})

    @classmethod
    def get_plugin_info(cls) -> dict[str, Any]:
        return {"name": "broken_import", "version": "1.0.0", "parameters": {}}
