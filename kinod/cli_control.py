"""The ``kinod`` commands that drop control files into the inbox: ``stop``, ``hold``,
``release``, ``pause`` and ``resume``. ``kinod.cli`` builds the parser and adds them with
``add_control_commands``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from kinod.cli import (
    EXIT_FAILED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    _inbox,
    _read_sidecar,
    _settings,
    _wait_for,
    err,
    out,
)
from kinod.config import Settings
from kinod.control import drop_control, pause, resume
from kinod.errors import ConfigError
from kinod.intake import inbox_has_job
from kinod.models import JobState, Sidecar, is_valid_job_id

# kinod.cli's build_parser(): adds one command (name, its function, help, description).
AddCommand = Callable[..., argparse.ArgumentParser]


def add_control_commands(command: AddCommand) -> None:
    """Add the control commands to the parser, in the order ``kinod --help`` lists them."""
    p = command("stop", cmd_stop, "ask a queued or running job to stop",
                "Drop <inbox>/<ID>.stop: a queued job never starts, a running one is stopped.")
    p.add_argument("id", metavar="ID", help="the job's id")
    p.add_argument("--wait", action="store_true",
                   help="wait until the job has ended; exit 1 unless it ended stopped")

    p = command("hold", cmd_hold, "hold a queued job",
                "Drop <inbox>/<ID>.hold: a queued job is held (state held) until released; "
                "a running job is not affected.")
    p.add_argument("id", metavar="ID", help="the job's id")

    p = command("release", cmd_release, "release a held job",
                "Drop <inbox>/<ID>.release: a held job (hold: true, or held by `kinod hold`) "
                "is queued.")
    p.add_argument("id", metavar="ID", help="the job's id")

    for name, func, verb in (("pause", cmd_pause, "pause"), ("resume", cmd_resume, "resume")):
        p = command(name, func, f"{verb} the farm, or one node",
                    "Make <inbox>/.pause (or .pause.NAME): no new job starts while it exists; "
                    "running jobs go on to their end." if name == "pause" else
                    "Remove <inbox>/.pause (or .pause.NAME): queued jobs start again.")
        p.add_argument("--node", metavar="NAME", help=f"{verb} only this node")


def _control_target(args: argparse.Namespace) -> tuple[Settings, Path, Sidecar | None]:
    """The settings, the inbox and the job's sidecar for a command that drops a control
    file. A bad id is a bad command line: ConfigError, exit status 2."""
    settings = _settings(args)
    if not is_valid_job_id(args.id):
        raise ConfigError(f"{args.id!r} is not a valid job id")
    return settings, _inbox(settings), _read_sidecar(settings, args.id)


def cmd_stop(args: argparse.Namespace) -> int:
    settings, inbox, current = _control_target(args)
    job_id = args.id
    waiting_in_inbox = inbox_has_job(inbox, job_id)
    if (current is None or current.state.is_terminal) and not waiting_in_inbox:
        state = f"already {current.state}" if current else "unknown"
        err.print(f"job {job_id} is not queued or running ({state})", markup=False)
        return EXIT_NOT_FOUND
    if not _drop_control(inbox, job_id, "stop"):
        return EXIT_FAILED
    out.print(f"stop requested for {job_id}", markup=False)
    if args.wait:
        previous = current.created_at.isoformat() if current and waiting_in_inbox else None
        return EXIT_OK if _wait_for(settings, {job_id: previous}, want="stopped") else EXIT_FAILED
    return EXIT_OK


def cmd_hold(args: argparse.Namespace) -> int:
    return _ask(args, "hold", "held", {JobState.QUEUED})


def cmd_release(args: argparse.Namespace) -> int:
    return _ask(args, "release", "released", {JobState.HELD})


def _ask(args: argparse.Namespace, kind: str, done: str, states: set[JobState]) -> int:
    """Drop ``<id>.<kind>`` for a job in one of ``states`` (or still in the inbox)."""
    _, inbox, current = _control_target(args)
    job_id = args.id
    if (current is None or current.state not in states) and not inbox_has_job(inbox, job_id):
        state = current.state if current else "unknown"
        wanted = " or ".join(sorted(states))
        err.print(f"job {job_id} is not {wanted} ({state})", markup=False)
        return EXIT_NOT_FOUND
    if not _drop_control(inbox, job_id, kind):
        return EXIT_FAILED
    out.print(f"{job_id}: {kind} requested (it is {done} once a daemon has seen it)",
              markup=False)
    return EXIT_OK


def _drop_control(inbox: Path, job_id: str, kind: str) -> bool:
    try:
        drop_control(inbox, job_id, kind)
    except OSError as exc:
        err.print(f"cannot ask {job_id} to {kind}: cannot write into the inbox {inbox}: "
                  f"{exc.strerror or exc}", markup=False)
        return False
    return True


def cmd_pause(args: argparse.Namespace) -> int:
    settings = _settings(args)
    try:
        path = pause(_inbox(settings), args.node)
    except OSError as exc:
        err.print(f"cannot pause: {exc.strerror or exc}", markup=False)
        return EXIT_FAILED
    what = f"node {args.node}" if args.node else "the farm"
    out.print(f"{what} paused ({path}); running jobs go on to their end", markup=False)
    return EXIT_OK


def cmd_resume(args: argparse.Namespace) -> int:
    settings = _settings(args)
    what = f"node {args.node}" if args.node else "the farm"
    try:
        was_paused = resume(_inbox(settings), args.node)
    except OSError as exc:
        err.print(f"cannot resume: {exc.strerror or exc}", markup=False)
        return EXIT_FAILED
    out.print(f"{what} resumed" if was_paused else f"{what} was not paused", markup=False)
    return EXIT_OK
