"""The queue of accepted jobs: highest priority first, then oldest, within per-plugin limits."""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Generic, TypeVar

# Where a job stands with the queue (``Queueable.queue_state``).
NOT_QUEUED = 0
QUEUED = 1
LEFT = 2  # discarded, its entry still in a heap: dropped when it reaches the top


class Queueable:
    """What the queue needs of a job. A job is its own entry in a heap, ordered by the
    fields below, two of which only the queue sets: a backlog of 100,000 jobs keeps no
    tuple and no index by id beside each one (about 10 MB)."""

    __slots__ = ("id", "submitted_ns", "queue_priority", "queue_state")

    id: str
    submitted_ns: int

    def __init__(self, id: str, submitted_ns: int) -> None:  # noqa: A002
        self.id = id
        self.submitted_ns = submitted_ns
        self.queue_priority = 0
        self.queue_state = NOT_QUEUED

    def __lt__(self, other: Queueable) -> bool:
        """Runs before ``other``. Exact ties run in order of id, the same on every node."""
        if self.queue_priority != other.queue_priority:
            return self.queue_priority > other.queue_priority
        if self.submitted_ns != other.submitted_ns:
            return self.submitted_ns < other.submitted_ns
        return self.id < other.id


Q = TypeVar("Q", bound=Queueable)


class JobQueue(Generic[Q]):
    """One heap per plugin, so a plugin at its concurrency limit never holds up the others."""

    def __init__(self) -> None:
        self._heaps: dict[str, list[Q]] = {}
        self._len = 0

    def __len__(self) -> int:
        return self._len

    @staticmethod
    def holds(job: Queueable) -> bool:
        return job.queue_state == QUEUED

    def push(self, job: Q, plugin: str, priority: int) -> None:
        if job.queue_state == QUEUED:
            raise ValueError(f"job {job.id} is already queued")
        if job.queue_state == LEFT:  # its old entry is in a heap still, at its old place
            self._drop_entry(job)
        job.queue_priority = priority  # never changed while in a heap: that would break it
        job.queue_state = QUEUED
        self._len += 1
        heapq.heappush(self._heaps.setdefault(plugin, []), job)

    def discard(self, job: Queueable) -> bool:
        """Take ``job`` out of the queue; False if it was not queued."""
        if job.queue_state != QUEUED:
            return False
        job.queue_state = LEFT
        self._len -= 1
        return True

    def pop(self, can_run: Callable[[str], bool]) -> Q | None:
        """The best job whose plugin ``can_run`` now, removed from the queue; None if none."""
        best: list[Q] | None = None
        for plugin, heap in self._heaps.items():
            while heap and heap[0].queue_state != QUEUED:
                heapq.heappop(heap).queue_state = NOT_QUEUED
            if heap and can_run(plugin) and (best is None or heap[0] < best[0]):
                best = heap
        if best is None:
            return None
        job = heapq.heappop(best)
        job.queue_state = NOT_QUEUED
        self._len -= 1
        return job

    def _drop_entry(self, job: Queueable) -> None:
        """Remove the entry a discarded job left in a heap. O(n), but rare: a job goes back
        to the queue once popped, and a discarded one is almost always let go."""
        for heap in self._heaps.values():
            for i, entry in enumerate(heap):
                if entry is job:
                    heap[i] = heap[-1]
                    heap.pop()
                    heapq.heapify(heap)
                    job.queue_state = NOT_QUEUED
                    return
