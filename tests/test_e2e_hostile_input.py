"""End to end: hostile input in the inbox never harms the daemon.

Each hostile input is dropped into the inbox of the real daemon (``kinod run`` in a child
process, on real folders, with real file events), and then

- it gets a clear error in its sidecar (``failed``, ``error.code`` ``invalid_job``, a
  message that names the problem and, where there is one, the field), or, where no
  sidecar can exist (names that are no job id, folders, stray ``.stop`` files), a clear
  line in the daemon's log;
- nothing is lost: the file is kept where the README says (``done/<id>/``, ``invalid/``,
  or left alone in the inbox);
- the daemon keeps serving: a good job dropped afterwards succeeds, and its process is
  still alive.

Most cases share one daemon (module scope: a start costs about a second); the flood of
10,000 files and the check of the whole folder tree get daemons of their own.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import itertools
import json
import os
import random
import re
import socket
import stat
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import (
    TERMINAL,
    WORKING_PLUGINS,
    DaemonProcess,
    assert_done,
    scripted,
    spool_files,
    wait_end,
    wait_for,
    when,
    write_config,
)

SETTLE_S = 0.3  # write_config's default for tests
RESCAN_S = 1.0  # the shared daemon's rescan interval: folders are only seen by rescans
MAX_JOB_BYTES = 1024 * 1024  # the default max_job_bytes
# A line of the daemon's text log: "2026-11-26 01:07:34.421 | WARNING | message".
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \| [A-Z]+ *\| ")
# A line of a job's own log: "2026-11-26T01:07:34.421Z WARNING message".
JOB_LOG_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z [A-Z]+ ")
# A parse that built what these inputs describe would need far more than this.
MEMORY_GROWTH_LIMIT_MIB = 40


# --- tools ----------------------------------------------------------------------------------

_drop_counter = itertools.count()


def drop_raw(inbox: Path, name: str, data: bytes, mode: int | None = None) -> Path:
    """Drop ``data`` as ``inbox/name`` the recommended way: write under a name kinod ignores,
    then rename into place (so the daemon reads it at once)."""
    tmp = inbox / f".drop.{os.getpid()}.{next(_drop_counter)}.tmp"
    tmp.write_bytes(data)
    if mode is not None:
        os.chmod(tmp, mode)
    final = inbox / name
    os.rename(tmp, final)
    return final


class LogSection:
    """What the daemon logs from now on (its log file, from its current end)."""

    def __init__(self, daemon: DaemonProcess) -> None:
        self.path = daemon.log_path
        self.start = self.path.stat().st_size

    def text(self) -> str:
        with open(self.path, "rb") as f:
            f.seek(self.start)
            return f.read().decode("utf-8", "replace")

    def wait(self, *texts: str, timeout_s: float = 10) -> str:
        def holds() -> str | None:
            text = self.text()
            return text if all(t in text for t in texts) else None

        try:
            return wait_for(holds, timeout_s, interval_s=0.05,
                            what=f"the daemon to log {texts}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; it logged:\n{self.text()[-3000:]}") from None


def assert_still_serving(daemon: DaemonProcess, tag: str, section: LogSection | None = None
                         ) -> None:
    """A good job dropped now succeeds, the daemon is alive, and it logged no internal error."""
    job_id = f"good_after_{tag}"
    daemon.drop(f"{job_id}.yaml", scripted(steps=1, step_s=0.01, tag=tag))
    sidecar = wait_end(daemon, job_id, timeout_s=20)
    assert sidecar["state"] == "succeeded", sidecar
    assert sidecar["result"]["tag"] == tag
    assert daemon.proc.poll() is None, f"the daemon died:\n{daemon.log()[-3000:]}"
    if section is not None:
        text = section.text()
        for sign in ("unexpected error", "Traceback"):
            assert sign not in text, f"the daemon logged {sign!r}:\n{text[-3000:]}"


def assert_failed_invalid(daemon: DaemonProcess, job_id: str, ext: str, named: list[str],
                          timeout_s: float = 10) -> dict[str, Any]:
    """The job ended failed as invalid_job without running, its message naming every one of
    ``named``, and its file is kept as done/<id>/1.<ext>."""
    sidecar = wait_end(daemon, job_id, timeout_s=timeout_s)
    assert sidecar["state"] == "failed", sidecar
    assert sidecar["error"]["code"] == "invalid_job", sidecar
    message = sidecar["error"]["message"]
    for fragment in named:
        assert fragment in message, f"{job_id}: {fragment!r} not named in {message!r}"
    assert sidecar["started_at"] is None, sidecar  # it never ran
    assert sidecar["finished_at"] is not None
    assert_done(daemon, job_id, [f"1.{ext}"])
    return sidecar


def kept(daemon: DaemonProcess, job_id: str, ext: str, n: int = 1) -> Path:
    return daemon.inbox / ".kinod" / "done" / job_id / f"{n}.{ext}"


def _proc_status(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])  # kB
    except OSError:
        pass
    return None


class PeakMemory:
    """The growth of the daemon's peak resident memory (VmHWM) while the ``with`` body runs."""

    def __init__(self, daemon: DaemonProcess) -> None:
        self.pid = daemon.proc.pid

    def __enter__(self) -> PeakMemory:
        with contextlib.suppress(OSError):  # clear_refs 5: the peak starts again from now
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        self.before = _proc_status(self.pid, "VmHWM")
        return self

    def __exit__(self, *exc: object) -> None:
        self.after = _proc_status(self.pid, "VmHWM")

    def assert_small(self, what: str) -> None:
        if self.before is None or self.after is None:
            return  # no /proc here: nothing to measure
        grown_mib = (self.after - self.before) / 1024
        assert grown_mib < MEMORY_GROWTH_LIMIT_MIB, (
            f"{what}: the daemon's peak memory grew by {grown_mib:.0f} MiB")


# A log line that hostile input tries to forge: it looks like the daemon's own, but the
# daemon's clock is not in 2001.
FORGED_LINE = "2001-01-01 00:00:00.000 | ERROR   | FORGED"


def assert_log_lines_intact(text: str, line_re: re.Pattern[str] = LOG_LINE) -> None:
    """Every line is one the daemon began (its format, its clock), and no terminal control
    sequence came through."""
    forged = [line for line in text.splitlines()
              if not line_re.match(line) or line.startswith(FORGED_LINE[:10])]
    assert not forged, f"log lines the daemon did not write: {forged}"
    assert "\x1b" not in text, "an escape character (terminal control) reached the log"


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One daemon for the cases that can share it; it must still stop cleanly at the end."""
    root = tmp_path_factory.mktemp("hostile")
    for folder in ("inbox", "outbox", "data/frames", "models_storage"):
        (root / folder).mkdir(parents=True)
    config = write_config(root, plugin_dirs=[str(WORKING_PLUGINS)], stop_grace=2,
                          rescan_interval_s=RESCAN_S)
    daemon = DaemonProcess(root, config).start()
    yield daemon
    if daemon.proc.poll() is not None:
        pytest.fail(f"the shared daemon died:\n{daemon.log()[-3000:]}")
    try:
        code = daemon.stop()
    except subprocess.TimeoutExpired:
        daemon.kill()
        raise
    assert code == 0, f"the shared daemon exited {code}:\n{daemon.log()[-3000:]}"


# --- 1. content that is no job: syntax, encoding, shape, size of the parse ---------------------

GARBAGE = random.Random(20261126).randbytes(64 * 1024)
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + GARBAGE[:4096]


def _deep_block_yaml(levels: int) -> bytes:
    lines = ["type: example", "data:", "  prompt: p", "  nest:"]
    lines += [" " * (2 * (i + 2)) + f"k{i}:" for i in range(levels)]
    lines.append(" " * (2 * (levels + 2)) + "leaf")
    return ("\n".join(lines) + "\n").encode()


def _deep_json_objects(levels: int) -> bytes:
    nest = '{"a": ' * levels + "1" + "}" * levels
    return ('{"type": "example", "data": {"prompt": "p", "nest": ' + nest + "}}").encode()


def _billion_laughs() -> bytes:
    """9 levels of 9 aliases each: 9**9 (387 million) strings once expanded."""
    lines = ["type: example", "data:", "  prompt: p",
             "  l0: &l0 [" + ", ".join(['"lol"'] * 9) + "]"]
    lines += [f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    return ("\n".join(lines) + "\n").encode()


def _mapping_bomb() -> bytes:
    keys = "abcdefghi"
    lines = ["type: example", "data:", "  prompt: p",
             "  m0: &m0 {" + ", ".join(f"{k}: lol" for k in keys) + "}"]
    lines += [f"  m{i}: &m{i} {{" + ", ".join(f"{k}: *m{i - 1}" for k in keys) + "}"
              for i in range(1, 9)]
    return ("\n".join(lines) + "\n").encode()


def case(job_id: str, ext: str, content: bytes, named: list[str]) -> Any:
    return pytest.param(job_id, ext, content, named, id=job_id)


# (job id, suffix, content, what the error message must name)
CONTENT_CASES = [
    case("invalid_yaml", "yaml", b"type: example\ndata: {prompt: [unclosed\n",
     ["invalid YAML", "line "]),
    case("invalid_yaml_tab", "yaml", b"type: example\ndata:\n\tprompt: p\n", ["invalid YAML"]),
    case("invalid_json", "json", b'{"type": "example", "data": ',
         ["invalid JSON", "line 1 column"]),
    case("invalid_json_quotes", "json", b"{'type': 'example'}", ["invalid JSON"]),
    case("binary_garbage_yaml", "yaml", GARBAGE, ["not UTF-8", "offset"]),
    case("binary_garbage_json", "json", GARBAGE, ["not UTF-8", "offset"]),
    case("png_named_yaml", "yaml", PNG, ["not UTF-8", "0x89", "offset 0"]),
    case("nul_bytes_yaml", "yaml", b"\0" * 4096, ["invalid YAML"]),
    case("nul_bytes_json", "json", b"\0" * 4096, ["invalid JSON"]),
    case("empty_yaml", "yaml", b"", ["is empty"]),
    case("empty_json", "json", b"", ["is empty"]),
    case("blank_yml", "yml", b" \n\t\n   \n", ["is empty"]),
    case("latin1", "yaml", "type: example\ndata: {prompt: café}\n".encode("latin-1"),
     ["not UTF-8", "0xe9"]),
    case("utf16", "json", json.dumps({"type": "example", "data": {"prompt": "p"}}).encode("utf-16"),
     ["not UTF-8", "offset 0"]),
    case("top_list_yaml", "yaml", b"- type: example\n- data: {prompt: p}\n",
     ["top level must be a mapping", "a list"]),
    case("top_list_json", "json", b'[{"type": "example", "data": {"prompt": "p"}}]',
     ["top level must be a mapping", "a list"]),
    case("top_text_yaml", "yaml", b"just some words\n", ["top level must be a mapping", "text"]),
    case("top_number_json", "json", b"42", ["top level must be a mapping", "a number"]),
    case("top_string_json", "json", b'"type: example"', ["top level must be a mapping", "text"]),
    case("top_null_yaml", "yaml", b"# only a comment\n", ["top level must be a mapping"]),
    case("top_null_json", "json", b"null", ["top level must be a mapping"]),
    case("duplicate_key_yaml", "yaml", b"type: example\ndata: {prompt: p}\ntype: scripted\n",
     ["duplicate key", "type"]),
    case("duplicate_key_json", "json",
     b'{"type": "example", "data": {"prompt": "p"}, "type": "scripted"}',
     ["duplicate key", "type"]),
    case("key_not_text", "yaml", b"type: example\ndata: {prompt: p, 1: one}\n",
     ["data:", "key 1 is not text"]),
    case("binary_value", "yaml", b"type: example\ndata: {prompt: !!binary aGVsbG8=}\n",
     ["data.prompt:", "binary"]),
    case("set_value", "yaml", b"type: example\ndata: {prompt: p, s: !!set {a, b}}\n",
     ["data.s:", "set"]),
    case("deep_yaml_flow", "yaml", b"[" * 100_000, ["nested too deeply", "64"]),
    case("deep_yaml_block", "yaml", _deep_block_yaml(200), ["nested too deeply", "64"]),
    case("deep_json_lists", "json", b"[" * 100_000 + b"]" * 100_000, ["nested too deeply", "64"]),
    case("deep_json_unclosed", "json", b'{"a": ' * 100_000, ["nested too deeply", "64"]),
    case("deep_json_objects", "json", _deep_json_objects(100), ["nested too deeply", "64"]),
    case("alias_bomb_lists", "yaml", _billion_laughs(), ["more than 100000 values", "alias"]),
    case("alias_bomb_mappings", "yaml", _mapping_bomb(), ["more than 100000 values", "alias"]),
    case("alias_recursive", "yaml", b"type: example\ndata: &d {prompt: p, self: *d}\n",
     ["refers to itself"]),
    case("too_many_values_json", "json",
     ('{"type": "example", "data": {"prompt": "p", "many": ['
      + ",".join(["0"] * 150_000) + "]}}").encode(),
     ["more than 100000 values"]),
]


@pytest.mark.parametrize(("job_id", "ext", "content", "named"), CONTENT_CASES)
def test_content_that_is_no_job_fails_with_a_clear_error(
        shared: DaemonProcess, job_id: str, ext: str, content: bytes, named: list[str]) -> None:
    section = LogSection(shared)
    with PeakMemory(shared) as memory:
        dropped_at = time.monotonic()
        drop_raw(shared.inbox, f"{job_id}.{ext}", content)
        sidecar = assert_failed_invalid(shared, job_id, ext, named)
        took_s = time.monotonic() - dropped_at
    # Refused quickly and cheaply: expanding or building any of these would take minutes
    # (or all the memory there is).
    assert took_s < 5, f"{job_id} took {took_s:.1f} s to be refused"
    memory.assert_small(job_id)
    assert sidecar["task"] is None, sidecar  # nothing usable could be parsed
    assert "NoneType" not in sidecar["error"]["message"]  # words, not Python's type names
    assert kept(shared, job_id, ext).read_bytes() == content  # kept byte for byte
    assert not (shared.inbox / f"{job_id}.{ext}").exists()
    section.wait(f"job {job_id} new -> failed")
    assert_still_serving(shared, job_id, section)


def test_a_yaml_tag_that_would_run_code_is_refused_and_runs_nothing(
        shared: DaemonProcess, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    section = LogSection(shared)
    content = (f"type: example\ndata:\n  prompt: !!python/object/apply:os.system "
               f"['touch {marker}']\n").encode()
    drop_raw(shared.inbox, "python_tag.yaml", content)
    sidecar = assert_failed_invalid(shared, "python_tag", "yaml",
                                    ["invalid YAML", "python/object/apply"])
    assert sidecar["task"] is None
    assert not marker.exists(), "a YAML tag ran code in the daemon"
    assert kept(shared, "python_tag", "yaml").read_bytes() == content
    assert_still_serving(shared, "python_tag", section)


def test_an_empty_file_written_in_place_fails_after_the_grace(shared: DaemonProcess) -> None:
    # Written in place (no rename): it may be a writer that has not written yet, so it gets
    # 3 x settle_s of quiet before it is failed (README, "Dropping files safely").
    section = LogSection(shared)
    created = time.monotonic()
    (shared.inbox / "touched.yaml").touch()
    assert_failed_invalid(shared, "touched", "yaml", ["is empty"])
    assert time.monotonic() - created >= 3 * SETTLE_S - 0.05
    assert kept(shared, "touched", "yaml").read_bytes() == b""
    assert_still_serving(shared, "touched", section)


# A number parameter with no bounds would take these, and the sidecar, being JSON, could
# not show them: the README counts them among the values JSON cannot hold.
@pytest.mark.parametrize(("name", "content"), [
    ("nan_json.json", b'{"type": "scripted", "data": {"steps": 0, "max_wait_s": NaN}}'),
    ("infinity_json.json",
     b'{"type": "scripted", "data": {"steps": 0, "max_wait_s": -Infinity}}'),
    ("inf_yaml.yaml", b"type: scripted\ndata: {steps: 0, max_wait_s: .inf}\n"),
    ("nan_yaml.yaml", b"type: scripted\ndata: {steps: 0, max_wait_s: .nan}\n"),
], ids=["json_NaN", "json_minus_Infinity", "yaml_inf", "yaml_nan"])
def test_values_json_cannot_hold_nan_and_infinity_fail_the_job(
        shared: DaemonProcess, name: str, content: bytes) -> None:
    job_id, _, ext = name.rpartition(".")
    section = LogSection(shared)
    drop_raw(shared.inbox, name, content)
    assert_failed_invalid(shared, job_id, ext, ["data.max_wait_s:"])
    assert not (shared.frames / job_id / "runs.log").exists()  # it never ran
    assert kept(shared, job_id, ext).read_bytes() == content
    assert_still_serving(shared, job_id, section)


# --- 2. too big -----------------------------------------------------------------------------------


def test_a_file_over_max_job_bytes_is_refused_without_being_read(shared: DaemonProcess) -> None:
    size = 50 * 1024 * 1024
    section = LogSection(shared)
    tmp = shared.inbox / ".big.yaml.tmp"
    with open(tmp, "wb") as f:  # a valid start, then 50 MiB of (sparse) zeros
        f.write(b"type: example\ndata: {prompt: p}\nname: ")
        f.truncate(size)
    with PeakMemory(shared) as memory:
        os.rename(tmp, shared.inbox / "big.yaml")
        assert_failed_invalid(shared, "big", "yaml",
                              [str(size), str(MAX_JOB_BYTES), "max_job_bytes"], timeout_s=10)
    memory.assert_small("a 50 MiB job file")
    assert os.stat(kept(shared, "big", "yaml")).st_size == size  # kept whole
    assert_still_serving(shared, "big", section)


def test_max_job_bytes_is_a_limit_to_the_byte(shared: DaemonProcess) -> None:
    section = LogSection(shared)

    def job_of(size: int) -> bytes:
        head = b"type: scripted\ndata: {steps: 0}\nname: "
        return head + b"x" * (size - len(head) - 1) + b"\n"

    at_limit, over = job_of(MAX_JOB_BYTES), job_of(MAX_JOB_BYTES + 1)
    drop_raw(shared.inbox, "at_limit.yaml", at_limit)
    drop_raw(shared.inbox, "over_limit.yaml", over)
    assert wait_end(shared, "at_limit")["state"] == "succeeded"
    assert_failed_invalid(shared, "over_limit", "yaml",
                          [str(MAX_JOB_BYTES + 1), str(MAX_JOB_BYTES), "max_job_bytes"])
    assert kept(shared, "over_limit", "yaml").read_bytes() == over
    assert_still_serving(shared, "limit", section)


# --- 3. names -------------------------------------------------------------------------------------

# Not valid ids (letters, digits, '.', '_', '-'; at most 128; not starting with '.'): moved
# to invalid/ under the same name, logged, no sidecar. "Letters" are ASCII letters: the
# README does not say so outright, but the daemon and `kinod validate` both refuse others.
BAD_NAMES = [
    ("space", "sp ace.yaml"),
    ("unicode", "ünï.yaml"),
    ("newline", "new\nline.yaml"),
    ("tab", "ta\tb.json"),
    ("colon", "co:lon.yml"),
    ("shell", "$(touch x);y.yaml"),
    ("not_utf8", os.fsdecode(b"\xff\xfe.yaml")),
    ("too_long", "l" * 129 + ".yaml"),
]


@pytest.mark.parametrize(("tag", "name"), BAD_NAMES, ids=[tag for tag, _ in BAD_NAMES])
def test_a_name_that_is_no_job_id_is_set_aside_and_logged(
        shared: DaemonProcess, tag: str, name: str) -> None:
    section = LogSection(shared)
    content = yaml.safe_dump(scripted(steps=0, tag=tag)).encode()
    drop_raw(shared.inbox, name, content)
    moved = shared.inbox / ".kinod" / "invalid" / name
    wait_for(lambda: os.path.lexists(moved), 10, what=f"{name!r} to be moved to invalid/")
    assert moved.read_bytes() == content
    assert not os.path.lexists(shared.inbox / name)
    section.wait(f"{name!r}: not a valid job id")
    stem = name.rpartition(".")[0]
    assert not os.path.lexists(shared.outbox / f"{stem}.json")  # no sidecar: no id
    assert_still_serving(shared, f"name_{tag}", section)


def test_the_same_bad_name_twice_keeps_both_files(shared: DaemonProcess) -> None:
    name = "t" * 250 + ".yaml"  # 255 bytes: the longest name a file system allows
    invalid = shared.inbox / ".kinod" / "invalid"
    section = LogSection(shared)
    drop_raw(shared.inbox, name, b"first\n")
    wait_for(lambda: (invalid / name).exists(), 10, what="the first file to be set aside")
    drop_raw(shared.inbox, name, b"second\n")
    second = invalid / f"{name[:200]}.2"
    wait_for(lambda: second.exists(), 10, what="the second file to be set aside beside it")
    assert (invalid / name).read_bytes() == b"first\n"
    assert second.read_bytes() == b"second\n"
    assert_still_serving(shared, "bad_name_twice", section)


# Valid ids, however odd they look: each runs as a job of that id.
ODD_VALID_NAMES = [
    ("dots", "a..b.yaml", "a..b", "yaml"),
    ("dash", "-.yaml", "-", "yaml"),
    ("trailing_dot", "trailing..json", "trailing.", "json"),
    ("stop_in_id", "x.stop.json", "x.stop", "json"),
    ("upper_suffix", "SHOUT.YAML", "SHOUT", "yaml"),
    ("max_length", "i" * 128 + ".yml", "i" * 128, "yml"),
]


@pytest.mark.parametrize(("tag", "name", "job_id", "ext"), ODD_VALID_NAMES,
                         ids=[tag for tag, *_ in ODD_VALID_NAMES])
def test_odd_but_valid_names_run_as_jobs_of_that_id(
        shared: DaemonProcess, tag: str, name: str, job_id: str, ext: str) -> None:
    section = LogSection(shared)
    drop_raw(shared.inbox, name, json.dumps(scripted(steps=0, tag="odd")).encode())
    sidecar = wait_end(shared, job_id)
    assert sidecar["state"] == "succeeded", sidecar
    assert sidecar["id"] == job_id
    assert sidecar["result"]["tag"] == "odd"
    assert_done(shared, job_id, [f"1.{ext}"])
    assert (shared.frames / job_id).is_dir()
    assert_still_serving(shared, f"odd_{tag}", section)


IGNORED_NAMES = ["..yaml", ".yaml", "...json", ".x.stop", "..stop"]


def test_names_starting_with_a_dot_are_never_touched(shared: DaemonProcess) -> None:
    section = LogSection(shared)
    body = yaml.safe_dump(scripted(steps=0)).encode()
    for name in IGNORED_NAMES:
        (shared.inbox / name).write_bytes(body)
    before = {name: os.stat(shared.inbox / name) for name in IGNORED_NAMES}
    # A folder is only seen by a full rescan: once it is warned about, a rescan has looked
    # at every name in the inbox, these included.
    (shared.inbox / "rescan_probe.yaml").mkdir()
    section.wait("rescan_probe.yaml: a folder", timeout_s=10 * RESCAN_S)
    for name, st in before.items():
        now = os.stat(shared.inbox / name)
        assert (now.st_ino, now.st_mtime_ns, now.st_size) == (
            st.st_ino, st.st_mtime_ns, st.st_size), name
        assert (shared.inbox / name).read_bytes() == body
        assert not os.path.lexists(shared.inbox / ".kinod" / "invalid" / name)
    for stem in ("", ".", ".."):
        assert not os.path.lexists(shared.outbox / f"{stem}.json")
    assert_still_serving(shared, "dot_names", section)


def test_control_characters_in_names_never_forge_log_lines(shared: DaemonProcess) -> None:
    section = LogSection(shared)
    bad_id = f"forge\n{FORGED_LINE}-A.yaml"
    other = "forge\x1b[2J\nFORGED-B.txt"
    folder = f"forge\n{FORGED_LINE}-C.yaml"
    drop_raw(shared.inbox, bad_id, b"type: example\n")
    drop_raw(shared.inbox, other, b"x\n")
    (shared.inbox / folder).mkdir()
    text = section.wait("FORGED-A", "FORGED-B", "FORGED-C", timeout_s=10 * RESCAN_S)
    assert os.path.lexists(shared.inbox / ".kinod" / "invalid" / bad_id)
    assert_still_serving(shared, "forged_names", section)
    assert_log_lines_intact(text)


def test_control_characters_in_a_job_file_never_forge_log_lines(shared: DaemonProcess) -> None:
    section = LogSection(shared)
    key = f"x\x1b[31m\n{FORGED_LINE}-D"
    drop_raw(shared.inbox, "forged_key.json",
             json.dumps({"type": "example", "data": {"prompt": "p"}, key: 1}).encode())
    sidecar = assert_failed_invalid(shared, "forged_key", "json", [key, "unknown key"])
    assert sidecar["task"][key] == 1  # the sidecar, being JSON, holds it safely
    text = section.wait("FORGED-D")
    assert_still_serving(shared, "forged_key", section)
    assert_log_lines_intact(text)
    assert_log_lines_intact((shared.outbox / "forged_key.log").read_text(), JOB_LOG_LINE)


# --- 4. things that are no regular file -----------------------------------------------------


def test_a_folder_named_like_a_job_is_left_alone(shared: DaemonProcess) -> None:
    section = LogSection(shared)
    folder = shared.inbox / "folder_job.yaml"
    folder.mkdir()
    inner = folder / "inner.yaml"
    inner.write_text(yaml.safe_dump(scripted(steps=0)))
    before = inner.read_bytes()
    section.wait("folder_job.yaml: a folder, not a job file; left alone",
                 timeout_s=10 * RESCAN_S)
    assert folder.is_dir() and inner.read_bytes() == before
    assert shared.sidecar("folder_job") is None
    assert shared.sidecar("inner") is None  # the daemon does not look inside
    assert_still_serving(shared, "folder", section)
    assert folder.is_dir() and sorted(os.listdir(folder)) == ["inner.yaml"]


def test_a_fifo_named_like_a_job_fails_and_never_hangs_the_daemon(
        shared: DaemonProcess) -> None:
    section = LogSection(shared)
    os.mkfifo(shared.inbox / "fifo_job.yaml")  # reading it, blocking, would wait forever
    sidecar = assert_failed_invalid(shared, "fifo_job", "yaml", ["not a regular file"])
    assert sidecar["task"] is None
    assert stat.S_ISFIFO(os.lstat(kept(shared, "fifo_job", "yaml")).st_mode)  # kept as it was
    assert_still_serving(shared, "fifo", section)


def test_a_socket_named_like_a_job_fails(shared: DaemonProcess) -> None:
    section = LogSection(shared)
    path = shared.inbox / "socket_job.yaml"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(str(path))
        except OSError as exc:  # e.g. a temporary folder too deep for a socket's path
            pytest.skip(f"cannot make a socket there: {exc}")
        sock.listen(1)
        assert_failed_invalid(shared, "socket_job", "yaml", ["not a regular file"])
        assert stat.S_ISSOCK(os.lstat(kept(shared, "socket_job", "yaml")).st_mode)
    finally:
        sock.close()
    assert_still_serving(shared, "socket", section)


def test_a_device_named_like_a_job_is_never_read(shared: DaemonProcess) -> None:
    section = LogSection(shared)
    path = shared.inbox / "device_job.yaml"
    try:  # a copy of /dev/zero: endless bytes to whoever reads it
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 5))
    except (PermissionError, OSError) as exc:
        pytest.skip(f"cannot make a device node: {exc}")
    with PeakMemory(shared) as memory:
        assert_failed_invalid(shared, "device_job", "yaml", ["not a regular file"])
    memory.assert_small("a device node")
    assert stat.S_ISCHR(os.lstat(kept(shared, "device_job", "yaml")).st_mode)
    assert_still_serving(shared, "device", section)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_a_file_without_read_permission_fails_and_is_kept(shared: DaemonProcess) -> None:
    section = LogSection(shared)
    content = yaml.safe_dump(scripted(steps=0)).encode()
    drop_raw(shared.inbox, "unreadable.yaml", content, mode=0o000)
    assert_failed_invalid(shared, "unreadable", "yaml", ["permission denied"])
    path = kept(shared, "unreadable", "yaml")
    os.chmod(path, 0o600)
    assert path.read_bytes() == content
    assert_still_serving(shared, "unreadable", section)


SECRET = "SECRET-OUTSIDE-7f3a"


@pytest.fixture
def outside_job(tmp_path: Path) -> Path:
    """A valid job file outside the inbox, with a secret in it."""
    path = tmp_path / "outside.yaml"
    path.write_text(yaml.safe_dump({"name": SECRET, **scripted(steps=0, tag=SECRET)}))
    return path


# kind -> the link's target, given the outside job file and the inbox
LINK_TARGETS: dict[str, Callable[[Path, Path], str]] = {
    "to_outside_file": lambda outside, inbox: str(outside),
    "relative_to_outside_file": lambda outside, inbox: os.path.relpath(outside, inbox),
    "to_etc_passwd": lambda outside, inbox: "/etc/passwd",
    "dangling": lambda outside, inbox: str(outside.parent / "no-such-file.yaml"),
    "to_dev_zero": lambda outside, inbox: "/dev/zero",
    "to_a_folder": lambda outside, inbox: str(outside.parent),
}


@pytest.mark.parametrize("kind", list(LINK_TARGETS))
def test_a_symbolic_link_is_never_followed_nor_echoed(
        shared: DaemonProcess, outside_job: Path, kind: str) -> None:
    target = LINK_TARGETS[kind](outside_job, shared.inbox)
    job_id = f"link_{kind}"
    secret_before = outside_job.read_bytes(), os.stat(outside_job).st_mtime_ns
    section = LogSection(shared)
    os.symlink(target, shared.inbox / f"{job_id}.yaml")
    sidecar = assert_failed_invalid(shared, job_id, "yaml", ["symbolic link"])
    assert sidecar["task"] is None
    text = (shared.outbox / f"{job_id}.json").read_text()
    for leak in (target, SECRET, "root:"):
        assert leak not in text, f"the sidecar echoes {leak!r}: {text}"
    job_log = (shared.outbox / f"{job_id}.log").read_text()
    assert SECRET not in job_log and "root:" not in job_log
    assert SECRET not in section.text() and "root:x:" not in section.text()
    # Never followed: the target is as it was, and the link itself is what is kept.
    assert (outside_job.read_bytes(), os.stat(outside_job).st_mtime_ns) == secret_before
    link = kept(shared, job_id, "yaml")
    assert os.path.islink(link) and os.readlink(link) == target
    assert_still_serving(shared, job_id, section)


def test_a_loop_of_symbolic_links_fails_both(shared: DaemonProcess) -> None:
    section = LogSection(shared)
    os.symlink("loop_b.yaml", shared.inbox / "loop_a.yaml")
    os.symlink("loop_a.yaml", shared.inbox / "loop_b.yaml")
    for job_id, target in (("loop_a", "loop_b.yaml"), ("loop_b", "loop_a.yaml")):
        assert_failed_invalid(shared, job_id, "yaml", ["symbolic link"])
        assert os.readlink(kept(shared, job_id, "yaml")) == target
    assert_still_serving(shared, "link_loop", section)


def test_a_link_to_another_job_in_the_inbox_runs_only_the_real_one(
        shared: DaemonProcess) -> None:
    section = LogSection(shared)
    os.symlink("twin_real.yaml", shared.inbox / "twin_link.yaml")
    shared.drop("twin_real.yaml", scripted(steps=0, tag="real"))
    real = wait_end(shared, "twin_real")
    assert real["state"] == "succeeded" and real["result"]["tag"] == "real", real
    assert_failed_invalid(shared, "twin_link", "yaml", ["symbolic link"])
    assert_done(shared, "twin_real", ["1.yaml"])
    real_kept = kept(shared, "twin_real", "yaml")
    assert not os.path.islink(real_kept) and os.lstat(real_kept).st_nlink == 1
    assert os.path.islink(kept(shared, "twin_link", "yaml"))
    assert_still_serving(shared, "link_twin", section)


# --- 5. stray .stop files -----------------------------------------------------------------------


def _make_stop(kind: str, path: Path, outside: Path) -> None:
    if kind == "symlink":
        os.symlink(outside, path)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.write_text("please stop\n")


@pytest.mark.parametrize("kind", ["file", "symlink", "fifo"])
def test_a_stop_file_for_an_unknown_id_is_logged_and_removed(
        shared: DaemonProcess, outside_job: Path, kind: str) -> None:
    section = LogSection(shared)
    job_id = f"ghost_{kind}"
    path = shared.inbox / f"{job_id}.stop"
    before = outside_job.read_bytes()
    _make_stop(kind, path, outside_job)
    wait_for(lambda: not os.path.lexists(path), 10, what=f"{path.name} to be removed")
    section.wait(f"no queued or running job {job_id}; stop request removed")
    assert shared.sidecar(job_id) is None
    assert outside_job.read_bytes() == before  # a link's target is never touched
    assert_still_serving(shared, job_id, section)


def test_a_stop_file_for_an_ended_job_is_removed_and_changes_nothing(
        shared: DaemonProcess) -> None:
    section = LogSection(shared)
    shared.drop("ended_job.yaml", scripted(steps=0))
    ended = wait_end(shared, "ended_job")
    assert ended["state"] == "succeeded", ended
    (shared.inbox / "ended_job.stop").touch()
    wait_for(lambda: not (shared.inbox / "ended_job.stop").exists(), 10,
             what="the stop file to be removed")
    section.wait("no queued or running job ended_job; stop request removed")
    assert shared.sidecar("ended_job") == ended
    assert_still_serving(shared, "stop_ended", section)


def test_a_stop_file_with_a_bad_id_is_set_aside(shared: DaemonProcess) -> None:
    section = LogSection(shared)
    drop_raw(shared.inbox, "ghost bad.stop", b"")
    wait_for(lambda: (shared.inbox / ".kinod" / "invalid" / "ghost bad.stop").exists(), 10,
             what="the stop file with a bad id to be set aside")
    section.wait("'ghost bad.stop': not a valid job id")
    assert_still_serving(shared, "stop_bad_id", section)


def test_a_stop_file_beside_a_folder_named_like_its_job_is_removed(
        shared: DaemonProcess) -> None:
    section = LogSection(shared)
    (shared.inbox / "ghost_folder.yaml").mkdir()
    section.wait("ghost_folder.yaml: a folder", timeout_s=10 * RESCAN_S)
    stop = shared.inbox / "ghost_folder.stop"
    stop.touch()
    assert_still_serving(shared, "stop_beside_folder", section)
    # Looked at when it appeared, and again by every rescan.
    wait_for(lambda: not stop.exists(), 2.5 * RESCAN_S, what="the stop file to be removed")
    section.wait("no queued or running job ghost_folder; stop request removed")


def test_a_folder_named_like_a_stop_file_is_left_alone(shared: DaemonProcess) -> None:
    section = LogSection(shared)
    (shared.inbox / "ghost_dir.stop").mkdir()
    section.wait("ghost_dir.stop: a folder, not a job file; left alone", timeout_s=10 * RESCAN_S)
    assert (shared.inbox / "ghost_dir.stop").is_dir()
    assert_still_serving(shared, "stop_folder", section)


# --- 6. job files replaced while they are read ------------------------------------------------


def _version(v: int, pad: int) -> bytes:
    """A complete job file, version ``v``: its tag at the start, and again at the very end."""
    tag = f"v{v:06d}"
    return json.dumps({"type": "scripted", "data": {"steps": 0, "tag": tag},
                       "name": "x" * pad + tag}).encode()


def _tag_of_complete(document: dict[str, Any]) -> str:
    """The version a job file is, asserting it is one complete version and not a mix."""
    tag = document["data"]["tag"]
    assert document["name"].endswith(tag), f"a mix of versions: {tag} with {document['name'][-7:]}"
    return tag


def _runs(daemon: DaemonProcess, job_id: str) -> list[tuple[dict[str, Any], bytes]]:
    """Each run of ``job_id``: (its sidecar, the job file kept for it in done/), in order."""
    done = daemon.inbox / ".kinod" / "done" / job_id
    numbers = sorted(int(name.partition(".")[0]) for name in os.listdir(done))
    assert numbers == list(range(1, len(numbers) + 1)), numbers
    runs = []
    for n in numbers:
        archived = daemon.outbox / "archive" / job_id / f"{n}.json"
        sidecar = json.loads(archived.read_text()) if n < len(numbers) else daemon.sidecar(job_id)
        runs.append((sidecar, (done / f"{n}.json").read_bytes()))
    return runs


def _ended(daemon: DaemonProcess, job_id: str, ext: str) -> bool:
    """Nothing of ``job_id`` is left in the inbox or the spool, its sidecar has ended, and
    every run's file is filed in done/ (one more than the archived sidecars)."""
    spool = daemon.inbox / ".kinod"
    name = f"{job_id}.{ext}"
    if any(os.path.lexists(folder / name)
           for folder in (daemon.inbox, spool / "queued", spool / "running" / "testnode")):
        return False
    sidecar = daemon.sidecar(job_id)
    if sidecar is None or sidecar["state"] not in TERMINAL:
        return False
    archive = daemon.outbox / "archive" / job_id
    archived = len(list(archive.glob("*.json"))) if archive.is_dir() else 0
    return len(spool_files(daemon, "done", job_id)) == archived + 1


def test_a_job_file_rewritten_in_place_runs_as_one_complete_version(
        shared: DaemonProcess) -> None:
    # A writer rewrites the same file in place, over and over, each version in two writes
    # of the same length: halfway, the file is the new first half and the old second half,
    # itself valid JSON. A job read then would be a mix of two versions.
    section = LogSection(shared)
    job_id = "churn_in_place"
    path = shared.inbox / f"{job_id}.json"
    half = len(_version(0, 20_000)) // 2
    started, v = time.monotonic(), 0
    while time.monotonic() - started < 1.0:
        data = _version(v, 20_000)
        try:
            f = open(path, "r+b", buffering=0)  # noqa: SIM115 - closed just below
        except FileNotFoundError:  # taken in meanwhile: the next version is a new file
            f = open(path, "wb", buffering=0)  # noqa: SIM115
        with f:
            f.write(data[:half])
            f.write(data[half:])
        v += 1
    last = f"v{v - 1:06d}"
    assert v > 20, f"only {v} versions written"
    wait_for(lambda: _ended(shared, job_id, "json"), 20, what="the rewritten job to end")
    runs = _runs(shared, job_id)
    for sidecar, kept_bytes in runs:
        assert sidecar["state"] == "succeeded", sidecar
        ran = _tag_of_complete(sidecar["task"])
        assert sidecar["result"]["tag"] == ran
        assert _tag_of_complete(json.loads(kept_bytes)) == ran
    # The last version is the one that finally ran, whole, and the file kept for it is it.
    final, final_bytes = runs[-1]
    assert final["task"]["data"]["tag"] == last, final
    assert final_bytes == _version(v - 1, 20_000)
    for name in spool_files(shared, "duplicates", job_id):
        kept_file = shared.inbox / ".kinod" / "duplicates" / job_id / name
        _tag_of_complete(json.loads(kept_file.read_bytes()))
    assert_still_serving(shared, "churn_in_place", section)


_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool | None:
    """Swap two names in one step (Linux renameat2); None where the system cannot.
    FileNotFoundError if ``b`` is not there."""
    if _renameat2 is None:
        return None
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code == errno.ENOENT:
        raise FileNotFoundError(code, os.strerror(code), str(b))
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return None
    raise OSError(code, os.strerror(code), str(a))


CHURN_PAD = 2000
CHURN_MIN_S, CHURN_MAX_S, CHURN_RUNS = 1.0, 5.0, 8


@pytest.fixture(scope="module")
def rename_churn(shared: DaemonProcess) -> dict[str, Any]:
    """A writer renames new versions of one job file over it in a tight loop, until the
    daemon has run it CHURN_RUNS times (or CHURN_MAX_S). It swaps each one in (renameat2's
    RENAME_EXCHANGE, where there is one) so that it gets back, and knows, every version it
    replaced itself; every other version must then be somewhere in kinod's keeping."""
    section = LogSection(shared)
    job_id = "churn_renamed"
    target = shared.inbox / f"{job_id}.json"
    tmp = shared.inbox / f".{job_id}.json.tmp"
    done = shared.inbox / ".kinod" / "done" / job_id
    displaced: set[str] = set()
    exchange: bool | None = True
    written = 0
    started = time.monotonic()
    while True:
        elapsed = time.monotonic() - started
        if elapsed > CHURN_MAX_S or (elapsed > CHURN_MIN_S and written % 100 == 0 and done.is_dir()
                                     and len(os.listdir(done)) >= CHURN_RUNS):
            break
        tmp.write_bytes(_version(written, CHURN_PAD))
        written += 1
        if exchange:
            try:
                exchange = _exchange(tmp, target)
            except FileNotFoundError:  # the daemon took the previous one in
                os.rename(tmp, target)
                continue
            if exchange:
                displaced.add(_tag_of_complete(json.loads(tmp.read_bytes())))
                tmp.unlink()
                continue
        os.replace(tmp, target)
    elapsed = time.monotonic() - started
    wait_for(lambda: _ended(shared, job_id, "json"), 30, what="the renamed-over job to end")
    kept_tags: list[str] = []
    for folder in (done, shared.inbox / ".kinod" / "duplicates" / job_id):
        for name in (os.listdir(folder) if folder.is_dir() else []):
            kept_tags.append(_tag_of_complete(json.loads((folder / name).read_bytes())))
    runs = _runs(shared, job_id)
    print(f"\nrename churn: {written} versions in {elapsed:.1f} s, {len(runs)} runs, "
          f"{len(kept_tags)} files kept, {len(displaced)} replaced by the writer")
    return {"daemon": shared, "section": section, "written": written, "elapsed": elapsed,
            "exchange": bool(exchange), "displaced": displaced, "kept": kept_tags,
            "runs": runs}


def test_a_job_file_renamed_over_in_a_tight_loop_runs_complete_versions(
        rename_churn: dict[str, Any]) -> None:
    daemon, runs = rename_churn["daemon"], rename_churn["runs"]
    assert rename_churn["written"] >= 200, rename_churn["written"]
    assert runs, "it never ran"
    for sidecar, kept_bytes in runs:
        assert sidecar["state"] == "succeeded", sidecar
        ran = _tag_of_complete(sidecar["task"])  # one complete version, never a mix
        assert sidecar["result"]["tag"] == ran
        _tag_of_complete(json.loads(kept_bytes))
    assert_still_serving(daemon, "churn_renamed", rename_churn["section"])


def test_a_job_file_renamed_over_keeps_the_file_that_ran_and_loses_none(
        rename_churn: dict[str, Any]) -> None:
    mismatched = []
    for n, (sidecar, kept_bytes) in enumerate(rename_churn["runs"], 1):
        ran, filed = sidecar["task"]["data"]["tag"], json.loads(kept_bytes)["data"]["tag"]
        if ran != filed:
            mismatched.append(f"run {n} ran {ran} but done/{n}.json is {filed}")
    # The writer's last version was never replaced: kinod keeps it (run, or set aside).
    last = f"v{rename_churn['written'] - 1:06d}"
    vanished = {last} - set(rename_churn["kept"])
    if rename_churn["exchange"]:  # any version the writer did not get back must be kept
        every = {f"v{v:06d}" for v in range(rename_churn["written"])}
        vanished |= every - rename_churn["displaced"] - set(rename_churn["kept"])
    assert not mismatched and not vanished, (
        f"{len(rename_churn['runs'])} runs; {mismatched}; versions gone unseen: "
        f"{sorted(vanished)}")


# --- 7. path-like parameters -----------------------------------------------------------------


def _tree(root: Path) -> set[str]:
    found = set()
    for folder, dirs, files in os.walk(root):  # links are not followed
        rel = os.path.relpath(folder, root)
        found.update(os.path.normpath(os.path.join(rel, name)) for name in dirs + files)
    return found


def test_path_like_parameters_write_nothing_outside_the_jobs_folders(
        kinod_root: Path, start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon()
    outside = f"/etc/kinod-hostile-{os.getpid()}"
    jobs = {
        "path_prompt": ({"type": "example",
                         "data": {"prompt": "../../../../" + outside.lstrip("/"), "steps": 1}},
                        "succeeded"),
        "path_abs_tag": (scripted(steps=1, step_s=0.01, tag=outside), "succeeded"),
        "path_rel_tag": (scripted(steps=1, step_s=0.01, tag="../../../outside-x"), "succeeded"),
        "path_name": ({"name": "../../../outside-x", "type": "example",
                       "data": {"prompt": "p", "steps": 1}}, "succeeded"),
        "path_type": ({"type": "../../../etc/passwd", "data": {}}, "failed"),
        "path_key": ({"type": "example", "data": {"prompt": "p", "../../outside-x": 1}},
                     "failed"),
    }
    before, siblings = _tree(kinod_root), set(os.listdir(kinod_root.parent))
    for job_id, (body, _) in jobs.items():
        daemon.drop(f"{job_id}.yaml", body)
    for job_id, (_, state) in jobs.items():
        sidecar = wait_end(daemon, job_id)
        assert sidecar["state"] == state, sidecar
        assert_done(daemon, job_id, ["1.yaml"])
    assert "type: unknown plugin" in daemon.sidecar("path_type")["error"]["message"]
    assert "data.../../outside-x: unknown key" in daemon.sidecar("path_key")["error"]["message"]
    ids = "|".join(re.escape(job_id) for job_id in jobs)
    allowed = re.compile(rf"outbox/({ids})\.(json|log)|data/frames/({ids})(/.*)?"
                         rf"|inbox/\.kinod/done/({ids})(/1\.yaml)?")
    after = _tree(kinod_root)
    assert sorted(p for p in after - before if not allowed.fullmatch(p)) == []
    assert sorted(before - after) == []
    assert set(os.listdir(kinod_root.parent)) == siblings
    assert not os.path.lexists(outside)
    assert daemon.stop() == 0


@pytest.mark.skipif(os.environ.get("KINOD_WATCH") == "poll", reason=(
    "measures file events; polling takes a file in within poll_interval_s (plus settle_s "
    "when its rename left no trace in its times)"))
def test_jobs_dropped_one_after_another_are_each_taken_in_at_once(
        start_daemon: Callable[..., DaemonProcess]) -> None:
    # A daemon of its own: a backlog of file events from other tests would blur the measure.
    daemon = start_daemon(rescan_interval_s=30)
    waits = []
    for n in range(5):
        job_id = f"one_after_another_{n}"
        dropped = time.monotonic()
        daemon.drop(f"{job_id}.yaml", scripted(steps=0))
        wait_for(lambda job_id=job_id: daemon.sidecar(job_id) is not None, 10,
                 interval_s=0.005, what=f"{job_id} to be taken in")
        waits.append(time.monotonic() - dropped)
    # A file renamed into place is read at once (README, "Dropping files safely"): a few
    # milliseconds, well under a second even on a loaded machine.
    assert statistics.median(waits) < 0.25, [f"{w:.3f} s" for w in waits]


# --- 8. a flood ----------------------------------------------------------------------------------

FLOOD_BAD_NAMES, FLOOD_OTHER, FLOOD_INVALID = 6500, 3000, 500  # 10,000 files in all


def test_a_flood_of_10000_hostile_files_is_worked_through_while_good_jobs_run(
        kinod_root: Path, start_daemon: Callable[..., DaemonProcess]) -> None:
    """10,000 files renamed in at once: names that are no job id (set aside), files that
    are no job files (left alone) and invalid jobs (failed); a good job dropped in the
    middle of the flood runs while the rest is still being worked through."""
    daemon = start_daemon()
    section = LogSection(daemon)
    stage = kinod_root / "stage"  # on the inbox's file system: renames from it are atomic
    stage.mkdir()
    bad_names = [f"flood {i:05d}.yaml" for i in range(FLOOD_BAD_NAMES)]
    others = [f"flood{i:05d}.txt" for i in range(FLOOD_OTHER)]
    invalid_ids = [f"flood{i:05d}" for i in range(FLOOD_INVALID)]
    for name in bad_names + others:
        (stage / name).write_bytes(b"not a job\n")
    for job_id in invalid_ids:
        (stage / f"{job_id}.json").write_bytes(b'{"type": ')
    half = FLOOD_BAD_NAMES // 2
    first = bad_names[:half] + others[:FLOOD_OTHER // 2]
    rest = bad_names[half:] + others[FLOOD_OTHER // 2:] + [f"{i}.json" for i in invalid_ids]

    started, flood_at = time.monotonic(), datetime.now(UTC)
    for name in first:
        os.rename(stage / name, daemon.inbox / name)
    daemon.drop("flood_mid.yaml", scripted(steps=1, step_s=0.01, tag="mid"))
    for name in rest:
        os.rename(stage / name, daemon.inbox / name)
    daemon.drop("flood_last.yaml", scripted(steps=1, step_s=0.01, tag="last"))
    renamed_s = time.monotonic() - started

    invalid = daemon.inbox / ".kinod" / "invalid"
    done = daemon.inbox / ".kinod" / "done"

    def worked_through() -> bool:
        return (len(os.listdir(invalid)) == FLOOD_BAD_NAMES
                and len(os.listdir(done)) == FLOOD_INVALID + 2
                and section.text().count("not a job file") == FLOOD_OTHER)

    wait_for(worked_through, 60, interval_s=0.25, what="the flood to be worked through")
    took_s = time.monotonic() - started
    print(f"\nflood of 10,000 files: renamed in {renamed_s:.2f} s, "
          f"worked through in {took_s:.2f} s")

    for job_id, tag in (("flood_mid", "mid"), ("flood_last", "last")):
        sidecar = wait_end(daemon, job_id, timeout_s=10)
        assert sidecar["state"] == "succeeded" and sidecar["result"]["tag"] == tag, sidecar
        # Once taken in, a good job is not held up by the rest of the flood: the daemon
        # starts jobs between batches of inbox files.
        waited = when(sidecar["started_at"]) - when(sidecar["created_at"])
        assert waited < timedelta(seconds=5), f"{job_id} waited {waited} to start"
        print(f"{job_id}: taken in {when(sidecar['created_at']) - flood_at} after the flood "
              f"began, started {waited} later")

    assert sorted(os.listdir(invalid)) == sorted(bad_names)
    for job_id in invalid_ids:
        sidecar = daemon.sidecar(job_id)
        assert (sidecar["state"], sidecar["error"]["code"]) == ("failed", "invalid_job"), sidecar
        assert "invalid JSON" in sidecar["error"]["message"]
    assert sorted(p.name for p in done.iterdir()) == sorted(
        invalid_ids + ["flood_mid", "flood_last"])
    left = {name for name in os.listdir(daemon.inbox) if name != ".kinod"}
    assert left == set(others)  # left alone, as they were
    digest = hashlib.sha256(b"not a job\n").hexdigest()
    assert all(hashlib.sha256((daemon.inbox / n).read_bytes()).hexdigest() == digest
               for n in others)
    assert list(stage.iterdir()) == []
    text = section.text()
    assert text.count("not a valid job id") == FLOOD_BAD_NAMES
    assert_still_serving(daemon, "flood", section)
    assert daemon.stop() == 0
