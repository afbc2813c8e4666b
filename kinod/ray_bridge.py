"""The daemon's Ray driver: a child process that connects to the cluster once and runs
every job the daemon sends it as a Ray task.

Why a process of its own: Ray's driver ends its whole process when it loses the cluster
(the head node dies, the local raylet dies). In a child, that ends only the child; the
daemon sees it go, its jobs wait, and it starts another once the cluster answers
(``kinod.ray_run.RayCluster``). It also keeps ``ray`` and its threads out of the daemon.

One pipe carries the messages. Daemon to driver: ``("submit", key, RayJob, options)``,
``("stop", key)``, ``("cancel", key, force)``, ``("close",)``. Driver to daemon: first
``("ready", text)`` or ``("unreachable", why)``, then any of ``("started", key, node id,
where)``,
``("progress", key, percent, message)``, and once per key one end: ``("result", key,
ending, files)``, ``("lost", key, why, node id)`` (its worker or node died),
``("cancelled", key)`` or ``("error", key, type name, text)``.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
from multiprocessing.connection import Connection
from typing import Any

from loguru import logger

from kinod.logs import setup_logging
from kinod.ray_task import Mailbox, RayJob, run_job

NAMESPACE = "kinod"
# How often the driver drains the mailbox while tasks run: progress and starts reach the
# daemon this much later at most.
DRAIN_S = 0.1
# A plain host:port that refuses a connection within this long is reported unreachable at
# once (ray.init itself keeps trying for minutes).
PROBE_TIMEOUT_S = 5.0


def bridge_main(conn: Connection, address: str | None, log_format: str, log_level: str) -> None:
    """The driver's whole life: connect, then serve the daemon until it closes the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the daemon
    setup_logging(log_format, log_level)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    why = _probe(address)
    if why is None:
        try:
            import ray

            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False,
                     logging_level="WARNING", include_dashboard=False if address is None
                     else None)
            mailbox = ray.remote(num_cpus=0, max_restarts=0)(Mailbox).remote()
            ray.get(mailbox.drain.remote())  # placed and answering
        except Exception as exc:  # noqa: BLE001 - told to the daemon, which waits and retries
            why = f"{type(exc).__name__}: {exc}"
    if why is not None:
        conn.send(("unreachable", why))
        os._exit(0)
    resources = ray.cluster_resources()
    conn.send(("ready", f"{len(ray.nodes())} nodes, {resources.get('CPU', 0):g} CPUs, "
                        f"{resources.get('GPU', 0):g} GPUs"))
    code = asyncio.run(Bridge(conn, mailbox).serve())
    try:
        ray.shutdown()
    finally:
        os._exit(code)


def _probe(address: str | None) -> str | None:
    """Why a ``host:port`` (or ``ray://host:port``) address cannot be reached, or None."""
    if address is None or address == "auto":
        return None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return None
    try:
        socket.create_connection((host.strip("[]"), int(port)), PROBE_TIMEOUT_S).close()
    except OSError as exc:
        return f"cannot connect to {host}:{port}: {exc.strerror or exc}"
    return None


class Bridge:
    """Runs the daemon's orders on the driver's event loop, one task per job."""

    def __init__(self, conn: Connection, mailbox: Any) -> None:
        import ray

        self._ray = ray
        self._conn = conn
        self._mailbox = mailbox
        self._remote = ray.remote(max_retries=0, retry_exceptions=False)(run_job)
        self._refs: dict[str, Any] = {}
        self._nodes: dict[str, str] = {}  # key -> the node its task runs on
        self._addresses: dict[str, str] = {}  # node id -> its address
        self._closed: asyncio.Future[int] | None = None

    async def serve(self) -> int:
        """Until the daemon closes the pipe (0), or the mailbox is lost (1)."""
        loop = asyncio.get_running_loop()
        self._closed = loop.create_future()
        loop.add_reader(self._conn.fileno(), self._on_message)
        drainer = loop.create_task(self._drain())
        try:
            return await self._closed
        finally:
            drainer.cancel()
            loop.remove_reader(self._conn.fileno())

    def _send(self, message: tuple) -> None:
        try:
            self._conn.send(message)
        except OSError:
            self._close(0)  # the daemon is gone

    def _close(self, code: int) -> None:
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(code)

    def _on_message(self) -> None:
        try:
            message = self._conn.recv()
        except (EOFError, OSError):
            self._close(0)
            return
        kind, *args = message
        if kind == "submit":
            self._submit(*args)
        elif kind == "stop":
            self._mailbox.order.remote(args[0], "stop")
        elif kind == "cancel":
            self._cancel(*args)
        elif kind == "close":
            self._close(0)

    def _submit(self, key: str, job: RayJob, options: dict[str, Any]) -> None:
        options = dict(options)
        avoid = options.pop("avoid_node", None)
        if avoid is not None:
            strategy = self._elsewhere(avoid, options)
            if strategy is not None:
                options["scheduling_strategy"] = strategy
        ref = self._remote.options(**options).remote(job, self._mailbox)
        self._refs[key] = ref
        asyncio.get_running_loop().create_task(self._await(key, ref))

    def _elsewhere(self, avoid: str, options: dict[str, Any]) -> Any:
        """A soft placement on a live node other than ``avoid`` that has what the job asks
        for, if there is one: a retry after a lost worker goes to another node."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        needs = dict(options.get("resources") or {})
        needs["CPU"] = options.get("num_cpus", 1)
        needs["GPU"] = options.get("num_gpus") or 0
        nodes = [node["NodeID"] for node in self._ray.nodes()
                 if node.get("Alive") and node["NodeID"] != avoid
                 and all(node.get("Resources", {}).get(name, 0) >= amount
                         for name, amount in needs.items() if amount)]
        if not nodes:
            return None
        return NodeAffinitySchedulingStrategy(node_id=random.choice(nodes), soft=True)

    def _address_of(self, node_id: str) -> str:
        """A node's address as the cluster knows it (its --node-ip-address)."""
        if node_id not in self._addresses:
            self._addresses = {node["NodeID"]: node.get("NodeManagerAddress", "?")
                               for node in self._ray.nodes()}
        return self._addresses.get(node_id, node_id[:12])

    def _cancel(self, key: str, force: bool) -> None:
        ref = self._refs.get(key)
        if ref is None:
            return
        if not force:
            self._mailbox.order.remote(key, "cancel")
        try:
            self._ray.cancel(ref, force=force)
        except Exception as exc:  # noqa: BLE001 - e.g. it ended meanwhile
            logger.debug("job {}: ray.cancel: {!r}", key, exc)

    async def _await(self, key: str, ref: Any) -> None:
        exceptions = self._ray.exceptions
        try:
            ending, files = await ref
            message: tuple = ("result", key, ending, files)
        except exceptions.TaskCancelledError:
            message = ("cancelled", key)
        except exceptions.RayTaskError as exc:  # the task itself raised: not the plugin
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
            message = ("error", key, type(cause).__name__, str(cause))
        except exceptions.RayError as exc:  # its worker or node died, its object was lost
            message = ("lost", key, f"{type(exc).__name__}: {exc}", self._nodes.get(key))
        except Exception as exc:  # noqa: BLE001
            message = ("error", key, type(exc).__name__, str(exc))
        self._refs.pop(key, None)
        self._nodes.pop(key, None)
        self._mailbox.forget.remote(key)
        self._send(message)

    async def _drain(self) -> None:
        """Pass the tasks' starts and progress on to the daemon, every DRAIN_S."""
        while True:
            await asyncio.sleep(DRAIN_S)
            if not self._refs:
                continue
            try:
                started, progress = await self._mailbox.drain.remote()
            except self._ray.exceptions.RayError as exc:
                logger.error("the kinod mailbox actor on the Ray cluster is lost: {}", exc)
                self._close(1)
                return
            for key, (node_id, pid) in started.items():
                if key in self._refs:
                    self._nodes[key] = node_id
                    self._send(("started", key, node_id,
                                f"{self._address_of(node_id)}, worker pid {pid}"))
            for key, (percent, message) in progress.items():
                if key in self._refs:
                    self._send(("progress", key, percent, message))
