"""Hands inbox file events from watchdog's thread to the daemon's event loop; decides nothing."""

from __future__ import annotations

import asyncio
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
    """Watches one folder (not its sub-folders) with the platform's native observer."""

    def __init__(self, folder: Path, callback: PathCallback) -> None:
        self.folder = folder
        self._callback = callback
        self._observer: Observer | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._observer = Observer()
        self._observer.schedule(_Forwarder(loop, self._callback), str(self.folder),
                                recursive=False)
        self._observer.daemon = True
        self._observer.start()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

