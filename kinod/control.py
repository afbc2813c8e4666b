"""Control files in the inbox, as the CLI and the HTTP API drop them: ``<id>.stop``,
``<id>.hold`` and ``<id>.release`` ask something of one job; ``.pause`` pauses the farm and
``.pause.<node>`` one node (SPEC §4, §8). Each is an empty file; making one twice is one
request."""

from __future__ import annotations

import os
from pathlib import Path

JOB_CONTROLS = ("stop", "hold", "release")
PAUSE_NAME = ".pause"


def drop_control(inbox: Path, job_id: str, kind: str) -> Path:
    """Make ``inbox/<job_id>.<kind>``. Never through a link left at that name: it would
    make a file where the link points. Raises OSError if the inbox refuses it."""
    if kind not in JOB_CONTROLS:
        raise ValueError(f"no control file .{kind}")
    path = inbox / f"{job_id}.{kind}"
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666))
    return path


def pause_file(inbox: Path, node: str | None = None) -> Path:
    """``inbox/.pause`` (the whole farm) or ``inbox/.pause.<node>`` (one node)."""
    return inbox / (PAUSE_NAME if node is None else f"{PAUSE_NAME}.{node}")


def pause(inbox: Path, node: str | None = None) -> Path:
    path = pause_file(inbox, node)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666))
    return path


def resume(inbox: Path, node: str | None = None) -> bool:
    """Remove the pause file; False if there was none."""
    try:
        os.unlink(pause_file(inbox, node))
    except FileNotFoundError:
        return False
    return True


def paused_by(inbox: Path, node: str) -> Path | None:
    """The pause file that pauses ``node`` (the farm's first), or None."""
    for path in (pause_file(inbox), pause_file(inbox, node)):
        if os.path.lexists(path):
            return path
    return None
