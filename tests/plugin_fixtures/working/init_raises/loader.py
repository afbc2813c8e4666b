# init_raises/loader.py: loads fine, but every instance fails in its constructor.
import os
import sys
from typing import Any

# Add parent directory to path for imports
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from base_plugin import BasePlugin, PluginResult  # noqa: E402


class InitRaisesPlugin(BasePlugin):
    """A plugin whose constructor raises (a missing GPU, a bad licence, ...)."""

    def __init__(self) -> None:
        super().__init__()
        raise RuntimeError("no GPU in this test")

    async def generate(self, task_id, data, progress_callback=None) -> PluginResult:
        return PluginResult(success=True, data={})

    @classmethod
    def get_plugin_info(cls) -> dict[str, Any]:
        return {"name": "init_raises", "version": "1.0.0", "parameters": {}}
