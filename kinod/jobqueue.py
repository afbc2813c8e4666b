"""The queue of accepted jobs: highest priority first, then oldest, within per-plugin limits."""

from __future__ import annotations

import heapq
from collections.abc import Callable

# A heap item: (-priority, submitted_ns, job_id). A plain tuple of three: a backlog of
# 100,000 jobs keeps one each. Exact ties run in order of id, the same on every node.
_Item = tuple[int, int, str]


class JobQueue:
    """One heap per plugin, so a plugin at its concurrency limit never holds up the others."""

    def __init__(self) -> None:
        self._heaps: dict[str, list[_Item]] = {}
        # job id -> its live item; an item that is not (``is``) the one here was discarded,
        # and is dropped when it reaches the top of its heap.
        self._live: dict[str, _Item] = {}

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._live

    def push(self, job_id: str, plugin: str, priority: int, submitted_ns: int) -> None:
        if job_id in self._live:
            raise ValueError(f"job {job_id} is already queued")
        item = self._live[job_id] = (-priority, submitted_ns, job_id)
        heapq.heappush(self._heaps.setdefault(plugin, []), item)

    def discard(self, job_id: str) -> bool:
        return self._live.pop(job_id, None) is not None

    def pop(self, can_run: Callable[[str], bool]) -> str | None:
        """The best job whose plugin ``can_run`` now, removed from the queue; None if none."""
        best: list[_Item] | None = None
        for plugin, heap in self._heaps.items():
            while heap and self._live.get(heap[0][2]) is not heap[0]:
                heapq.heappop(heap)
            if heap and can_run(plugin) and (best is None or heap[0] < best[0]):
                best = heap
        if best is None:
            return None
        job_id = heapq.heappop(best)[2]
        del self._live[job_id]
        return job_id
