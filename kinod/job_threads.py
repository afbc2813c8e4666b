"""The threads plugins run on, each with its asyncio loop, kept a moment after a job for
the next one.

Starting a thread makes the starter wait until the new thread runs; on a busy
daemon that wait is the loop's, once per job. Making and closing an asyncio loop
costs a socket pair, an epoll instance and a dozen system calls; a job's thread
keeps its loop for the next job. A thread that has finished its job waits
``IDLE_S`` for another, then closes its loop and exits, so an idle daemon keeps
none. Threads are daemon threads, never joined: a plugin that ignores
cancellation keeps its thread, which is simply never handed a job again.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable

IDLE_S = 1.0
IDLE_NAME = "job-thread-waiting"  # a thread between jobs: nothing to wait for at exit

Work = Callable[[asyncio.AbstractEventLoop], None]


class JobThreads:
    def __init__(self, idle_s: float = IDLE_S) -> None:
        self._idle_s = idle_s
        self._lock = threading.Lock()
        self._idle: list[queue.SimpleQueue[tuple[Work, str]]] = []

    def run(self, work: Work, name: str) -> None:
        """Run ``work`` on a waiting thread, or on a new one, with that thread's loop. The
        loop is open and not running; ``work`` leaves it so (a closed one is replaced)."""
        with self._lock:
            handoff = self._idle.pop() if self._idle else None
        if handoff is None:
            handoff = queue.SimpleQueue()
            threading.Thread(target=self._serve, args=(handoff,), name=name,
                             daemon=True).start()
        handoff.put((work, name))

    def _serve(self, handoff: queue.SimpleQueue) -> None:
        me = threading.current_thread()
        loop = asyncio.new_event_loop()
        try:
            while (job := self._next(handoff)) is not None:
                work, me.name = job
                if loop.is_closed():  # closed by a plugin
                    loop = asyncio.new_event_loop()
                work(loop)
                me.name = IDLE_NAME
                with self._lock:
                    self._idle.append(handoff)
        finally:
            if not loop.is_closed():
                with contextlib.suppress(BaseException):
                    loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

    def _next(self, handoff: queue.SimpleQueue) -> tuple[Work, str] | None:
        """The next job, or None once this thread has waited ``idle_s`` for one."""
        try:
            return handoff.get(timeout=self._idle_s)
        except queue.Empty:
            with self._lock:
                if handoff in self._idle:
                    self._idle.remove(handoff)
                    return None
            # Taken for a job just as the wait ran out: that job is on its way.
            return handoff.get()


# One set for the process: job runs come and go, the threads stay a moment.
job_threads = JobThreads()
