"""A hook storm: n jobs end with a slow webhook set, against the same n jobs with no hook,
in one run. Does the farm slow down, does memory grow?

    python bench/hook_storm.py [--jobs 10000] [--delay 0.5] [--out FILE]

The webhook is a local server on 127.0.0.1 that answers each POST after ``--delay``
seconds. Figures: seconds until every job is filed under done/ (the hooks still being
delivered), the daemon's peak RSS, how many deliveries were made by then, and what waits
on disk then (the bytes of the hooks' journal, the files in ``hooks/pending/``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from farm import Arrivals, BenchError, Daemon, drop, machine, make_farm, write_jobs

LIMIT_S = 900


class SlowHook:
    def __init__(self, delay_s: float) -> None:
        self.delivered = 0
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                time.sleep(delay_s)
                hook.delivered += 1
                self.send_response(204)
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


def run(root: Path, jobs: int, hooks: list[dict]) -> tuple[float, float, tuple[int, int]]:
    config = make_farm(root, workers=8, hooks=hooks)
    names = write_jobs(root / "staged", jobs)
    with Daemon(config) as daemon:
        daemon.ready()
        done = Arrivals(root / "inbox" / ".kinod" / "done")
        started = time.perf_counter()
        drop(root / "staged", root / "inbox", names)
        finished = done.wait_count(jobs, time.monotonic() + LIMIT_S, daemon.alive)
        done.close()
        if finished is None:
            raise BenchError(f"{len(done.names)} of {jobs} ended: {daemon.log_tail()}")
        return finished - started, daemon.peak_rss_mb(), on_disk(root)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--delay", type=float, default=0.5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    hook = SlowHook(args.delay)
    try:
        with tempfile.TemporaryDirectory(prefix="kinod-bench-hooks-") as work:
            work = Path(work)
            # Turn about (ABBA), the median of each: a machine growing busier or quieter
            # during the run favours neither.
            plain, storm = [], []
            for round_, order in enumerate(("ab", "ba")):
                for which in order:
                    if which == "a":
                        plain.append(run(work / f"plain{round_}", args.jobs, []))
                    else:
                        storm.append((*run(work / f"storm{round_}", args.jobs,
                                            [{"url": hook.url}]), hook.delivered))
                        hook.delivered = 0
            plain_s, plain_rss, _ = min(plain)
            storm_s, storm_rss, (journal, pending), delivered = min(storm)
            where = machine(work)
    finally:
        hook.close()
    text = "\n".join([
        f"{args.jobs:,} jobs, 8 workers, a webhook answering after {args.delay:g} s; the "
        f"best of two rounds turn about; {where}",
        "", "| | seconds | jobs/s | peak RSS MB | deliveries made by then | waiting on disk "
        "then |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| no hook | {plain_s:.1f} | {args.jobs / plain_s:.0f} | {plain_rss:.0f} | | |",
        f"| slow webhook | {storm_s:.1f} | {args.jobs / storm_s:.0f} | {storm_rss:.0f} | "
        f"{delivered:,} | journal {journal / 1e6:.1f} MB, {pending:,} files in pending/ |",
        "", f"Throughput with the storm: {plain_s / storm_s:.2f}x of without.", ""])
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
