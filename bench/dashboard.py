"""The dashboard's speed in headless Chromium (Debian's ``chromium``), against ``kinod serve``.

- **First paint:** with N sidecars (default 10,000) in the outbox, the time from the start
  of navigation to the first rows of the jobs table on screen (the page marks it as
  ``kinod:first-rows``): the first load after the API started, then warm loads.
- **Live updates:** a sidecar rewritten (renamed into place) until its row shows the change,
  timed by a MutationObserver in the page against the wall clock (one machine, one clock).

    python bench/dashboard.py [--jobs 10000] [--loads 5] [--updates 200]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from playwright.sync_api import sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kinod.models import JobState, Sidecar  # noqa: E402

LISTENING = re.compile(r"HTTP API listening on (http://\S+)")
STATES = [JobState.SUCCEEDED] * 6 + [JobState.FAILED, JobState.QUEUED, JobState.RUNNING,
                                     JobState.HELD]


def make_sidecar(n: int, now: datetime, state: JobState | None = None,
                 message: str = "") -> Sidecar:
    state = state or STATES[n % len(STATES)]
    created = now - timedelta(seconds=10 * n)
    ended = state.is_terminal
    return Sidecar(
        id=f"shot{n:05d}", name=f"Shot {n:05d} key art", type="sdxl" if n % 3 else "example",
        state=state, progress=100.0 if ended else float(n % 100),
        message=message or f"step {n % 30}/30", created_at=created, updated_at=created,
        started_at=created if state not in (JobState.QUEUED, JobState.HELD) else None,
        finished_at=created + timedelta(seconds=42) if ended else None, attempt=1,
        node=f"gpu-{n % 8}", pid=1000 + n % 8,
        task={"name": f"Shot {n:05d} key art", "type": "sdxl",
              "data": {"prompt": "a beautiful landscape, golden hour, " * 3, "steps": 30,
                       "width": 1024, "height": 1024, "seed": n}},
        result={"images": [f"data/frames/shot{n:05d}/frame_0001.png"], "seed": n}
        if state is JobState.SUCCEEDED else None)


def write(outbox: Path, sidecar: Sidecar) -> None:
    tmp = outbox / f".{sidecar.id}.json.tmp"
    tmp.write_bytes(sidecar.to_json())
    os.rename(tmp, outbox / f"{sidecar.id}.json")


def serve(root: Path) -> tuple[subprocess.Popen, str]:
    """``kinod serve`` on ``root`` in a process of its own (as a web node runs it), once
    it listens (it has read the outbox); its URL."""
    log = open(root / "serve.log", "wb")  # noqa: SIM115 - the process holds it
    server = subprocess.Popen([sys.executable, "-m", "kinod", "serve", "--config",
                               str(root / "config.yaml")], stdout=log, stderr=log)
    log.close()
    deadline = time.monotonic() + 120
    while (found := LISTENING.search((root / "serve.log").read_text())) is None:
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise SystemExit(f"kinod serve did not start:\n{(root / 'serve.log').read_text()}")
        time.sleep(0.02)
    return server, found.group(1)


def first_paint(browser, url: str) -> tuple[float, float]:
    """(navigation start to the first rows, as the page marks it; the same as Playwright
    saw it from the call to goto), in ms."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    started = time.perf_counter()
    page.goto(url, wait_until="commit")
    page.wait_for_selector("body[data-ready=true] [data-job-id]", timeout=30_000)
    seen_ms = (time.perf_counter() - started) * 1000
    marked_ms = page.evaluate(
        "performance.getEntriesByName('kinod:first-rows')[0].startTime")
    context.close()
    return marked_ms, seen_ms


LISTEN = """(id) => { window.changes = []; const seen = new Set();
  new MutationObserver(() => {
    const row = document.querySelector(`[data-job-id="${id}"] .c-msg`);
    if (row && !seen.has(row.textContent)) {
      seen.add(row.textContent);
      window.changes.push([row.textContent, performance.timeOrigin + performance.now()]); }
  }).observe(document.getElementById('window'),
             {subtree: true, childList: true, characterData: true}); }"""


def live_updates(browser, url: str, outbox: Path, updates: int, now: datetime) -> list[float]:
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(url)
    page.wait_for_selector("body[data-ready=true] [data-job-id]")
    page.wait_for_function("document.getElementById('live').textContent === 'live'")
    job = make_sidecar(0, now, JobState.RUNNING)  # the newest: its row is on screen
    page.evaluate(LISTEN, job.id)
    written: dict[str, float] = {}
    for i in range(updates):
        message = f"update {i}"
        written[message] = time.time() * 1000
        write(outbox, job.model_copy(update={"message": message, "progress": i % 100}))
        page.wait_for_function("(m) => window.changes.some(c => c[0] === m)", arg=message,
                               timeout=10_000)
        page.wait_for_timeout(20)
    changes = dict(page.evaluate("window.changes"))
    page.close()
    return [changes[m] - written[m] for m in written]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--updates", type=int, default=200)
    args = parser.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        print("needs Debian's chromium (apt-get install chromium)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="kinod-bench-dashboard-") as folder:
        root = Path(folder)
        for name in ("inbox", "outbox", "data/frames", "models_storage"):
            (root / name).mkdir(parents=True)
        now = datetime.now(UTC)
        for n in range(args.jobs):
            write(root / "outbox", make_sidecar(n, now))
        (root / "config.yaml").write_text('node: bench\nhttp: {listen: "127.0.0.1:0"}\n')
        started = time.perf_counter()
        server, url = serve(root)
        start_s = time.perf_counter() - started
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=chromium)
                cold = first_paint(browser, url + "/")
                warm = [first_paint(browser, url + "/") for _ in range(args.loads)]
                latencies = live_updates(browser, url + "/", root / "outbox",
                                         args.updates, now)
                browser.close()
        finally:
            server.terminate()
            server.wait(10)
    marked = [m for m, _ in warm]
    report = {
        "jobs": args.jobs,
        "api_start_s": round(start_s, 2),
        "first_paint_first_load_ms": round(cold[0]),
        "first_paint_warm_ms": {"median": round(statistics.median(marked)),
                                "max": round(max(marked))},
        "first_rows_seen_by_playwright_ms": round(statistics.median(s for _, s in warm)),
        "live_update_ms": {"p50": round(statistics.median(latencies), 1),
                           "p99": round(statistics.quantiles(latencies, n=100)[98], 1),
                           "max": round(max(latencies), 1), "updates": len(latencies)},
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
