"""Completion hooks (SPEC §10): deliveries queued on disk, and one thread that delivers.

    inbox/.kinod/hooks/journal/<node>/<stem>.jsonl        every end to tell, a line each
    inbox/.kinod/hooks/journal/<node>/<stem>.cursor       how far its lines are settled
    inbox/.kinod/hooks/pending/<due>.<hook>.<id>.json      a retry waiting; <due> in ns since 1970
    inbox/.kinod/hooks/claimed/<node>/<due>.<hook>.<id>.json  a retry being delivered by <node>
    inbox/.kinod/hooks/given_up/<due>.<hook>.<id>.json     out of retries; kept for people
    inbox/.kinod/hooks/invalid/<name>                      a file that is no delivery

A job's end appends one line to this node's journal (kinod.hooks_journal), written with
its final sidecar and flushed to disk in the same flush (``Outbox.on_final``): no new file
per end, and the job's file moves to done/ only once its line is on disk. Nothing waits
for a delivery. The delivering thread reads the journal in order and delivers at most
``max_in_flight`` at once; a line is settled once its hooks took it, it ran out of
retries, or a failed attempt handed it over to a file in pending/. The cursor of the
journal records how far lines are settled; a restart reads on from it (at least once).

A failed attempt writes the delivery to pending/ under its next due time, so nothing
waits in memory; nodes claim those files by rename (kinod.hooks_pending).

A node whose lease ran out hands its work over to the node that sees it first
(``take_back``): its claimed files go back to pending/, and its journal segments not
written to for a lease are renamed into the taker's journal folder with their cursors.

This module is the hooks' front door (``Hooks``) and their delivering thread; beside it,
kinod.hooks_format says what a delivery, its file's name and a journal line are (and why
a hook is named by a key, never by its command or URL), kinod.hooks_journal keeps the
journal, kinod.hooks_pending the files in pending/, and kinod.hooks_delivery makes one
attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from kinod.config import HookSettings, Settings
from kinod.hooks_delivery import attempt, describe
from kinod.hooks_format import (
    MAX_DELIVERY_BYTES,
    Delivery,
    delivery_name,
    hook_key,
    journal_line,
    keyed,
    matching_hooks,
    parse_line,
)
from kinod.hooks_journal import JournalReader, JournalWriter, Line, adopt
from kinod.hooks_pending import PendingFiles
from kinod.models import Sidecar

if TYPE_CHECKING:
    import httpx

# Imported from here by the daemon and the tests: kinod.hooks is the hooks' front door.
__all__ = ["Delivery", "Hooks", "hook_key", "journal_line", "matching_hooks", "parse_line"]

MAX_IN_FLIGHT = 16      # deliveries held at once; every other one waits on disk
POLL_S = 30.0           # a look at pending/ for what other nodes left, when nothing else wakes us
MAX_REMEMBERED = 4096   # ends journaled as written, remembered until the ending stage queues them


class Hooks:
    """The hook deliveries of this node: ``journal`` and ``enqueue`` from any thread;
    ``start`` and ``stop`` the thread that delivers them."""

    def __init__(self, settings: Settings, spool_root: Path, *,
                 max_in_flight: int = MAX_IN_FLIGHT, backoff_s: float | None = None,
                 poll_s: float = POLL_S) -> None:
        self._settings = settings
        self.root = spool_root / "hooks"
        self._pending_files = PendingFiles(self.root, str(settings.node), backoff_s=backoff_s,
                                           poll_s=poll_s, batch=max_in_flight * 4)
        self.pending = self._pending_files.pending
        self.claimed_root = self._pending_files.claimed_root
        self.claimed = self._pending_files.claimed
        self.given_up = self._pending_files.given_up
        self.invalid = self._pending_files.invalid
        self.journal_root = self.root / "journal"
        self.journal_folder = self.journal_root / str(settings.node)
        self.max_in_flight = max_in_flight
        self._poll_s = poll_s
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self._started = False
        self._tasks: set[asyncio.Task] = set()
        self._ready: deque[str] = deque()
        self._keys = keyed(settings.hooks)
        self._writer = JournalWriter(self.journal_folder, idle_s=settings.lease / 2,
                                     on_synced=self._line_on_disk)
        self._reader: JournalReader | None = None
        self._lines: deque[tuple[Line, Delivery]] = deque()  # read, not yet started
        self._look_at = 0.0  # monotonic time of the next look at pending/
        # Where the line of each end journaled as it was written ends, by the end's
        # identity: the ending stage's enqueue of it writes nothing more once that is on
        # disk. Bounded: one forgotten only costs a second delivery.
        self._journaled: OrderedDict[tuple, tuple[str, int]] = OrderedDict()
        self._journaled_lock = threading.Lock()

    # --- what the daemon calls ----------------------------------------------------------

    def journal(self, sidecar: Sidecar, data: bytes | None = None) -> None:
        """A final sidecar is being written (``data``: its bytes): append its line to the
        journal, for the flush under way to put on disk with it (``sync``). OSError if the
        disk refuses."""
        if not sidecar.state.is_terminal:
            return
        keys = self._keys_for(sidecar)
        if not keys:
            return
        where = self._writer.append(journal_line(keys, sidecar, data))
        with self._journaled_lock:
            self._journaled[_identity(sidecar)] = where
            if len(self._journaled) > MAX_REMEMBERED:
                self._journaled.popitem(last=False)

    def sync(self) -> None:
        """Put every line appended so far on disk (``Outbox.folder_flush`` calls this)."""
        self._writer.sync()

    def enqueue(self, sidecar: Sidecar) -> None:
        """Queue one delivery per hook that wants this end. Returns once it is on disk
        (flushed), without waiting for any delivery: at once when the end's final
        sidecar was journaled as it was written, else by a line appended and flushed here.
        OSError if the disk refuses; calling again is safe (at worst, a hook is told
        twice)."""
        if not sidecar.state.is_terminal:
            return
        keys = self._keys_for(sidecar)
        if not keys:
            return
        with self._journaled_lock:
            where = self._journaled.pop(_identity(sidecar), None)
        if where is not None and self._writer.is_synced(*where):
            return  # on disk already, flushed with the sidecar
        self._writer.append(journal_line(keys, sidecar))
        self._writer.sync()

    def start(self) -> None:
        """Take back what this node had claimed when it last stopped or died, and start
        delivering (nothing runs while no hook is set)."""
        self._started = True
        for folder in (self.pending, self.claimed, self.given_up, self.invalid,
                       self.journal_folder):
            folder.mkdir(parents=True, exist_ok=True)
        self.take_back(self._settings.node or "")
        self._start_thread()

    def stop(self) -> None:
        """Stop delivering within a couple of seconds: attempts under way are cut short
        (a command is killed); their lines are read again at the next start, and the
        pending files they came from go back to pending/."""
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
        self._keys = keyed(settings.hooks)
        self._writer.idle_s = settings.lease / 2
        if self._started:
            self._start_thread()
        self._wake_up()

    def take_back(self, node: str) -> int:
        """Put what ``node`` had claimed back in pending/, and take over its journal
        segments no line was written to for a lease: this node's own at start, or another
        one whose lease ran out. Returns how many files."""
        if not node or "/" in node or node.startswith("."):
            return 0
        moved = self._pending_files.take_back(node)
        if moved:
            self._look_at = 0.0  # looked at by the next fill, not the next poll
        if node != self._settings.node and self._started and self._settings.hooks:
            # Only a node that delivers takes a journal over.
            adopted = adopt(self.journal_root / node, self.journal_folder,
                            self._settings.lease)
            if adopted:
                logger.warning("hooks: node {} is gone; this node delivers the {} journal "
                               "segments it left", node, adopted)
                self._relist = True
            moved += adopted
        self._wake_up()
        return moved

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def read_in(self) -> int:
        """Deliveries held in memory and not under way: names read in from pending/ and
        not yet claimed (at most a batch), and journal lines read and not yet started."""
        return len(self._ready) + len(self._lines)

    # --- the delivering thread ----------------------------------------------------------

    _relist = True  # the journal folder holds segments the reader has not listed

    def _keys_for(self, sidecar: Sidecar) -> list[str]:
        state, type_ = sidecar.state.value, sidecar.type
        found: list[str] = []
        for key, hook in self._keys:
            if state in hook.on and (hook.types is None or type_ in hook.types) \
                    and key not in found:
                found.append(key)
        return found

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

    def _line_on_disk(self) -> None:
        # With every slot taken, the delivery that ends first wakes the thread anyway: a
        # storm's flushes need not wake it each time.
        if len(self._tasks) < self.max_in_flight:
            self._wake_up()

    def _wake_up(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is None or wake is None or wake.is_set():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(wake.set)

    async def _deliver_all(self, ready: threading.Event) -> None:
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._reader = JournalReader(self.journal_folder, self._writer, MAX_DELIVERY_BYTES)
        self._relist = True
        self._look_at = 0.0
        ready.set()
        import httpx  # here: a daemon with no webhook never loads it (about 6 MB)

        limits = httpx.Limits(max_connections=self.max_in_flight)
        try:
            async with httpx.AsyncClient(limits=limits, follow_redirects=False) as client:
                while not self._stopping:
                    self._wake.clear()
                    try:
                        wait_s = self._fill(client)
                    except Exception:  # a disk fault, or a bug: never the end of delivering
                        logger.opt(exception=True).error(
                            "hooks: cannot read the deliveries; trying again in {:g} s",
                            self._poll_s)
                        wait_s = self._poll_s
                    cursor_s = self._reader.write_cursors()
                    if cursor_s is not None:
                        wait_s = cursor_s if wait_s is None else min(wait_s, cursor_s)
                    if self._stopping:
                        break
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), wait_s)
                for task in list(self._tasks):
                    task.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            self._lines.clear()
            self._reader.close()  # the cursors as far as settled: the rest is read again

    def _fill(self, client: httpx.AsyncClient) -> float | None:
        """Start deliveries while there is room: retries due in pending/ first, then the
        journal's lines in order. Returns how long to wait (None: until woken, by a line
        on disk or a delivery done)."""
        assert self._reader is not None
        if self._relist:
            self._relist = False
            self._reader.relist()
        now = time.monotonic()
        claimed = True  # a look at pending/ is worth making: none yet, or the last gave some
        while len(self._tasks) < self.max_in_flight:
            if self._ready:
                name = self._ready.popleft()
                delivery = self._pending_files.claim(name)
                if delivery is not None:
                    claimed = True
                    self._launch(self._deliver_file(name, delivery, client))
                continue
            if now >= self._look_at and claimed:
                claimed = False
                names, wait_s = self._pending_files.look({key for key, _ in self._keys})
                # A whole batch: look again once it is gone; else when the next falls due.
                self._look_at = now + (0.0 if len(names) >= self._pending_files.batch else wait_s)
                if names:
                    self._ready.extend(names)
                    continue
            if not self._lines and not self._read_line():
                break
            line, delivery = self._lines.popleft()
            self._launch(self._deliver_line(line, delivery, client))
        else:
            return None  # full: a delivery that ends wakes us
        if self._look_at <= now:  # a batch of which other nodes claimed every one
            self._look_at = now + min(self._poll_s, 1.0)
        return self._look_at - now

    def _read_line(self) -> bool:
        """Read the journal's next line into ``_lines``; False when there is none now.
        Lines that are no delivery are skipped."""
        assert self._reader is not None
        while (got := self._reader.next_line()) is not None:
            line, raw = got
            deliveries = parse_line(raw)
            if deliveries is None:
                logger.warning("hooks: a line of {} is no delivery; skipped",
                               line.segment.path)
            line.left = len(deliveries or ())
            if not deliveries:
                self._reader.settle(line, 0)
                continue
            # One for a hook this node lacks is handed over to pending/ (_deliver_line).
            self._lines.extend((line, delivery) for delivery in deliveries)
            return True
        return False

    def _launch(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if self._wake is not None:
            self._wake.set()

    def _hook(self, key: str) -> HookSettings | None:
        return next((hook for k, hook in self._keys if k == key), None)

    async def _attempt(self, delivery: Delivery, client: httpx.AsyncClient,
                       hook: HookSettings) -> str | None:
        """One attempt; None when delivered, else why not (logged by the caller)."""
        sidecar = delivery.sidecar
        try:
            return await attempt(hook, sidecar, self._settings.outbox / f"{sidecar.id}.json",
                                 client)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not lose the delivery
            logger.exception("hooks: hook {} for job {} failed", describe(hook), sidecar.id)
            return f"{type(exc).__name__}: {exc}"

    async def _deliver_line(self, line: Line, delivery: Delivery,
                            client: httpx.AsyncClient) -> None:
        """A journal line's delivery: settled once delivered, given up, or handed over to
        pending/ for its next attempt. Cut short by a stop, it stays unsettled: read again
        at the next start."""
        assert self._reader is not None
        hook = self._hook(delivery.hook)
        if hook is None:  # removed by a reload since it was read
            self._settle_by(line, self._pending_files.hand_over, delivery)
            return
        failure = await self._attempt(delivery, client, hook)
        name = delivery_name(time.time_ns(), delivery.hook, delivery.sidecar.id)
        outcome, delay_s = self._pending_files.judge(delivery, hook, failure, name,
                                                     self._settings.outbox)
        if outcome == "done":
            self._reader.settle(line)
        elif outcome == "give up":
            self._settle_by(line, self._pending_files.write_given_up, name, delivery)
        else:
            self._settle_by(line, self._write_retry, delivery, delay_s)

    def _settle_by(self, line: Line, write: Callable[..., None], *args: Any) -> None:
        """Settle the line once ``write`` put its delivery on disk; if the disk refuses, the
        line stays unsettled and its delivery is tried again after POLL_S."""
        assert self._reader is not None
        try:
            write(*args)
        except OSError as exc:
            logger.error("hooks: cannot record a delivery of a line of {}: {}; trying it "
                         "again in {:g} s", line.segment.path, exc, self._poll_s)
            assert self._loop is not None
            self._loop.call_later(self._poll_s, self._again, line, args)
            return
        self._reader.settle(line, handed_over=True)

    def _again(self, line: Line, args: tuple) -> None:
        delivery = next(arg for arg in args if isinstance(arg, Delivery))
        self._lines.appendleft((line, delivery))
        self._wake_up()

    def _write_retry(self, delivery: Delivery, delay_s: float) -> None:
        self._pending_files.write_retry(delivery, delay_s)
        self._look_at = min(self._look_at, time.monotonic() + delay_s)

    async def _deliver_file(self, name: str, delivery: Delivery,
                            client: httpx.AsyncClient) -> None:
        """A pending file's delivery (a retry): its file removed once delivered, moved to
        given_up/, or back to pending/ under its next due time."""
        hook = self._hook(delivery.hook)
        if hook is None:  # removed by a reload since it was claimed
            self._pending_files.release(name)
            return
        try:
            failure = await self._attempt(delivery, client, hook)
        except asyncio.CancelledError:
            self._pending_files.release(name)  # the daemon stops: someone delivers it later
            raise
        outcome, delay_s = self._pending_files.judge(delivery, hook, failure, name,
                                                     self._settings.outbox)
        self._pending_files.finish(name, delivery, outcome, delay_s)
        if outcome == "retry":
            self._look_at = min(self._look_at, time.monotonic() + delay_s)


def _identity(sidecar: Sidecar) -> tuple:
    return sidecar.id, sidecar.attempt, sidecar.state, sidecar.finished_at, sidecar.node
