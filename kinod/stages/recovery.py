"""Recovery: picking up jobs no run of this daemon took in. At start-up, what the last
daemon on this node left in its running/; then, at every rescan, queued jobs other
nodes took in, and files whose taking in a crash or a disk fault cut short."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loguru import logger

from kinod.errors import DaemonCrashed
from kinod.intake import InboxName, inbox_names_of
from kinod.models import JobState
from kinod.stages.context import RETRY_S, Context
from kinod.stages.job import mtime_ns, queued_again, unlink

# Another node's queued job is taken once this node has seen it wait this many polls.
STEAL_AFTER_POLLS = 2


class Recovery:
    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        # Queued files this node passed over (not for it): their mtime, to look again
        # only once one changes.
        self._passed_over: dict[Path, int | None] = {}
        # Queued names in another node's share (polling beside others), and when this node
        # first saw each (its own clock): taken over once old (steal), in that order.
        self._others: dict[str, float] = {}

    def recover(self) -> None:
        """Pick up where the last daemon on this node left off, and take in what is queued."""
        for path in self._ctx.spool.running_files():
            self.guarded(self.recover_running, path)
        self.adopt_queued()

    def guarded(self, action: Callable[..., None], path: Path, *args: Any) -> None:
        """One file that cannot be recovered is left where it is, and never stops the start."""
        try:
            action(path, *args)
        except FileNotFoundError:
            logger.debug("{}: taken by another node meanwhile", path)
        except OSError as exc:  # a disk fault: the sweeps try again
            logger.error("{}: cannot be taken up now: {}; trying again in {:g} s", path, exc,
                         RETRY_S)
            self._ctx.retry_soon()
        except Exception:  # noqa: BLE001
            logger.opt(exception=True).error("{}: could not be recovered; left in place", path)

    def recover_running(self, path: Path) -> None:
        """A file in this node's running/ whose daemon died (this node's last one, or another
        node whose lease ran out): file it away if its run had ended, else queue it again.

        A terminal sidecar beside it means the run ended and only the move to done/
        was cut short, so it is filed away, never run again.
        """
        ctx = self._ctx
        job_id = InboxName.of(path.name).job_id
        sidecar = ctx.outbox.read(job_id)
        if not os.path.lexists(path):
            return  # another node took it over meanwhile
        _finish_move_in(ctx.settings.inbox, path, job_id)
        if sidecar is not None and sidecar.state.is_terminal:
            if not self._run_filed(job_id):
                ctx.ending.file_away(path, job_id)  # its end was recorded, its filing cut short
                return
            # A new submission, taken in by a daemon that died before it archived the last
            # run's sidecar: taken in now.
            ctx.outbox.archive_previous_run(job_id)
            ctx.spool.forget_counts(job_id)
            ctx.intake.take_in(path, job_id, ctx.intake.read_held(path))
            return
        if sidecar is not None and sidecar.state is JobState.HELD:
            ctx.holds.put_back_on_hold(path, job_id)  # a hold (or a release) cut short
            return
        # Being taken in, or waiting (the running sidecar is written before a run begins:
        # a queued one, even after an earlier attempt, means this attempt never began).
        if sidecar is None or sidecar.state is JobState.QUEUED:
            read = ctx.intake.read_held(path)
            if sidecar is None or read.error is not None:
                ctx.intake.take_in(path, job_id, read)  # its taking in was cut short
            else:
                ctx.intake.let_wait(path, job_id, read, sidecar)
            return
        crashes = ctx.spool.count(job_id, "crashes")
        if crashes >= ctx.settings.max_crash_attempts:
            ctx.ending.end(job_id, path, sidecar, JobState.FAILED, error=DaemonCrashed(
                f"the daemon died {crashes} times while running this job"))
            return
        was = sidecar.node or "?"
        queued = queued_again(sidecar, f"back in the queue: the daemon on {was} died while "
                                       "running it")
        ctx.outbox.publish(queued, sidecar)  # while this node still holds it
        ctx.spool.requeue(path)
        logger.bind(job_id=job_id).warning(
            "job {} was running when the daemon on {} died; it runs again", job_id, was)

    def _run_filed(self, job_id: str) -> bool:
        """The run the outbox's terminal sidecar of ``job_id`` tells of has its file in done/
        already: done/<id>/ holds one file per ended run, archive/<id>/ one sidecar per run
        before the latest."""
        ctx = self._ctx
        return (_runs_in(ctx.spool.done / job_id, "")
                > _runs_in(ctx.outbox.archive / job_id, ".json"))

    def recover_orphans(self) -> None:
        """Files in this node's running/ that no job here stands for: their taking in or
        requeueing was cut short by a disk fault. Done again."""
        ctx = self._ctx
        for name in ctx.spool.running_names():  # names: 100,000 waiting here cost no Paths
            job_id = InboxName.of(name).job_id
            job = ctx.scheduler.get(job_id)
            if ((job is None or job.folder != ctx.spool.running)
                    and not ctx.ending.is_unrecorded(job_id)
                    and not ctx.ending.is_unfiled(job_id)):
                self.guarded(self.recover_running, ctx.spool.running / name)

    # --- queued jobs --------------------------------------------------------------------

    def adopt_queued(self) -> int:
        """Keep every queued job no job here stands for: taken in by another node, or by
        this one before a disk fault or a restart. Polling beside other nodes, only this
        node's share of them (kinod.stages.fleet); the others' are noted for ``steal``.
        Returns how many jobs it kept."""
        ctx = self._ctx
        names, folder = ctx.spool.queued_names(), ctx.spool.queued
        self._passed_over = {p: m for p, m in self._passed_over.items() if p.name in names}
        self._others = {n: seen for n, seen in self._others.items() if n in names}
        for job in ctx.scheduler.jobs():  # queued here, claimed by another node since
            if job.folder != folder or job.name in names:
                continue
            if not os.path.lexists(job.path):
                ctx.ending.claimed_elsewhere(job)
        kept, now = len(ctx.scheduler), ctx.clock()
        for name in sorted(names):
            job_id = InboxName.of(name).job_id
            if job_id in ctx.scheduler:
                continue
            if not ctx.fleet.owns(job_id):
                self._others.setdefault(name, now)
                continue
            path = folder / name
            if self._passed_over.get(path, 0) != mtime_ns(path):
                self.guarded(self.adopt, path, job_id)
        return max(0, len(ctx.scheduler) - kept)

    def keeps(self, path: Path, job_id: str) -> bool:
        """Whether this node keeps a job it just queued itself: it is this node's share.
        Another node's is noted, for ``steal`` should its owner not claim it."""
        if self._ctx.fleet.owns(job_id):
            return True
        self._others.setdefault(path.name, self._ctx.clock())
        self._ctx.fleet.queued_for_another(path.name, job_id)
        return False

    def steal(self, wanted: int) -> int:
        """Keep up to ``wanted`` queued jobs of other nodes' shares that have waited there
        STEAL_AFTER_POLLS polls since this node first saw them, oldest first: their owner
        is busy, paused or dead. Returns how many it kept."""
        ctx = self._ctx
        if wanted <= 0 or not self._others:
            return 0
        kept, folder = len(ctx.scheduler), ctx.spool.queued
        old = ctx.clock() - ctx.settings.poll_interval_s * STEAL_AFTER_POLLS
        for name, seen in list(self._others.items()):
            if seen > old or len(ctx.scheduler) - kept >= wanted:
                break
            del self._others[name]
            job_id = InboxName.of(name).job_id
            path = folder / name
            if job_id in ctx.scheduler or self._passed_over.get(path, 0) == mtime_ns(path):
                continue  # kept already, or passed over and unchanged since
            self.guarded(self.adopt, path, job_id)
        return len(ctx.scheduler) - kept

    def on_queued(self, path: Path, job_id: str) -> None:
        """Another node took a job in: keep it here too, to claim when a worker is free."""
        if job_id not in self._ctx.scheduler and os.path.lexists(path):
            self.guarded(self.adopt, path, job_id)
            self._ctx.wake()

    def adopt(self, path: Path, job_id: str) -> None:
        ctx = self._ctx
        # A queued file is never looked at as an inbox path: rescans and queued/ events
        # bring it back if it changed while read.
        read = ctx.intake.read(path, look_again=False)
        if read is None:
            return  # claimed by another node meanwhile, or changed while read
        if read.error is not None or read.plugin is None or not ctx.serves(read.plugin.name):
            # Not for this node: looked at again once it changes. A file refused before it
            # was read (too big, a link) has no mtime read: take it from the file.
            self.pass_over(path, read.mtime_ns or mtime_ns(path))
            return
        ctx.intake.admit(path, job_id, read)

    def pass_over(self, path: Path, mtime: int | None) -> None:
        """A queued job for other nodes: looked at again only once its file changes."""
        self._passed_over[path] = mtime

    def forget_passed_over(self) -> None:
        """After a reload: this node may serve those plugins now."""
        self._passed_over.clear()
        self._others.clear()


def _runs_in(folder: Path, suffix: str) -> int:
    """How many run files (``<n>.<ext>``, ending in ``suffix``) ``folder`` holds."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    return sum(1 for name in names if name.partition(".")[0].isdigit() and name.endswith(suffix))


def _finish_move_in(inbox: Path, held: Path, job_id: str) -> None:
    """A move into the spool by a link and an unlink (NFS) that a crash cut short leaves
    the job's inbox name beside the file in running/: unlinked, as the move would have.
    No live mover is left to race: other nodes leave such a name to the node holding it."""
    held_st = os.lstat(held)
    if held_st.st_nlink < 2:
        return  # the common case, told by one lstat, not by looking for 40 names
    for name, st in inbox_names_of(inbox, job_id):
        if os.path.samestat(st, held_st):
            unlink(name)
            logger.bind(job_id=job_id).info("{}: a move into the spool was cut short; "
                                            "finished", name)
