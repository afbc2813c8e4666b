"""The dashboard (``GET /``): its static page, and the few endpoints only it needs.

The page is plain HTML, CSS and JavaScript shipped in ``kinod/api/static/``, loaded from
this API alone (its Content-Security-Policy allows nothing else). Everything it shows comes
from the API: ``/api/v1/dashboard/jobs`` (every job in one compact table, for a first
paint that does not wait on 10,000 sidecars), then ``/api/v1/events`` as jobs change.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field, ValidationError

from kinod.api.errors import ApiError, fields_of
from kinod.api.index import Entry, FileKey, OutboxIndex
from kinod.api.schemas import ERRORS, JOB_ID_PATTERN, JobId, TaskCreate
from kinod.models import JobState, Sidecar

STATIC = Path(__file__).parent / "static"
# The page's files, by the name they are served under, and their media types.
ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
# Nothing but this API: no other site's scripts, styles, images or connections.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
       "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
SAFE_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
# A row's texts past this many characters are cut (the job view shows them whole).
TEXT_MAX = 300
COLUMNS = ("id", "name", "state", "progress", "type", "node", "attempt", "created",
           "started", "finished", "updated", "message", "error")
MAX_BULK = 10_000

router = APIRouter(responses=ERRORS)


# --- the page ------------------------------------------------------------------------------


@router.get("/", include_in_schema=False)
async def page(request: Request) -> Response:
    # The page will ask for every job: their rows are made meanwhile (once per API).
    request.app.state.dashboard_rows.warm(request.app.state.api.index)
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8",
                        headers=SAFE_HEADERS)


@router.get("/ui/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise ApiError(404, "not_found", f"no file {name}")
    return FileResponse(STATIC / name, media_type=media_type, headers=SAFE_HEADERS)


# --- every job, compactly ------------------------------------------------------------------


class RowCache:
    """Each job's row as JSON, made once per sidecar file (its key), so a listing of 10,000
    jobs encodes only what changed since the last one. Warmed in a thread when the page is
    first loaded (an API no browser visits spends nothing on it), while the page paints the
    newest jobs."""

    def __init__(self) -> None:
        self._rows: dict[str, tuple[FileKey, bytes]] = {}
        self._task: asyncio.Task | None = None

    def warm(self, index: OutboxIndex) -> None:
        if self._task is not None:
            return
        entries = list(index.entries())

        async def warm() -> None:
            made = await asyncio.to_thread(self._make, entries)
            self._rows.update((entry.id, (entry.file_key, blob)) for entry, blob in made)

        self._task = asyncio.get_running_loop().create_task(warm(), name="dashboard rows")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    @staticmethod
    def _make(entries: list[Entry]) -> list[tuple[Entry, bytes]]:
        return [(entry, json.dumps(row_of(json.loads(entry.json)), ensure_ascii=False,
                                   separators=(",", ":"), allow_nan=False).encode())
                for entry in entries]

    def _missing(self, entries: list[Entry]) -> list[Entry]:
        rows = self._rows
        return [e for e in entries if (rows.get(e.id) or (None,))[0] != e.file_key]

    async def listing(self, entries: list[Entry], total: int, every: bool = True) -> bytes:
        """``{"columns", "rows", "total"}`` for these entries, in their order. ``every``: they
        are every job (rows of others are dropped; the warm-up is waited for)."""
        if every and self._task is not None and not self._task.done():
            await asyncio.shield(self._task)  # rather than make the same rows twice
        missing = self._missing(entries)
        if len(missing) > 500:  # a cold start: not on the event loop
            made = await asyncio.to_thread(self._make, missing)
        else:
            made = self._make(missing)
        fresh = dict(self._rows)
        fresh.update((entry.id, (entry.file_key, blob)) for entry, blob in made)
        if every:
            self._rows = {entry.id: fresh[entry.id] for entry in entries}
        else:
            self._rows = fresh
        return (b'{"columns":' + json.dumps(COLUMNS).encode() + b',"total":'
                + str(total).encode() + b',"rows":['
                + b",".join(fresh[entry.id][1] for entry in entries) + b"]}")


def _time(text: str | None) -> int | None:
    """Milliseconds since the epoch, as JavaScript's Date.parse reads the same text."""
    if not text:
        return None
    moment = datetime.fromisoformat(text)
    return int(moment.timestamp()) * 1000 + moment.microsecond // 1000


def _cut(text: Any) -> str | None:
    if not isinstance(text, str):
        return None
    return text if len(text) <= TEXT_MAX else text[:TEXT_MAX - 1] + "…"


def row_of(sidecar: dict[str, Any]) -> list[Any]:
    """A sidecar as the jobs table shows it (times in milliseconds since the epoch)."""
    error = sidecar.get("error") or {}
    return [sidecar["id"], _cut(sidecar.get("name")), sidecar["state"], sidecar["progress"],
            sidecar.get("type"), sidecar.get("node"), sidecar["attempt"],
            _time(sidecar["created_at"]), _time(sidecar.get("started_at")),
            _time(sidecar.get("finished_at")), _time(sidecar.get("updated_at")),
            _cut(sidecar.get("message")), _cut(error.get("message"))]


@router.get("/api/v1/dashboard/jobs", tags=["dashboard"],
            responses={200: {"description": "`{columns, total, rows}`: one row per job, "
                             "oldest first, each a list in the order of `columns`"}})
async def dashboard_jobs(
        request: Request,
        newest: Annotated[int | None, Query(ge=1, le=1000, description="only this many, "
                                            "the newest: a first paint that waits on nothing")
                          ] = None,
) -> Response:
    """Every job's latest run, as the dashboard's table shows it: state, progress, plugin,
    node, attempt, times (milliseconds since the epoch) and message, without reading
    10,000 whole sidecars; `total` counts every job. Changes after it come from
    `/api/v1/events`."""
    index = request.app.state.api.index
    if newest is not None:
        entries = index.page(newest)[0][::-1]
    else:
        entries = sorted(index.entries(), key=lambda entry: entry.sort_key)
    body = await request.app.state.dashboard_rows.listing(entries, len(index),
                                                          every=newest is None)
    return Response(body, media_type="application/json")


# --- run again, and bulk actions ----------------------------------------------------------


def run_again(request: Request, job_id: str) -> Sidecar:
    """Submit the task of ``job_id``'s ended run again, under the same id, to run now (a
    held one is not held again)."""
    jobs = request.app.state.api.jobs
    entry = jobs.current(job_id)
    if entry is None:
        raise ApiError(404, "not_found", f"no job {job_id}")
    if not JobState(entry.state).is_terminal:
        raise ApiError(409, "conflict", f"job {job_id} is {entry.state}; it can run again "
                       "once it has ended")
    task = json.loads(entry.json).get("task")
    if not isinstance(task, dict):
        raise ApiError(409, "conflict", f"job {job_id}'s task is not known, so it cannot "
                       "run again")
    document = {key: value for key, value in task.items() if key != "hold"}
    try:
        spec = TaskCreate.model_validate({**document, "id": job_id, "start": True})
    except ValidationError as exc:
        raise ApiError.invalid(fields_of(exc)) from None
    return jobs.create(spec)


@router.post("/api/v1/generator/tasks/{id}/rerun", status_code=201, tags=["tasks"],
             response_model=Sidecar, response_model_by_alias=True)
async def rerun_task(id: JobId, request: Request, response: Response  # noqa: A002
                     ) -> Sidecar:
    """Run an ended task again: its task as submitted, as a new run of the same id (the
    previous run's sidecar and log are kept). 409 while it is held, queued or running."""
    sidecar = run_again(request, id)
    response.headers["Location"] = f"/api/v1/generator/tasks/{id}"
    return sidecar


class BulkAction(BaseModel):
    action: Literal["stop", "hold", "release", "rerun"]
    ids: list[Annotated[str, Field(pattern=JOB_ID_PATTERN, max_length=128)]] = Field(
        min_length=1, max_length=MAX_BULK)


class BulkOutcome(BaseModel):
    id: str
    ok: bool
    status: int = Field(description="what the single request would have answered")
    message: str | None = None


class BulkResult(BaseModel):
    done: int
    failed: int
    results: list[BulkOutcome]


@router.post("/api/v1/dashboard/actions", tags=["dashboard"])
def bulk_action(body: BulkAction, request: Request) -> BulkResult:
    """One action on many jobs (at most 10,000): each is done as its own request would be,
    and each one's outcome is answered; one job's refusal does not stop the others."""
    jobs = request.app.state.api.jobs
    results = []
    for job_id in dict.fromkeys(body.ids):
        try:
            if body.action == "rerun":
                run_again(request, job_id)
                status = 201
            else:
                jobs.control(job_id, body.action)
                status = 202
            results.append(BulkOutcome(id=job_id, ok=True, status=status))
        except ApiError as exc:
            results.append(BulkOutcome(id=job_id, ok=False, status=exc.status,
                                       message=exc.message))
    failed = sum(1 for outcome in results if not outcome.ok)
    return BulkResult(done=len(results) - failed, failed=failed, results=results)

