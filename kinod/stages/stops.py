"""Stop requests: an ``inbox/<id>.stop`` file. A running job is asked to stop; a waiting
or held one ends as stopped before it starts; a request for no job this node or another holds
is removed."""

from __future__ import annotations

import os
from pathlib import Path

from loguru import logger

from kinod.atomic_files import rename_noreplace
from kinod.errors import JobStopped
from kinod.intake import inbox_has_job
from kinod.models import JobState
from kinod.stages.context import Context
from kinod.stages.job import first_sidecar, unlink


class Stops:
    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    def look_for(self, job_id: str) -> None:
        """Act on ``<id>.stop`` if it is there: looked for by name, where no event or listing
        of the inbox would show it."""
        if os.path.lexists(stop := self._ctx.stop_file(job_id)):
            self.on_stop_file(Path(stop), job_id)

    def look_for_running(self) -> None:
        """``look_for`` the stop files of the jobs running here (a poll that lists no inbox)."""
        for job in self._ctx.running.jobs():
            if not job.stop_requested:
                self.look_for(job.id)

    def on_stop_file(self, path: Path, job_id: str) -> None:
        ctx = self._ctx
        path = _named_as_looked_for(path, job_id)
        if path is None:
            return  # another node renamed it first: it acts on it
        job = ctx.scheduler.get(job_id)
        if job is None and (held := ctx.spool.claim_held(job_id)) is not None:
            sidecar = ctx.outbox.read(job_id) or first_sidecar(job_id, None, ctx.node)
            ctx.ending.end(job_id, held, sidecar, JobState.STOPPED,
                           error=JobStopped("stopped on request while held"))
            return
        if job is None:
            if inbox_has_job(ctx.settings.inbox, job_id) or ctx.spool.holds(job_id):
                return  # not taken in yet, or another node's: acted on where it runs
            logger.warning("{}: no queued or running job {}; stop request removed", path, job_id)
            unlink(path)
            return
        if job.stop_requested:
            return
        if ctx.ending.is_unrecorded(job_id):
            # Its run has ended, its end not yet recorded: that end stands. Should it be a
            # retry, the next run is stopped as it starts; a final end removes the .stop.
            job.stop_requested = True
            return
        if ctx.running.is_running(job_id):
            ctx.running.stop(job)
            return  # the .stop file goes once the job has ended
        ctx.ending.end_waiting(job, JobState.STOPPED,
                               JobStopped("stopped on request before it started"))


def _named_as_looked_for(path: Path, job_id: str) -> Path | None:
    """``<id>.STOP`` (the suffix in any case) renamed ``<id>.stop``, the one name the other
    stages look for and remove when the job ends. None if it is gone meanwhile."""
    if path.name.endswith(".stop"):
        return path
    canonical = path.with_name(f"{job_id}.stop")
    try:
        rename_noreplace(path, canonical)
    except FileExistsError:  # asked twice: the one already there stands
        unlink(path)
    except FileNotFoundError:
        return None
    return canonical
