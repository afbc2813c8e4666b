"""What the API writes: job files and control files, into the inbox only, atomically.

A job file is written under a name kinod ignores, then renamed into place, never over
another file (as ``kinod submit`` does); a control file is an empty ``<id>.<action>``.
Every check the daemon makes of a job file is made before it is written, so a request the
API accepts is a job the daemon can run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import ValidationError

from kinod.api.errors import ApiError, fields_of
from kinod.api.ids import IdAllocator
from kinod.api.index import Entry, load_entry
from kinod.api.schemas import ControlAccepted, TaskCreate
from kinod.atomic_files import new_temporary, rename_noreplace
from kinod.control import drop_control
from kinod.errors import InvalidJob
from kinod.intake import check_job, inbox_has_job
from kinod.job_document import parse_document
from kinod.models import JobState, Sidecar, utc_now
from kinod.params import check_data
from kinod.plugins.plugin_loader import PluginRegistry
from kinod.spool import Spool

WAITING = "waiting in the inbox for a node to take it in"


def unavailable(exc: OSError, what: str) -> ApiError:
    """The folders refused a write or a read: the farm's trouble, not the request's."""
    return ApiError(503, "unavailable", f"{what}: {exc.strerror or exc}")


class Jobs:
    def __init__(self, inbox: Path, outbox: Path, max_job_bytes: int,
                 registry: PluginRegistry, ids: IdAllocator) -> None:
        self.inbox = inbox
        self.outbox = outbox
        self._outbox = str(outbox)
        self.max_job_bytes = max_job_bytes
        self.registry = registry
        self.ids = ids
        # Only to ask whether a job's file is in the spool; this client runs nothing.
        self._spool = Spool(inbox, "api")

    # --- creating ----------------------------------------------------------------------

    def create(self, task: TaskCreate) -> Sidecar:
        """Check the task as the daemon will, write it as ``inbox/<id>.json``, and answer
        the sidecar it starts with (held, or queued with ``start``)."""
        hold = self._hold(task)
        self._check_plugin(task)
        document = task.model_dump(mode="json", exclude_unset=True, exclude={"id", "start"})
        document["hold"] = hold
        raw = json.dumps(document, ensure_ascii=False, allow_nan=False).encode()
        if len(raw) > self.max_job_bytes:
            raise ApiError(413, "too_large", f"the job file would be {len(raw)} bytes, over "
                           f"max_job_bytes ({self.max_job_bytes})")
        try:
            check_job(parse_document(raw, ".json"), self.registry)
        except InvalidJob as exc:  # nesting, size: what only the whole document shows
            raise ApiError.invalid({"body": exc.message}) from None
        job_id = task.id if task.id is not None else self._new_id()
        if task.id is not None:
            self._check_free(job_id)
        self._write(raw, job_id)
        now = utc_now()
        return Sidecar(id=job_id, name=task.name, type=task.type,
                       state=JobState.HELD if hold else JobState.QUEUED,
                       message=WAITING, created_at=now, updated_at=now, task=document)

    @staticmethod
    def _hold(task: TaskCreate) -> bool:
        if "hold" not in task.model_fields_set:
            return not task.start
        if task.hold and task.start:
            raise ApiError.invalid({"start": "cannot be true when hold is true",
                                    "hold": "cannot be true when start is true"})
        return task.hold

    def _check_plugin(self, task: TaskCreate) -> None:
        fields = self.plugin_fields(task.type, task.data)
        if fields:
            raise ApiError.invalid(fields)

    def plugin_fields(self, plugin_name: str, data: dict) -> dict[str, str]:
        """What is wrong with the plugin a task names, or with its data; empty if nothing."""
        plugin = self.registry.get(plugin_name)
        if plugin is None:
            known = ", ".join(sorted(self.registry.plugins)) or "none"
            broken = " (it failed to load)" if plugin_name in self.registry.errors else ""
            return {"type": f"unknown plugin {plugin_name!r}{broken}; available: {known}"}
        if plugin.params_model is None:
            return {}
        try:
            check_data(plugin.params_model, data)
        except ValidationError as exc:
            return fields_of(exc, prefix="data")
        except Exception as exc:  # noqa: BLE001 - a declaration the load-time checks let through
            return {"data": f"plugin {plugin_name!r} cannot check its parameters: "
                            f"{type(exc).__name__}: {exc}"}
        return {}

    def _new_id(self) -> str:
        try:
            return self.ids.allocate()
        except OSError as exc:
            raise unavailable(exc, "cannot take a new id in the spool") from None

    def _check_free(self, job_id: str) -> None:
        entry = self.current(job_id)
        if entry is not None and not JobState(entry.state).is_terminal:
            raise ApiError(409, "conflict", f"job {job_id} is {entry.state}; a new run of it "
                           "can start once it has ended", {"id": "in use"})

    def _write(self, raw: bytes, job_id: str) -> None:
        dst = self.inbox / f"{job_id}.json"
        try:
            if inbox_has_job(self.inbox, job_id):
                raise FileExistsError
            fd, tmp = new_temporary(str(self.inbox), dst.name, 0o666)  # the umask decides
            try:
                with os.fdopen(fd, "wb") as tmp_file:
                    tmp_file.write(raw)
                rename_noreplace(Path(tmp), dst)
            finally:
                Path(tmp).unlink(missing_ok=True)
        except FileExistsError:
            raise ApiError(409, "conflict", f"job {job_id} is already in the inbox, not yet "
                           "taken in by a node", {"id": "in use"}) from None
        except OSError as exc:
            raise unavailable(exc, f"cannot write into the inbox {self.inbox}") from None

    # --- asking a job something ----------------------------------------------------------

    def current(self, job_id: str) -> Entry | None:
        """The job's sidecar as it is on disk now (the index may be a moment behind)."""
        return load_entry(self._outbox, job_id)[1]

    def control(self, job_id: str, action: str) -> ControlAccepted:
        """Drop ``inbox/<id>.<action>`` (release, stop or hold) where it means something."""
        entry = self.current(job_id)
        try:
            waiting = inbox_has_job(self.inbox, job_id)
        except OSError as exc:
            raise unavailable(exc, f"cannot read the inbox {self.inbox}") from None
        state = JobState(entry.state) if entry is not None else None
        if waiting and (state is None or state.is_terminal):
            state = None  # the request is for the run waiting in the inbox
        elif state is None and not self._spool.holds(job_id):
            # (Its file in the spool and no sidecar yet: a daemon is taking it in this very
            # moment, and sees the control file once it has.)
            raise ApiError(404, "not_found", f"no job {job_id}")
        if state is not None and state.is_terminal:
            raise ApiError(409, "conflict", f"job {job_id} has ended ({state})")
        if action == "hold" and state is JobState.RUNNING:
            raise ApiError(409, "conflict", f"job {job_id} is running; only a queued job "
                           "can be held")
        needed = (state is None or (action == "release" and state is JobState.HELD)
                  or (action == "hold" and state is JobState.QUEUED) or action == "stop")
        if needed:
            try:
                drop_control(self.inbox, job_id, action)
            except OSError as exc:
                raise unavailable(exc, f"cannot write into the inbox {self.inbox}") from None
        return ControlAccepted(id=job_id, action=action, state=state)
