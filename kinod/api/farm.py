"""The farm around the tasks: nodes, liveness, and pausing the farm or one node."""

from __future__ import annotations

import os
import time
from typing import Annotated

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, Field

from kinod.api.errors import ApiError
from kinod.api.jobs import unavailable
from kinod.api.schemas import ERRORS, NodesView, NodeView
from kinod.control import pause, pause_file, paused_by, resume
from kinod.nodes import read_heartbeats

router = APIRouter(responses=ERRORS)


@router.get("/api/v1/nodes", tags=["nodes"])
def nodes(request: Request) -> NodesView:
    """Every node's last heartbeat (`inbox/.kinod/nodes/`), and whether it is paused."""
    inbox = request.app.state.api.settings.inbox
    now = time.time()
    return NodesView(
        paused=os.path.lexists(pause_file(inbox)),
        # A heartbeat says "paused" too now: the pause files, read here, are newer.
        nodes=[NodeView(**{**heartbeat.model_dump(),
                           "paused": paused_by(inbox, heartbeat.node) is not None},
                        heartbeat_age_s=max(0.0, now - heartbeat.heartbeat_at.timestamp()))
               for heartbeat in read_heartbeats(inbox / ".kinod" / "nodes")])


@router.get("/healthz", tags=["service"])
async def healthz() -> dict[str, str]:
    """Liveness: answers while the API serves (no token needed)."""
    return {"status": "ok"}


# A node's name as kinod.config allows it: no '/', not starting with '.', printable.
NodeName = Annotated[str, Path(pattern=r"^[^/.\x00-\x1f\x7f][^/\x00-\x1f\x7f]{0,254}$",
                                description="the node's name")]


class Paused(BaseModel):
    node: str | None = Field(description="the node; null for the whole farm")
    paused: bool = Field(description="its own pause file is there now")


def _set_pause(request: Request, node: str | None, paused: bool) -> Paused:
    """Make or remove ``inbox/.pause`` (or ``.pause.<node>``), as ``kinod pause`` does."""
    inbox = request.app.state.api.settings.inbox
    if node is not None and (not node.isprintable()
                             or len(pause_file(inbox, node).name.encode()) > 255):
        raise ApiError.invalid({"node": "not a node's name: printable, and short enough "
                                "for a file name"})
    try:
        if paused:
            pause(inbox, node)
        else:
            resume(inbox, node)
    except OSError as exc:
        raise unavailable(exc, f"cannot write into the inbox {inbox}") from None
    return Paused(node=node, paused=paused)


@router.post("/api/v1/farm/pause", tags=["nodes"])
def pause_farm(request: Request) -> Paused:
    """Pause the whole farm (`inbox/.pause`): no node starts a new job; running jobs go on."""
    return _set_pause(request, None, True)


@router.post("/api/v1/farm/resume", tags=["nodes"])
def resume_farm(request: Request) -> Paused:
    """Resume the farm (remove `inbox/.pause`); a node paused on its own stays paused."""
    return _set_pause(request, None, False)


@router.post("/api/v1/nodes/{node}/pause", tags=["nodes"])
def pause_node(node: NodeName, request: Request) -> Paused:
    """Pause one node (`inbox/.pause.<node>`)."""
    return _set_pause(request, node, True)


@router.post("/api/v1/nodes/{node}/resume", tags=["nodes"])
def resume_node(node: NodeName, request: Request) -> Paused:
    """Resume one node (remove `inbox/.pause.<node>`); a farm pause still holds it."""
    return _set_pause(request, node, False)
