"""The only module that writes ``outbox/``: sidecars (``<id>.json``) and job logs (``<id>.log``).

Every sidecar write replaces the whole file atomically, and every change of a
job's ``state`` goes through ``publish``, which logs it once.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from loguru import logger
from pydantic import ValidationError

from kinod.atomic_files import FolderFlush, atomic_write, fsync_dir, read_whole
from kinod.logs import log_job_event
from kinod.models import Sidecar


class Outbox:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.archive = folder / "archive"
        self._folder = str(folder)  # sidecar paths are made as text: a Path costs more
        # Final sidecars written on several threads at once share one flush of the folder.
        self.folder_flush = FolderFlush(self._folder)
        # Told of each final sidecar once it is in place, before the flush that puts it on
        # disk (the hooks' journal: kinod.hooks); what it writes is flushed with it through
        # ``folder_flush.also``.
        self.on_final: Callable[[Sidecar, bytes], None] | None = None

    def ensure_folder(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)

    def has_sidecar(self, job_id: str) -> bool:
        return os.path.exists(f"{self._folder}/{job_id}.json")

    def sidecar_path(self, job_id: str) -> Path:
        return self.folder / f"{job_id}.json"

    def log_path(self, job_id: str) -> Path:
        return self.folder / f"{job_id}.log"

    def read(self, job_id: str) -> Sidecar | None:
        """The job's sidecar, or None when there is none (or it is not kinod's)."""
        try:
            return Sidecar.from_json(read_whole(f"{self._folder}/{job_id}.json"))
        except FileNotFoundError:
            return None
        except (OSError, ValidationError) as exc:
            logger.warning("{}: unreadable sidecar, writing a new one: {}",
                           self.sidecar_path(job_id), exc)
            return None

    def publish(self, sidecar: Sidecar, previous: Sidecar | None = None) -> None:
        """Write the sidecar; a terminal state is flushed to disk before this returns.

        An outbox deleted under the daemon is made again. A full or read-only disk
        raises OSError, and the sidecar on disk stays the previous, complete one.
        """
        self.write(sidecar)
        self.published(sidecar, previous)

    def write(self, sidecar: Sidecar) -> None:
        """``publish``'s write alone; safe on any thread, for a sidecar no other write races.
        A terminal state is flushed to disk before this returns: the file itself, then the
        folder's entries, in a flush shared with the final sidecars written meanwhile on
        other threads (``FolderFlush``)."""
        path, data = f"{self._folder}/{sidecar.id}.json", sidecar.to_json()
        durable = sidecar.state.is_terminal
        flush: FolderFlush | _ToldFirst = self.folder_flush
        if durable and self.on_final is not None:
            flush = _ToldFirst(self.on_final, sidecar, data, self.folder_flush)
        try:
            atomic_write(path, data, durable=durable, folder_flush=flush)
        except FileNotFoundError:
            if self.folder.is_dir():
                raise
            logger.warning("the outbox {} is gone; making it again", self.folder)
            self.ensure_folder()
            atomic_write(path, data, durable=durable, folder_flush=flush)

    def published(self, sidecar: Sidecar, previous: Sidecar | None) -> None:
        """``publish``'s log line, for a sidecar ``write`` put on disk."""
        if previous is None or previous.state != sidecar.state:
            self._log_transition(sidecar, previous)

    def archive_previous_run(self, job_id: str) -> None:
        """Before a new run: move the last run's sidecar and log to ``archive/<id>/<n>.*``.

        Flushed to disk: were a power cut to undo this but not the acceptance
        of the new run, the old terminal sidecar would pass the new run off as ended.
        """
        if not (self.has_sidecar(job_id) or os.path.exists(f"{self._folder}/{job_id}.log")):
            return  # a new id: the common case, told apart without a Path
        sidecar, log = self.sidecar_path(job_id), self.log_path(job_id)
        current = self.read(job_id)
        if current is not None and not current.state.is_terminal:
            return  # another daemon's new run of this id, taken in a moment ago
        folder = self.archive / job_id
        folder.mkdir(parents=True, exist_ok=True)
        n = 1
        while (folder / f"{n}.json").exists() or (folder / f"{n}.log").exists():
            n += 1
        for src, dst in ((sidecar, folder / f"{n}.json"), (log, folder / f"{n}.log")):
            with contextlib.suppress(FileNotFoundError):
                os.rename(src, dst)
        fsync_dir(folder)
        fsync_dir(self.folder)

    def _log_transition(self, sidecar: Sidecar, previous: Sidecar | None) -> None:
        was = previous.state.value if previous else "new"
        detail = ""
        if sidecar.error is not None:
            detail = f": {sidecar.error.code}: {sidecar.error.message}"
        elif sidecar.message:
            detail = f": {sidecar.message}"
        level = "WARNING" if sidecar.state.value == "failed" else "INFO"
        log_job_event(self._folder, sidecar.id, level, f"job {sidecar.id} {was} -> "
                      f"{sidecar.state.value} (attempt {sidecar.attempt}){detail}")


class _ToldFirst:
    """The flush of a final sidecar's folder that first tells ``on_final`` of it: the
    sidecar is in place by then, and what ``on_final`` writes is flushed with it."""

    __slots__ = ("_data", "_flush", "_sidecar", "_tell")

    def __init__(self, tell: Callable[[Sidecar, bytes], None], sidecar: Sidecar, data: bytes,
                 flush: FolderFlush) -> None:
        self._tell, self._sidecar, self._data, self._flush = tell, sidecar, data, flush

    def flush(self) -> None:
        self._tell(self._sidecar, self._data)
        self._flush.flush()
