"""Reading job files safely: is it finished, is it a file, what does it ask for."""

from __future__ import annotations

import errno
import itertools
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kinod.atomic_files import read_rest
from kinod.errors import InvalidJob
from kinod.job_document import parse_document
from kinod.models import JobSpec
from kinod.params import check_data, format_validation_error
from kinod.plugins.plugin_loader import LoadedPlugin, PluginRegistry

JOB_SUFFIXES = (".yaml", ".yml", ".json")
# Control files: an empty <id>.<kind> asks something of job <id> (kinod.control).
CONTROL_SUFFIXES = {".stop": "stop", ".hold": "hold", ".release": "release"}
IGNORED_SUFFIXES = (".tmp", ".part", "~")


@dataclass(frozen=True)
class InboxName:
    """What a name in the inbox is: a job file, a control file, or neither."""

    kind: str  # "job", "stop", "hold", "release", "pause", "ignored", "other"
    job_id: str = ""

    @classmethod
    def of(cls, name: str) -> InboxName:
        if name == ".pause" or name.startswith(".pause."):
            return cls("pause")
        if name.startswith(".") or name.endswith(IGNORED_SUFFIXES):
            return cls("ignored")
        stem, dot, suffix = name.rpartition(".")
        suffix = dot + suffix.lower()
        if not dot:
            return cls("other")
        if suffix in JOB_SUFFIXES:
            return cls("job", stem)
        if (kind := CONTROL_SUFFIXES.get(suffix)) is not None:
            return cls(kind, stem)
        return cls("other")


def _spellings(suffix: str) -> list[str]:
    """Every way of writing ``suffix`` in upper and lower case (".yaml", ".YAML", ".Yaml"...)."""
    return sorted({"".join(chars) for chars in
                   itertools.product(*({c.lower(), c.upper()} for c in suffix))})


# A job file's suffix may be written in any case: every spelling of each, the common ones
# first. 40 in all, so a look for one id stays a few dozen lstat calls, never a listing of
# an inbox that may hold 100,000 files.
_COMMON_SPELLINGS = (*JOB_SUFFIXES, *(s.upper() for s in JOB_SUFFIXES))
JOB_SUFFIX_SPELLINGS = (*_COMMON_SPELLINGS,
                        *(spelling for suffix in JOB_SUFFIXES for spelling in _spellings(suffix)
                          if spelling not in _COMMON_SPELLINGS))


def inbox_has_job(inbox: Path, job_id: str) -> bool:
    """A job file for ``job_id``, its suffix in any case, waits in ``inbox`` (not yet taken in
    by a daemon); a folder of that name is no job file."""
    return any(not stat.S_ISDIR(st.st_mode) for _, st in inbox_names_of(inbox, job_id))


def inbox_names_of(inbox: Path, job_id: str) -> Iterator[tuple[Path, os.stat_result]]:
    """The names in ``inbox`` of ``job_id`` with a job file's suffix in any case, and what
    each is (its lstat), the common spellings first."""
    for suffix in JOB_SUFFIX_SPELLINGS:
        path = inbox / f"{job_id}{suffix}"
        try:
            yield path, os.lstat(path)
        except FileNotFoundError:
            continue


def wait_before_reading_s(st: os.stat_result, now_s: float, settle_s: float,
                          arrived_by_rename: bool = False, unchanged_for_s: float = 0.0) -> float:
    """Seconds to wait until a file is surely complete; 0 when it can be read now.

    A file renamed into place is complete. Writing in place updates mtime and
    ctime together; a later rename, chmod or utime moves only ctime, so
    ctime > mtime on a non-empty file also means the writer is done (an empty
    one may have had its mode set before its first write). Otherwise the file
    must have been quiet for ``settle_s``: by its mtime, or, where a file
    server's clock runs ahead of ours, by having been seen unchanged that long.
    """
    if arrived_by_rename or (st.st_ctime_ns > st.st_mtime_ns and st.st_size > 0):
        return 0.0
    quiet_s = max(now_s - st.st_mtime, unchanged_for_s)
    return max(0.0, settle_s - quiet_s)


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
        if exc.errno == errno.ENXIO:  # a Unix socket
            raise InvalidJob("is not a regular file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidJob("is not a regular file")
        if st.st_size > max_bytes:
            raise InvalidJob(f"is {st.st_size} bytes, over the limit of {max_bytes} "
                             "(max_job_bytes)")
        raw = read_rest(fd, max_bytes)
        if len(raw) > max_bytes:
            raise InvalidJob(f"grew past the limit of {max_bytes} bytes (max_job_bytes)")
        return raw, st
    finally:
        os.close(fd)


@dataclass
class ReadJob:
    """A job file read and checked: a runnable job, or the reason it cannot run."""

    spec: JobSpec | None = None
    document: dict[str, Any] | None = None
    plugin: LoadedPlugin | None = None
    data: dict[str, Any] = field(default_factory=dict)
    error: InvalidJob | None = None
    mtime_ns: int = 0
    finished_writing: bool = False  # renamed, or touched after its last write (ctime > mtime)
    age_s: float = 0.0  # since its last write
    changed: bool = False  # rewritten while it was being read: read it again later
    raw: bytes | None = None  # what was read, to check that the file moved is the same


def read_job(path: Path, max_bytes: int, registry: PluginRegistry, now_s: float) -> ReadJob:
    """Read and check one job file. OSError (FileNotFoundError included) when it cannot be
    read now; a ReadJob with ``error`` when it can never run as written."""
    read = ReadJob()
    try:
        raw, st = read_job_bytes(path, max_bytes)
        read.raw = raw
        read.mtime_ns = st.st_mtime_ns
        read.finished_writing = st.st_ctime_ns > st.st_mtime_ns
        read.age_s = now_s - st.st_mtime
        read.document = parse_document(raw, path.suffix)
        read.spec, read.plugin, read.data = check_job(read.document, registry)
    except InvalidJob as exc:
        read.error = exc
        if not read.mtime_ns:  # refused before reading (a link, a FIFO, too big): final
            read.finished_writing = True
    read.changed = bool(read.mtime_ns) and os.lstat(path).st_mtime_ns != read.mtime_ns
    return read


def holds_bytes(path: Path, raw: bytes) -> bool:
    """``path`` (a file kinod just moved) holds exactly ``raw``. Comparing the bytes, not the
    inode: a writer renaming versions over a job file frees inodes that the next version
    may get again."""
    try:
        return read_job_bytes(path, len(raw))[0] == raw
    except (InvalidJob, OSError):
        return False


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


def recheck(document: dict[str, Any], plugin: LoadedPlugin) -> tuple[JobSpec, dict[str, Any]]:
    """The spec and data of a job ``check_job`` found valid, made again from its document."""
    return JobSpec.model_validate(document), _plugin_data(plugin, document.get("data", {}))


def _check_plugin_data(name: str, data: dict[str, Any], registry: PluginRegistry
                       ) -> tuple[LoadedPlugin, dict[str, Any]]:
    plugin = registry.get(name)
    if plugin is None:
        known = ", ".join(sorted(registry.plugins)) or "none"
        broken = " (it failed to load: see `kinod plugins`)" if name in registry.errors else ""
        raise InvalidJob(f"type: unknown plugin {name!r}{broken}; available: {known}")
    try:
        return plugin, _plugin_data(plugin, data)
    except ValidationError as exc:
        raise InvalidJob("; ".join(format_validation_error(exc, prefix="data"))) from None
    except Exception as exc:  # noqa: BLE001 - a declaration the load-time checks let through
        raise InvalidJob(f"data: plugin {name!r} cannot check its parameters: "
                         f"{type(exc).__name__}: {exc}") from None


def _plugin_data(plugin: LoadedPlugin, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` checked against the plugin's declared parameters; a copy where it declares
    none."""
    if plugin.params_model is None:
        return dict(data)
    return check_data(plugin.params_model, data)
