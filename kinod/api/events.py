"""``GET /api/v1/events``: Server-Sent Events, one ``task`` event per sidecar change."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from kinod.api.index import Entry

# A comment line this often keeps proxies from closing a quiet stream, and finds clients
# that went away.
KEEPALIVE_S = 15.0
# Events a slow client may fall behind by; past that its stream ends, and it reconnects.
BACKLOG = 10_000
_CLOSE = b""

router = APIRouter()


class EventHub:
    """Hands each sidecar change to every open stream (an observer of the outbox index)."""

    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[bytes]] = set()
        self._closed = False

    def __call__(self, old: Entry | None, new: Entry | None) -> None:
        if new is None or (old is not None and old.json == new.json):
            return
        message = b"event: task\nid: " + new.id.encode() + b"\ndata: " + new.json + b"\n\n"
        for queue in list(self._queues):
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:
                self._queues.discard(queue)
                _close(queue)

    def subscribe(self) -> asyncio.Queue[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue(BACKLOG)
        if self._closed:
            queue.put_nowait(_CLOSE)
        else:
            self._queues.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[bytes]) -> None:
        self._queues.discard(queue)

    def close(self) -> None:
        """End every stream: the server is shutting down."""
        self._closed = True
        for queue in self._queues:
            _close(queue)
        self._queues.clear()

    @property
    def streams(self) -> int:
        return len(self._queues)


def _close(queue: asyncio.Queue[bytes]) -> None:
    while True:
        try:
            queue.put_nowait(_CLOSE)
            return
        except asyncio.QueueFull:
            queue.get_nowait()  # the last event it would not read anyway


async def _stream(hub: EventHub, queue: asyncio.Queue[bytes]) -> AsyncIterator[bytes]:
    try:
        yield b"retry: 2000\n\n"
        while True:
            try:
                message = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
            except TimeoutError:
                yield b": keep-alive\n\n"
                continue
            if message is _CLOSE or not message:
                return
            yield message
    finally:
        hub.unsubscribe(queue)


@router.get("/api/v1/events", tags=["events"], response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "`event: task`, `data:` the sidecar"}})
async def events(request: Request) -> StreamingResponse:
    """Every sidecar change as it happens: event `task`, its data the whole sidecar (one
    line of JSON), its id the job's id."""
    hub: EventHub = request.app.state.api.hub
    queue = hub.subscribe()  # before the response starts: no change between is missed
    return StreamingResponse(_stream(hub, queue), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
