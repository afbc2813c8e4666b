"""Reading job files: which names count, when a file is complete, what it may hold."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import BaseModel, field_validator

from kinod import intake
from kinod.errors import InvalidJob
from kinod.intake import (
    InboxName,
    check_job,
    holds_bytes,
    inbox_has_job,
    read_job_bytes,
    wait_before_reading_s,
)
from kinod.job_document import parse_document
from kinod.models import JobState, Sidecar, utc_now
from kinod.params import build_params_model
from kinod.plugins.base_plugin import BasePlugin
from kinod.plugins.plugin_loader import LoadedPlugin

# --- InboxName -----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "kind", "job_id"), [
    ("job1.yaml", "job", "job1"),
    ("job1.yml", "job", "job1"),
    ("job1.json", "job", "job1"),
    ("Shot_010.v2-final.yaml", "job", "Shot_010.v2-final"),
    ("job1.YAML", "job", "job1"),
    ("job1.Json", "job", "job1"),
    ("job1.YML", "job", "job1"),
    ("job1.stop", "stop", "job1"),
    ("job1.STOP", "stop", "job1"),
    (".job1.yaml", "ignored", ""),
    (".hidden", "ignored", ""),
    (".kinod", "ignored", ""),
    ("job1.yaml.tmp", "ignored", ""),
    ("job1.tmp", "ignored", ""),
    ("job1.yaml.part", "ignored", ""),
    ("job1.yaml~", "ignored", ""),
    (".job1.yaml.tmp", "ignored", ""),
    ("job1.txt", "other", ""),
    ("job1.yaml.bak", "other", ""),
    ("README", "other", ""),
    ("job1.", "other", ""),
])
def test_inbox_name_classification(name: str, kind: str, job_id: str) -> None:
    result = InboxName.of(name)
    assert result.kind == kind
    assert result.job_id == job_id


# --- wait_before_reading_s -----------------------------------------------------------------

NOW_S = 1_000_000.0


def fake_stat(mtime_s: float, ctime_s: float | None = None) -> Any:
    ctime_s = mtime_s if ctime_s is None else ctime_s
    return SimpleNamespace(st_mtime=mtime_s, st_mtime_ns=int(mtime_s * 1e9),
                           st_ctime=ctime_s, st_ctime_ns=int(ctime_s * 1e9), st_size=100)


def test_a_renamed_file_is_read_at_once() -> None:
    assert wait_before_reading_s(fake_stat(NOW_S), NOW_S, 1.0, arrived_by_rename=True) == 0


def test_ctime_after_mtime_means_the_writer_is_done() -> None:
    # cp -p / scp -p set mtime back at the end; chmod or a rename moves only ctime.
    assert wait_before_reading_s(fake_stat(NOW_S - 0.01, ctime_s=NOW_S), NOW_S, 1.0) == 0


def test_a_fresh_in_place_write_waits_out_the_settle_time() -> None:
    assert wait_before_reading_s(fake_stat(NOW_S), NOW_S, 1.0) == pytest.approx(1.0)
    assert wait_before_reading_s(fake_stat(NOW_S - 0.25), NOW_S, 1.0) == pytest.approx(0.75)


def test_an_old_file_is_read_at_once() -> None:
    assert wait_before_reading_s(fake_stat(NOW_S - 5), NOW_S, 1.0) == 0
    assert wait_before_reading_s(fake_stat(NOW_S - 1.0), NOW_S, 1.0) == 0


def test_zero_settle_never_waits() -> None:
    assert wait_before_reading_s(fake_stat(NOW_S), NOW_S, 0.0) == 0


def test_real_files_written_in_place_and_touched_later(tmp_path: Path) -> None:
    path = tmp_path / "job1.yaml"
    path.write_text("type: example\n")
    st = os.stat(path)
    assert wait_before_reading_s(st, time.time(), 60.0) > 50  # just written: wait
    os.utime(path, (st.st_atime - 10, st.st_mtime - 10))  # what cp -p does at the end
    assert wait_before_reading_s(os.stat(path), time.time(), 60.0) == 0


# --- read_job_bytes ------------------------------------------------------------------------


def test_read_returns_the_bytes_and_the_stat(fs) -> None:
    fs.create_file("/inbox/job1.yaml", contents=b"type: example\n")
    raw, st = read_job_bytes(Path("/inbox/job1.yaml"), 1024)
    assert raw == b"type: example\n"
    assert st.st_size == len(raw)


def test_read_a_file_of_exactly_the_limit(fs) -> None:
    fs.create_file("/inbox/job1.yaml", contents=b"x" * 100)
    raw, _ = read_job_bytes(Path("/inbox/job1.yaml"), 100)
    assert raw == b"x" * 100


def test_read_a_file_larger_than_one_chunk(fs) -> None:
    body = b"a: " + b"x" * 200_000 + b"\n"
    fs.create_file("/inbox/job1.yaml", contents=body)
    raw, _ = read_job_bytes(Path("/inbox/job1.yaml"), 1 << 20)
    assert raw == body


def test_read_refuses_a_symlink(fs) -> None:
    fs.create_file("/etc/passwd-like", contents=b"secret")
    fs.create_symlink("/inbox/job1.yaml", "/etc/passwd-like")
    with pytest.raises(InvalidJob, match="symbolic link"):
        read_job_bytes(Path("/inbox/job1.yaml"), 1024)


def test_read_refuses_a_symlink_on_a_real_file_system(tmp_path: Path) -> None:
    (tmp_path / "target").write_text("type: example\n")
    os.symlink(tmp_path / "target", tmp_path / "job1.yaml")
    with pytest.raises(InvalidJob, match="symbolic link"):
        read_job_bytes(tmp_path / "job1.yaml", 1024)


def test_read_refuses_a_fifo_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "job1.yaml"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(InvalidJob, match="not a regular file"):
        read_job_bytes(fifo, 1024)  # no writer: a blocking open would hang here
    assert time.monotonic() - started < 5


def test_read_refuses_a_directory(tmp_path: Path) -> None:
    (tmp_path / "job1.yaml").mkdir()
    with pytest.raises(InvalidJob, match="not a regular file"):
        read_job_bytes(tmp_path / "job1.yaml", 1024)


def test_read_refuses_a_socket_as_an_invalid_job(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # socket paths are short: bind a relative name
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind("job1.yaml")
        # Not a regular file: it must be refused like a FIFO, not raise a bare OSError
        # that leaves it in the inbox to be retried forever.
        with pytest.raises(InvalidJob):
            read_job_bytes(Path("job1.yaml"), 1024)
    finally:
        server.close()


def test_read_of_a_vanished_file_raises_file_not_found(fs) -> None:
    fs.create_dir("/inbox")
    with pytest.raises(FileNotFoundError):
        read_job_bytes(Path("/inbox/gone.yaml"), 1024)


def test_read_refuses_an_oversized_file_without_reading_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = tmp_path / "job1.yaml"
    with open(big, "wb") as f:
        f.truncate(1 << 30)  # 1 GiB, sparse: costs no disk
    reads: list[int] = []
    real_read = os.read

    def counting_read(fd: int, n: int) -> bytes:
        reads.append(n)
        return real_read(fd, n)

    monkeypatch.setattr(intake.os, "read", counting_read)
    with pytest.raises(InvalidJob, match=r"1073741824 bytes, over the limit of 1024"):
        read_job_bytes(big, 1024)
    assert reads == []


def test_read_stops_a_file_that_grows_past_the_limit_while_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "job1.yaml"
    path.write_bytes(b"x" * 300_000)
    real_fstat = os.fstat

    def fstat_before_it_grew(fd: int) -> os.stat_result:
        fields = list(real_fstat(fd)[:10])
        fields[6] = 10  # st_size when we looked; the writer went on afterwards
        return os.stat_result(fields)

    reads: list[int] = []
    real_read = os.read

    def counting_read(fd: int, n: int) -> bytes:
        data = real_read(fd, n)
        reads.append(len(data))
        return data

    monkeypatch.setattr(intake.os, "fstat", fstat_before_it_grew)
    monkeypatch.setattr(intake.os, "read", counting_read)
    with pytest.raises(InvalidJob, match="grew past the limit of 1000"):
        read_job_bytes(path, 1000)
    assert sum(reads) < 300_000  # stopped early, not read whole


def test_read_permission_denied_is_an_invalid_job(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 does not stop root from reading")
    path = tmp_path / "job1.yaml"
    path.write_text("type: example\n")
    path.chmod(0)
    with pytest.raises(InvalidJob, match="permission denied"):
        read_job_bytes(path, 1024)


# --- parse_document ------------------------------------------------------------------------


def test_parse_yaml() -> None:
    document = parse_document(b"type: example\ndata:\n  prompt: hi\n  steps: 3\n", ".yaml")
    assert document == {"type": "example", "data": {"prompt": "hi", "steps": 3}}


def test_parse_json_whatever_the_suffix_case() -> None:
    raw = b'{"type": "example", "data": {"prompt": "hi"}}'
    assert parse_document(raw, ".json") == {"type": "example", "data": {"prompt": "hi"}}
    assert parse_document(raw, ".JSON") == {"type": "example", "data": {"prompt": "hi"}}


def test_parse_yml_and_yaml_alike() -> None:
    assert parse_document(b"type: x\n", ".yml") == parse_document(b"type: x\n", ".YAML")


def test_json_file_is_parsed_as_json_not_yaml() -> None:
    with pytest.raises(InvalidJob, match="invalid JSON"):
        parse_document(b"type: example\n", ".json")


def test_parse_yaml_with_a_byte_order_mark() -> None:
    assert parse_document("\ufefftype: example\n".encode(), ".yaml") == {"type": "example"}


def test_invalid_yaml_is_named() -> None:
    with pytest.raises(InvalidJob, match="invalid YAML") as info:
        parse_document(b"type: example\ndata: {prompt: [unclosed\n", ".yaml")
    assert "\n" not in info.value.message  # one line, fit for a sidecar


def test_invalid_json_names_line_and_column() -> None:
    with pytest.raises(InvalidJob, match=r"invalid JSON: .* at line 2 column \d+"):
        parse_document(b'{"type": "example",\n "data": }', ".json")


@pytest.mark.parametrize("raw", [b"", b"   \n\t\n"])
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_empty_file_is_refused(raw: bytes, suffix: str) -> None:
    with pytest.raises(InvalidJob, match="is empty"):
        parse_document(raw, suffix)


def test_non_utf8_names_the_byte_and_where() -> None:
    with pytest.raises(InvalidJob, match=r"not UTF-8 .*byte 0xe9 at offset 23"):
        parse_document(b"type: example\nname: caf\xe9\n", ".yaml")


@pytest.mark.parametrize(("raw", "suffix", "kind"), [
    (b"- type: example\n", ".yaml", "a list"),
    (b'[{"type": "example"}]', ".json", "a list"),
    (b"just some text\n", ".yaml", "text"),
    (b"42", ".json", "a number"),
    (b"true", ".json", "a boolean"),
])
def test_top_level_must_be_a_mapping(raw: bytes, suffix: str, kind: str) -> None:
    with pytest.raises(InvalidJob, match=f"top level must be a mapping, not {kind}"):
        parse_document(raw, suffix)


@pytest.mark.parametrize("raw", [b"null\n", b"~\n"])
def test_top_level_null_is_refused(raw: bytes) -> None:
    with pytest.raises(InvalidJob, match="top level must be a mapping, not null"):
        parse_document(raw, ".yaml")


def test_python_tags_are_refused() -> None:
    with pytest.raises(InvalidJob, match="invalid YAML"):
        parse_document(b'type: !!python/object/apply:os.system ["echo pwned"]\n', ".yaml")


def test_several_yaml_documents_are_refused() -> None:
    with pytest.raises(InvalidJob, match="invalid YAML"):
        parse_document(b"type: a\n---\ntype: b\n", ".yaml")


def billion_laughs(levels: int = 9) -> bytes:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels + 1):
        refs = ", ".join([f"*a{i - 1}"] * 9)
        lines.append(f"a{i}: &a{i} [{refs}]")
    return ("\n".join(lines) + "\n").encode()


def test_yaml_alias_bomb_is_refused_quickly() -> None:
    raw = billion_laughs()  # 9**10 strings once expanded
    assert len(raw) < 1000
    started = time.monotonic()
    with pytest.raises(InvalidJob, match="more than 100000 values"):
        parse_document(raw, ".yaml")
    assert time.monotonic() - started < 5


def test_self_referencing_yaml_is_refused() -> None:
    with pytest.raises(InvalidJob, match="refers to itself"):
        parse_document(b"type: example\ndata: &d {loop: *d}\n", ".yaml")


def test_many_plain_aliases_within_bounds_are_fine() -> None:
    raw = b"type: example\ndata: {prompt: &p hello, other: *p, third: *p}\n"
    assert parse_document(raw, ".yaml")["data"] == {"prompt": "hello", "other": "hello",
                                                   "third": "hello"}


def run_isolated(code: str, timeout_s: float = 20) -> subprocess.CompletedProcess:
    """Run ``code`` in a child Python: a crash or a hang must not take the test run with it."""
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout_s:g} s")


def test_yaml_merge_key_bomb_is_refused_quickly() -> None:
    # Merge keys (<<) copy the merged mappings' entries: 10 levels of nine merges each is a
    # 600-byte file that takes hours of CPU and gigabytes of memory to construct.
    result = run_isolated("""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        from kinod.errors import InvalidJob
        from kinod.job_document import parse_document
        lines = ["l0: &l0 {k0: 0, k1: 1, k2: 2, k3: 3, k4: 4, k5: 5, k6: 6, k7: 7, k8: 8}"]
        for i in range(1, 10):
            refs = ", ".join([f"*l{i - 1}"] * 9)
            lines.append(f"l{i}: &l{i} {{<<: [{refs}]}}")
        raw = "\\n".join(["type: example"] + lines).encode()
        assert len(raw) < 1000, len(raw)
        try:
            parse_document(raw, ".yaml")
        except InvalidJob as exc:
            print("refused:", exc)
        else:
            print("accepted")
    """, timeout_s=10)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "refused:" in result.stdout


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_deep_nesting_is_refused(suffix: str) -> None:
    raw = b'{"type": "example", "data": {"prompt": ' + b"[" * 100 + b"]" * 100 + b"}}"
    with pytest.raises(InvalidJob, match="nested too deeply"):
        parse_document(raw, suffix)


def test_nesting_within_the_limit_is_fine() -> None:
    raw = b'{"type": "example", "data": {"prompt": ' + b"[" * 50 + b"]" * 50 + b"}}"
    assert parse_document(raw, ".json")["type"] == "example"


def test_absurdly_deep_json_is_refused() -> None:
    raw = b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    with pytest.raises(InvalidJob, match="nested too deeply"):
        parse_document(raw, ".json")


def test_absurdly_deep_yaml_is_refused_without_crashing_the_process() -> None:
    # 400 KB, well under the default max_job_bytes of 1 MiB. libyaml's composer recurses in C
    # once per level, so this must be refused before the document is composed.
    result = run_isolated("""
        from kinod.errors import InvalidJob
        from kinod.job_document import parse_document
        raw = b"type: example\\ndata: " + b"[" * 200_000 + b"]" * 200_000 + b"\\n"
        try:
            parse_document(raw, ".yaml")
        except InvalidJob as exc:
            print("refused:", exc)
    """)
    assert result.returncode == 0, (
        f"the process died with {result.returncode} (-11 is SIGSEGV): {result.stderr[-2000:]}")
    assert "refused: nested too deeply" in result.stdout


@pytest.mark.parametrize(("raw", "suffix"), [
    (b"type: example\ntype: sdxl\ndata: {prompt: a}\n", ".yaml"),
    (b"type: example\ndata: {prompt: a, prompt: b}\n", ".yaml"),
    (b'{"type": "example", "type": "sdxl", "data": {"prompt": "a"}}', ".json"),
])
def test_duplicate_keys_are_refused_not_silently_dropped(raw: bytes, suffix: str) -> None:
    # "Nothing is silently ignored": with a repeated key, one of the two values is lost.
    with pytest.raises(InvalidJob, match="(?i)duplicate"):
        parse_document(raw, suffix)


@pytest.mark.parametrize("value", [b"!!binary /w==", b"!!binary aGVsbG8="])
def test_a_yaml_binary_value_is_refused_naming_the_field(value: bytes) -> None:
    # The parsed document becomes the sidecar's `task`; a YAML !!binary value (bytes, UTF-8
    # or not) cannot be written as JSON, so such a job is refused here, not later.
    raw = b"type: example\ndata: {steps: 3, prompt: " + value + b"}\n"
    with pytest.raises(InvalidJob) as info:
        parse_document(raw, ".yaml")
    assert info.value.message == "data.prompt: a binary value cannot be stored as JSON"


def test_a_document_kinod_accepts_can_be_stored_as_the_sidecars_task() -> None:
    raw = b"type: example\ndata: {prompt: caf\xc3\xa9, steps: 3, when: 2026-11-25}\n"
    document = parse_document(raw, ".yaml")
    now = utc_now()
    sidecar = Sidecar(id="job1", state=JobState.FAILED, created_at=now, updated_at=now)
    written = json.loads(sidecar.model_copy(update={"task": document}).to_json())
    assert written["task"]["data"]["prompt"] == "caf\u00e9"
    assert written["task"]["data"]["when"] == "2026-11-25"


def test_yaml_timestamps_and_values_come_through() -> None:
    document = parse_document(b"type: example\nnot_before: 2026-11-25T02:00:00Z\n"
                              b"priority: -3\ntimeout: 1.5\n", ".yaml")
    assert document["not_before"] == datetime(2026, 11, 25, 2, 0, tzinfo=UTC)
    assert document["priority"] == -3
    assert document["timeout"] == 1.5


# --- check_job -----------------------------------------------------------------------------


class _Plugin(BasePlugin):
    pass


def loaded(name: str, parameters: dict[str, Any] | None) -> LoadedPlugin:
    model = None if parameters is None else build_params_model(name, parameters)
    return LoadedPlugin(name, _Plugin, {"parameters": parameters}, model, "test")


EXAMPLE_PARAMETERS = {
    "prompt": {"type": "string", "required": True, "description": "Text"},
    "steps": {"type": "integer", "required": False, "default": 10, "minimum": 1,
              "maximum": 10000},
}
IMAGE_PARAMETERS = {
    "prompt": {"type": "string", "required": True},
    "cfg_scale": {"type": "number", "default": 7.5, "minimum": 1, "maximum": 30},
    "sampler": {"type": "string", "default": "euler", "enum": ["euler", "dpmpp_2m_sde"]},
    "seed": {"type": "integer"},  # optional, no default
    "tags": {"type": "array", "default": []},
}


class FakeRegistry:
    """What check_job needs of a PluginRegistry."""

    def __init__(self, plugins: list[LoadedPlugin], errors: dict[str, str] | None = None
                 ) -> None:
        self.plugins = {p.name: p for p in plugins}
        self.errors = errors or {}

    def get(self, name: str) -> LoadedPlugin | None:
        return self.plugins.get(name)


@pytest.fixture
def registry() -> FakeRegistry:
    return FakeRegistry([loaded("example", EXAMPLE_PARAMETERS),
                         loaded("image", IMAGE_PARAMETERS),
                         loaded("free", None)],
                        errors={"broken": "SyntaxError: invalid syntax (loader.py:3)"})


def problems(document: dict[str, Any], registry: Any) -> str:
    with pytest.raises(InvalidJob) as info:
        check_job(document, registry)
    return info.value.message


def test_a_good_job(registry: FakeRegistry) -> None:
    spec, plugin, data = check_job(
        {"name": "Shot 010", "type": "example", "data": {"prompt": "hi", "steps": 5}}, registry)
    assert spec.name == "Shot 010"
    assert spec.type == "example"
    assert plugin is registry.plugins["example"]
    assert data == {"prompt": "hi", "steps": 5}


def test_defaults_are_filled_in(registry: FakeRegistry) -> None:
    spec, _, data = check_job({"type": "example", "data": {"prompt": "hi"}}, registry)
    assert data == {"prompt": "hi", "steps": 10}
    assert spec.priority == 0
    assert spec.retries == 0
    assert spec.timeout is None
    assert spec.stall_timeout is None
    assert spec.not_before is None


def test_optional_parameter_without_default_stays_absent(registry: FakeRegistry) -> None:
    _, _, data = check_job({"type": "image", "data": {"prompt": "hi"}}, registry)
    assert data == {"prompt": "hi", "cfg_scale": 7.5, "sampler": "euler", "tags": []}
    _, _, data = check_job({"type": "image", "data": {"prompt": "hi", "seed": 42}}, registry)
    assert data["seed"] == 42


def test_every_bad_field_is_named_at_once(registry: FakeRegistry) -> None:
    message = problems({"type": "example", "colour": "red", "data": {"steps": "20"}}, registry)
    assert "colour: unknown key" in message
    assert "data.steps:" in message
    assert "data.prompt: required" in message


def test_bad_scheduling_keys_and_bad_data_are_named_together(registry: FakeRegistry) -> None:
    message = problems({"type": "example", "priority": "high", "timeout": 0, "retries": -1,
                        "stall_timeout": -5, "data": {"prompt": 3, "extra": 1}}, registry)
    for field in ("priority:", "timeout:", "retries:", "stall_timeout:", "data.prompt:",
                  "data.extra: unknown key"):
        assert field in message, (field, message)


def test_missing_type(registry: FakeRegistry) -> None:
    assert "type: required" in problems({"data": {"prompt": "hi"}}, registry)


def test_type_that_is_not_text(registry: FakeRegistry) -> None:
    assert "type:" in problems({"type": 5, "data": {}}, registry)


def test_data_that_is_not_a_mapping(registry: FakeRegistry) -> None:
    assert "data:" in problems({"type": "example", "data": ["prompt", "hi"]}, registry)


def test_unknown_plugin_lists_the_available_ones(registry: FakeRegistry) -> None:
    message = problems({"type": "nope", "data": {}}, registry)
    assert "type: unknown plugin 'nope'" in message
    assert "available: example, free, image" in message
    assert "failed to load" not in message


def test_unknown_plugin_with_no_plugins_at_all() -> None:
    assert "available: none" in problems({"type": "nope"}, FakeRegistry([]))


def test_plugin_that_failed_to_load_says_so(registry: FakeRegistry) -> None:
    message = problems({"type": "broken", "data": {}}, registry)
    assert "unknown plugin 'broken'" in message
    assert "failed to load" in message


def test_unknown_plugin_and_unknown_key_together(registry: FakeRegistry) -> None:
    message = problems({"type": "nope", "colour": "red"}, registry)
    assert "colour: unknown key" in message
    assert "unknown plugin 'nope'" in message


@pytest.mark.parametrize(("data", "field"), [
    ({"prompt": "hi", "steps": "20"}, "data.steps"),    # text is not an integer
    ({"prompt": "hi", "steps": 20.0}, "data.steps"),    # nor is a float
    ({"prompt": "hi", "steps": True}, "data.steps"),    # nor a boolean
    ({"prompt": 1}, "data.prompt"),                     # a number is not text
    ({"prompt": None}, "data.prompt"),                  # required means a value
    ({"prompt": "hi", "steps": 0}, "data.steps"),       # below minimum
    ({"prompt": "hi", "steps": 10001}, "data.steps"),   # above maximum
])
def test_data_is_checked_strictly(registry: FakeRegistry, data: dict[str, Any],
                                  field: str) -> None:
    assert f"{field}:" in problems({"type": "example", "data": data}, registry)


def test_bounds_are_inclusive(registry: FakeRegistry) -> None:
    for steps in (1, 10000):
        _, _, data = check_job({"type": "example", "data": {"prompt": "p", "steps": steps}},
                               registry)
        assert data["steps"] == steps


def test_a_whole_number_is_a_fine_number(registry: FakeRegistry) -> None:
    # YAML `cfg_scale: 7` is an int; a "number" parameter must take it.
    _, _, data = check_job({"type": "image", "data": {"prompt": "p", "cfg_scale": 7}}, registry)
    assert data["cfg_scale"] == 7


def test_enum_is_checked(registry: FakeRegistry) -> None:
    message = problems({"type": "image", "data": {"prompt": "p", "sampler": "bogus"}}, registry)
    assert "data.sampler:" in message
    _, _, data = check_job({"type": "image", "data": {"prompt": "p", "sampler": "dpmpp_2m_sde"}},
                           registry)
    assert data["sampler"] == "dpmpp_2m_sde"


def test_plugin_without_declared_parameters_takes_data_as_is(registry: FakeRegistry) -> None:
    original = {"anything": [1, 2], "goes": {"x": "y"}}
    _, plugin, data = check_job({"type": "free", "data": original}, registry)
    assert plugin is registry.plugins["free"]
    assert data == original
    assert data is not original


def test_a_plugin_model_that_breaks_while_checking_is_an_invalid_job() -> None:
    class Touchy(BaseModel):
        x: int = 0

        @field_validator("x")
        @classmethod
        def _explode(cls, value: int) -> int:
            raise TypeError("cannot compare")

    plugin = LoadedPlugin("touchy", _Plugin, {}, Touchy, "test")
    message = problems({"type": "touchy", "data": {"x": 1}}, FakeRegistry([plugin]))
    assert message.startswith("data:")
    assert "TypeError: cannot compare" in message


def test_without_a_registry_only_the_jobs_own_keys_are_checked() -> None:
    spec, plugin, _ = check_job({"type": "whatever", "data": {"x": 1}}, None)
    assert spec.type == "whatever"
    assert spec.data == {"x": 1}
    assert plugin is None
    assert "colour: unknown key" in problems({"type": "whatever", "colour": 1}, None)


def test_scheduling_keys(registry: FakeRegistry) -> None:
    spec, _, _ = check_job({"type": "example", "data": {"prompt": "p"}, "priority": 5,
                            "timeout": 3600, "stall_timeout": 600, "retries": 2,
                            "not_before": "2026-11-25T02:00:00Z"}, registry)
    assert (spec.priority, spec.timeout, spec.stall_timeout, spec.retries) == (5, 3600, 600, 2)
    assert spec.not_before == datetime(2026, 11, 25, 2, 0, tzinfo=UTC)


def test_not_before_without_a_zone_is_utc(registry: FakeRegistry) -> None:
    spec, _, _ = check_job({"type": "example", "data": {"prompt": "p"},
                            "not_before": datetime(2026, 11, 25, 2, 0)}, registry)
    assert spec.not_before == datetime(2026, 11, 25, 2, 0, tzinfo=UTC)
    assert spec.not_before.tzinfo is not None


def test_a_yaml_job_file_end_to_end(registry: FakeRegistry) -> None:
    raw = textwrap.dedent("""\
        name: Shot 010 key art
        type: example
        data:
          prompt: beautiful landscape
          steps: 30
        priority: 0
        timeout: 3600
        stall_timeout: 600
        retries: 0
        not_before: 2026-11-25T02:00:00Z
    """).encode()
    spec, plugin, data = check_job(parse_document(raw, ".yaml"), registry)
    assert spec.name == "Shot 010 key art"
    assert plugin.name == "example"
    assert data == {"prompt": "beautiful landscape", "steps": 30}


# --- values that parse but cannot be kept (found in review) --------------------------------


@pytest.mark.parametrize(("raw", "suffix", "expected"), [
    (b'{"type": "example", "name": "\\ud800"}', ".json", "name: holds a lone UTF-16 surrogate"),
    (b"type: example\nnot_before: 2026-02-30T02:00:00Z\n", ".yaml", "invalid value"),
    (b'{"type": "example", "n": ' + b"9" * 5000 + b"}", ".json", "invalid value"),
])
def test_values_that_cannot_be_kept_are_refused(raw: bytes, suffix: str, expected: str) -> None:
    with pytest.raises(InvalidJob, match=expected):
        parse_document(raw, suffix)


def test_a_not_before_past_the_calendar_is_refused() -> None:
    document = {"type": "example", "not_before": "9999-12-31T23:59:59-23:59"}
    with pytest.raises(InvalidJob, match="not_before"):
        check_job(document, registry=None)


@pytest.mark.parametrize(("raw", "suffix"), [
    (b'{"type": "x", "data": {"a": NaN}}', ".json"),
    (b'{"type": "x", "data": {"a": [Infinity]}}', ".json"),
    (b"type: x\ndata: {a: .inf}\n", ".yaml"),
    (b"type: x\ndata: {a: -.inf}\n", ".yaml"),
    (b"type: x\ndata: {a: .nan}\n", ".yaml"),
])
def test_nan_and_infinity_are_refused_naming_the_field(raw: bytes, suffix: str) -> None:
    with pytest.raises(InvalidJob, match=r"data\.a(\[0\])?: -?(nan|inf) cannot be stored as JSON"):
        parse_document(raw, suffix)


def test_a_folder_named_like_a_job_is_no_job_waiting(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").mkdir()
    assert not inbox_has_job(tmp_path, "a")
    (tmp_path / "a.json").write_text("{}")
    assert inbox_has_job(tmp_path, "a")
    os.symlink(tmp_path / "nowhere", tmp_path / "b.yml")
    assert inbox_has_job(tmp_path, "b")  # a link is a job file (that will fail as one)
    assert not inbox_has_job(tmp_path, "c")


@pytest.mark.parametrize("name", ["a.YAML", "a.Yml", "a.JSON", "a.jSoN", "a.yaML"])
def test_a_job_waiting_with_its_suffix_in_any_case_is_found(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_text("type: example\n")
    assert inbox_has_job(tmp_path, "a")
    assert not inbox_has_job(tmp_path, "b")


def test_a_job_waiting_is_found_without_listing_the_inbox(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The inbox may hold 100,000 files: a look for one id tries its names, one by one.
    def no_listing(*args: Any) -> None:
        raise AssertionError("the inbox was listed")

    (tmp_path / "a.Yaml").mkdir()  # a folder is no job file: the other spellings are tried
    (tmp_path / "a.yAmL").write_text("type: example\n")
    monkeypatch.setattr(os, "listdir", no_listing)
    monkeypatch.setattr(os, "scandir", no_listing)
    assert inbox_has_job(tmp_path, "a")
    assert not inbox_has_job(tmp_path, "b")


def test_holds_bytes_compares_content_not_the_inode(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_bytes(b'{"v": 1}')
    assert holds_bytes(path, b'{"v": 1}')
    path.write_bytes(b'{"v": 2}')  # same inode, other content
    assert not holds_bytes(path, b'{"v": 1}')
    path.write_bytes(b'{"v": 1} and more')
    assert not holds_bytes(path, b'{"v": 1}')
    assert not holds_bytes(tmp_path / "gone.json", b"")
