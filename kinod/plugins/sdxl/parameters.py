"""The sdxl job's parameters: what the plugin declares, and the checks made before anything is
sent to ComfyUI."""

from __future__ import annotations

import functools
import random
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from kinod.params import build_params_model, check_data, format_validation_error

from .errors import InvalidJob

# ComfyUI's own names (KSampler's sampler_name and scheduler lists, as the server reports in
# GET /object_info): a name the server does not know is refused here, before anything is sent.
SAMPLERS = (
    "euler", "euler_ancestral", "heun", "heunpp2", "dpm_2", "dpm_2_ancestral", "lms",
    "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m",
    "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm",
    "ddim", "uni_pc", "uni_pc_bh2",
)
SCHEDULERS = ("normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform")

SEED_MAX = 2**64 - 1  # KSampler's limit
# Random seeds stay below 2**53 so that any JSON reader (JavaScript too) keeps them exact.
RANDOM_SEED_LIMIT = 2**53
SIZE_STEP = 8  # the latent is an eighth of the image: sizes must be multiples of 8

PARAMETERS: dict[str, dict[str, Any]] = {
    "prompt": {"type": "string", "required": True, "description": "What to draw"},
    "model_name": {"type": "string", "default": "sd_xl_base_1.0.safetensors",
                   "description": "Checkpoint file in models_storage/StableDiffusion/"},
    "negative_prompt": {"type": "string", "default": "", "description": "What to avoid"},
    "width": {"type": "integer", "default": 1024, "minimum": 64, "maximum": 8192,
              "description": "Image width in pixels, a multiple of 8"},
    "height": {"type": "integer", "default": 1024, "minimum": 64, "maximum": 8192,
               "description": "Image height in pixels, a multiple of 8"},
    "steps": {"type": "integer", "default": 30, "minimum": 1, "maximum": 10000,
              "description": "Sampling steps"},
    "cfg_scale": {"type": "number", "default": 7.5, "minimum": 0.0, "maximum": 100.0,
                  "description": "How closely to follow the prompt (classifier-free guidance)"},
    "sampler": {"type": "string", "default": "dpmpp_2m_sde", "enum": list(SAMPLERS),
                "description": "ComfyUI sampler name"},
    "scheduler": {"type": "string", "default": "karras", "enum": list(SCHEDULERS),
                  "description": "ComfyUI scheduler name"},
    # No declared maximum: 2**64 - 1 is beyond what the params system can check exactly.
    "seed": {"type": "integer", "minimum": 0,
             "description": f"Noise seed, 0 to {SEED_MAX}; random when absent "
                            "(the result reports it)"},
    "batch_size": {"type": "integer", "default": 1, "minimum": 1, "maximum": 64,
                   "description": "Images made in one run"},
}


@dataclass(frozen=True)
class JobParams:
    """One job's parameters, checked and complete (the seed chosen)."""

    prompt: str
    model_name: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    cfg_scale: float
    sampler: str
    scheduler: str
    seed: int
    batch_size: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@functools.cache
def _params_model() -> type[BaseModel]:
    # The daemon checks job data with this same model; generate() may also be called directly.
    return build_params_model("sdxl", PARAMETERS)


def check_parameters(data: dict[str, Any], rng: random.Random | None = None) -> JobParams:
    """``data`` checked and completed; raises InvalidJob naming every offending field."""
    try:
        # A key given as null counts as left out: check_data fills in its default.
        values = check_data(_params_model(), data)
    except ValidationError as exc:
        raise InvalidJob("; ".join(format_validation_error(exc, "data"))) from None
    problems = [f"data.{name}: {values[name]} is not a multiple of {SIZE_STEP}"
                for name in ("width", "height") if values[name] % SIZE_STEP]
    if values.get("seed", 0) > SEED_MAX:
        problems.append(f"data.seed: must be at most {SEED_MAX}")
    if problems:
        raise InvalidJob("; ".join(problems))
    if "seed" not in values:
        values["seed"] = (rng or random.SystemRandom()).randrange(RANDOM_SEED_LIMIT)
    values["cfg_scale"] = float(values["cfg_scale"])
    return JobParams(**values)
