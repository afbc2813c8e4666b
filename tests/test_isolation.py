"""kinod.isolation: a job's plugin in a child process, supervised from the daemon's side.

Every test runs a real child process (multiprocessing, spawn) on the ``crashy`` test
plugin (tests/plugin_fixtures/working/crashy), which ends its own process as told.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kinod.errors import JobStalled, JobTimeout, PluginCrashed
from kinod.isolation import ORPHANED_EXIT_CODE, ChildJob, ProcessRun, _ChildRun, child_main
from kinod.models import JobState
from kinod.outcome import Outcome, StopReason, Verdict, judge
from kinod.plugins.plugin_loader import load_plugin_class
from kinod.runner import CANCEL_WAIT_S
from tests.helpers import WORKING_PLUGINS, Clock, wait_for

pytestmark = pytest.mark.timeout(30)

CRASHY = WORKING_PLUGINS / "crashy"
JOB_ID = "job1"
Reports = list[tuple[float, "str | None"]]


@dataclass
class Ran:
    outcome: Outcome
    verdict: Verdict
    reports: Reports
    run: ProcessRun


def new_run(root: Path, plugin: str = "crashy", source: str = str(CRASHY),
            clock: Callable[[], float] = time.monotonic,
            **data: Any) -> tuple[ProcessRun, Reports]:
    reports: Reports = []
    for folder in ("outbox", "frames", "models"):
        (root / folder).mkdir(exist_ok=True)
    run = ProcessRun(plugin, source, JOB_ID, {"action": "succeed", "code": 7, "steps": 3, **data},
                     lambda percent, message: reports.append((percent, message)),
                     output_dir=root / "frames", settings={"colour": "aces"},
                     models_dir=root / "models", outbox=root / "outbox", clock=clock)
    return run, reports


def run_job(root: Path, meanwhile: Callable[[ProcessRun, Reports], Awaitable[None]] | None = None,
            timeout_s: float | None = None, stall_timeout_s: float | None = None,
            grace_s: float = 2.0, **kwargs: Any) -> Ran:
    """Run one job to its end on a loop of its own; ``meanwhile`` acts on it as it runs."""
    run, reports = new_run(root, **kwargs)

    async def main() -> Outcome:
        task = asyncio.create_task(run.run(timeout_s, stall_timeout_s, grace_s))
        if meanwhile is not None:
            await meanwhile(run, reports)
        return await task

    outcome = asyncio.run(main())
    return Ran(outcome, judge(outcome), reports, run)


async def until(condition: Callable[[], Any], what: str) -> None:
    """wait_for, without blocking the loop the run needs."""
    await asyncio.to_thread(wait_for, condition, 15, what=what)


async def look_again(run: ProcessRun) -> None:
    """Have the supervision check its limits now, as its timers would."""
    for _ in range(3):
        run._wake.set()
        await asyncio.sleep(0)


def gone(pid: int | None) -> bool:
    assert pid is not None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def crashed_with(ran: Ran, message: str) -> None:
    assert ran.verdict.state is JobState.FAILED, ran.verdict
    assert isinstance(ran.verdict.error, PluginCrashed)
    assert ran.verdict.error.message == message


# --- how a run ends ------------------------------------------------------------------


def test_success_brings_progress_and_result_from_the_child(tmp_path: Path) -> None:
    ran = run_job(tmp_path)
    assert ran.verdict.state is JobState.SUCCEEDED, ran.verdict
    result = ran.verdict.result
    assert result["pid"] == ran.run.pid != os.getpid()
    assert result["settings"] == {"colour": "aces"}
    assert result["output_dir"] == str(tmp_path / "frames")
    assert result["models_dir"] == str(tmp_path / "models")
    assert ran.reports == [(30.0, "step 1/3"), (60.0, "step 2/3"), (90.0, "step 3/3")]
    assert gone(ran.run.pid)


def test_an_exception_reads_as_in_a_thread(tmp_path: Path) -> None:
    crashed_with(run_job(tmp_path, action="raise"), "plugin raised RuntimeError: crashy explosion")


def test_sys_exit_is_an_exception_like_any_other(tmp_path: Path) -> None:
    crashed_with(run_job(tmp_path, action="sys_exit", code=3), "plugin raised SystemExit: 3")


def test_os_exit_fails_the_job_and_spares_the_daemon(tmp_path: Path) -> None:
    ran = run_job(tmp_path, action="os_exit", code=7)
    crashed_with(ran, "the plugin's process exited with code 7")
    assert ran.outcome.exit_code == 7
    assert len(ran.reports) == 3  # what it reported before it died still came through


def test_a_plugin_killed_by_a_signal(tmp_path: Path) -> None:
    crashed_with(run_job(tmp_path, action="kill_self"),
                 "the plugin's process was killed by signal SIGKILL")


# --- stopping -------------------------------------------------------------------------


def test_a_plugin_that_ignores_stop_is_killed_after_the_grace(tmp_path: Path) -> None:
    asked_at: list[float] = []

    async def stop_it(run: ProcessRun, reports: Reports) -> None:
        await until(lambda: len(reports) == 3, "the plugin to report progress")
        asked_at.append(time.monotonic())
        run.request_stop(StopReason.USER, 0.3)

    ran = run_job(tmp_path, stop_it, action="hang")
    took_s = time.monotonic() - asked_at[0]
    assert ran.outcome.forced
    assert ran.outcome.exit_code == -signal.SIGKILL
    assert ran.verdict.state is JobState.STOPPED
    assert "did not stop within the grace period" in ran.verdict.error.message
    assert 0.3 + CANCEL_WAIT_S <= took_s < 0.3 + CANCEL_WAIT_S + 5, took_s
    assert gone(ran.run.pid)


def test_force_stop_does_not_wait_for_the_grace(tmp_path: Path) -> None:
    async def stop_it(run: ProcessRun, reports: Reports) -> None:
        await until(lambda: reports, "the plugin to report progress")
        run.request_stop(StopReason.SHUTDOWN, 60)  # the daemon's first signal...
        run.force_stop()                           # ... and its second

    ran = run_job(tmp_path, stop_it, action="hang")
    assert ran.outcome.forced
    assert ran.verdict == Verdict(None)  # back to the queue
    assert gone(ran.run.pid)


def test_a_stop_before_the_start_reaches_the_child(tmp_path: Path) -> None:
    run, _ = new_run(tmp_path, gate=str(tmp_path / "never"))
    run.request_stop(StopReason.USER, 10)  # as the daemon does for a .stop file seen early
    outcome = asyncio.run(run.run(None, None, 10))
    assert not outcome.forced
    assert outcome.result.error == "Stopped by user"
    assert judge(outcome).state is JobState.STOPPED


def test_timeout(tmp_path: Path) -> None:
    ran = run_job(tmp_path, timeout_s=1.0, gate=str(tmp_path / "never"))
    assert ran.outcome.stop_reason is StopReason.TIMEOUT
    assert not ran.outcome.forced  # it obeyed the stop
    assert isinstance(ran.verdict.error, JobTimeout)
    assert ran.verdict.error.message == "ran longer than its timeout of 1 s"


def test_stall_timeout(tmp_path: Path) -> None:
    ran = run_job(tmp_path, stall_timeout_s=1.0, steps=1, gate=str(tmp_path / "never"))
    assert ran.outcome.stop_reason is StopReason.STALL
    assert not ran.outcome.forced
    assert isinstance(ran.verdict.error, JobStalled)
    assert ran.reports == [(90.0, "step 1/1")]


WAITING = (0.0, "waiting in a queue")


def wait_in_a_queue(tmp_path: Path, say_waiting: bool) -> tuple[Ran, list[StopReason | None]]:
    """A job whose plugin waits in a queue (until a file exists) while the run's clock
    moves far past its timeout and stall limit; the queue lets it run only if nothing
    stopped it meanwhile."""
    clock = Clock()
    queue = tmp_path / "queue"
    seen: list[StopReason | None] = []

    async def wait_long(run: ProcessRun, reports: Reports) -> None:
        await until(lambda: WAITING in reports, "the plugin to say it waits")
        clock.now += 100
        await look_again(run)
        seen.append(run._outcome.stop_reason)
        if run._outcome.stop_reason is None:
            queue.touch()

    ran = run_job(tmp_path, wait_long, timeout_s=10.0, stall_timeout_s=5.0, clock=clock,
                  queue=str(queue), say_waiting=say_waiting, steps=1)
    return ran, seen


def test_a_plugin_waiting_in_a_queue_is_timed_only_once_it_runs(tmp_path: Path) -> None:
    ran, seen = wait_in_a_queue(tmp_path, say_waiting=True)
    assert seen == [None]  # 100 s of waiting: no limit ran
    assert ran.verdict.state is JobState.SUCCEEDED, ran.verdict
    assert ran.outcome.stop_reason is None
    # What the daemon writes to the sidecar: the waiting text, then the work.
    assert ran.reports == [WAITING, (0.0, "running"), (90.0, "step 1/1")]


def test_a_plugin_that_does_not_say_it_waits_is_timed_from_its_start(tmp_path: Path) -> None:
    ran, seen = wait_in_a_queue(tmp_path, say_waiting=False)
    assert seen == [StopReason.TIMEOUT]
    assert ran.outcome.stop_reason is StopReason.TIMEOUT
    assert isinstance(ran.verdict.error, JobTimeout)
    assert ran.verdict.error.message == "ran longer than its timeout of 10 s"
    assert ran.reports == [WAITING]


def test_the_child_passes_on_a_change_of_waiting_even_in_the_same_words() -> None:
    sent: list[tuple[float, str | None, bool]] = []
    run = _ChildRun(lambda: None, JOB_ID, {},  # type: ignore[arg-type, return-value]
                    on_progress=lambda percent, message: sent.append(
                        (percent, message, run.waiting)))
    assert run._progress.accepts_waiting
    run._progress(0, "queued", waiting=True)
    run._progress(0, "queued")                 # nothing new: not sent again
    run._progress(0, "queued", waiting=False)  # the work began, in the same words
    assert sent == [(0.0, "queued", True), (0.0, "queued", False)]


def test_the_child_ignores_sigterm_and_sigint(tmp_path: Path) -> None:
    gate = tmp_path / "gate"

    async def signal_it(run: ProcessRun, reports: Reports) -> None:
        await until(lambda: len(reports) == 3, "the plugin to report progress")
        os.kill(run.pid, signal.SIGTERM)  # as systemd does to the whole cgroup
        os.kill(run.pid, signal.SIGINT)   # as a Ctrl-C in the daemon's terminal does
        gate.touch()

    ran = run_job(tmp_path, signal_it, gate=str(gate))
    assert ran.verdict.state is JobState.SUCCEEDED, ran.verdict


def test_the_child_exits_when_the_daemon_is_gone(tmp_path: Path) -> None:
    (tmp_path / "outbox").mkdir()
    job = ChildJob("crashy", str(CRASHY), JOB_ID, {"action": "hang", "code": 7, "steps": 1},
                   str(tmp_path), {}, str(tmp_path), str(tmp_path / "outbox"), "text", "INFO")
    context = multiprocessing.get_context("spawn")
    daemon_end, child_end = context.Pipe()
    process = context.Process(target=child_main, args=(child_end, job))
    process.start()
    child_end.close()
    try:
        assert daemon_end.poll(15), "the child never reported"
        assert daemon_end.recv()[0] == "progress"  # it runs (and hangs)
        daemon_end.close()  # what the daemon's death does to its end
        process.join(15)
        assert process.exitcode == ORPHANED_EXIT_CODE
    finally:
        process.kill()
        process.join()


# --- where it logs, and how it finds the plugin --------------------------------------------


def test_the_plugins_log_lines_go_to_the_job_log_and_stderr(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    ran = run_job(tmp_path)
    assert ran.verdict.state is JobState.SUCCEEDED
    job_log = (tmp_path / "outbox" / f"{JOB_ID}.log").read_text()
    assert f"INFO    crashy {JOB_ID}: succeed in process {ran.run.pid}" in job_log  # logging
    assert f"INFO    crashy {JOB_ID}: done" in job_log                              # loguru
    assert re.search(rf"\| INFO    \| crashy {JOB_ID}: done", capfd.readouterr().err)


def test_a_plugin_from_an_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real installed distribution, as far as importlib.metadata can tell; the child
    # gets the same sys.path, so it finds it too.
    value = "tests.plugin_fixtures.working.crashy.loader:CrashyPlugin"
    dist = tmp_path / "site" / "crashy_ep-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: crashy_ep\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[kinod.plugins]\ncrashy_ep = {value}\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert load_plugin_class("crashy_ep", f"entry point {value}").__name__ == "CrashyPlugin"
    ran = run_job(tmp_path, plugin="crashy_ep", source=f"entry point {value}")
    assert ran.verdict.state is JobState.SUCCEEDED, ran.verdict
    with pytest.raises(ImportError, match="no entry point 'missing'"):
        load_plugin_class("missing", f"entry point {value}")


def test_a_plugin_from_a_folder() -> None:
    assert load_plugin_class("crashy", str(CRASHY)).__name__ == "CrashyPlugin"


@pytest.mark.parametrize(("exit_code", "text"), [
    (0, "exited with code 0"),
    (7, "exited with code 7"),
    (-signal.SIGSEGV, "was killed by signal SIGSEGV"),
    (-200, "was killed by signal 200"),
])
def test_judge_says_how_the_process_ended(exit_code: int, text: str) -> None:
    verdict = judge(Outcome(exit_code=exit_code))
    assert verdict.state is JobState.FAILED
    assert verdict.error.code == PluginCrashed.code
    assert verdict.error.message == f"the plugin's process {text}"
