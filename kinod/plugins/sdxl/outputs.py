"""Saving ComfyUI's images into the job's folder, byte for byte (its PNG text chunks hold the
graph and stay readable by ComfyUI and other tools)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from kinod.atomic_files import atomic_write

from .comfyui_client import ComfyUIClient
from .errors import OutputMissing
from .messages import ImageRef

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def image_name(prompt_id: str, index: int) -> str:
    """``sdxl_<prompt id's start>_<nn>.png``: each run's images get names of their own, so a
    rerun of the job (its folder is shared by every run) never overwrites earlier ones."""
    short = re.sub(r"[^A-Za-z0-9]", "", prompt_id)[:8] or "prompt"
    return f"sdxl_{short}_{index:02d}.png"


async def save_images(client: ComfyUIClient, images: list[ImageRef], prompt_id: str,
                      output_path: Callable[[str], Path]) -> list[str]:
    """Fetch every image and write it atomically; the names written, relative to the folder."""
    names = []
    for index, image in enumerate(images):
        data = await client.fetch_image(image)
        if not data.startswith(PNG_SIGNATURE):
            raise OutputMissing(f"ComfyUI at {client.url} sent {image.filename!r} as something "
                                "other than a PNG image")
        name = image_name(prompt_id, index)
        atomic_write(output_path(name), data)
        names.append(name)
    return names
