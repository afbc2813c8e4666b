"""The HTTP API's speed: listing with a large outbox, creating tasks, event latency, idle CPU.

Each figure is measured on the real server (``ApiServer``, uvicorn on loopback) with httpx
as the client, in one process; no daemon runs, so the outbox is written by this script.

    python bench/api.py [--sidecars 100000] [--requests 300] [--idle-s 20] [--dir FOLDER]

Targets (issue 25): list p50 < 20 ms with 100,000 sidecars, POST p50 < 10 ms, an event
within 50 ms (p99) of the sidecar's rename, idle under 0.2 % of a core.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from loguru import logger

from kinod.api.server import ApiServer
from kinod.atomic_files import atomic_write
from kinod.config import load_settings
from kinod.models import JobState, Sidecar

TASKS = "/api/v1/generator/tasks"
T0 = datetime(2026, 11, 26, tzinfo=UTC)


def folder(root: Path) -> Path:
    for name in ("inbox", "outbox", "data/frames"):
        (root / name).mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(json.dumps({"node": "bench", "http": {
        "listen": "127.0.0.1:0"}}))
    return root / "config.yaml"


def fill_outbox(outbox: Path, count: int) -> None:
    states = list(JobState)
    for n in range(count):
        created = T0 + timedelta(seconds=n)
        sidecar = Sidecar(id=f"job{n:06d}", type="example", state=states[n % len(states)],
                          created_at=created, updated_at=created,
                          task={"type": "example", "data": {"prompt": f"frame {n}"}})
        (outbox / f"job{n:06d}.json").write_bytes(sidecar.to_json())


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(
        values) > 1 else values[0]


def timed(call, requests: int) -> list[float]:
    times = []
    for _ in range(requests):
        began = time.perf_counter()
        call()
        times.append((time.perf_counter() - began) * 1000)
    return times


def bench_list_and_post(root: Path, sidecars: int, requests: int) -> dict[str, float]:
    config = folder(root)
    fill_outbox(root / "outbox", sidecars)
    began = time.perf_counter()
    server = ApiServer(load_settings(config)).start()
    load_s = time.perf_counter() - began
    try:
        with httpx.Client(base_url=server.url) as client:
            client.get(TASKS)  # a first connection
            pages = timed(lambda: client.get(TASKS, params={"limit": 100}).raise_for_status(),
                          requests)
            posts = timed(lambda: client.post(TASKS, json={
                "type": "example", "data": {"prompt": "p"}}).raise_for_status(), requests)
    finally:
        server.stop()
    return {"index_load_s": load_s, "list_p50_ms": statistics.median(pages),
            "list_p99_ms": percentile(pages, 99), "post_p50_ms": statistics.median(posts),
            "post_p99_ms": percentile(posts, 99)}


def bench_events(root: Path, events: int) -> dict[str, float]:
    config = folder(root)
    server = ApiServer(load_settings(config)).start()
    renamed: dict[str, float] = {}
    latencies: list[float] = []
    ready = threading.Event()

    def follow(client: httpx.Client) -> None:
        with client.stream("GET", "/api/v1/events") as response:
            for line in response.iter_lines():
                if line.startswith("retry:"):
                    ready.set()
                elif line.startswith("data:"):
                    arrived = time.perf_counter()
                    job_id = json.loads(line[5:])["id"]
                    latencies.append((arrived - renamed[job_id]) * 1000)
                    if len(latencies) == events:
                        return

    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            reader = threading.Thread(target=follow, args=(client,))
            reader.start()
            ready.wait(10)
            for n in range(events):
                job_id = f"e{n}"
                data = Sidecar(id=job_id, type="example", state=JobState.RUNNING,
                               created_at=T0, updated_at=T0).to_json()
                renamed[job_id] = time.perf_counter()  # the rename is the write's last step
                atomic_write(root / "outbox" / f"{job_id}.json", data)
                while len(latencies) <= n and reader.is_alive():
                    time.sleep(0.001)
            reader.join(30)
    finally:
        server.stop()
    return {"event_p50_ms": statistics.median(latencies),
            "event_p99_ms": percentile(latencies, 99)}


def bench_idle(root: Path, idle_s: float) -> dict[str, float]:
    config = folder(root)
    fill_outbox(root / "outbox", 100)
    server = ApiServer(load_settings(config)).start()
    try:
        time.sleep(1.0)  # past the start
        cpu, wall = time.process_time(), time.monotonic()
        time.sleep(idle_s)
        used = (time.process_time() - cpu) / (time.monotonic() - wall)
    finally:
        server.stop()
    return {"idle_cpu_percent_of_a_core": used * 100}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sidecars", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--idle-s", type=float, default=20.0)
    parser.add_argument("--dir", type=Path, help="where to make the folders (default: /tmp)")
    args = parser.parse_args()
    logger.remove()
    results: dict[str, float] = {}
    for name, bench in (("list", lambda r: bench_list_and_post(r, args.sidecars, args.requests)),
                        ("events", lambda r: bench_events(r, args.events)),
                        ("idle", lambda r: bench_idle(r, args.idle_s))):
        root = Path(tempfile.mkdtemp(prefix=f"kinod-api-{name}-", dir=args.dir))
        try:
            results |= bench(root)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"sidecars": args.sidecars, **{k: round(v, 3) for k, v in
                                                   results.items()}}, indent=2))


if __name__ == "__main__":
    main()
