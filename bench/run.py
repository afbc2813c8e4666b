"""kinod's benchmarks, each against a baseline measured in the same run.

    python bench/run.py [--quick] [--out bench/RESULTS.md]

Jobs use the no-op plugin in bench/plugins, so only kinod's own cost is measured.
Every figure is printed as measured and as a ratio to its baseline, with the
machine it ran on, because shared machines are noisy: compare ratios, not seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

from kinod.atomic_files import atomic_write, rename_noreplace
from kinod.watcher import file_system_type

BENCH = Path(__file__).resolve().parent
PLUGINS = BENCH / "plugins"
JOB = json.dumps({"type": "noop", "data": {}})


# --- farms ------------------------------------------------------------------------------


def make_farm(root: Path, **settings) -> Path:
    for folder in ("inbox", "outbox", "data/frames", "models_storage"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    values = {"node": "bench", "plugin_dirs": [str(PLUGINS)], "settle_s": 0,
              "log_level": "WARNING", **settings}
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(values))
    return config


def drop_jobs(inbox: Path, n: int) -> None:
    """n job files, each written under a dot-name and renamed into place."""
    for i in range(n):
        tmp = inbox / f".job{i:06d}.json.tmp"
        tmp.write_text(JOB)
        os.rename(tmp, inbox / f"job{i:06d}.json")


def all_ended(outbox: Path, n: int) -> bool:
    ended = 0
    for path in outbox.glob("*.json"):
        try:
            if json.loads(path.read_bytes())["state"] in ("succeeded", "failed", "stopped"):
                ended += 1
        except (OSError, ValueError):
            pass
    return ended == n


def kinod(config: Path, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kinod", "run", "--config", str(config),
                             *args], **popen)


# --- throughput -------------------------------------------------------------------------


def physical_baseline(root: Path, n: int) -> float:
    """The least file work one job needs with kinod's durability: read and parse the job,
    write the running and the final sidecar atomically (the final one flushed), move the
    job file. Seconds for n jobs."""
    inbox, outbox, done = root / "inbox", root / "outbox", root / "done"
    for folder in (inbox, outbox, done):
        folder.mkdir(parents=True)
    drop_jobs(inbox, n)
    started = time.perf_counter()
    for entry in os.scandir(inbox):
        job = json.loads(Path(entry.path).read_bytes())
        job_id = entry.name[:-5]
        sidecar = {"id": job_id, "state": "running", "task": job}
        atomic_write(outbox / f"{job_id}.json", json.dumps(sidecar).encode())
        sidecar["state"] = "succeeded"
        atomic_write(outbox / f"{job_id}.json", json.dumps(sidecar).encode(), durable=True)
        rename_noreplace(Path(entry.path), done / entry.name)
    return time.perf_counter() - started


ONE_JOB = """
import json, os, sys
sys.path.insert(0, {bench!r})
from kinod.atomic_files import atomic_write, rename_noreplace
from pathlib import Path
path, outbox, done = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
job = json.loads(path.read_bytes())
job_id = path.name[:-5]
sidecar = {{"id": job_id, "state": "running", "task": job}}
atomic_write(outbox / f"{{job_id}}.json", json.dumps(sidecar).encode())
sidecar["state"] = "succeeded"
atomic_write(outbox / f"{{job_id}}.json", json.dumps(sidecar).encode(), durable=True)
rename_noreplace(path, done / path.name)
"""


def process_per_job(root: Path, n: int) -> float:
    """What a systemd .path unit or an inotify script does: one Python process per job
    file, doing the baseline's work. Seconds for n jobs."""
    inbox, outbox, done = root / "inbox", root / "outbox", root / "done"
    for folder in (inbox, outbox, done):
        folder.mkdir(parents=True)
    drop_jobs(inbox, n)
    script = ONE_JOB.format(bench=str(BENCH.parent))
    started = time.perf_counter()
    for entry in sorted(os.scandir(inbox), key=lambda e: e.name):
        subprocess.run([sys.executable, "-c", script, entry.path, str(outbox), str(done)],
                       check=True)
    return time.perf_counter() - started


def kinod_burst(root: Path, n: int, workers: int) -> float:
    """Seconds from starting `kinod run --burst` on n dropped jobs until it exits with all
    of them ended (start-up included)."""
    config = make_farm(root, workers=workers)
    drop_jobs(root / "inbox", n)
    started = time.perf_counter()
    proc = kinod(config, "--burst", stderr=subprocess.DEVNULL)
    proc.wait()
    elapsed = time.perf_counter() - started
    assert all_ended(root / "outbox", n), "not every job ended"
    return elapsed


# --- pickup latency -----------------------------------------------------------------------


def pickup_latency(root: Path, n: int, watch: str, poll_interval_s: float) -> list[float]:
    """Milliseconds from the rename into inbox/ to the running sidecar, one job at a time."""
    config = make_farm(root, watch=watch, poll_interval_s=poll_interval_s)
    proc = kinod(config, stderr=subprocess.DEVNULL)
    inbox, outbox = root / "inbox", root / "outbox"
    try:
        time.sleep(1.0)  # started
        waits = []
        for i in range(n):
            tmp = inbox / f".p{i}.tmp"
            tmp.write_text(JOB)
            dropped = time.time()
            os.rename(tmp, inbox / f"p{i}.json")
            sidecar = outbox / f"p{i}.json"
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    data = json.loads(sidecar.read_bytes())
                except (OSError, ValueError):
                    time.sleep(0.0005)
                    continue
                if data.get("started_at"):
                    started = datetime.fromisoformat(data["started_at"].replace("Z", "+00:00"))
                    waits.append((started.timestamp() - dropped) * 1000)
                    break
                time.sleep(0.0005)
        return waits
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


# --- idle cost ------------------------------------------------------------------------------


def idle_cpu_percent(root: Path, seconds: float, finished: int) -> float:
    """CPU the daemon uses over ``seconds`` with nothing to do, beside ``finished`` ended
    jobs in the outbox; percent of one core."""
    config = make_farm(root)
    outbox = root / "outbox"
    for i in range(finished):
        (outbox / f"old{i:06d}.json").write_text('{"state": "succeeded"}')
    proc = kinod(config, stderr=subprocess.DEVNULL)
    try:
        time.sleep(3.0)  # past start-up
        before = _cpu_s(proc.pid)
        time.sleep(seconds)
        return (_cpu_s(proc.pid) - before) / seconds * 100
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- the run --------------------------------------------------------------------------------


def machine(work: Path) -> str:
    return (f"{os.cpu_count()} cores, Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}, file system "
            f"{file_system_type(work) or 'unknown'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer jobs, shorter idle")
    parser.add_argument("--out", type=Path, default=BENCH / "RESULTS.md")
    parser.add_argument("--dir", type=Path, default=None, help="where farms are made")
    args = parser.parse_args()
    sizes = [1000] if args.quick else [1000, 10_000]
    idle_s = 10 if args.quick else 60
    work = Path(tempfile.mkdtemp(prefix="kinod-bench-", dir=args.dir))
    lines = [f"# kinod benchmarks\n\nMachine: {machine(work)}. Command: `make bench`"
             f"{' (--quick)' if args.quick else ''}.\n"]

    def farm(name: str) -> Path:
        return work / name

    try:
        lines.append("## Throughput (no-op jobs, dropped before the start)\n")
        lines.append("| jobs | physical baseline | kinod, 1 worker | kinod, 8 workers | "
                     "one process per job | kinod 8 workers / baseline | "
                     "kinod 8 workers / process per job |")
        lines.append("| --- | --- | --- | --- | --- | --- | --- |")
        spawn_n = 200
        spawn_rate = spawn_n / process_per_job(farm("spawn"), spawn_n)
        for n in sizes:
            base = n / physical_baseline(farm(f"base{n}"), n)
            one = n / kinod_burst(farm(f"k1_{n}"), n, 1)
            eight = n / kinod_burst(farm(f"k8_{n}"), n, 8)
            lines.append(f"| {n:,} | {base:,.0f}/s | {one:,.0f}/s | {eight:,.0f}/s | "
                         f"{spawn_rate:,.0f}/s ({spawn_n} jobs) | {eight / base:.2f} | "
                         f"{eight / spawn_rate:.1f} |")
            print(lines[-1], flush=True)
        lines.append("")
        lines.append("## Pickup latency (rename into inbox/ to the running sidecar)\n")
        lines.append("| mode | jobs | p50 | p99 |")
        lines.append("| --- | --- | --- | --- |")
        for mode, n, interval in (("inotify", 200 if args.quick else 1000, 2.0),
                                  ("poll (0.1 s)", 50 if args.quick else 200, 0.1)):
            waits = pickup_latency(farm(f"pickup_{mode[:4]}"), n, mode.split()[0], interval)
            p99 = statistics.quantiles(waits, n=100)[98]
            lines.append(f"| {mode} | {len(waits)} | {statistics.median(waits):.1f} ms | "
                         f"{p99:.1f} ms |")
            print(lines[-1], flush=True)
        lines.append("")
        lines.append(f"## Idle cost ({idle_s:g} s with nothing to do)\n")
        lines.append("| outbox | CPU, % of one core |")
        lines.append("| --- | --- |")
        for finished in (0, 10_000 if args.quick else 100_000):
            cpu = idle_cpu_percent(farm(f"idle{finished}"), idle_s, finished)
            lines.append(f"| {finished:,} finished jobs | {cpu:.3f} % |")
            print(lines[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
