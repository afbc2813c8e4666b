"""The farm around the tasks: nodes, liveness, and the page a browser gets."""

from __future__ import annotations

import os
import time

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from kinod.api.schemas import ERRORS, NodesView, NodeView
from kinod.control import pause_file, paused_by
from kinod.nodes import read_heartbeats

router = APIRouter(responses=ERRORS)


@router.get("/api/v1/nodes", tags=["nodes"])
def nodes(request: Request) -> NodesView:
    """Every node's last heartbeat (`inbox/.kinod/nodes/`), and whether it is paused."""
    inbox = request.app.state.api.settings.inbox
    now = time.time()
    return NodesView(
        paused=os.path.lexists(pause_file(inbox)),
        nodes=[NodeView(**heartbeat.model_dump(),
                        heartbeat_age_s=max(0.0, now - heartbeat.heartbeat_at.timestamp()),
                        paused=paused_by(inbox, heartbeat.node) is not None)
               for heartbeat in read_heartbeats(inbox / ".kinod" / "nodes")])


@router.get("/healthz", tags=["service"])
async def healthz() -> dict[str, str]:
    """Liveness: answers while the API serves (no token needed)."""
    return {"status": "ok"}


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def home() -> str:
    return ("<!doctype html><html><head><meta charset=utf-8><title>kinod</title></head>"
            "<body><h1>kinod</h1><p>The dashboard is to come. Meanwhile: the API's "
            '<a href="/docs">documentation</a>, the <a href="/api/v1/generator/tasks">tasks'
            '</a>, the <a href="/api/v1/nodes">nodes</a>.</p></body></html>')
