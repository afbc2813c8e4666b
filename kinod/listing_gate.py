"""Listing a folder only when it may hold something new: what keeps dozens of polling
nodes from listing a network share's folders at every poll when nothing has changed.

A file system gives a folder a new mtime whenever an entry is added, removed or renamed,
so a folder whose mtime (and inode) stayed as they were since a listing needs none.
Two cautions. A change made within the file system's clock tick just after a listing
leaves the mtime as it was: a listing counts as up to date only if it began TICK_S after
the mtime it saw first appeared. And a client may cache a folder's attributes for a
while (NFS's acdirmax): a full listing every ``safety_s`` whatever the mtime says.
A gate asked many times a second (a lookup for every file dropped) may be given
``min_interval_s``: while the mtime stays as it was, a listing within the tick is not
repeated sooner than that; only a change made in the very tick of a listing waits for it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

TICK_S = 2.0  # coarser than any file system's mtime (FAT's is 2 s)


class ListingGate:
    def __init__(self, folder: Path, clock: Callable[[], float], safety_s: float,
                 min_interval_s: float = 0.0) -> None:
        self.folder = folder
        self.min_interval_s = min_interval_s
        self._clock = clock
        self.safety_s = safety_s
        self._version: tuple[int, int] | None = None
        self._first_seen = 0.0
        self._listed_at: float | None = None

    def should_list(self) -> bool:
        """True when the folder may have changed since it was last listed (the caller lists
        it now: the listing is counted from this moment)."""
        now = self._clock()
        try:
            st = os.stat(self.folder)
            version = (st.st_ino, st.st_mtime_ns)
        except OSError:
            version = None  # gone or unreadable: the listing says what is wrong
        if version != self._version or version is None:
            self._version, self._first_seen = version, now
        elif self._listed_at is not None and (
                now - self._listed_at < self.min_interval_s
                or (self._listed_at - self._first_seen >= TICK_S
                    and now - self._listed_at < self.safety_s)):
            return False
        self._listed_at = now
        return True
