"""A render succeeds only if every frame it was asked for is a readable image on disk.

Frames are checked as Blender says it saved them, while it renders the next one; when it
ends, a frame checked then is taken as it was only if it is still the same file (the same
inode, size, modification and change times), and checked again otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

EXR_MAGIC = b"\x76\x2f\x31\x01"

# What identifies the file a frame was checked as: a file replaced, rewritten or truncated
# since has another inode, size or change time (the change time cannot be set back).
Signature = tuple[int, int, int, int, int]


def _signature(st: os.stat_result) -> Signature:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def check_frame(path: Path) -> str | None:
    """What is wrong with the frame file at ``path``, or None if it is a readable image.
    PNG and JPEG are decoded in full by Pillow; OpenEXR, which Pillow cannot read, must
    start with its magic number and hold a header."""
    return _check(path)[0]


def _check(path: Path) -> tuple[str | None, Signature | None]:
    """(what is wrong, or None; the file's signature if it was the same file all along)."""
    try:
        file = open(path, "rb")  # noqa: SIM115 - closed below, whatever happens
    except FileNotFoundError:
        return "was not written", None
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}", None
    try:
        before = os.fstat(file.fileno())
        if before.st_size == 0:
            return "is empty", None
        problem = _read(path, file)
        after = os.fstat(file.fileno())
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}", None
    finally:
        file.close()
    same = _signature(before) == _signature(after)  # not written to while it was read
    return problem, _signature(after) if same else None


def _read(path: Path, file) -> str | None:
    if path.suffix.lower() == ".exr":
        head = file.read(64)
        if not head.startswith(EXR_MAGIC) or len(head) < 16:
            return "is not an OpenEXR image"
        return None
    from PIL import Image, UnidentifiedImageError  # here: a daemon that renders none never loads it
    try:
        with Image.open(file) as image:
            # load(), not verify(): verify() reads a PNG's chunks and their checksums without
            # decompressing the pixels. load() decodes every pixel: a truncated file fails here.
            image.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        return f"is not a readable image ({exc})"
    return None


class FrameChecks:
    """The frames of one render, checked early (``early``) and then for good (``final``)."""

    def __init__(self) -> None:
        self._good: dict[Path, Signature] = {}

    def early(self, path: Path) -> None:
        """Check ``path`` now, as Blender says it saved it. A problem is not reported here:
        the final check, after Blender has ended, finds it again and says it."""
        problem, signature = _check(path)
        if problem is None and signature is not None:
            self._good[path] = signature

    def final(self, path: Path) -> str | None:
        """What is wrong with ``path`` now, or None: a frame found good early and still the
        same file is not read again."""
        signature = self._good.pop(path, None)
        if signature is not None:
            try:
                if _signature(os.stat(path)) == signature:
                    return None
            except OSError:
                pass  # gone or unreadable since: the full check says which
        return check_frame(path)
