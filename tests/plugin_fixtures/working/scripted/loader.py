# scripted/loader.py: a test plugin whose behaviour the job's data chooses, written
# the way the seed's plugin README tells plugin authors to write theirs.
#
# Every run appends "start <job id> <unix time> <pid>" to <output_dir>/runs.log when
# generate() begins, and "end ..." when it returns, so tests count executions.
#
#   steps, step_s   work through `steps` steps of `step_s` seconds, reporting progress
#   gate            then keep waiting until this file exists (at most max_wait_s)
#   blocking        sleep with time.sleep (a plugin that blocks its thread)
#   obey_stop       false: ignore should_stop and stop() (the job must be cancelled)
#   progress        false: never report progress (a stalled plugin)
#   outcome         succeed, fail, fail_retryable, raise, exit (SystemExit), garbage (not
#                   a PluginResult), unserializable (result data JSON cannot hold)
#   script          one entry per run, the last one repeating: an outcome at once, or
#                   "wait" (wait on the gate, then succeed); e.g. [fail_retryable, succeed]
import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

# Add parent directory to path for imports
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from base_plugin import BasePlugin, PluginResult  # noqa: E402

log = logging.getLogger(__name__)


class ScriptedPlugin(BasePlugin):
    """Does what the job's data says: succeed, fail, raise, block, hang, stall."""

    def __init__(self) -> None:
        super().__init__()
        self.obey_stop = True

    async def generate(
        self,
        task_id: str,
        data: dict[str, Any],
        progress_callback: Callable[[float], None] | None = None,
    ) -> PluginResult:
        self.is_running = True
        self.should_stop = False
        self.progress = 0.0
        self.obey_stop = data["obey_stop"]
        runs_file = os.path.join(str(self.output_dir), "runs.log")
        executions = _append(runs_file, "start", task_id)
        outcome, gate = data["outcome"], data.get("gate")
        script = data.get("script")
        if script:
            outcome = script[min(executions, len(script)) - 1]
            gate = gate if outcome == "wait" else None
        log.info("scripted run %d of %s starting (%s)", executions, task_id, outcome)
        outcome = "succeed" if outcome == "wait" else outcome
        try:
            stopped = await self._work(data, gate, progress_callback)
            if stopped:
                return PluginResult(success=False, data={}, error="Stopped by user")
            return self._finish(outcome, data, executions)
        finally:
            self.is_running = False
            _append(runs_file, "end", task_id)

    async def _work(self, data: dict[str, Any], gate: str | None, progress_callback) -> bool:
        """Steps, then the gate; True if it stopped on request."""
        steps, step_s = data["steps"], data["step_s"]
        for step in range(1, steps + 1):
            if self._stopping():
                return True
            await self._sleep(step_s, data["blocking"])
            if data["progress"]:
                self.update_progress(step * 90.0 / steps, progress_callback,
                                     message=f"step {step}/{steps}")
        if gate:
            deadline = time.monotonic() + data["max_wait_s"]
            while not os.path.exists(gate):
                if self._stopping():
                    return True
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the gate {gate} never opened")
                await self._sleep(0.02, data["blocking"])
        return self._stopping()

    def _finish(self, outcome: str, data: dict[str, Any], executions: int) -> Any:
        if outcome == "raise":
            raise RuntimeError("scripted explosion")
        if outcome == "exit":
            raise SystemExit(3)
        if outcome == "garbage":
            return {"not": "a PluginResult"}
        if outcome == "unserializable":  # e.g. an image object instead of its path
            return PluginResult(success=True, data={"image": _Image(), "tags": {"a"}})
        if outcome == "fail":
            return PluginResult(success=False, data={}, error="scripted failure")
        if outcome == "fail_retryable":
            return PluginResult(success=False, data={}, error="scripted retryable failure",
                                retryable=True)
        self.update_progress(100.0)
        return PluginResult(success=True, data={
            "tag": data.get("tag"),
            "executions": executions,
            "output_dir": str(self.output_dir),
            "settings": dict(self.settings),
            "pid": os.getpid(),
        })

    def _stopping(self) -> bool:
        return self.obey_stop and self.should_stop

    @staticmethod
    async def _sleep(seconds: float, blocking: bool) -> None:
        if blocking:
            time.sleep(seconds)
        else:
            await asyncio.sleep(seconds)

    async def stop(self):
        if self.obey_stop:
            self.should_stop = True
            self.is_running = False

    @classmethod
    def get_plugin_info(cls) -> dict[str, Any]:
        return {
            "name": "scripted",
            "version": "1.0.0",
            "description": "Test plugin: does what the job's data says",
            "author": "kinod tests",
            "parameters": {
                "outcome": {"type": "string", "default": "succeed",
                            "enum": ["succeed", "fail", "fail_retryable", "raise", "exit",
                                     "garbage", "unserializable"]},
                "script": {"type": "array", "description": "one outcome (or wait) per run"},
                "steps": {"type": "integer", "default": 3, "minimum": 0},
                "step_s": {"type": "number", "default": 0.05, "minimum": 0},
                "gate": {"type": "string", "description": "wait until this file exists"},
                "max_wait_s": {"type": "number", "default": 60},
                "blocking": {"type": "boolean", "default": False},
                "obey_stop": {"type": "boolean", "default": True},
                "progress": {"type": "boolean", "default": True},
                "tag": {"type": "string"},
            },
        }


class _Image:
    """Stands for an in-memory object (a PIL image, a tensor) a plugin might return."""


def _append(path: str, what: str, task_id: str) -> int:
    """Append one line; returns how many `start` lines the file now holds."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{what} {task_id} {time.time():.6f} {os.getpid()}\n")
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.startswith("start "))
