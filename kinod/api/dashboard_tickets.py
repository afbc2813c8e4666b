"""Tickets for the event stream: how a browser page follows ``/api/v1/events`` with a token.

A browser's ``EventSource`` cannot send an ``Authorization`` header. So, with a token
configured, a page asks ``POST /api/v1/events/ticket`` (with the bearer token, like any
request) for a ticket, and opens ``/api/v1/events?ticket=<ticket>``. A ticket is
``<expiry>.<HMAC-SHA256>`` under a key drawn at random when the API starts: it opens the
event stream only (no other path, no other method), for ``TICKET_TTL_S`` seconds, and dies
with the process. A stream opened in time stays open; a page whose ticket ran out asks for
another.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from kinod.api.schemas import ERRORS

EVENTS_PATH = "/api/v1/events"
TICKET_TTL_S = 60

router = APIRouter(responses=ERRORS)


class Tickets:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._key = secrets.token_bytes(32)
        self._clock = clock

    def _sign(self, expiry: str) -> str:
        return hmac.new(self._key, b"events:" + expiry.encode(), hashlib.sha256).hexdigest()

    def issue(self) -> str:
        expiry = str(int(self._clock()) + TICKET_TTL_S)
        return f"{expiry}.{self._sign(expiry)}"

    def valid(self, ticket: str) -> bool:
        expiry, _, signature = ticket.partition(".")
        if not (expiry.isascii() and expiry.isdigit() and len(expiry) < 16):
            return False
        if not hmac.compare_digest(signature.encode(errors="replace"),
                                   self._sign(expiry).encode()):
            return False
        return self._clock() <= int(expiry)

    def opens(self, method: str, path: str, query_string: bytes) -> bool:
        """The request is ``GET /api/v1/events?ticket=...`` with a valid ticket."""
        if method != "GET" or path != EVENTS_PATH or len(query_string) > 1000:
            return False
        given = parse_qs(query_string.decode("latin-1")).get("ticket", [])
        return len(given) == 1 and self.valid(given[0])


class Ticket(BaseModel):
    ticket: str = Field(description="pass as `?ticket=` to `GET /api/v1/events`")
    expires_in_s: int


@router.post("/api/v1/events/ticket", tags=["events"])
async def events_ticket(request: Request) -> Ticket:
    """A short-lived ticket that opens the event stream (`GET /api/v1/events?ticket=`) for
    a browser's EventSource, which cannot send the bearer token."""
    return Ticket(ticket=request.app.state.tickets.issue(), expires_in_s=TICKET_TTL_S)
