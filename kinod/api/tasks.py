"""``/api/v1/generator/...``: the seed's endpoints, and the rest of a task's life."""

from __future__ import annotations

import json
import os
import stat
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse
from pydantic import ValidationError

from kinod.api.errors import ApiError, fields_of
from kinod.api.index import BadCursor
from kinod.api.jobs import Jobs, unavailable
from kinod.api.schemas import (
    ERRORS,
    ControlAccepted,
    JobId,
    OutputFile,
    TaskBatch,
    TaskCreate,
    TaskPage,
)
from kinod.chunks import ChunkError, split_job
from kinod.models import JobState, Sidecar

PREFIX = "/api/v1/generator"
MAX_OUTPUTS = 10_000  # files listed for one job

router = APIRouter(prefix=PREFIX, responses=ERRORS)


def _jobs(request: Request) -> Jobs:
    return request.app.state.api.jobs


def _json(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    # Sidecars are kept as JSON already: sent as they are, not parsed and dumped again.
    return Response(body, status_code=status, media_type="application/json", headers=headers)


@router.get("/plugins", tags=["plugins"])
async def list_plugins(request: Request) -> Response:
    """Each plugin's `get_plugin_info()`, as the seed lists them (its `name` is the one a
    task's `type` names, where the plugin gives none)."""
    registry = _jobs(request).registry
    infos = [{"name": name, **plugin.info} for name, plugin in sorted(registry.plugins.items())]
    # A plugin's info is the plugin's to fill: whatever JSON cannot hold is shown as text.
    return _json(json.dumps(infos, default=str, allow_nan=False).encode())


@router.post("/tasks", status_code=201, tags=["tasks"], response_model=Sidecar | TaskBatch,
             response_model_by_alias=True)
async def create_task(task: TaskCreate, request: Request,
                      response: Response) -> Sidecar | TaskBatch:
    """Submit a task: `{name, type, data}` plus any job-file key, and optionally `id` and
    `start`. Without `id` the next free integer is given (`"1"`, `"2"`, ...). Without
    `"start": true` the task is held until `POST /tasks/{id}/generate`. Answers the sidecar
    the task starts with; the node that takes it in writes the real one. With `chunk`, one
    task per chunk of `data.frames` (and the `then` task after them), answered as a list."""
    if task.chunk is not None or task.then is not None:
        return _create_chunks(task, _jobs(request))
    sidecar = _jobs(request).create(task)
    response.headers["Location"] = f"{PREFIX}/tasks/{sidecar.id}"
    return sidecar


def _create_chunks(task: TaskCreate, jobs: Jobs) -> TaskBatch:
    """Every piece is checked, and none may be queued or running, before any is written."""
    if task.chunk is None:
        raise ApiError.invalid({"then": "only with chunk: the task run after the chunks"})
    document = task.model_dump(mode="json", exclude_unset=True, exclude={"id", "start", "chunk"})
    if task.id is not None:
        job_id = task.id
    else:
        try:
            job_id = jobs.ids.allocate()
        except OSError as exc:
            raise unavailable(exc, "cannot take a new id in the spool") from None
    try:
        pieces = split_job(job_id, document, task.chunk)
    except ChunkError as exc:
        raise ApiError.invalid({exc.field: exc.message}) from None
    keep = {key: getattr(task, key) for key in ("start", "hold") if key in task.model_fields_set}
    tasks: list[TaskCreate] = []
    for piece_id, piece in pieces:
        where = "then." if piece_id == job_id else ""
        try:
            tasks.append(TaskCreate.model_validate({**piece, **keep, "id": piece_id}))
        except ValidationError as exc:
            raise ApiError.invalid(fields_of(exc, prefix=where.rstrip("."))) from None
        fields = jobs.plugin_fields(tasks[-1].type, tasks[-1].data)
        if fields:
            raise ApiError.invalid({f"{where}{key}": text for key, text in fields.items()})
        entry = jobs.current(piece_id)
        if entry is not None and not JobState(entry.state).is_terminal:
            raise ApiError(409, "conflict", f"job {piece_id} is {entry.state}; a new run of it "
                           "can start once it has ended", {"id": "in use"})
    return TaskBatch(tasks=[jobs.create(piece) for piece in tasks])


@router.get("/tasks", tags=["tasks"], response_model=TaskPage)
async def list_tasks(
        request: Request,
        limit: Annotated[int, Query(ge=1, le=1000, description="tasks per page")] = 100,
        cursor: Annotated[str | None, Query(max_length=1000,
                                            description="`next_cursor` of the page before")
                          ] = None,
        state: Annotated[list[JobState] | None, Query(description="only these states")
                         ] = None,
        type: Annotated[str | None, Query(max_length=1000,  # noqa: A002 - the API's word
                                          description="only this plugin's")] = None,
) -> Response:
    """Sidecars, newest first (by `created_at`), paged."""
    states = [s.value for s in state] if state else None
    try:
        page, next_cursor = request.app.state.api.index.page(limit, cursor, states, type)
    except BadCursor as exc:
        raise ApiError(400, "bad_request", f"cursor: {exc}", {"cursor": str(exc)}) from None
    tail = b'"' + next_cursor.encode() + b'"' if next_cursor else b"null"
    return _json(b'{"tasks":[' + b",".join(e.json for e in page) + b'],"next_cursor":'
                 + tail + b"}")


@router.get("/tasks/{id}", tags=["tasks"], response_model=Sidecar)
async def get_task(id: JobId, request: Request) -> Response:  # noqa: A002
    """The task's sidecar."""
    entry = _jobs(request).current(id)
    if entry is None:
        raise ApiError(404, "not_found", f"no task {id}")
    return _json(entry.json)


def _control(action: str, summary: str):
    async def control(id: JobId, request: Request) -> ControlAccepted:  # noqa: A002
        return _jobs(request).control(id, action)

    control.__doc__ = summary
    control.__name__ = f"{action}_task"
    return control


router.add_api_route(
    "/tasks/{id}/generate", _control("release", "Start a held task (`inbox/<id>.release`)."),
    methods=["POST"], status_code=202, tags=["tasks"], response_model=ControlAccepted)
router.add_api_route(
    "/tasks/{id}/stop", _control("stop", "Stop a task: a held or queued one never starts, a "
                                 "running one is stopped (`inbox/<id>.stop`)."),
    methods=["POST"], status_code=202, tags=["tasks"], response_model=ControlAccepted)
router.add_api_route(
    "/tasks/{id}/hold", _control("hold", "Hold a queued task until it is released "
                                 "(`inbox/<id>.hold`); a running one is not affected."),
    methods=["POST"], status_code=202, tags=["tasks"], response_model=ControlAccepted)


@router.get("/tasks/{id}/log", tags=["tasks"], response_class=FileResponse,
            responses={200: {"content": {"text/plain": {}}}})
async def task_log(id: JobId, request: Request) -> Response:  # noqa: A002
    """The job's own log (`outbox/<id>.log`), as text."""
    path = request.app.state.api.settings.outbox / f"{id}.log"
    if not _regular_file(str(path)):
        raise ApiError(404, "not_found", f"no log for task {id}")
    return FileResponse(path, media_type="text/plain; charset=utf-8")


@router.get("/tasks/{id}/outputs", tags=["outputs"], response_model=list[OutputFile])
def task_outputs(id: JobId, request: Request) -> list[OutputFile]:  # noqa: A002
    """The files in `data/frames/<id>/`, by path within it."""
    folder = request.app.state.api.settings.frames / id
    if not os.path.isdir(folder) or os.path.islink(folder):
        if _jobs(request).current(id) is None:
            raise ApiError(404, "not_found", f"no task {id}")
        return []
    found: list[OutputFile] = []
    for root, folders, names in os.walk(folder):
        folders[:] = sorted(f for f in folders if not os.path.islink(os.path.join(root, f)))
        for name in sorted(names):
            path = os.path.join(root, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                found.append(OutputFile(path=os.path.relpath(path, folder), size=st.st_size,
                                        modified_at=st.st_mtime))
            if len(found) >= MAX_OUTPUTS:
                return found
    return found


@router.get("/tasks/{id}/outputs/{path:path}", tags=["outputs"], response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}}}})
async def task_output(id: JobId, path: str, request: Request) -> Response:  # noqa: A002
    """One file of `data/frames/<id>/`; never one outside it."""
    parts = path.split("/")
    if any(part in ("", ".", "..") or not part.isprintable() for part in parts):
        raise ApiError(400, "bad_request", "path: must be a relative path inside the task's "
                       "outputs", {"path": "must be a relative path inside the task's outputs"})
    base = os.path.realpath(request.app.state.api.settings.frames / id)
    target = os.path.realpath(os.path.join(base, *parts))
    if os.path.commonpath([base, target]) != base or not _regular_file(target):
        raise ApiError(404, "not_found", f"task {id} has no output {path}")
    return FileResponse(target)


def _regular_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except (OSError, ValueError):
        return False
