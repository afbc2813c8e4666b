"""Completion hooks (SPEC §10): a queue of deliveries on disk, and one thread that delivers.

    inbox/.kinod/hooks/pending/<due>.<hook>.<id>.json      waiting; <due> in ns since 1970
    inbox/.kinod/hooks/claimed/<node>/<due>.<hook>.<id>.json  being delivered by <node>
    inbox/.kinod/hooks/given_up/<due>.<hook>.<id>.json     out of retries; kept for people
    inbox/.kinod/hooks/invalid/<name>                      a file that is no delivery

A job's end writes one file per matching hook into pending/ (``Hooks.enqueue``) and never
waits for the delivery. A node claims a file by renaming it into its claimed/ folder (only
one node's rename succeeds), and removes it once the hook took it or it ran out of retries:
a crash at any point leaves the file on disk, and it is delivered again (at least once).
A failed attempt puts the file back in pending/ under its next due time, so nothing waits
in memory: at most ``max_in_flight`` deliveries are held, and the rest is read in, oldest
first, as room frees up.

A delivery names its hook by a key of the hook's target (``hook_key``), never by the
command or URL itself: whoever can write the spool cannot make the daemon run anything the
settings do not list. A file whose hook is not in this node's settings is left for a node
that has it (or for the hook to come back).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import json
import os
import random
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import httpx
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kinod.atomic_files import atomic_write
from kinod.config import HookSettings, Settings
from kinod.hooks_delivery import attempt, describe
from kinod.logs import log_job_event
from kinod.models import Sidecar, is_valid_job_id, utc_now

HOOK_SCHEMA = "kinod.hook/1"
MAX_IN_FLIGHT = 16      # deliveries held at once; every other one waits on disk
MAX_BACKOFF_S = 3600.0
POLL_S = 30.0           # a look at pending/ for what other nodes left, when nothing else wakes us
MAX_DELIVERY_BYTES = 16 << 20  # a sidecar's result is the plugin's; a bigger file is no delivery
_KEY_CHARS = frozenset("0123456789abcdef")


class Delivery(BaseModel):
    """A delivery file: which hook to tell, how many attempts it has had, and the sidecar as
    it was when the job ended (a later run's sidecar may have replaced it in the outbox)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: Literal["kinod.hook/1"] = Field(default=HOOK_SCHEMA, alias="schema")
    hook: str = Field(pattern=r"^[0-9a-f]{16}$")
    attempts: int = Field(default=0, ge=0)
    sidecar: Sidecar

    @field_validator("sidecar")
    @classmethod
    def _ended_job(cls, sidecar: Sidecar) -> Sidecar:
        # The id names the job's log file: it must be a valid id, never a path.
        if not is_valid_job_id(sidecar.id):
            raise ValueError("the sidecar's id is not a job id")
        if not sidecar.state.is_terminal:
            raise ValueError("the job has not ended")
        return sidecar

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode() + b"\n"


def hook_key(hook: HookSettings) -> str:
    """A hook's name in delivery files: the same for the same target across restarts and
    reloads, whatever its filters, retries or timeout."""
    target = json.dumps({"run": hook.run, "url": hook.url}, sort_keys=True)
    return hashlib.sha256(target.encode()).hexdigest()[:16]


def matching_hooks(hooks: list[HookSettings], sidecar: Sidecar) -> dict[str, HookSettings]:
    """The hooks to tell of this end, by key; two entries with one target are told once."""
    found: dict[str, HookSettings] = {}
    for hook in hooks:
        if sidecar.state.value in hook.on and (hook.types is None or sidecar.type in hook.types):
            found.setdefault(hook_key(hook), hook)
    return found


def delivery_name(due_ns: int, key: str, job_id: str) -> str:
    return f"{due_ns:020d}.{key}.{job_id}.json"


def parse_name(name: str) -> tuple[int, str] | None:
    """A delivery file's due time and hook key; None for a name kinod did not make."""
    due, _, rest = name.partition(".")
    key, _, rest = rest.partition(".")
    if (len(due) != 20 or not due.isdigit() or len(key) != 16 or not set(key) <= _KEY_CHARS
            or not rest.endswith(".json")):
        return None
    return int(due), key


class Hooks:
    """The hook deliveries of this node: ``enqueue`` from any thread; ``start`` and ``stop``
    the thread that delivers them."""

    def __init__(self, settings: Settings, spool_root: Path, *,
                 max_in_flight: int = MAX_IN_FLIGHT, backoff_s: float | None = None,
                 poll_s: float = POLL_S) -> None:
        self._settings = settings
        self.root = spool_root / "hooks"
        self.pending = self.root / "pending"
        self.claimed_root = self.root / "claimed"
        self.claimed = self.claimed_root / str(settings.node)
        self.given_up = self.root / "given_up"
        self.invalid = self.root / "invalid"
        self.max_in_flight = max_in_flight
        self._backoff_s = backoff_s
        self._poll_s = poll_s
        self._batch = max_in_flight * 4  # names read in at one look at pending/
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self._started = False
        self._tasks: set[asyncio.Task] = set()
        self._ready: deque[str] = deque()
        self._unknown_seen = 0

    # --- what the daemon calls ----------------------------------------------------------

    def enqueue(self, sidecar: Sidecar) -> None:
        """Queue one delivery per hook that wants this end. Returns once the files are on
        disk (flushed), without waiting for any delivery. OSError if the disk refuses; calling
        again is safe: the names are made from the end's time, so a file still waiting is
        replaced, not doubled."""
        if not sidecar.state.is_terminal:
            return
        hooks = matching_hooks(self._settings.hooks, sidecar)
        if not hooks:
            return
        ended = sidecar.finished_at or sidecar.updated_at or utc_now()
        due_ns = int(ended.timestamp() * 1e9)
        for key in hooks:
            path = self.pending / delivery_name(due_ns, key, sidecar.id)
            data = Delivery(hook=key, sidecar=sidecar).to_json()
            try:
                atomic_write(path, data, durable=True)
            except FileNotFoundError:
                self.pending.mkdir(parents=True, exist_ok=True)
                atomic_write(path, data, durable=True)
        self._wake_up()

    def start(self) -> None:
        """Take back what this node had claimed when it last stopped or died, and start
        delivering (nothing runs while no hook is set)."""
        self._started = True
        for folder in (self.pending, self.claimed, self.given_up, self.invalid):
            folder.mkdir(parents=True, exist_ok=True)
        self.take_back(self._settings.node or "")
        self._start_thread()

    def stop(self) -> None:
        """Stop delivering within a couple of seconds: attempts under way are cut short
        (a command is killed) and their files go back to pending/."""
        self._started = False
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._wake_up()
        thread.join(timeout=10)
        self._thread = None

    def update_settings(self, settings: Settings) -> None:
        """The settings were reloaded: new hooks are delivered from now on."""
        self._settings = settings
        if self._started:
            self._start_thread()
        self._wake_up()

    def take_back(self, node: str) -> int:
        """Put what ``node`` had claimed back in pending/: this node at start, or another
        one whose lease ran out. Returns how many files."""
        if not node or "/" in node or node.startswith("."):
            return 0
        folder = self.claimed_root / node
        moved = 0
        for name in _names_in(folder):
            with contextlib.suppress(FileNotFoundError):
                os.rename(folder / name, self.pending / name)
                moved += 1
        if moved:
            logger.info("hooks: {} deliveries node {} had under way are queued again",
                        moved, node)
        return moved

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def read_in(self) -> int:
        """Names read in from pending/ and not yet claimed (at most a batch)."""
        return len(self._ready)

    # --- the delivering thread ----------------------------------------------------------

    def _start_thread(self) -> None:
        if self._thread is not None or not self._settings.hooks:
            return
        self._stopping = False
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="kinod-hooks",
                                        daemon=True)
        self._thread.start()
        ready.wait(timeout=5)

    def _serve(self, ready: threading.Event) -> None:
        try:
            asyncio.run(self._deliver_all(ready))
        except Exception:
            logger.exception("hooks: the delivering thread failed; deliveries wait on disk")
        finally:
            self._loop = None

    def _wake_up(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is None or wake is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(wake.set)

    async def _deliver_all(self, ready: threading.Event) -> None:
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        ready.set()
        limits = httpx.Limits(max_connections=self.max_in_flight)
        async with httpx.AsyncClient(limits=limits, follow_redirects=False) as client:
            while not self._stopping:
                self._wake.clear()
                wait_s = self._fill(client)
                if self._stopping:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait_s)
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _fill(self, client: httpx.AsyncClient) -> float | None:
        """Start deliveries while there is room; returns how long to wait for more (None:
        until woken, by an end queued here or a delivery done)."""
        looked, started, wait_s = False, 0, self._poll_s
        while len(self._tasks) < self.max_in_flight:
            if not self._ready:
                if looked:  # a whole batch gone and room left: look again, at once if it
                    return 0.0 if started else wait_s  # was ours (others' claims: later)
                names, wait_s = self._look()
                if not names:
                    return wait_s
                looked = True
                self._ready.extend(names)
            name = self._ready.popleft()
            delivery = self._claim(name)
            if delivery is not None:
                started += 1
                task = asyncio.ensure_future(self._deliver(name, delivery, client))
                self._tasks.add(task)
                task.add_done_callback(self._done)
        return None  # full: a delivery that ends wakes us

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if self._wake is not None:
            self._wake.set()

    def _look(self) -> tuple[list[str], float]:
        """The oldest names in pending/ that are due and whose hook this node has (at most
        a batch: pending/ may hold a storm's worth, and only a batch is kept while looking),
        and the seconds until the next one falls due."""
        now_ns = time.time_ns()
        known = {hook_key(hook) for hook in self._settings.hooks}
        counts = {"unknown": 0, "next_ns": now_ns + int(self._poll_s * 1e9)}

        def due(entries) -> Iterator[tuple[int, str]]:
            for entry in entries:
                if entry.name.startswith("."):
                    continue  # a write under way
                parsed = parse_name(entry.name)
                due_ns, key = parsed if parsed is not None else (0, "")  # foreign: now
                if key and key not in known:
                    counts["unknown"] += 1
                elif due_ns > now_ns:
                    counts["next_ns"] = min(counts["next_ns"], due_ns)
                else:
                    yield due_ns, entry.name

        names: list[str] = []
        try:
            with os.scandir(self.pending) as entries:
                names = [name for _, name in heapq.nsmallest(self._batch, due(entries))]
        except OSError as exc:
            logger.warning("hooks: cannot read {}: {}", self.pending, exc)
        if counts["unknown"] != self._unknown_seen:
            self._unknown_seen = counts["unknown"]
            if self._unknown_seen:
                logger.warning("hooks: {} deliveries in {} are for hooks this node's settings "
                               "do not have; left for a node that has them",
                               self._unknown_seen, self.pending)
        return names, max(0.0, (counts["next_ns"] - now_ns) / 1e9)

    def _claim(self, name: str) -> Delivery | None:
        """Rename the file into this node's claimed/ (None if another node was first), and
        read it. A file that is no delivery is set aside in invalid/."""
        path = self.claimed / name
        try:
            os.rename(self.pending / name, path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.warning("hooks: cannot claim {}: {}", name, exc)
            return None
        try:
            return Delivery.model_validate_json(_read_file(path))
        except (OSError, ValidationError, ValueError) as exc:
            logger.warning("hooks: {} is not a delivery, set aside in {}: {}", name,
                           self.invalid, exc)
            with contextlib.suppress(OSError):
                os.rename(path, self.invalid / name)
            return None

    async def _deliver(self, name: str, delivery: Delivery, client: httpx.AsyncClient) -> None:
        sidecar = delivery.sidecar
        hook = next((h for h in self._settings.hooks if hook_key(h) == delivery.hook), None)
        if hook is None:  # removed by a reload since it was claimed
            self._move(name, self.pending / name)
            return
        number, total = delivery.attempts + 1, hook.retries + 1
        what = f"hook {describe(hook)} ({sidecar.state.value})"
        try:
            failure = await attempt(hook, sidecar, self._settings.outbox / f"{sidecar.id}.json",
                                    client)
        except asyncio.CancelledError:
            self._move(name, self.pending / name)  # the daemon stops: someone delivers it later
            raise
        except Exception as exc:  # a bug here must not lose the delivery
            logger.exception("hooks: {} for job {} failed", what, sidecar.id)
            failure = f"{type(exc).__name__}: {exc}"
        if failure is None:
            self._log(sidecar.id, "INFO", f"{what}: delivered (attempt {number} of {total})")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.claimed / name)
            return
        if number >= total:
            # Kept with its count reset: moved back into pending/, it is tried afresh.
            self._log(sidecar.id, "ERROR", f"{what}: attempt {number} of {total} failed: "
                      f"{failure}; giving up (kept in {self.given_up.name}/{name})")
            self._rewrite(name, delivery.model_copy(update={"attempts": 0}), self.given_up / name)
            return
        first_s = hook.backoff if self._backoff_s is None else self._backoff_s
        delay_s = min(first_s * 2 ** (number - 1), MAX_BACKOFF_S)
        delay_s *= random.uniform(0.9, 1.1)  # a storm's retries do not all come back at once
        self._log(sidecar.id, "WARNING", f"{what}: attempt {number} of {total} failed: "
                  f"{failure}; next attempt in {delay_s:.1f} s")
        later = delivery_name(time.time_ns() + int(delay_s * 1e9), delivery.hook, sidecar.id)
        self._rewrite(name, delivery.model_copy(update={"attempts": number}),
                      self.pending / later)

    def _rewrite(self, name: str, delivery: Delivery, dst: Path) -> None:
        """Record the attempts in the claimed file, then move it on: a crash between the two
        leaves it claimed, and taken back at the next start."""
        try:
            atomic_write(self.claimed / name, delivery.to_json())
        except OSError as exc:
            logger.error("hooks: cannot record an attempt of {}: {}", name, exc)
        self._move(name, dst)

    def _move(self, name: str, dst: Path) -> None:
        try:
            os.rename(self.claimed / name, dst)
        except FileNotFoundError:
            pass
        except OSError as exc:  # left claimed: taken back at the next start
            logger.error("hooks: cannot move {} to {}: {}", name, dst.parent, exc)

    def _log(self, job_id: str, level: str, message: str) -> None:
        log_job_event(self._settings.outbox, job_id, level, message)


def _read_file(path: Path) -> bytes:
    """A delivery file's bytes: never through a link, never blocking on a FIFO, never more
    than MAX_DELIVERY_BYTES."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size > MAX_DELIVERY_BYTES:
            raise ValueError("too big")
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _names_in(folder: Path) -> list[str]:
    try:
        with os.scandir(folder) as entries:
            return [e.name for e in entries if not e.name.startswith(".")]
    except FileNotFoundError:
        return []
