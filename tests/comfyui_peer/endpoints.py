"""The test peer's websocket and HTTP endpoints."""

from __future__ import annotations

import copy
import json
import os
import struct
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from .recorded import (
    BODY,
    MODERN,
    SERVER_FLAGS,
    TROUBLE,
    error_item,
    json_body,
    load,
)


class Endpoints:
    """What clients reach (a part of ComfyUITestServer)."""

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
        body = request[BODY] = await json_body(request)  # handlers read it from here
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
            return web.json_response(load("misc_get_endpoints.json", MODERN)[2]["body"])
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
        return web.json_response(load("system_stats.json", self.version))

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
                return web.json_response({"error": error_item("no_prompt", "No prompt provided",
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
