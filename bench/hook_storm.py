"""A hook storm: n jobs end with a slow webhook set, against the same n jobs with no hook,
in one run. Does the farm slow down, does memory grow?

    python bench/hook_storm.py [--jobs 10000] [--delay 0.5] [--rounds 1] [--keep-alive]
                               [--out FILE]

The webhook is a local server on 127.0.0.1 that answers each POST after ``--delay``
seconds, and closes the connection after each (HTTP/1.0, as Python's http.server does
unless told otherwise), or keeps it open with ``--keep-alive`` (HTTP/1.1, as most web
servers do). Each round runs the jobs twice turn about with no hook and with the
webhook (ABBA), so a machine growing busier or quieter favours neither. Figures: seconds
until every job is filed under done/ (the hooks still being delivered), the daemon's CPU
per job, its peak RSS, how many deliveries were made by then, and what waits on disk
then (the bytes of the hooks' journal, the files in ``hooks/pending/``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from farm import Arrivals, BenchError, Daemon, drop, machine, make_farm, write_jobs

LIMIT_S = 900


class SlowHook:
    def __init__(self, delay_s: float, keep_alive: bool = False) -> None:
        self.delivered = 0
        hook = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if keep_alive else "HTTP/1.0"

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                time.sleep(delay_s)
                hook.delivered += 1
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def on_disk(root: Path) -> tuple[int, int]:
    """The bytes of the hooks' journal and the files in hooks/pending/."""
    hooks = root / "inbox" / ".kinod" / "hooks"
    journal = sum(path.stat().st_size for path in (hooks / "journal").rglob("*.jsonl"))
    pending = sum(1 for _ in (hooks / "pending").iterdir()) if (hooks / "pending").is_dir() \
        else 0
    return journal, pending


def run(root: Path, jobs: int, hooks: list[dict]) -> dict:
    config = make_farm(root, workers=8, hooks=hooks)
    names = write_jobs(root / "staged", jobs)
    with Daemon(config) as daemon:
        daemon.ready()
        done = Arrivals(root / "inbox" / ".kinod" / "done")
        cpu_s = daemon.cpu_s()
        started = time.perf_counter()
        drop(root / "staged", root / "inbox", names)
        finished = done.wait_count(jobs, time.monotonic() + LIMIT_S, daemon.alive)
        done.close()
        if finished is None:
            raise BenchError(f"{len(done.names)} of {jobs} ended: {daemon.log_tail()}")
        return {"s": finished - started, "cpu ms/job": (daemon.cpu_s() - cpu_s) / jobs * 1e3,
                "rss": daemon.peak_rss_mb(), "on disk": on_disk(root)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--delay", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=1, help="ABBA rounds")
    parser.add_argument("--keep-alive", action="store_true",
                        help="the webhook keeps its connections open (HTTP/1.1)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    hook = SlowHook(args.delay, args.keep_alive)
    plain, storm = [], []
    try:
        with tempfile.TemporaryDirectory(prefix="kinod-bench-hooks-") as work:
            work = Path(work)
            for n, which in enumerate("abba" * args.rounds):
                if which == "a":
                    plain.append(run(work / f"plain{n}", args.jobs, []))
                else:
                    storm.append(run(work / f"storm{n}", args.jobs, [{"url": hook.url}]))
                    storm[-1]["delivered"], hook.delivered = hook.delivered, 0
            where = machine(work)
    finally:
        hook.close()
    # Each storm beside the run without hooks made next to it: a, b | b, a | a, b ...
    ratios = [p["s"] / s["s"] for p, s in zip(plain, storm, strict=True)]
    rows = [("no hook", plain), ("slow webhook", storm)]
    lines = [f"{args.jobs:,} jobs, 8 workers, a webhook answering after {args.delay:g} s "
             f"({'keeping' if args.keep_alive else 'closing'} its connections), "
             f"{args.rounds} round(s) of ABBA: medians, but the highest peak RSS, and what "
             f"waits on disk as the last run left it; {where}", "",
             "| | seconds | jobs/s | CPU ms/job | peak RSS MB | deliveries made by then | "
             "waiting on disk then |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, runs in rows:
        s = statistics.median(r["s"] for r in runs)
        cpu = statistics.median(r["cpu ms/job"] for r in runs)
        rss = max(r["rss"] for r in runs)
        extra = "| | |"
        if name == "slow webhook":
            journal, pending = runs[-1]["on disk"]
            extra = (f"| {statistics.median(r['delivered'] for r in runs):,.0f} | journal "
                     f"{journal / 1e6:.1f} MB, {pending:,} files in pending/ |")
        lines.append(f"| {name} | {s:.1f} | {args.jobs / s:.0f} | {cpu:.2f} | {rss:.0f} {extra}")
    lines += ["", f"Throughput with the storm: {statistics.median(ratios):.2f}x of without "
              f"(median of {len(ratios)} pairs; each pair: "
              f"{', '.join(f'{r:.2f}' for r in ratios)}).", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
