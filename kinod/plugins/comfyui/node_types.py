"""Each server's node types (``GET /object_info``), read once a minute at most.

A real server's answer is half a megabyte and takes it a fifth of a second to build: asked for
every job, it would cost more than a fast GPU's image. A check that fails on what was kept asks
again before failing the job: the server may have gained the nodes since.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from kinod.plugins.sdxl.comfyui_client import ComfyUIClient
from kinod.plugins.sdxl.errors import InvalidJob

KEEP_S = 60.0

_kept: dict[str, tuple[float, dict[str, Any]]] = {}  # url -> (when read, its answer)
_lock = threading.Lock()  # jobs on many threads share what was read


async def node_types(client: ComfyUIClient, fresh: bool = False,
                     clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
    """The server's /object_info, as read in the last ``KEEP_S`` unless ``fresh``."""
    with _lock:
        kept = _kept.get(client.url)
    if kept is not None and not fresh and clock() - kept[0] < KEEP_S:
        return kept[1]
    info = await client.object_info()
    with _lock:
        _kept[client.url] = (clock(), info)
    return info


async def check_against_server(client: ComfyUIClient,
                               check: Callable[[dict[str, Any]], None]) -> None:
    """``check(info)`` with the server's node types; once more with a fresh read if it fails
    on kept ones. Raises what the check raises."""
    info = await node_types(client)
    try:
        check(info)
    except InvalidJob:
        fresh = await node_types(client, fresh=True)
        if fresh is info:
            raise
        check(fresh)


def forget() -> None:
    """Read every server's node types afresh from now on."""
    with _lock:
        _kept.clear()
