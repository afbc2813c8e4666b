"""Reading job files safely: is it finished, is it a file, what does it ask for."""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kinod.errors import InvalidJob
from kinod.models import JobSpec
from kinod.params import format_validation_error
from kinod.plugins.plugin_loader import LoadedPlugin, PluginRegistry

JOB_SUFFIXES = (".yaml", ".yml", ".json")
STOP_SUFFIX = ".stop"
IGNORED_SUFFIXES = (".tmp", ".part", "~")
# Bounds on what a parsed job may hold, so that YAML alias bombs and absurd
# nesting are refused instead of eating memory or the stack.
MAX_NODES = 100_000
MAX_DEPTH = 64


@dataclass(frozen=True)
class InboxName:
    """What a name in the inbox is: a job file, a stop request, or neither."""

    kind: str  # "job", "stop", "ignored", "other"
    job_id: str = ""

    @classmethod
    def of(cls, name: str) -> InboxName:
        if name.startswith(".") or name.endswith(IGNORED_SUFFIXES):
            return cls("ignored")
        stem, dot, suffix = name.rpartition(".")
        suffix = dot + suffix.lower()
        if not dot:
            return cls("other")
        if suffix in JOB_SUFFIXES:
            return cls("job", stem)
        if suffix == STOP_SUFFIX:
            return cls("stop", stem)
        return cls("other")


def wait_before_reading_s(st: os.stat_result, now_s: float, settle_s: float,
                          arrived_by_rename: bool = False) -> float:
    """Seconds to wait until a file is surely complete; 0 when it can be read now.

    A file renamed into place is complete. Writing in place updates mtime and
    ctime together; a later rename, chmod or utime only moves ctime, so
    ctime > mtime also means the writer is done. Otherwise the file must have
    been quiet (mtime unchanged) for ``settle_s``.
    """
    if arrived_by_rename or st.st_ctime_ns > st.st_mtime_ns:
        return 0.0
    return max(0.0, settle_s - (now_s - st.st_mtime))


def read_job_bytes(path: Path, max_bytes: int) -> tuple[bytes, os.stat_result]:
    """The file's bytes and its stat; InvalidJob for what is not a readable regular file.

    Opens without following links and without blocking, so a symlink is never
    followed and a FIFO never hangs the daemon.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InvalidJob("is a symbolic link; kinod never follows links in the inbox") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise InvalidJob("cannot be read: permission denied") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidJob("is not a regular file")
        if st.st_size > max_bytes:
            raise InvalidJob(f"is {st.st_size} bytes, over the limit of {max_bytes} "
                             "(max_job_bytes)")
        chunks, total = [], 0
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise InvalidJob(f"grew past the limit of {max_bytes} bytes (max_job_bytes)")
        return b"".join(chunks), st
    finally:
        os.close(fd)


def parse_document(raw: bytes, suffix: str) -> dict[str, Any]:
    """The job file's mapping as written; InvalidJob if it is not one (syntax, encoding, size)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidJob(f"is not UTF-8 text (byte {exc.object[exc.start]:#04x} "
                         f"at offset {exc.start})") from None
    if not text.strip():
        raise InvalidJob("is empty")
    try:
        if suffix.lower() == ".json":
            document = json.loads(text)
        else:
            document = yaml.load(text, Loader=yaml.CSafeLoader)
    except json.JSONDecodeError as exc:
        raise InvalidJob(f"invalid JSON: {exc.msg} at line {exc.lineno} "
                         f"column {exc.colno}") from None
    except yaml.YAMLError as exc:
        raise InvalidJob(f"invalid YAML: {_one_line(exc)}") from None
    except RecursionError:
        raise InvalidJob(f"nested too deeply (more than {MAX_DEPTH} levels)") from None
    if not isinstance(document, dict):
        raise InvalidJob(f"the top level must be a mapping, not {_kind(document)}")
    _check_bounds(document)
    return document


def check_job(document: dict[str, Any], registry: PluginRegistry | None
              ) -> tuple[JobSpec, LoadedPlugin | None, dict[str, Any]]:
    """The job, its plugin and its data checked against the plugin's declared parameters.

    InvalidJob names every offending field at once: the job's own keys and the
    plugin's parameters are both checked even when one of them is wrong.
    With ``registry`` None only the job's own keys are checked.
    """
    problems: list[str] = []
    spec = None
    try:
        spec = JobSpec.model_validate(document)
    except ValidationError as exc:
        problems += format_validation_error(exc)
    plugin, data = None, {}
    plugin_name, raw_data = document.get("type"), document.get("data", {})
    if registry is not None and isinstance(plugin_name, str) and isinstance(raw_data, dict):
        try:
            plugin, data = _check_plugin_data(plugin_name, raw_data, registry)
        except InvalidJob as exc:
            problems.append(exc.message)
    if problems:
        raise InvalidJob("; ".join(problems))
    return spec, plugin, data


def _check_plugin_data(name: str, data: dict[str, Any], registry: PluginRegistry
                       ) -> tuple[LoadedPlugin, dict[str, Any]]:
    plugin = registry.get(name)
    if plugin is None:
        known = ", ".join(sorted(registry.plugins)) or "none"
        broken = " (it failed to load: see `kinod plugins`)" if name in registry.errors else ""
        raise InvalidJob(f"type: unknown plugin {name!r}{broken}; available: {known}")
    if plugin.params_model is None:
        return plugin, dict(data)
    try:
        checked = plugin.params_model.model_validate(data)
    except ValidationError as exc:
        raise InvalidJob("; ".join(format_validation_error(exc, prefix="data"))) from None
    except Exception as exc:  # noqa: BLE001 - a declaration the load-time checks let through
        raise InvalidJob(f"data: plugin {name!r} cannot check its parameters: "
                         f"{type(exc).__name__}: {exc}") from None
    # Defaults fill what the job left out; an optional parameter without a default stays absent.
    dumped = checked.model_dump()
    return plugin, {k: v for k, v in dumped.items()
                    if v is not None or k in checked.model_fields_set}


def _check_bounds(document: Any) -> None:
    nodes = 0
    stack = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise InvalidJob(f"holds more than {MAX_NODES} values (a YAML alias bomb?)")
        if depth > MAX_DEPTH:
            raise InvalidJob(f"nested too deeply (more than {MAX_DEPTH} levels)")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


def _kind(value: Any) -> str:
    return {list: "a list", str: "text", int: "a number", float: "a number",
            bool: "a boolean"}.get(type(value), type(value).__name__)


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())
