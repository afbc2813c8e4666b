"""Who may ask: the bearer token, and, without one, the loopback-only guards.

With ``http.token_file`` every request but ``/healthz`` needs ``Authorization: Bearer
<token>``; the dashboard's page and its static files (no farm data in them) are open, so
a browser can load the page that asks for the token, and ``GET /api/v1/events`` also
takes a ticket (kinod.api.dashboard_tickets), since a browser's EventSource cannot send
the header. Without a token the API listens on loopback only; a web page the user opens could
still make the browser send requests there, so then a request must name a loopback host
(against DNS rebinding) and a browser's cross-site request is refused (its ``Origin`` names
another site); curl and scripts send no ``Origin``.
"""

from __future__ import annotations

import hmac
import ipaddress
from pathlib import Path
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kinod.api.dashboard_tickets import Tickets
from kinod.api.errors import error_response
from kinod.errors import ConfigError

OPEN_PATHS = frozenset({"/healthz", "/"})
OPEN_PREFIX = "/ui/"  # the dashboard's static files
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def read_token(path: Path | None) -> str | None:
    """The token in ``http.token_file`` (surrounding white space dropped); ConfigError naming
    the key when the file cannot be read or holds none."""
    if path is None:
        return None
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"http.token_file: cannot read {path}: {reason}") from None
    if not token:
        raise ConfigError(f"http.token_file: {path} holds no token")
    if not token.isascii() or not token.isprintable() or " " in token:
        raise ConfigError(f"http.token_file: {path}: a token is one word of printable ASCII")
    return token


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower().rstrip(".")
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_of(authority: str) -> str:
    """``127.0.0.1:8000`` -> ``127.0.0.1``; ``[::1]:8000`` -> ``::1``."""
    if authority.startswith("["):
        return authority[1:].partition("]")[0]
    return authority.rpartition(":")[0] if authority.count(":") == 1 else authority


class Guard:
    """Pure ASGI, so streamed responses (the event stream) pass through untouched."""

    def __init__(self, app: ASGIApp, token: str | None, max_body_bytes: int,
                 tickets: Tickets | None = None) -> None:
        self.app = app
        self.token = token.encode() if token is not None else None
        self.max_body_bytes = max_body_bytes
        self.tickets = tickets

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is None:
            await self.app(scope, self._limited(receive), send)
            return
        status, code, message = refusal
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        await error_response(status, code, message, headers=headers)(scope, receive, send)

    def _limited(self, receive: Receive) -> Receive:
        """``receive``, raising 413 (answered by the app's handler, in JSON) once a body
        sent without a Content-Length grows past the limit."""
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise HTTPException(413)
            return message

        return limited

    def _refusal(self, scope: Scope) -> tuple[int, str, str] | None:
        headers = Headers(scope=scope)
        refusal = self._who(scope, headers)
        if refusal is None and self._too_large(headers):
            # Not FastAPI's max_body_size: it answers 413 in plain text, not in JSON.
            return 413, "too_large", "the request body is larger than max_job_bytes"
        return refusal

    def _too_large(self, headers: Headers) -> bool:
        length = headers.get("content-length", "")
        return length.isascii() and length.isdigit() and int(length) > self.max_body_bytes

    def _who(self, scope: Scope, headers: Headers) -> tuple[int, str, str] | None:
        if self.token is not None:
            if scope["path"] in OPEN_PATHS or scope["path"].startswith(OPEN_PREFIX):
                return None
            if self.tickets is not None and self.tickets.opens(
                    scope["method"], scope["path"], scope.get("query_string", b"")):
                return None
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    given.strip().encode(errors="replace"), self.token):
                return 401, "unauthorized", "a valid `Authorization: Bearer <token>` is needed"
            return None
        if not is_loopback(_host_of(headers.get("host", "localhost"))):
            return 403, "forbidden", "without a token, requests must name a loopback host"
        origin = headers.get("origin")  # "null" from a sandboxed page or a file: refused too
        if origin is not None and not is_loopback(urlsplit(origin).hostname or ""):
            return 403, "forbidden", "cross-site requests are refused"
        return None
