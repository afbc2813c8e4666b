"""The plugin's settings (``plugins.sdxl`` in config.yaml) and the choice of a ComfyUI server."""

from __future__ import annotations

import asyncio
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
    # How many of this daemon's prompts may wait in each server's queue (behind the one it
    # runs); more jobs wait in kinod for a place (see slots.py).
    queue_ahead: int = Field(default=1, ge=1)

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
