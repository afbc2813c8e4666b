"""Runs one job on one plugin instance, under the job's timeout, stall timeout and stop grace.

``SupervisedRun`` holds the supervision every way of running a plugin shares;
``PluginRun`` runs the plugin in a thread with its own event loop. The thread
keeps a plugin that blocks (``time.sleep``, CPU-bound work, sync I/O inside
``generate``) from freezing the daemon: the daemon's loop goes on taking jobs,
writing progress and acting on stop requests. (``kinod.isolation.ProcessRun``
runs it in a child process instead.)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from kinod.job_threads import job_threads
from kinod.models import clean_text
from kinod.outcome import Outcome, StopReason
from kinod.plugins.base_plugin import BasePlugin

if TYPE_CHECKING:
    from kinod.config import Settings

# After a forced cancel, how long to wait for the plugin to let go (an async plugin
# does in milliseconds; one stuck in blocking code never does).
CANCEL_WAIT_S = 1.0

ProgressSink = Callable[[float, "str | None"], None]

# Top-level settings that name a plugin's own folder: each reaches that plugin as a key of its
# settings (as a path's text), unless plugins.<name> sets the key itself.
PLUGIN_FOLDERS: dict[str, tuple[str, ...]] = {"comfyui": ("workflows",), "blender": ("projects",)}


def plugin_settings(settings: Settings, name: str) -> dict[str, Any]:
    """What ``plugin.settings`` holds for plugin ``name``: its own keys from
    ``plugins.<name>``, and the top-level folders it reads (``PLUGIN_FOLDERS``)."""
    entry = settings.plugins.get(name)
    own = entry.plugin_settings() if entry is not None else {}
    for key in PLUGIN_FOLDERS.get(name, ()):
        own.setdefault(key, str(getattr(settings, key)))
    return own


def new_plugin(cls: type[BasePlugin], output_dir: Path, settings: dict[str, Any],
               models_dir: Path) -> BasePlugin:
    """One instance for one job, with what kinod sets before ``generate()``."""
    plugin = cls()
    plugin.output_dir = output_dir
    plugin.settings = dict(settings)
    plugin.models_dir = models_dir
    return plugin


class SupervisedRun(ABC):
    """One run of a plugin, as the daemon drives it: ``run()``, ``request_stop()`` and
    ``force_stop()`` on the daemon's loop.

    A subclass starts the plugin (``_start``), asks it to stop (``_ask_to_stop``),
    cancels it once the grace has passed (``_cancel``) and says what to do when
    even that is ignored (``_give_up``). It passes each progress report to
    ``_progress`` and calls ``_end()`` once the plugin has ended, from any thread.
    """

    cancel_wait_s = CANCEL_WAIT_S  # after _cancel(), how long before _give_up()

    def __init__(self, job_id: str, on_progress: ProgressSink,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.job_id = job_id
        self._on_progress = on_progress
        self._clock = clock
        self._outcome = Outcome()
        # Flags, not threading.Events: nothing waits on them, and an Event costs a
        # Condition and a lock per job. _returned: generate() is over, and what follows is
        # kinod's own work, which no timeout or stop applies to (set by a subclass that
        # settles the end on the plugin's side).
        self._returned = False
        self._finished = False
        self._wake: asyncio.Event | None = None
        self._main_loop: asyncio.AbstractEventLoop | None = None
        self._last_report: tuple[float, str | None] | None = None
        self._last_progress_at = clock()
        # While the plugin says it waits (update_progress(waiting=True): e.g. its prompt sits
        # in a server's queue), neither the timeout nor the stall limit runs; both count from
        # the moment it says the work began.
        self._waiting = False
        self._started_at = clock()
        self._stop_deadline: float | None = None

    # --- called on the daemon's loop --------------------------------------

    async def run(self, timeout_s: float | None, stall_timeout_s: float | None,
                  grace_s: float) -> Outcome:
        """Run the plugin to its end, or until stopped; never raises for the plugin's faults."""
        self._main_loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._started_at = self._clock()
        self._start()
        cancel_deadline: float | None = None  # once cancelled: when to give up waiting
        while not self._finished:
            if self._returned:  # its end is being settled: no timeout or stop applies now
                self._wake.clear()
                if not self._finished:  # set before _end() wakes us: checked after clear()
                    await self._wake.wait()
                continue
            now = self._clock()
            if self._outcome.stop_reason is None:
                if self._waiting:  # held: no limit runs
                    pass
                elif timeout_s is not None and now - self._started_at >= timeout_s:
                    self.request_stop(StopReason.TIMEOUT, grace_s, limit_s=timeout_s)
                elif (stall_timeout_s is not None
                      and now - self._last_progress_at >= stall_timeout_s):
                    self.request_stop(StopReason.STALL, grace_s, limit_s=stall_timeout_s)
            else:
                self._tell_plugin_to_stop()  # again: a blocking plugin may have reset it
                if not self._outcome.forced:
                    if now >= self._stop_deadline:
                        self._outcome.forced = True
                        self._cancel()
                        cancel_deadline = now + self.cancel_wait_s
                elif cancel_deadline is not None and now >= cancel_deadline:
                    more_s = self._give_up()
                    if more_s is None:
                        break
                    cancel_deadline = now + more_s
            wait_s = self._next_check_s(self._started_at, timeout_s, stall_timeout_s,
                                        cancel_deadline)
            self._wake.clear()
            # A timer that sets the event, not asyncio.wait_for: that makes a task and a
            # future for every wait, once or more a job.
            timer = self._main_loop.call_later(wait_s, self._wake.set)
            try:
                await self._wake.wait()
            finally:
                timer.cancel()
        return self._outcome

    def request_stop(self, reason: StopReason, grace_s: float,
                     limit_s: float | None = None) -> None:
        """Ask the plugin to stop; it is cancelled by force after ``grace_s``."""
        if self._outcome.stop_reason is not None:
            return
        self._outcome.stop_reason = reason
        self._outcome.limit_s = limit_s
        self._stop_deadline = self._clock() + grace_s
        self._ask_to_stop()
        if self._wake is not None:
            self._wake.set()

    def force_stop(self) -> None:
        """Cancel now, without waiting for the rest of the grace period."""
        self.request_stop(StopReason.SHUTDOWN, 0.0)
        self._stop_deadline = self._clock()
        if self._wake is not None:
            self._wake.set()

    def _next_check_s(self, started: float, timeout_s: float | None,
                      stall_timeout_s: float | None, cancel_deadline: float | None) -> float:
        now = self._clock()
        moments = [cancel_deadline]
        if self._outcome.stop_reason is None and not self._waiting:
            if timeout_s is not None:
                moments.append(started + timeout_s)
            if stall_timeout_s is not None:
                moments.append(self._last_progress_at + stall_timeout_s)
        elif not self._outcome.forced:
            moments.append(self._stop_deadline)
        upcoming = [m - now for m in moments if m is not None]
        # Re-check at least every second: stall deadlines move with each report.
        return max(0.0, min([1.0, *upcoming]))

    @abstractmethod
    def _start(self) -> None:
        """Start the plugin's run; return at once."""

    @abstractmethod
    def _ask_to_stop(self) -> None:
        """Pass a stop request on to the plugin (once per run)."""

    @abstractmethod
    def _tell_plugin_to_stop(self) -> None:
        """Called at every check while the plugin is being stopped."""

    @abstractmethod
    def _cancel(self) -> None:
        """End the plugin's ``generate()`` by force: the grace has passed."""

    @abstractmethod
    def _give_up(self) -> float | None:
        """The plugin ignores cancellation: act, and return how much longer to wait for its
        end (None: not at all, ``run()`` returns now)."""

    # --- called from any thread ----------------------------------------------

    def _progress(self, value: Any, message: Any = None, *, waiting: bool | None = None) -> None:
        """The callback given to ``generate()``; may be called thousands of times a second.
        ``waiting``: see ``BasePlugin.update_progress``."""
        if waiting is not None and bool(waiting) != self._waiting:
            if not waiting:  # the work begins: the timeout and the stall limit count from now
                self._started_at = self._last_progress_at = self._clock()
            self._waiting = bool(waiting)
        try:
            percent = max(0.0, min(100.0, float(value)))
        except (TypeError, ValueError):
            return
        report = (percent, None if message is None else clean_text(str(message)))
        if report != self._last_report:
            self._last_report = report
            self._last_progress_at = self._clock()
            self._on_progress(*report)

    _progress.accepts_waiting = True  # type: ignore[attr-defined]  # see update_progress

    def _end(self) -> None:
        """The plugin's run has ended: wake ``run()``."""
        self._finished = True
        if self._main_loop is not None and self._wake is not None:
            with contextlib.suppress(RuntimeError):  # the daemon's loop is gone
                self._main_loop.call_soon_threadsafe(self._wake.set)


class PluginRun(SupervisedRun):
    """One run of a plugin in a thread of its own. ``make_plugin`` builds the instance on that
    thread, so a constructor that loads a model for a minute does not hold up the daemon
    either."""

    def __init__(self, make_plugin: Callable[[], BasePlugin], job_id: str, data: dict[str, Any],
                 on_progress: ProgressSink, clock: Callable[[], float] = time.monotonic,
                 on_ended: Callable[[Outcome], None] | None = None) -> None:
        super().__init__(job_id, on_progress, clock)
        self._make_plugin = make_plugin
        # Called on the plugin's thread once generate() has ended, before run() returns:
        # work on the job's end done there saves the daemon a hop to another thread.
        self._on_ended = on_ended
        self.plugin: BasePlugin | None = None
        self.data = data
        self._job_loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None

    # --- called on the daemon's loop --------------------------------------

    def _start(self) -> None:
        job_threads.run(self._thread_main, name=f"job-{self.job_id}")

    def _ask_to_stop(self) -> None:
        self._tell_plugin_to_stop()
        if self._job_loop is not None:
            with contextlib.suppress(RuntimeError):  # its loop already closed: it has ended
                asyncio.run_coroutine_threadsafe(self._call_stop(), self._job_loop)

    def _tell_plugin_to_stop(self) -> None:
        if self.plugin is not None:
            self.plugin.should_stop = True

    def _cancel(self) -> None:
        if self._job_loop is not None and self._task is not None:
            with contextlib.suppress(RuntimeError):
                self._job_loop.call_soon_threadsafe(self._task.cancel)

    def _give_up(self) -> None:
        logger.bind(job_id=self.job_id).error(
            "job {}: the plugin ignores cancellation; its thread is left behind", self.job_id)
        return None

    # --- called on the plugin's thread -------------------------------------

    def _thread_main(self, loop: asyncio.AbstractEventLoop) -> None:
        self._job_loop = loop
        spawned = _track_tasks(loop)
        try:
            self._task = loop.create_task(self._generate())
            if self._outcome.stop_reason is not None:  # stopped before the loop existed
                loop.call_soon(lambda: loop.create_task(self._call_stop()))
            self._outcome.result = loop.run_until_complete(self._task)
        except BaseException as exc:  # noqa: BLE001 - SystemExit from a plugin included
            self._outcome.exception = exc
        finally:
            with contextlib.suppress(BaseException):
                _cancel_leftovers(loop, spawned)
            # The thread keeps the loop for its next job: a late stop must not reach it.
            self._job_loop = None
            self._returned = True
            try:
                if self._on_ended is not None:
                    self._on_ended(self._outcome)
            except Exception:  # noqa: BLE001 - the daemon's loop settles the end instead
                logger.opt(exception=True).bind(job_id=self.job_id).error(
                    "job {}: its end could not be settled on its thread", self.job_id)
            finally:
                self._end()  # whatever happened: run() waits for nothing else now

    async def _generate(self) -> Any:
        with logger.contextualize(job_id=self.job_id):
            self.plugin = self._make_plugin()
            if self._outcome.stop_reason is not None:
                self.plugin.should_stop = True
            return await self.plugin.generate(self.job_id, self.data, self._progress)

    async def _call_stop(self) -> None:
        if self.plugin is None:
            return  # still being built: _generate tells it
        if self._finished:
            return  # asked just as it ended; this loop serves another job by now
        try:
            await self.plugin.stop()
        except Exception as exc:  # noqa: BLE001
            logger.bind(job_id=self.job_id).warning("job {}: plugin stop() raised {!r}",
                                                    self.job_id, exc)


def _track_tasks(loop: asyncio.AbstractEventLoop) -> weakref.WeakSet[asyncio.Task]:
    """The tasks made on ``loop`` from now on. (asyncio.all_tasks() walks every task of the
    process, finished ones too until they are collected: thousands, on a busy daemon.)"""
    tasks: weakref.WeakSet[asyncio.Task] = weakref.WeakSet()

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task:
        task = asyncio.Task(coro, loop=loop, **kwargs)
        tasks.add(task)
        return task

    loop.set_task_factory(factory)
    return tasks


def _cancel_leftovers(loop: asyncio.AbstractEventLoop, spawned: Iterable[asyncio.Task]) -> None:
    """Cancel tasks the plugin started and forgot, as asyncio.run() does. (Async generators
    it left open are closed when collected, or when the thread closes its loop.)"""
    pending = [t for t in spawned if not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
