"""API-format workflows from the ``workflows`` folder: read, checked, and their overrides.

A workflow in ComfyUI's API format maps node ids to ``{"class_type", "inputs", "_meta"}``;
an input that is a link is ``[node id, output index]``.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError

from kinod.params import format_validation_error
from kinod.plugins.sdxl.errors import InvalidJob

MAX_WORKFLOW_BYTES = 4 * 1024 * 1024  # ComfyUI's own exports are tens of kilobytes
SEED_INPUTS = ("seed", "noise_seed")  # what "control after generate" randomizes in the UI
RANDOM_SEED_LIMIT = 2**53  # exact in any JSON reader
EXPORT_HINT = ("export it in API format: in ComfyUI, open the workflow and choose "
               "Workflow > Export (API) (older versions: enable the dev mode options in the "
               "settings, then Save (API Format))")


class _Meta(BaseModel):
    model_config = ConfigDict(extra="allow")
    title: str | None = None


class ApiNode(BaseModel):
    model_config = ConfigDict(extra="allow")
    class_type: str
    inputs: dict[str, Any] = {}
    meta: _Meta | None = Field(default=None, alias="_meta")


class ApiWorkflow(RootModel[dict[str, ApiNode]]):
    pass


def load_workflow(folder: Path, name: str) -> dict[str, Any]:
    """The workflow ``name`` (a file in ``folder``, ``.json`` optional), checked; raises
    InvalidJob naming the file and what is wrong."""
    relative = PurePosixPath(name.replace("\\", "/"))
    if not name or relative.is_absolute() or ".." in relative.parts:
        raise InvalidJob(f"data.workflow: {name!r} must name a file inside {folder}")
    path = folder.joinpath(*relative.parts)
    if not path.is_file() and path.suffix != ".json":
        path = path.with_name(path.name + ".json")
    if not path.is_file():
        there = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.json")
                       ) if folder.is_dir() else []
        listed = ", ".join(there[:20]) or "none"
        raise InvalidJob(f"data.workflow: no workflow {name!r} in {folder} (workflows there: "
                         f"{listed})")
    size = path.stat().st_size
    if size > MAX_WORKFLOW_BYTES:
        raise InvalidJob(f"{path}: {size} bytes is more than a workflow may be "
                         f"({MAX_WORKFLOW_BYTES})")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidJob(f"{path}: not JSON ({exc})") from None
    return check_workflow(data, str(path))


def check_workflow(data: Any, where: str) -> dict[str, Any]:
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise InvalidJob(f"{where} is a workflow in ComfyUI's UI format (it has 'nodes' and "
                         f"'links'), which a server cannot run: {EXPORT_HINT}")
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict):
        data = data["prompt"]  # a saved POST /prompt body
    try:
        ApiWorkflow.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(format_validation_error(exc)[:5])
        raise InvalidJob(f"{where} is not an API-format workflow ({problems}): "
                         f"{EXPORT_HINT}") from None
    if not data:
        raise InvalidJob(f"{where} holds no nodes")
    return copy.deepcopy(data)


def find_node(workflow: dict[str, Any], ref: str) -> str:
    """The id of the node ``ref`` names: its id, or its title (``_meta.title``), which must
    be unique."""
    if ref in workflow:
        return ref
    titled = [nid for nid, node in workflow.items()
              if (node.get("_meta") or {}).get("title") == ref]
    if len(titled) == 1:
        return titled[0]
    if titled:
        raise LookupError(f"title {ref!r} names {len(titled)} nodes ({', '.join(titled)}); "
                          "use a node id")
    raise LookupError(f"no node has id or title {ref!r}")


def class_inputs(info: dict[str, Any] | None, class_type: str) -> set[str] | None:
    """The inputs the server's /object_info declares for ``class_type`` (None: unknown)."""
    if info is None or class_type not in info:
        return None
    declared = info[class_type].get("input") or {}
    return {name for group in ("required", "optional") for name in (declared.get(group) or {})}


def apply_inputs(workflow: dict[str, Any], inputs: dict[str, Any],
                 info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Set each ``"<node id or title>.<input>": value``; returns what was set, by
    ``"<node id>.<input>"``. Raises InvalidJob naming every override that names no node or
    input of the workflow (or of the node's class, per the server's ``info``)."""
    problems, applied = [], {}
    for key, value in inputs.items():
        ref, dot, name = key.rpartition(".")
        if not dot or not ref or not name:
            problems.append(f"data.inputs.{key}: write it as '<node id or title>.<input>'")
            continue
        try:
            nid = find_node(workflow, ref)
        except LookupError as exc:
            problems.append(f"data.inputs.{key}: {exc}")
            continue
        node = workflow[nid]
        known = class_inputs(info, node["class_type"])
        if name not in node["inputs"] and (known is None or name not in known):
            have = ", ".join(sorted(set(node["inputs"]) | (known or set()))) or "none"
            problems.append(f"data.inputs.{key}: node {nid} ({node['class_type']}) has no "
                            f"input {name!r} (its inputs: {have})")
            continue
        node["inputs"][name] = value
        applied[f"{nid}.{name}"] = value
    if problems:
        raise InvalidJob("; ".join(problems))
    return applied


def check_classes(workflow: dict[str, Any], info: dict[str, Any]) -> None:
    """Every node's class must be one the server has: named before anything is queued."""
    missing = sorted({node["class_type"] for node in workflow.values()
                      if node["class_type"] not in info})
    if missing:
        raise InvalidJob("the workflow uses node types the server does not have: "
                         + ", ".join(missing) + " (install the custom nodes that provide "
                         "them, or remove those nodes)")


def randomize_seeds(workflow: dict[str, Any], chosen: dict[str, Any], randomize: bool,
                    rng: random.Random | None = None) -> dict[str, int]:
    """Every seed input (``seed``, ``noise_seed``) not set by the job gets a fresh value when
    ``randomize``; returns every seed the run uses, by ``"<node id>.<input>"``."""
    rng = rng or random.SystemRandom()
    seeds = {}
    for nid, node in workflow.items():
        for name in SEED_INPUTS:
            value = node["inputs"].get(name)
            if name not in node["inputs"] or isinstance(value, list):  # absent, or a link
                continue
            key = f"{nid}.{name}"
            if randomize and key not in chosen:
                node["inputs"][name] = value = rng.randrange(RANDOM_SEED_LIMIT)
            seeds[key] = value
    return seeds
