"""The physical baseline: what a user's own script does for one job, with the durability
kinod promises and nothing more. Read and parse the job, write the ``running`` sidecar and
then the final one atomically (a temporary file renamed over; the final one flushed to
disk), and move the job file out of the inbox.

    python bench/plain.py once JOB OUTBOX DONE      # one job, then exit: a process per job
    python bench/plain.py watch INBOX OUTBOX DONE   # a plain inotify loop, until SIGTERM
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from kinod.atomic_files import atomic_write, rename_noreplace


def handle(path: Path, outbox: Path, done: Path) -> None:
    job = json.loads(path.read_bytes())
    job_id = path.name.rsplit(".", 1)[0]
    sidecar = {"id": job_id, "state": "running", "task": job}
    atomic_write(outbox / f"{job_id}.json", json.dumps(sidecar).encode())
    sidecar["state"] = "succeeded"
    atomic_write(outbox / f"{job_id}.json", json.dumps(sidecar).encode(), durable=True)
    rename_noreplace(path, done / path.name)


def is_job(name: str) -> bool:
    return name.endswith(".json") and not name.startswith(".")


def loop(inbox: Path, outbox: Path, done: Path) -> int:
    """Every job in the inbox, one after another; returns how many."""
    n = 0
    for entry in os.scandir(inbox):
        if is_job(entry.name):
            handle(Path(entry.path), outbox, done)
            n += 1
    return n


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
