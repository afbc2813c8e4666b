"""Nodes sharing one inbox: each keeps a heartbeat file, and watches the others' go stale.

    inbox/.kinod/nodes/<node>.json   {"node", "pid", "host", "seq", "heartbeat_at", ...}

A node is alive while its heartbeat changes. Whether it changed is judged by
this daemon's own monotonic clock, never by comparing the machines' clocks
(they drift, and a network file system stamps times with the server's): a node
whose heartbeat has not changed for ``lease`` seconds, as seen from here, has
lost its lease, and its running jobs may be taken back.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, ValidationError

from kinod.atomic_files import atomic_write
from kinod.models import utc_now


class Heartbeat(BaseModel):
    """What a node says of itself; ``kinod status`` shows it."""

    node: str
    pid: int
    host: str
    seq: int  # one more at every beat: what others watch change
    started_at: datetime
    heartbeat_at: datetime  # for people; liveness never compares clocks
    lease: float
    serves: list[str]  # the plugins this node runs
    workers: int
    running: int = 0
    queued: int = 0
    stopped: bool = False  # it shut down cleanly
    paused: bool = False  # inbox/.pause or .pause.<node>: it starts no new job


class NodeBoard:
    """This node's heartbeat file, and what it has seen of the others'."""

    def __init__(self, folder: Path, node: str, lease: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.folder = folder
        self.node = node
        self.lease = lease
        self._clock = clock
        self._seq = 0
        self._started_at = utc_now()
        self._last_beat: float | None = None
        # other node -> (the last seq seen, when it was first seen with that seq)
        self._seen: dict[str, tuple[object, float]] = {}

    def path(self, node: str) -> Path:
        return self.folder / f"{node}.json"

    def beat(self, serves: list[str], workers: int, running: int, queued: int,
             stopped: bool = False, paused: bool = False) -> float | None:
        """Write this node's heartbeat. Returns how long since the previous one, by this
        node's clock (longer than the lease: this node was paused, and may have lost jobs)."""
        self._seq += 1
        now = self._clock()
        heartbeat = Heartbeat(node=self.node, pid=os.getpid(), host=socket.gethostname(),
                              seq=self._seq, started_at=self._started_at,
                              heartbeat_at=utc_now(), lease=self.lease, serves=serves,
                              workers=workers, running=running, queued=queued,
                              stopped=stopped, paused=paused)
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path(self.node), heartbeat.model_dump_json().encode())
        since = None if self._last_beat is None else now - self._last_beat
        self._last_beat = now
        return since

    def expired(self, node: str) -> bool:
        """True once ``node``'s heartbeat has stood still for a whole lease, as seen from
        here (a node never seen beating counts from the first look)."""
        heartbeat = read_heartbeat(self.path(node))
        # started_at too: a restarted node counts from 1 again.
        seq = None if heartbeat is None else (heartbeat.started_at, heartbeat.seq)
        now = self._clock()
        last_seq, since = self._seen.get(node, (object(), now))
        if seq != last_seq:
            self._seen[node] = (seq, now)
            return False
        lease = heartbeat.lease if heartbeat is not None else self.lease
        return now - since >= max(lease, self.lease)

    def takes_jobs(self, node: str) -> bool:
        """``node``'s heartbeat moves and says it neither stopped nor is paused."""
        heartbeat = read_heartbeat(self.path(node))
        return (heartbeat is not None and not heartbeat.stopped and not heartbeat.paused
                and not self.expired(node))

    def alive(self) -> dict[str, Heartbeat]:
        """The other nodes whose heartbeat still moves, and this one."""
        found = {}
        for heartbeat in read_heartbeats(self.folder):
            if heartbeat.node == self.node or (not heartbeat.stopped
                                               and not self.expired(heartbeat.node)):
                found[heartbeat.node] = heartbeat
        return found


def read_heartbeat(path: Path) -> Heartbeat | None:
    try:
        return Heartbeat.model_validate_json(path.read_bytes())
    except (OSError, ValidationError):
        return None


def read_heartbeats(folder: Path) -> list[Heartbeat]:
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".json")
                       and not n.startswith("."))
    except FileNotFoundError:
        return []
    return [h for h in (read_heartbeat(folder / n) for n in names) if h is not None]
