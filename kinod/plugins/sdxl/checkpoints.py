"""Checkpoints in models_storage/StableDiffusion/, the folder ComfyUI reads them from too
(see extra_model_paths.yaml at the repository's root)."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from .errors import InvalidJob

CHECKPOINT_FOLDER = "StableDiffusion"
# The suffixes ComfyUI lists as checkpoints.
CHECKPOINT_SUFFIXES = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
LISTED_AT_MOST = 20


def list_checkpoints(folder: Path) -> list[str]:
    """Checkpoint names as ComfyUI spells them: paths relative to ``folder``, with ``/``."""
    if not folder.is_dir():
        return []
    return sorted(
        path.relative_to(folder).as_posix() for path in folder.rglob("*")
        if path.suffix.lower() in CHECKPOINT_SUFFIXES and path.is_file()
    )


def require_checkpoint(models_dir: Path | None, model_name: str) -> Path:
    """The checkpoint's path; raises InvalidJob listing the checkpoints that are there."""
    if models_dir is None:
        raise InvalidJob("the models folder is not set (kinod sets it before generate())")
    folder = models_dir / CHECKPOINT_FOLDER
    name = PurePosixPath(model_name.replace("\\", "/"))
    if not model_name or name.is_absolute() or ".." in name.parts:
        raise InvalidJob(f"data.model_name: {model_name!r} must name a file inside {folder}")
    path = folder.joinpath(*name.parts)
    if path.is_file():
        return path
    there = list_checkpoints(folder)
    if not folder.is_dir():
        found = "that folder does not exist"
    elif not there:
        found = "that folder holds no checkpoints"
    else:
        more = len(there) - LISTED_AT_MOST
        found = "checkpoints there: " + ", ".join(there[:LISTED_AT_MOST])
        found += f" and {more} more" if more > 0 else ""
    raise InvalidJob(f"data.model_name: checkpoint {model_name!r} is not in {folder} ({found})")
