"""The ending stage: where a job's end is recorded. It writes the final sidecar (or puts
the job back in the queue, for a retry or a shutdown), files the job away in done/ for
good, and keeps trying what the disk refused until it is done."""

from __future__ import annotations

import os
from pathlib import Path

from loguru import logger

from kinod.errors import JobLost, KinodError
from kinod.models import JobState, Sidecar
from kinod.outcome import Verdict
from kinod.stages.context import RETRY_S, Context
from kinod.stages.job import (
    Job,
    document_of,
    final_sidecar,
    first_sidecar,
    queued_again,
    unlink,
)


class Ending:
    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        # Ends not yet recorded (the disk refused), and the job files not yet in done/.
        self._unrecorded: dict[str, tuple[Job, Verdict, bool]] = {}  # bool: run it again
        self._unfiled: dict[str, Path] = {}
        # A final sidecar's hook deliveries go into the hooks' journal as it is written, and
        # on disk in the same flush (kinod.hooks); ctx.hooks, set after this stage, is
        # looked up at each write.
        ctx.outbox.on_final = lambda sidecar, data: ctx.hooks.journal(sidecar, data)
        ctx.outbox.folder_flush.also.append(lambda: ctx.hooks.sync())

    # --- what other stages ask ----------------------------------------------------------

    def is_unrecorded(self, job_id: str) -> bool:
        return job_id in self._unrecorded

    def is_unfiled(self, job_id: str) -> bool:
        return job_id in self._unfiled

    def has_ended(self, job_id: str) -> bool:
        """Its final sidecar is on disk; its file is not in done/ yet."""
        job = self._ctx.running.get(job_id)
        if job is None and job_id in self._unrecorded:
            job = self._unrecorded[job_id][0]
        return (job is not None and job.final is not None) or job_id in self._unfiled

    def is_ended(self, job_id: str) -> bool:
        """Its sidecar on disk says it has ended."""
        sidecar = self._ctx.outbox.read(job_id)
        return sidecar is not None and sidecar.state.is_terminal

    def sidecar_of(self, job: Job) -> Sidecar:
        """The sidecar on disk; else the one kept, or for a waiting job, its first again."""
        ctx = self._ctx
        return (ctx.outbox.read(job.id) or job.sidecar or first_sidecar(
            job.id, document_of(job.path, job.suffix, ctx.settings.max_job_bytes), ctx.node))

    # --- recording a run's end ------------------------------------------------------------

    def record(self, job: Job, verdict: Verdict, again: bool) -> None:
        """A run is over: record its end now, or when the disk lets it."""
        self._unrecorded[job.id] = (job, verdict, again)
        self.record_unrecorded()
        self._ctx.wake()

    def record_unrecorded(self) -> None:
        """Record the ends the disk refused so far; an end it refuses again stays (its job
        file where it is) and is tried again in RETRY_S."""
        for job_id, (job, verdict, again) in list(self._unrecorded.items()):
            try:
                self._record_end(job, verdict, again)
            except OSError as exc:
                logger.bind(job_id=job_id).error(
                    "job {}: cannot record its end: {}; trying again in {:g} s", job_id, exc,
                    RETRY_S)
                self._ctx.retry_soon()
                continue
            except Exception as exc:  # noqa: BLE001 - e.g. a result that cannot be written
                logger.opt(exception=True).bind(job_id=job_id).error(
                    "job {}: could not record its end; recording it as failed", job_id)
                self._unrecorded[job_id] = (job, Verdict(JobState.FAILED, error=KinodError(
                    f"its end could not be recorded: {type(exc).__name__}: {exc}")), False)
                self._ctx.retry_soon()
                continue
            del self._unrecorded[job_id]

    def retry(self) -> None:
        """The disk-fault retry: record and file away what the disk refused."""
        self.record_unrecorded()
        for job_id, path in list(self._unfiled.items()):
            self.file_away(path, job_id)

    def _record_end(self, job: Job, verdict: Verdict, again: bool) -> None:
        ctx = self._ctx
        if job.fenced or ctx.fleet.taken_over(job):
            ctx.fleet.fence(job)
            ctx.scheduler.remove_if(job)
            ctx.intake.take_in_resubmitted(job.id)  # the other node's run: it is seen to then
            return
        sidecar = job.sidecar.with_progress(job.progress)  # the last report may be unwritten
        if verdict.state is None:  # the daemon is stopping: back to the queue for next time
            self._back_in_queue(job, sidecar, f"back in the queue: the daemon on {ctx.node} "
                                              "stopped")
            ctx.spool.requeue(job.path)
            ctx.scheduler.remove(job.id)
        elif again:
            self._back_in_queue(job, sidecar, f"attempt {sidecar.attempt} failed "
                                              f"({verdict.error.message}); it runs again")
            job.path = ctx.spool.requeue(job.path)
            ctx.scheduler.enqueue(job)
        else:
            self.end(job.id, job.path, sidecar, verdict.state, error=verdict.error,
                     result=verdict.result, written=job.final)

    def _back_in_queue(self, job: Job, sidecar: Sidecar, message: str) -> None:
        """Its queued sidecar, kept as the job's once on disk: were the disk to refuse it,
        the next try must still log the change from the state it had."""
        queued = queued_again(sidecar, message)
        self._ctx.outbox.publish(queued, sidecar)
        job.sidecar = queued

    # --- the one way a job ends -----------------------------------------------------------

    def end(self, job_id: str, path: Path | None, sidecar: Sidecar, state: JobState,
            error: KinodError | None = None, result: dict | None = None,
            published: bool = True, written: Sidecar | None = None) -> None:
        """The final sidecar on disk (``written``: it is already), then the job's file
        (``path``, None when it is gone) filed away for good.

        OSError when the final sidecar cannot be written: then nothing has changed.
        """
        ctx = self._ctx
        previous = sidecar if published else None
        final = written
        if final is None:
            final = final_sidecar(sidecar, state, error, result)
            ctx.outbox.publish(final, previous)
        else:
            ctx.outbox.published(final, previous)
        ctx.scheduler.remove(job_id)
        ctx.dependencies.ended(job_id, state)
        # Looked for first: unlinking a missing file locks the inbox against every rename
        # into it and out of it. One made after the look is seen to by the stops stage.
        if os.path.lexists(stop := ctx.stop_file(job_id)):
            unlink(stop)
        if path is not None:
            self.file_away(path, job_id, final)
        elif ctx.settings.hooks:
            try:
                ctx.hooks.enqueue(final)
            except OSError as exc:
                logger.bind(job_id=job_id).error("job {}: its hooks cannot be queued: {}",
                                                 job_id, exc)

    def file_away(self, path: Path, job_id: str, final: Sidecar | None = None) -> None:
        """The run has ended: queue its hooks, forget its counts, then move its file to
        done/ for good.

        Hooks and counts go first: a crash in between leaves the file beside a terminal
        sidecar, which recovery files away (queueing the hooks again: at worst a hook is
        told twice, and forgetting the counts) again. The hooks of a final sidecar this
        daemon wrote are on disk already, journaled with it. What the disk refuses now is
        tried again in RETRY_S.
        """
        ctx = self._ctx
        self._unfiled.pop(job_id, None)
        try:
            if ctx.settings.hooks and (final := final or ctx.outbox.read(job_id)) is not None:
                ctx.hooks.enqueue(final)
            ctx.spool.forget_counts(job_id)
            ctx.spool.finish(path, job_id)
        except FileNotFoundError:
            logger.bind(job_id=job_id).warning(
                "job {}: its file {} was removed while the job was active", job_id, path)
        except OSError as exc:
            logger.bind(job_id=job_id).error("job {}: cannot file away {}: {}; trying again "
                                             "in {:g} s", job_id, path, exc, RETRY_S)
            self._unfiled[job_id] = path
            ctx.retry_soon()
            return
        ctx.intake.take_in_resubmitted(job_id)

    def end_waiting(self, job: Job, state: JobState, error: KinodError) -> None:
        """End a job that has not started (stopped, a failed dependency). Claimed first, so
        that no other node starts it meanwhile; if another node has it, that node acts."""
        ctx = self._ctx
        claimed = ctx.running.claim(job)
        if claimed is None:
            self.claimed_elsewhere(job)
            return
        job.path = claimed
        ctx.scheduler.unqueue(job)
        self.end(job.id, claimed, self.sidecar_of(job), state, error=error)

    def claimed_elsewhere(self, job: Job) -> None:
        """Its file left queued/ before this node could claim it: another node's now, or
        removed by someone (then it fails as lost)."""
        ctx = self._ctx
        ctx.scheduler.forget(job)
        if ctx.spool.holds(job.id) or self.is_ended(job.id):
            logger.bind(job_id=job.id).debug("job {}: claimed by another node", job.id)
            return
        self.end(job.id, None, self.sidecar_of(job), JobState.FAILED, error=JobLost(
            f"its file left {job.path.parent} before it could run"))
