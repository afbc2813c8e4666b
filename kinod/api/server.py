"""Serving the API: ``ApiServer`` in a thread of its own (``kinod run`` with ``http.listen``),
or ``serve`` in the foreground (``kinod serve``)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import stat
import threading

import uvicorn
from loguru import logger

from kinod.api.app import create_app
from kinod.api.guards import is_loopback, read_token
from kinod.config import Settings
from kinod.errors import ConfigError
from kinod.plugins.plugin_loader import PluginRegistry

EXIT_OK = 0
EXIT_FAILED = 1
START_TIMEOUT_S = 600.0  # reading a very large outbox comes before the first answer
STOP_TIMEOUT_S = 5.0


def parse_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:8000"``, ``"[::1]:8000"``, ``"localhost:0"`` -> host and port."""
    host, colon, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ConfigError(f"http.listen: {listen!r} is not host:port (e.g. 127.0.0.1:8000)")
    return host, int(port)


def _listening_socket(host: str, port: int) -> socket.socket:
    """Bound here, so that a port in use fails the start at once, and port 0 is known.
    Made with IPPROTO_TCP, not socket.create_server's 0: asyncio turns Nagle off only on
    sockets that say TCP, and with it on each response waits on the client's delayed ACK
    (40 ms)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP,
                               flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


class ApiServer:
    """The API on ``settings.http.listen``. Refuses, with ConfigError naming the key, to
    listen beyond loopback without a token, or to start with a token file it cannot read."""

    def __init__(self, settings: Settings, registry: PluginRegistry | None = None) -> None:
        if settings.http.listen is None:
            raise ConfigError("http.listen: not set (e.g. 127.0.0.1:8000)")
        self.host, self.port = parse_listen(settings.http.listen)
        token = read_token(settings.http.token_file)
        if token is None and not is_loopback(self.host):
            raise ConfigError(f"http.listen: {settings.http.listen} is not a loopback address; "
                              "serving other machines needs http.token_file")
        try:
            if not stat.S_ISDIR(os.stat(settings.inbox).st_mode):
                raise ConfigError(f"inbox {settings.inbox}: not a folder")
        except FileNotFoundError:
            raise ConfigError(f"inbox {settings.inbox}: no such folder "
                              "(create it with `kinod init`)") from None
        _log_uvicorn_through_loguru()
        self.app = create_app(settings, token, registry)
        self.url: str | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failure: BaseException | None = None

    def start(self) -> ApiServer:
        """Serve in a background thread; returns once the socket listens (and the outbox has
        been read). OSError if the address cannot be had."""
        sock = _listening_socket(self.host, self.port)
        host, port = sock.getsockname()[:2]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="on",
                                http="h11", ws="none", loop="asyncio", proxy_headers=False,
                                server_header=False, timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, args=(sock,), name="kinod-api",
                                        daemon=True)
        self._thread.start()
        while not self._server.started and self._thread.is_alive():
            self._thread.join(0.01)
            if self._server.started:
                break
        if not self._server.started:
            sock.close()
            failure = self.app.state.api.startup_error or self._failure
            raise OSError(f"the HTTP API did not start: {failure!r}")
        logger.info("HTTP API listening on {}", self.url)
        return self

    def _run(self, sock: socket.socket) -> None:
        try:
            asyncio.run(self._serve(sock))
        except BaseException as exc:  # noqa: BLE001 - uvicorn exits the thread by SystemExit
            self._failure = exc

    async def _serve(self, sock: socket.socket) -> None:
        assert self._server is not None
        self._loop = asyncio.get_running_loop()
        await self._server.serve(sockets=[sock])

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """End every event stream, stop serving, and wait for the thread (a second or so)."""
        server, loop = self._server, self._loop
        if server is None or self._thread is None:
            return
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self.app.state.api.hub.close)
            except RuntimeError:
                pass  # the loop closed meanwhile
        server.should_exit = True
        self._thread.join(STOP_TIMEOUT_S)
        if self._thread.is_alive():
            server.force_exit = True
            self._thread.join(STOP_TIMEOUT_S)
        self._server = self._thread = None


def serve(settings: Settings) -> int:
    """``kinod serve``: the API alone, running no jobs, until SIGTERM or SIGINT. ConfigError
    for bad settings (the command line's exit status 2)."""
    server = ApiServer(settings)
    stopping = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stopping.set())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        logger.info("kinod serve ready on node {}: {}", settings.node, server.url)
        while not stopping.wait(1.0):
            if not server.alive:
                logger.error("the HTTP API stopped by itself")
                return EXIT_FAILED
        return EXIT_OK
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _ToLoguru(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(exception=record.exc_info).log(level, "http: {}", record.getMessage())


def _log_uvicorn_through_loguru() -> None:
    """uvicorn logs through the standard library: its warnings and errors go to kinod's
    log, its chatter (each start and stop) does not."""
    uvicorn_logger = logging.getLogger("uvicorn")
    if not any(isinstance(h, _ToLoguru) for h in uvicorn_logger.handlers):
        uvicorn_logger.addHandler(_ToLoguru())
    uvicorn_logger.setLevel(logging.WARNING)
    uvicorn_logger.propagate = False
