# broken_noclass/loader.py: its class does not inherit from BasePlugin.
from typing import Any


class NotAPlugin:
    async def generate(self, task_id, data, progress_callback=None) -> dict[str, Any]:
        return {}
