# slow_init/loader.py: a plugin whose constructor takes seconds (as loading a model does).
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from base_plugin import BasePlugin, PluginResult  # noqa: E402

CONSTRUCTOR_S = 3.0


class SlowInitPlugin(BasePlugin):
    """Takes CONSTRUCTOR_S seconds to construct, then succeeds at once."""

    def __init__(self) -> None:
        super().__init__()
        time.sleep(CONSTRUCTOR_S)

    async def generate(self, task_id, data, progress_callback=None):
        return PluginResult(success=True, data={})

    @classmethod
    def get_plugin_info(cls):
        return {"name": "slow_init", "version": "1.0.0", "description": "slow constructor",
                "parameters": {}}
