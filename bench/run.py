"""kinod's benchmarks, each figure against a baseline measured in the same run.

    python bench/run.py [--quick] [--only SECTION,...] [--sizes N,...] [--out FILE]

Sections: throughput (with cost per job as the inbox grows), latency, backlog, idle,
storm. Jobs use the no-op plugin in bench/plugins, so only kinod's own cost is measured.
Writes bench/RESULTS.md (sections not run keep their last results; see report.py).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import measure
import peer_huey
from farm import BENCH, BenchError, machine, make_farm
from measure import Burst
from report import Row, Section, save, table

from kinod.config import Settings

SECTIONS = ["throughput", "latency", "backlog", "idle", "storm"]
TARGET_N = 10_000  # the size the throughput targets are set at
STORM_TIGHT_S = 0.01  # a throttle the storm is held back by


@dataclass
class Plan:
    """How much of everything to measure (``--quick``: a sanity run of a few minutes)."""

    sizes: list[int]
    spawn_jobs: int = 300  # one process per job is slow: measured on fewer, per job
    huey_max: int = 10_000  # huey is measured up to this many jobs
    latency_jobs: int = 1000
    poll_jobs: int = 1000
    poll_interval_s: float = 0.1
    backlog_jobs: int = 100_000
    backlog_reference: int = 1000
    idle_s: float = 60
    storm_reports: int = 100_000
    limit_s: float = 1800  # at most this long for any one run of a daemon


def quick_plan() -> Plan:
    return Plan(sizes=[200, 1000], spawn_jobs=50, latency_jobs=100, poll_jobs=30,
                backlog_jobs=2000, backlog_reference=200, idle_s=10, limit_s=300)


class Bench:
    """One run: its temporary folder, and what sections share (the plain loop's figures,
    the backlog's farm for the idle section)."""

    def __init__(self, plan: Plan, work: Path) -> None:
        self.plan = plan
        self.work = work
        self.plain: dict[int, Burst] = {}
        self.backlog_config: Path | None = None
        self._farms = 0

    def farm(self, name: str) -> Path:
        """A new folder for one measurement. It stays until ``clear_farms``, which runs
        between the sizes of the throughput section and between sections, never just
        before a measurement that is compared with another: on ext4 without a journal, each
        inode freed in the last minute or more makes creating a file dearer, so the run
        right after a large farm's removal pays for it (13 % of kinod's rate, 10,000 jobs,
        8 workers)."""
        self._farms += 1
        return self.work / f"{self._farms:02d}-{name}"

    def clear_farms(self) -> None:
        """Remove every farm but the backlog's, which the idle section measures again."""
        keep = self.backlog_config.parent if self.backlog_config else None
        for path in self.work.iterdir():
            if path != keep:
                measure.remove(path)

    def physical(self, n: int, again: bool = False) -> Burst:
        """The plain loop on n jobs; ``again``: measure once more and keep the faster run
        (a baseline that is never flattered by a busy moment of a shared machine)."""
        if n not in self.plain or again:
            self.plain[n] = _faster(self.plain.get(n), measure.physical(self.farm("plain"), n))
        return self.plain[n]

    # --- the sections -----------------------------------------------------------------------

    def throughput(self) -> Section:
        p = self.plan
        s = Section("throughput", "Throughput", (
            "Jobs per second from the first of N job files renamed into the inbox of a "
            "running kinod (READY) until every job is filed under `done/`, its final "
            "sidecar on disk; 1 and 8 workers. Baselines: the plain loop (`bench/plain.py`: "
            "read and parse the job, write the `running` and the final sidecar atomically, "
            "the final one flushed, move the job file), timed over the loop alone, before "
            "and after kinod's and huey's runs of that size, the faster run kept (kinod and "
            f"huey too run twice up to {p.huey_max:,} jobs, the faster kept); one "
            f"Python process per job file, run one after another as a systemd `.path` unit "
            f"or an inotify script would, measured twice on {p.spawn_jobs} jobs (the faster "
            "run kept) and given per job; huey 3.5 with SqliteHuey (`synchronous` "
            f"{peer_huey.synchronous(self.farm('huey_probe'))}), its consumer running with "
            "1 or 8 thread workers, timed from the first enqueue until every result is "
            f"stored (measured up to {p.huey_max:,} jobs). For scale, the contract "
            "floor (`handle_contract` in `bench/plain.py`): the least file work kinod's "
            "contract with its users asks of a job that waits its turn, whatever the daemon: "
            "the plain loop's, plus the `queued` sidecar and the job's log, a line for each "
            f"state; on 1 or 8 threads, once each after kinod's runs (up to "
            f"{p.huey_max:,} jobs); and the same on 8 threads with its final flushes "
            "batched as kinod batches them (`handle_contract_batched`: the final "
            "sidecars written meanwhile share one flush of the outbox folder). `kinod run "
            "--burst`: the same N job files renamed into the inbox before kinod starts, "
            "timed from its start until it exits, less what it takes on an empty inbox "
            f"(twice up to {p.huey_max:,} jobs, the faster kept)."))
        spawn = _faster(measure.process_per_job(self.farm("spawn"), p.spawn_jobs),
                        measure.process_per_job(self.farm("spawn"), p.spawn_jobs))
        runs = self._throughput_runs()
        rows = []
        for n in p.sizes:
            k8 = runs["kinod8", n]
            rows.append([f"{n:,}", _rate(runs["plain", n]), _rate(spawn),
                         *(_rate(runs[key, n]) if (key, n) in runs else "—"
                           for key in ("floor1", "floor8", "floor8b", "huey1", "huey8",
                                       "kinod1", "kinod8", "burst1", "burst8")),
                         f"{k8.cpu_s / k8.jobs * 1e6:,.0f} µs", f"{k8.peak_rss_mb:.0f} MB"])
        s.extra += ["Every run (rates in jobs per second):", ""] + table(
            ["jobs", "plain loop", f"process per job ({p.spawn_jobs})",
             "contract floor, 1 thread", "contract floor, 8 threads",
             "contract floor, batched, 8 threads", "huey, 1 worker",
             "huey, 8 workers", "kinod, 1 worker", "kinod, 8 workers",
             "kinod --burst, 1 worker", "kinod --burst, 8 workers",
             "kinod CPU per job (8 workers)", "kinod peak RSS (8 workers)"], rows)
        n = TARGET_N if TARGET_N in p.sizes else max(p.sizes)
        for workers in (8, 1):
            kinod = runs[f"kinod{workers}", n]
            _ratio_row(s, f"{n:,} jobs, {_workers(workers)}, vs the plain loop", kinod,
                       runs["plain", n], "plain loop", 0.5)
            _ratio_row(s, f"{n:,} jobs, {_workers(workers)}, vs a process per job", kinod,
                       spawn, "process per job", 20)
            if ("huey1", n) in runs:  # for information: no longer a target
                huey = runs[f"huey{workers}", n]
                s.add(f"{n:,} jobs, {_workers(workers)}, vs huey", f"{_rate(kinod)} jobs/s",
                      f"{_rate(huey)} jobs/s (huey, {_workers(workers)})",
                      f"{kinod.rate / huey.rate:.2f}x")
            if (f"floor{workers}", n) in runs:
                floor = runs[f"floor{workers}", n]
                _ratio_row(s, f"{n:,} jobs, {_workers(workers)}, vs the contract floor",
                           kinod, floor, f"contract floor, {_threads(workers)}", 0.8)
                if (f"burst{workers}", n) in runs:
                    _ratio_row(s, f"{n:,} jobs queued, `kinod run --burst`, "
                               f"{_workers(workers)}, vs the contract floor",
                               runs[f"burst{workers}", n], floor,
                               f"contract floor, {_threads(workers)}", 0.8)
        if ("floor1", n) in runs:
            scale = []
            for w in (1, 8):
                floor = runs[f"floor{w}", n]
                scale.append(f"on {_threads(w)}, {floor.rate / runs['plain', n].rate:.2f}x "
                             f"the plain loop and {floor.rate / runs[f'huey{w}', n].rate:.2f}x "
                             f"huey with {_workers(w)}")
            s.extra += ["", f"The contract floor at {n:,} jobs: {'; '.join(scale)}."]
        if ("floor8b", n) in runs:
            s.extra += ["", _batched_floor_note(runs, n)]
        small, large = min(p.sizes), max(p.sizes)
        if small < large:
            for who, label, bound in (("kinod8", "kinod, 8 workers", 1.5),
                                      ("kinod1", "kinod, 1 worker", 1.5),
                                      ("plain", "the plain loop", None)):
                a, b = runs[who, small], runs[who, large]
                growth = (b.seconds / b.ended) / (a.seconds / a.ended)
                s.add(f"time per job, {large:,} vs {small:,} jobs: {label}",
                      f"{_per_job(b)} at {large:,}", f"{_per_job(a)} at {small:,}",
                      f"{growth:.2f}x", "≤ 1.5x" if bound else "—",
                      (growth <= bound and b.complete) if bound else None)
        return s

    def _throughput_runs(self) -> dict[tuple[str, int], Burst]:
        """Every size with the plain loop, huey and kinod, each with 1 and 8 workers. Up to
        ``huey_max`` jobs, huey and kinod run twice and keep the faster run, as the plain
        loop does: a busy moment of the shared machine flatters no side."""
        p = self.plan
        runs: dict[tuple[str, int], Burst] = {}
        for n in p.sizes:
            self.physical(n)
            for _ in range(2 if n <= p.huey_max else 1):
                for workers in (1, 8):
                    line = f"  {n:,} jobs, {_workers(workers)}:"
                    if n <= p.huey_max:
                        huey = Burst(n, *peer_huey.throughput(self.farm("huey"), n, workers,
                                                              p.limit_s))
                        key = f"huey{workers}", n
                        runs[key] = _faster(runs.get(key), huey)
                        line += f" huey {_rate(huey)}/s,"
                    kinod = measure.kinod_throughput(self.farm("kinod"), n, workers,
                                                     p.limit_s)
                    key = f"kinod{workers}", n
                    runs[key] = _faster(runs.get(key), kinod)
                    line += f" kinod {_rate(kinod)}/s"
                    if n <= p.huey_max:
                        burst = measure.kinod_burst(self.farm("burst"), n, workers,
                                                    p.limit_s)
                        key = f"burst{workers}", n
                        runs[key] = _faster(runs.get(key), burst)
                        line += f", kinod --burst {_rate(burst)}/s"
                    print(line, flush=True)
            if n <= p.huey_max:
                # After kinod's runs, which the inodes a floor frees would slow (see farm).
                for threads, batched in ((1, False), (8, False), (8, True)):
                    floor = measure.physical(self.farm("floor"), n, contract=True,
                                             threads=threads, batched=batched)
                    runs[f"floor{threads}{'b' * batched}", n] = floor
                    print(f"  {n:,} jobs, contract floor{', batched,' * batched} on "
                          f"{_threads(threads)}: {_rate(floor)}/s", flush=True)
            runs["plain", n] = self.physical(n, again=True)  # the faster of before and after
            self.clear_farms()
        return runs

    def latency(self) -> Section:
        p = self.plan
        s = Section("latency", "Pickup latency", (
            "Milliseconds from the rename of a job file into `inbox/` until a reader woken "
            "by inotify on the outbox reads its `running` sidecar, jobs dropped one at a "
            "time (each once the one before is filed away, after a random pause: up to the "
            "interval in poll mode, so drops fall anywhere between two looks). Baseline in "
            "inotify mode: the plain loop as an inotify watcher (`bench/plain.py watch`), "
            "measured the same way; in poll mode, the interval."))
        base = measure.pickup(self.farm("pickup_plain"), p.latency_jobs, "inotify", 2,
                              baseline=True, limit_s=p.limit_s)
        kinod = measure.pickup(self.farm("pickup_inotify"), p.latency_jobs, "inotify", 2,
                               limit_s=p.limit_s)
        for q, bound in ((50, 5), (99, 20)):
            k, b = measure.percentile(kinod, q), measure.percentile(base, q)
            s.add(f"inotify, p{q} ({len(kinod)} jobs)", f"{k:.1f} ms",
                  f"{b:.1f} ms (plain watcher)", f"{k / b:.1f}x", f"< {bound} ms", k < bound)
        interval = p.poll_interval_s
        poll = measure.pickup(self.farm("pickup_poll"), p.poll_jobs, "poll", interval,
                              limit_s=p.limit_s)
        bound_ms = interval * 1000 + 10
        for q in (50, 99):
            v = measure.percentile(poll, q)
            s.add(f"poll every {interval:g} s, p{q} ({len(poll)} jobs)", f"{v:.1f} ms",
                  f"{interval * 1000:.0f} ms (the interval)", f"{v / interval / 1000:.2f}x",
                  f"≤ {bound_ms:.0f} ms", v <= bound_ms)
        s.add(f"poll every {interval:g} s, slowest", f"{max(poll):.1f} ms",
              f"{interval * 1000:.0f} ms (the interval)", f"{max(poll) / interval / 1000:.2f}x")
        s.extra.append(f"Mean: inotify {statistics.mean(kinod):.1f} ms (plain watcher "
                       f"{statistics.mean(base):.1f} ms), poll {statistics.mean(poll):.1f} ms.")
        return s

    def backlog(self) -> Section:
        p = self.plan
        n, ref_n = p.backlog_jobs, p.backlog_reference
        s = Section("backlog", "Backlog start-up", (
            f"kinod (8 workers) started on {n:,} job files already in its inbox: seconds "
            "from starting the process until the first `running` sidecar is written, until "
            "it says READY=1, and until every job is filed under `done/`; its peak resident "
            f"memory (VmHWM). Baselines: the same on {ref_n:,} queued files, and the plain "
            f"loop on {n:,} jobs (the faster of two runs)."))
        ref = measure.backlog(self.farm("backlog_ref"), ref_n, 8, p.limit_s)
        fresh = n not in self.plain  # else measured twice by the throughput section
        if fresh:
            self.physical(n)
        farm = self.farm("backlog")
        big = measure.backlog(farm, n, 8, p.limit_s)
        if big.ended == n:  # all finished: the idle section's outbox of finished jobs
            self.backlog_config = farm / "config.yaml"
        s.add("first job running", f"{big.first_s:.2f} s", f"{ref.first_s:.2f} s "
              f"({ref_n:,} queued)", f"{big.first_s / ref.first_s:.1f}x", "≤ 2 s",
              big.first_s <= 2)
        s.add("READY=1", f"{big.ready_s:.2f} s", f"{ref.ready_s:.2f} s ({ref_n:,} queued)",
              f"{big.ready_s / ref.ready_s:.1f}x")
        plain = self.physical(n, again=fresh)  # the faster of before and after
        done = (f"{big.all_s:.1f} s" if big.ended == n
                else f"past the limit: {big.ended:,} of {n:,} in {big.all_s:.0f} s")
        s.add(f"all {n:,} done", f"{done} ({big.ended / big.all_s:,.0f} jobs/s)",
              f"{plain.seconds:.1f} s (plain loop)", f"{big.all_s / plain.seconds:.1f}x")
        s.add("peak RSS", f"{big.peak_rss_mb:.0f} MB",
              f"{ref.peak_rss_mb:.0f} MB ({ref_n:,} queued)",
              f"{big.peak_rss_mb / ref.peak_rss_mb:.2f}x", "< 100 MB", big.peak_rss_mb < 100)
        paused = measure.paused_queue_rss_mb(self.farm("backlog_paused"), n, p.limit_s)
        s.add(f"peak RSS, farm paused: all {n:,} queued, none run", f"{paused:.0f} MB",
              f"{ref.peak_rss_mb:.0f} MB ({ref_n:,} queued, run)",
              f"{paused / ref.peak_rss_mb:.2f}x", "< 100 MB", paused < 100)
        s.add("CPU per job", f"{big.cpu_s / n * 1e6:,.0f} µs",
              f"{ref.cpu_s / ref_n * 1e6:,.0f} µs ({ref_n:,} queued)",
              f"{(big.cpu_s / n) / (ref.cpu_s / ref_n):.2f}x")
        return s

    def idle(self) -> Section:
        p = self.plan
        n = p.backlog_jobs
        source = ("the backlog section's farm" if self.backlog_config
                  else "copies of one job kinod ran")
        s = Section("idle", "Idle cost", (
            f"CPU kinod uses over {p.idle_s:g} s with nothing to do (from 2 s after READY=1), "
            f"in percent of one core: with an empty outbox, and with {n:,} finished jobs in "
            f"it ({source}). The baseline of the first is a bare Python asyncio loop "
            f"that wakes once a second, measured the same way: what a wake-up a second "
            f"costs on this machine. The baseline of the second is the first."))
        ticker = measure.ticker_cpu_percent(p.idle_s)
        empty = measure.idle_cpu_percent(make_farm(self.farm("idle")), p.idle_s)
        config = self.backlog_config or measure.finished_farm(self.farm("finished"), n)
        full = measure.idle_cpu_percent(config, p.idle_s)
        s.add("empty outbox", f"{empty:.3f} %", f"{ticker:.3f} % (asyncio, 1 wake-up/s)",
              f"{empty / ticker:.2f}x" if ticker else "—", "< 0.2 %", empty < 0.2)
        s.add(f"{n:,} finished jobs", f"{full:.3f} %", f"{empty:.3f} % (empty outbox)",
              f"{full / empty:.1f}x" if empty else "—", "< 0.2 %", full < 0.2)
        tick_percent = 100 / os.sysconf("SC_CLK_TCK") / p.idle_s
        s.extra.append(f"Resolution: CPU time is read from /proc in clock ticks; one tick "
                       f"over {p.idle_s:g} s is {tick_percent:.3f} % of a core.")
        return s

    def storm(self) -> Section:
        p = self.plan
        default = Settings.model_fields["progress_interval_s"].default
        s = Section("storm", "Progress storm", (
            f"One job of `bench/plugins/storm`, which calls `update_progress` "
            f"{p.storm_reports:,} times as fast as it can, then succeeds: with "
            f"`progress_interval_s` {default:g} (the default), and again with "
            f"{STORM_TIGHT_S:g} so that the throttle, not the plugin's speed, sets the "
            "pace. Sidecar writes are counted by inotify on the outbox (every write is a "
            "rename into it), from the first to the final one; the throttle allows the state "
            "changes (at most 3: queued, running, final) and one progress write per interval "
            "of the run (`started_at` to `finished_at`), plus one. CPU is the daemon's over "
            "the whole job; its baseline, the plugin's loop alone with a callback that does "
            "nothing."))
        alone = measure.storm_alone_cpu_s(p.storm_reports)
        for interval in (default, STORM_TIGHT_S):
            st = measure.storm(self.farm("storm"), p.storm_reports, interval)
            allowed = 3 + math.floor(st.run_s / interval) + 1
            label = f"interval {interval:g} s"
            s.add(f"sidecar writes, {label}", f"{st.writes}",
                  f"{allowed} allowed ({st.run_s:.2f} s run)", f"{st.writes / allowed:.2f}x",
                  "≤ allowed", st.writes <= allowed)
            final = st.final
            result = final.get("result") or {}
            ok = (final.get("state") == "succeeded" and final.get("progress") == 100
                  and result.get("reports") == p.storm_reports)
            s.add(f"final sidecar, {label}", f"{final.get('state')}, progress "
                  f"{final.get('progress')}, {result.get('reports', 0):,} reports made", "—",
                  "—", "succeeded, progress 100", ok)
            s.add(f"daemon CPU, {label}", f"{st.cpu_s:.2f} s", f"{alone:.2f} s (the loop alone)",
                  f"{st.cpu_s / alone:.1f}x" if alone else "—")
        return s


def _batched_floor_note(runs: dict[tuple[str, int], Burst], n: int) -> str:
    """What batching the final flushes did to the floor, and who of the floors and kinod
    passed huey at ``n`` jobs."""
    batched, floor, huey = runs["floor8b", n], runs["floor8", n], runs["huey8", n]
    passed = [who for who, key in (("the batched contract floor", "floor8b"),
                                   ("kinod with 8 workers", "kinod8"),
                                   ("`kinod run --burst` with 8 workers", "burst8"))
              if (key, n) in runs and runs[key, n].rate > huey.rate]
    return (f"With its final flushes batched, the contract floor on 8 threads ran "
            f"{_rate(batched)} jobs/s at {n:,} jobs, {batched.rate / floor.rate:.2f}x the "
            f"unbatched floor and {batched.rate / huey.rate:.2f}x huey with 8 workers. "
            + (f"Ahead of huey with 8 workers: {', '.join(passed)}." if passed
               else "Neither the batched floor nor kinod passed huey with 8 workers."))


# --- formatting -------------------------------------------------------------------------------


def _workers(n: int) -> str:
    return "1 worker" if n == 1 else f"{n} workers"


def _threads(n: int) -> str:
    return "1 thread" if n == 1 else f"{n} threads"


def _faster(kept: Burst | None, new: Burst) -> Burst:
    """Of two runs of one measurement, the faster: a baseline or a figure that a busy
    moment of a shared machine does not flatter."""
    return new if kept is None or new.rate > kept.rate else kept


def _rate(burst: Burst) -> str:
    text = f"{burst.rate:,.0f}"
    return text if burst.complete else f"{text} (limit: {burst.ended:,} of {burst.jobs:,})"


def _per_job(burst: Burst) -> str:
    return f"{burst.seconds / burst.ended * 1e6:,.0f} µs"


def _ratio_row(s: Section, what: str, kinod: Burst, base: Burst, base_name: str,
               at_least: float, strict: bool = False) -> Row:
    ratio = kinod.rate / base.rate
    met = (ratio > at_least if strict else ratio >= at_least) and kinod.complete
    return s.add(what, f"{_rate(kinod)} jobs/s", f"{_rate(base)} jobs/s ({base_name})",
                 f"{ratio:.2f}x", f"{'>' if strict else '≥'} {at_least:g}x", met)


# --- the run ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a sanity run of a few minutes: fewer jobs, 10 s idle")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run (of {','.join(SECTIONS)})")
    parser.add_argument("--sizes", help="throughput sizes, e.g. 1000,10000 (default "
                        "1000,10000,100000; --quick 200,1000)")
    parser.add_argument("--idle-s", type=float, help="seconds of each idle measurement")
    parser.add_argument("--limit-s", type=float, help="at most this long for any one daemon "
                        "run (default 1800; --quick 300)")
    parser.add_argument("--out", type=Path, default=BENCH / "RESULTS.md")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where farms are made (the disk measured); default: temp")
    args = parser.parse_args()
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    if unknown := set(only) - set(SECTIONS):
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    plan = quick_plan() if args.quick else Plan(sizes=[1000, 10_000, 100_000])
    if args.sizes:
        plan.sizes = sorted(int(n) for n in args.sizes.split(","))
    if args.idle_s:
        plan.idle_s = args.idle_s
    if args.limit_s:
        plan.limit_s = args.limit_s
    work = Path(tempfile.mkdtemp(prefix="kinod-bench-", dir=args.dir))
    command = " ".join(["python bench/run.py", *sys.argv[1:]])
    stamp = (f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine(work)}; "
             f"`{command}`")
    print(stamp, flush=True)
    bench = Bench(plan, work)
    sections = []
    started = time.monotonic()
    try:
        for name in SECTIONS:
            if name in only:
                print(f"{name}:", flush=True)
                sections.append(getattr(bench, name)())
                bench.clear_farms()
    except BenchError as exc:
        sys.exit(f"bench: {exc}")
    except KeyboardInterrupt:
        sys.exit("bench: interrupted")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if sections:
            save(sections, args.out, stamp, SECTIONS)
            print(f"{', '.join(s.key for s in sections)} written to {args.out} "
                  f"({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
