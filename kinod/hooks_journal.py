"""The hooks' journal: every end a hook must hear of, one line each, appended to a file of
this node's, read back in order by the thread that delivers.

    inbox/.kinod/hooks/journal/<node>/<stem>.jsonl     segments, oldest stem first
    inbox/.kinod/hooks/journal/<node>/<stem>.cursor    how far a segment is settled

An end costs one append to the open segment (``JournalWriter.append``), no new file. The
segment is flushed to disk (``JournalWriter.sync``) in the same flush as the outbox's
folder, the flush that already comes before a job file moves to done/: the end's line is
on disk before its job is filed away, at the price of one more fdatasync per flush, which
the ends written together share.

A line is settled once each of its deliveries was made, given up, or handed over to a
file in pending/ (a retry, or a hook this node lacks). The cursor, written now and then
by temporary file and rename, says up to which byte every line is settled; a restart reads
on from it, so a line is delivered again at most if it was under way, or settled since
the last cursor (at least once, never lost). A segment read to its end and settled is
removed, cursor last.

A segment is only ever appended to by the process that made it: a daemon starts a new one
at its first end, and after a write the disk cut short, and when the open one is full
(``SEGMENT_BYTES``) or has had no line for ``idle_s``. So an older segment is whole but
for, at worst, a torn last line (a crash or a full disk mid-write), which the reader skips.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from loguru import logger

from kinod.atomic_files import atomic_write, fsync_dir

SEGMENT_BYTES = 4 << 20  # a segment this big is closed, and a new one begun
CURSOR_EVERY = 64        # lines settled between two cursor writes (and at least each second)
CURSOR_S = 1.0
ADOPTING = ".adopting."  # a segment taken from a node that is gone, not yet in place
_NEW_SEGMENT = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class JournalWriter:
    """This node's open segment: ``append`` from any thread, ``sync`` to put what was
    appended on disk."""

    def __init__(self, folder: Path, idle_s: float,
                 on_synced: Callable[[], None] | None = None) -> None:
        self.folder = folder
        self.idle_s = idle_s
        self._on_synced = on_synced
        self._lock = threading.Lock()
        self._fd = -1
        self._stem: str | None = None
        self._size = 0         # bytes appended to the open segment
        self._synced = 0       # of which on disk
        self._entry_synced = False  # the segment's name is on disk too
        self._torn = False     # a write was cut short: the next line goes to a new segment
        self._last = 0.0       # monotonic time of the last append

    def append(self, line: bytes) -> tuple[str, int]:
        """One whole line at the end of the open segment (not yet flushed); returns the
        segment's stem and where the line ends in it. OSError if the disk refuses; then
        nothing of it counts, and the next line starts a new segment."""
        with self._lock:
            now = time.monotonic()
            if (self._fd < 0 or self._torn or self._size >= SEGMENT_BYTES
                    or now - self._last > self.idle_s):
                self._rotate()
            done = 0
            try:
                while done < len(line):
                    done += os.write(self._fd, line[done:])
            except OSError:
                if done:
                    self._torn = True
                raise
            self._size += len(line)
            self._last = now
            assert self._stem is not None
            return self._stem, self._size

    def is_synced(self, stem: str, end: int) -> bool:
        """Whether the line ending at ``end`` of segment ``stem`` is on disk (a segment
        closed since is on disk whole)."""
        with self._lock:
            return stem != self._stem or end <= self._synced

    def sync(self) -> None:
        """Put every line appended so far on disk. Safe beside appends on other threads."""
        with self._lock:
            if self._fd < 0 or (self._synced == self._size and self._entry_synced):
                return
            fd, stem, size, entry = os.dup(self._fd), self._stem, self._size, self._entry_synced
        try:
            os.fdatasync(fd)
            if not entry:
                fsync_dir(self.folder)
        finally:
            os.close(fd)
        with self._lock:
            if self._stem == stem:
                self._synced = max(self._synced, size)
                self._entry_synced = True
        if self._on_synced is not None:
            self._on_synced()

    def live(self) -> tuple[str | None, int]:
        """The open segment's stem, and how many of its bytes are on disk."""
        with self._lock:
            return self._stem, self._synced

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                with contextlib.suppress(OSError):
                    os.fdatasync(self._fd)
                os.close(self._fd)
            self._fd, self._stem = -1, None

    def _rotate(self) -> None:
        """Close the open segment (all of it on disk first) and begin a new one."""
        if self._fd >= 0:
            os.fdatasync(self._fd)
            if not self._entry_synced:
                fsync_dir(self.folder)
            os.close(self._fd)
            self._fd, self._stem = -1, None
        for _ in range(100):
            stem = f"{time.time_ns():020d}"
            try:
                fd = os.open(self.folder / f"{stem}.jsonl", _NEW_SEGMENT, 0o644)
            except FileExistsError:
                continue
            except FileNotFoundError:
                self.folder.mkdir(parents=True, exist_ok=True)
                continue
            break
        else:
            raise FileExistsError(f"no free segment name in {self.folder}")
        self._fd, self._stem = fd, stem
        self._size = self._synced = 0
        self._entry_synced = self._torn = False


class Line:
    """A line read from a segment whose deliveries are not all settled."""

    __slots__ = ("end", "left", "segment")

    def __init__(self, segment: Segment, end: int, left: int) -> None:
        self.segment, self.end, self.left = segment, end, left


class Segment:
    """A segment being read: where the next line starts, and up to where all is settled."""

    def __init__(self, folder: Path, stem: str) -> None:
        self.stem = stem
        self.path = folder / f"{stem}.jsonl"
        self.cursor_path = folder / f"{stem}.cursor"
        self.settled = self.pos = self.cursor = read_cursor(self.cursor_path)
        self.lines: deque[Line] = deque()  # read, in order, not yet all settled
        self.ended = False  # read to its end, and closed: nothing more comes
        self.unwritten = 0  # lines settled since the cursor was written
        self.cursor_at = time.monotonic()
        self.fd = -1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class JournalReader:
    """The segments of one node's journal folder, read in order, a line at a time."""

    def __init__(self, folder: Path, writer: JournalWriter | None, max_line: int) -> None:
        self.folder = folder
        self._writer = writer
        self._max_line = max_line
        self._segments: dict[str, Segment] = {}
        self._order: list[str] = []
        self.torn = 0  # lines skipped, for tests and the log

    def relist(self) -> None:
        """Take up the segments in the folder not read yet (at start, and after an
        adoption); segments adopted but not put in place when a daemon died are put in
        place, and cursors whose segment is gone removed."""
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return
        except OSError as exc:
            logger.warning("hooks: cannot read {}: {}", self.folder, exc)
            return
        stems = set()
        for name in names:
            if name.startswith(ADOPTING) and name.endswith(".jsonl"):
                with contextlib.suppress(OSError):
                    os.rename(self.folder / name, self.folder / name[len(ADOPTING):])
                    name = name[len(ADOPTING):]
            if not name.startswith(".") and name.endswith(".jsonl"):
                stems.add(name[:-len(".jsonl")])
        for name in names:
            if (not name.startswith(".") and name.endswith(".cursor")
                    and name[:-len(".cursor")] not in stems):
                with contextlib.suppress(OSError):
                    os.unlink(self.folder / name)
        for stem in sorted(stems - self._segments.keys()):
            self._segments[stem] = Segment(self.folder, stem)
        self._order = sorted(self._segments)

    def next_line(self) -> tuple[Line, bytes] | None:
        """The next whole line of the oldest segment that has one (its deliveries to be
        counted into ``Line.left`` by the caller); None when none has one now."""
        live_stem, _ = self._writer.live() if self._writer is not None else (None, 0)
        if live_stem is not None and live_stem not in self._segments:
            self.relist()  # the writer began a segment
        for stem in self._order:
            segment = self._segments[stem]
            if segment.ended:
                continue
            got = self._read(segment)
            if got is not None:
                return got
        return None

    def settle(self, line: Line, count: int = 1, handed_over: bool = False) -> None:
        """``count`` of the line's deliveries are settled. ``handed_over``: one went on to a
        file of its own (a retry): the cursor is written at once if it passes the line, so
        that a crash does not leave the delivery both there and unsettled here."""
        line.left -= count
        segment = line.segment
        while segment.lines and segment.lines[0].left <= 0:
            segment.settled = segment.lines.popleft().end
            segment.unwritten += 1
        if segment.unwritten >= CURSOR_EVERY or (handed_over and segment.settled >= line.end):
            self._write_cursor(segment)
        self._remove_if_done(segment)

    def write_cursors(self, force: bool = False) -> float | None:
        """Write the cursors that moved (``force``: every one that moved, now; else those
        not written for CURSOR_S). Returns the seconds until one left behind is due."""
        now, due = time.monotonic(), None
        for segment in list(self._segments.values()):
            if segment.settled == segment.cursor:
                continue
            if force or now - segment.cursor_at >= CURSOR_S:
                self._write_cursor(segment)
            else:
                left = segment.cursor_at + CURSOR_S - now
                due = left if due is None else min(due, left)
        return due

    def close(self) -> None:
        self.write_cursors(force=True)
        for segment in self._segments.values():
            segment.close()
        self._segments.clear()
        self._order = []

    @property
    def held(self) -> int:
        """Lines read and not all settled (held in memory)."""
        return sum(len(segment.lines) for segment in self._segments.values())

    # --- reading --------------------------------------------------------------------------

    def _read(self, segment: Segment) -> tuple[Line, bytes] | None:
        live_stem, synced = self._writer.live() if self._writer is not None else (None, 0)
        live = segment.stem == live_stem
        if segment.fd < 0:
            try:
                segment.fd = os.open(segment.path, _READ)
            except FileNotFoundError:  # taken by another node, or removed by someone
                self._drop(segment)
                return None
            except OSError as exc:
                logger.warning("hooks: cannot read {}: {}", segment.path, exc)
                return None
        try:
            size = os.fstat(segment.fd).st_size
        except OSError:
            return None
        limit = min(size, synced) if live else size
        while segment.pos < limit:
            try:
                raw = self._pread_line(segment, limit)
            except OSError as exc:
                logger.warning("hooks: cannot read {}: {}", segment.path, exc)
                return None
            if raw is None:
                break
            start = segment.pos
            segment.pos += len(raw)
            if not raw.endswith(b"\n") or len(raw) > self._max_line:
                # Torn (cut short by a crash or a full disk), or past the size a delivery
                # may have: skipped, never delivered half.
                self.torn += 1
                logger.warning("hooks: {} bytes at {} of {} are no whole line; skipped",
                               len(raw), start, segment.path)
                self._skip(segment, segment.pos)
                continue
            line = Line(segment, segment.pos, 0)
            segment.lines.append(line)
            return line, raw
        if not live and segment.pos >= size:
            segment.ended = True
            self._remove_if_done(segment)
        return None

    def _pread_line(self, segment: Segment, limit: int) -> bytes | None:
        """From ``segment.pos``: bytes up to and with the next newline before ``limit``; or,
        when there is none, a piece with no newline: everything up to ``limit`` in a
        closed segment (a torn last line), a too-long line's first part. None: a line
        still being written in the live segment."""
        chunks: list[bytes] = []
        pos, total = segment.pos, 0
        while pos < limit:
            chunk = os.pread(segment.fd, min(1 << 16, limit - pos), pos)
            if not chunk:
                break
            cut = chunk.find(b"\n")
            if cut >= 0:
                chunks.append(chunk[:cut + 1])
                return b"".join(chunks)
            chunks.append(chunk)
            pos += len(chunk)
            total += len(chunk)
            if total > self._max_line:
                return b"".join(chunks)  # too long: skipped up to here, the rest after
        live_stem, _ = self._writer.live() if self._writer is not None else (None, 0)
        if segment.stem == live_stem:
            return None
        return b"".join(chunks) or None

    def _skip(self, segment: Segment, end: int) -> None:
        line = Line(segment, end, 1)
        segment.lines.append(line)
        self.settle(line)

    # --- the cursor, and removal ----------------------------------------------------------

    def _write_cursor(self, segment: Segment) -> None:
        segment.unwritten = 0
        segment.cursor_at = time.monotonic()
        try:
            atomic_write(segment.cursor_path, f"{segment.settled}\n".encode())
        except OSError as exc:
            logger.warning("hooks: cannot write {}: {}", segment.cursor_path, exc)
            return
        segment.cursor = segment.settled

    def _remove_if_done(self, segment: Segment) -> None:
        if not segment.ended or segment.lines:
            return
        # The segment first: a crash in between leaves a cursor alone, removed at the next
        # start; the other way round would leave the segment to be read again from 0.
        segment.close()
        try:
            os.unlink(segment.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("hooks: cannot remove {}: {}", segment.path, exc)
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(segment.cursor_path)
        self._drop(segment)

    def _drop(self, segment: Segment) -> None:
        segment.close()
        self._segments.pop(segment.stem, None)
        self._order = sorted(self._segments)


def read_cursor(path: Path) -> int:
    """A cursor's offset; 0 (read the segment from its start) when it is missing or not
    one kinod wrote."""
    try:
        fd = os.open(path, _READ)
    except OSError:
        return 0
    try:
        text = os.read(fd, 64)
    except OSError:
        return 0
    finally:
        os.close(fd)
    text = text.strip()
    return int(text) if text.isdigit() and len(text) < 20 else 0


def adopt(source: Path, folder: Path, lease_s: float) -> int:
    """Take the segments of a node whose lease ran out into ``folder`` (this node's), with
    their cursors: renamed, so only one node takes each. A segment written to within the
    lease is left for a later look: its node may only be held up. Returns how many."""
    try:
        names = sorted(os.listdir(source))
    except OSError:
        return 0
    now, taken = time.time(), 0
    for name in names:
        if name.startswith(".") or not name.endswith(".jsonl"):
            continue
        stem = name[:-len(".jsonl")]
        try:
            if now - os.lstat(source / name).st_mtime < lease_s:
                continue
        except FileNotFoundError:
            continue
        new_stem = f"{stem}.{source.name}"
        hidden = folder / f"{ADOPTING}{new_stem}.jsonl"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(source / name, hidden)  # the claim: one node's rename succeeds
        except FileNotFoundError:
            continue
        except OSError as exc:
            logger.warning("hooks: cannot take {} over: {}", source / name, exc)
            continue
        with contextlib.suppress(OSError):
            os.rename(source / f"{stem}.cursor", folder / f"{new_stem}.cursor")
        try:
            os.rename(hidden, folder / f"{new_stem}.jsonl")
        except OSError as exc:  # put in place by the next start's relist
            logger.warning("hooks: cannot put {} in place: {}", hidden, exc)
        taken += 1
    for name in names:  # cursors whose segment another node took, or finished
        if name.endswith(".cursor") and not os.path.lexists(source / f"{name[:-7]}.jsonl"):
            with contextlib.suppress(OSError):
                os.unlink(source / name)
    return taken
