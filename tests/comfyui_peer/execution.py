"""The test peer's runs: one prompt at a time, with ComfyUI's message sequence, caching,
interrupts and the files its output nodes write."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import random
import struct
from pathlib import Path
from typing import Any

from .recorded import (
    FLAC,
    GIF,
    JPEG_FORMAT,
    JPEG_HEAD,
    PNG_FORMAT,
    PREVIEW_IMAGE,
    PREVIEW_WITH_METADATA,
    SAMPLERS,
    Interrupted,
    NodeFailed,
    now_ms,
    png,
)


class Execution:
    """Running prompts (a part of ComfyUITestServer)."""

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
                data = {**data, "timestamp": now_ms()}  # 0.3.64 dates its events
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
        except Interrupted:
            failure = ("execution_interrupted", {}, True)
        for nid in [] if failure else self._order(prompt, outputs, cached):
            try:
                if nid in cached:
                    self._report_cached(nid, prompt_id, client)
                else:
                    await self._run_node(prompt, nid, prompt_id, extra, behaviour,
                                         not executed)
            except Interrupted:
                failure = ("execution_interrupted", {}, True)  # sent even without a client
            except NodeFailed as exc:
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
                {"prompt_id": prompt_id, "timestamp": now_ms()})
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
        raise Interrupted

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
            raise Interrupted
        if behaviour == "fail" and first:
            literal = {k: [v] for k, v in node["inputs"].items() if not isinstance(v, list)}
            outputs: Any = list(prompt) if self.modern else {}
            raise NodeFailed({**self._failure, "current_inputs": literal,
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
                raise Interrupted
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
                    raise Interrupted
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
            raise NodeFailed({
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
