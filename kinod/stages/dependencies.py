"""Dependencies (SPEC §9): a job with ``after: [id, ...]`` waits here, out of the queue and
holding no worker, until the latest run of every id it names has succeeded. One that
ended failed or stopped fails it (``dependency_failed``); a circle of jobs waiting on
each other fails them (``dependency_cycle``).

The latest run of an id is its sidecar in the outbox, whichever node ran it: an end on
this node is heard at once (``ended``); an end elsewhere, or while no daemon ran, is
seen by looking at the sidecars waited on, every LOOK_S while any job waits. Each node
keeps the jobs it knows of; the one that claims a job's file first starts or fails it.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Iterable

from loguru import logger

from kinod.errors import DependencyCycle, DependencyFailed
from kinod.models import JobState
from kinod.stages.context import Context
from kinod.stages.job import Job

LOOK_S = 1.0
FAILED_ENDS = (JobState.FAILED, JobState.STOPPED)


class Dependencies:
    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._waiting: dict[str, Job] = {}
        self._remaining: dict[str, set[str]] = {}  # job id -> ids not yet succeeded
        self._waiters: dict[str, set[str]] = {}  # id waited on -> ids of jobs waiting on it
        # What a sidecar said when last read, by its mtime: its state and its ``after``.
        self._seen: dict[str, tuple[int, JobState | None, tuple[str, ...]]] = {}
        # Ends heard and not yet acted on: a failure failing a chain of 1,000 waiting jobs
        # goes through them in a loop, not 1,000 calls deep.
        self._ends: deque[tuple[str, JobState]] = deque()
        self._hearing = False

    def __len__(self) -> int:
        return len(self._waiting)

    def ready(self, job: Job) -> bool:
        """May ``job`` (kept by the scheduler) be queued now? If not, it waits here, or has
        been failed: a dependency that failed, or itself among its ``after``."""
        if not job.after:
            return True
        if job.id in job.after:
            self._fail(job, DependencyCycle(f"job {job.id} lists itself in after"))
            return False
        remaining = set()
        for dep in job.after:
            state = self._state_of(dep)
            if state in FAILED_ENDS:
                self._fail(job, _failed(dep, state))
                return False
            if state is not JobState.SUCCEEDED:
                remaining.add(dep)
        if not remaining:
            return True
        self._waiting[job.id] = job
        self._remaining[job.id] = remaining
        for dep in remaining:
            self._waiters.setdefault(dep, set()).add(job.id)
        self._look_regularly()
        logger.bind(job_id=job.id).debug("job {} waits for {}", job.id,
                                         ", ".join(sorted(remaining)))
        return False

    def ended(self, job_id: str, state: JobState) -> None:
        """A job ended on this node: release or fail what waits on it."""
        self.drop(job_id)
        self._hear(job_id, state)

    def _hear(self, job_id: str, state: JobState) -> None:
        self._ends.append((job_id, state))
        if self._hearing:
            return  # the loop below, further up the stack, acts on it
        self._hearing = True
        try:
            while self._ends:
                self._dependency_ended(*self._ends.popleft())
        finally:
            self._hearing = False

    def drop(self, job_id: str) -> None:
        """This node no longer keeps ``job_id`` (it ended, was held, or is another node's)."""
        if self._waiting.pop(job_id, None) is None:
            return
        for dep in self._remaining.pop(job_id, ()):
            waiters = self._waiters.get(dep)
            if waiters is not None:
                waiters.discard(job_id)
                if not waiters:
                    del self._waiters[dep]

    def look(self) -> None:
        """Every LOOK_S while jobs wait: ends on other nodes, and circles of waiting jobs."""
        for dep in list(self._waiters):
            state = self._state_of(dep)
            if state is not None and state.is_terminal:
                self._hear(dep, state)
        self._fail_cycles()
        if not self._waiting:
            self._stop_looking()

    # --- releasing and failing ------------------------------------------------------------

    def _dependency_ended(self, dep: str, state: JobState) -> None:
        for job_id in sorted(self._waiters.pop(dep, ())):
            job = self._waiting.get(job_id)
            if job is None:
                continue
            if state in FAILED_ENDS:
                self.drop(job_id)
                self._fail(job, _failed(dep, state))
                continue
            remaining = self._remaining[job_id]
            remaining.discard(dep)
            if not remaining:
                self.drop(job_id)
                logger.bind(job_id=job_id).info("job {}: every job it waited for succeeded",
                                                job_id)
                self._ctx.scheduler.after_dependencies(job)

    def _fail(self, job: Job, error: Exception) -> None:
        self.drop(job.id)
        logger.bind(job_id=job.id).warning("job {} fails: {}", job.id, error)
        self._ctx.ending.end_waiting(job, JobState.FAILED, error)

    def _fail_cycles(self) -> None:
        """Jobs this node keeps that wait, through ``after``, on themselves. Waits on
        other nodes' jobs are followed through their sidecars (their ``task.after``)."""
        for cycle in _cycles(self._waiting, self._edges):
            named = " -> ".join([*cycle, cycle[0]])
            # All out of the waiting first: each fails as part of the circle, not as
            # after another member that failed a moment before.
            members = [job for job_id in cycle if (job := self._waiting.get(job_id))]
            for job in members:
                self.drop(job.id)
            for job in members:
                self._fail(job, DependencyCycle(f"jobs wait on each other: {named}"))

    def _edges(self, job_id: str) -> Iterable[str]:
        if job_id in self._remaining:
            return self._remaining[job_id]
        state = self._state_of(job_id)
        if state is None or state.is_terminal:
            return ()
        return self._seen[job_id][2]

    # --- sidecars -------------------------------------------------------------------------

    def _state_of(self, job_id: str) -> JobState | None:
        """The state of ``job_id``'s latest run by its sidecar; None if it has none yet.
        Read again only once its mtime has changed."""
        path = self._ctx.outbox.sidecar_path(job_id)
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError:
            self._seen.pop(job_id, None)
            return None
        seen = self._seen.get(job_id)
        if seen is not None and seen[0] == mtime:
            return seen[1]
        state, after = _read_state(path)
        self._seen[job_id] = (mtime, state, after)
        if len(self._seen) > 4 * len(self._waiters) + 10_000:
            self._seen.clear()  # a cache, not a record: kept about as large as what waits
        return state

    def _look_regularly(self) -> None:
        timers = self._ctx.timers
        if timers is not None and timers.get_job("dependencies") is None:
            timers.add_job(self.look, "interval", seconds=LOOK_S, id="dependencies",
                           coalesce=True, max_instances=1)

    def _stop_looking(self) -> None:
        timers = self._ctx.timers
        if timers is not None and timers.get_job("dependencies") is not None:
            timers.remove_job("dependencies")


def _failed(dep: str, state: JobState) -> DependencyFailed:
    return DependencyFailed(f"job {dep}, which it runs after, ended {state}")


def _read_state(path: os.PathLike) -> tuple[JobState | None, tuple[str, ...]]:
    """A sidecar's state and its task's ``after``, read as plain JSON: no model is needed
    for two fields, and a sidecar being replaced is read again next time."""
    try:
        with open(path, "rb") as f:
            document = json.loads(f.read())
        state = JobState(document["state"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, ()
    task = document.get("task")
    after = task.get("after") if isinstance(task, dict) else None
    if not isinstance(after, list):
        return state, ()
    return state, tuple(dep for dep in after if isinstance(dep, str))


def _cycles(starts: Iterable[str], edges) -> list[list[str]]:
    """The circles reachable from ``starts`` (Tarjan's strongly connected components,
    without recursion: a chain of thousands of jobs is no deeper a stack)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    for start in list(starts):
        if start in index:
            continue
        work = [(start, iter(edges(start)))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(edges(child))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(component[::-1])
    return found
