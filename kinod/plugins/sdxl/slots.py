"""How many of this process's prompts wait on each ComfyUI server, and the jobs waiting for room.

A prompt waits on a server from the moment its job chooses the server until it starts executing
there (or ends without starting). ``queue_ahead`` caps that number for each server, so jobs
spread: no server gets a second prompt to wait behind its running one while another has none.
A job that finds every server full waits here, first come first served, and takes the place of
the first prompt that starts on one of its servers: a handoff under one lock, with no race and
no new look at the servers.

The count is this process's (jobs of every plugin run on threads of one daemon): jobs in
processes of their own (``isolation: process``) and other clients are seen only through each
server's ``/queue``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .servers import queue_lengths

if TYPE_CHECKING:
    import httpx

    from .servers import SdxlSettings
    from .tracking import Report

TICK_S = 0.1  # how often a waiting job looks for a stop request


@dataclass(eq=False)
class _Waiter:
    seq: int
    urls: tuple[str, ...]
    cap: int
    loop: asyncio.AbstractEventLoop
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    granted: str | None = None  # the server whose place it was handed


class ServerSlots:
    """Prompts waiting on each server (chosen, posted, not started), and the jobs in line for a
    place; safe to use from every job's thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[str, int] = {}
        self._unposted: dict[str, int] = {}  # chosen, not in the server's /queue yet
        self._line: list[_Waiter] = []  # in order of arrival
        self._seq = itertools.count()

    def waiting(self, url: str) -> int:
        return self._waiting.get(url, 0)

    def has_room(self, urls: tuple[str, ...] | list[str], cap: int) -> bool:
        return any(self._waiting.get(url, 0) < cap for url in urls)

    def take(self, lengths: dict[str, int], cap: int) -> str | None:
        """Of the servers in ``lengths`` (each one's /queue length) with room, the least busy
        (ties: the first listed), counted as having one more prompt waiting; None if none has
        room."""
        with self._lock:
            open_ = [url for url in lengths if self._waiting.get(url, 0) < cap]
            if not open_:
                return None
            url = min(open_, key=lambda u: lengths[u] + self._unposted.get(u, 0))
            self._count(url)
            return url

    def join_line(self, urls: tuple[str, ...], cap: int, loop: asyncio.AbstractEventLoop,
                  seq: int | None = None) -> _Waiter:
        """Wait in line (at the place ``seq`` had, when it comes back after a look)."""
        waiter = _Waiter(next(self._seq) if seq is None else seq, urls, cap, loop)
        with self._lock:
            at = next((i for i, w in enumerate(self._line) if w.seq > waiter.seq),
                      len(self._line))
            self._line.insert(at, waiter)
        return waiter

    def leave_line(self, waiter: _Waiter) -> str | None:
        """Out of the line; the server it was handed meanwhile, now the caller's to use or
        release."""
        with self._lock:
            if waiter in self._line:
                self._line.remove(waiter)
            return waiter.granted

    def posted(self, url: str) -> None:
        with self._lock:
            self._uncount(self._unposted, url)

    def release(self, url: str, handoff: bool = True) -> None:
        """One prompt less waits on ``url``. ``handoff``: the place goes to the first job in
        line that can use it (not after a failure of the server itself: a job handed a dead
        server would fail with it)."""
        with self._lock:
            self._uncount(self._waiting, url)
            if not handoff:
                return
            for waiter in self._line:
                if url in waiter.urls and self._waiting.get(url, 0) < waiter.cap:
                    self._line.remove(waiter)
                    waiter.granted = url
                    self._count(url)
                    with contextlib.suppress(RuntimeError):  # its loop is gone: see claim
                        waiter.loop.call_soon_threadsafe(waiter.ready.set)
                    return

    def _count(self, url: str) -> None:
        self._waiting[url] = self._waiting.get(url, 0) + 1
        self._unposted[url] = self._unposted.get(url, 0) + 1

    @staticmethod
    def _uncount(counts: dict[str, int], url: str) -> None:
        left = counts.get(url, 0) - 1
        if left > 0:
            counts[url] = left
        else:
            counts.pop(url, None)


SLOTS = ServerSlots()  # this process's; every job shares it


class ServerClaim:
    """One job's place on a server, held until its prompt starts there (or ends)."""

    def __init__(self, url: str, slots: ServerSlots = SLOTS) -> None:
        self.url = url
        self._slots = slots
        self._unposted = True
        self._held = True

    def posted(self) -> None:
        """The prompt is in the server's queue: its /queue length counts it from now on."""
        if self._unposted:
            self._unposted = False
            self._slots.posted(self.url)

    def release(self, handoff: bool = True) -> None:
        """The prompt started, or will never wait on the server again (idempotent)."""
        self.posted()
        if self._held:
            self._held = False
            self._slots.release(self.url, handoff)


async def claim_server(http: httpx.AsyncClient, settings: SdxlSettings,
                       stop_requested: Callable[[], bool], report: Report,
                       slots: ServerSlots = SLOTS,
                       clock: Callable[[], float] = time.monotonic) -> ServerClaim | None:
    """A place on the least busy server that has room, waiting in line while none has; None
    once stopped. Unreachable when no server answers."""
    urls, cap = tuple(settings.comfyui_urls), settings.queue_ahead
    loop = asyncio.get_running_loop()
    seq: int | None = None
    while True:
        if stop_requested():
            return None
        if slots.has_room(urls, cap):
            # One server: no choice to make, and one that is down says so when posted to.
            lengths = {urls[0]: 0} if len(urls) == 1 else await queue_lengths(
                http, list(urls), settings.request_timeout_s)
            url = slots.take(lengths, cap)
            if url is not None:
                return ServerClaim(url, slots)
        waiter = slots.join_line(urls, cap, loop, seq)
        seq = waiter.seq
        report(None, f"waiting for a server: {len(urls)} with {cap} prompt(s) waiting on each",
               waiting=True)
        try:
            granted = await _wait_in_line(waiter, urls, cap, settings.poll_interval_s,
                                          stop_requested, slots, clock)
        except BaseException:  # cancelled: a place handed to it meanwhile is passed on
            late = slots.leave_line(waiter)
            if late is not None:
                slots.release(late)
            raise
        if granted is None:
            granted = slots.leave_line(waiter)  # handed one just now, perhaps
        if granted is not None:
            if stop_requested():
                slots.release(granted)
                return None
            return ServerClaim(granted, slots)


async def _wait_in_line(waiter: _Waiter, urls: tuple[str, ...], cap: int, look_s: float,
                        stop_requested: Callable[[], bool], slots: ServerSlots,
                        clock: Callable[[], float]) -> str | None:
    """The server handed to ``waiter``; None to look at the servers again (one has room that
    no handoff gave, e.g. after a server failed) or once stopped."""
    look_at = clock() + look_s
    while waiter.granted is None:
        if stop_requested():
            return None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waiter.ready.wait(), TICK_S)
        if waiter.granted is None and clock() >= look_at:
            look_at = clock() + look_s
            if slots.has_room(urls, cap):
                return None
    return slots.leave_line(waiter)
