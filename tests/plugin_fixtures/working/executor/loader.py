# executor/loader.py: a plugin that blocks in asyncio.to_thread and ignores stop requests,
# leaving a non-daemon executor thread behind when it is cancelled.
import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from base_plugin import BasePlugin, PluginResult  # noqa: E402


class ExecutorPlugin(BasePlugin):
    """Sleeps data.sleep_s in asyncio.to_thread, whatever it is told."""

    async def generate(self, task_id, data, progress_callback=None):
        self.update_progress(1, progress_callback)
        await asyncio.to_thread(time.sleep, data["sleep_s"])
        return PluginResult(success=True, data={})

    @classmethod
    def get_plugin_info(cls):
        return {"name": "executor", "version": "1.0.0", "description": "blocks in a thread",
                "parameters": {"sleep_s": {"type": "number", "required": True}}}
