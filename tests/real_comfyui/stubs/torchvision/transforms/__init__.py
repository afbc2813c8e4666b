"""torchvision.transforms, as far as ComfyUI imports it."""

from torchvision.transforms import functional

__all__ = ["functional"]
