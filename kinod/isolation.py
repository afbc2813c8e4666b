"""Runs a job's plugin in a child process of its own (``plugins.<name>.isolation: process``).

A plugin that calls ``os._exit()``, crashes in native code or ignores cancellation
then ends only its own process: the daemon fails the job with how the process
ended, and kills a plugin that does not stop within the grace. The child runs the
plugin with a ``PluginRun`` of its own, so ``generate()`` and ``stop()`` behave as
in a thread; ``ProcessRun`` supervises it from the daemon like one.

One pipe carries the messages. Daemon to child: ``("stop", reason)``, then perhaps
``("cancel",)``. Child to daemon: ``("progress", percent, message, waiting)`` any
number of times (``waiting``: whether the plugin says it waits, see
``BasePlugin.update_progress``; the daemon also reads the older
``("progress", percent, message)``), then ``("result", ending)`` once, where ``ending`` is one of
``("plugin_result", success, data, error, retryable)``, ``("raised", type name,
text)`` or ``("returned", type name)``.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from loguru import logger
from pydantic_core import to_jsonable_python

from kinod.logs import add_job_log_sink, setup_logging
from kinod.outcome import Outcome, StopReason
from kinod.plugins.base_plugin import BasePlugin, PluginResult
from kinod.plugins.plugin_loader import load_plugin_class
from kinod.runner import PluginRun, ProgressSink, SupervisedRun, new_plugin

# spawn, not fork: the daemon has threads, and a forked child would inherit their locks
# in whatever state they happened to be.
_CONTEXT = multiprocessing.get_context("spawn")
# After SIGKILL, how long to wait for the process to end: at once, unless it is stuck in
# the kernel (a hung network file system); then it is left behind.
KILL_WAIT_S = 5.0
# The child's exit status when the daemon's end of the pipe closed: the daemon is gone.
ORPHANED_EXIT_CODE = 70
# How often the reader looks whether the child has ended with its pipe still open.
PIPE_CHECK_S = 1.0


@dataclass(frozen=True)
class ChildJob:
    """What the child needs to run one job, as plain values (they are pickled)."""

    plugin_name: str
    plugin_source: str  # LoadedPlugin.source: how the child finds the plugin
    job_id: str
    data: dict[str, Any]
    output_dir: str
    settings: dict[str, Any]
    models_dir: str
    outbox: str  # the job's log goes to <outbox>/<id>.log
    log_format: str
    log_level: str


class ProcessRun(SupervisedRun):
    """One run of a plugin in a child process, driven like a ``PluginRun``."""

    def __init__(self, plugin_name: str, plugin_source: str, job_id: str, data: dict[str, Any],
                 on_progress: ProgressSink, *, output_dir: Path, settings: dict[str, Any],
                 models_dir: Path, outbox: Path, log_format: str = "text",
                 log_level: str = "INFO", clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(job_id, on_progress, clock)
        self.data = data
        self._job = ChildJob(plugin_name, plugin_source, job_id, data, str(output_dir),
                             dict(settings), str(models_dir), str(outbox), log_format,
                             log_level)
        self.pid: int | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._send_lock = threading.Lock()  # the reader closes the pipe; no send may race it
        self._killed = False

    # --- called on the daemon's loop --------------------------------------

    def _start(self) -> None:
        conn, child_conn = _CONTEXT.Pipe()
        process = _CONTEXT.Process(target=child_main, args=(child_conn, self._job),
                                   name=f"kinod-job-{self.job_id}")
        try:
            process.start()
        except BaseException:
            conn.close()
            raise
        finally:
            child_conn.close()  # the child's copy only: its end is then seen as end of file
        self._process, self._conn, self.pid = process, conn, process.pid
        logger.bind(job_id=self.job_id).debug("job {}: plugin {} runs in process {}",
                                              self.job_id, self._job.plugin_name, process.pid)
        if self._outcome.stop_reason is not None:  # stopped before it started
            self._ask_to_stop()
        threading.Thread(target=self._read, name=f"job-{self.job_id}-pipe",
                         daemon=True).start()

    def _ask_to_stop(self) -> None:
        self._send(("stop", self._outcome.stop_reason.value))

    def _tell_plugin_to_stop(self) -> None:
        pass  # the child's own PluginRun keeps telling its plugin

    def _cancel(self) -> None:
        self._send(("cancel",))

    def _give_up(self) -> float | None:
        log = logger.bind(job_id=self.job_id)
        if not self._killed:
            self._killed = True
            log.warning("job {}: the plugin ignores cancellation; killing its process {}",
                        self.job_id, self.pid)
            self._process.kill()
            return KILL_WAIT_S
        log.error("job {}: the plugin's process {} outlives SIGKILL; it is left behind",
                  self.job_id, self.pid)
        return None

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            if self._conn is None or self._conn.closed:
                return  # not started yet (_start sends a pending stop), or already over
            try:
                self._conn.send(message)
            except OSError:
                pass  # the child is gone: the reader sees that

    # --- called on the reader's thread -------------------------------------

    def _read(self) -> None:
        """Take the child's messages until its process has ended, then end the run."""
        process, conn = self._process, self._conn
        got_result = False
        try:
            while True:
                if not conn.poll(PIPE_CHECK_S):
                    if process.exitcode is None:
                        continue  # running, with nothing to say
                    if not conn.poll():
                        break  # it ended, but a process it forked holds the pipe open
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    break  # it ended
                if message[0] == "progress":
                    waiting = message[3] if len(message) > 3 else None
                    self._progress(message[1], message[2], waiting=waiting)
                elif message[0] == "result":
                    self._outcome.result, self._outcome.exception = _rebuilt(message[1])
                    got_result = True
        finally:
            with self._send_lock:
                conn.close()
            process.join()
            if not got_result:
                self._outcome.exit_code = process.exitcode
            self._end()


def _rebuilt(ending: tuple) -> tuple[Any, BaseException | None]:
    """The child's ``(result, exception)``, as ``judge()`` needs them."""
    kind, *values = ending
    if kind == "plugin_result":
        return PluginResult(*values), None
    # judge() words these with their type's name: a stand-in of that name does.
    if kind == "raised":
        type_name, text = values
        return None, type(type_name, (Exception,), {})(text)
    (type_name,) = values
    return type(type_name, (), {})(), None


# --- the child process ---------------------------------------------------------


def child_main(conn: Connection, job: ChildJob) -> None:
    """The child's whole life: run the one job, report over ``conn``, exit."""
    # The daemon decides when this process ends: neither systemd's SIGTERM to the whole
    # cgroup nor a Ctrl-C in the daemon's terminal may end the job behind its back.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    setup_logging(job.log_format, job.log_level)
    add_job_log_sink(Path(job.outbox))
    send_lock = threading.Lock()  # progress comes from the plugin's threads

    def send(message: tuple) -> None:
        with send_lock:
            try:
                conn.send(message)
            except OSError:
                pass  # the daemon is gone: _obey_daemon exits

    def make_plugin() -> BasePlugin:
        cls = load_plugin_class(job.plugin_name, job.plugin_source)
        return new_plugin(cls, Path(job.output_dir), job.settings, Path(job.models_dir))

    loop = asyncio.new_event_loop()
    run = _ChildRun(make_plugin, job.job_id, job.data,
                    on_progress=lambda percent, message: send(
                        ("progress", percent, message, run.waiting)))
    # No limits, no grace and no giving up here: the daemon keeps the time, says when to
    # cancel, and kills this process if cancelling does not end the plugin.
    run.cancel_wait_s = math.inf
    threading.Thread(target=_obey_daemon, args=(conn, loop, run, job.job_id),
                     name="daemon-pipe", daemon=True).start()
    outcome = loop.run_until_complete(run.run(None, None, math.inf))
    send(("result", _ending(outcome)))
    _exit(0)


class _ChildRun(PluginRun):
    """The child's run: each report it passes on says whether the plugin waits, so the
    daemon holds the job's timeout and stall limit as it would for a plugin in a thread."""

    @property
    def waiting(self) -> bool:
        return self._waiting

    def _progress(self, value: Any, message: Any = None, *, waiting: bool | None = None) -> None:
        if waiting is not None and bool(waiting) != self._waiting:
            self._last_report = None  # the same words, waiting or not: the daemon must hear it
        super()._progress(value, message, waiting=waiting)

    _progress.accepts_waiting = True  # type: ignore[attr-defined]  # see update_progress


def _obey_daemon(conn: Connection, loop: asyncio.AbstractEventLoop, run: PluginRun,
                 job_id: str) -> None:
    """Pass the daemon's stop and cancel on to the run; exit when the daemon is gone."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            logger.bind(job_id=job_id).warning("job {}: the daemon is gone; its plugin's "
                                               "process {} exits", job_id, os.getpid())
            _exit(ORPHANED_EXIT_CODE)
        if message[0] == "stop":
            loop.call_soon_threadsafe(run.request_stop, StopReason(message[1]), math.inf)
        elif message[0] == "cancel":
            loop.call_soon_threadsafe(run.force_stop)


def _ending(outcome: Outcome) -> tuple:
    """How the run ended, as plain values that pickle and mean the same to ``judge()``."""
    if outcome.exception is not None:
        exc = outcome.exception
        return ("raised", type(exc).__name__, str(exc))
    result = outcome.result
    if not isinstance(result, PluginResult):
        return ("returned", type(result).__name__)
    data = result.data
    if result.success:
        try:  # values JSON cannot hold become their text, as judge() would make them
            data = to_jsonable_python(data, fallback=str)
        except (ValueError, TypeError) as exc:
            return ("raised", type(exc).__name__,
                    f"its result cannot be stored as JSON: {exc}")
    else:
        data = {}  # a failure's data is not kept
    return ("plugin_result", bool(result.success), data,
            str(result.error) if result.error else None,
            bool(getattr(result, "retryable", False)))


def _exit(code: int) -> None:
    """Exit now: threads the plugin left behind are not waited for."""
    logger.complete()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass  # none, or closed: nothing to keep
    os._exit(code)
