"""The daemon: one owner for the event loop, the jobs in flight, the worker gate and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import signal
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from loguru import logger
from pydantic import ValidationError

from kinod.atomic_files import flush_tree
from kinod.config import Settings
from kinod.errors import (
    ConfigError,
    DaemonCrashed,
    InvalidJob,
    JobLost,
    JobStopped,
    KinodError,
)
from kinod.intake import (
    InboxName,
    ReadJob,
    holds_bytes,
    inbox_has_job,
    read_job,
    read_job_bytes,
    recheck,
    wait_before_reading_s,
)
from kinod.isolation import ProcessRun
from kinod.job_document import parse_document
from kinod.jobqueue import JobQueue
from kinod.logs import add_job_log_sink, setup_logging
from kinod.models import (
    JOB_ID_RULES,
    JobSpec,
    JobState,
    Sidecar,
    SidecarError,
    is_valid_job_id,
    utc_now,
)
from kinod.nodes import NodeBoard
from kinod.outbox import Outbox
from kinod.outcome import Outcome, StopReason, Verdict, judge
from kinod.plugins.base_plugin import BasePlugin
from kinod.plugins.plugin_loader import LoadedPlugin, PluginRegistry
from kinod.runner import PluginRun, SupervisedRun, new_plugin
from kinod.spool import Spool
from kinod.systemd import Notifier
from kinod.watcher import InboxWatcher, choose_watch_mode

# How often systemd hears the running and queued counts (when they changed).
STATUS_INTERVAL_S = 1.0
# Settings a reload cannot change: the folders and the name kinod serves under.
RESTART_ONLY = ("inbox", "outbox", "frames", "models", "node", "watch")

# Inbox paths looked at per turn of the loop, and for how long at most, so a flood of
# files never starves the rest (heartbeats, progress, stop requests).
INTAKE_BATCH = 256
TURN_BUDGET_S = 0.05
# An invalid file written in place is failed only once quiet this many times settle_s.
INCOMPLETE_GRACE = 3
# After the disk refused a write (full, read-only, gone), try again after this long.
RETRY_S = 5.0


@dataclass(slots=True)
class Job:
    """An accepted job that has not ended: queued, waiting for ``not_before``, or running.

    A job waiting in the queue keeps none of its file (``light``): its checked spec and
    data, and its sidecar, are made again from its file when it is claimed. Kept whole,
    they would cost a backlog of 100,000 jobs 200 MB more, and its bytes up to
    ``max_job_bytes`` each on every node.
    """

    id: str
    folder: Path  # where its file is now (queued/ or running/<node>/): one object for all
    suffix: str  # its file's name is id + suffix; one object for all of a kind
    spec: JobSpec | None
    plugin: LoadedPlugin
    data: dict[str, Any] | None
    sidecar: Sidecar | None
    submitted_ns: int
    run: SupervisedRun | None = None
    task: asyncio.Task | None = None
    progress: tuple[float, str | None] | None = None  # latest report, not yet written
    progress_pending: bool = False
    progress_timer: asyncio.TimerHandle | None = None
    last_write_s: float = 0.0
    stop_requested: bool = False
    fenced: bool = False  # another node took it over: its end here is never recorded
    file_identity: int | None = None  # of the file read: a claim skips rereading
    light: bool = False  # waiting with only what a claim needs (see wait_light)
    ending: bool = False  # its run is over: no progress write may follow
    final: Sidecar | None = None  # its final sidecar, written by _settle
    settled: Verdict | None = None  # its end, settled on its plugin's thread
    # Held while its end or a progress report is written: its plugin's thread may write its
    # end while the loop writes progress. Made when it starts: a waiting job needs none.
    end_lock: threading.Lock | None = None
    holds_slot: bool = False  # counted against ``workers`` (see _free_slot)

    def wait_light(self) -> None:
        """Keep only what a claim needs to make the rest again from the job's file."""
        self.light = True
        self.spec = self.data = self.sidecar = None

    @property
    def name(self) -> str:
        return self.id + self.suffix

    @property
    def path(self) -> Path:
        return self.folder / self.name

    @path.setter
    def path(self, path: Path) -> None:
        self.folder, self.suffix = _place(path)


class Daemon:
    def __init__(self, settings, registry: PluginRegistry | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time,
                 reload_settings: Callable[[], Settings] | None = None,
                 notifier: Notifier | None = None) -> None:
        self.settings = settings
        # SIGHUP: read the settings again (None: there is nothing to reload from).
        self._reload_settings = reload_settings
        self._notifier = notifier if notifier is not None else Notifier()
        self._last_status = ""
        self._status_paused = False  # the status tick sleeps while nothing changes
        # No other node's heartbeat moves: jobs taken in wait in this node's running/
        # (_waiting_here: some may), not in queued/.
        self._alone = False
        self._waiting_here = False
        self.registry = registry if registry is not None else PluginRegistry(settings.plugin_dirs)
        self.spool = Spool(settings.inbox, settings.node)
        self.outbox = Outbox(settings.outbox)
        self.queue = JobQueue()
        self.jobs: dict[str, Job] = {}  # every accepted job that has not ended
        self.running: dict[str, Job] = {}
        # Running jobs that hold a slot, per plugin: what ``max_concurrency`` and, in all,
        # ``workers`` limit (see _free_slot).
        self._slots_held: Counter[str] = Counter()
        # Inbox paths to look at -> arrived by rename. Text, not Paths: a start-up scan of
        # 100,000 files holds them all at once.
        self._pending: dict[str, bool] = {}
        self._settling: dict[str, asyncio.TimerHandle] = {}
        self._inbox_text, self._spool_text, self._queued_text = (
            str(settings.inbox), str(self.spool.root), str(self.spool.queued))
        # Files being written in place: (mtime_ns, size) and when first seen so.
        self._unchanged: dict[Path, tuple[tuple[int, int], float]] = {}
        self._warned: set[str] = set()
        self._clock = clock
        self._wall_clock = wall_clock
        self._wake = asyncio.Event()
        self._shutdown = asyncio.Event()
        self._signals = 0
        # Disk faults: ends not yet recorded, and one timer to try everything again.
        self._unrecorded: dict[str, tuple[Job, Verdict, bool]] = {}  # bool: run it again
        self._unfiled: dict[str, Path] = {}  # ended jobs whose file is not in done/ yet
        # New runs of ended jobs whose file is not in done/ yet: taken in once it is.
        self._resubmitted: dict[str, str] = {}
        self._not_adopted: dict[Path, int | None] = {}  # queued files for other nodes: mtime
        self._dispatch_held = False
        self._retry_timer: asyncio.TimerHandle | None = None
        self._inbox_identity: tuple[int, int] | None = None  # to notice it replaced
        self._node_lock: int | None = None
        self._scheduler: AsyncIOScheduler | None = None
        # The inbox; queued/ for jobs other nodes on this machine take in; running/, where a
        # node starting writes its pid into its lock file.
        self._watch_mode = choose_watch_mode(settings.watch, settings.inbox)
        self._watcher = InboxWatcher([settings.inbox, self.spool.queued, self.spool.running_root],
                                     self._on_inbox_event)
        self._running_root_text = str(self.spool.running_root)
        self._own_lock = f"{settings.node}.lock"
        self._board = NodeBoard(self.spool.nodes, settings.node, settings.lease, clock)
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- lifecycle ----------------------------------------------------------

    async def run(self, burst: bool = False) -> None:
        """Serve until SIGTERM/SIGINT (or, with ``burst``, until there is nothing left to do)."""
        self._loop = asyncio.get_running_loop()
        self._install_signal_handlers()
        self._prepare_folders()
        self._inbox_identity = _identity(self.settings.inbox)
        self._node_lock = self.spool.lock_node()
        self._log_start()
        # UTC, like every time kinod keeps: nothing depends on the host's time zone files.
        self._scheduler = AsyncIOScheduler(event_loop=self._loop, timezone=UTC)
        polling = self._watch_mode == "poll"
        self._scheduler.add_job(
            self._rescan, "interval", id="rescan", coalesce=True, max_instances=1,
            seconds=self.settings.poll_interval_s if polling else self.settings.rescan_interval_s)
        # Four beats a lease: a node is given up on only after several missed ones.
        self._scheduler.add_job(self._heartbeat, "interval", seconds=self.settings.lease / 4,
                                id="heartbeat", coalesce=True, max_instances=1)
        self._beat()
        self._alone = self._no_other_node()
        self._recover()  # may schedule not_before releases: the scheduler exists by now
        if not polling:
            self._watcher.start(self._loop)
        self._scheduler.add_job(self._tell_status, "interval", seconds=STATUS_INTERVAL_S,
                                id="status", coalesce=True, max_instances=1)
        if self._notifier.watchdog_s:
            # From the loop itself: a loop that hangs stops the pings, and systemd restarts it.
            self._scheduler.add_job(self._notifier.watchdog, "interval", id="watchdog",
                                    seconds=self._notifier.watchdog_s / 2, coalesce=True)
        self._scheduler.start()
        self._rescan_now()
        logger.info("kinod ready on node {}: {} queued, watching by {}", self.settings.node,
                    len(self.jobs), self._watch_mode)
        self._notifier.ready(self._status())
        try:
            while not self._shutdown.is_set():
                await self._turn()
                if burst and self._idle():
                    break
                if not self._pending:
                    await self._wait_for_work()
        finally:
            await self._stop_everything()
            if self._node_lock is not None:
                os.close(self._node_lock)

    def _prepare_folders(self) -> None:
        for key, make in (("inbox", self.spool.ensure_folders),
                          ("outbox", self.outbox.ensure_folder),
                          ("frames", lambda: self.settings.frames.mkdir(parents=True,
                                                                        exist_ok=True))):
            try:
                make()
            except OSError as exc:
                raise ConfigError(f"{key}: cannot create {exc.filename or ''}: "
                                  f"{exc.strerror or exc}") from None

    def request_shutdown(self) -> None:
        """First call: stop taking jobs and stop running ones within the grace. Second: now."""
        self._signals += 1
        if self._signals == 1:
            self._notifier.stopping()
            logger.info("stopping: {} running jobs get {:g} s to stop", len(self.running),
                        self.settings.stop_grace)
        else:
            logger.warning("stopping now")
            for job in self.running.values():
                if job.run is not None:
                    job.run.force_stop()
        self._shutdown.set()
        self._wake.set()

    def _install_signal_handlers(self) -> None:
        handlers = {signal.SIGTERM: self.request_shutdown, signal.SIGINT: self.request_shutdown,
                    signal.SIGHUP: self.reload}
        for sig, handler in handlers.items():
            try:
                self._loop.add_signal_handler(sig, handler)
            except (RuntimeError, ValueError):  # not the main thread (tests run it in one)
                return

    # --- reload and status ---------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: read the settings again and rescan the plugin folders. Running and queued
        jobs go on with the plugin they were taken in with; new jobs get the new ones. A
        settings file that does not load is refused, and the settings in force stay."""
        if self._reload_settings is None or self._shutdown.is_set():
            return
        self._notifier.reloading()
        logger.info("reloading the settings and plugins")
        outcome = ""
        try:
            self._apply(self._reload_settings())
        except ConfigError as exc:
            outcome = f"reload refused: {exc.message}; "
            logger.error("reload refused; the settings in force stay: {}", exc.message)
        except Exception as exc:  # noqa: BLE001 - e.g. a plugin folder it cannot read
            outcome = f"reload failed: {exc}; "
            logger.opt(exception=True).error("reload failed; the settings in force stay")
        finally:
            self._notifier.ready(outcome + self._status())

    def _apply(self, new: Settings) -> None:
        for key in RESTART_ONLY:
            if getattr(new, key) != getattr(self.settings, key):
                raise ConfigError(f"{key} cannot change while kinod runs; restart it")
        registry = PluginRegistry(new.plugin_dirs)
        for name, error in registry.errors.items():
            logger.error("plugin {} failed to load: {}", name, error)
        old, self.settings, self.registry = self.settings, new, registry
        self._board.lease = new.lease
        if (new.log_format, new.log_level) != (old.log_format, old.log_level):
            setup_logging(new.log_format, new.log_level)
            add_job_log_sink(new.outbox)
        if (new.rescan_interval_s, new.poll_interval_s, new.lease) != (
                old.rescan_interval_s, old.poll_interval_s, old.lease):
            self._scheduler.reschedule_job("rescan", trigger="interval", seconds=(
                new.poll_interval_s if self._watch_mode == "poll" else new.rescan_interval_s))
            self._scheduler.reschedule_job("heartbeat", trigger="interval",
                                           seconds=new.lease / 4)
        logger.info("reloaded; plugins: {}", ", ".join(sorted(registry.plugins)) or "none")
        self._not_adopted.clear()  # queued jobs of plugins this node serves now
        self._rescan_now()

    def _status(self) -> str:
        return f"{len(self.running)} running, {len(self.queue)} queued"

    async def _tell_status(self) -> None:
        """Tell systemd the status when it has changed, at most once a STATUS_INTERVAL_S.
        A tick that finds nothing new pauses the ticks until a turn of the loop changes
        the counts: an idle daemon has no reason to wake every second."""
        status = self._status()
        if status != self._last_status:
            self._last_status = status
            self._notifier.status(status)
        else:
            self._scheduler.pause_job("status")
            self._status_paused = True

    async def _wait_for_work(self) -> None:
        await self._wake.wait()
        self._wake.clear()

    async def _turn(self) -> None:
        batch = list(itertools.islice(self._pending.items(), INTAKE_BATCH))
        started = self._clock()
        for path, renamed in batch:
            if self._clock() - started > TURN_BUDGET_S:
                break  # the rest next turn: heartbeats, progress and stops go first
            del self._pending[path]
            try:
                self._look_at(Path(path), renamed)
            except OSError as exc:  # a full or read-only disk: the file stays where it is
                logger.error("{}: cannot take it in: {}; trying again in {:g} s", path, exc,
                             RETRY_S)
                self._retry_soon()
            except Exception:  # the daemon never dies on input; the next rescan tries again
                logger.opt(exception=True).error("{}: unexpected error; will look again", path)
        self._dispatch()
        # Every change to the counts is followed by a turn (a job's end wakes the loop).
        if self._status_paused and self._status() != self._last_status:
            self._status_paused = False
            self._scheduler.resume_job("status")
        if self._pending:
            await asyncio.sleep(0)

    def _idle(self) -> bool:
        return not self._pending and not self._settling and not self.running and not len(self.queue)

    async def _stop_everything(self) -> None:
        self._watcher.stop()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
        for handle in [*self._settling.values(), self._retry_timer]:
            if handle is not None:
                handle.cancel()
        for job in list(self.running.values()):
            if job.run is not None:
                job.run.request_stop(StopReason.SHUTDOWN, self.settings.stop_grace)
        tasks = [job.task for job in self.running.values() if job.task is not None]
        if tasks:
            await asyncio.wait(tasks)
        self._record_unrecorded()  # a last try; what still fails runs again after a restart
        if self._waiting_here:
            self._release_waiting()  # for the other nodes, and for this one's next start
        self._beat(stopped=True)
        logger.info("kinod stopped")

    def _log_start(self) -> None:
        s = self.settings
        logger.info("kinod starting: node {} pid {}, inbox {}, outbox {}, {} workers",
                    s.node, os.getpid(), s.inbox, s.outbox, s.workers)
        logger.info("plugins: {}", ", ".join(sorted(self.registry.plugins)) or "none")
        for name, error in self.registry.errors.items():
            logger.error("plugin {} failed to load: {}", name, error)

    # --- other nodes -----------------------------------------------------------

    async def _heartbeat(self) -> None:
        self._beat()
        for job in list(self.running.values()):
            if self._taken_over(job):
                self._fence(job)
        self._take_over_expired()
        self._alone = self._no_other_node()
        if self._waiting_here and not self._alone:
            self._release_waiting()

    def _no_other_node(self) -> bool:
        """No other node's heartbeat moves. Only where inotify reports another node's start
        at once (see _another_node_started); a polling node would see it a heartbeat late."""
        return self._watch_mode != "poll" and self._board.alive().keys() <= {self.settings.node}

    def _another_node_started(self) -> None:
        """Its lock file was written: the jobs waiting here go where it can claim them."""
        self._alone = False  # until a heartbeat finds it gone again
        if self._waiting_here:
            self._release_waiting()

    def _waits_here(self, plugin: str) -> bool:
        """A job taken in for ``plugin`` waits in this node's running/, not in queued/: no
        other node is there to claim it, and the two renames through queued/ are saved."""
        return self._alone and self._serves(plugin)

    def _release_waiting(self) -> None:
        """Jobs waiting in this node's running/ go to queued/, where every node claims: another
        node serves the inbox now, or this one stops."""
        for job in list(self.jobs.values()):
            if (job.id in self.running or job.id in self._unrecorded
                    or job.folder != self.spool.running):
                continue  # running, or ended with its end not yet recorded
            try:
                job.path = self.spool.requeue(job.path)
            except FileNotFoundError:
                self._claimed_elsewhere(job)  # taken over while this node was held up
                continue
            except OSError as exc:
                logger.error("cannot move the jobs waiting here to {}: {}; trying again at "
                             "the next heartbeat", self.spool.queued, exc)
                return
            job.file_identity = _file_identity(job.path)
        self._waiting_here = False

    def _beat(self, stopped: bool = False) -> None:
        serves = sorted(self.registry.plugins if self.settings.serves is None
                        else self.settings.serves)
        try:
            held_up_s = self._board.beat(serves, self.settings.workers, len(self.running),
                                         len(self.queue), stopped)
        except OSError as exc:
            logger.error("cannot write this node's heartbeat: {}", exc)
            return
        if held_up_s is not None and held_up_s > self.settings.lease:
            logger.warning("this node was held up {:.0f} s, past its lease of {:g} s: other "
                           "nodes may have taken its jobs over", held_up_s, self.settings.lease)

    def _take_over_expired(self) -> None:
        """Take back the running jobs of nodes whose lease ran out, as their next attempt."""
        for node in self.spool.other_nodes():
            if not self._board.expired(node):
                continue
            for path in self.spool.running_files_of(node):
                taken = self.spool.take_over(path)
                if taken is not None:
                    logger.warning("node {} lost its lease (no heartbeat for {:g} s); its job "
                                   "{} is taken back", node, self.settings.lease,
                                   InboxName.of(path.name).job_id)
                    self._guarded(self._recover_running, taken)

    def _taken_over(self, job: Job) -> bool:
        """This node no longer holds the job's file, and another node has it (or ran it)."""
        if os.path.lexists(job.path):
            return False
        if self.spool.holds(job.id):
            return True
        sidecar = self.outbox.read(job.id)
        return sidecar is not None and (sidecar.node, sidecar.attempt) != (
            self.settings.node, job.sidecar.attempt)

    def _fence(self, job: Job) -> None:
        """Another node took this job over while this one was held up: stop it here and
        never write its sidecar again; the other node's run is the job's."""
        if job.fenced:
            return
        job.fenced = True
        logger.bind(job_id=job.id).warning(
            "job {}: another node took it over while this node was held up; stopping it "
            "here, its end is not recorded", job.id)
        if job.run is not None:
            job.run.force_stop()

    # --- finding files --------------------------------------------------------

    def _on_inbox_event(self, path: str, renamed: bool) -> None:
        if path in (self._inbox_text, self._spool_text):  # deleted: is the inbox still there?
            self._rescan_now()
            self._retry_soon()  # and again in a moment: it may be halfway through deletion
            return
        folder, name = os.path.split(path)
        if folder == self._running_root_text:
            if self._alone and name.endswith(".lock") and name != self._own_lock:
                self._another_node_started()
            return
        if folder == self._queued_text:  # another node took a job in
            job_id = InboxName.of(name).job_id
            if job_id not in self.jobs and os.path.lexists(path):
                self._guarded(self._adopt, Path(path), job_id)
                self._wake.set()
            return
        if folder != self._inbox_text:
            return
        self._pending[path] = self._pending.get(path, False) or renamed
        self._wake.set()

    async def _rescan(self) -> None:
        self._rescan_now()

    def _rescan_now(self) -> None:
        """Look at every name in the inbox: catches whatever the watcher missed. Also take
        up queued files no job stands for (their acceptance was cut short by a disk fault)."""
        if not self._inbox_is_served():
            return
        try:
            with os.scandir(self.settings.inbox) as entries:
                for entry in entries:
                    if entry.path not in self._settling:
                        self._pending.setdefault(entry.path, False)
        except OSError as exc:
            # Deleted between the look above and the listing: the look again says so now.
            if self._inbox_is_served():
                logger.error("cannot list the inbox {}: {}; trying again in {:g} s",
                             self.settings.inbox, exc, RETRY_S)
                self._retry_soon()
            return
        self._adopt_queued()
        self._recover_orphans()
        self._wake.set()

    def _recover_orphans(self) -> None:
        """Files in this node's running/ that no job here stands for: their taking in or
        requeueing was cut short by a disk fault. Done again."""
        for name in self.spool.running_names():  # names: 100,000 waiting here cost no Paths
            job_id = InboxName.of(name).job_id
            job = self.jobs.get(job_id)
            if ((job is None or job.folder != self.spool.running)
                    and job_id not in self._unrecorded and job_id not in self._unfiled):
                self._guarded(self._recover_running, self.spool.running / name)

    def _inbox_is_served(self) -> bool:
        """False while the inbox is gone. When a new one stands in its place, make the
        spool in it again and watch it (the watcher of the old one sees nothing more)."""
        identity = _identity(self.settings.inbox)
        if identity is None:
            if self._inbox_identity is not None:
                logger.error("the inbox {} is gone; waiting for it to come back",
                             self.settings.inbox)
                self._inbox_identity = None
            self._retry_soon()
            return False
        if identity != self._inbox_identity:
            logger.warning("the inbox {} was made again; serving the new one",
                           self.settings.inbox)
            self.spool.ensure_folders()
            os.close(self._node_lock)
            self._node_lock = None
            self._node_lock = self.spool.lock_node()
            if self._watch_mode != "poll":
                self._watcher.stop()
                self._watcher.start(self._loop)
            self._inbox_identity = identity
        return True

    def _retry_soon(self) -> None:
        """Try again what the disk refused, in RETRY_S (one timer for everything)."""
        if self._retry_timer is None and not self._shutdown.is_set():
            self._retry_timer = self._loop.call_later(RETRY_S, self._retry_now)

    def _retry_now(self) -> None:
        self._retry_timer = None
        self._dispatch_held = False
        self._record_unrecorded()
        for job_id, path in list(self._unfiled.items()):
            self._file_away_ended(path, job_id)
        self._rescan_now()

    def _look_at(self, path: Path, renamed: bool) -> None:
        name = InboxName.of(path.name)
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
            moved = self.spool.set_aside_invalid(path)
            logger.error("{!r}: not a valid job id ({}); moved to {}", path.name, JOB_ID_RULES,
                         moved)
            return
        if name.kind == "stop":
            self._on_stop_file(path, name.job_id)
            return
        if self._wait_until_settled(path, st, renamed):
            return
        self._intake(path, name.job_id, renamed)

    def _wait_until_settled(self, path: Path, st: os.stat_result, renamed: bool) -> bool:
        """True (and a look again planned) while the file may still be being written."""
        version = (st.st_mtime_ns, st.st_size)
        seen = self._unchanged.get(path)
        if seen is None or seen[0] != version:
            seen = self._unchanged[path] = (version, self._clock())
        wait_s = wait_before_reading_s(st, self._wall_clock(), self.settings.settle_s, renamed,
                                       unchanged_for_s=self._clock() - seen[1])
        if wait_s > 0:
            self._look_again_later(path, wait_s)
            return True
        del self._unchanged[path]
        return False

    def _look_again_later(self, path: Path, wait_s: float) -> None:
        key = str(path)
        old = self._settling.pop(key, None)
        if old is not None:
            old.cancel()

        def again() -> None:
            self._settling.pop(key, None)
            self._pending.setdefault(key, False)
            self._wake.set()

        self._settling[key] = self._loop.call_later(wait_s + 0.01, again)

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    # --- accepting jobs -----------------------------------------------------------

    def _intake(self, path: Path, job_id: str, renamed: bool) -> None:
        """inbox/<id>.<ext> -> running/<node>/ (this daemon alone takes it in), its first
        sidecar (queued, or failed if invalid), then queued/ for any daemon to claim."""
        if self._is_active(job_id):
            if self._has_ended(job_id):
                # Resubmitted on seeing the final sidecar, a moment before the file of the
                # run that ended is filed away: a new run, once it is.
                self._resubmitted[job_id] = str(path)
                logger.bind(job_id=job_id).debug("{}: job {} resubmitted as its last run "
                                                 "ends; taken in once that is filed away",
                                                 path, job_id)
                return
            self._set_aside_duplicate(path, job_id)
            return
        read = self._read(path)
        if read is None:
            return
        if read.error is not None and not renamed and not read.finished_writing:
            # Written in place and invalid: perhaps a slow writer paused longer than settle_s.
            # Give it INCOMPLETE_GRACE times as long before calling it invalid.
            wait_s = self.settings.settle_s * INCOMPLETE_GRACE - read.age_s
            if wait_s > 0:
                self._look_again_later(path, wait_s)
                return
        if read.error is not None and self._served_elsewhere(read):
            return  # a plugin this node lacks: a node that has it takes the file in
        self.outbox.archive_previous_run(job_id)
        self.spool.forget_counts(job_id)  # a new run starts with none, whatever a crash left
        try:
            held = self.spool.accept(path)
        except FileNotFoundError:
            return  # taken away meanwhile, by a writer or another node
        if read.raw is not None and not holds_bytes(held, read.raw):
            # Renamed over after it was read: the newer file was moved, and it is what runs.
            logger.info("{}: replaced while it was read; reading the new version", path)
            read = self._read_held(held)
        self._take_in(held, job_id, read)

    def _is_active(self, job_id: str) -> bool:
        """Queued, waiting, running (here or on another node), or ended with its file not
        yet filed away."""
        job = self.jobs.get(job_id)
        if job is not None:
            if job_id in self.running or os.path.lexists(job.path):
                return True
            self._claimed_elsewhere(job)  # or removed by someone: then it fails as lost
        return job_id in self._unfiled or self.spool.holds(job_id)

    def _has_ended(self, job_id: str) -> bool:
        """Its final sidecar is on disk; its file is not in done/ yet."""
        job = self.running.get(job_id)
        if job is None and job_id in self._unrecorded:
            job = self._unrecorded[job_id][0]
        return (job is not None and job.final is not None) or job_id in self._unfiled

    def _served_elsewhere(self, read: ReadJob) -> bool:
        """The job names a plugin this node has not loaded, but a live node serves."""
        plugin = (read.document or {}).get("type")
        if not isinstance(plugin, str) or self.registry.get(plugin) is not None:
            return False
        return any(plugin in heartbeat.serves
                   for node, heartbeat in self._board.alive().items()
                   if node != self.settings.node)

    def _read(self, path: Path) -> ReadJob | None:
        """Read and check a job file; None if it is gone, changed while read, or unreadable now."""
        try:
            read = read_job(path, self.settings.max_job_bytes, self.registry, self._wall_clock())
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.error("{}: cannot read: {}; will try again", path, exc)
            return None
        if read.changed:
            self._look_again_later(path, self.settings.settle_s)
            return None
        return read

    def _read_held(self, path: Path) -> ReadJob:
        """Read a job file this node holds: it can only fail as invalid."""
        try:
            return read_job(path, self.settings.max_job_bytes, self.registry, self._wall_clock())
        except OSError as exc:
            return ReadJob(error=InvalidJob(f"cannot be read: {exc.strerror or exc}"))

    def _take_in(self, held: Path, job_id: str, read: ReadJob) -> None:
        """A new job file this node holds in running/<node>/: write its first sidecar, then
        queue it (or fail it, if it cannot run)."""
        sidecar = self._first_sidecar(job_id, read.document)
        if read.error is not None and not self._served_elsewhere(read):
            self._end(job_id, held, sidecar, JobState.FAILED, error=read.error, published=False)
            return
        if read.error is None and self._can_start_now(job_id, read):
            # It would be the next to run anyway: it starts from here, without a queued
            # sidecar and the two renames through queued/. A crash before its running
            # sidecar is written leaves a file that never ran, which is taken in again.
            job = Job(job_id, *_place(held), read.spec, read.plugin, read.data, sidecar,
                      read.mtime_ns)
            self._begin(job, held, sidecar, published=False)
            self.jobs[job_id] = job
            return
        self.outbox.publish(sidecar)
        self._let_wait(held, job_id, read, sidecar)

    def _let_wait(self, held: Path, job_id: str, read: ReadJob, sidecar: Sidecar) -> None:
        """A job this node holds, its queued sidecar written, waits for a worker: here, when
        no other node could run it, else in queued/ (also where a job of a plugin only other
        nodes serve is left for them)."""
        if read.error is None and self._waits_here(read.plugin.name):
            self._waiting_here = True
            self._admit(held, job_id, read, sidecar, _file_identity(held))
            return
        try:
            queued = self.spool.release(held)
        except FileExistsError:  # the same id was queued on another node a moment ago
            self._set_aside_duplicate(held, job_id)
            return
        if read.error is None:
            # Our own rename put it there, and none can replace it: it is the file read.
            self._admit(queued, job_id, read, sidecar, _file_identity(queued))

    def _can_start_now(self, job_id: str, read: ReadJob) -> bool:
        """Nothing waits before this job and it may run now: a free worker, room for its
        plugin, no ``not_before`` ahead, no stop request."""
        not_before = read.spec.not_before
        return (self._worker_free() and not len(self.queue)
                and self._serves(read.plugin.name) and self._has_room(read.plugin.name)
                and (not_before is None or not_before <= utc_now())
                and not os.path.lexists(f"{self._inbox_text}/{job_id}.stop"))

    def _first_sidecar(self, job_id: str, task: dict[str, Any] | None) -> Sidecar:
        """A new run's queued sidecar, with the job as submitted."""
        now = utc_now()
        document = task or {}
        return Sidecar(
            id=job_id, state=JobState.QUEUED, created_at=now, updated_at=now,
            task=task, node=self.settings.node, pid=os.getpid(),
            # Taken from the file even when it is invalid, where they are text.
            **{key: value for key in ("name", "type")
               if isinstance(value := document.get(key), str)})

    def _admit(self, queued: Path, job_id: str, read: ReadJob, sidecar: Sidecar,
               identity: int | None) -> None:
        """Keep a runnable job whose file is in queued/, and queue it if this node serves its
        plugin. Its sidecar is not written: the daemon that claims it writes the next."""
        if not self._serves(read.plugin.name):
            self._not_adopted[queued] = read.mtime_ns  # for the nodes that serve it
            return
        job = Job(job_id, *_place(queued), read.spec, read.plugin, read.data, sidecar,
                  read.mtime_ns)
        job.file_identity = identity
        self.jobs[job_id] = job
        now = utc_now()
        not_before = read.spec.not_before
        if not_before is not None and not_before > now:
            # misfire_grace_time=None: released however late the loop gets to it.
            self._scheduler.add_job(self._release, "date", run_date=not_before, args=[job_id],
                                    id=f"not_before:{job_id}", replace_existing=True,
                                    misfire_grace_time=None)
            logger.bind(job_id=job_id).info("job {} waits until {}", job_id, not_before)
        else:
            self._enqueue(job)
            job.wait_light()
        if os.path.exists(stop_file := f"{self._inbox_text}/{job_id}.stop"):
            self._on_stop_file(Path(stop_file), job_id)

    def _serves(self, plugin: str) -> bool:
        return self.settings.serves is None or plugin in self.settings.serves

    def _enqueue(self, job: Job) -> None:
        self.queue.push(job.id, job.plugin.name, job.spec.priority, job.submitted_ns)
        self._wake.set()

    async def _release(self, job_id: str) -> None:
        job = self.jobs.get(job_id)
        if job is not None and job_id not in self.running and job_id not in self.queue:
            self._enqueue(job)

    def _set_aside_duplicate(self, path: Path, job_id: str) -> None:
        try:
            moved = self.spool.set_aside_duplicate(path, job_id)
        except FileNotFoundError:
            return
        state = ("running" if job_id in self.running
                 else "ending" if job_id in self._unfiled else "queued")
        logger.bind(job_id=job_id).warning(
            "{}: job {} is still {}; this resubmission was set aside as {}", path, job_id, state,
            moved)

    # --- recovery -------------------------------------------------------------------

    def _recover(self) -> None:
        """Pick up where the last daemon on this node left off, and take in what is queued."""
        for path in self.spool.running_files():
            self._guarded(self._recover_running, path)
        self._adopt_queued()

    def _guarded(self, action: Callable[..., None], path: Path, *args: Any) -> None:
        """One file that cannot be recovered is left where it is, and never stops the start."""
        try:
            action(path, *args)
        except FileNotFoundError:
            logger.debug("{}: taken by another node meanwhile", path)
        except OSError as exc:  # a disk fault: the sweeps try again
            logger.error("{}: cannot be taken up now: {}; trying again in {:g} s", path, exc,
                         RETRY_S)
            self._retry_soon()
        except Exception:  # noqa: BLE001
            logger.opt(exception=True).error("{}: could not be recovered; left in place", path)

    def _recover_running(self, path: Path) -> None:
        """A file in this node's running/ whose daemon died (this node's last one, or another
        node whose lease ran out): file it away if its run had ended, else queue it again.

        A terminal sidecar beside it means the run ended and only the move to done/
        was cut short, so it is filed away, never run again.
        """
        job_id = InboxName.of(path.name).job_id
        sidecar = self.outbox.read(job_id)
        if not os.path.lexists(path):
            return  # another node took it over meanwhile
        if sidecar is not None and sidecar.state.is_terminal:
            self._file_away_ended(path, job_id)
            return
        if sidecar is None or sidecar.started_at is None:  # being taken in, or waiting
            read = self._read_held(path)
            if sidecar is None or read.error is not None:
                self._take_in(path, job_id, read)  # its taking in was cut short
            else:
                self._let_wait(path, job_id, read, sidecar)
            return
        crashes = self.spool.count(job_id, "crashes")
        if crashes >= self.settings.max_crash_attempts:
            self._end(job_id, path, sidecar, JobState.FAILED, error=DaemonCrashed(
                f"the daemon died {crashes} times while running this job"))
            return
        was = sidecar.node or "?"
        queued = sidecar.model_copy(update={
            "state": JobState.QUEUED, "updated_at": utc_now(),
            "message": f"back in the queue: the daemon on {was} died while running it"})
        self.outbox.publish(queued, sidecar)  # while this node still holds it
        self.spool.requeue(path)
        logger.bind(job_id=job_id).warning(
            "job {} was running when the daemon on {} died; it runs again", job_id, was)

    def _adopt_queued(self) -> None:
        """Keep every queued job no job here stands for: taken in by another node, or by
        this one before a disk fault or a restart."""
        names, folder = self.spool.queued_names(), self.spool.queued
        self._not_adopted = {p: m for p, m in self._not_adopted.items() if p.name in names}
        for job in list(self.jobs.values()):  # queued here, claimed by another node since
            if job.folder != folder or job.name in names:
                continue
            if not os.path.lexists(job.path):
                self._claimed_elsewhere(job)
        for name in sorted(names):
            job_id = InboxName.of(name).job_id
            if job_id in self.jobs:
                continue
            path = folder / name
            if self._not_adopted.get(path, 0) != _mtime_ns(path):
                self._guarded(self._adopt, path, job_id)

    def _adopt(self, path: Path, job_id: str) -> None:
        identity = _file_identity(path)  # before reading: a later change shows at the claim
        read = self._read(path)
        if read is None:
            return  # claimed by another node meanwhile
        sidecar = self.outbox.read(job_id)
        if read.error is not None or read.plugin is None or not self._serves(read.plugin.name):
            self._not_adopted[path] = read.mtime_ns  # not for this node: look again if changed
            return
        if sidecar is None:  # its first sidecar is being written, or a power cut lost it
            sidecar = self._first_sidecar(job_id, read.document)
        self._admit(path, job_id, read, sidecar, identity)

    def _file_away_ended(self, path: Path, job_id: str) -> None:
        """The run has ended: forget its counts, then move its file to done/ for good.

        Counts go first: a crash in between leaves the file beside a terminal
        sidecar, which recovery files away (and forgets the counts) again. What the
        disk refuses now is tried again in RETRY_S.
        """
        self._unfiled.pop(job_id, None)
        try:
            self.spool.forget_counts(job_id)
            self.spool.finish(path, job_id)
        except FileNotFoundError:
            logger.bind(job_id=job_id).warning(
                "job {}: its file {} was removed while the job was active", job_id, path)
        except OSError as exc:
            logger.bind(job_id=job_id).error("job {}: cannot file away {}: {}; trying again "
                                             "in {:g} s", job_id, path, exc, RETRY_S)
            self._unfiled[job_id] = path
            self._retry_soon()
            return
        self._take_in_resubmitted(job_id)

    def _take_in_resubmitted(self, job_id: str) -> None:
        """A new run of ``job_id`` waits in the inbox for its last run's file to be filed
        away (see _intake): look at it now."""
        if (resubmitted := self._resubmitted.pop(job_id, None)) is not None:
            # As if seen unrenamed: a file written in place still gets its time to settle.
            self._pending.setdefault(resubmitted, False)
            self._wake.set()

    # --- running jobs -----------------------------------------------------------

    def _dispatch(self) -> None:
        while self._worker_free():
            job_id = self.queue.pop(self._has_room)
            if job_id is None:
                return
            job = self.jobs.get(job_id)
            if job is None:  # forgotten while queued (claimed by another node)
                continue
            try:
                self._start(job)
            except OSError as exc:  # the spool or the outbox fails (a full disk): wait, retry
                logger.error("job {}: could not start: {}; trying again in {:g} s", job_id, exc,
                             RETRY_S)
                self._enqueue(job)
                self._dispatch_held = True
                self._retry_soon()
                return

    def _worker_free(self) -> bool:
        """A job may start now: not stopping, not held back by a disk fault, a worker free."""
        return (not self._shutdown.is_set() and not self._dispatch_held
                and self._slots_held.total() < self.settings.workers)

    def _has_room(self, plugin: str) -> bool:
        limit = self.settings.max_concurrency(plugin)
        return limit is None or self._slots_held[plugin] < limit

    def _start(self, job: Job) -> None:
        claimed = self._claim(job)
        if claimed is None:
            self._claimed_elsewhere(job)
            return
        # The file and the sidecar on disk are the truth: what this node read when the job
        # was queued may be an earlier submission of the same id, run and ended elsewhere.
        old = self._sidecar_of(job)
        if old.state.is_terminal:
            self.jobs.pop(job.id, None)
            self._file_away_ended(claimed, job.id)
            return
        same_file = job.file_identity is not None and job.file_identity == _file_identity(
            claimed)
        if same_file and job.light:
            same_file = self._make_whole(job, claimed)
        if not same_file:
            # Not the file this node read: resubmitted meanwhile (done/ keeps the old file,
            # so a new one never has its inode).
            read = self._read_held(claimed)
            if read.error is not None:
                self.jobs.pop(job.id, None)
                self._end(job.id, claimed, old, JobState.FAILED, error=read.error)
                return
            if not self._serves(read.plugin.name):  # resubmitted for another plugin
                self.spool.requeue(claimed)
                self._forget(job)
                return
            job.spec, job.plugin, job.data = read.spec, read.plugin, read.data
        try:
            self._begin(job, claimed, old)
        except OSError:
            job.path = self.spool.requeue(claimed)  # as it was: queued
            raise

    def _make_whole(self, job: Job, held: Path) -> bool:
        """A job that waited light gets its checked spec and data again, from its file as
        read when it was queued (checked against the plugin it was taken in with). False
        if that file can no longer be read as valid: then it is read as a new one."""
        try:
            raw = read_job_bytes(held, self.settings.max_job_bytes)[0]
            job.spec, job.data = recheck(parse_document(raw, job.suffix), job.plugin)
        except (OSError, InvalidJob, ValidationError):
            return False
        job.light = False
        return True

    def _claim(self, job: Job) -> Path | None:
        """The file of a waiting job, in this node's running/: claimed from queued/, or there
        already. None if another node has it (or it is gone)."""
        if job.folder == self.spool.running:
            return job.path if os.path.lexists(job.path) else None
        return self.spool.claim(job.path)

    def _begin(self, job: Job, held: Path, old: Sidecar, published: bool = True) -> None:
        """Write the running sidecar of a job whose file this node holds, and run it.
        OSError when the sidecar cannot be written: then the job is not running."""
        attempt = old.attempt + 1 if old.started_at is not None else old.attempt
        now = utc_now()
        running = old.model_copy(update={
            "state": JobState.RUNNING, "attempt": attempt, "progress": 0.0, "message": None,
            "started_at": now, "finished_at": None, "updated_at": now, "error": None,
            "result": None, "node": self.settings.node, "pid": os.getpid(),
        })
        self.outbox.publish(running, old if published else None)
        job.path, job.sidecar, job.progress, job.light = held, running, None, False
        # As a retried job's last attempt left them.
        job.ending, job.final, job.settled, job.end_lock = False, None, None, threading.Lock()
        job.last_write_s = self._clock()  # the throttle counts from this write
        self.running[job.id] = job
        self._slots_held[job.plugin.name] += 1
        job.holds_slot = True
        job.task = asyncio.create_task(self._run(job), name=f"job {job.id}")

    def _sidecar_of(self, job: Job) -> Sidecar:
        """The sidecar on disk; else the one kept, or for a waiting job, its first again."""
        return (self.outbox.read(job.id) or job.sidecar
                or self._first_sidecar(job.id, _document_of(
                    job.path, job.suffix, self.settings.max_job_bytes)))

    def _claimed_elsewhere(self, job: Job) -> None:
        """Its file left queued/ before this node could claim it: another node's now, or
        removed by someone (then it fails as lost)."""
        self._forget(job)
        if self.spool.holds(job.id) or self._is_ended(job.id):
            logger.bind(job_id=job.id).debug("job {}: claimed by another node", job.id)
            return
        self._end(job.id, None, self._sidecar_of(job), JobState.FAILED, error=JobLost(
            f"its file left {job.path.parent} before it could run"))

    def _forget(self, job: Job) -> None:
        """Drop a job this node holds no file of: another node has it."""
        if self.jobs.get(job.id) is job:
            del self.jobs[job.id]
        self.queue.discard(job.id)
        if self._scheduler is not None and self._scheduler.get_job(f"not_before:{job.id}"):
            self._scheduler.remove_job(f"not_before:{job.id}")

    def _is_ended(self, job_id: str) -> bool:
        sidecar = self.outbox.read(job_id)
        return sidecar is not None and sidecar.state.is_terminal

    async def _run(self, job: Job) -> None:
        """Run the job, then record how it ended; whatever happens, its slot is freed."""
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
        del self.running[job.id]
        self._free_slot(job)
        self._unrecorded[job.id] = (job, verdict, again)
        self._record_unrecorded()
        self._wake.set()

    def _free_slot(self, job: Job) -> None:
        """The job no longer counts against ``workers`` and ``max_concurrency``: its run
        has ended, or its end is stamped and only the writing of its final sidecar is left,
        which the next job need not wait for."""
        if job.holds_slot:
            job.holds_slot = False
            self._slots_held[job.plugin.name] -= 1
            self._wake.set()

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
        flushed. ``_record_end`` finds it in ``job.final``; if anything goes wrong with it,
        that writes it, and reports what does, the ordinary way."""
        verdict = _flush_output(self.settings.frames / job.id, verdict)
        if not (record and verdict.state is not None and not job.fenced
                and not self._taken_over(job)):
            return verdict
        # Set before the write: a reader may see the sidecar before write() returns, and
        # a resubmission it makes must find the run ended (see _has_ended).
        job.final = _final_sidecar(job.sidecar.with_progress(job.progress), verdict.state,
                                   verdict.error, verdict.result)
        # Its end is stamped: the next job need not wait for the write and its flush.
        with contextlib.suppress(RuntimeError):  # the loop is closed: the daemon is exiting
            self._loop.call_soon_threadsafe(self._free_slot, job)
        try:
            self.outbox.write(job.final)
        except Exception:  # noqa: BLE001 - see above
            job.final = None
        return verdict

    def _record_unrecorded(self) -> None:
        """Record the ends of jobs in ``_unrecorded``; an end the disk refuses stays there
        (its job file where it is) and is tried again in RETRY_S."""
        for job_id, (job, verdict, again) in list(self._unrecorded.items()):
            try:
                self._record_end(job, verdict, again)
            except OSError as exc:
                logger.bind(job_id=job_id).error(
                    "job {}: cannot record its end: {}; trying again in {:g} s", job_id, exc,
                    RETRY_S)
                self._retry_soon()
                continue
            except Exception as exc:  # noqa: BLE001 - e.g. a result that cannot be written
                logger.opt(exception=True).bind(job_id=job_id).error(
                    "job {}: could not record its end; recording it as failed", job_id)
                self._unrecorded[job_id] = (job, Verdict(JobState.FAILED, error=KinodError(
                    f"its end could not be recorded: {type(exc).__name__}: {exc}")), False)
                self._retry_soon()
                continue
            del self._unrecorded[job_id]

    async def _execute(self, job: Job) -> Outcome:
        output_dir = self.settings.frames / job.id
        entry = self.settings.plugins.get(job.plugin.name)
        plugin_settings = entry.plugin_settings() if entry else {}

        def on_progress(percent: float, message: str | None) -> None:
            self._on_progress(job, percent, message)

        if entry is not None and entry.isolation == "process":
            job.run = ProcessRun(job.plugin.name, job.plugin.source, job.id, job.data,
                                 on_progress, output_dir=output_dir, settings=plugin_settings,
                                 models_dir=self.settings.models, outbox=self.settings.outbox,
                                 log_format=self.settings.log_format,
                                 log_level=self.settings.log_level, clock=self._clock)
        else:
            def make_plugin() -> BasePlugin:  # runs on the job's own thread, off the loop's
                return new_plugin(job.plugin.cls, output_dir, plugin_settings,
                                  self.settings.models)

            job.run = PluginRun(make_plugin, job.id, job.data, on_progress, clock=self._clock,
                                on_ended=functools.partial(self._settle_on_thread, job))
        if job.stop_requested:
            job.run.request_stop(StopReason.USER, self.settings.stop_grace)
        return await job.run.run(job.spec.timeout, job.spec.stall_timeout,
                                 self.settings.stop_grace)

    def _record_end(self, job: Job, verdict: Verdict, again: bool) -> None:
        if job.fenced or self._taken_over(job):
            self._fence(job)
            if self.jobs.get(job.id) is job:
                del self.jobs[job.id]
            self._take_in_resubmitted(job.id)  # the other node's run: it is seen to then
            return
        sidecar = job.sidecar.with_progress(job.progress)  # the last report may be unwritten
        if verdict.state is None:  # the daemon is stopping: back to the queue for next time
            job.sidecar = sidecar.model_copy(update={
                "state": JobState.QUEUED, "updated_at": utc_now(),
                "message": f"back in the queue: the daemon on {self.settings.node} stopped"})
            self.outbox.publish(job.sidecar, sidecar)
            self.spool.requeue(job.path)
            del self.jobs[job.id]
        elif again:
            job.sidecar = sidecar.model_copy(update={
                "state": JobState.QUEUED, "updated_at": utc_now(),
                "message": f"attempt {sidecar.attempt} failed ({verdict.error.message}); "
                           "it runs again"})
            self.outbox.publish(job.sidecar, sidecar)
            job.path = self.spool.requeue(job.path)
            self._enqueue(job)
        else:
            self._end(job.id, job.path, sidecar, verdict.state, error=verdict.error,
                      result=verdict.result, written=job.final)

    def _retry_left(self, job: Job) -> bool:
        """Count a retryable failure; True while the job's ``retries`` allow another run."""
        return job.spec.retries > 0 and self.spool.count(job.id, "failures") <= job.spec.retries

    def _on_progress(self, job: Job, percent: float, message: str | None) -> None:
        """The plugin's progress callback; runs on the plugin's thread."""
        job.progress = (percent, message)
        if not job.progress_pending:
            job.progress_pending = True
            try:
                self._loop.call_soon_threadsafe(self._progress_due, job)
            except RuntimeError:
                pass  # the loop is gone: the daemon is exiting

    def _progress_due(self, job: Job) -> None:
        """Write progress at most once per ``progress_interval_s``; the last report always wins."""
        job.progress_pending = False
        # `is job`: a plugin thread left behind must not write over a new run of its id.
        if self.running.get(job.id) is not job or job.progress_timer is not None:
            return
        wait_s = job.last_write_s + self.settings.progress_interval_s - self._clock()
        if wait_s > 0:
            job.progress_timer = self._loop.call_later(wait_s, self._write_progress, job)
        else:
            self._write_progress(job)

    def _write_progress(self, job: Job) -> None:
        job.progress_timer = None
        if self.running.get(job.id) is not job:
            return
        # Never waits: a held lock means the job's end is being written on its thread.
        if job.end_lock.acquire(blocking=False):
            try:
                self._write_progress_now(job)
            finally:
                job.end_lock.release()

    def _write_progress_now(self, job: Job) -> None:
        if job.progress is None or job.fenced or job.ending:
            return
        if self._taken_over(job):
            self._fence(job)
            return
        old = job.sidecar
        new = old.with_progress(job.progress)
        if new == old:
            return
        new = new.model_copy(update={"updated_at": utc_now()})
        try:
            self.outbox.publish(new, old)
        except OSError as exc:  # the next report tries again; the final state is retried
            logger.bind(job_id=job.id).warning("job {}: cannot write progress: {}", job.id, exc)
            return
        job.sidecar = new
        job.last_write_s = self._clock()

    # --- stopping jobs ----------------------------------------------------------

    def _on_stop_file(self, path: Path, job_id: str) -> None:
        job = self.jobs.get(job_id)
        if job is None:
            if inbox_has_job(self.settings.inbox, job_id) or self.spool.holds(job_id):
                return  # not taken in yet, or another node's: acted on where it runs
            logger.warning("{}: no queued or running job {}; stop request removed", path, job_id)
            _unlink(path)
            return
        if job.stop_requested:
            return
        if job_id in self.running:
            job.stop_requested = True
            logger.bind(job_id=job_id).info("job {}: stop requested", job_id)
            if job.run is not None:
                job.run.request_stop(StopReason.USER, self.settings.stop_grace)
            return  # the .stop file goes once the job has ended
        claimed = self._claim(job)  # so that no other node starts it meanwhile
        if claimed is None:
            self._claimed_elsewhere(job)  # its node acts on the .stop
            return
        job.path = claimed
        self.queue.discard(job_id)
        self._end(job_id, claimed, self._sidecar_of(job), JobState.STOPPED,
                  error=JobStopped("stopped on request before it started"))

    # --- ending jobs ------------------------------------------------------------

    def _end(self, job_id: str, path: Path | None, sidecar: Sidecar, state: JobState,
             error: KinodError | None = None, result: dict | None = None,
             published: bool = True, written: Sidecar | None = None) -> None:
        """The one way a job ends: final sidecar on disk (``written``: it is already), then
        its file (``path``, None when it is gone) filed away for good.

        OSError when the final sidecar cannot be written: then nothing has changed.
        """
        previous = sidecar if published else None
        if written is None:
            self.outbox.publish(_final_sidecar(sidecar, state, error, result), previous)
        else:
            self.outbox.published(written, previous)
        self.jobs.pop(job_id, None)
        # Looked for first: unlinking a missing file locks the inbox against every rename
        # into it and out of it. One made after the look is seen to by _on_stop_file.
        if os.path.lexists(stop := f"{self._inbox_text}/{job_id}.stop"):
            _unlink(stop)
        if path is not None:
            self._file_away_ended(path, job_id)


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


def _final_sidecar(sidecar: Sidecar, state: JobState, error: KinodError | None,
                   result: dict | None) -> Sidecar:
    now = utc_now()
    return sidecar.model_copy(update={
        "state": state, "finished_at": now, "updated_at": now,
        "progress": 100.0 if state is JobState.SUCCEEDED else sidecar.progress,
        "result": result if state is JobState.SUCCEEDED else None,
        "error": SidecarError(code=error.code, message=error.message) if error else None,
    })


def _document_of(path: Path, suffix: str, max_bytes: int) -> dict[str, Any] | None:
    """The document in a job file, for a sidecar's ``task``; None if it cannot be read now."""
    try:
        return parse_document(read_job_bytes(path, max_bytes)[0], suffix)
    except (OSError, InvalidJob):
        return None


def _mtime_ns(path: Path) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return None


def _identity(folder: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(folder)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _file_identity(path: Path) -> int | None:
    """Which file (and version) ``path`` is: a hash of its inode, mtime and size."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return hash((st.st_ino, st.st_mtime_ns, st.st_size))


# The folders job files are in (queued/, running/<node>/) and their suffixes, one object
# each: a backlog of 100,000 jobs shares them.
_folders: dict[str, Path] = {}
_suffixes: dict[str, str] = {}


def _place(path: Path) -> tuple[Path, str]:
    """A job file's folder and suffix (what follows its id: the last dot on)."""
    folder, name = os.path.split(path)  # as text: Path.parent and .name cost more
    suffix = "." + name.rpartition(".")[2]
    shared = _folders.get(folder)
    if shared is None:  # of the path's own class: equal to the spool's Paths, which made it
        shared = _folders[folder] = path.parent
    return shared, _suffixes.setdefault(suffix, suffix)


def _is_empty_folder(folder: Path) -> bool:
    try:
        with os.scandir(folder) as entries:
            return next(entries, None) is None
    except FileNotFoundError:
        return True


def _unlink(path: str | Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

