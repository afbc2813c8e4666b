"""The files a comfyui job sends (``data.images``) and the files it saves (every output)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Any

from kinod.atomic_files import atomic_write
from kinod.plugins.sdxl.comfyui_client import ComfyUIClient
from kinod.plugins.sdxl.errors import InvalidJob
from kinod.plugins.sdxl.messages import HistoryEntry

from .workflows import find_node

MAX_IMAGE_BYTES = 100 * 1024 * 1024  # ComfyUI's own max_upload_size


def image_sources(workflow: dict[str, Any], images: dict[str, Any],
                  allowed: list[Path]) -> dict[str, Path]:
    """``data.images`` (a LoadImage node's id or title -> a file) as node id -> path; each
    file must lie in one of the ``allowed`` folders (the frames and models folders)."""
    problems, found = [], {}
    roots = [folder.resolve() for folder in allowed]
    for ref, value in images.items():
        where = f"data.images.{ref}"
        try:
            nid = find_node(workflow, ref)
        except LookupError as exc:
            problems.append(f"{where}: {exc}")
            continue
        if "image" not in workflow[nid]["inputs"]:
            problems.append(f"{where}: node {nid} ({workflow[nid]['class_type']}) takes no "
                            "image (it has no input 'image'; use a LoadImage node)")
            continue
        if not isinstance(value, str) or not value:
            problems.append(f"{where}: must be the path of an image file")
            continue
        path = Path(value)
        candidates = [path] if path.is_absolute() else [root / path for root in roots]
        resolved = [c.resolve() for c in candidates]
        inside = [p for p in resolved if any(p.is_relative_to(root) for root in roots)]
        if not inside:
            problems.append(f"{where}: {value!r} is outside the folders images may come from "
                            f"({', '.join(str(r) for r in roots)})")
            continue
        existing = [p for p in inside if p.is_file()]
        if not existing:
            problems.append(f"{where}: no file {value!r} in "
                            f"{', '.join(str(r) for r in roots)}")
            continue
        if existing[0].stat().st_size > MAX_IMAGE_BYTES:
            problems.append(f"{where}: {existing[0]} is larger than {MAX_IMAGE_BYTES} bytes")
            continue
        found[nid] = existing[0]
    if problems:
        raise InvalidJob("; ".join(problems))
    return found


async def upload_images(client: ComfyUIClient, workflow: dict[str, Any],
                        sources: dict[str, Path]) -> dict[str, str]:
    """Upload each image and point its node at the name the server gave it (it renames a
    file whose name is taken); returns node id -> that name."""
    names = {}
    for nid, path in sources.items():
        name = await client.upload_image(path.name, path.read_bytes())
        workflow[nid]["inputs"]["image"] = name
        names[nid] = name
    return names


def output_name(node_id: str, prompt_id: str, index: int, server_name: str) -> str:
    """``<node>_<prompt id's start>_<nn><suffix>``: a rerun of the job never overwrites an
    earlier run's files, and each file keeps the kind ComfyUI gave it."""
    short = re.sub(r"[^A-Za-z0-9]", "", prompt_id)[:8] or "prompt"
    node = re.sub(r"[^A-Za-z0-9_-]", "_", node_id)[:32] or "node"
    suffix = re.sub(r"[^A-Za-z0-9.]", "", PurePath(server_name).suffix)[:10]
    return f"{node}_{short}_{index:02d}{suffix}"


async def save_outputs(client: ComfyUIClient, entry: HistoryEntry, prompt_id: str,
                       output_path: Callable[[str], Path]) -> list[dict[str, str]]:
    """Fetch every output file of every output node (images, ``gifs``, audio, ...; previews
    left out) and write it atomically; what was saved, in the server's order."""
    saved = []
    for node_id, output in entry.outputs.items():
        for index, (kind, ref) in enumerate(output.files()):
            data = await client.fetch_image(ref)
            name = output_name(node_id, prompt_id, index, ref.filename)
            atomic_write(output_path(name), data)
            saved.append({"node": node_id, "kind": kind, "file": name,
                          "server_file": ref.filename})
    return saved
