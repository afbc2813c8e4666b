"""The plugin's settings (``plugins.sdxl`` in config.yaml) and the choice of a ComfyUI server."""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kinod.params import format_validation_error

from .comfyui_client import ComfyUIClient

if TYPE_CHECKING:
    import httpx
from .errors import SdxlError, SettingsError, Unreachable

DEFAULT_URL = "http://127.0.0.1:8188"
QUEUE_PROBE_TIMEOUT_S = 5.0  # a server that takes longer to say how busy it is gets no job


class SdxlSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    comfyui_urls: list[str] = Field(default_factory=lambda: [DEFAULT_URL], min_length=1)
    request_timeout_s: float = Field(default=30.0, gt=0)
    # How often /history and /queue are asked once the websocket is gone (and, while it is
    # up, after this long without a word about our prompt, in case a message was missed).
    poll_interval_s: float = Field(default=1.0, gt=0)
    # How long a server that stopped answering mid-job gets to come back before the job fails.
    unreachable_grace_s: float = Field(default=30.0, ge=0)
    # After a stop: how long to wait for ComfyUI to confirm the prompt is gone.
    stop_wait_s: float = Field(default=5.0, ge=0)

    @field_validator("comfyui_urls", mode="before")
    @classmethod
    def _one_url_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("comfyui_urls")
    @classmethod
    def _http_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            scheme, _, rest = url.partition("://")
            if scheme not in ("http", "https") or not rest.strip("/"):
                raise ValueError(f"{url!r} is not an http:// or https:// URL")
        return [url.rstrip("/") for url in urls]

    @classmethod
    def from_plugin(cls, settings: dict[str, Any], name: str = "sdxl") -> Self:
        try:
            return cls.model_validate(settings)
        except ValidationError as exc:
            raise SettingsError("; ".join(format_validation_error(exc, f"plugins.{name}"))
                                ) from None


# Servers chosen by jobs of this process that have not posted their prompt yet: without them,
# jobs starting together would all see the same queue lengths and pick the same server.
_claims: dict[str, int] = {}
_claims_lock = threading.Lock()  # held only while choosing, never across a run


class ServerClaim:
    """A job's choice of server, counted until its prompt is in that server's queue."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._held = True

    @classmethod
    def least_busy(cls, lengths: dict[str, int]) -> ServerClaim:
        """The server with the shortest queue, counting claims; ties go to the first listed."""
        with _claims_lock:
            url = min(lengths, key=lambda u: lengths[u] + _claims.get(u, 0))
            _claims[url] = _claims.get(url, 0) + 1
        return cls(url)

    def release(self) -> None:
        with _claims_lock:
            if self._held:
                self._held = False
                _claims[self.url] -= 1
                if not _claims[self.url]:
                    del _claims[self.url]


async def queue_lengths(http: httpx.AsyncClient, urls: list[str],
                        timeout_s: float) -> dict[str, int]:
    """Running + pending prompts of each server that answers; Unreachable if none does."""

    async def length(url: str) -> int | SdxlError:
        try:
            client = ComfyUIClient(url, http, min(timeout_s, QUEUE_PROBE_TIMEOUT_S))
            return (await client.queue()).length
        except SdxlError as exc:
            return exc

    answers = dict(zip(urls, await asyncio.gather(*(length(u) for u in urls)), strict=True))
    lengths = {url: n for url, n in answers.items() if isinstance(n, int)}
    if not lengths:
        reasons = "; ".join(str(error) for error in answers.values())
        raise Unreachable(reasons if len(urls) == 1 else f"no ComfyUI server answers: {reasons}")
    return lengths
