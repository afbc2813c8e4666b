"""Hands inbox file events from watchdog's thread to the daemon's event loop; decides nothing."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

try:
    from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper
except ImportError:  # not Linux
    InotifyMoveEventGrouper = None

# watchdog holds a file moved out of the inbox (into kinod's spool, which it does not
# watch) for 0.5 s, hoping to pair it with a move in, and every later event waits behind
# it: a pickup would take half a second. A rename's two halves arrive together; 10 ms is
# ample to pair a writer's rename into the inbox.
if InotifyMoveEventGrouper is not None:
    InotifyMoveEventGrouper.delay = 0.01

# Called on the daemon's loop with the path and whether it arrived by a rename. A folder
# deleted in the watched one, or the watched one itself, is passed on too: the daemon
# checks whether its inbox is still there.
PathCallback = Callable[[Path, bool], None]


class _Forwarder(FileSystemEventHandler):
    def __init__(self, loop: asyncio.AbstractEventLoop, callback: PathCallback) -> None:
        self._loop = loop
        self._callback = callback

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            if event.event_type == "deleted":
                self._forward(_path(event.src_path), False)
            return
        if event.event_type in ("deleted", "opened", "closed_no_write"):
            return
        if event.event_type == "moved":
            self._forward(_path(event.dest_path), True)
        else:
            self._forward(_path(event.src_path), False)

    def _forward(self, path: Path, renamed: bool) -> None:
        try:
            self._loop.call_soon_threadsafe(self._callback, path, renamed)
        except RuntimeError:
            pass  # the loop closed while the observer was stopping


def _path(raw: str | bytes) -> Path:
    return Path(raw.decode() if isinstance(raw, bytes) else raw)


class InboxWatcher:
    """Watches folders (not their sub-folders) with the platform's native observer."""

    def __init__(self, folders: list[Path], callback: PathCallback) -> None:
        self.folders = folders
        self._callback = callback
        self._observer: Observer | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._observer = Observer()
        for folder in self.folders:
            self._observer.schedule(_Forwarder(loop, self._callback), str(folder),
                                    recursive=False)
        self._observer.daemon = True
        self._observer.start()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None


# File systems whose changes made on other machines inotify never reports.
NETWORK_FILE_SYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "lustre", "gpfs", "beegfs",
    "9p", "afs", "ocfs2", "gfs2", "virtiofs",
})


def choose_watch_mode(setting: str, folder: Path) -> str:
    """``inotify`` or ``poll``: ``auto`` polls a folder on a network file system."""
    if setting != "auto":
        return setting
    fs_type = file_system_type(folder)
    if fs_type is None:
        return "inotify"
    return "poll" if fs_type in NETWORK_FILE_SYSTEMS or fs_type.startswith("fuse") else "inotify"


def file_system_type(folder: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> str | None:
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
