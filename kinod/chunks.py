"""Frame ranges, and a render job split into one job per chunk of frames.

A frame range is text such as ``"1-250"``, ``"1,5,10-20"`` or ``"7"`` (or the integer 7).
``kinod submit --chunk N`` and ``"chunk": N`` on ``POST /tasks`` split a job whose
``data.frames`` is one into jobs ``<id>.<first>-<last>`` of at most N frames each (the
first and last frame, at least four digits). A job that holds a ``then`` key, itself a job
(``type``, ``data``, ...), also gets a final job under its own id that runs ``after`` every
chunk: an encode, a publish.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from kinod.models import JOB_ID_RULES, MAX_AFTER, is_valid_job_id

MAX_FRAME = 1_048_574  # Blender's last frame
MAX_FRAMES = 200_000  # frames one range may name: a long film, not a typo's billion
MAX_CHUNKS = MAX_AFTER  # the final job waits on every chunk
THEN_KEY = "then"


class ChunkError(ValueError):
    """Why a job cannot be split; ``field`` is where in the job the trouble is."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def parse_frames(spec: Any) -> list[int]:
    """The frames a range names, in order, each once; ValueError says what is wrong."""
    if isinstance(spec, bool) or not isinstance(spec, (str, int)):
        raise ValueError('must be a frame range such as "1-250" or "1,5,10-20", or one frame')
    if isinstance(spec, int):
        return [_frame(spec)]
    frames: set[int] = set()
    count = 0
    for part in spec.split(","):
        first, dash, last = part.strip().partition("-")
        if not first.strip():
            raise ValueError(f"{spec!r}: empty or negative frame in {part.strip()!r}")
        start = _frame(first)
        end = _frame(last) if dash else start
        if end < start:
            raise ValueError(f"{spec!r}: the range {part.strip()} runs backwards")
        count += end - start + 1
        if count > MAX_FRAMES:
            raise ValueError(f"{spec!r}: more than {MAX_FRAMES} frames")
        frames.update(range(start, end + 1))
    return sorted(frames)


def _frame(value: str | int) -> int:
    if isinstance(value, str):
        text = value.strip()
        if not text.isdigit() or not text.isascii():
            raise ValueError(f"{value.strip()!r} is not a frame number")
        value = int(text)
    if not 0 <= value <= MAX_FRAME:
        raise ValueError(f"frame {value} is outside 0 to {MAX_FRAME}")
    return value


def format_frames(frames: list[int], dash: str = "-") -> str:
    """``[1, 2, 3, 7]`` as ``"1-3,7"`` (``dash=".."``: as Blender's ``-f`` takes it)."""
    runs: list[str] = []
    start = prev = None
    for frame in [*frames, None]:
        if prev is not None and frame == prev + 1:
            prev = frame
            continue
        if start is not None:
            runs.append(str(start) if start == prev else f"{start}{dash}{prev}")
        start = prev = frame
    return ",".join(runs)


def chunk_id(job_id: str, frames: list[int]) -> str:
    return f"{job_id}.{frames[0]:04d}-{frames[-1]:04d}"


def split_job(job_id: str, document: Any, size: int) -> list[tuple[str, dict[str, Any]]]:
    """The jobs ``document`` becomes: one per chunk of ``size`` frames, in frame order, then
    the final job of its ``then`` key, if any. ChunkError names what stands in the way."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ChunkError("chunk", "must be a whole number of frames, 1 or more")
    if not isinstance(document, dict):
        raise ChunkError("job", "must be a mapping to be split into chunks")
    data = document.get("data")
    if not isinstance(data, dict) or "frames" not in data:
        raise ChunkError("data.frames", "required to split a job into chunks")
    try:
        frames = parse_frames(data["frames"])
    except ValueError as exc:
        raise ChunkError("data.frames", str(exc)) from None
    groups = [frames[i:i + size] for i in range(0, len(frames), size)]
    then = document.get(THEN_KEY)
    if then is not None and not isinstance(then, dict):
        raise ChunkError(THEN_KEY, "must be a job (type, data, ...) to run after the chunks")
    if len(groups) > MAX_CHUNKS:
        raise ChunkError("chunk", f"{len(groups)} chunks; at most {MAX_CHUNKS}: "
                                  "make the chunks larger")
    base = {key: value for key, value in document.items() if key != THEN_KEY}
    jobs: list[tuple[str, dict[str, Any]]] = []
    for group in groups:
        piece_id = chunk_id(job_id, group)
        if not is_valid_job_id(piece_id):
            raise ChunkError("id", f"{piece_id!r} is not a valid job id ({JOB_ID_RULES})")
        piece = {**base, "data": {**data, "frames": format_frames(group)}}
        if isinstance(base.get("name"), str):
            piece["name"] = f"{base['name']} [{format_frames(group)}]"
        jobs.append((piece_id, piece))
    if then is not None:
        after = then.get("after", [])
        if not isinstance(after, list):
            raise ChunkError(f"{THEN_KEY}.after", "must be a list of job ids")
        chunk_ids = [piece_id for piece_id, _ in jobs]
        jobs.append((job_id, {**then, "after": [*after, *chunk_ids]}))
    return jobs


def encode(document: dict[str, Any], suffix: str) -> bytes:
    """A job document as a job file's bytes: JSON for ``.json``, else YAML."""
    if suffix.lower() == ".json":
        return json.dumps(document, ensure_ascii=False, allow_nan=False,
                          default=_iso).encode()
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True).encode()


def _iso(value: Any) -> str:
    if hasattr(value, "isoformat"):  # not_before, as YAML reads a date
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} cannot be written into a job file")
