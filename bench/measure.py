"""The measurements themselves, each on a fresh farm folder that the caller removes.
Every daemon is stopped and every helper process ended however a measurement ends."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from farm import (
    BENCH,
    JOB,
    PLUGINS,
    TERMINAL,
    Arrivals,
    BenchError,
    Daemon,
    SidecarWatch,
    child,
    count_ended,
    cpu_seconds,
    drop,
    make_farm,
    write_jobs,
)
from plain import handle, handle_contract, handle_contract_batched, loop

PLAIN = BENCH / "plain.py"
STARTED = frozenset({"running"}) | TERMINAL


def _folders(root: Path) -> tuple[Path, Path, Path]:
    inbox, outbox, done = root / "inbox", root / "outbox", root / "done"
    for folder in (inbox, outbox, done):
        folder.mkdir(parents=True, exist_ok=True)
    return inbox, outbox, done


def _done_folder(root: Path) -> Path:
    return root / "inbox" / ".kinod" / "done"


# --- throughput -----------------------------------------------------------------------------


@dataclass
class Burst:
    jobs: int
    seconds: float
    ended: int  # fewer than jobs when the run hit its limit
    cpu_s: float = 0.0
    peak_rss_mb: float = 0.0

    @property
    def rate(self) -> float:
        return self.ended / self.seconds

    @property
    def complete(self) -> bool:
        return self.ended == self.jobs


def physical(root: Path, n: int, contract: bool = False, threads: int = 1,
             batched: bool = False) -> Burst:
    """The plain loop (bench/plain.py) on n jobs already in its inbox, in this process;
    ``contract``: the contract floor instead, on ``threads`` threads (``batched``: its
    final flushes batched as kinod's are)."""
    inbox, outbox, done = _folders(root)
    write_jobs(inbox, n)
    handler = (handle if not contract else handle_contract_batched if batched
               else handle_contract)
    started = time.perf_counter()
    handled = loop(inbox, outbox, done, handler, threads)
    return Burst(n, time.perf_counter() - started, handled)


def process_per_job(root: Path, n: int) -> Burst:
    """One Python process per job file, one after another, as a systemd .path unit or an
    inotify script starts them, each doing the plain loop's work for its job."""
    inbox, outbox, done = _folders(root)
    names = write_jobs(inbox, n)
    started = time.perf_counter()
    for name in names:
        subprocess.run([sys.executable, str(PLAIN), "once", str(inbox / name), str(outbox),
                        str(done)], check=True)
    return Burst(n, time.perf_counter() - started, n)


def kinod_throughput(root: Path, n: int, workers: int, limit_s: float) -> Burst:
    """kinod running (READY) with an empty inbox; n job files are renamed into the inbox
    as fast as one process can, and the clock runs from the first rename until every job
    is filed under done/ (its final sidecar is on disk by then)."""
    config = make_farm(root, workers=workers)
    names = write_jobs(root / "staged", n)
    with Daemon(config) as daemon:
        daemon.ready()
        done = Arrivals(_done_folder(root))
        cpu = daemon.cpu_s()
        started = time.perf_counter()
        drop(root / "staged", root / "inbox", names)
        finished = done.wait_count(n, time.monotonic() + limit_s, daemon.alive)
        seconds = (finished or time.perf_counter()) - started
        if not daemon.alive():
            raise BenchError(f"kinod died: {daemon.log_tail()}")
        burst = Burst(n, seconds, len(done.names), daemon.cpu_s() - cpu, daemon.peak_rss_mb())
        done.close()
    if burst.complete and count_ended(root / "outbox") != n:
        raise BenchError("every job was filed under done/ but not every sidecar is terminal")
    return burst


def kinod_burst(root: Path, n: int, workers: int, limit_s: float) -> Burst:
    """``kinod run --burst`` on n job files renamed into its inbox before it starts: seconds
    from the start of the process until it exits, every job filed under done/, less what
    the same command takes on an empty inbox (its start-up and shutdown, measured just
    before on a farm of its own)."""
    empty = make_farm(root / "empty", workers=workers)
    overhead_s, _ = _burst(empty, limit_s)
    config = make_farm(root / "farm", workers=workers)
    write_jobs(root / "farm" / "inbox", n)
    seconds, cpu_s = _burst(config, limit_s)
    ended = len(os.listdir(_done_folder(root / "farm")))
    burst = Burst(n, max(seconds - overhead_s, 1e-3), ended, cpu_s)
    if burst.complete and count_ended(root / "farm" / "outbox") != n:
        raise BenchError("every job was filed under done/ but not every sidecar is terminal")
    return burst


def _burst(config: Path, limit_s: float) -> tuple[float, float]:
    """Seconds ``kinod run --burst`` ran on ``config``, and its CPU seconds."""
    before = os.times()
    started = time.perf_counter()
    with open(config.parent / "daemon.log", "ab") as log:
        proc = subprocess.run([sys.executable, "-m", "kinod", "run", "--burst", "--config",
                               str(config)], stdout=subprocess.DEVNULL, stderr=log,
                              timeout=limit_s, check=False)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise BenchError(f"kinod run --burst exited with {proc.returncode}")
    after = os.times()
    cpu_s = (after.children_user - before.children_user
             + after.children_system - before.children_system)
    return seconds, cpu_s


# --- pickup latency -------------------------------------------------------------------------


def pickup(root: Path, n: int, watch: str, interval_s: float, baseline: bool = False,
           limit_s: float = 600) -> list[float]:
    """Milliseconds from the rename of a job file into the inbox until a reader woken by
    inotify sees its ``running`` sidecar (or a later one), n jobs one at a time: each
    dropped once the one before is filed away (its end flushed), after a random pause (up
    to the poll interval in poll mode, so drops fall anywhere between two looks).
    ``baseline``: the plain inotify loop (bench/plain.py watch) instead of kinod."""
    inbox, outbox, done = _folders(root)
    if baseline:
        server = child([sys.executable, str(PLAIN), "watch", str(inbox), str(outbox),
                        str(done)], stdout=subprocess.PIPE)
    else:
        server = Daemon(make_farm(root, watch=watch, poll_interval_s=interval_s))
    rng = random.Random(n)
    pause_s = interval_s if watch == "poll" else 0.005
    deadline = time.monotonic() + limit_s
    with server as proc:
        if baseline:
            proc.stdout.readline()
        else:
            proc.ready()
        sidecars = SidecarWatch(outbox)
        ended = Arrivals(done if baseline else _done_folder(root))
        waits = []
        for i in range(n):
            if time.monotonic() > deadline:
                break
            tmp = inbox / f".p{i}.json.tmp"
            tmp.write_text(JOB)
            time.sleep(rng.uniform(0, pause_s))
            dropped = time.perf_counter()
            os.rename(tmp, inbox / f"p{i}.json")
            seen, _ = sidecars.wait_for(f"p{i}", STARTED, 30 + interval_s)
            waits.append((seen - dropped) * 1000)
            if ended.wait_count(i + 1, time.monotonic() + 30) is None:
                raise BenchError(f"p{i} was not filed away within 30 s")
        sidecars.close()
        ended.close()
    return waits


def percentile(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


# --- backlog start-up -----------------------------------------------------------------------


@dataclass
class Backlog:
    jobs: int
    first_s: float  # from the start of the process to the first running sidecar
    ready_s: float  # to READY=1
    all_s: float  # to the last job filed under done/
    ended: int
    peak_rss_mb: float
    cpu_s: float


def backlog(root: Path, n: int, workers: int, limit_s: float) -> Backlog:
    """kinod started on n job files already in its inbox (renamed in before the start)."""
    config = make_farm(root, workers=workers)
    write_jobs(root / "inbox", n)
    sidecars = SidecarWatch(root / "outbox")
    with Daemon(config) as daemon:
        deadline = time.monotonic() + limit_s
        try:
            first, _ = sidecars.first(STARTED, limit_s, daemon.alive)
        finally:
            sidecars.close()
        ready_s = daemon.ready(max(deadline - time.monotonic(), 1))
        done = Arrivals(_done_folder(root))
        finished = done.wait_count(n, deadline, daemon.alive)
        if not daemon.alive():
            raise BenchError(f"kinod died: {daemon.log_tail()}")
        result = Backlog(n, first - daemon.started, ready_s,
                         (finished or time.perf_counter()) - daemon.started, len(done.names),
                         daemon.peak_rss_mb(), daemon.cpu_s())
        done.close()
    if result.ended == n and count_ended(root / "outbox") != n:
        raise BenchError("every job was filed under done/ but not every sidecar is terminal")
    return result


def paused_queue_rss_mb(root: Path, n: int, limit_s: float) -> float:
    """kinod (8 workers) on a paused farm started on n job files: its resident memory (MB)
    once every one of them waits in the spool, and none has run: what the queue alone
    costs, apart from what running jobs beside it leave allocated."""
    config = make_farm(root, workers=8)
    write_jobs(root / "inbox", n)
    (root / "inbox" / ".pause").touch()
    spool = root / "inbox" / ".kinod"
    with Daemon(config) as daemon:
        deadline = time.monotonic() + limit_s
        while sum(_count(spool / folder) for folder in ("queued", "running/bench")) < n:
            if not daemon.alive() or time.monotonic() > deadline:
                raise BenchError(f"the paused queue never filled: {daemon.log_tail()}")
            time.sleep(1)
        return daemon.peak_rss_mb()


def _count(folder: Path) -> int:
    try:
        with os.scandir(folder) as entries:
            return sum(1 for _ in entries)
    except FileNotFoundError:
        return 0


# --- idle cost ------------------------------------------------------------------------------


def idle_cpu_percent(config: Path, seconds: float) -> float:
    """CPU kinod uses over ``seconds`` with nothing to do, from 2 s after READY=1; percent
    of one core."""
    with Daemon(config) as daemon:
        daemon.ready(300)
        return _cpu_percent_from_2_s_on(daemon.pid, seconds)


# The least a process that wakes once a second costs: on a busy virtual machine a wake-up
# can cost milliseconds, and this shows what the idle figures are made of there.
TICKER = "import asyncio\nasync def tick():\n    while True:\n        await asyncio.sleep(1)\n" \
         "asyncio.run(tick())"


def ticker_cpu_percent(seconds: float) -> float:
    """CPU an asyncio loop waking once a second uses over ``seconds``, measured as
    ``idle_cpu_percent`` measures kinod; percent of one core."""
    with child([sys.executable, "-c", TICKER]) as proc:
        return _cpu_percent_from_2_s_on(proc.pid, seconds)


def _cpu_percent_from_2_s_on(pid: int, seconds: float) -> float:
    """CPU process ``pid`` uses over ``seconds``, starting 2 s from now; percent of one core."""
    time.sleep(2)
    cpu, started = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - cpu) / (time.monotonic() - started) * 100


def finished_farm(root: Path, n: int) -> Path:
    """A farm holding n finished jobs as kinod leaves them (sidecar and log in the outbox,
    the job file under done/), copied from one job kinod really ran: quicker than running
    n jobs when the backlog's farm is not at hand."""
    config = make_farm(root)
    write_jobs(root / "inbox", 1)
    subprocess.run([sys.executable, "-m", "kinod", "run", "--burst", "--config", str(config)],
                   check=True, stderr=subprocess.DEVNULL, timeout=60)
    model = "job000000"
    outbox, done = root / "outbox", _done_folder(root)
    sidecar = (outbox / f"{model}.json").read_text()
    log = (outbox / f"{model}.log").read_text()
    for i in range(1, n):
        job_id = f"job{i:06d}"
        (outbox / f"{job_id}.json").write_text(sidecar.replace(model, job_id))
        (outbox / f"{job_id}.log").write_text(log.replace(model, job_id))
        (done / job_id).mkdir()
        (done / job_id / "1.json").write_text(JOB)
    return config


# --- progress storm -------------------------------------------------------------------------


@dataclass
class Storm:
    reports: int
    writes: int  # sidecar writes seen, queued through final
    run_s: float  # started_at to finished_at
    final: dict
    cpu_s: float


def storm(root: Path, reports: int, interval_s: float, limit_s: float = 300) -> Storm:
    """One job of bench/plugins/storm, which reports progress ``reports`` times as fast as
    it can. Every sidecar write is a rename into the outbox; inotify counts each one."""
    config = make_farm(root, progress_interval_s=interval_s)
    with Daemon(config) as daemon:
        daemon.ready()
        sidecars = SidecarWatch(root / "outbox")
        cpu = daemon.cpu_s()
        tmp = root / "inbox" / ".storm.json.tmp"
        tmp.write_text(json.dumps({"type": "storm", "data": {"reports": reports}}))
        os.rename(tmp, root / "inbox" / "storm.json")
        _, final = sidecars.wait_for("storm", TERMINAL, limit_s)
        cpu = daemon.cpu_s() - cpu
        time.sleep(0.2)
        sidecars.drain()
        sidecars.close()
    run_s = _seconds_between(final.get("started_at"), final.get("finished_at"))
    return Storm(reports, sidecars.writes.get("storm.json", 0), run_s, final, cpu)


def storm_alone_cpu_s(reports: int) -> float:
    """CPU time of the storm plugin's own loop, its reports going to a callback that does
    nothing: what the storm costs without kinod."""
    spec = importlib.util.spec_from_file_location("storm_loader", PLUGINS / "storm" / "loader.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    plugin = module.StormPlugin()
    started = time.process_time()
    asyncio.run(plugin.generate("storm", {"reports": reports}, lambda *_: None))
    return time.process_time() - started


def _seconds_between(start: str | None, end: str | None) -> float:
    from datetime import datetime

    if not start or not end:
        return 0.0
    return (datetime.fromisoformat(end.replace("Z", "+00:00"))
            - datetime.fromisoformat(start.replace("Z", "+00:00"))).total_seconds()


def remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
