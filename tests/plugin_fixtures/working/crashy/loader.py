# crashy/loader.py: a test plugin that takes its process down in the way the job's data
# chooses, written the way the seed's plugin README tells plugin authors to write theirs.
#
#   queue       first wait until this file exists, as a prompt in a server's queue does,
#               saying so ("waiting in a queue", update_progress(waiting=True)) unless
#               say_waiting is false
#   steps       progress reports ("step 1/3", ...) before the action
#   gate        then wait until this file exists (stopping if asked to)
#   action      succeed; raise; os_exit (os._exit(code)); sys_exit (sys.exit(code));
#               kill_self (SIGKILL to its own process); hang (time.sleep for ever,
#               deaf to should_stop, stop() and cancellation)
#   code        the exit status for os_exit and sys_exit
import asyncio
import logging
import os
import signal
import sys
import time
from typing import Any

from loguru import logger

# Add parent directory to path for imports
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from base_plugin import BasePlugin, PluginResult  # noqa: E402

log = logging.getLogger(__name__)


class CrashyPlugin(BasePlugin):
    """Reports progress, then does what the job's data says to its own process."""

    async def generate(self, task_id: str, data: dict[str, Any],
                       progress_callback=None) -> PluginResult:
        action, steps = data["action"], data["steps"]
        log.info("crashy %s: %s in process %d", task_id, action, os.getpid())
        queue = data.get("queue")
        if queue:
            say_waiting = data.get("say_waiting", True)
            self.update_progress(0, progress_callback, message="waiting in a queue",
                                 waiting=True if say_waiting else None)
            while not os.path.exists(queue):
                if self.should_stop:
                    return PluginResult(success=False, error="Stopped by user")
                await asyncio.sleep(0.02)
            self.update_progress(0, progress_callback, message="running",
                                 waiting=False if say_waiting else None)
        for step in range(1, steps + 1):
            self.update_progress(step * 90.0 / steps, progress_callback,
                                 message=f"step {step}/{steps}")
        gate = data.get("gate")
        while gate and not os.path.exists(gate):
            if self.should_stop:
                return PluginResult(success=False, error="Stopped by user")
            await asyncio.sleep(0.02)
        if action == "raise":
            raise RuntimeError("crashy explosion")
        if action == "os_exit":
            os._exit(data["code"])
        if action == "sys_exit":
            sys.exit(data["code"])
        if action == "kill_self":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "hang":
            while True:
                time.sleep(0.05)
        logger.info("crashy {}: done", task_id)
        return PluginResult(success=True, data={"pid": os.getpid(),
                                                "settings": dict(self.settings),
                                                "output_dir": str(self.output_dir),
                                                "models_dir": str(self.models_dir)})

    async def stop(self):
        self.should_stop = True

    @classmethod
    def get_plugin_info(cls) -> dict[str, Any]:
        return {
            "name": "crashy",
            "version": "1.0.0",
            "description": "Test plugin: ends its own process as the job's data says",
            "author": "kinod tests",
            "parameters": {
                "action": {"type": "string", "default": "succeed",
                           "enum": ["succeed", "raise", "os_exit", "sys_exit", "kill_self",
                                    "hang"]},
                "code": {"type": "integer", "default": 7},
                "steps": {"type": "integer", "default": 3, "minimum": 0},
                "gate": {"type": "string", "description": "wait until this file exists"},
                "queue": {"type": "string",
                          "description": "first wait in a queue until this file exists"},
                "say_waiting": {"type": "boolean", "default": True},
            },
        }
