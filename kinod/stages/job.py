"""A job this node holds, as the stages hand it to each other, and the small facts about
its file and sidecar that several stages need."""

from __future__ import annotations

import asyncio
import os
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

from kinod.errors import InvalidJob, KinodError
from kinod.intake import read_job_bytes
from kinod.job_document import parse_document
from kinod.jobqueue import Queueable
from kinod.models import JobSpec, JobState, Sidecar, SidecarError, utc_now
from kinod.outcome import Verdict
from kinod.plugins.plugin_loader import LoadedPlugin
from kinod.runner import SupervisedRun


class Job(Queueable):
    """An accepted job that has not ended: queued, waiting for ``not_before``, or running.

    A job waiting in the queue keeps none of its file (light, ``spec`` None): its checked spec and
    data, and its sidecar, are made again from its file when it is claimed. Kept whole,
    they would cost a backlog of 100,000 jobs 200 MB more, and its bytes up to
    ``max_job_bytes`` each on every node.

    What only a run needs lives in the instance's ``__dict__``, made when the first of it is
    set: a waiting job reads the defaults below from the class, and costs a backlog of
    100,000 jobs 10 MB less than a slot for each would.
    """

    __slots__ = ("folder", "suffix", "plugin", "priority", "__dict__")  # and Queueable's

    # What a run needs, made again from the job's file when it is claimed.
    spec: JobSpec | None = None
    data: dict[str, Any] | None = None
    sidecar: Sidecar | None = None
    # What only some waiting jobs have: set on the few that do.
    after: list[str] | None = None
    not_before: datetime | None = None
    # What a run sets (see the class docstring): read from here until set on the instance.
    run: SupervisedRun | None = None
    task: asyncio.Task | None = None
    progress: tuple[float, str | None] | None = None  # latest report, not yet written
    progress_pending: bool = False
    progress_timer: asyncio.TimerHandle | None = None
    last_write_s: float = 0.0
    stop_requested: bool = False
    fenced: bool = False  # another node took it over: its end here is never recorded
    ending: bool = False  # its run is over: no progress write may follow
    final: Sidecar | None = None  # its final sidecar, written by the run's settling
    settled: Verdict | None = None  # its end, settled on its plugin's thread
    # Held while its end or a progress report is written: its plugin's thread may write its
    # end while the loop writes progress. Made when it starts: a waiting job needs none.
    end_lock: threading.Lock | None = None
    holds_slot: bool = False  # counted against ``workers`` (see Scheduler.free_slot)

    def __init__(self, id: str, folder: Path, suffix: str, spec: JobSpec | None,  # noqa: A002
                 plugin: LoadedPlugin, data: dict[str, Any] | None, sidecar: Sidecar | None,
                 submitted_ns: int) -> None:
        super().__init__(id, submitted_ns)
        self.folder = folder  # where its file is now (queued/ or running/<node>/): shared
        self.suffix = suffix  # its file's name is id + suffix; one object for all of a kind
        self.plugin = plugin
        # Kept while it waits light: a claim the disk refused queues it again.
        self.priority = 0
        if spec is not None:
            self.spec, self.data, self.sidecar = spec, data, sidecar

    @classmethod
    def waiting(cls, id: str, folder: Path, suffix: str, spec: JobSpec,  # noqa: A002
                plugin: LoadedPlugin, submitted_ns: int) -> Job:
        """A job that waits light from the start: none of its spec, data or sidecar kept,
        and no ``__dict__`` made unless it waits for something."""
        job = cls(id, folder, suffix, None, plugin, None, None, submitted_ns)
        job._keep_what_it_waits_for(spec)
        return job

    def __repr__(self) -> str:
        return f"Job({self.id!r}, {str(self.path)!r})"

    def wait_light(self) -> None:
        """Keep only what a claim needs to make the rest again from the job's file."""
        if self.spec is None:
            return
        self._keep_what_it_waits_for(self.spec)
        for name in ("spec", "data", "sidecar"):
            self.__dict__.pop(name, None)

    def _keep_what_it_waits_for(self, spec: JobSpec) -> None:
        self.priority = spec.priority
        # Set only where there is something: most jobs then never make a __dict__.
        if spec.not_before is not None or self.not_before is not None:
            self.not_before = spec.not_before
        if spec.after or self.after is not None:
            self.after = spec.after or None

    @property
    def name(self) -> str:
        return self.id + self.suffix

    @property
    def path(self) -> Path:
        return self.folder / self.name

    @path.setter
    def path(self, path: Path) -> None:
        self.folder, self.suffix = place(path)


def first_sidecar(job_id: str, task: dict[str, Any] | None, node: str) -> Sidecar:
    """A new run's queued sidecar, with the job as submitted."""
    now = utc_now()
    document = task or {}
    return Sidecar(
        id=job_id, state=JobState.QUEUED, created_at=now, updated_at=now,
        task=task, node=node, pid=os.getpid(),
        # Taken from the file even when it is invalid, where they are text.
        **{key: value for key in ("name", "type")
           if isinstance(value := document.get(key), str)})


def queued_again(sidecar: Sidecar, message: str) -> Sidecar:
    """The sidecar of a run going back to the queue (a retry, a shutdown, a crash)."""
    return sidecar.model_copy(update={
        "state": JobState.QUEUED, "updated_at": utc_now(), "message": message})


def final_sidecar(sidecar: Sidecar, state: JobState, error: KinodError | None,
                  result: dict | None) -> Sidecar:
    now = utc_now()
    return sidecar.model_copy(update={
        "state": state, "finished_at": now, "updated_at": now,
        "progress": 100.0 if state is JobState.SUCCEEDED else sidecar.progress,
        "result": result if state is JobState.SUCCEEDED else None,
        "error": SidecarError(code=error.code, message=error.message) if error else None,
    })


def document_of(path: Path, suffix: str, max_bytes: int) -> dict[str, Any] | None:
    """The document in a job file, for a sidecar's ``task``; None if it cannot be read now."""
    try:
        return parse_document(read_job_bytes(path, max_bytes)[0], suffix)
    except (OSError, InvalidJob):
        return None


def mtime_ns(path: Path) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return None


def unlink(path: str | Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# The folders job files are in (queued/, running/<node>/) and their suffixes, one object
# each: a backlog of 100,000 jobs shares them.
_folders: dict[str, Path] = {}
_suffixes: dict[str, str] = {}


def place(path: Path) -> tuple[Path, str]:
    """A job file's folder and suffix (what follows its id: the last dot on)."""
    folder, name = os.path.split(path)  # as text: Path.parent and .name cost more
    suffix = "." + name.rpartition(".")[2]
    shared = _folders.get(folder)
    if shared is None:  # of the path's own class: equal to the spool's Paths, which made it
        shared = _folders[folder] = path.parent
    return shared, _suffixes.setdefault(suffix, suffix)
