# plugins/example/loader.py: the seed's example plugin, written the way the
# seed's README tells plugin authors to write theirs.
import asyncio
import os
import sys
from collections.abc import Callable
from typing import Any

# Add parent directory to path for imports
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from base_plugin import BasePlugin, PluginResult  # noqa: E402


class ExamplePlugin(BasePlugin):
    """Example generator: counts through its steps, reporting progress at each."""

    STEP_SECONDS = 0.1

    async def generate(
        self,
        task_id: str,
        data: dict[str, Any],
        progress_callback: Callable[[float], None] | None = None,
    ) -> PluginResult:
        try:
            self.is_running = True
            self.should_stop = False
            self.progress = 0.0

            prompt = data.get("prompt", "")
            steps = int(data.get("steps", 10))
            for step in range(1, steps + 1):
                if self.should_stop:
                    self.is_running = False
                    return PluginResult(success=False, data={}, error="Stopped by user")
                await asyncio.sleep(self.STEP_SECONDS)
                self.update_progress(step * 100.0 / steps, progress_callback)

            self.is_running = False
            return PluginResult(
                success=True,
                data={"prompt": prompt, "steps": steps, "output": f"example output for {prompt!r}"},
            )
        except Exception as e:
            self.is_running = False
            return PluginResult(success=False, data={}, error=str(e))

    async def stop(self):
        self.should_stop = True
        self.is_running = False

    @classmethod
    def get_plugin_info(cls) -> dict[str, Any]:
        return {
            "name": "example",
            "version": "1.0.0",
            "description": "Example generator: counts through its steps",
            "author": "kinod",
            "parameters": {
                "prompt": {
                    "type": "string",
                    "required": True,
                    "description": "Text to generate from",
                },
                "steps": {
                    "type": "integer",
                    "required": False,
                    "default": 10,
                    "minimum": 1,
                    "maximum": 10000,
                    "description": "Number of steps (0.1 s each)",
                },
            },
        }
