"""The txt2img graph in ComfyUI's API format (node id -> class_type and inputs).

Inputs that are links name ``[node id, output index]``: CheckpointLoaderSimple gives MODEL (0),
CLIP (1) and VAE (2); the other nodes used have one output each.
"""

from __future__ import annotations

import re
from typing import Any

from .parameters import JobParams

CHECKPOINT, POSITIVE, NEGATIVE, LATENT, SAMPLER, DECODE, SAVE = "4", "6", "7", "5", "3", "8", "9"


def build_txt2img(params: JobParams, filename_prefix: str = "kinod") -> dict[str, Any]:
    """The graph ComfyUI runs for one job (the same shape as its default workflow)."""
    return {
        CHECKPOINT: {"class_type": "CheckpointLoaderSimple",
                     "inputs": {"ckpt_name": params.model_name}},
        POSITIVE: {"class_type": "CLIPTextEncode",
                   "inputs": {"text": params.prompt, "clip": [CHECKPOINT, 1]}},
        NEGATIVE: {"class_type": "CLIPTextEncode",
                   "inputs": {"text": params.negative_prompt, "clip": [CHECKPOINT, 1]}},
        LATENT: {"class_type": "EmptyLatentImage",
                 "inputs": {"width": params.width, "height": params.height,
                            "batch_size": params.batch_size}},
        SAMPLER: {"class_type": "KSampler",
                  "inputs": {"seed": params.seed, "steps": params.steps, "cfg": params.cfg_scale,
                             "sampler_name": params.sampler, "scheduler": params.scheduler,
                             "denoise": 1.0, "model": [CHECKPOINT, 0],
                             "positive": [POSITIVE, 0], "negative": [NEGATIVE, 0],
                             "latent_image": [LATENT, 0]}},
        DECODE: {"class_type": "VAEDecode",
                 "inputs": {"samples": [SAMPLER, 0], "vae": [CHECKPOINT, 2]}},
        SAVE: {"class_type": "SaveImage",
               "inputs": {"filename_prefix": filename_prefix, "images": [DECODE, 0]}},
    }


def filename_prefix_for(task_id: str) -> str:
    """The server-side file name prefix: the job's id, so the server's output folder says whose
    images are whose; only characters safe in any file name."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", str(task_id)).lstrip(".")[:64]
    return f"kinod_{safe}" if safe else "kinod"
