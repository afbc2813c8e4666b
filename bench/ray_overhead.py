"""What kinod's Ray executor costs per job, against the same no-op plugin (bench/plugins/noop)
run as plain Ray tasks by a script, on one Ray cluster, in one run.

The cluster is one head node this script starts (``ray start --head`` on 127.0.0.1, the CPUs
given by --cpus) and stops. Two measures, each for both ways, plain Ray first and last
(their mean is the baseline, so neither way gets the warm worker pool alone):

- **burst**: N jobs at once. Plain: ``ray.get([task.remote() ...])``. kinod: N job files
  dropped into the inbox of a daemon with ``executor: ray``, until the last one has ended.
  Wall time per job, and kinod's own CPU per job (the daemon and its Ray driver process).
- **one by one**: M jobs, each submitted when the one before has ended: the latency a job
  sees from submission to its end.

For scale, kinod with ``executor: local`` runs the same jobs too (the plugin in the daemon's
threads): what kinod's own file work costs a job, with or without Ray.

    python bench/ray_overhead.py [--jobs 500] [--one-by-one 30] [--cpus 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
RAY = Path(sys.executable).parent / "ray"
PORTS = ("port", "node-manager-port", "object-manager-port", "dashboard-port",
         "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
         "ray-client-server-port", "runtime-env-agent-port")


def noop_job() -> dict:
    """The noop plugin's generate(), as a Ray task runs it: the plain baseline."""
    sys.path.insert(0, str(BENCH / "plugins"))
    from noop.loader import NoopPlugin

    return asyncio.run(NoopPlugin().generate("plain", {})).data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(temp_dir: str, cpus: int) -> tuple[subprocess.Popen, str]:
    ports = {name: free_port() for name in PORTS}
    log = Path(temp_dir, "ray-start.log")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
             f"--num-cpus={cpus}", "--object-store-memory=100000000",
             "--include-dashboard=false", "--include-log-monitor=false",
             "--disable-usage-stats", f"--temp-dir={temp_dir}",
             *(f"--{name}={port}" for name, port in ports.items())],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while "Ray runtime started" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the Ray cluster did not start:\n{log.read_text()}")
        time.sleep(0.2)
    return proc, f"127.0.0.1:{ports['port']}"


def stop_cluster(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # what ignores SIGTERM
    except ProcessLookupError:
        pass
    proc.wait()


def cpu_s(pid: int) -> float:
    """User and system CPU of ``pid`` and its living children (the Ray driver)."""
    total = 0.0
    pids = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            pids += [int(p) for p in Path(f"/proc/{pid}/task/{task}/children").read_text()
                     .split()]
    except OSError:
        pass
    for one in pids:
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


class Daemon:
    def __init__(self, root: Path, address: str | None) -> None:
        self.root = root
        for folder in ("inbox", "outbox", "data/frames"):
            (root / folder).mkdir(parents=True)
        config = root / "config.yaml"
        config.write_text(yaml.safe_dump({
            "node": "bench", "executor": "ray" if address else "local",
            "ray": {"address": address},
            "plugin_dirs": [str(BENCH / "plugins")], "workers": 32, "settle_s": 0.05,
            "log_level": "WARNING"}))
        self.log = root / "daemon.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "kinod", "run", "--config",
                                          str(config)], stdout=out, stderr=subprocess.STDOUT)
        self.done = root / "inbox" / ".kinod" / "done"
        self.submitted = 0

    def submit(self, n: int) -> None:
        inbox = self.root / "inbox"
        for _ in range(n):
            name = f"j{self.submitted:05d}.yaml"
            (inbox / f".{name}").write_text("type: noop\n")
            os.rename(inbox / f".{name}", inbox / name)
            self.submitted += 1

    def wait_done(self, limit_s: float = 600) -> None:
        deadline = time.monotonic() + limit_s
        while (len(os.listdir(self.done)) if self.done.is_dir() else 0) < self.submitted:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"kinod did not finish:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.002)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--one-by-one", type=int, default=30)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every Ray port on 127.0.0.1
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    temp_dir = tempfile.mkdtemp(prefix="kray")
    proc, address = start_cluster(temp_dir, args.cpus)
    try:
        import ray

        ray.init(address=address, namespace="bench", log_to_driver=False,
                 logging_level="WARNING")
        task = ray.remote(max_retries=0)(noop_job)
        ray.get([task.remote() for _ in range(args.cpus * 4)])  # the worker pool, warm

        def plain_burst() -> float:
            start = time.perf_counter()
            ray.get([task.remote() for _ in range(args.jobs)])
            return time.perf_counter() - start

        def plain_one_by_one() -> float:
            start = time.perf_counter()
            for _ in range(args.one_by_one):
                ray.get(task.remote())
            return time.perf_counter() - start

        plain = [plain_burst()], [plain_one_by_one()]
        kinod_burst, kinod_cpu, kinod_one = run_kinod(Path(temp_dir, "kinod"), address,
                                                      args.jobs, args.one_by_one)
        local = run_kinod(Path(temp_dir, "local"), None, args.jobs, args.one_by_one)
        plain[0].append(plain_burst())
        plain[1].append(plain_one_by_one())
        ray.shutdown()
    finally:
        stop_cluster(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)

    plain_burst_ms = sum(plain[0]) / 2 / args.jobs * 1000
    plain_one_ms = sum(plain[1]) / 2 / args.one_by_one * 1000
    kinod_burst_ms = kinod_burst / args.jobs * 1000
    kinod_one_ms = kinod_one / args.one_by_one * 1000
    print(f"Ray cluster: 1 node, {args.cpus} CPUs; no-op plugin")
    print(f"burst of {args.jobs}: plain Ray {plain_burst_ms:.2f} ms/job, kinod {kinod_burst_ms:.2f}"
          f" ms/job ({kinod_burst_ms / plain_burst_ms:.1f}x), kinod's own CPU "
          f"{kinod_cpu / args.jobs * 1000:.2f} ms/job")
    print(f"one by one, {args.one_by_one}: plain Ray {plain_one_ms:.1f} ms/job, kinod "
          f"{kinod_one_ms:.1f} ms/job ({kinod_one_ms / plain_one_ms:.1f}x)")
    print(f"kinod with executor: local, for scale: burst {local[0] / args.jobs * 1000:.2f} "
          f"ms/job (own CPU {local[1] / args.jobs * 1000:.2f} ms/job), one by one "
          f"{local[2] / args.one_by_one * 1000:.1f} ms/job")


def run_kinod(root: Path, address: str | None, jobs: int, one_by_one: int
              ) -> tuple[float, float, float]:
    """A burst of ``jobs``, then ``one_by_one`` jobs: (burst wall s, burst CPU s of the
    daemon and its driver, one-by-one wall s)."""
    daemon = Daemon(root, address)
    daemon.submit(1)  # start-up (and the driver's connection): not counted
    daemon.wait_done()
    cpu_before, start = cpu_s(daemon.proc.pid), time.perf_counter()
    daemon.submit(jobs)
    daemon.wait_done()
    burst = time.perf_counter() - start
    cpu = cpu_s(daemon.proc.pid) - cpu_before
    start = time.perf_counter()
    for _ in range(one_by_one):
        daemon.submit(1)
        daemon.wait_done()
    one = time.perf_counter() - start
    daemon.stop()
    return burst, cpu, one


if __name__ == "__main__":
    main()
