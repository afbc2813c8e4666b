"""What runs on the Ray cluster with ``executor: ray``: a job's plugin as a Ray task
(``run_job``), and the one small actor (``Mailbox``) through which tasks report progress
and learn of stop requests.

Nothing here imports ``ray`` at module level: the daemon never imports it, and Ray
workers import this module to run ``run_job``. ``kinod.ray_bridge`` wraps both with
``ray.remote``.

A task runs the plugin with a ``PluginRun`` of its own, as ``kinod.isolation`` does in a
child process: ``generate()`` and ``stop()`` behave as in the daemon's threads. A
watcher thread passes the latest progress to the mailbox and reads the run's orders
(``stop``, then perhaps ``cancel``) from it every ``WATCH_S``.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from kinod.isolation import _ending
from kinod.logs import add_job_log_sink
from kinod.outcome import StopReason
from kinod.plugins.base_plugin import BasePlugin
from kinod.plugins.plugin_loader import load_plugin_class
from kinod.runner import PluginRun, new_plugin

# How often a running task sends its latest progress and reads its orders. The daemon
# writes progress at most every progress_interval_s (0.5 s by default) anyway.
WATCH_S = 0.25
# A task's order read that gets no answer in this long is given up on (and tried again).
ORDER_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class RayJob:
    """What a task needs to run one job, as plain values (they are pickled)."""

    key: str  # this attempt's name in the mailbox: <job id>/<random>
    plugin_name: str
    plugin_source: str  # LoadedPlugin.source: a folder the Ray nodes see, or an entry point
    job_id: str
    data: dict[str, Any]
    output_dir: str | None  # None: outputs are returned (ray.outputs: returned)
    settings: dict[str, Any]
    models_dir: str
    outbox: str | None  # the job's log goes to <outbox>/<id>.log; None: to the worker's log


class Mailbox:
    """The one actor a daemon's Ray driver keeps: tasks post to it, the driver drains it.
    Keyed by ``RayJob.key``, so that an order for one attempt never reaches the next."""

    def __init__(self) -> None:
        self._started: dict[str, tuple[str, int]] = {}
        self._progress: dict[str, tuple[float, str | None]] = {}
        self._orders: dict[str, str] = {}

    def started(self, key: str, node_id: str, pid: int) -> None:
        self._started[key] = (node_id, pid)

    def progress(self, key: str, percent: float, message: str | None) -> None:
        self._progress[key] = (percent, message)

    def order(self, key: str, order: str) -> None:
        """``stop`` (call the plugin's stop()) or ``cancel`` (cancel its generate())."""
        if self._orders.get(key) != "cancel":
            self._orders[key] = order

    def orders(self, key: str) -> str | None:
        return self._orders.get(key)

    def forget(self, key: str) -> None:
        self._orders.pop(key, None)
        self._started.pop(key, None)
        self._progress.pop(key, None)

    def drain(self) -> tuple[dict[str, tuple[str, int]], dict[str, tuple[float, str | None]]]:
        started, progress = self._started, self._progress
        self._started, self._progress = {}, {}
        return started, progress


# A worker runs many jobs: each plugin is imported once, each outbox's log sink added once.
_classes: dict[tuple[str, str], type[BasePlugin]] = {}
_log_sinks: dict[str, int] = {}


def run_job(job: RayJob, mailbox: Any) -> tuple:
    """The task: run one job's plugin here, on a Ray worker. Returns ``(ending, files)``:
    ``ending`` as ``kinod.isolation`` passes it, ``files`` the output as ``(relative
    path, bytes)`` pairs when outputs are returned, else empty."""
    import ray

    context = ray.get_runtime_context()
    mailbox.started.remote(job.key, context.get_node_id(), os.getpid())
    returned = job.output_dir is None
    output_dir = Path(tempfile.mkdtemp(prefix="kinod-") if returned else job.output_dir)
    if job.outbox and job.outbox not in _log_sinks:  # one a worker: adding one costs ms
        _log_sinks[job.outbox] = add_job_log_sink(Path(job.outbox))

    def make_plugin() -> BasePlugin:
        cls = _classes.get((job.plugin_name, job.plugin_source))
        if cls is None:
            cls = _classes[job.plugin_name, job.plugin_source] = load_plugin_class(
                job.plugin_name, job.plugin_source)
        return new_plugin(cls, output_dir, job.settings, Path(job.models_dir))

    latest: list[tuple[float, str | None]] = []  # the last report, if not yet sent
    loop = asyncio.new_event_loop()
    run = PluginRun(make_plugin, job.job_id, job.data,
                    on_progress=lambda percent, message: latest.append((percent, message)))
    # No limits, no grace and no giving up here: the daemon keeps the time and says when
    # to cancel; Ray kills this worker if cancelling does not end the plugin.
    run.cancel_wait_s = math.inf
    done = threading.Event()
    watcher = threading.Thread(target=_watch, args=(job.key, mailbox, loop, run, latest, done),
                               name=f"job-{job.job_id}-orders", daemon=True)
    watcher.start()
    task = loop.create_task(run.run(None, None, math.inf))
    try:
        while True:
            try:
                outcome = loop.run_until_complete(task)
                break
            except KeyboardInterrupt:  # ray.cancel: cancel the plugin, then wait for it
                run.force_stop()
        files = _collect(output_dir) if returned else []
        return _ending(outcome), files
    finally:
        done.set()
        watcher.join()
        loop.close()
        if returned:
            shutil.rmtree(output_dir, ignore_errors=True)


def _watch(key: str, mailbox: Any, loop: asyncio.AbstractEventLoop, run: PluginRun,
           latest: list[tuple[float, str | None]], done: threading.Event) -> None:
    """Send the latest progress and obey orders, every WATCH_S, until the task ends."""
    import ray

    obeyed: str | None = None
    while not done.wait(WATCH_S):
        if latest:
            percent, message = latest[-1]
            latest.clear()
            mailbox.progress.remote(key, percent, message)
        try:
            order = ray.get(mailbox.orders.remote(key), timeout=ORDER_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - the mailbox is busy or gone: the driver acts
            logger.debug("job {}: cannot read its orders: {!r}", key, exc)
            continue
        if order == obeyed or order is None:
            continue
        if order == "stop":
            loop.call_soon_threadsafe(run.request_stop, StopReason.USER, math.inf)
        elif order == "cancel":
            loop.call_soon_threadsafe(run.force_stop)
        obeyed = order


def _collect(folder: Path) -> list[tuple[str, bytes]]:
    """Every regular file under ``folder`` (links are not followed), for the daemon."""
    files = []
    for dirpath, _dirnames, filenames in os.walk(folder):
        for name in filenames:
            path = Path(dirpath, name)
            if path.is_file() and not path.is_symlink():
                files.append((path.relative_to(folder).as_posix(), path.read_bytes()))
    return files
