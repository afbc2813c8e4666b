"""A ComfyUI test peer: a real aiohttp server on 127.0.0.1 that speaks the recorded protocol
(see ``server.py``). ``server`` holds its life and what tests steer and see; ``endpoints``
its websocket and HTTP API; ``validation`` its checks of a posted prompt; ``execution`` its
runs; ``recorded`` what it serves as recorded."""

from .recorded import (
    BEHAVIOURS,
    END_STYLES,
    EXTRA_NODES,
    FOLDERS,
    LEGACY,
    MODERN,
    PROTOCOL,
    VERSIONS,
    png,
    ws_messages,
)
from .server import ComfyUITestServer

__all__ = ["BEHAVIOURS", "END_STYLES", "EXTRA_NODES", "FOLDERS", "LEGACY", "MODERN", "PROTOCOL",
           "VERSIONS", "ComfyUITestServer", "png", "ws_messages"]
