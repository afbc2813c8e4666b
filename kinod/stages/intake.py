"""Intake: from a name in the inbox to a job this node holds. It decides when a file is
complete, reads and checks it, refuses what cannot run (a failed sidecar), sets aside
duplicates, and moves the rest into the spool, where it waits or starts at once."""

from __future__ import annotations

import asyncio
import itertools
import os
import stat
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loguru import logger

from kinod.atomic_files import MOVER_GRACE_S, same_file
from kinod.errors import InvalidJob
from kinod.intake import InboxName, ReadJob, holds_bytes, read_job, wait_before_reading_s
from kinod.models import JOB_ID_RULES, JobState, Sidecar, is_valid_job_id
from kinod.stages.context import RETRY_S, Context
from kinod.stages.job import Job, first_sidecar, place

# Inbox paths looked at per turn of the loop, and for how long at most, so a flood of
# files never starves the rest (heartbeats, progress, stop requests).
INTAKE_BATCH = 256
TURN_BUDGET_S = 0.05
# An invalid file written in place is failed only once quiet this many times settle_s.
INCOMPLETE_GRACE = 3


class Intake:
    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        # Inbox paths to look at -> arrived by rename. Text, not Paths. Ordered, to take
        # from the front in O(1): a plain dict walks past every entry deleted before, and
        # 100,000 files dropped at once made that the dearest line of the daemon.
        self._pending: OrderedDict[str, bool] = OrderedDict()
        # The listing of the inbox under way (scan): read a batch at a time, so a start-up
        # on 100,000 files never holds all their names at once.
        self._listing: Iterator[os.DirEntry[str]] | None = None
        self._settling: dict[str, asyncio.TimerHandle] = {}  # path -> its look again
        # Files being written in place: (mtime_ns, size) and when first seen so.
        self._unchanged: dict[Path, tuple[tuple[int, int], float]] = {}
        self._warned: set[str] = set()
        # New runs of ended jobs whose file is not in done/ yet: taken in once it is.
        self._resubmitted: dict[str, str] = {}

    # --- paths to look at ---------------------------------------------------------------

    def arrived(self, path: str, renamed: bool) -> None:
        """The watcher saw ``path`` in the inbox (``renamed``: moved there, complete)."""
        self._pending[path] = self._pending.get(path, False) or renamed
        self._ctx.wake()

    def scan(self) -> None:
        """Look at every name in the inbox: catches whatever the watcher missed. The names
        are read as the turns take them (a listing under way starts again). OSError if
        the inbox cannot be listed."""
        listing = os.scandir(self._ctx.settings.inbox)
        self._end_listing()
        self._listing = listing
        self._ctx.wake()

    def _end_listing(self) -> None:
        if self._listing is not None:
            self._listing.close()
            self._listing = None

    def _read_listing(self, wanted: int) -> None:
        """Up to ``wanted`` more names of the listing under way into the paths to look at."""
        read = 0
        try:
            for entry in itertools.islice(self._listing, wanted):
                read += 1
                if entry.path not in self._settling:
                    self._pending.setdefault(entry.path, False)
            if read < wanted:  # the end of the listing
                self._end_listing()
        except OSError as exc:  # the inbox went meanwhile: the daemon notices that
            logger.warning("listing the inbox {} stopped: {}", self._ctx.settings.inbox, exc)
            self._end_listing()

    def has_pending(self) -> bool:
        return bool(self._pending) or self._listing is not None

    def idle(self) -> bool:
        return not self._pending and not self._settling and self._listing is None

    def take_turn(self) -> None:
        """Look at the next batch of inbox paths, within the turn's budget."""
        clock = self._ctx.clock
        if self._listing is not None and len(self._pending) < INTAKE_BATCH:
            self._read_listing(INTAKE_BATCH - len(self._pending))
        started = clock()
        for _ in range(min(INTAKE_BATCH, len(self._pending))):
            if clock() - started > TURN_BUDGET_S:
                break  # the rest next turn: heartbeats, progress and stops go first
            path, renamed = self._pending.popitem(last=False)
            try:
                self._look_at(Path(path), renamed)
            except OSError as exc:  # a full or read-only disk: the file stays where it is
                logger.error("{}: cannot take it in: {}; trying again in {:g} s", path, exc,
                             RETRY_S)
                self._ctx.retry_soon()
            except Exception:  # the daemon never dies on input; the next rescan tries again
                logger.opt(exception=True).error("{}: unexpected error; will look again", path)

    def cancel_timers(self) -> None:
        for handle in self._settling.values():
            handle.cancel()
        self._end_listing()

    def take_in_resubmitted(self, job_id: str) -> None:
        """A new run of ``job_id`` waits in the inbox for its last run's file to be filed
        away (see _intake): look at it now."""
        if (resubmitted := self._resubmitted.pop(job_id, None)) is not None:
            # As if seen unrenamed: a file written in place still gets its time to settle.
            self._pending.setdefault(resubmitted, False)
            self._ctx.wake()

    # --- one path -----------------------------------------------------------------------

    def _look_at(self, path: Path, renamed: bool) -> None:
        name = InboxName.of(path.name)
        if name.kind == "pause":
            self._ctx.holds.look_at_pause()
            return
        if name.kind == "ignored":
            return
        if name.kind == "other":
            self._warn_once(path.name, "{}: not a job file (.yaml, .yml, .json) nor a .stop; "
                            "left alone", path)
            return
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            self._unchanged.pop(path, None)
            return
        if stat.S_ISDIR(st.st_mode):
            self._warn_once(path.name, "{}: a folder, not a job file; left alone", path)
            return
        if not is_valid_job_id(name.job_id):
            moved = self._ctx.spool.set_aside_invalid(path)
            logger.error("{!r}: not a valid job id ({}); moved to {}", path.name, JOB_ID_RULES,
                         moved)
            return
        if name.kind == "stop":
            self._ctx.stops.on_stop_file(path, name.job_id)
            return
        if name.kind == "hold":
            self._ctx.holds.on_hold_file(path, name.job_id)
            return
        if name.kind == "release":
            self._ctx.holds.on_release_file(path, name.job_id)
            return
        if self._wait_until_settled(path, st, renamed):
            return
        self._intake(path, name.job_id, renamed, linked=st.st_nlink > 1)

    def _wait_until_settled(self, path: Path, st: os.stat_result, renamed: bool) -> bool:
        """True (and a look again planned) while the file may still be being written."""
        ctx = self._ctx
        version = (st.st_mtime_ns, st.st_size)
        seen = self._unchanged.get(path)
        if seen is None or seen[0] != version:
            seen = self._unchanged[path] = (version, ctx.clock())
        wait_s = wait_before_reading_s(st, ctx.wall_clock(), ctx.settings.settle_s, renamed,
                                       unchanged_for_s=ctx.clock() - seen[1])
        if wait_s > 0:
            self._look_again_later(path, wait_s)
            return True
        return False  # _intake forgets it, or keeps it for an invalid file's grace

    def _look_again_later(self, path: Path, wait_s: float) -> None:
        key = str(path)
        old = self._settling.pop(key, None)
        if old is not None:
            old.cancel()

        def again() -> None:
            self._settling.pop(key, None)
            self._pending.setdefault(key, False)
            self._ctx.wake()

        self._settling[key] = self._ctx.loop.call_later(wait_s + 0.01, again)

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    # --- taking a job in ----------------------------------------------------------------

    def _intake(self, path: Path, job_id: str, renamed: bool, linked: bool) -> None:
        """inbox/<id>.<ext> -> running/<node>/ (this daemon alone takes it in), its first
        sidecar (queued, or failed if invalid), then queued/ for any daemon to claim."""
        ctx = self._ctx
        unchanged = self._unchanged.pop(path)
        if self._is_active(job_id, linked):
            if ctx.ending.has_ended(job_id):
                # Resubmitted on seeing the final sidecar, a moment before the file of the
                # run that ended is filed away: a new run, once it is.
                self._resubmitted[job_id] = str(path)
                logger.bind(job_id=job_id).debug("{}: job {} resubmitted as its last run "
                                                 "ends; taken in once that is filed away",
                                                 path, job_id)
                return
            if not os.path.lexists(path):
                self._end_listing()  # another node took it in: the rest is left to it too
                return
            if not self._being_moved(path, job_id):
                self._set_aside_duplicate(path, job_id)
            return
        read = self.read(path)
        if read is None:
            return
        if read.error is not None and not renamed and not read.finished_writing:
            # Written in place and invalid: perhaps a slow writer paused longer than settle_s.
            # Give it INCOMPLETE_GRACE times as long, quiet by its mtime or as seen here
            # (a file server's clock may run ahead of ours), before calling it invalid.
            quiet_s = max(read.age_s, ctx.clock() - unchanged[1])
            wait_s = ctx.settings.settle_s * INCOMPLETE_GRACE - quiet_s
            if wait_s > 0:
                self._unchanged[path] = unchanged  # still counting
                self._look_again_later(path, wait_s)
                return
        if read.error is not None and ctx.fleet.served_elsewhere(_plugin_named(read)):
            return  # a plugin this node lacks: a node that has it takes the file in
        try:
            held = ctx.spool.accept(path)
        except FileNotFoundError:
            # Taken away meanwhile, by a writer or by another node going through the same
            # names: the rest of this listing is left to it (the next one sees what is not).
            self._end_listing()
            return
        # Only now, holding the file: a node that lost the race for it must never move the
        # sidecar of the run that won, which may have ended already. A crash before this
        # leaves the file beside the last run's terminal sidecar: recovery tells that from
        # an end whose filing was cut short by counting the runs in done/.
        ctx.outbox.archive_previous_run(job_id)
        ctx.spool.forget_counts(job_id)  # a new run starts with none, whatever a crash left
        if read.raw is not None and not holds_bytes(held, read.raw):
            # Renamed over after it was read: the newer file was moved, and it is what runs.
            logger.info("{}: replaced while it was read; reading the new version", path)
            read = self.read_held(held)
        self.take_in(held, job_id, read)

    def _is_active(self, job_id: str, linked: bool) -> bool:
        """Queued, waiting, running (here or on another node), or ended with its file not
        yet filed away. ``linked``: the inbox file has other names, as one a node moves
        in by a link and an unlink has, between the two."""
        ctx = self._ctx
        job = ctx.scheduler.get(job_id)
        if job is not None:
            if ctx.running.is_running(job_id) or os.path.lexists(job.path):
                return True
            ctx.ending.claimed_elsewhere(job)  # or removed by someone: then it fails as lost
        if ctx.ending.is_unfiled(job_id):
            return True
        # A job another node runs has a sidecar in the shared outbox, written before its file
        # is queued or starts there. For an id with none, the other nodes' running/ folders
        # are not looked in: the look costs the same however many nodes share the spool.
        # Unless the file is linked: another node may be moving it in (_being_moved).
        here_only = not linked and not ctx.outbox.has_sidecar(job_id)
        return ctx.spool.holds(job_id, here_only=here_only)

    def _being_moved(self, path: Path, job_id: str) -> bool:
        """``path`` is the very file the spool holds for ``job_id``: a node moving it in by
        a link and an unlink (NFS) is between the two. Set aside now, the set-aside could
        win that node's race and leave the job only in duplicates/: it is looked at again
        once the mover has had its time. (A move a crash cut short there is finished by
        the recovery of the file it left in running/.)"""
        held = self._ctx.spool.held_file(job_id)
        if held is None or not same_file(path, held):
            return False
        self._look_again_later(path, MOVER_GRACE_S)
        return True

    def read(self, path: Path, look_again: bool = True) -> ReadJob | None:
        """Read and check a job file; None if it is gone, changed while read (then, with
        ``look_again``, looked at again once settled), or unreadable now."""
        ctx = self._ctx
        try:
            read = read_job(path, ctx.settings.max_job_bytes, ctx.registry, ctx.wall_clock())
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.error("{}: cannot read: {}; will try again", path, exc)
            return None
        if read.changed:
            if look_again:
                self._look_again_later(path, ctx.settings.settle_s)
            return None
        return read

    def read_held(self, path: Path) -> ReadJob:
        """Read a job file this node holds: it can only fail as invalid."""
        ctx = self._ctx
        try:
            return read_job(path, ctx.settings.max_job_bytes, ctx.registry, ctx.wall_clock())
        except OSError as exc:
            return ReadJob(error=InvalidJob(f"cannot be read: {exc.strerror or exc}"))

    def take_in(self, held: Path, job_id: str, read: ReadJob) -> None:
        """A new job file this node holds in running/<node>/: write its first sidecar, then
        queue it (or fail it, if it cannot run)."""
        ctx = self._ctx
        sidecar = first_sidecar(job_id, read.document, ctx.node)
        if read.error is not None and not ctx.fleet.served_elsewhere(_plugin_named(read)):
            ctx.ending.end(job_id, held, sidecar, JobState.FAILED, error=read.error,
                           published=False)
            return
        if read.error is None and ctx.holds.wants_hold(job_id, read):
            ctx.holds.hold_new(held, job_id, sidecar)
            return
        if read.error is None and ctx.scheduler.can_start_now(job_id, read.spec,
                                                              read.plugin.name):
            # It would be the next to run anyway: it starts from here, without a queued
            # sidecar and the two renames through queued/. A crash before its running
            # sidecar is written leaves a file that never ran, which is taken in again.
            job = Job(job_id, *place(held), read.spec, read.plugin, read.data, sidecar,
                      read.mtime_ns)
            ctx.running.begin(job, held, sidecar, published=False)
            ctx.scheduler.hold(job)
            return
        if read.error is None and (message := ctx.holds.queued_message(read)) is not None:
            sidecar = sidecar.model_copy(update={"message": message})
        ctx.outbox.publish(sidecar)
        self.let_wait(held, job_id, read, sidecar)

    def let_wait(self, held: Path, job_id: str, read: ReadJob, sidecar: Sidecar) -> None:
        """A job this node holds, its queued sidecar written, waits for a worker: here, when
        no other node could run it, else in queued/ (also where a job of a plugin only other
        nodes serve is left for them)."""
        ctx = self._ctx
        if read.error is None and ctx.fleet.let_wait_here(read.plugin.name):
            self.admit(held, job_id, read)
            return
        try:
            queued = ctx.spool.release(held)
        except FileExistsError:  # the same id was queued on another node a moment ago
            self._set_aside_duplicate(held, job_id)
            return
        if read.error is None and ctx.recovery.keeps(queued, job_id):
            # Our own rename put it there, and none can replace it: it is the file read.
            # (Another node's share, polling beside others: its owner claims it first.)
            self.admit(queued, job_id, read)

    def admit(self, queued: Path, job_id: str, read: ReadJob) -> None:
        """Keep a runnable job whose file is in queued/ (or waits here), and queue it if
        this node serves its plugin. Its sidecar is not written: the daemon that claims it
        writes the next."""
        ctx = self._ctx
        if not ctx.serves(read.plugin.name):
            ctx.recovery.pass_over(queued, read.mtime_ns)  # for the nodes that serve it
            return
        job = Job.waiting(job_id, *place(queued), read.spec, read.plugin, read.mtime_ns)
        ctx.scheduler.admit(job)
        ctx.stops.look_for(job_id)

    def _set_aside_duplicate(self, path: Path, job_id: str) -> None:
        ctx = self._ctx
        try:
            moved = ctx.spool.set_aside_duplicate(path, job_id)
        except FileNotFoundError:
            return
        state = ("running" if ctx.running.is_running(job_id)
                 else "ending" if ctx.ending.is_unfiled(job_id)
                 else "queued" if job_id in ctx.scheduler else "active on another node")
        logger.bind(job_id=job_id).warning(
            "{}: job {} is still {}; this resubmission was set aside as {}", path, job_id, state,
            moved)


def _plugin_named(read: ReadJob) -> object:
    """The ``type`` a job file names, whatever it is."""
    return (read.document or {}).get("type")
