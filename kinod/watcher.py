"""Hands inbox file events from watchdog's inotify thread to the daemon's event loop;
decides nothing."""

from __future__ import annotations

import asyncio
import collections
import os
from collections.abc import Callable
from pathlib import Path

try:
    from watchdog.observers.inotify_c import InotifyConstants, InotifyEvent, InotifyFD
except (ImportError, OSError):  # not Linux: the daemon polls
    InotifyFD = None

# Called on the daemon's loop with the path (as text: a burst of events can be long, and a
# Path's parts are interned) and whether it arrived by a rename. A folder deleted in the
# watched one, or the watched one itself, is passed on too: the daemon checks whether its
# inbox is still there. So is the watched folder when the kernel's event queue overflowed
# and events were lost: the daemon lists it again.
PathCallback = Callable[[str, bool], None]

if InotifyFD is not None:
    _C = InotifyConstants
    # What makes a job file appear or change. Moves out and deletions of files are left out:
    # kinod's own moves out of the inbox would wake the loop for nothing, once a job.
    _MASK = (_C.IN_CREATE | _C.IN_MODIFY | _C.IN_ATTRIB | _C.IN_CLOSE_WRITE | _C.IN_MOVED_TO
             | _C.IN_DELETE | _C.IN_DELETE_SELF | _C.IN_MOVE_SELF | _C.IN_ONLYDIR)


class InboxWatcher:
    """Watches folders (not their sub-folders) through inotify.

    watchdog's own inotify reader thread calls back here for each event; its observer's
    further threads (an emitter that pairs moves, holding them a while, and a dispatcher)
    would cost two more thread switches an event and add latency, for work kinod does not
    need. Events are batched into the loop: one wake-up for however many came meanwhile.
    """

    def __init__(self, folders: list[Path], callback: PathCallback) -> None:
        self.folders = folders
        self._callback = callback
        self._inotify: InotifyFD | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._folder_of: dict[int, str] = {}
        self._events: collections.deque[tuple[str, bool]] = collections.deque()
        self._drain_planned = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._inotify = InotifyFD()
        for folder in self.folders:
            wd = self._inotify.add_callback(os.fsencode(folder), _MASK, self, id(self))
            self._folder_of[wd] = str(folder)
        self._inotify.start()

    def stop(self) -> None:
        inotify, self._inotify = self._inotify, None
        if inotify is not None:
            inotify.stop()  # watches are removed: on_watch_deleted, ignored when stopping
            inotify.join(timeout=5)
        self._folder_of = {}

    # --- called on watchdog's inotify thread -------------------------------------------

    def on_event(self, event: InotifyEvent) -> None:
        folder = self._folder_of.get(event.wd)
        if folder is None or not event.name:
            return
        mask = event.mask
        if mask & _C.IN_ISDIR:
            if mask & _C.IN_DELETE:
                self._forward(os.path.join(folder, os.fsdecode(event.name)), False)
        elif not mask & _C.IN_DELETE:
            self._forward(os.path.join(folder, os.fsdecode(event.name)),
                          bool(mask & _C.IN_MOVED_TO))

    def on_watch_deleted(self, wd: int) -> None:
        folder = self._folder_of.get(wd)
        if folder is not None and self._inotify is not None:
            self._forward(folder, False)

    def on_queue_overflow(self) -> None:
        for folder in list(self._folder_of.values()):
            self._forward(folder, False)

    def _forward(self, path: str, renamed: bool) -> None:
        self._events.append((path, renamed))
        if self._drain_planned or self._loop is None:
            return
        self._drain_planned = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:
            pass  # the loop closed while the watcher was stopping

    # --- on the daemon's loop ------------------------------------------------------------

    def _drain(self) -> None:
        # Cleared first: an event added while draining plans another drain, never is missed.
        self._drain_planned = False
        events = self._events
        while events:
            self._callback(*events.popleft())


# File systems whose changes made on other machines inotify never reports.
NETWORK_FILE_SYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "lustre", "gpfs", "beegfs",
    "9p", "afs", "ocfs2", "gfs2", "virtiofs",
})


MOUNTINFO = Path("/proc/self/mountinfo")


def choose_watch_mode(setting: str, folder: Path, mountinfo: Path = MOUNTINFO) -> str:
    """``inotify`` or ``poll``: ``auto`` polls a folder on a network file system (as
    ``mountinfo``, the kernel's mount table, says), and where there is no inotify."""
    if setting != "auto":
        return setting
    if InotifyFD is None:
        return "poll"
    fs_type = file_system_type(folder, mountinfo)
    if fs_type is None:
        return "inotify"
    return "poll" if fs_type in NETWORK_FILE_SYSTEMS or fs_type.startswith("fuse") else "inotify"


def file_system_type(folder: Path, mountinfo: Path = MOUNTINFO) -> str | None:
    """The type of the file system ``folder`` is on (``ext4``, ``nfs4``, ``fuse.sshfs``),
    from the kernel's mount table; None where there is none to read."""
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return None
    target = os.path.realpath(folder)
    best, best_type = "", None
    for line in lines:
        # "36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue"
        fields, _, rest = line.partition(" - ")
        parts, after = fields.split(), rest.split()
        if len(parts) < 5 or not after:
            continue
        mount_point = parts[4].replace("\\040", " ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, best_type = mount_point, after[0]
    return best_type
