"""Runs jobs' plugins as tasks on a Ray cluster (``executor: ray``).

``RayRun`` is one job's run, supervised by the daemon like a ``PluginRun``: the same
timeout, stall limit, stop grace and progress. ``RayCluster`` is the daemon's one
connection to the cluster, shared by every run: a child process, the Ray driver
(``kinod.ray_bridge``), connected once with ``ray.init(address, namespace="kinod")``.
The daemon itself never imports ``ray``.

- **Placement.** Each job is a Ray task with its plugin's ``plugins.<name>.ray``
  resources (``num_cpus``, ``num_gpus``, custom ``resources``). Until Ray starts it, the
  run says it waits (its timeout and stall limit are held).
- **Stop.** The plugin's ``stop()`` first (through the driver's mailbox actor), then,
  after ``stop_grace``, its ``generate()`` is cancelled and ``ray.cancel`` sent; a second
  later ``ray.cancel(force=True)`` kills its worker.
- **A worker or node that dies** fails the attempt as retryable (``retries`` apply); the
  retry asks Ray for another node.
- **The cluster out of reach** (down, or lost mid-run): no job fails for it. Runs wait,
  saying why in their sidecar's message and in the log, and are submitted again once the
  driver connects; a new driver is tried after 2 s, then ever less often (60 s at most).
- **Outputs.** ``ray.outputs: shared``: the plugin writes ``data/frames/<id>/`` itself,
  on storage every Ray node mounts at the same path. ``returned``: it writes into a
  temporary folder on its worker, the task returns the files, and the daemon writes each
  into ``data/frames/<id>/`` (a temporary file, then a rename).
"""

from __future__ import annotations

import atexit
import multiprocessing
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from loguru import logger

from kinod.atomic_files import atomic_write
from kinod.isolation import _rebuilt
from kinod.plugins.base_plugin import PluginResult
from kinod.ray_task import RayJob
from kinod.runner import ProgressSink, SupervisedRun, plugin_settings

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from kinod.config import Settings

_CONTEXT = multiprocessing.get_context("spawn")  # see kinod.isolation
# How long the driver may take to connect before it is given up on and tried again.
CONNECT_TIMEOUT_S = 60.0
FIRST_RETRY_S = 2.0
MAX_RETRY_S = 60.0
# After ray.cancel(force=True), how long to wait for Ray to report the task's end.
KILL_WAIT_S = 5.0
# Does this kinod's SupervisedRun hold the limits of a run that says it waits?
_CAN_WAIT = getattr(SupervisedRun._progress, "accepts_waiting", False)


class RayRun(SupervisedRun):
    """One run of a job's plugin as a Ray task."""

    def __init__(self, settings: Settings, plugin_name: str, plugin_source: str, job_id: str,
                 data: dict[str, Any], on_progress: ProgressSink,
                 clock: Callable[[], float] = time.monotonic,
                 cluster: RayCluster | None = None) -> None:
        super().__init__(job_id, on_progress, clock)
        self.data = data
        self.cluster = cluster or RayCluster.of(settings)
        returned = settings.ray.outputs == "returned"
        self.frames = settings.frames / job_id
        self.key = f"{job_id}/{secrets.token_hex(4)}"
        self.job = RayJob(self.key, plugin_name, plugin_source, job_id, data,
                          None if returned else str(self.frames),
                          plugin_settings(settings, plugin_name), str(settings.models),
                          None if returned else str(settings.outbox))
        entry = settings.plugins.get(plugin_name)
        wanted = entry.ray if entry is not None else None
        self.options: dict[str, Any] = {}
        if wanted is not None:
            if wanted.num_cpus is not None:
                self.options["num_cpus"] = wanted.num_cpus
            if wanted.num_gpus is not None:
                self.options["num_gpus"] = wanted.num_gpus
            if wanted.resources:
                self.options["resources"] = dict(wanted.resources)
        self.node_id: str | None = None  # where its task started, once it has
        self._killed = False

    # --- called on the daemon's loop --------------------------------------

    def _start(self) -> None:
        if self._outcome.stop_reason is not None:  # stopped before it started
            self._end()
            return
        self.cluster.submit(self)

    def _ask_to_stop(self) -> None:
        if self.cluster.withdraw_waiting(self):
            self._end()  # nothing ran yet
        else:
            self.cluster.send(self, ("stop", self.key))

    def _tell_plugin_to_stop(self) -> None:
        pass  # the task's own PluginRun keeps telling its plugin

    def _cancel(self) -> None:
        self.cluster.send(self, ("cancel", self.key, False))

    def _give_up(self) -> float | None:
        log = logger.bind(job_id=self.job_id)
        if not self._killed:
            self._killed = True
            log.warning("job {}: the plugin ignores cancellation; ray.cancel(force=True) "
                        "kills its worker", self.job_id)
            self.cluster.send(self, ("cancel", self.key, True))
            return KILL_WAIT_S
        log.error("job {}: Ray reports no end of its task after ray.cancel(force=True); it "
                  "is left behind", self.job_id)
        self.cluster.forget(self)
        return None

    # --- called on the cluster's thread -------------------------------------

    def waits(self, why: str) -> None:
        """Not running on the cluster (yet, or any more): say why, hold the limits."""
        self._say(0.0, why, waiting=True)

    def started(self, node_id: str, where: str) -> None:
        self.node_id = node_id
        self._say(0.0, f"running on Ray node {where}", waiting=False)

    def ended(self, kind: str, *args: Any) -> None:
        """The task's end, as the driver reports it; the run ends."""
        stopping = self._outcome.stop_reason is not None
        if kind == "result":
            ending, files = args
            self._outcome.result, self._outcome.exception = _rebuilt(ending)
            if files:
                self._write_returned(files)
        elif stopping:
            pass  # cancelled or killed on request: judged by why it was stopped
        elif kind == "lost":
            why, node_id = args
            self.cluster.avoid(self.job_id, node_id or self.node_id)
            self._outcome.result = PluginResult(
                success=False, error=f"its Ray worker was lost ({why})", retryable=True)
        elif kind == "cancelled":
            self._outcome.result = PluginResult(
                success=False, error="its Ray task was cancelled by someone else",
                retryable=True)
        else:  # error: the task failed in kinod's part (e.g. kinod missing on the node)
            type_name, text = args
            self._outcome.exception = type(type_name, (Exception,), {})(
                f"on its Ray worker: {text}")
        self._end()

    def _write_returned(self, files: list[tuple[str, bytes]]) -> None:
        try:
            for name, content in files:
                relative = PurePosixPath(name)
                if relative.is_absolute() or ".." in relative.parts:
                    raise ValueError(f"an output file outside its folder: {name!r}")
                path = self.frames / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(path, content)
        except (OSError, ValueError) as exc:
            self._outcome.result = PluginResult(
                success=False, error=f"its returned output could not be written: {exc}")

    def _say(self, percent: float, message: str | None, waiting: bool) -> None:
        if _CAN_WAIT:
            self._progress(percent, message, waiting=waiting)
        else:
            self._progress(percent, message)


class RayCluster:
    """A daemon's connection to its Ray cluster: the driver process, the thread that
    starts it (again) and reads it, and the runs it carries, by key."""

    _clusters: dict[str | None, RayCluster] = {}
    _clusters_lock = threading.Lock()

    @classmethod
    def of(cls, settings: Settings) -> RayCluster:
        """The daemon's cluster for ``ray.address``: made (not connected) on first use."""
        address = settings.ray.address
        with cls._clusters_lock:
            cluster = cls._clusters.get(address)
            if cluster is None:
                cluster = cls._clusters[address] = cls(address, settings.log_format,
                                                       settings.log_level)
            return cluster

    def __init__(self, address: str | None, log_format: str = "text",
                 log_level: str = "INFO") -> None:
        self.address = address
        self.name = address or "a local cluster"
        self._log = (log_format, log_level)
        self._lock = threading.Condition()
        self._runs: dict[str, RayRun] = {}
        self._submitted: set[str] = set()  # keys sent to the driver it has now
        self._avoid: dict[str, str] = {}  # job id -> the node its last attempt was lost on
        self._conn: Connection | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self.why_down: str | None = "not connected yet"
        atexit.register(self.close)

    # --- called on the daemon's loop --------------------------------------

    def submit(self, run: RayRun) -> None:
        with self._lock:
            self._runs[run.key] = run
            if self._conn is not None:
                self._send_submit(run)
            else:
                run.waits(f"waiting for the Ray cluster at {self.name}: {self.why_down}")
                self._lock.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="ray-driver",
                                                daemon=True)
                self._thread.start()

    def withdraw_waiting(self, run: RayRun) -> bool:
        """Take back a run not yet sent to the driver; False if it was sent."""
        with self._lock:
            if run.key in self._submitted or run.key not in self._runs:
                return False
            del self._runs[run.key]
            return True

    def send(self, run: RayRun, message: tuple) -> None:
        with self._lock:
            if run.key in self._submitted:
                self._send(message)

    def forget(self, run: RayRun) -> None:
        with self._lock:
            self._runs.pop(run.key, None)
            self._submitted.discard(run.key)

    def avoid(self, job_id: str, node_id: str | None) -> None:
        with self._lock:
            if node_id is not None:
                self._avoid[job_id] = node_id

    def close(self) -> None:
        """Let the driver go (at exit): it disconnects from the cluster."""
        with self._lock:
            self._closed = True
            self._send(("close",))
            self._lock.notify_all()

    # --- with the lock held -------------------------------------------------

    def _send_submit(self, run: RayRun) -> None:
        options = dict(run.options)
        avoid = self._avoid.pop(run.job_id, None)
        if avoid is not None:
            options["avoid_node"] = avoid
        self._submitted.add(run.key)
        run.waits("waiting for a Ray worker")
        self._send(("submit", run.key, run.job, options))

    def _send(self, message: tuple) -> None:
        if self._conn is None:
            return
        try:
            self._conn.send(message)
        except OSError:
            pass  # the driver is gone: its reader sees that

    # --- on the cluster's own thread ------------------------------------------

    def _serve(self) -> None:
        """Start the driver, read it until it ends, and start another after a pause, for
        as long as there are runs to carry."""
        from kinod.ray_bridge import bridge_main  # only with executor: ray

        retry_s = FIRST_RETRY_S
        while True:
            with self._lock:
                while not self._runs and not self._closed:  # no cluster needed yet
                    self._lock.wait()
                if self._closed:
                    return
            conn, child = _CONTEXT.Pipe()
            process = _CONTEXT.Process(target=bridge_main, name="kinod-ray-driver",
                                       args=(child, self.address, *self._log), daemon=True)
            process.start()
            child.close()
            was_ready = self._read(conn, process)
            with self._lock:
                self._conn = None
                lost = [self._runs[key] for key in self._submitted if key in self._runs]
                self._submitted.clear()
                waiting = len(self._runs)
                closed = self._closed
            conn.close()
            process.join(1.0)
            if process.is_alive():
                process.kill()
                process.join()
            if closed:
                return
            retry_s = FIRST_RETRY_S if was_ready else min(retry_s * 2, MAX_RETRY_S)
            logger.warning("the Ray cluster at {} cannot be used: {}; {} jobs wait; trying "
                           "again in {:g} s", self.name, self.why_down, waiting, retry_s)
            for run in lost:
                if run._outcome.stop_reason is not None:
                    self.forget(run)
                    run._end()  # nothing runs it now: it ends as stopped
                else:
                    run.waits(f"waiting for the Ray cluster at {self.name}: {self.why_down}")
            with self._lock:
                self._lock.wait_for(lambda: self._closed, timeout=retry_s)

    def _read(self, conn: Connection, process: multiprocessing.process.BaseProcess) -> bool:
        """Serve one driver until it ends; True if it had connected."""
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while not conn.poll(0.5):
            if not process.is_alive():
                self.why_down = f"its driver process ended with code {process.exitcode}"
                return False
            if time.monotonic() > deadline:
                self.why_down = f"no answer within {CONNECT_TIMEOUT_S:g} s"
                return False
        try:
            kind, text = conn.recv()
        except (EOFError, OSError):
            self.why_down = "its driver process ended while connecting"
            return False
        if kind == "unreachable":
            self.why_down = text
            return False
        with self._lock:
            self._conn = conn
            self.why_down = None
            for run in list(self._runs.values()):
                self._send_submit(run)
        logger.info("connected to the Ray cluster at {} ({})", self.name, text)
        while True:
            try:
                if not conn.poll(1.0):
                    if process.is_alive():
                        continue
                    if not conn.poll():
                        break
                message = conn.recv()
            except (EOFError, OSError):
                break
            self._dispatch(message)
        self.why_down = f"its driver process ended (code {process.exitcode}): the cluster " \
                        "was lost, or the driver failed"
        return True

    def _dispatch(self, message: tuple) -> None:
        kind, key, *args = message
        with self._lock:
            run = self._runs.get(key)
            if run is not None and kind not in ("started", "progress"):
                del self._runs[key]
                self._submitted.discard(key)
        if run is None:
            return  # given up on, or a late word for an attempt that has ended
        if kind == "started":
            run.started(*args)
        elif kind == "progress":
            run._progress(*args)
        else:
            run.ended(kind, *args)
