"""Many nodes on one folder in poll mode (as on a network share): what each job costs in all.

    python bench/nodes.py [--nodes 1,4,12,24] [--jobs 2000] [--poll 0.5] [--out FILE]
                          [--trace all|one|folders]

For each count of daemons, every daemon starts on one folder in poll mode; ``--jobs`` job
files are renamed into the inbox; the clock stops once every job is filed under done/.
Figures: CPU seconds per job summed over every daemon, and the file-system calls per job
of every daemon together (directory reads, renames, opens, stats), counted by one
``strace -c`` attached to all of them for the whole run (``--trace one``: to the first
daemon only, times the number of daemons, as the first tables were made; it says less
once the nodes share the queue out, and their work is no longer even; ``--trace folders``:
directory listings only, of every daemon, told apart by the folder listed: the inbox and
queued/, which every node shares and which grow with the queue, and the spool's running/
and each node's own folder, which hold a name per node or a node's own jobs). Each job
ran exactly once: every sidecar says attempt 1 and every done/<id>/ holds one file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from farm import PLUGINS, Arrivals, BenchError, Daemon, drop, machine, write_jobs

LIMIT_S = 900
IDLE_S = 20.0  # how long an idle daemon is watched once the jobs are done
CALLS = {"listings": ("getdents64",), "renames": ("rename", "renameat", "renameat2"),
         "opens": ("openat", "open"), "stats": ("newfstatat", "statx", "stat", "lstat")}


def node_config(root: Path, name: str, poll_s: float) -> Path:
    folder = root / f"node-{name}"
    folder.mkdir(parents=True)
    settings = {"node": name, "inbox": "../inbox", "outbox": "../outbox",
                "frames": "../data/frames", "models": "../models_storage",
                "plugin_dirs": [str(PLUGINS)], "settle_s": 0, "log_level": "WARNING",
                "watch": "poll", "poll_interval_s": poll_s, "workers": 2}
    (folder / "config.yaml").write_text(yaml.safe_dump(settings))
    return folder / "config.yaml"


def strace_counts(text: str) -> dict[str, int]:
    counts = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 5 and re.fullmatch(r"[\d.]+", fields[0]) and fields[-1].isidentifier():
            counts[fields[-1]] = int(fields[3])
    return counts


def strace(pids: list[int], listings_to: Path | None = None) -> subprocess.Popen[str]:
    """``strace -c`` of the calls counted, or with ``listings_to``, every directory read
    written there with the folder's path."""
    attach = [arg for pid in pids for arg in ("-p", str(pid))]
    how = (["-c", "-e", "trace=" + ",".join(sum(CALLS.values(), ()))] if listings_to is None
           else ["-y", "-qq", "-o", str(listings_to), "-e", "trace=getdents64"])
    return subprocess.Popen(["strace", "-f", *how, *attach],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def listings_by_folder(trace: Path, root: Path) -> dict[str, int]:
    """Listings in an ``strace -y`` of getdents64, by folder: a listing reads a folder
    until a read returns nothing."""
    kinds = {str(root / "inbox"): "inbox", str(root / "inbox/.kinod/queued"): "queued/",
             str(root / "inbox/.kinod/running"): "running/"}
    counts = dict.fromkeys(["inbox", "queued/", "running/", "running/<node>", "other"], 0)
    for line in trace.read_text().splitlines():
        if (m := re.search(r"getdents64\(\d+<([^>]*)>.*= 0$", line)) is not None:
            folder = m.group(1)
            kind = kinds.get(folder) or ("running/<node>" if os.path.dirname(folder)
                                         == str(root / "inbox/.kinod/running") else "other")
            counts[kind] += 1
    return counts


def run(root: Path, nodes: int, jobs: int, poll_s: float, trace: str = "all"
        ) -> dict[str, float]:
    for folder in ("inbox", "outbox", "data/frames", "models_storage"):
        (root / folder).mkdir(parents=True)
    names = write_jobs(root / "staged", jobs)
    daemons = [Daemon(node_config(root, f"n{i:02d}", poll_s)) for i in range(nodes)]
    tracer = None
    try:
        for daemon in daemons:
            daemon.ready()
        done = Arrivals(root / "inbox" / ".kinod" / "done")
        traced_pids = [d.pid for d in (daemons[:1] if trace == "one" else daemons)]
        # As if every daemon made as many calls as the one traced.
        scale = nodes if trace == "one" else 1
        listings = root / "listings.strace" if trace == "folders" else None
        if shutil.which("strace"):
            tracer = strace(traced_pids, listings)
            time.sleep(0.5 + 0.05 * len(traced_pids))  # attached before the first job arrives
        cpu = [d.cpu_s() for d in daemons]
        started = time.perf_counter()
        drop(root / "staged", root / "inbox", names)
        finished = done.wait_count(jobs, time.monotonic() + LIMIT_S, daemons[0].alive)
        done.close()
        if finished is None:
            raise BenchError(f"{nodes} nodes: {len(done.names)} of {jobs} ended")
        cpu_s = sum(d.cpu_s() - c for d, c in zip(daemons, cpu, strict=True))
        traced = idle = {}
        if tracer is not None:
            tracer.send_signal(2)
            traced = strace_counts(tracer.communicate(timeout=30)[1])
            if listings is None:
                idle = idle_calls(traced_pids, IDLE_S)
    finally:
        for daemon in daemons:
            daemon.stop()
    check_exactly_once(root, jobs)
    figures = {"seconds": finished - started, "cpu ms/job": cpu_s / jobs * 1000}
    if listings is not None and listings.exists():
        for kind, count in listings_by_folder(listings, root).items():
            figures[f"{kind} listings/job"] = count / jobs
    for what, calls in CALLS.items():
        if traced:
            figures[f"{what}/job"] = sum(traced.get(c, 0) for c in calls) * scale / jobs
    if idle:
        figures["idle listings/min, all daemons"] = (
            sum(idle.get(c, 0) for c in CALLS["listings"]) * scale * 60 / IDLE_S)
    return figures


def idle_calls(pids: list[int], seconds: float) -> dict[str, int]:
    """Idle daemons' file-system calls over ``seconds``, once their work is done."""
    tracer = strace(pids)
    time.sleep(seconds)
    tracer.send_signal(2)
    return strace_counts(tracer.communicate(timeout=30)[1])


def check_exactly_once(root: Path, jobs: int) -> None:
    done = root / "inbox" / ".kinod" / "done"
    twice = [name for name in os.listdir(done) if len(os.listdir(done / name)) != 1]
    attempts = [json.loads(p.read_bytes()).get("attempt") for p in (root / "outbox").glob("*.json")]
    if twice or len(attempts) != jobs or set(attempts) != {1}:
        raise BenchError(f"not exactly once: {len(twice)} ran twice, {len(attempts)} sidecars, "
                         f"attempts {sorted(set(attempts))}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="1,4,12,24")
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--poll", type=float, default=0.5)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--trace", choices=("all", "one", "folders"), default="all",
                        help="strace every daemon (default), the first one only, or every "
                             "daemon's listings by folder")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="kinod-bench-nodes-") as work:
        work = Path(work)
        for n in [int(n) for n in args.nodes.split(",")]:
            figures = run(work / f"nodes{n}", n, args.jobs, args.poll, args.trace)
            rows.append((n, figures))
            print(n, {k: round(v, 2) for k, v in figures.items()}, file=sys.stderr)
        base = rows[0][1]["cpu ms/job"]
        columns = [k for k in rows[0][1] if "/" in k and k != "cpu ms/job"]
        traced = {"all": "every daemon traced", "one": "one daemon traced, times N",
                  "folders": "every daemon's listings traced, by folder"}[args.trace]
        lines = [f"{args.jobs:,} jobs, poll mode every {args.poll:g} s, {traced}, "
                 f"{machine(work)}", "",
                 "| daemons | seconds | CPU ms/job, all daemons | vs 1 daemon | "
                 + " | ".join(columns) + " |", "|" + " --- |" * (4 + len(columns))]
        for n, f in rows:
            lines.append(f"| {n} | {f['seconds']:.1f} | {f['cpu ms/job']:.2f} | "
                         f"{f['cpu ms/job'] / base:.2f}x | "
                         + " | ".join(f"{f[c]:.1f}" if f[c] >= 1 else f"{f[c]:.2f}"
                                      for c in columns) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
