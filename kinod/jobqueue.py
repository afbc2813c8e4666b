"""The queue of accepted jobs: highest priority first, then oldest, within per-plugin limits."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(order=True, slots=True)
class _Entry:
    sort_key: tuple[int, int, int]
    job_id: str = field(compare=False)
    plugin: str = field(compare=False)
    removed: bool = field(default=False, compare=False)


class JobQueue:
    """One heap per plugin, so a plugin at its concurrency limit never holds up the others."""

    def __init__(self) -> None:
        self._heaps: dict[str, list[_Entry]] = {}
        self._entries: dict[str, _Entry] = {}
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._entries

    def push(self, job_id: str, plugin: str, priority: int, submitted_ns: int) -> None:
        if job_id in self._entries:
            raise ValueError(f"job {job_id} is already queued")
        entry = _Entry((-priority, submitted_ns, next(self._seq)), job_id, plugin)
        self._entries[job_id] = entry
        heapq.heappush(self._heaps.setdefault(plugin, []), entry)

    def discard(self, job_id: str) -> bool:
        entry = self._entries.pop(job_id, None)
        if entry is None:
            return False
        entry.removed = True  # dropped lazily when it reaches the top of its heap
        return True

    def pop(self, can_run: Callable[[str], bool]) -> str | None:
        """The best job whose plugin ``can_run`` now, removed from the queue; None if none."""
        best: list[_Entry] | None = None
        for plugin, heap in self._heaps.items():
            while heap and heap[0].removed:
                heapq.heappop(heap)
            if heap and can_run(plugin) and (best is None or heap[0] < best[0]):
                best = heap
        if best is None:
            return None
        entry = heapq.heappop(best)
        del self._entries[entry.job_id]
        return entry.job_id
