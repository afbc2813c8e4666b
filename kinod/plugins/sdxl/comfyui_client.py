"""ComfyUI's HTTP API and its websocket, for one server.

httpx and websockets are imported when a job first talks to a server, not when kinod loads
its plugins: ``kinod plugins`` stays quick and never connects anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import ssl
import uuid
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

from loguru import logger
from pydantic import BaseModel, ValidationError

from .errors import OutputMissing, PromptRejected, UnexpectedAnswer, Unreachable
from .explain import describe_rejection, one_line
from .messages import (
    Event,
    History,
    HistoryEntry,
    ImageRef,
    PromptAccepted,
    QueueState,
    UploadedImage,
    parse_ws_message,
)

if TYPE_CHECKING:
    import httpx

CONNECT_TIMEOUT_S = 5.0
WS_MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # preview frames can be large; we skip them anyway
WS_CLOSE_TIMEOUT_S = 2.0

Model = TypeVar("Model", bound=BaseModel)


def new_http_client(timeout_s: float) -> httpx.AsyncClient:
    """One job's HTTP connections, shared by every server it talks to."""
    import httpx

    return httpx.AsyncClient(verify=_tls_context(),
                             timeout=httpx.Timeout(timeout_s,
                                                   connect=min(CONNECT_TIMEOUT_S, timeout_s)))


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """httpx's default TLS settings, made once: each client would load the CA bundle again
    (50 ms, more than a fast GPU takes for an image)."""
    import httpx

    return httpx.create_ssl_context()


class ComfyUIClient:
    """One server's HTTP API. Connection failures raise Unreachable naming the URL; answers that
    do not read as ComfyUI's raise UnexpectedAnswer. ``timeout_s`` overrides the HTTP client's
    own timeouts."""

    def __init__(self, url: str, http: httpx.AsyncClient, timeout_s: float | None = None) -> None:
        self.url = url
        self._http = http
        self._timeout_s = timeout_s

    async def queue(self) -> QueueState:
        return self._read(await self._request("GET", "/queue"), QueueState, "GET /queue")

    async def submit(self, workflow: dict[str, Any], client_id: str,
                     prompt_id: str | None = None) -> str:
        """POST /prompt; the prompt's id, or PromptRejected with ComfyUI's own reasons.
        ``prompt_id``: the id to ask for (servers since 2025 take it, older ones choose)."""
        body: dict[str, Any] = {"prompt": workflow, "client_id": client_id}
        if prompt_id is not None:
            body["prompt_id"] = prompt_id
        answer = await self._request("POST", "/prompt", json=body)
        if answer.status_code != 200:
            message = describe_rejection(self.url, answer.status_code, answer.text)
            # 5xx other than 500 come from proxies and restarts: worth another try.
            raise PromptRejected(message, retryable=answer.status_code in (502, 503, 504))
        return self._read(answer, PromptAccepted, "POST /prompt").prompt_id

    async def history(self, prompt_id: str) -> HistoryEntry | None:
        """This prompt's history entry; None while ComfyUI has none (queued, running, lost)."""
        answer = await self._request("GET", f"/history/{quote(prompt_id, safe='')}")
        return self._read(answer, History, "GET /history").root.get(prompt_id)

    async def interrupt(self, prompt_id: str) -> None:
        """Interrupt the running prompt (newer servers only this one, older ones whichever
        runs: the caller checks that it is ours)."""
        self._expect_ok(await self._request("POST", "/interrupt", json={"prompt_id": prompt_id}),
                        "POST /interrupt")

    async def delete_pending(self, prompt_id: str) -> None:
        self._expect_ok(await self._request("POST", "/queue", json={"delete": [prompt_id]}),
                        "POST /queue")

    async def object_info(self) -> dict[str, Any]:
        """GET /object_info: every node class the server has, by name."""
        answer = await self._request("GET", "/object_info")
        self._expect_ok(answer, "GET /object_info")
        try:
            info = json.loads(answer.text)
        except ValueError:
            info = None
        if not isinstance(info, dict):
            raise UnexpectedAnswer(f"ComfyUI at {self.url} answered GET /object_info with "
                                   "something other than a JSON object")
        return info

    async def upload_image(self, name: str, data: bytes) -> str:
        """POST /upload/image into the server's input folder; the name it was saved under
        (ComfyUI renames a file whose name is taken)."""
        answer = await self._request("POST", "/upload/image", files={"image": (name, data)},
                                     data={"type": "input", "overwrite": "false"})
        return self._read(answer, UploadedImage, "POST /upload/image").name

    async def fetch_image(self, image: ImageRef) -> bytes:
        answer = await self._request("GET", "/view", params={
            "filename": image.filename, "subfolder": image.subfolder, "type": image.type})
        if answer.status_code == 404:
            raise OutputMissing(f"ComfyUI at {self.url} lists image {image.filename!r} "
                                "but does not have it (404)")
        self._expect_ok(answer, "GET /view")
        return answer.content

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        import httpx

        if self._timeout_s is not None:
            kwargs["timeout"] = self._timeout_s
        try:
            return await self._http.request(method, self.url + path, **kwargs)
        except httpx.TransportError as exc:
            reason = one_line(str(exc)) or type(exc).__name__
            raise Unreachable(f"ComfyUI at {self.url} does not answer ({reason})") from None

    def _expect_ok(self, answer: httpx.Response, what: str) -> None:
        if answer.status_code != 200:
            raise UnexpectedAnswer(f"ComfyUI at {self.url} answered HTTP {answer.status_code} "
                                   f"to {what}: {one_line(answer.text, 200)}")

    def _read(self, answer: httpx.Response, model: type[Model], what: str) -> Model:
        self._expect_ok(answer, what)
        try:
            return model.model_validate(json.loads(answer.text))
        except (ValueError, ValidationError) as exc:
            raise UnexpectedAnswer(f"ComfyUI at {self.url} answered {what} with something "
                                   f"unexpected: {one_line(str(exc), 200)}") from None


CLOSED = object()  # put in EventStream.events once the websocket has dropped


class EventStream:
    """Our client id's messages from ComfyUI's websocket, read as events by a task of its own
    into ``events``; CLOSED follows the last one once the connection drops.

    ``connection`` is an open websocket: an async iterable of its messages, with ``close()``.
    """

    def __init__(self, connection: Any, client_id: str = "") -> None:
        self.client_id = client_id
        self.events: asyncio.Queue[Event | object] = asyncio.Queue()
        self._connection = connection
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, url: str, timeout_s: float) -> EventStream:
        """Connected before the prompt is posted, so no early message is missed; raises
        OSError or a websockets error when it cannot connect. Each socket gets a clientId of
        its own: ComfyUI keys sockets by clientId, and closing an older socket with the same
        id silences the newer one."""
        from websockets.asyncio.client import connect

        client_id = str(uuid.uuid4())
        ws_url = url.replace("http", "ws", 1).rstrip("/") + f"/ws?clientId={quote(client_id)}"
        return cls(await connect(ws_url, open_timeout=timeout_s,
                                 close_timeout=WS_CLOSE_TIMEOUT_S, max_size=WS_MAX_MESSAGE_BYTES),
                   client_id)

    async def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for raw in self._connection:
                event = parse_ws_message(raw)
                if event is not None:
                    self.events.put_nowait(event)
        except (ConnectionClosed, OSError):
            pass
        except Exception as exc:  # noqa: BLE001 - the job goes on through /history
            logger.warning("stopped reading the websocket: {}", type(exc).__name__)
        finally:
            self.events.put_nowait(CLOSED)

    async def close(self) -> None:
        self._reader.cancel()
        # Whatever ended the reader was told as CLOSED already: raised here, it would fail a
        # job that went on through /history. Only a cancellation of close() itself is raised.
        await asyncio.gather(self._reader, return_exceptions=True)
        with contextlib.suppress(Exception):  # a dead server: nothing left to close
            await self._connection.close()
