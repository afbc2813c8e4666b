"""An in-memory index of ``outbox/``: every job's latest sidecar, ready to list and to send.

Kept current by watching the outbox (kinod.watcher's inotify reader, the daemon's own),
plus a rescan that catches whatever events missed: every ``rescan_interval_s``, or every
``poll_interval_s`` where the folder is polled (a network file system, whose changes made
on other machines inotify never reports). A listing is served from here, never by reading
files per request; each sidecar is kept as compact JSON, ready to be sent as it is.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import json
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from loguru import logger
from pydantic import ValidationError

from kinod.models import Sidecar, is_valid_job_id
from kinod.watcher import InboxWatcher

# What a sidecar file was when it was read: its mtime, size and inode. Every sidecar
# write is a rename of a new file, so a new inode alone tells a rewrite.
FileKey = tuple[int, int, int]
# Listing order: by creation time, then id; a listing walks it backwards (newest first).
SortKey = tuple[float, str]


@dataclass(slots=True, frozen=True)
class Entry:
    id: str
    state: str
    type: str | None
    sort_key: SortKey
    json: bytes  # the sidecar, compact
    duration_s: float | None  # started_at to finished_at, once it ended
    file_key: FileKey


# Told of every change: (the entry before, the entry now); None for none.
Observer = Callable[[Entry | None, Entry | None], None]


class BadCursor(ValueError):
    pass


def load_entry(folder: str, job_id: str) -> tuple[FileKey | None, Entry | None]:
    """Read ``<folder>/<job_id>.json``: its key (None if it is gone) and its entry (None if
    it is gone, or is not a sidecar). Never follows a link."""
    try:
        fd = os.open(f"{folder}/{job_id}.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC)
    except OSError:
        return None, None
    try:
        st = os.fstat(fd)
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        if not stat.S_ISREG(st.st_mode) or st.st_size > 64 << 20:
            return key, None
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    except OSError:
        return None, None
    finally:
        os.close(fd)
    try:
        sidecar = Sidecar.from_json(b"".join(chunks))
    except (ValidationError, ValueError):
        return key, None
    if sidecar.id != job_id:
        return key, None
    duration = None
    if sidecar.started_at is not None and sidecar.finished_at is not None:
        duration = max(0.0, (sidecar.finished_at - sidecar.started_at).total_seconds())
    return key, Entry(job_id, sidecar.state.value, sidecar.type,
                      (sidecar.created_at.timestamp(), job_id),
                      sidecar.model_dump_json(by_alias=True).encode(), duration, key)


def encode_cursor(key: SortKey) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode().rstrip("=")


def decode_cursor(text: str) -> SortKey:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        created, job_id = json.loads(raw)
        if isinstance(created, bool) or not isinstance(created, int | float) \
                or not isinstance(job_id, str):
            raise ValueError
        return float(created), job_id
    except (ValueError, TypeError, binascii.Error):
        raise BadCursor("not a cursor this API gave") from None


class OutboxIndex:
    def __init__(self, outbox: Path, polling: bool, rescan_interval_s: float) -> None:
        self.folder = outbox
        self._folder = str(outbox)
        self.polling = polling
        self.rescan_interval_s = rescan_interval_s
        self.observers: list[Observer] = []
        self._entries: dict[str, Entry] = {}
        # Sorted keys: every entry's, and those of each state and each type.
        self._orders: dict[tuple[str, str | None] | None, list[SortKey]] = {None: []}
        self._pending: set[str] = set()
        self._watcher: InboxWatcher | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rescan_now = asyncio.Event()

    # --- life ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Read the whole outbox (before the API answers anything), then follow it."""
        self._loop = asyncio.get_running_loop()
        await self.rescan()
        self._start_watcher()
        self._task = asyncio.create_task(self._rescans(), name="outbox rescans")

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def _start_watcher(self) -> None:
        if self.polling or self._watcher is not None:
            return
        watcher = InboxWatcher([self.folder], self._on_path)
        try:
            watcher.start(asyncio.get_running_loop())
        except (OSError, TypeError):  # no outbox yet (no daemon has run), or no inotify
            watcher.stop()
            return
        self._watcher = watcher

    async def _rescans(self) -> None:
        while True:
            # Soon again while the outbox cannot be watched yet (no daemon has made it).
            unwatched = not self.polling and self._watcher is None
            interval_s = min(self.rescan_interval_s, 1.0) if unwatched else self.rescan_interval_s
            try:
                await asyncio.wait_for(self._rescan_now.wait(), interval_s)
            except TimeoutError:
                pass
            self._rescan_now.clear()
            try:
                await self.rescan()
            except OSError as exc:
                logger.warning("cannot read the outbox {}: {}", self.folder, exc)
            self._start_watcher()

    async def rescan(self) -> None:
        """Read what changed since the last look, in a thread; apply it here, unless an
        event updated the same sidecar meanwhile."""
        known = {job_id: entry.file_key for job_id, entry in self._entries.items()}
        found, gone = await asyncio.to_thread(self._scan, known)
        for job_id, entry in found:
            current = self._entries.get(job_id)
            if (current.file_key if current else None) == known.get(job_id):
                self._put(job_id, entry)
        for job_id in gone:
            current = self._entries.get(job_id)
            if current is not None and current.file_key == known[job_id]:
                self._put(job_id, None)

    def _scan(self, known: dict[str, FileKey]
              ) -> tuple[list[tuple[str, Entry | None]], list[str]]:
        found, seen = [], set()
        try:
            entries = os.scandir(self._folder)
        except FileNotFoundError:
            return [], list(known)
        with entries:
            for item in entries:
                name = item.name
                if not name.endswith(".json") or not is_valid_job_id(job_id := name[:-5]):
                    continue
                try:
                    st = item.stat(follow_symlinks=False)
                except OSError:
                    continue
                seen.add(job_id)
                if known.get(job_id) != (st.st_mtime_ns, st.st_size, st.st_ino):
                    found.append((job_id, load_entry(self._folder, job_id)[1]))
        return found, [job_id for job_id in known if job_id not in seen]

    # --- events (on the loop) ----------------------------------------------------------

    def _on_path(self, path: str, renamed: bool) -> None:
        folder, _, name = path.rpartition("/")
        if path == self._folder or folder != self._folder:
            self._rescan_now.set()  # events were lost, or the outbox went
            return
        if not name.endswith(".json") or not is_valid_job_id(job_id := name[:-5]):
            return
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._read_pending)
        self._pending.add(job_id)

    def _read_pending(self) -> None:
        pending, self._pending = self._pending, set()
        for job_id in pending:
            key, entry = load_entry(self._folder, job_id)
            current = self._entries.get(job_id)
            if key is not None and current is not None and current.file_key == key:
                continue  # read already (the rescan, or an earlier event)
            if key is not None or current is not None:
                self._put(job_id, entry)

    # --- the index ---------------------------------------------------------------------

    def _put(self, job_id: str, entry: Entry | None) -> None:
        old = self._entries.pop(job_id, None)
        if old is not None:
            for order in self._orders_of(old):
                _remove(order, old.sort_key)
        if entry is not None:
            self._entries[job_id] = entry
            for order in self._orders_of(entry, create=True):
                bisect.insort(order, entry.sort_key)
        if old is not None or entry is not None:
            for observer in self.observers:
                observer(old, entry)

    def _orders_of(self, entry: Entry, create: bool = False) -> Iterator[list[SortKey]]:
        for name in (None, ("state", entry.state), ("type", entry.type)):
            order = self._orders.get(name)
            if order is None and create:
                order = self._orders[name] = []
            if order is not None:
                yield order

    def get(self, job_id: str) -> Entry | None:
        return self._entries.get(job_id)

    def entries(self) -> Iterable[Entry]:
        return self._entries.values()

    def __len__(self) -> int:
        return len(self._entries)

    def page(self, limit: int, cursor: str | None = None, states: list[str] | None = None,
             job_type: str | None = None) -> tuple[list[Entry], str | None]:
        """Up to ``limit`` entries, newest first, after ``cursor``; and the cursor of the next
        page (None on the last). BadCursor for a cursor this API never gave."""
        wanted = set(states or ())
        candidates = [self._orders.get(("type", job_type), [])] if job_type is not None else []
        if len(wanted) == 1:
            candidates.append(self._orders.get(("state", next(iter(wanted))), []))
        order = min(candidates, key=len) if candidates else self._orders[None]
        end = len(order) if cursor is None else bisect.bisect_left(order, decode_cursor(cursor))
        page: list[Entry] = []
        for position in range(end - 1, -1, -1):
            entry = self._entries[order[position][1]]
            if (wanted and entry.state not in wanted) or (
                    job_type is not None and entry.type != job_type):
                continue
            if len(page) == limit:
                return page, encode_cursor(page[-1].sort_key)
            page.append(entry)
        return page, None


def _remove(order: list[SortKey], key: SortKey) -> None:
    position = bisect.bisect_left(order, key)
    if position < len(order) and order[position] == key:
        del order[position]
