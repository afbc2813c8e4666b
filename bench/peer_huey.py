"""The peer baseline a user might pick instead of kinod: huey with its SQLite storage,
as configured out of the box (WAL journal, SQLite's default ``synchronous``), running a
no-op task with thread workers.

    python bench/peer_huey.py consume DB WORKERS   # the consumer, until SIGTERM
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from farm import BenchError, child


def make_huey(db: Path):
    """The huey instance and its no-op task; producer and consumer both build it."""
    from huey import SqliteHuey

    huey = SqliteHuey("bench", filename=str(db))
    return huey, huey.task(name="noop")(_noop)


def _noop() -> bool:
    return True  # huey keeps no result for None, and results are what is waited for


def consume(db: Path, workers: int) -> None:
    huey, _ = make_huey(db)
    consumer = huey.create_consumer(workers=workers, worker_type="thread", periodic=False)
    print("ready", flush=True)
    consumer.run()


def throughput(root: Path, n: int, workers: int, limit_s: float) -> tuple[float, int]:
    """(seconds, results) from the first enqueue of ``n`` tasks until every result is in,
    with the consumer already running; fewer results when ``limit_s`` ran out."""
    root.mkdir(parents=True, exist_ok=True)
    db = root / "huey.db"
    huey, task = make_huey(db)  # creates the tables before the consumer opens them
    with open(root / "consumer.log", "wb") as log, \
            child([sys.executable, __file__, "consume", str(db), str(workers)],
                  stdout=subprocess.PIPE, stderr=log) as consumer:
        if consumer.stdout.readline().strip() != b"ready":
            raise BenchError("the huey consumer did not start: see consumer.log")
        time.sleep(0.2)  # its workers are polling
        started = time.perf_counter()
        for _ in range(n):
            task()
        deadline = time.monotonic() + limit_s
        while (results := huey.storage.result_store_size()) < n:
            if time.monotonic() > deadline or consumer.poll() is not None:
                break
            time.sleep(min(0.01 + (time.perf_counter() - started) / 500, 0.5))
        return time.perf_counter() - started, results


def synchronous(root: Path) -> str:
    """SQLite's ``synchronous`` setting as huey's storage runs it (FULL: every commit is
    flushed to disk)."""
    root.mkdir(parents=True, exist_ok=True)
    huey, _ = make_huey(root / "huey.db")
    value = huey.storage.sql("pragma synchronous", results=True)[0][0]
    return {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(value, str(value))


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command != "consume":
        sys.exit(f"unknown command {command!r}")
    import peer_huey  # the task registered under this module's name, as the producer has it

    peer_huey.consume(Path(args[0]), int(args[1]))
