"""A render succeeds only if every frame it was asked for is a readable image on disk."""

from __future__ import annotations

import os
from pathlib import Path

EXR_MAGIC = b"\x76\x2f\x31\x01"


def check_frame(path: Path) -> str | None:
    """What is wrong with the frame file at ``path``, or None if it is a readable image.
    PNG and JPEG are decoded in full by Pillow; OpenEXR, which Pillow cannot read, must
    start with its magic number and hold a header."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return "was not written"
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    if size == 0:
        return "is empty"
    from PIL import Image, UnidentifiedImageError  # here: a daemon that renders none never loads it

    try:
        if path.suffix.lower() == ".exr":
            with open(path, "rb") as file:
                head = file.read(64)
            if not head.startswith(EXR_MAGIC) or len(head) < 16:
                return "is not an OpenEXR image"
            return None
        with Image.open(path) as image:
            image.load()  # decodes every pixel: a truncated file fails here
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        return f"is not a readable image ({exc})"
    return None
