"""Following one posted prompt to its end: progress from the websocket, the truth from /queue
and /history (which also carry the job when the websocket drops), and stopping it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

from loguru import logger

from .comfyui_client import CLOSED, ComfyUIClient, EventStream
from .errors import PromptLost, SdxlError
from .messages import Cached, Ended, Event, HistoryEntry, NodeFailureData, Progress, Started
from .servers import SdxlSettings

TICK_S = 0.1  # how often a stop request is looked for
# With the websocket up, /queue and /history are still asked after this long without a word
# about our prompt: a message may have been missed, or a newer server may end differently.
QUIET_CHECK_S = 5.0
# A prompt not heard of this long after it was posted is looked for in /queue: it may be
# waiting behind others, which the job's message then says.
FIRST_CHECK_S = 0.5
MISSING_CHECKS_TO_LOSE = 2  # a prompt in neither /queue nor /history this often was lost



class Report(Protocol):
    """Progress for the job: percent (None: unchanged) and a short message. ``waiting`` True:
    the prompt waits (for a server, in a server's queue), False: it runs; kinod's timeout and
    stall_timeout count only from then (``BasePlugin.update_progress``)."""

    def __call__(self, percent: float | None, message: str, *,
                 waiting: bool | None = None) -> None: ...


class PromptTracker:
    """Follows prompt ``prompt_id`` on ``client``'s server until it ends or is stopped."""

    def __init__(self, client: ComfyUIClient, prompt_id: str, settings: SdxlSettings,
                 stop_requested: Callable[[], bool], report: Report,
                 clock: Callable[[], float] = time.monotonic,
                 node_count: int | None = None,
                 on_started: Callable[[], None] | None = None) -> None:
        self.client = client
        self.prompt_id = prompt_id
        self.settings = settings
        self._stop_requested = stop_requested
        self._report = report
        self._clock = clock
        self.started_at: float | None = None  # when ComfyUI began running it
        self.failure: NodeFailureData | None = None  # from the websocket's execution_error
        self._ended = False
        self._percent = 0.0  # only ever rises: later nodes' progress starts again from 0
        self._missing = 0
        self._unreachable_since: float | None = None
        # Overall progress (the comfyui plugin): nodes begun out of the graph's nodes less the
        # cached ones, the running node's share refined by its steps.
        self._node_count = node_count
        self._cached: set[str] = set()
        self._begun: list[str] = []
        self.position: int | None = None  # place in the server's queue while waiting
        self._on_started = on_started  # called once, when the server begins running it

    async def follow(self, stream: EventStream | None) -> HistoryEntry | None:
        """The prompt's history entry once it has ended; None once stopped on request."""
        next_check = self._clock() + (FIRST_CHECK_S if stream else 0.0)
        while True:
            if self._stop_requested():
                await self.cancel()
                return None
            event = await self._next_event(stream)
            if event is CLOSED:
                logger.warning("the websocket to {} dropped; following prompt {} through "
                               "/history", self.client.url, self.prompt_id)
                stream, next_check = None, self._clock()
            # Other clients' prompts share the socket: only ours count.
            elif (isinstance(event, Progress | Started | Ended | Cached)
                  and event.prompt_id == self.prompt_id):
                self._on_event(event)
                next_check = self._clock() + (0.0 if self._ended else QUIET_CHECK_S)
            if self._clock() >= next_check:
                entry = await self._check()
                if entry is not None:
                    return entry
                quick = self._ended or stream is None or self.position is not None
                next_check = self._clock() + (self._poll_s if quick else QUIET_CHECK_S)

    @property
    def _poll_s(self) -> float:
        if self._ended:  # the server said it ended: its history entry is moments away
            return min(self.settings.poll_interval_s, 0.2)
        return self.settings.poll_interval_s

    async def _next_event(self, stream: EventStream | None) -> Event | object | None:
        if stream is None:
            await asyncio.sleep(TICK_S)
            return None
        try:
            return await asyncio.wait_for(stream.events.get(), TICK_S)
        except TimeoutError:
            return None

    def _on_event(self, event: Event) -> None:
        if isinstance(event, Progress):
            self._mark_started()
            # 100 is for when the images are saved.
            share = event.value / event.maximum
            if self._node_count is not None:
                share = self._overall(share if event.node in (None, self._current) else 0.0)
            self._percent = max(self._percent, min(99.0, 100.0 * share))
            self._report(self._percent,
                         f"step {event.value:g}/{event.maximum:g} on {self.client.url}")
        elif isinstance(event, Cached):
            self._cached.update(event.nodes)
        elif isinstance(event, Started):
            self._mark_started()
            if event.node is not None and event.node not in self._begun:
                self._begun.append(event.node)
                if self._node_count is not None:
                    self._percent = max(self._percent, min(99.0, 100.0 * self._overall(0.0)))
                    self._report(self._percent, f"node {event.node} on {self.client.url}")
        else:
            self._ended = True
            if event.how == "error":
                self.failure = event.failure

    @property
    def _current(self) -> str | None:
        return self._begun[-1] if self._begun else None

    def _overall(self, current_share: float) -> float:
        """The share of the whole run done: nodes finished, and part of the running one."""
        assert self._node_count is not None
        to_run = max(1, self._node_count - len(self._cached), len(self._begun))
        return (max(0, len(self._begun) - 1) + current_share) / to_run

    def _mark_started(self) -> None:
        self.position = None
        if self.started_at is None:
            self.started_at = self._clock()
            if self._on_started is not None:
                self._on_started()
            self._report(None, f"running on {self.client.url}", waiting=False)

    async def _check(self) -> HistoryEntry | None:
        """Ask the server: None while the prompt is queued or running; its history entry once
        it has ended; PromptLost when the server forgot it or stayed away too long."""
        try:
            if self._ended:  # the server said it ended: its entry is there, or moments away
                entry = await self.client.history(self.prompt_id)
                if entry is not None:
                    self._unreachable_since = None
                    return entry
            # The queue first: a prompt leaves it only once its history entry is written.
            queue = await self.client.queue()
            if self.prompt_id in queue.running_ids or self.prompt_id in queue.pending_ids:
                if self.prompt_id in queue.running_ids:
                    self._mark_started()
                elif self.started_at is None:
                    self._waiting(queue.pending_ids.index(self.prompt_id) + 1)
                self._missing, self._unreachable_since = 0, None
                return None
            entry = await self.client.history(self.prompt_id)
        except SdxlError as exc:  # unreachable, or answering nonsense while restarting
            now = self._clock()
            self._unreachable_since = self._unreachable_since or now
            if now - self._unreachable_since >= self.settings.unreachable_grace_s:
                raise PromptLost(f"ComfyUI at {self.client.url} stopped answering while prompt "
                                 f"{self.prompt_id} was on it: {exc}") from None
            return None
        self._unreachable_since = None
        if entry is not None:
            return entry
        self._missing += 1
        if self._missing >= MISSING_CHECKS_TO_LOSE:
            raise PromptLost(f"ComfyUI at {self.client.url} no longer knows prompt "
                             f"{self.prompt_id}: it is in neither its queue nor its history "
                             "(did the server restart?)")
        return None

    def _waiting(self, position: int) -> None:
        """Still in the server's queue, ``position`` (1: next to run)."""
        if position != self.position:
            self.position = position
            self._report(None, f"waiting on {self.client.url}, position {position}")

    async def cancel(self) -> None:
        """Take the prompt off the server: delete it while it waits, interrupt it while it runs
        (only when it is ours that runs: older servers interrupt whatever runs)."""
        url, prompt_id = self.client.url, self.prompt_id
        try:
            for _ in range(3):  # a prompt deleted just as it started is running: look again
                queue = await self.client.queue()
                if prompt_id in queue.running_ids:
                    logger.info("interrupting prompt {} on {}", prompt_id, url)
                    await self.client.interrupt(prompt_id)
                    break
                if prompt_id not in queue.pending_ids:
                    return  # already over
                logger.info("deleting prompt {} from the queue of {}", prompt_id, url)
                await self.client.delete_pending(prompt_id)
            await self._wait_until_gone()
        except SdxlError as exc:
            logger.warning("could not take prompt {} off {}: {}", prompt_id, url, exc)

    async def _wait_until_gone(self) -> None:
        deadline = self._clock() + self.settings.stop_wait_s
        while self._clock() < deadline:
            queue = await self.client.queue()
            if self.prompt_id not in queue.running_ids + queue.pending_ids:
                return
            await asyncio.sleep(TICK_S)
        logger.warning("prompt {} is still on {} {:g} s after it was stopped",
                       self.prompt_id, self.client.url, self.settings.stop_wait_s)
