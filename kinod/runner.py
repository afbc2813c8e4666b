"""Runs one job on one plugin instance, in a thread with its own event loop.

The thread keeps a plugin that blocks (``time.sleep``, CPU-bound work, sync
I/O inside ``generate``) from freezing the daemon: the daemon's loop goes on
taking jobs, writing progress and acting on stop requests. The supervisor
enforces the job's timeout, stall timeout and the stop grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

from loguru import logger

from kinod.models import clean_text
from kinod.outcome import Outcome, StopReason
from kinod.plugins.base_plugin import BasePlugin

# After a forced cancel, how long to wait for the plugin's thread to let go (an async
# plugin does in milliseconds; a thread stuck in blocking code never does).
CANCEL_WAIT_S = 1.0

ProgressSink = Callable[[float, "str | None"], None]


class PluginRun:
    """One run of a plugin. ``make_plugin`` builds the instance on the run's own thread, so a
    constructor that loads a model for a minute does not hold up the daemon either."""

    def __init__(self, make_plugin: Callable[[], BasePlugin], job_id: str, data: dict[str, Any],
                 on_progress: ProgressSink, clock: Callable[[], float] = time.monotonic) -> None:
        self._make_plugin = make_plugin
        self.plugin: BasePlugin | None = None
        self.job_id = job_id
        self.data = data
        self._on_progress = on_progress
        self._clock = clock
        self._outcome = Outcome()
        self._finished = threading.Event()
        self._wake: asyncio.Event | None = None
        self._main_loop: asyncio.AbstractEventLoop | None = None
        self._job_loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._last_report: tuple[float, str | None] | None = None
        self._last_progress_at = clock()
        self._stop_deadline: float | None = None

    # --- called on the daemon's loop --------------------------------------

    async def run(self, timeout_s: float | None, stall_timeout_s: float | None,
                  grace_s: float) -> Outcome:
        """Run the plugin to its end, or until stopped; never raises for the plugin's faults."""
        self._main_loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        started = self._clock()
        thread = threading.Thread(target=self._thread_main, name=f"job-{self.job_id}",
                                  daemon=True)
        thread.start()
        cancel_deadline: float | None = None
        while not self._finished.is_set():
            now = self._clock()
            if self._outcome.stop_reason is None:
                if timeout_s is not None and now - started >= timeout_s:
                    self.request_stop(StopReason.TIMEOUT, grace_s, limit_s=timeout_s)
                elif (stall_timeout_s is not None
                      and now - self._last_progress_at >= stall_timeout_s):
                    self.request_stop(StopReason.STALL, grace_s, limit_s=stall_timeout_s)
            else:
                self._tell_plugin_to_stop()  # again: a blocking plugin may have reset it
                if cancel_deadline is None and now >= self._stop_deadline:
                    self._outcome.forced = True
                    self._cancel()
                    cancel_deadline = now + CANCEL_WAIT_S
                elif cancel_deadline is not None and now >= cancel_deadline:
                    logger.bind(job_id=self.job_id).error(
                        "job {}: the plugin ignores cancellation; its thread is left behind",
                        self.job_id)
                    break
            wait_s = self._next_check_s(started, timeout_s, stall_timeout_s, cancel_deadline)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait_s)
        return self._outcome

    def request_stop(self, reason: StopReason, grace_s: float,
                     limit_s: float | None = None) -> None:
        """Ask the plugin to stop; it is cancelled by force after ``grace_s``."""
        if self._outcome.stop_reason is not None:
            return
        self._outcome.stop_reason = reason
        self._outcome.limit_s = limit_s
        self._stop_deadline = self._clock() + grace_s
        self._tell_plugin_to_stop()
        if self._job_loop is not None:
            with contextlib.suppress(RuntimeError):  # its loop already closed: it has ended
                asyncio.run_coroutine_threadsafe(self._call_stop(), self._job_loop)
        if self._wake is not None:
            self._wake.set()

    def _tell_plugin_to_stop(self) -> None:
        if self.plugin is not None:
            self.plugin.should_stop = True

    def force_stop(self) -> None:
        """Cancel now, without waiting for the rest of the grace period."""
        self.request_stop(StopReason.SHUTDOWN, 0.0)
        self._stop_deadline = self._clock()
        if self._wake is not None:
            self._wake.set()

    def _next_check_s(self, started: float, timeout_s: float | None,
                      stall_timeout_s: float | None, cancel_deadline: float | None) -> float:
        now = self._clock()
        moments = [cancel_deadline, self._stop_deadline]
        if self._outcome.stop_reason is None:
            if timeout_s is not None:
                moments.append(started + timeout_s)
            if stall_timeout_s is not None:
                moments.append(self._last_progress_at + stall_timeout_s)
        upcoming = [m - now for m in moments if m is not None]
        # Re-check at least every second: stall deadlines move with each report.
        return max(0.0, min([1.0, *upcoming]))

    def _cancel(self) -> None:
        if self._job_loop is not None and self._task is not None:
            with contextlib.suppress(RuntimeError):
                self._job_loop.call_soon_threadsafe(self._task.cancel)

    # --- called on the plugin's thread -------------------------------------

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self._job_loop = loop
        try:
            self._task = loop.create_task(self._generate())
            if self._outcome.stop_reason is not None:  # stopped before the loop existed
                loop.call_soon(lambda: loop.create_task(self._call_stop()))
            self._outcome.result = loop.run_until_complete(self._task)
        except BaseException as exc:  # noqa: BLE001 - SystemExit from a plugin included
            self._outcome.exception = exc
        finally:
            with contextlib.suppress(BaseException):
                _cancel_leftovers(loop)
            loop.close()
            self._finished.set()
            self._wake_main()

    async def _generate(self) -> Any:
        with logger.contextualize(job_id=self.job_id):
            self.plugin = self._make_plugin()
            if self._outcome.stop_reason is not None:
                self.plugin.should_stop = True
            return await self.plugin.generate(self.job_id, self.data, self._progress)

    async def _call_stop(self) -> None:
        if self.plugin is None:
            return  # still being built: _generate tells it
        try:
            await self.plugin.stop()
        except Exception as exc:  # noqa: BLE001
            logger.bind(job_id=self.job_id).warning("job {}: plugin stop() raised {!r}",
                                                    self.job_id, exc)

    def _progress(self, value: Any, message: Any = None) -> None:
        """The callback given to ``generate()``; may be called thousands of times a second."""
        try:
            percent = max(0.0, min(100.0, float(value)))
        except (TypeError, ValueError):
            return
        report = (percent, None if message is None else clean_text(str(message)))
        if report != self._last_report:
            self._last_report = report
            self._last_progress_at = self._clock()
            self._on_progress(*report)

    def _wake_main(self) -> None:
        if self._main_loop is not None and self._wake is not None:
            with contextlib.suppress(RuntimeError):  # the daemon's loop is gone
                self._main_loop.call_soon_threadsafe(self._wake.set)


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel tasks the plugin started and forgot, as asyncio.run() does."""
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
