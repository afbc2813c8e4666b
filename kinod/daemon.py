"""The daemon: the event loop, start-up and shutdown, signals and reload, and the wiring
between the stages of a job's life (see kinod.stages), which do the work."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from loguru import logger

from kinod.config import Settings
from kinod.errors import ConfigError
from kinod.hooks import Hooks
from kinod.intake import InboxName
from kinod.listing_gate import ListingGate
from kinod.logs import add_job_log_sink, setup_logging
from kinod.models import utc_now
from kinod.outbox import Outbox
from kinod.plugins.plugin_loader import PluginRegistry
from kinod.retention import BATCH as PRUNE_BATCH
from kinod.retention import prune_ended
from kinod.spool import Spool
from kinod.stages.context import RETRY_S, Context
from kinod.stages.dependencies import Dependencies
from kinod.stages.ending import Ending
from kinod.stages.fleet import Fleet
from kinod.stages.holds import Holds
from kinod.stages.intake import Intake
from kinod.stages.recovery import Recovery
from kinod.stages.running import Running
from kinod.stages.scheduler import Scheduler
from kinod.stages.stops import Stops
from kinod.systemd import Notifier
from kinod.watcher import InboxWatcher, choose_watch_mode

# How often systemd hears the running and queued counts (when they changed).
STATUS_INTERVAL_S = 1.0
# Settings a reload cannot change: the folders and the name kinod serves under.
PRUNE_INTERVAL_S = 3600.0
RESTART_ONLY = ("inbox", "outbox", "frames", "models", "node", "watch")


class Daemon:
    def __init__(self, settings: Settings, registry: PluginRegistry | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time,
                 reload_settings: Callable[[], Settings] | None = None,
                 notifier: Notifier | None = None) -> None:
        # SIGHUP: read the settings again (None: there is nothing to reload from).
        self._reload_settings = reload_settings
        self._notifier = notifier if notifier is not None else Notifier()
        self._last_status = ""
        self._status_paused = False  # the status tick sleeps while nothing changes
        self._wake = asyncio.Event()
        self._shutdown = asyncio.Event()
        self._signals = 0
        self._retry_timer: asyncio.TimerHandle | None = None
        self._inbox_identity: tuple[int, int] | None = None  # to notice it replaced
        self._node_lock: int | None = None
        registry = registry if registry is not None else PluginRegistry(settings.plugin_dirs)
        spool = Spool(settings.inbox, settings.node)
        self.ctx = ctx = Context(settings, registry, spool, Outbox(settings.outbox), clock,
                                 wall_clock, wake=self._wake.set, retry_soon=self._retry_soon,
                                 stopping=self._shutdown.is_set)
        self._watch_mode = choose_watch_mode(settings.watch, settings.inbox)
        # The stages, each reaching the others through ctx (see kinod.stages).
        ctx.intake, ctx.scheduler, ctx.running = Intake(ctx), Scheduler(ctx), Running(ctx)
        ctx.ending, ctx.recovery, ctx.stops = Ending(ctx), Recovery(ctx), Stops(ctx)
        ctx.fleet = Fleet(ctx, polling=self._watch_mode == "poll")
        ctx.holds, ctx.dependencies = Holds(ctx), Dependencies(ctx)
        ctx.hooks = Hooks(settings, spool.root)
        # The inbox; queued/ for jobs other nodes on this machine take in; running/, where a
        # node starting writes its pid into its lock file.
        self._watcher = InboxWatcher([settings.inbox, spool.queued, spool.running_root],
                                     self._on_inbox_event)
        self._spool_text = str(spool.root)
        self._gates = tuple(ListingGate(folder, clock, settings.rescan_interval_s)
                            for folder in (settings.inbox, spool.queued, spool.running))
        self._queued_text, self._running_root_text = str(spool.queued), str(spool.running_root)

    @property
    def settings(self) -> Settings:
        return self.ctx.settings

    # --- start and stop ---------------------------------------------------------------

    async def run(self, burst: bool = False) -> None:
        """Serve until SIGTERM/SIGINT (or, with ``burst``, until there is nothing left to do)."""
        ctx = self.ctx
        ctx.loop = asyncio.get_running_loop()
        self._install_signal_handlers()
        self._prepare_folders()
        self._inbox_identity = _identity(self.settings.inbox)
        self._node_lock = ctx.spool.lock_node()
        self._log_start()
        # UTC, like every time kinod keeps: nothing depends on the host's time zone files.
        ctx.timers = AsyncIOScheduler(event_loop=ctx.loop, timezone=UTC)
        polling = self._watch_mode == "poll"
        self.ctx.timers.add_job(
            self._rescan, "interval", id="rescan", coalesce=True, max_instances=1,
            seconds=self.settings.poll_interval_s if polling else self.settings.rescan_interval_s)
        # Four beats a lease: a node is given up on only after several missed ones.
        self.ctx.timers.add_job(ctx.fleet.heartbeat, "interval", seconds=self.settings.lease / 4,
                                id="heartbeat", coalesce=True, max_instances=1)
        ctx.fleet.start()
        ctx.hooks.start()  # before recovery, which may queue the hooks of ends a crash cut
        ctx.holds.look_at_pause()  # before any job is taken in or started
        ctx.recovery.recover()  # may schedule not_before releases: the timers exist by now
        if not polling:
            self._watcher.start(self.ctx.loop)
        self.ctx.timers.add_job(self._prune_ended, "interval", seconds=PRUNE_INTERVAL_S,
                                id="retention", coalesce=True, max_instances=1,
                                next_run_time=datetime.now(UTC))  # and once at start
        self.ctx.timers.add_job(self._tell_status, "interval", seconds=STATUS_INTERVAL_S,
                                id="status", coalesce=True, max_instances=1)
        if self._notifier.watchdog_s:
            # From the loop itself: a loop that hangs stops the pings, and systemd restarts it.
            self.ctx.timers.add_job(self._notifier.watchdog, "interval", id="watchdog",
                                    seconds=self._notifier.watchdog_s / 2, coalesce=True)
        self.ctx.timers.start()
        self._rescan_now()
        logger.info("kinod ready on node {}: {} queued, watching by {}", self.settings.node,
                    len(ctx.scheduler), self._watch_mode)
        self._notifier.ready(self._status())
        try:
            while not self._shutdown.is_set():
                await self._turn()
                if burst and self._idle():
                    break
                if not ctx.intake.has_pending():
                    await self._wait_for_work()
        finally:
            await self._stop_everything()
            if self._node_lock is not None:
                os.close(self._node_lock)

    def _prepare_folders(self) -> None:
        ctx = self.ctx
        for key, make in (("inbox", ctx.spool.ensure_folders),
                          ("outbox", ctx.outbox.ensure_folder),
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
            logger.info("stopping: {} running jobs get {:g} s to stop", len(self.ctx.running),
                        self.settings.stop_grace)
        else:
            logger.warning("stopping now")
            self.ctx.running.force_stop_all()
        self._shutdown.set()
        self._wake.set()

    def _install_signal_handlers(self) -> None:
        handlers = {signal.SIGTERM: self.request_shutdown, signal.SIGINT: self.request_shutdown,
                    signal.SIGHUP: self.reload}
        for sig, handler in handlers.items():
            try:
                self.ctx.loop.add_signal_handler(sig, handler)
            except (RuntimeError, ValueError):  # not the main thread (tests run it in one)
                return

    async def _stop_everything(self) -> None:
        self._watcher.stop()
        if self.ctx.timers is not None:
            self.ctx.timers.shutdown(wait=False)
        self.ctx.intake.cancel_timers()
        if self._retry_timer is not None:
            self._retry_timer.cancel()
        await self.ctx.running.stop_all()
        self.ctx.ending.record_unrecorded()  # a last try; what fails runs again after a restart
        self.ctx.hooks.stop()  # what is not delivered waits on disk for the next start
        self.ctx.fleet.stop()
        logger.info("kinod stopped")

    def _log_start(self) -> None:
        s = self.settings
        logger.info("kinod starting: node {} pid {}, inbox {}, outbox {}, {} workers",
                    s.node, os.getpid(), s.inbox, s.outbox, s.workers)
        registry = self.ctx.registry
        logger.info("plugins: {}", ", ".join(sorted(registry.plugins)) or "none")
        for name, error in registry.errors.items():
            logger.error("plugin {} failed to load: {}", name, error)

    # --- the loop -----------------------------------------------------------------------

    async def _wait_for_work(self) -> None:
        await self._wake.wait()
        self._wake.clear()

    async def _turn(self) -> None:
        intake = self.ctx.intake
        intake.take_turn()
        self.ctx.fleet.send_mail()
        self.ctx.scheduler.dispatch()
        # Every change to the counts is followed by a turn (a job's end wakes the loop).
        if self._status_paused and self._status() != self._last_status:
            self._status_paused = False
            self.ctx.timers.resume_job("status")
        if intake.has_pending():
            await asyncio.sleep(0)

    def _idle(self) -> bool:
        ctx = self.ctx
        return ctx.intake.idle() and not len(ctx.running) and not ctx.scheduler.queued()

    # --- reload and status ------------------------------------------------------------

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
        ctx = self.ctx
        for key in RESTART_ONLY:
            if getattr(new, key) != getattr(ctx.settings, key):
                raise ConfigError(f"{key} cannot change while kinod runs; restart it")
        registry = PluginRegistry(new.plugin_dirs)
        for name, error in registry.errors.items():
            logger.error("plugin {} failed to load: {}", name, error)
        old, ctx.settings, ctx.registry = ctx.settings, new, registry
        ctx.fleet.set_lease(new.lease)
        for gate in self._gates:
            gate.safety_s = new.rescan_interval_s
        ctx.hooks.update_settings(new)
        if (new.log_format, new.log_level) != (old.log_format, old.log_level):
            setup_logging(new.log_format, new.log_level)
            add_job_log_sink(new.outbox)
        if (new.rescan_interval_s, new.poll_interval_s, new.lease) != (
                old.rescan_interval_s, old.poll_interval_s, old.lease):
            self.ctx.timers.reschedule_job("rescan", trigger="interval", seconds=(
                new.poll_interval_s if self._watch_mode == "poll" else new.rescan_interval_s))
            self.ctx.timers.reschedule_job("heartbeat", trigger="interval",
                                           seconds=new.lease / 4)
        logger.info("reloaded; plugins: {}", ", ".join(sorted(registry.plugins)) or "none")
        ctx.recovery.forget_passed_over()  # queued jobs of plugins this node serves now
        self._rescan_now()

    async def _prune_ended(self) -> None:
        """Retention (``keep_ended_days``): once an hour, in batches, off the loop (it reads
        every sidecar in the outbox)."""
        if self.settings.keep_ended_days is None:
            return
        try:
            while (await asyncio.to_thread(prune_ended, self.settings, utc_now())
                   == PRUNE_BATCH and not self._shutdown.is_set()):
                pass
        except OSError as exc:
            logger.error("retention: {}; trying again in an hour", exc)

    def _status(self) -> str:
        ctx = self.ctx
        status = f"{len(ctx.running)} running, {ctx.scheduler.queued()} queued"
        if len(ctx.dependencies):
            status += f", {len(ctx.dependencies)} waiting for dependencies"
        return f"paused; {status}" if ctx.holds.paused else status

    async def _tell_status(self) -> None:
        """Tell systemd the status when it has changed, at most once a STATUS_INTERVAL_S.
        A tick that finds nothing new pauses the ticks until a turn of the loop changes
        the counts: an idle daemon has no reason to wake every second."""
        status = self._status()
        if status != self._last_status:
            self._last_status = status
            self._notifier.status(status)
        else:
            self.ctx.timers.pause_job("status")
            self._status_paused = True

    # --- finding files ----------------------------------------------------------------

    def _on_inbox_event(self, path: str, renamed: bool) -> None:
        """The watcher's paths, handed to the stage they concern."""
        if path in (self.ctx.inbox_text, self._spool_text):  # deleted: is the inbox still there?
            self._rescan_now()
            self._retry_soon()  # and again in a moment: it may be halfway through deletion
            return
        folder, name = os.path.split(path)
        if folder == self._running_root_text:
            if name.endswith(".lock") and name != self.ctx.fleet.own_lock:
                self.ctx.fleet.another_node_started()
            return
        if folder == self._queued_text:  # another node took a job in
            self.ctx.recovery.on_queued(Path(path), InboxName.of(name).job_id)
            return
        if folder == self.ctx.inbox_text:
            self.ctx.intake.arrived(path, renamed)

    async def _rescan(self) -> None:
        self._rescan_now(gated=self._watch_mode == "poll")

    def _rescan_now(self, gated: bool = False) -> None:
        """Look at every name in the inbox: catches whatever the watcher missed. Also take
        up queued files no job stands for (their acceptance was cut short by a disk fault).

        ``gated`` (a poll): a folder whose mtime says nothing changed since it was last
        listed is not listed again (kinod.listing_gate), so that many nodes polling one
        share cost its server a stat each, not a listing each, while nothing happens. And
        beside other nodes a poll lists only what the fleet's plan gives it (the inbox on
        this node's turn, and queued/ with it: Fleet.poll_plan), so that a burst
        does not cost a listing per node either; the stop files of the jobs running here
        are looked for by name meanwhile."""
        if not self._inbox_is_served():
            return
        ctx = self.ctx
        inbox, queued, running = self._gates
        shared, orphans = ctx.fleet.poll_plan() if gated else (True, True)
        try:
            if not gated or (shared and inbox.should_list()):
                ctx.intake.scan()
        except OSError as exc:
            # Deleted between the look above and the listing: the look again says so now.
            if self._inbox_is_served():
                logger.error("cannot list the inbox {}: {}; trying again in {:g} s",
                             self.settings.inbox, exc, RETRY_S)
                self._retry_soon()
            return
        ctx.holds.look_at_pause()
        if not shared:
            ctx.stops.look_for_running()
        for name in ctx.fleet.mail() if gated else ():
            if (what := InboxName.of(name)).kind == "job":  # mail is anyone's to write
                ctx.recovery.on_queued(ctx.spool.queued / name, what.job_id)
        if not gated or (shared and queued.should_list()):
            ctx.recovery.adopt_queued()
        if not ctx.holds.paused:
            ctx.recovery.steal(self.settings.workers - len(ctx.running) - ctx.scheduler.queued())
        if not gated or (orphans and running.should_list()):
            ctx.recovery.recover_orphans()
        self._wake.set()

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
            self.ctx.spool.ensure_folders()
            os.close(self._node_lock)
            self._node_lock = None
            self._node_lock = self.ctx.spool.lock_node()
            if self._watch_mode != "poll":
                self._watcher.stop()
                self._watcher.start(self.ctx.loop)
            self._inbox_identity = identity
        return True

    # --- what the disk refused ----------------------------------------------------------

    def _retry_soon(self) -> None:
        """Try again what the disk refused, in RETRY_S (one timer for everything)."""
        if self._retry_timer is None and not self._shutdown.is_set():
            self._retry_timer = self.ctx.loop.call_later(RETRY_S, self._retry_now)

    def _retry_now(self) -> None:
        self._retry_timer = None
        self.ctx.scheduler.resume()
        self.ctx.ending.retry()
        self._rescan_now()


def _identity(folder: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(folder)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino
