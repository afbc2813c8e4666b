"""Holding, releasing and pausing (SPEC §8). A held job's file waits in held/, out of
every node's queue, until an ``inbox/<id>.release`` queues it; an ``inbox/<id>.hold``
takes a waiting job out of the queue again. ``inbox/.pause`` (the farm) and
``inbox/.pause.<node>`` (this node) stop new jobs from starting here while they exist.

Only the node holding a job's file writes its sidecar: a hold or a release claims the
file into this node's running/ first (one rename, which one node alone wins), writes
the sidecar, then moves the file on. A crash in between leaves the file in running/
beside the sidecar just written, and recovery finishes the move that sidecar names.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

from loguru import logger

from kinod.control import PAUSE_NAME, paused_by
from kinod.intake import ReadJob, inbox_has_job
from kinod.models import JobState, Sidecar, utc_now
from kinod.stages.context import Context
from kinod.stages.job import first_sidecar, unlink

HELD_MESSAGE = "held: `kinod release {id}` (or an empty {id}.release in the inbox) queues it"
PAUSED_MESSAGE = "the farm is paused (inbox/{}): it starts once that file is removed"
PAUSE_LOOK_S = 1.0
TELL_BATCH = 200  # queued sidecars rewritten per turn of the loop on a pause or resume


class Holds:
    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._paused_by: Path | None = None
        self._telling: Iterator[str] | None = None  # the pass telling queued sidecars

    # --- held jobs ------------------------------------------------------------------------

    def wants_hold(self, job_id: str, read: ReadJob) -> bool:
        """A job being taken in is held: ``hold: true`` (unless released already), or a
        ``.hold`` dropped before it was taken in."""
        release = self._control(job_id, "release")
        if read.spec.hold and os.path.lexists(release):
            unlink(release)  # released before it was taken in (the API's create, then start)
            return False
        return read.spec.hold or os.path.lexists(self._control(job_id, "hold"))

    def hold_new(self, held: Path, job_id: str, sidecar: Sidecar) -> None:
        """A job taken in to be held: its held sidecar, then its file into held/."""
        ctx = self._ctx
        ctx.outbox.publish(self._held(sidecar))
        ctx.spool.put_on_hold(held)
        unlink(self._control(job_id, "hold"))
        logger.bind(job_id=job_id).info("job {} is held until released", job_id)

    def on_hold_file(self, path: Path, job_id: str) -> None:
        """``<id>.hold``: a waiting job goes back to held/; a running one is not affected."""
        ctx = self._ctx
        job = ctx.scheduler.get(job_id)
        if job is None:
            if ctx.spool.held_job(job_id) is not None:
                unlink(path)  # held already
            elif not (inbox_has_job(ctx.settings.inbox, job_id) or ctx.spool.holds(job_id)):
                logger.warning("{}: no queued job {}; hold request removed", path, job_id)
                unlink(path)
            return  # not taken in yet (intake sees the .hold), or another node's
        if ctx.running.is_running(job_id) or ctx.ending.is_unrecorded(job_id):
            logger.bind(job_id=job_id).info("{}: job {} is running; a hold does not stop it",
                                            path, job_id)
            unlink(path)
            return
        claimed = ctx.running.claim(job)
        if claimed is None:
            ctx.ending.claimed_elsewhere(job)
            return
        ctx.scheduler.forget(job)
        sidecar = ctx.ending.sidecar_of(job)
        ctx.outbox.publish(self._held(sidecar), sidecar)
        ctx.spool.put_on_hold(claimed)
        unlink(path)
        logger.bind(job_id=job_id).info("job {} is held until released", job_id)

    def on_release_file(self, path: Path, job_id: str) -> None:
        """``<id>.release``: a held job is queued (on whichever node claims it first)."""
        ctx = self._ctx
        claimed = ctx.spool.claim_held(job_id)
        if claimed is None:
            if inbox_has_job(ctx.settings.inbox, job_id):
                return  # not taken in yet: intake sees the .release
            if ctx.spool.held_job(job_id) is None:
                logger.info("{}: job {} is not held; release request removed", path, job_id)
                unlink(path)
            return
        read = ctx.intake.read_held(claimed)
        sidecar = ctx.outbox.read(job_id) or first_sidecar(job_id, read.document, ctx.node)
        if read.error is not None:  # changed on disk while held, or a plugin gone since
            ctx.ending.end(job_id, claimed, sidecar, JobState.FAILED, error=read.error)
            unlink(path)
            return
        queued = sidecar.model_copy(update={
            "state": JobState.QUEUED, "updated_at": utc_now(),
            "message": self.queued_message(read, "released")})
        ctx.outbox.publish(queued, sidecar)
        unlink(path)
        logger.bind(job_id=job_id).info("job {} is released", job_id)
        ctx.intake.let_wait(claimed, job_id, read, queued)

    def put_back_on_hold(self, path: Path, job_id: str) -> None:
        """Recovery: a file in running/ beside a held sidecar: its hold was cut short."""
        self._ctx.spool.put_on_hold(path)
        logger.bind(job_id=job_id).info("job {}: held again after a restart", job_id)

    def _held(self, sidecar: Sidecar) -> Sidecar:
        return sidecar.model_copy(update={
            "state": JobState.HELD, "updated_at": utc_now(),
            "message": HELD_MESSAGE.format(id=sidecar.id)})

    def _control(self, job_id: str, kind: str) -> Path:
        return self._ctx.settings.inbox / f"{job_id}.{kind}"

    # --- pausing --------------------------------------------------------------------------

    def look_at_pause(self) -> None:
        """Is the farm, or this node, paused? Looked at on every event for a pause file and
        every rescan (in poll mode, every poll)."""
        ctx = self._ctx
        now = paused_by(ctx.settings.inbox, ctx.node)
        if now == self._paused_by:
            return
        self._paused_by = now
        if now is None:
            logger.info("resumed: jobs start again")
        else:
            logger.warning("paused by {}: no new job starts; running jobs go on", now)
        self._look_while_paused(now is not None)
        ctx.fleet.beat()  # `kinod nodes` shows it now, not a heartbeat later
        ctx.wake()
        self._tell_queued()

    def _look_while_paused(self, paused: bool) -> None:
        """A file's removal makes no event kinod follows: while paused, the pause file is
        looked at every PAUSE_LOOK_S, so a resume takes effect at once, not at a rescan."""
        timers = self._ctx.timers
        if timers is None:
            return
        if paused and timers.get_job("pause") is None:
            timers.add_job(self.look_at_pause, "interval", seconds=PAUSE_LOOK_S, id="pause",
                           coalesce=True, max_instances=1)
        elif not paused and timers.get_job("pause") is not None:
            timers.remove_job("pause")

    def _farm_paused(self) -> bool:
        return self._paused_by is not None and self._paused_by.name == PAUSE_NAME

    def _tell_queued(self) -> None:
        """The farm paused or resumed: the queued sidecars of the jobs this node took in say
        so (one node's pause says nothing: other nodes may run them). Only the node holding
        a file writes its sidecar, so each file is claimed while its sidecar is written,
        then put back as it was; in batches, so a backlog never starves the loop."""
        self._telling = iter([job.id for job in self._ctx.scheduler.jobs()])
        if self._ctx.loop is not None:
            self._ctx.loop.call_soon(self._tell_batch, self._telling)

    def _tell_batch(self, pass_: Iterator[str]) -> None:
        if pass_ is not self._telling:
            return  # paused or resumed again since: a new pass has started
        for job_id in itertools.islice(pass_, TELL_BATCH):
            try:
                self._tell_one(job_id)
            except OSError as exc:  # a message only: the next pause or resume tries again
                logger.warning("job {}: cannot say the farm is paused: {}", job_id, exc)
                break
        else:
            self._ctx.loop.call_soon(self._tell_batch, pass_)

    def _tell_one(self, job_id: str) -> None:
        ctx = self._ctx
        job = ctx.scheduler.get(job_id)
        if job is None or job.after or ctx.running.is_running(job_id):
            return  # gone, waiting for its dependencies (its message says so), or running
        sidecar = ctx.outbox.read(job_id)
        message = (PAUSED_MESSAGE.format(PAUSE_NAME) if self._farm_paused() else None)
        if (sidecar is None or sidecar.state is not JobState.QUEUED or sidecar.node != ctx.node
                or sidecar.message == message):
            return
        in_queue = job.folder != ctx.spool.running
        claimed = ctx.running.claim(job)
        if claimed is None:
            return  # another node has it now
        ctx.outbox.publish(sidecar.model_copy(update={"message": message,
                                                      "updated_at": utc_now()}), sidecar)
        job.path = ctx.spool.requeue(claimed) if in_queue else claimed

    @property
    def paused(self) -> bool:
        return self._paused_by is not None

    def queued_message(self, read: ReadJob, otherwise: str | None = None) -> str | None:
        """What a queued sidecar says while its job waits: for its dependencies, for the
        farm to resume, or ``otherwise``."""
        after = read.spec.after if read.spec is not None else []
        if after:
            shown = ", ".join(after[:5]) + (f" and {len(after) - 5} more" if len(after) > 5
                                            else "")
            return f"waiting for {shown} to succeed"
        if self._farm_paused():
            return PAUSED_MESSAGE.format(PAUSE_NAME)
        return otherwise
