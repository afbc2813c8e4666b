"""The threads plugins run on, kept a moment after a job for the next one.

Starting a thread makes the starter wait until the new thread runs; on a busy
daemon that wait is the loop's, once per job. A thread that has finished its
job waits ``IDLE_S`` for another, then exits, so an idle daemon keeps none.
Threads are daemon threads, never joined: a plugin that ignores cancellation
keeps its thread, which is simply never handed a job again.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

IDLE_S = 1.0
IDLE_NAME = "job-thread-waiting"  # a thread between jobs: nothing to wait for at exit


class JobThreads:
    def __init__(self, idle_s: float = IDLE_S) -> None:
        self._idle_s = idle_s
        self._lock = threading.Lock()
        self._idle: list[queue.SimpleQueue[tuple[Callable[[], None], str]]] = []

    def run(self, work: Callable[[], None], name: str) -> None:
        """Run ``work`` on a waiting thread, or on a new one."""
        with self._lock:
            handoff = self._idle.pop() if self._idle else None
        if handoff is None:
            handoff = queue.SimpleQueue()
            threading.Thread(target=self._serve, args=(handoff,), name=name,
                             daemon=True).start()
        handoff.put((work, name))

    def _serve(self, handoff: queue.SimpleQueue) -> None:
        me = threading.current_thread()
        while True:
            try:
                work, me.name = handoff.get(timeout=self._idle_s)
            except queue.Empty:
                with self._lock:
                    if handoff in self._idle:
                        self._idle.remove(handoff)
                        return
                # Taken for a job just as the wait ran out: that job is on its way.
                work, me.name = handoff.get()
            work()
            me.name = IDLE_NAME
            with self._lock:
                self._idle.append(handoff)


# One set for the process: job runs come and go, the threads stay a moment.
job_threads = JobThreads()
