"""torchvision.models, as far as ComfyUI names it: nothing here can be built."""

from __future__ import annotations

from typing import Any


def efficientnet_v2_s(*args: Any, **kwargs: Any) -> Any:
    raise NotImplementedError("torchvision is a stub here: efficientnet_v2_s is unavailable")
