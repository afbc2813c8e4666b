"""Readable messages from ComfyUI's error answers: one line, no traceback."""

from __future__ import annotations

import json
import re

from pydantic import ValidationError

from .messages import ErrorItem, NodeFailureData, PromptRejection

TEXT_AT_MOST = 300


def one_line(text: str, limit: int = TEXT_AT_MOST) -> str:
    text = re.sub(r"\s+", " ", str(text)).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _item(item: ErrorItem) -> str:
    parts = [p for p in (item.message, item.details) if p]
    return ": ".join(parts) or item.type or "unknown error"


def describe_rejection(url: str, status: int, body: str) -> str:
    """Why ComfyUI at ``url`` refused a prompt (the answer to POST /prompt)."""
    try:
        rejection = PromptRejection.model_validate(json.loads(body))
    except (ValueError, ValidationError):
        text = one_line(body) or "(no text)"
        hint = ""
        if status == 500:  # what an early-2024 server answers for a node class it lacks
            hint = " (older ComfyUI versions answer so for a node type they do not have)"
        return f"ComfyUI at {url} refused the prompt with HTTP {status}: {text}{hint}"
    problems = []
    node_errors = rejection.node_errors if isinstance(rejection.node_errors, dict) else {}
    for node_id, node in node_errors.items():
        where = f"{node.class_type} (node {node_id})" if node.class_type else f"node {node_id}"
        problems += [f"{where}: {_item(item)}" for item in node.errors]
    if not problems:
        error = rejection.error
        problems.append(_item(error) if isinstance(error, ErrorItem) else str(error or "")
                        or f"HTTP {status}")
    return one_line(f"ComfyUI at {url} refused the prompt: " + "; ".join(problems),
                    limit=2 * TEXT_AT_MOST)


def describe_failure(url: str, failure: NodeFailureData | None) -> str:
    """Why a prompt failed while ComfyUI ran it (``execution_error``)."""
    if failure is None:
        return f"ComfyUI at {url} reported an error without saying which"
    where = f"node {failure.node_id}" if failure.node_id else "a node"
    if failure.node_type:
        where += f" ({failure.node_type})"
    kind = failure.exception_type.rsplit(".", 1)[-1]
    message = one_line(failure.exception_message) or "no message"
    return f"ComfyUI at {url} failed in {where}: " + (f"{kind}: {message}" if kind else message)
