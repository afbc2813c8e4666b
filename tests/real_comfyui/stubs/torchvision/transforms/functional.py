"""torchvision.transforms.functional, as far as ComfyUI imports it."""

from __future__ import annotations

from enum import Enum
from typing import Any


class InterpolationMode(Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def rotate(*args: Any, **kwargs: Any) -> Any:
    raise NotImplementedError("torchvision is a stub here: rotate is unavailable")
