"""A stand-in for torchvision, for the real-ComfyUI test only.

PyPI's torchvision wheels are CUDA builds that cannot load beside the CPU build of torch.
ComfyUI imports torchvision in modules that a text-to-image run never calls (Stable Cascade's
coders, the LaMa upscaler), so importing must work; using anything here raises.
"""

from torchvision import models, transforms

__version__ = "0.0.0+stub"
__all__ = ["models", "transforms"]
