"""The physical baseline: what a user's own script does for one job, with the durability
kinod promises and nothing more. Read and parse the job, write the ``running`` sidecar and
then the final one atomically (a temporary file renamed over; the final one flushed to
disk), and move the job file out of the inbox.

``handle_contract`` is the contract floor: the least file work kinod's contract with its
users (the sidecar's states, the job's log, the job file kept) asks of a job that waits
its turn, which any daemon keeping that contract must do, whatever it is written in: the
same, plus a ``queued`` sidecar first and the job's log, a line for each of its three
states. It leaves out what is kinod's own choice (the move into ``running/<node>/`` that
makes a claim exclusive between nodes, a ``done/<id>/`` folder for each job's runs) and
all of a daemon's own work. ``handle_contract_batched`` is the same with the final flushes
batched as kinod batches them (``kinod.atomic_files.FolderFlush``): jobs that end while
another's flush of the outbox folder runs share the next one; a job ending alone is flushed
at once.

    python bench/plain.py once JOB OUTBOX DONE      # one job, then exit: a process per job
    python bench/plain.py watch INBOX OUTBOX DONE   # a plain inotify loop, until SIGTERM
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kinod.atomic_files import FolderFlush, atomic_write, rename_noreplace
from kinod.logs import append_job_line

Handler = Callable[[Path, Path, Path], None]


def handle(path: Path, outbox: Path, done: Path) -> None:
    _run(path, outbox, done, ("running", "succeeded"), job_log=False)


def handle_contract(path: Path, outbox: Path, done: Path) -> None:
    _run(path, outbox, done, ("queued", "running", "succeeded"), job_log=True)


# The outbox folders' shared flushes, for handle_contract_batched.
_folder_flushes: dict[Path, FolderFlush] = {}


def handle_contract_batched(path: Path, outbox: Path, done: Path) -> None:
    shared = _folder_flushes.setdefault(outbox, FolderFlush(outbox))
    _run(path, outbox, done, ("queued", "running", "succeeded"), job_log=True,
         folder_flush=shared)


def _run(path: Path, outbox: Path, done: Path, states: tuple[str, ...], job_log: bool,
         folder_flush: FolderFlush | None = None) -> None:
    """Read the job, write a sidecar for each state (the last one flushed to disk, its
    folder through ``folder_flush`` if given), and a line for each in the job's log if
    ``job_log``; then move the job file."""
    job = json.loads(path.read_bytes())
    job_id = path.name.rsplit(".", 1)[0]
    sidecar = {"id": job_id, "state": states[0], "task": job}
    for state in states:
        sidecar["state"] = state
        atomic_write(outbox / f"{job_id}.json", json.dumps(sidecar).encode(),
                     durable=state == states[-1], folder_flush=folder_flush)
        if job_log:
            append_job_line(outbox / f"{job_id}.log", f"job {job_id} is {state}\n")
    rename_noreplace(path, done / path.name)


def is_job(name: str) -> bool:
    return name.endswith(".json") and not name.startswith(".")


def loop(inbox: Path, outbox: Path, done: Path, handler: Handler = handle,
         threads: int = 1) -> int:
    """Every job in the inbox, one after another, or shared among ``threads`` threads;
    returns how many."""
    paths = [Path(entry.path) for entry in os.scandir(inbox) if is_job(entry.name)]
    if threads == 1:
        for path in paths:
            handler(path, outbox, done)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda path: handler(path, outbox, done), paths))
    return len(paths)


def watch(inbox: Path, outbox: Path, done: Path) -> None:
    """Each job renamed into the inbox as soon as inotify reports it. Prints "ready" once
    it watches."""
    from farm import IN_MOVED_TO, Inotify  # bench/ is on the path when run as a script

    inotify = Inotify()
    inotify.watch(inbox, IN_MOVED_TO)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("ready", flush=True)
    while True:
        for _, name in inotify.read(3600):
            if is_job(name):
                handle(inbox / name, outbox, done)


if __name__ == "__main__":
    command, *paths = sys.argv[1:]
    if command == "once":
        handle(*map(Path, paths))
    elif command == "watch":
        watch(*map(Path, paths))
    else:
        sys.exit(f"unknown command {command!r}")
