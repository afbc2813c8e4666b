"""What dependencies cost: a chain (each job after the one before) and a fan-in (one job after
all the others) of n jobs, against n independent jobs measured in the same run.

    python bench/pipelines.py [--sizes 250,1000,4000] [--workers 8] [--out FILE]

Each figure is seconds per job from the first rename into the inbox until every job is
filed under done/. A chain runs one job at a time by its nature, so it is compared with
n independent jobs run by one worker; a fan-in runs on ``--workers``, like its baseline.
Dependencies cost linear work when a chain's ratio to its baseline stays flat as n grows.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from farm import JOB, Arrivals, BenchError, Daemon, drop, job_name, machine, make_farm

LIMIT_S = 900


def jobs_of(kind: str, n: int) -> list[str]:
    """The job files' bodies, in the order they are dropped."""
    body = json.loads(JOB)
    if kind == "independent":
        return [JOB] * n
    if kind == "chain":
        return [JOB] + [json.dumps({**body, "after": [job_name(i - 1)[:-5]]})
                        for i in range(1, n)]
    if kind == "fan-in":
        return [JOB] * (n - 1) + [json.dumps({**body, "after": [job_name(i)[:-5]
                                                                for i in range(n - 1)]})]
    raise ValueError(kind)


def run(root: Path, kind: str, n: int, workers: int) -> float:
    """Seconds per job for n jobs of ``kind`` dropped into a running daemon."""
    config = make_farm(root, workers=workers)
    staged = root / "staged"
    staged.mkdir()
    names = []
    for i, body in enumerate(jobs_of(kind, n)):
        (staged / job_name(i)).write_text(body)
        names.append(job_name(i))
    with Daemon(config) as daemon:
        daemon.ready()
        done = Arrivals(root / "inbox" / ".kinod" / "done")
        started = time.perf_counter()
        drop(staged, root / "inbox", names)
        finished = done.wait_count(n, time.monotonic() + LIMIT_S, daemon.alive)
        done.close()
        if finished is None:
            raise BenchError(f"{kind} of {n}: {len(done.names)} ended: {daemon.log_tail()}")
    return (finished - started) / n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="250,1000,4000")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="kinod-bench-pipelines-") as work:
        work = Path(work)
        for n in sizes:
            figures = {
                "chain": run(work / f"chain{n}", "chain", n, args.workers),
                "independent, 1 worker": run(work / f"one{n}", "independent", n, 1),
                "fan-in": run(work / f"fanin{n}", "fan-in", n, args.workers),
                "independent": run(work / f"many{n}", "independent", n, args.workers),
            }
            rows.append((n, figures))
            print(f"{n}: " + ", ".join(f"{k} {v * 1000:.2f} ms/job" for k, v in figures.items()),
                  file=sys.stderr)
        lines = [f"Dependencies, {machine(work)}", "",
                 "| jobs | chain ms/job | vs 1 worker, no after | fan-in ms/job | "
                 f"vs {args.workers} workers, no after |", "| --- | --- | --- | --- | --- |"]
        for n, f in rows:
            lines.append(f"| {n:,} | {f['chain'] * 1000:.2f} | "
                         f"{f['chain'] / f['independent, 1 worker']:.2f}x | "
                         f"{f['fan-in'] * 1000:.2f} | {f['fan-in'] / f['independent']:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
