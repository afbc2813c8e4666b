"""Two commits of kinod measured in one run, turn about: did a change make it slower?

    python bench/ab.py BEFORE AFTER [--rounds 3] [--only throughput,burst,latency,backlog]
                       [--jobs 10000] [--pickup-jobs 300] [--backlog-jobs 100000] [--out FILE]

BEFORE and AFTER are git revisions (``HEAD`` and the working tree's ``WORKTREE`` too). Each
is exported to a folder of its own and put first on PYTHONPATH for its daemons. Every
round measures both, in alternating order (ABBA...), so that a machine growing slower or
faster during the run favours neither: throughput (10,000 jobs, 8 and 1 workers, dropped
into a running daemon; ``burst``: queued before ``kinod run --burst``), pickup
latency with inotify (p50, p99), and a backlog's start-up (first job, peak RSS). Each
figure is the median of the rounds, and AFTER stands as a ratio of BEFORE.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import measure
from farm import BENCH, machine

REPO = BENCH.parent
WORKTREE = "WORKTREE"


def export(rev: str, folder: Path) -> Path:
    """The kinod package of ``rev`` in ``folder``, ready to be put on PYTHONPATH."""
    folder.mkdir(parents=True)
    if rev == WORKTREE:
        shutil.copytree(REPO / "kinod", folder / "kinod")
        return folder
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "kinod"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


# One measurement of one tree: name -> (figure, unit, higher is better).
Figures = dict[str, tuple[float, str, bool]]


def measure_once(work: Path, sections: list[str], jobs: int, pickup_jobs: int,
                 backlog_jobs: int) -> Figures:
    """Farms stay until the run ends: on ext4 without a journal, files freed in the last
    minute make creating new ones dearer, and would tax whichever tree comes next."""
    figures: Figures = {}
    if "throughput" in sections:
        for workers in (8, 1):
            burst = measure.kinod_throughput(work / f"throughput{workers}", jobs, workers, 900)
            name = f"throughput, {jobs:,} jobs, {workers} worker{'s' * (workers > 1)}"
            figures[name] = (burst.rate, "jobs/s", True)
    if "burst" in sections:
        for workers in (8, 1):
            burst = measure.kinod_burst(work / f"burst{workers}", jobs, workers, 900)
            name = f"`kinod run --burst`, {jobs:,} jobs, {workers} worker{'s' * (workers > 1)}"
            figures[name] = (burst.rate, "jobs/s", True)
    if "latency" in sections:
        latencies = measure.pickup(work / "pickup", pickup_jobs, "inotify", 2, limit_s=600)
        for q in (50, 99):
            figures[f"pickup, inotify, p{q}"] = (measure.percentile(latencies, q), "ms", False)
    if "backlog" in sections:
        big = measure.backlog(work / "backlog", backlog_jobs, 8, 900)
        figures[f"backlog of {backlog_jobs:,}: first job running"] = (big.first_s, "s", False)
        figures[f"backlog of {backlog_jobs:,}: peak RSS"] = (big.peak_rss_mb, "MB", False)
    return figures


def run(trees: dict[str, Path], rounds: int, work: Path,
        once: Callable[[Path], Figures]) -> dict[str, list[Figures]]:
    results: dict[str, list[Figures]] = {name: [] for name in trees}
    order = list(trees)
    for n in range(rounds):
        for name in order if n % 2 == 0 else order[::-1]:
            os.environ["PYTHONPATH"] = str(trees[name])
            print(f"round {n + 1}: {name}", file=sys.stderr, flush=True)
            results[name].append(once(work / f"{n}-{name}"))
    return results


def report(results: dict[str, list[Figures]], before: str, after: str, command: str,
           host: str) -> str:
    lines = [f"# kinod {after} against {before}", "", f"`{command}` on {host}; the median "
             f"of {len(results[before])} rounds, each tree in turn.", "",
             f"| measure | {before} | {after} | ratio | no worse | every round |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, (_, unit, higher) in results[before][0].items():
        b_all, a_all = ([r[name][0] for r in results[rev]] for rev in (before, after))
        b, a = statistics.median(b_all), statistics.median(a_all)
        ratio = a / b if b else float("nan")
        # Within 5 %: this machine's noise from one run to the next.
        fine = ratio >= 0.95 if higher else ratio <= 1.05
        rounds = " / ".join(", ".join(f"{v:,.1f}" for v in values) for values in (b_all, a_all))
        lines.append(f"| {name} | {b:,.2f} {unit} | {a:,.2f} {unit} | {ratio:.2f}x | "
                     f"{'yes' if fine else '**no**'} | {rounds} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="throughput,latency,backlog",
                        help="sections to measure, of throughput, burst, latency, backlog")
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--pickup-jobs", type=int, default=300)
    parser.add_argument("--backlog-jobs", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=BENCH / "AB.md")
    parser.add_argument("--dir", type=Path, default=None, help="where farms are made")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kinod-ab-", dir=args.dir) as tmp:
        work = Path(tmp)
        trees = {rev: export(rev, work / f"tree-{i}")
                 for i, rev in enumerate((args.before, args.after))}
        results = run(trees, args.rounds, work,
                      lambda folder: measure_once(folder, args.only.split(","), args.jobs,
                                                  args.pickup_jobs, args.backlog_jobs))
        text = report(results, args.before, args.after,
                      "python bench/ab.py " + " ".join(sys.argv[1:]), machine(work))
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
