"""``GET /api/v1/generator/tasks/{id}/thumbnails/{path}``: a small WebP of an image output.

Made with Pillow from a file inside ``data/frames/<id>/`` (never one outside it, as the
outputs endpoint checks), and cached beside the frames in
``data/frames/.thumbnails/<id>/`` (no job id starts with a dot, so no job's folder is ever
named so). A cached thumbnail carries its image's modification time: when the image
changes, the next request makes it again. The folder may be deleted at any time.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tempfile
import threading
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from loguru import logger
from PIL import Image, ImageOps, UnidentifiedImageError

from kinod.api.errors import ApiError
from kinod.api.schemas import ERRORS, JobId

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif",
                            ".tiff"})
SIZES_PX = (64, 128, 256, 512)  # a requested size is rounded up to one of these
MAX_SOURCE_BYTES = 512 << 20
MAX_SOURCE_PIXELS = 80_000_000  # below Pillow's own decompression-bomb warning
CACHE_FOLDER = ".thumbnails"
# Two at a time: decoding a large image is a core's work for a while.
_making = threading.BoundedSemaphore(2)

router = APIRouter(responses=ERRORS)


def _bad_path() -> ApiError:
    problem = "must be a relative path inside the task's outputs"
    return ApiError(400, "bad_request", f"path: {problem}", {"path": problem})


def source_of(frames: str, job_id: str, path: str) -> tuple[str, os.stat_result]:
    """The real path of an image output inside ``frames/<id>/``, and its status."""
    parts = path.split("/")
    if any(part in ("", ".", "..") or not part.isprintable() for part in parts):
        raise _bad_path()
    base = os.path.realpath(os.path.join(frames, job_id))
    target = os.path.realpath(os.path.join(base, *parts))
    try:
        st = os.lstat(target)
    except (OSError, ValueError):
        st = None
    if os.path.commonpath([base, target]) != base or st is None or not stat.S_ISREG(
            st.st_mode):
        raise ApiError(404, "not_found", f"task {job_id} has no output {path}")
    if os.path.splitext(target)[1].lower() not in IMAGE_SUFFIXES:
        raise ApiError(404, "not_found", f"{path} is not an image kinod makes thumbnails of")
    if st.st_size > MAX_SOURCE_BYTES:
        raise ApiError(422, "invalid", f"{path} is too large for a thumbnail")
    return target, st


def render(source: str, size_px: int) -> bytes:
    """The image, fitted into ``size_px`` square, as WebP bytes."""
    with Image.open(source) as image:
        width, height = image.size
        if width * height > MAX_SOURCE_PIXELS:
            raise ValueError(f"{width}x{height} pixels is too many for a thumbnail")
        image.draft("RGB", (size_px, size_px))  # JPEG: decode at a fraction of the size
        thumb = ImageOps.exif_transpose(image)
        thumb.thumbnail((size_px, size_px))
        if thumb.mode not in ("RGB", "RGBA"):
            thumb = thumb.convert("RGBA" if "A" in thumb.getbands() or "transparency"
                                  in thumb.info else "RGB")
        out = io.BytesIO()
        thumb.save(out, "WEBP", quality=80, method=2)
        return out.getvalue()


def _read_cached(path: str, mtime_ns: int) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_mtime_ns != mtime_ns or st.st_size > 8 << 20:
            return None
        return f.read()


def _write_cached(folder: str, name: str, data: bytes, source: os.stat_result) -> None:
    """Write the thumbnail under a new name, stamp it with its image's time, rename it in."""
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.utime(tmp, ns=(source.st_atime_ns, source.st_mtime_ns))
        os.replace(tmp, os.path.join(folder, name))
    except BaseException:
        os.unlink(tmp)
        raise


def thumbnail(frames: str, job_id: str, path: str, size_px: int) -> tuple[bytes, str]:
    """The thumbnail's bytes, from the cache or made now, and its ETag."""
    source, st = source_of(frames, job_id, path)
    size_px = next((s for s in SIZES_PX if s >= size_px), SIZES_PX[-1])
    frames_real = os.path.realpath(frames)
    folder = os.path.join(frames_real, CACHE_FOLDER, job_id)
    name = f"{hashlib.sha256(path.encode()).hexdigest()[:32]}-{size_px}.webp"
    etag = f'"{st.st_mtime_ns:x}-{st.st_size:x}-{size_px}"'
    cached = _read_cached(os.path.join(folder, name), st.st_mtime_ns)
    if cached is not None:
        return cached, etag
    with _making:
        try:
            data = render(source, size_px)
        except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError
                ) as exc:
            raise ApiError(422, "invalid", f"cannot make a thumbnail of {path}: {exc}"
                           ) from None
    # Only into a folder that is really there, under frames (no link leads it elsewhere).
    try:
        os.makedirs(folder, exist_ok=True)
        if os.path.realpath(folder) == folder:
            _write_cached(folder, name, data, st)
    except OSError as exc:
        logger.debug("thumbnail of {} {} not cached: {}", job_id, path, exc)
    return data, etag


@router.get("/api/v1/generator/tasks/{id}/thumbnails/{path:path}", tags=["outputs"],
            response_class=Response,
            responses={200: {"content": {"image/webp": {}}}})
def task_thumbnail(
        id: JobId, path: str, request: Request,  # noqa: A002
        size: Annotated[int, Query(ge=1, le=SIZES_PX[-1],
                                   description="the longer side, in pixels; rounded up to "
                                   "64, 128, 256 or 512")] = 256,
) -> Response:
    """A thumbnail (WebP) of an image in `data/frames/<id>/`: made once, kept beside the
    frames, made again when the image changes."""
    frames = str(request.app.state.api.settings.frames)
    data, etag = thumbnail(frames, id, path, size)
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(data, media_type="image/webp", headers=headers)
