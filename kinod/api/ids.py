"""Integer job ids (``"1"``, ``"2"``, ...) unique across every node sharing the folder.

An id is taken by creating ``inbox/.kinod/ids/<n>`` with O_CREAT|O_EXCL: of several APIs
trying the same number at once exactly one succeeds, on a local disk and on NFS (v3 and
later) alike. The files stay, so a number is never handed out twice, even after its job's
sidecar is pruned. The next number to try is only a hint kept in memory.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from kinod.intake import inbox_has_job
from kinod.spool import Spool

# Past this many numbers found taken in a row, look at the folder again for the highest.
_RESCAN_AFTER = 64


class IdAllocator:
    def __init__(self, spool: Spool, outbox: Path) -> None:
        self.spool = spool
        self.outbox = outbox
        self.folder = spool.root / "ids"
        self._lock = threading.Lock()
        self._next: int | None = None

    def allocate(self) -> str:
        """Take the next free number; OSError if the spool cannot be written."""
        with self._lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            n = self._next if self._next is not None else self._highest() + 1
            misses = 0
            while True:
                if misses >= _RESCAN_AFTER:
                    n, misses = max(n, self._highest() + 1), 0
                if self._in_use(str(n)):
                    n, misses = n + 1, misses + 1
                    continue
                try:
                    os.close(os.open(self.folder / str(n),
                                     os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                     | os.O_CLOEXEC, 0o644))
                except FileExistsError:
                    n, misses = n + 1, misses + 1
                    continue
                self._next = n + 1
                return str(n)

    def _highest(self) -> int:
        with os.scandir(self.folder) as entries:
            return max((int(e.name) for e in entries if e.name.isascii() and e.name.isdigit()),
                       default=0)

    def _in_use(self, job_id: str) -> bool:
        """A job of that id exists already: dropped by hand, run before, or being run."""
        return (os.path.lexists(self.outbox / f"{job_id}.json")
                or os.path.lexists(self.spool.done / job_id)
                or inbox_has_job(self.spool.inbox, job_id)
                or self.spool.holds(job_id))
