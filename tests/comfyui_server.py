"""The ComfyUI test peer, under the name tests have always imported it by; it lives in
``tests/comfyui_peer/``."""

from tests.comfyui_peer import (
    BEHAVIOURS,
    END_STYLES,
    EXTRA_NODES,
    FOLDERS,
    LEGACY,
    MODERN,
    PROTOCOL,
    VERSIONS,
    ComfyUITestServer,
    png,
    ws_messages,
)

__all__ = ["BEHAVIOURS", "END_STYLES", "EXTRA_NODES", "FOLDERS", "LEGACY", "MODERN", "PROTOCOL",
           "VERSIONS", "ComfyUITestServer", "png", "ws_messages"]
