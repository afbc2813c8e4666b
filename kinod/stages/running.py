"""The running stage: a job's run from its claim to its judged end. It begins the run
(the running sidecar), runs the plugin, writes progress at most once per
``progress_interval_s``, judges the outcome and settles it, then hands the end to the
ending stage. It owns the jobs running on this node."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from loguru import logger

from kinod.atomic_files import flush_tree
from kinod.errors import KinodError
from kinod.isolation import ProcessRun
from kinod.models import JobState, Sidecar, utc_now
from kinod.outcome import Outcome, StopReason, Verdict, judge
from kinod.plugins.base_plugin import BasePlugin
from kinod.runner import PluginRun, new_plugin
from kinod.runner import plugin_settings as settings_for_plugin
from kinod.stages.context import Context
from kinod.stages.job import Job, final_sidecar


class Running:
    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._running: dict[str, Job] = {}

    def __len__(self) -> int:
        return len(self._running)

    def get(self, job_id: str) -> Job | None:
        return self._running.get(job_id)

    def is_running(self, job_id: str) -> bool:
        return job_id in self._running

    def jobs(self) -> Iterator[Job]:
        """A snapshot: runs may end as the caller goes."""
        return iter(list(self._running.values()))

    # --- beginning ------------------------------------------------------------------

    def start(self, job: Job) -> None:
        """Claim a waiting job's file and run it, unless the file or the sidecar on disk
        says otherwise. OSError when the disk refuses: then the job waits as it did."""
        ctx = self._ctx
        claimed = self.claim(job)
        if claimed is None:
            ctx.ending.claimed_elsewhere(job)
            return
        # The file and the sidecar on disk are the truth: what this node read when the job
        # was queued may be an earlier submission of the same id, run and ended elsewhere.
        old = ctx.ending.sidecar_of(job)
        if old.state.is_terminal:
            ctx.scheduler.remove(job.id)
            ctx.ending.file_away(claimed, job.id)
            return
        # Read again as claimed: a job waits light, and its file may have been resubmitted
        # meanwhile, even for another plugin.
        read = ctx.intake.read_held(claimed)
        if read.error is not None:
            ctx.scheduler.remove(job.id)
            ctx.ending.end(job.id, claimed, old, JobState.FAILED, error=read.error)
            return
        if not ctx.serves(read.plugin.name):  # resubmitted for another plugin
            ctx.spool.requeue(claimed)
            ctx.scheduler.forget(job)
            return
        job.spec, job.plugin, job.data = read.spec, read.plugin, read.data
        try:
            self.begin(job, claimed, old)
        except OSError:
            job.path = ctx.spool.requeue(claimed)  # as it was: queued
            raise

    def claim(self, job: Job) -> Path | None:
        """The file of a waiting job, in this node's running/: claimed from queued/, or there
        already. None if another node has it (or it is gone)."""
        spool = self._ctx.spool
        if job.folder == spool.running:
            return job.path if os.path.lexists(job.path) else None
        return spool.claim(job.path)

    def begin(self, job: Job, held: Path, old: Sidecar, published: bool = True) -> None:
        """Write the running sidecar of a job whose file this node holds, and run it.
        OSError when the sidecar cannot be written: then the job is not running."""
        ctx = self._ctx
        attempt = old.attempt + 1 if old.started_at is not None else old.attempt
        now = utc_now()
        running = old.model_copy(update={
            "state": JobState.RUNNING, "attempt": attempt, "progress": 0.0, "message": None,
            "started_at": now, "finished_at": None, "updated_at": now, "error": None,
            "result": None, "node": ctx.node, "pid": os.getpid(),
        })
        ctx.outbox.publish(running, old if published else None)
        job.path, job.sidecar, job.progress = held, running, None
        # As a retried job's last attempt left them.
        job.ending, job.final, job.settled, job.end_lock = False, None, None, threading.Lock()
        job.last_write_s = ctx.clock()  # the throttle counts from this write
        # The first progress write is due one interval from now: planned here, on the loop,
        # so that a report made before then needs no word from the plugin's thread.
        job.progress_pending = False
        job.progress_timer = ctx.loop.call_later(ctx.settings.progress_interval_s,
                                                 self._write_progress, job)
        self._running[job.id] = job
        ctx.scheduler.take_slot(job)
        job.task = asyncio.create_task(self._run(job), name=f"job {job.id}")

    # --- the run --------------------------------------------------------------------

    async def _run(self, job: Job) -> None:
        """Run the job, then hand on how it ended; whatever happens, its slot is freed."""
        verdict: Verdict | None = None
        try:
            outcome = await self._execute(job)
        except Exception as exc:  # noqa: BLE001 - e.g. no thread could be started
            verdict = Verdict(JobState.FAILED, error=KinodError(f"could not run: {exc!r}"))
        if not job.end_lock.acquire(blocking=False):
            # A plugin thread given up on, back at last, is settling the end: wait for it
            # off the loop (a flush to disk can take seconds).
            await asyncio.to_thread(job.end_lock.acquire)
        try:
            job.ending = True  # a progress write from now on could land after the end
            settled = job.settled
        finally:
            job.end_lock.release()
        if job.progress_timer is not None:
            job.progress_timer.cancel()
            job.progress_timer = None  # or a retry's progress would wait for it for ever
        again = False
        if settled is not None:  # judged on the plugin's thread already
            verdict = settled
        else:
            verdict = verdict or judge(outcome)
            if verdict.retryable:  # decided (and counted) once, however often recording fails
                try:
                    again = self._retry_left(job)
                except OSError as exc:
                    logger.bind(job_id=job.id).error("job {}: cannot count its failures: {}; "
                                                     "it runs again", job.id, exc)
                    again = True
            verdict = await asyncio.to_thread(self._settle, job, verdict, not again)
        del self._running[job.id]
        # The run and the job refer to each other (its callbacks hold the job): let go of
        # it now, or every ended job, its sidecars and its plugin would wait for the
        # cyclic garbage collector, which a backlog of 100,000 waiting jobs makes rare.
        job.run = job.task = None
        self._ctx.scheduler.free_slot(job)
        self._ctx.ending.record(job, verdict, again)

    async def _execute(self, job: Job) -> Outcome:
        settings = self._ctx.settings
        output_dir = settings.frames / job.id
        entry = settings.plugins.get(job.plugin.name)
        plugin_settings = settings_for_plugin(settings, job.plugin.name)

        def on_progress(percent: float, message: str | None) -> None:
            self._on_progress(job, percent, message)

        if settings.executor == "ray":
            from kinod.ray_run import RayRun  # only with executor: ray

            job.run = RayRun(settings, job.plugin.name, job.plugin.source, job.id, job.data,
                             on_progress, clock=self._ctx.clock)
        elif entry is not None and entry.isolation == "process":
            job.run = ProcessRun(job.plugin.name, job.plugin.source, job.id, job.data,
                                 on_progress, output_dir=output_dir, settings=plugin_settings,
                                 models_dir=settings.models, outbox=settings.outbox,
                                 log_format=settings.log_format,
                                 log_level=settings.log_level, clock=self._ctx.clock)
        else:
            def make_plugin() -> BasePlugin:  # runs on the job's own thread, off the loop's
                return new_plugin(job.plugin.cls, output_dir, plugin_settings, settings.models)

            job.run = PluginRun(make_plugin, job.id, job.data, on_progress,
                                clock=self._ctx.clock,
                                on_ended=functools.partial(self._settle_on_thread, job))
        if job.stop_requested:
            job.run.request_stop(StopReason.USER, settings.stop_grace)
        return await job.run.run(job.spec.timeout, job.spec.stall_timeout, settings.stop_grace)

    def _retry_left(self, job: Job) -> bool:
        """Count a retryable failure; True while the job's ``retries`` allow another run."""
        return (job.spec.retries > 0
                and self._ctx.spool.count(job.id, "failures") <= job.spec.retries)

    # --- settling the end -----------------------------------------------------------

    def _settle_on_thread(self, job: Job, outcome: Outcome) -> None:
        """On the plugin's own thread, the moment generate() has ended: settle an end that
        is recorded now (not a retry, not a shutdown), one thread hop sooner than the loop
        would. ``_run`` finds it in ``job.settled``."""
        verdict = judge(outcome)
        if verdict.state is None or verdict.retryable:
            return  # the loop decides: back to the queue, or counted for a retry
        with job.end_lock:
            if job.ending:  # the loop stopped waiting for this thread: the end is its own
                return
            job.ending = True
            job.settled = self._settle(job, verdict, record=True)

    def _settle(self, job: Job, verdict: Verdict, record: bool) -> Verdict:
        """Off the loop (flushing to disk takes a millisecond or more): a success's output
        is flushed, then, when the job ends here now, its final sidecar is written and
        flushed. The ending stage finds it in ``job.final``; if anything goes wrong with
        it, that writes it, and reports what does, the ordinary way."""
        ctx = self._ctx
        verdict = _flush_output(ctx.settings.frames / job.id, verdict)
        if not (record and verdict.state is not None and not job.fenced
                and not ctx.fleet.taken_over(job)):
            return verdict
        # Set before the write: a reader may see the sidecar before write() returns, and
        # a resubmission it makes must find the run ended (see Ending.has_ended).
        job.final = final_sidecar(job.sidecar.with_progress(job.progress), verdict.state,
                                  verdict.error, verdict.result)
        # Its end is stamped: the next job need not wait for the write and its flush.
        with contextlib.suppress(RuntimeError):  # the loop is closed: the daemon is exiting
            ctx.loop.call_soon_threadsafe(ctx.scheduler.free_slot, job)
        try:
            ctx.outbox.write(job.final)
        except Exception:  # noqa: BLE001 - see above
            job.final = None
            return verdict
        # Its folder in done/ made here too: the loop, which files the job away, only
        # renames into it, and goes on with other jobs meanwhile.
        ctx.spool.prepare_done(job.id)
        return verdict

    # --- progress -------------------------------------------------------------------

    def _on_progress(self, job: Job, percent: float, message: str | None) -> None:
        """The plugin's progress callback; runs on the plugin's thread. The loop is told
        only when no write is planned: a planned write takes the latest report. (Under the
        GIL each step is seen in order: ``pending`` set before ``timer`` is read here, and
        cleared after ``timer`` there, before the report is read: none is lost.)"""
        job.progress = (percent, message)
        if not job.progress_pending:
            job.progress_pending = True
            if job.progress_timer is not None:
                return  # the planned write takes it
            try:
                self._ctx.loop.call_soon_threadsafe(self._progress_due, job)
            except RuntimeError:
                pass  # the loop is gone: the daemon is exiting

    def _progress_due(self, job: Job) -> None:
        """Write progress at most once per ``progress_interval_s``; the last report wins."""
        # `is job`: a plugin thread left behind must not write over a new run of its id.
        if self._running.get(job.id) is not job or job.progress_timer is not None:
            return
        job.progress_pending = False
        ctx = self._ctx
        wait_s = job.last_write_s + ctx.settings.progress_interval_s - ctx.clock()
        if wait_s > 0:
            job.progress_timer = ctx.loop.call_later(wait_s, self._write_progress, job)
        else:
            self._write_progress(job)

    def _write_progress(self, job: Job) -> None:
        job.progress_timer = None
        if self._running.get(job.id) is not job:
            return
        job.progress_pending = False  # before the report is read: a later one tells the loop
        # Never waits: a held lock means the job's end is being written on its thread.
        if job.end_lock.acquire(blocking=False):
            try:
                self._write_progress_now(job)
            finally:
                job.end_lock.release()

    def _write_progress_now(self, job: Job) -> None:
        if job.progress is None or job.fenced or job.ending:
            return
        if self._ctx.fleet.taken_over(job):
            self._ctx.fleet.fence(job)
            return
        old = job.sidecar
        new = old.with_progress(job.progress)
        if new == old:
            return
        new = new.model_copy(update={"updated_at": utc_now()})
        try:
            self._ctx.outbox.publish(new, old)
        except OSError as exc:  # the next report tries again; the final state is retried
            logger.bind(job_id=job.id).warning("job {}: cannot write progress: {}", job.id, exc)
            return
        job.sidecar = new
        job.last_write_s = self._ctx.clock()

    # --- stopping -------------------------------------------------------------------

    def stop(self, job: Job) -> None:
        """A user's stop request for a running job: its plugin is asked to stop."""
        job.stop_requested = True
        logger.bind(job_id=job.id).info("job {}: stop requested", job.id)
        if job.run is not None:
            job.run.request_stop(StopReason.USER, self._ctx.settings.stop_grace)

    def force_stop_all(self) -> None:
        """The second signal: every plugin is cancelled now."""
        for job in self._running.values():
            if job.run is not None:
                job.run.force_stop()

    async def stop_all(self) -> None:
        """Shutdown: every running job is asked to stop within the grace; returns once
        every run has ended (and gone back to the queue, or been recorded)."""
        for job in list(self._running.values()):
            if job.run is not None:
                job.run.request_stop(StopReason.SHUTDOWN, self._ctx.settings.stop_grace)
        tasks = [job.task for job in self._running.values() if job.task is not None]
        if tasks:
            await asyncio.wait(tasks)


def _flush_output(folder: Path, verdict: Verdict) -> Verdict:
    """A success is recorded only once its output is on disk: after a power cut, no sidecar
    may say "succeeded" beside frames that were never written."""
    if verdict.state is not JobState.SUCCEEDED:
        return verdict
    try:
        if not _is_empty_folder(folder):  # an empty one holds nothing a power cut can lose
            flush_tree(folder)
    except OSError as exc:
        return Verdict(JobState.FAILED, error=KinodError(
            f"its output could not be flushed to disk: {exc}"))
    return verdict


def _is_empty_folder(folder: Path) -> bool:
    try:
        with os.scandir(folder) as entries:
            return next(entries, None) is None
    except FileNotFoundError:
        return True
