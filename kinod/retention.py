"""Retention (``keep_ended_days``): the one place where kinod deletes what a job left.

A job is pruned when its sidecar says it ended (succeeded, failed or stopped) longer ago
than ``keep_ended_days``, nothing of that id waits in the inbox or the spool (a new run),
and no job still to run lists it in ``after``. Its files go in an order that a crash at
any point leaves harmless, the sidecar last: as long as the sidecar is there, the job
still reads as ended (dependencies on it hold), and the next pass finishes the work.

    data/frames/<id>/            only with keep_ended_frames: false
    outbox/archive/<id>/         earlier runs' sidecars and logs
    inbox/.kinod/done/<id>/      the job files of every run
    outbox/<id>.log              the latest run's log
    outbox/<id>.json             the latest run's sidecar: last
"""

from __future__ import annotations

import contextlib
import os
import shutil
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from loguru import logger
from pydantic import AwareDatetime, BaseModel, ConfigDict, ValidationError

from kinod.atomic_files import read_whole, rename_noreplace
from kinod.config import Settings
from kinod.errors import InvalidJob
from kinod.intake import InboxName, inbox_has_job, read_job_bytes
from kinod.job_document import parse_document
from kinod.models import JobState, is_valid_job_id
from kinod.spool import Spool

PRUNING_SUFFIX = ".pruning"  # a sidecar being removed, under a hidden name


class _Seen(BaseModel):
    """What retention reads of a sidecar (the rest is ignored, so reading is cheap)."""

    model_config = ConfigDict(extra="ignore")

    id: str
    state: JobState
    created_at: AwareDatetime
    finished_at: AwareDatetime | None = None
    task: dict[str, Any] | None = None

    def same_run(self, other: _Seen) -> bool:
        return (self.id, self.state, self.created_at, self.finished_at) == (
            other.id, other.state, other.created_at, other.finished_at)


BATCH = 200  # jobs pruned per call: the daemon calls again while a call prunes a full batch


def prune_ended(settings: Settings, now: datetime, batch: int = BATCH) -> int:
    """Prune up to ``batch`` jobs that ended before ``now - keep_ended_days``, oldest first;
    returns how many (a full batch: there may be more). Nothing with keep_ended_days unset.
    Reads every sidecar in the outbox: run it off the event loop."""
    if settings.keep_ended_days is None:
        return 0
    cutoff = now - timedelta(days=settings.keep_ended_days)
    candidates, waiting, wanted = _survey(settings.outbox, cutoff)
    spool = Spool(settings.inbox, str(settings.node))
    wanted |= _wanted_by_files(settings, spool, waiting)
    pruned = 0
    for _, job_id, seen in sorted(candidates, key=lambda c: (c[0], c[1])):
        if pruned >= batch:
            break
        if job_id in wanted or _active(settings, spool, job_id):
            continue
        if _prune(settings, spool, seen, now):
            pruned += 1
    return pruned


def _survey(outbox: Path, cutoff: datetime
            ) -> tuple[list[tuple[datetime, str, _Seen]], set[str], set[str]]:
    """The jobs ended before ``cutoff``; the ids of jobs still to run or running; and the
    ids those list in ``after``."""
    candidates: list[tuple[datetime, str, _Seen]] = []
    waiting: set[str] = set()
    wanted: set[str] = set()
    try:
        with os.scandir(outbox) as entries:
            names = [e.name for e in entries if e.is_file(follow_symlinks=False)]
    except FileNotFoundError:
        return candidates, waiting, wanted
    for name in [n for n in names if n.startswith(".") and n.endswith(".json" + PRUNING_SUFFIX)]:
        # A crash between setting a sidecar aside and removing it: it goes back, to be
        # judged again, unless a newer sidecar took its place.
        if _put_back(outbox / name, outbox / name[1:-len(PRUNING_SUFFIX)]):
            names.append(name[1:-len(PRUNING_SUFFIX)])
    for name in dict.fromkeys(names):
        if name.startswith(".") or not name.endswith(".json"):
            continue
        job_id = name[:-len(".json")]
        seen = _read_sidecar(outbox / name)
        if seen is None or seen.id != job_id or not is_valid_job_id(job_id):
            continue  # not kinod's, or being replaced: left alone
        if not seen.state.is_terminal:
            waiting.add(job_id)
            wanted.update(_after(seen.task))
        elif seen.finished_at is not None and seen.finished_at < cutoff:
            candidates.append((seen.finished_at, job_id, seen))
    return candidates, waiting, wanted


def _wanted_by_files(settings: Settings, spool: Spool, waiting: set[str]) -> set[str]:
    """What the job files not yet taken in (or taken in, their sidecar not yet written)
    list in ``after``: their ids may not have a sidecar that says so yet."""
    paths: list[Path] = []
    for folder in (settings.inbox, spool.queued,
                   *(spool.running_root / node for node in _folders(spool.running_root))):
        for name in _names(folder):
            kind = InboxName.of(name)
            if kind.kind == "job" and kind.job_id not in waiting:
                paths.append(folder / name)
    wanted: set[str] = set()
    for path in paths:
        try:
            raw, _ = read_job_bytes(path, settings.max_job_bytes)
            wanted.update(_after(parse_document(raw, path.suffix)))
        except (InvalidJob, OSError):
            continue  # unreadable: it will fail its checks, and wait on nothing
    return wanted


def _after(document: dict[str, Any] | None) -> list[str]:
    after = (document or {}).get("after")
    if not isinstance(after, list):
        return []
    return [job_id for job_id in after if isinstance(job_id, str)]


def _active(settings: Settings, spool: Spool, job_id: str) -> bool:
    """A file of this id waits in the inbox or the spool: a new run, which must find the
    last run's sidecar and log where they are."""
    return inbox_has_job(settings.inbox, job_id) or spool.holds(job_id)


def _prune(settings: Settings, spool: Spool, seen: _Seen, now: datetime) -> bool:
    job_id = seen.id
    removed: list[str] = []
    try:
        if not settings.keep_ended_frames:
            _remove_tree(settings.frames / job_id, removed)
        _remove_tree(settings.outbox / "archive" / job_id, removed)  # earlier runs
        _remove_tree(spool.done / job_id, removed)  # every run's job file
        # Looked at again just before the latest run's files: a new run may have come in.
        if _active(settings, spool, job_id):
            _log(job_id, seen, now, removed, "stopped: a new run of it came in")
            return False
        log = settings.outbox / f"{job_id}.log"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(log)
            removed.append(str(log))
        if not _remove_sidecar(settings.outbox, seen):
            _log(job_id, seen, now, removed, "stopped: its sidecar changed")
            return False
        removed.append(str(settings.outbox / f"{job_id}.json"))
    except OSError as exc:
        _log(job_id, seen, now, removed, f"stopped: {exc}")
        return False
    _log(job_id, seen, now, removed, None)
    return True


def _remove_sidecar(outbox: Path, seen: _Seen) -> bool:
    """Remove the sidecar if it is still the one judged: it is renamed aside first, and put
    back if a new run wrote it meanwhile."""
    path = outbox / f"{seen.id}.json"
    aside = outbox / f".{seen.id}.json{PRUNING_SUFFIX}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return True  # removed by someone else: nothing left to remove
    now_there = _read_sidecar(aside)
    if now_there is not None and now_there.same_run(seen):
        os.unlink(aside)
        return True
    _put_back(aside, path)
    return False


def _put_back(aside: Path, path: Path) -> bool:
    """Put a sidecar set aside back; False (and it goes) if a newer one took its place."""
    try:
        rename_noreplace(aside, path)
        return True
    except FileExistsError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(aside)  # a newer sidecar is there: the one set aside is older
    except FileNotFoundError:
        pass
    return False


def _remove_tree(path: Path, removed: list[str]) -> None:
    """Remove a job's folder without following any link in it; a link in the folder's
    place is removed itself, never what it points to."""
    try:
        if path.is_symlink() or not path.is_dir():
            os.unlink(path)
        else:
            shutil.rmtree(path)
    except FileNotFoundError:
        return
    removed.append(str(path))


def _log(job_id: str, seen: _Seen, now: datetime, removed: list[str],
         stopped: str | None) -> None:
    # The daemon's log only: a line bound to the job would make its log file again.
    ended = seen.finished_at or now
    days = (now - ended).total_seconds() / 86400
    gone = ", ".join(removed) or "nothing"
    if stopped is None:
        logger.info("retention: pruned job {} ({} {:.1f} days ago): removed {}", job_id,
                    seen.state.value, days, gone)
    else:
        logger.warning("retention: job {} ({} {:.1f} days ago): removed {}; {}", job_id,
                       seen.state.value, days, gone, stopped)


def _read_sidecar(path: Path) -> _Seen | None:
    try:
        return _Seen.model_validate_json(read_whole(path))
    except (OSError, ValidationError):
        return None


def _names(folder: Path) -> list[str]:
    try:
        with os.scandir(folder) as entries:
            return [e.name for e in entries if not e.name.startswith(".")]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _folders(folder: Path) -> list[str]:
    try:
        with os.scandir(folder) as entries:
            return [e.name for e in entries if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []
