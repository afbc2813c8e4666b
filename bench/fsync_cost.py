"""What kinod's flushes to disk cost: the same burst of no-op jobs run twice in this
process, once as kinod runs (fsync on) and once with os.fsync made a no-op, alternating,
on the same disk. Prints the jobs per second of each and their ratio.

    python bench/fsync_cost.py [--jobs 1000] [--rounds 2] [--dir FOLDER]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from loguru import logger

from kinod.config import Settings
from kinod.daemon import Daemon
from kinod.logs import add_job_log_sink
from kinod.plugins.plugin_loader import PluginRegistry

PLUGINS = Path(__file__).parent / "plugins"


def run_burst(root: Path, jobs: int, registry: PluginRegistry) -> float:
    """Seconds for ``jobs`` no-op jobs, dropped before the start, to end."""
    for folder in ("inbox", "outbox", "frames", "models"):
        (root / folder).mkdir(parents=True)
    for i in range(jobs):
        (root / "inbox" / f"job{i:06d}.json").write_text(json.dumps({"type": "noop"}))
    settings = Settings(inbox=root / "inbox", outbox=root / "outbox", frames=root / "frames",
                        models=root / "models", node="bench", workers=8, settle_s=0)
    sink = add_job_log_sink(settings.outbox)
    started = time.perf_counter()
    asyncio.run(Daemon(settings, registry).run(burst=True))
    elapsed = time.perf_counter() - started
    logger.remove(sink)
    ended = sum(1 for p in (root / "outbox").glob("*.json")
                if json.loads(p.read_text())["state"] == "succeeded")
    assert ended == jobs, f"only {ended} of {jobs} jobs succeeded"
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to make the farms (the disk measured); default: temp")
    args = parser.parse_args()
    logger.remove()  # the daemon's own log would measure the terminal
    registry = PluginRegistry([PLUGINS], use_entry_points=False)
    real_fsync = os.fsync
    best = {"fsync": float("inf"), "no fsync": float("inf")}
    work = Path(tempfile.mkdtemp(prefix="kinod-bench-", dir=args.dir))
    try:
        for round_ in range(args.rounds):
            for mode in ("fsync", "no fsync"):
                os.fsync = real_fsync if mode == "fsync" else (lambda fd: None)
                try:
                    seconds = run_burst(work / f"{mode.replace(' ', '_')}{round_}", args.jobs,
                                        registry)
                finally:
                    os.fsync = real_fsync
                best[mode] = min(best[mode], seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for mode, seconds in best.items():
        print(f"{mode:>9}: {args.jobs / seconds:7.0f} jobs/s ({seconds:.2f} s, best of "
              f"{args.rounds})")
    print(f"fsync costs {best['fsync'] / best['no fsync']:.2f}x the time of the same run "
          "without it")


if __name__ == "__main__":
    main()
