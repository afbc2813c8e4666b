"""The scheduler: which job runs next. It keeps the jobs this node holds (waiting or
running), the queue, the worker and per-plugin slots, and the ``not_before`` releases,
and hands the next job to the running stage when a slot is free."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator

from loguru import logger

from kinod.jobqueue import JobQueue
from kinod.models import JobSpec, utc_now
from kinod.stages.context import RETRY_S, Context
from kinod.stages.job import Job


class Scheduler:
    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._queue: JobQueue[Job] = JobQueue()
        self._jobs: dict[str, Job] = {}  # every accepted job that has not ended
        # Running jobs that hold a slot, per plugin: what ``max_concurrency`` and, in all,
        # ``workers`` limit (see free_slot).
        self._slots_held: Counter[str] = Counter()
        self._held = False  # a disk fault stopped a start: none until the retry

    # --- the jobs this node holds -------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._jobs

    def __len__(self) -> int:
        return len(self._jobs)

    def jobs(self) -> Iterator[Job]:
        """A snapshot: the caller may forget jobs as it goes."""
        return iter(list(self._jobs.values()))

    def hold(self, job: Job) -> None:
        """Keep a job this node now holds the file of (it starts at once, or waits)."""
        self._jobs[job.id] = job

    def remove(self, job_id: str) -> None:
        """The job ended (or is another node's now): this node no longer holds it."""
        self._jobs.pop(job_id, None)
        self._ctx.dependencies.drop(job_id)

    def remove_if(self, job: Job) -> None:
        """As ``remove``, unless a newer job of its id has taken its place."""
        if self._jobs.get(job.id) is job:
            del self._jobs[job.id]
            self._ctx.dependencies.drop(job.id)

    def queued(self) -> int:
        """How many jobs wait for a worker (not those waiting for their dependencies or
        their ``not_before``)."""
        return len(self._queue)

    def unqueue(self, job: Job) -> None:
        self._queue.discard(job)

    def forget(self, job: Job) -> None:
        """Drop a job this node holds no file of: another node has it."""
        self.remove_if(job)
        self._queue.discard(job)
        timers = self._ctx.timers
        if timers is not None and timers.get_job(f"not_before:{job.id}"):
            timers.remove_job(f"not_before:{job.id}")

    # --- waiting ----------------------------------------------------------------------

    def admit(self, job: Job) -> None:
        """Keep a runnable job whose file waits (in queued/ or this node's running/) and
        queue it, or let it wait for its dependencies, then its ``not_before``."""
        self._jobs[job.id] = job
        job.wait_light()
        if self._ctx.dependencies.ready(job):
            self.after_dependencies(job)

    def after_dependencies(self, job: Job) -> None:
        """Queue a job whose dependencies have succeeded, or wait for its ``not_before``."""
        if self._jobs.get(job.id) is not job:
            return  # ended or let go meanwhile
        not_before = job.not_before
        if not_before is not None and not_before > utc_now():
            # misfire_grace_time=None: released however late the loop gets to it.
            self._ctx.timers.add_job(self._release, "date", run_date=not_before,
                                     args=[job.id], id=f"not_before:{job.id}",
                                     replace_existing=True, misfire_grace_time=None)
            logger.bind(job_id=job.id).info("job {} waits until {}", job.id, not_before)
        else:
            self.enqueue(job)

    def enqueue(self, job: Job) -> None:
        priority = job.priority if job.spec is None else job.spec.priority
        self._queue.push(job, job.plugin.name, priority)
        self._ctx.wake()

    async def _release(self, job_id: str) -> None:
        job = self._jobs.get(job_id)
        if (job is not None and not self._ctx.running.is_running(job_id)
                and not self._queue.holds(job)):
            self.enqueue(job)

    def can_start_now(self, job_id: str, spec: JobSpec, plugin: str) -> bool:
        """Nothing waits before this job and it may run now: a free worker, room for its
        plugin, no ``not_before`` ahead, no stop request."""
        not_before = spec.not_before
        return (self.worker_free() and not len(self._queue) and not spec.after
                and self._ctx.serves(plugin) and self.has_room(plugin)
                and (not_before is None or not_before <= utc_now())
                and not os.path.lexists(self._ctx.stop_file(job_id)))

    # --- starting ---------------------------------------------------------------------

    def dispatch(self) -> None:
        """Start the best waiting jobs while workers are free."""
        while self.worker_free():
            job = self._queue.pop(self.has_room)
            if job is None:
                return
            if self._jobs.get(job.id) is not job:  # let go while queued (another node has it)
                continue
            try:
                self._ctx.running.start(job)
            except OSError as exc:  # the spool or the outbox fails (a full disk): wait, retry
                logger.error("job {}: could not start: {}; trying again in {:g} s", job.id, exc,
                             RETRY_S)
                self.enqueue(job)
                self._held = True
                self._ctx.retry_soon()
                return

    def resume(self) -> None:
        """The disk-fault retry: starts may be tried again."""
        self._held = False

    def worker_free(self) -> bool:
        """A job may start now: not stopping, not paused, not held back by a disk fault, a
        worker free."""
        return (not self._ctx.stopping() and not self._held and not self._ctx.holds.paused
                and self._slots_held.total() < self._ctx.settings.workers)

    def has_room(self, plugin: str) -> bool:
        limit = self._ctx.settings.max_concurrency(plugin)
        return limit is None or self._slots_held[plugin] < limit

    def take_slot(self, job: Job) -> None:
        self._slots_held[job.plugin.name] += 1
        job.holds_slot = True

    def free_slot(self, job: Job) -> None:
        """The job no longer counts against ``workers`` and ``max_concurrency``: its run
        has ended, or its end is stamped and only the writing of its final sidecar is left,
        which the next job need not wait for."""
        if job.holds_slot:
            job.holds_slot = False
            self._slots_held[job.plugin.name] -= 1
            self._ctx.wake()
