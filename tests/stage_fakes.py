"""Testing one stage alone: a ``Context`` on a tmp folder, with a real spool and outbox, clocks
moved by hand, and fakes of the other stages in its slots (see "How kinod is built").

The fakes are small real classes: each records its calls as ``(method, args...)`` and answers
what the test scripts in its attributes.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from kinod.config import Settings
from kinod.errors import KinodError
from kinod.intake import ReadJob, read_job
from kinod.models import JobSpec, JobState, Sidecar
from kinod.outbox import Outbox
from kinod.outcome import Outcome, StopReason, Verdict
from kinod.plugins.plugin_loader import PluginRegistry
from kinod.spool import Spool
from kinod.stages.context import Context
from kinod.stages.job import Job, first_sidecar, place
from kinod.stages.stops import Stops
from tests.helpers import WORKING_PLUGINS, Clock

NODE = "n1"
OTHER_NODE = "n2"
QUICK_JOB: dict[str, Any] = {"type": "scripted", "data": {"steps": 1, "step_s": 0}}

_registry: PluginRegistry | None = None


def registry() -> PluginRegistry:
    """The working test plugins and the built-in ones, loaded once for every test."""
    global _registry
    if _registry is None:
        _registry = PluginRegistry([WORKING_PLUGINS], use_entry_points=False)
    return _registry


def disk_full() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


class Calls:
    """A callable that counts its calls: the context's ``wake`` and ``retry_soon``."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


class Fake:
    """Records every call as ``(method, args...)``."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def _record(self, method: str, *args: Any) -> None:
        self.calls.append((method, *args))

    def called(self, method: str) -> list[tuple[Any, ...]]:
        """The arguments of each call of ``method``, in order."""
        return [call[1:] for call in self.calls if call[0] == method]


class End(NamedTuple):
    job_id: str
    path: Path | None
    sidecar: Sidecar
    state: JobState
    error: KinodError | None
    published: bool


class FakeIntake(Fake):
    """Reads job files for real (kinod.intake.read_job); records what it is handed."""

    def __init__(self, ctx: Context) -> None:
        super().__init__()
        self._ctx = ctx

    def _read(self, path: Path) -> ReadJob:
        ctx = self._ctx
        return read_job(path, ctx.settings.max_job_bytes, ctx.registry, ctx.wall_clock())

    def read(self, path: Path, look_again: bool = True) -> ReadJob | None:
        self._record("read", path)
        return self._read(path) if os.path.lexists(path) else None

    def read_held(self, path: Path) -> ReadJob:
        self._record("read_held", path)
        return self._read(path)

    def take_in(self, held: Path, job_id: str, read: ReadJob) -> None:
        self._record("take_in", held, job_id, read)

    def let_wait(self, held: Path, job_id: str, read: ReadJob, sidecar: Sidecar) -> None:
        self._record("let_wait", held, job_id, read, sidecar)

    def admit(self, queued: Path, job_id: str, read: ReadJob) -> None:
        self._record("admit", queued, job_id, read)

    def take_in_resubmitted(self, job_id: str) -> None:
        self._record("take_in_resubmitted", job_id)


class FakeScheduler(Fake):
    """Holds jobs in a dict; ``can_start`` answers can_start_now."""

    def __init__(self) -> None:
        super().__init__()
        self.held: dict[str, Job] = {}
        self.can_start = False
        self.waiting = 0  # what queued() answers

    def get(self, job_id: str) -> Job | None:
        return self.held.get(job_id)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self.held

    def __len__(self) -> int:
        return len(self.held)

    def jobs(self) -> Iterator[Job]:
        return iter(list(self.held.values()))

    def queued(self) -> int:
        return self.waiting

    def hold(self, job: Job) -> None:
        self._record("hold", job)
        self.held[job.id] = job

    def admit(self, job: Job) -> None:
        self._record("admit", job)
        self.held[job.id] = job

    def after_dependencies(self, job: Job) -> None:
        self._record("after_dependencies", job)

    def enqueue(self, job: Job) -> None:
        self._record("enqueue", job)

    def unqueue(self, job: Job) -> None:
        self._record("unqueue", job)

    def remove(self, job_id: str) -> None:
        self._record("remove", job_id)
        self.held.pop(job_id, None)

    def remove_if(self, job: Job) -> None:
        self._record("remove_if", job)
        if self.held.get(job.id) is job:
            del self.held[job.id]

    def forget(self, job: Job) -> None:
        self._record("forget", job)
        self.remove_if(job)

    def can_start_now(self, job_id: str, spec: JobSpec, plugin: str) -> bool:
        self._record("can_start_now", job_id)
        return self.can_start

    def take_slot(self, job: Job) -> None:
        self._record("take_slot", job)
        job.holds_slot = True

    def free_slot(self, job: Job) -> None:
        self._record("free_slot", job)
        job.holds_slot = False


class FakeRunning(Fake):
    """``running`` holds what is_running answers; ``start`` takes the job's slot in the
    context's scheduler (as a real start does), or raises ``start_fault``."""

    def __init__(self, ctx: Context) -> None:
        super().__init__()
        self._ctx = ctx
        self.running: dict[str, Job] = {}
        self.claimed: dict[str, Path | None] = {}  # what claim answers; else the job's path
        self.start_fault: OSError | None = None

    def __len__(self) -> int:
        return len(self.running)

    def get(self, job_id: str) -> Job | None:
        return self.running.get(job_id)

    def is_running(self, job_id: str) -> bool:
        return job_id in self.running

    def jobs(self) -> Iterator[Job]:
        return iter(list(self.running.values()))

    def start(self, job: Job) -> None:
        self._record("start", job)
        if self.start_fault is not None:
            raise self.start_fault
        self._ctx.scheduler.take_slot(job)

    def begin(self, job: Job, held: Path, old: Sidecar, published: bool = True) -> None:
        self._record("begin", job, held, old, published)

    def claim(self, job: Job) -> Path | None:
        self._record("claim", job)
        return self.claimed.get(job.id, job.path)

    def stop(self, job: Job) -> None:
        self._record("stop", job)


class FakeEnding(Fake):
    """Answers from the sets ``ended`` (has_ended), ``unfiled`` and ``unrecorded``;
    ``sidecar_of`` gives ``sidecars[id]``, else the job's own."""

    def __init__(self) -> None:
        super().__init__()
        self.ended: set[str] = set()
        self.unfiled: set[str] = set()
        self.unrecorded: set[str] = set()
        self.sidecars: dict[str, Sidecar] = {}

    def has_ended(self, job_id: str) -> bool:
        return job_id in self.ended

    def is_unfiled(self, job_id: str) -> bool:
        return job_id in self.unfiled

    def is_unrecorded(self, job_id: str) -> bool:
        return job_id in self.unrecorded

    def sidecar_of(self, job: Job) -> Sidecar:
        return self.sidecars.get(job.id) or job.sidecar or first_sidecar(job.id, None, NODE)

    def end(self, job_id: str, path: Path | None, sidecar: Sidecar, state: JobState,
            error: KinodError | None = None, result: dict | None = None,
            published: bool = True, written: Sidecar | None = None) -> None:
        self._record("end", End(job_id, path, sidecar, state, error, published))

    def ends(self) -> list[End]:
        return [call[0] for call in self.called("end")]

    def file_away(self, path: Path, job_id: str) -> None:
        self._record("file_away", path, job_id)

    def claimed_elsewhere(self, job: Job) -> None:
        self._record("claimed_elsewhere", job)

    def end_waiting(self, job: Job, state: JobState, error: KinodError) -> None:
        self._record("end_waiting", job, state, error)

    def record(self, job: Job, verdict: Verdict, again: bool) -> None:
        self._record("record", job, verdict, again)


class FakeFleet(Fake):
    """``alone``: jobs wait here; ``elsewhere``: plugins another node serves; ``taken``: ids
    another node took over; ``others``: ids in another node's share of the queue."""

    def __init__(self) -> None:
        super().__init__()
        self.alone = False
        self.elsewhere: set[str] = set()
        self.taken: set[str] = set()
        self.others: set[str] = set()

    def owns(self, job_id: str) -> bool:
        return job_id not in self.others

    def queued_for_another(self, name: str, job_id: str) -> None:
        self._record("queued_for_another", name, job_id)

    def served_elsewhere(self, plugin: object) -> bool:
        return plugin in self.elsewhere

    def let_wait_here(self, plugin: str) -> bool:
        self._record("let_wait_here", plugin)
        return self.alone

    def taken_over(self, job: Job) -> bool:
        return job.id in self.taken

    def fence(self, job: Job) -> None:
        self._record("fence", job)


class FakeRecovery(Fake):
    def keeps(self, path: Path, job_id: str) -> bool:
        return True

    def pass_over(self, path: Path, mtime: int | None) -> None:
        self._record("pass_over", path, mtime)

    def guarded(self, action: Callable[..., None], path: Path, *args: Any) -> None:
        self._record("guarded", action, path, *args)

    def recover_running(self, path: Path) -> None:
        self._record("recover_running", path)


class FakeStops(Fake):
    """Looks for a stop file as the real stage does, and records what it would act on."""

    def __init__(self, ctx: Context) -> None:
        super().__init__()
        self._ctx = ctx

    look_for = Stops.look_for

    def on_stop_file(self, path: Path, job_id: str) -> None:
        self._record("on_stop_file", path, job_id)


class FakeHolds(Fake):
    """Nothing is held or paused unless a test says so."""

    def __init__(self) -> None:
        super().__init__()
        self.paused = False
        self.hold = False  # wants_hold's answer

    def wants_hold(self, job_id: str, read: ReadJob) -> bool:
        return self.hold

    def hold_new(self, held: Path, job_id: str, sidecar: Sidecar) -> None:
        self._record("hold_new", held, job_id, sidecar)

    def on_hold_file(self, path: Path, job_id: str) -> None:
        self._record("on_hold_file", path, job_id)

    def on_release_file(self, path: Path, job_id: str) -> None:
        self._record("on_release_file", path, job_id)

    def put_back_on_hold(self, path: Path, job_id: str) -> None:
        self._record("put_back_on_hold", path, job_id)

    def look_at_pause(self) -> None:
        self._record("look_at_pause")

    def queued_message(self, read: ReadJob, otherwise: str | None = None) -> str | None:
        return otherwise


class FakeDependencies(Fake):
    """Every job is ready; ends and drops are recorded."""

    def __len__(self) -> int:
        return 0

    def ready(self, job: Job) -> bool:
        return True

    def ended(self, job_id: str, state: JobState) -> None:
        self._record("ended", job_id, state)

    def drop(self, job_id: str) -> None:
        self._record("drop", job_id)


class FakeHooks(Fake):
    def enqueue(self, sidecar: Sidecar) -> None:
        self._record("enqueue", sidecar)

    def journal(self, sidecar: Sidecar, data: bytes | None = None) -> None:
        self._record("journal", sidecar)

    def sync(self) -> None:
        pass

    def take_back(self, node: str) -> int:
        self._record("take_back", node)
        return 0


class FaultySpool(Spool):
    """A spool whose moves named in ``faults`` raise, as on a full or read-only disk."""

    def __init__(self, inbox: Path, node: str) -> None:
        super().__init__(inbox, node)
        self.faults: dict[str, OSError] = {}

    def _fault(self, move: str) -> None:
        if (exc := self.faults.get(move)) is not None:
            raise exc

    def accept(self, src: Path) -> Path:
        self._fault("accept")
        return super().accept(src)

    def requeue(self, running: Path) -> Path:
        self._fault("requeue")
        return super().requeue(running)

    def finish(self, path: Path, job_id: str) -> Path:
        self._fault("finish")
        return super().finish(path, job_id)


class FaultyOutbox(Outbox):
    """An outbox whose sidecar writes raise ``fault`` while it is set."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.fault: OSError | None = None
        self.writes = 0

    def write(self, sidecar: Sidecar) -> None:
        if self.fault is not None:
            raise self.fault
        self.writes += 1
        super().write(sidecar)


class FakeRun:
    """Stands for the plugin's run (kinod.runner.PluginRun): ``run()`` returns ``outcome``
    once the test calls ``finish``, or once a stop is requested (the plugin obeys)."""

    def __init__(self, make_plugin: Callable[[], Any], job_id: str, data: dict[str, Any],
                 on_progress: Callable[[float, str | None], None],
                 clock: Callable[[], float] | None = None,
                 on_ended: Callable[[Outcome], None] | None = None) -> None:
        self.job_id, self.data, self.on_progress = job_id, data, on_progress
        self.outcome = Outcome()
        self.stops: list[tuple[StopReason, float]] = []
        self.forced = 0
        self.limits: tuple[float | None, float | None, float] | None = None
        self._done = asyncio.Event()

    async def run(self, timeout_s: float | None, stall_timeout_s: float | None,
                  grace_s: float) -> Outcome:
        self.limits = (timeout_s, stall_timeout_s, grace_s)
        await self._done.wait()
        return self.outcome

    def finish(self, result: Any = None) -> None:
        self.outcome.result = result
        self._done.set()

    def request_stop(self, reason: StopReason, grace_s: float,
                     limit_s: float | None = None) -> None:
        self.stops.append((reason, grace_s))
        if self.outcome.stop_reason is None:
            self.outcome.stop_reason = reason
        self._done.set()

    def force_stop(self) -> None:
        self.forced += 1


class RunMaker:
    """Put in place of PluginRun: makes FakeRuns and keeps them, by job id."""

    def __init__(self) -> None:
        self.runs: dict[str, FakeRun] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> FakeRun:
        run = FakeRun(*args, **kwargs)
        self.runs[run.job_id] = run
        return run


@dataclass
class Rig:
    """A Context and the fakes in its slots; a test puts the stage under test in its own."""

    ctx: Context
    clock: Clock  # monotonic
    wall: Clock  # time.time(), moved by hand
    wake: Calls
    retry_soon: Calls
    intake: FakeIntake
    scheduler: FakeScheduler
    running: FakeRunning
    ending: FakeEnding
    fleet: FakeFleet
    recovery: FakeRecovery
    stops: FakeStops
    holds: FakeHolds
    dependencies: FakeDependencies

    @property
    def spool(self) -> Spool:
        return self.ctx.spool

    @property
    def inbox(self) -> Path:
        return self.ctx.settings.inbox

    def sidecar(self, job_id: str) -> Sidecar | None:
        return self.ctx.outbox.read(job_id)


def make_rig(tmp_path: Path, spool: type[Spool] = Spool, outbox: type[Outbox] = Outbox,
             **settings: Any) -> Rig:
    """A Context on ``tmp_path`` (settle_s 0, no progress throttle unless set), its folders
    made, fakes in every stage slot."""
    values: dict[str, Any] = {"settle_s": 0, "progress_interval_s": 0, "stop_grace": 1}
    values.update(settings)
    config = Settings(inbox=tmp_path / "inbox", outbox=tmp_path / "outbox",
                      frames=tmp_path / "frames", models=tmp_path / "models", node=NODE,
                      **values)
    the_spool, the_outbox = spool(config.inbox, NODE), outbox(config.outbox)
    the_spool.ensure_folders()
    the_outbox.ensure_folder()
    clock, wall, wake, retry_soon = Clock(), Clock(), Calls(), Calls()
    wall.now = time.time()
    ctx = Context(config, registry(), the_spool, the_outbox, clock, wall, wake=wake,
                  retry_soon=retry_soon)
    rig = Rig(ctx, clock, wall, wake, retry_soon, FakeIntake(ctx), FakeScheduler(),
              FakeRunning(ctx), FakeEnding(), FakeFleet(), FakeRecovery(), FakeStops(ctx),
              FakeHolds(), FakeDependencies())
    ctx.intake, ctx.scheduler, ctx.running = rig.intake, rig.scheduler, rig.running
    ctx.ending, ctx.fleet, ctx.recovery, ctx.stops = (rig.ending, rig.fleet, rig.recovery,
                                                      rig.stops)
    ctx.holds, ctx.dependencies = rig.holds, rig.dependencies
    ctx.hooks = FakeHooks()
    return rig


# --- job files and jobs ----------------------------------------------------------------------


def write_job(folder: Path, job_id: str, body: dict[str, Any] | str | None = None,
              suffix: str = ".json") -> Path:
    """A job file in ``folder``, written under a dot-name and renamed into place."""
    body = QUICK_JOB if body is None else body
    text = body if isinstance(body, str) else json.dumps(body)
    folder.mkdir(parents=True, exist_ok=True)
    tmp, path = folder / f".{job_id}.tmp", folder / f"{job_id}{suffix}"
    tmp.write_text(text)
    os.rename(tmp, path)
    return path


def job_of(ctx: Context, path: Path) -> Job:
    """The Job a stage holds for the valid job file at ``path``, as intake makes it."""
    read = read_job(path, ctx.settings.max_job_bytes, ctx.registry, time.time())
    assert read.error is None, read.error
    job_id = path.name.rpartition(".")[0]
    job = Job(job_id, *place(path), read.spec, read.plugin, read.data,
              first_sidecar(job_id, read.document, ctx.node), read.mtime_ns)
    return job


def bare_job(ctx: Context, job_id: str, plugin: str = "scripted", priority: int = 0,
             submitted_ns: int = 0, not_before: datetime | None = None) -> Job:
    """A queued job with no file: enough for the scheduler."""
    spec = JobSpec(type=plugin, priority=priority, not_before=not_before)
    loaded = ctx.registry.get(plugin)
    assert loaded is not None
    return Job(job_id, ctx.spool.queued, ".json", spec, loaded, {},
               first_sidecar(job_id, None, ctx.node), submitted_ns)


def sidecar_in(state: JobState, job_id: str, node: str = NODE, attempt: int = 1,
               started: bool = True) -> Sidecar:
    """A sidecar of ``job_id`` in ``state``, as one of its runs wrote it."""
    sidecar = first_sidecar(job_id, QUICK_JOB, node)
    return sidecar.model_copy(update={
        "state": state, "attempt": attempt,
        "started_at": sidecar.created_at if started else None,
        "finished_at": sidecar.created_at if state.is_terminal else None})


async def eventually(condition: Callable[[], Any], timeout_s: float = 5.0,
                     what: str = "condition") -> Any:
    """As tests.helpers.wait_for, on a running loop: its timers and tasks go on meanwhile."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(0.01)
    return value
