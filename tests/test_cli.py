"""The ``kinod`` command line as users run it: real processes on real folders.

Commands that only read settings run in-process (``kinod.cli.main``); everything
that loads plugins or talks to a daemon runs ``python -m kinod`` in a child process,
so plugin imports never leak into the test process.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from datetime import UTC, datetime
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
import yaml

from kinod.cli import main
from kinod.models import Sidecar, SidecarError
from tests.helpers import DaemonProcess, kinod_cli, wait_for, write_config

SUBCOMMANDS = ("run", "init", "submit", "status", "stop", "plugins", "validate")
EXAMPLE_JOB = {"type": "example", "data": {"prompt": "test prompt", "steps": 2}}
LONG_JOB = {"type": "example", "data": {"prompt": "long", "steps": 10000}}  # 1000 s

# A plugin written the way the seed's README shows, that always fails.
FAILING_PLUGIN = '''\
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from base_plugin import BasePlugin, PluginResult


class FailsPlugin(BasePlugin):
    """Always fails, as a plugin does when its backend is down."""

    async def generate(self, task_id, data, progress_callback=None):
        self.update_progress(50.0, progress_callback, "loading film")
        return PluginResult(success=False, data={}, error="out of film")

    @classmethod
    def get_plugin_info(cls):
        return {"name": "fails", "version": "0.1.0", "description": "always fails",
                "parameters": {"reel": {"type": "integer", "required": False, "default": 1,
                                        "description": "which reel"}}}
'''
BROKEN_PLUGIN = "import kinod_test_no_such_module\n"


def cli(root: Path, *args: str, **kwargs: Any) -> subprocess.CompletedProcess:
    """``kinod ARGS --config ROOT/config.yaml`` in ROOT."""
    return kinod_cli(*args, "--config", str(root / "config.yaml"), cwd=root, **kwargs)


def write_job(folder: Path, name: str, body: dict[str, Any] | str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if isinstance(body, str):
        path.write_text(body)
    elif name.endswith(".json"):
        path.write_text(json.dumps(body))
    else:
        path.write_text(yaml.safe_dump(body))
    return path


def make_plugin(plugin_dir: Path, name: str, loader_source: str) -> None:
    folder = plugin_dir / name
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text(f'"""{name} plugin package"""\n')
    (folder / "loader.py").write_text(loader_source)


def ended(sidecar: dict[str, Any] | None) -> bool:
    return sidecar is not None and sidecar["state"] in ("succeeded", "failed", "stopped")


# --- init ----------------------------------------------------------------------


def test_init_creates_the_layout_and_a_default_config(tmp_path: Path) -> None:
    root = tmp_path / "farm"
    result = kinod_cli("init", str(root), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for folder in ("inbox", "outbox", "data/frames", "models_storage"):
        assert (root / folder).is_dir(), folder
    config = root / "config.yaml"
    assert config.read_text() == files("kinod").joinpath("default_config.yaml").read_text()
    assert "wrote" in result.stdout
    # The written config is a valid one.
    status = cli(root, "status")
    assert status.returncode == 0, status.stderr


def test_init_leaves_an_existing_config_alone(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("workers: 2\n")
    result = kinod_cli("init", cwd=tmp_path)  # DIR defaults to the current folder
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "config.yaml").read_text() == "workers: 2\n"
    assert "left as it is" in result.stdout
    assert (tmp_path / "inbox").is_dir()


# --- help and the command line ---------------------------------------------------


@pytest.mark.parametrize("command", [(), *((name,) for name in SUBCOMMANDS)],
                         ids=["kinod", *SUBCOMMANDS])
def test_help_exits_0_and_documents_exit_status(
        command: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "exit status:" in help_text
    assert "3    no such job" in help_text


def test_a_bad_command_line_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["status", "--no-such-option"])
    assert exit_info.value.code == 2
    assert "--no-such-option" in capsys.readouterr().err


# --- validate --------------------------------------------------------------------


def test_validate_accepts_a_good_job(tmp_path: Path) -> None:
    write_config(tmp_path)
    good_yaml = write_job(tmp_path / "jobs", "good.yaml", EXAMPLE_JOB)
    good_json = write_job(tmp_path / "jobs", "good_too.json", {"type": "example",
                                                              "data": {"prompt": "x"}})
    result = cli(tmp_path, "validate", str(good_yaml), str(good_json))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{good_yaml}: ok (example)" in result.stdout
    assert f"{good_json}: ok (example)" in result.stdout


def test_validate_names_every_offending_field(tmp_path: Path) -> None:
    write_config(tmp_path)
    prompt = {"prompt": "x"}
    cases: dict[str, tuple[dict[str, Any] | str, list[str]]] = {
        "extra_key.yaml": ({"type": "example", "data": prompt, "colour": "red"},
                           ["colour: unknown key"]),
        "no_type.yaml": ({"data": prompt}, ["type: required"]),
        "no_plugin.yaml": ({"type": "nope", "data": {}}, ["type: unknown plugin 'nope'"]),
        "steps_text.json": ({"type": "example", "data": {"prompt": "x", "steps": "20"}},
                            ["data.steps:"]),
        "steps_zero.yaml": ({"type": "example", "data": {"prompt": "x", "steps": 0}},
                            ["data.steps:"]),
        "no_prompt.yaml": ({"type": "example", "data": {"steps": 3}}, ["data.prompt: required"]),
        "extra_data.yaml": ({"type": "example", "data": {"prompt": "x", "seed": 1}},
                            ["data.seed: unknown key"]),
        "many.yaml": ({"type": "example", "data": {"steps": "x"}, "priority": "high"},
                      ["priority:", "data.prompt: required", "data.steps:"]),
        "syntax.yaml": ("type: [example\n", ["invalid YAML"]),
        "bad id!.yaml": ({"type": "example", "data": prompt}, ["not a valid job id"]),
        "notes.txt": ("type: example\n", ["not a job file"]),
    }
    paths = {name: write_job(tmp_path / "jobs", name, body) for name, (body, _) in cases.items()}
    good = write_job(tmp_path / "jobs", "good.yaml", EXAMPLE_JOB)

    result = cli(tmp_path, "validate", str(good), *map(str, paths.values()))

    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert f"{good}: ok (example)" in lines  # one bad file does not hide the good ones
    for name, (_, fragments) in cases.items():
        line = next((x for x in lines if x.startswith(f"{paths[name]}: invalid: ")), None)
        assert line is not None, f"no 'invalid' line for {name} in:\n{result.stdout}"
        for fragment in fragments:
            assert fragment in line, f"{name}: {fragment!r} not in {line!r}"


# --- plugins ---------------------------------------------------------------------


def test_plugins_lists_example_with_its_parameters(tmp_path: Path) -> None:
    write_config(tmp_path)
    table = cli(tmp_path, "plugins")
    assert table.returncode == 0, table.stderr
    assert "example" in table.stdout
    assert "prompt*:string" in table.stdout  # * marks a required parameter
    assert "steps:integer" in table.stdout

    listing = cli(tmp_path, "plugins", "--json")
    assert listing.returncode == 0, listing.stderr
    report = json.loads(listing.stdout)
    assert report["errors"] == {}
    example = next(p for p in report["plugins"] if p["name"] == "example")
    assert example["version"] == "1.0.0"
    params = example["parameters"]
    assert params["prompt"]["type"] == "string" and params["prompt"]["required"] is True
    assert params["steps"] == {**params["steps"], "type": "integer", "default": 10,
                               "minimum": 1, "maximum": 10000}


def test_a_broken_plugin_is_listed_with_its_error_and_the_others_still_load(
        tmp_path: Path) -> None:
    plugin_dir = tmp_path / "plugins"
    make_plugin(plugin_dir, "broken", BROKEN_PLUGIN)
    make_plugin(plugin_dir, "fails", FAILING_PLUGIN)
    write_config(tmp_path, plugin_dirs=["plugins"])  # relative to config.yaml's folder

    table = cli(tmp_path, "plugins")
    assert table.returncode == 1
    assert "example" in table.stdout and "fails" in table.stdout
    assert "failed to load broken" in table.stderr
    assert "kinod_test_no_such_module" in table.stderr

    listing = cli(tmp_path, "plugins", "--json")
    assert listing.returncode == 1
    report = json.loads(listing.stdout)
    assert {p["name"] for p in report["plugins"]} == {"blender", "comfyui", "example", "sdxl",
                                                      "fails"}
    assert "ModuleNotFoundError" in report["errors"]["broken"]
    assert "loader.py" in report["errors"]["broken"]  # where it broke

    job = write_job(tmp_path / "jobs", "uses_broken.yaml", {"type": "broken", "data": {}})
    check = cli(tmp_path, "validate", str(job))
    assert check.returncode == 1
    assert "failed to load" in check.stdout


# --- submit ----------------------------------------------------------------------


def test_submit_wait_exits_0_when_the_job_succeeds(daemon: DaemonProcess) -> None:
    daemon.start()
    job = write_job(daemon.root / "jobs", "ok_job.yaml", EXAMPLE_JOB)

    result = cli(daemon.root, "submit", str(job), "--wait")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "submitted ok_job" in result.stdout
    assert "ok_job: succeeded" in result.stderr
    assert daemon.sidecar("ok_job")["state"] == "succeeded"
    assert job.exists()  # submit copies; the user's file stays where it was
    wait_for(lambda: (daemon.inbox / ".kinod" / "done" / "ok_job" / "1.yaml").exists(),
             what="the job file to be filed under done/")


def test_submit_wait_exits_1_when_a_job_fails(daemon: DaemonProcess) -> None:
    make_plugin(daemon.root / "plugins", "fails", FAILING_PLUGIN)
    write_config(daemon.root, plugin_dirs=["plugins"])
    daemon.start()
    plugin_fails = write_job(daemon.root / "jobs", "no_film.json", {"type": "fails", "data": {}})
    # submit checks the job's own keys only; the daemon checks the plugin's parameters.
    bad_data = write_job(daemon.root / "jobs", "bad_data.yaml",
                         {"type": "example", "data": {"prompt": "x", "steps": "many"}})

    result = cli(daemon.root, "submit", str(plugin_fails), str(bad_data), "--wait")

    assert result.returncode == 1, result.stdout + result.stderr
    assert "no_film: failed (plugin_failed: out of film)" in result.stderr
    assert "bad_data: failed (invalid_job: data.steps:" in result.stderr
    assert daemon.sidecar("no_film")["error"] == {"code": "plugin_failed",
                                                  "message": "out of film"}


def test_submit_refuses_invalid_files_and_ids_already_in_the_inbox(kinod_root: Path) -> None:
    write_config(kinod_root)
    jobs = kinod_root / "jobs"
    bad_id = write_job(jobs, "bad id!.yaml", EXAMPLE_JOB)
    not_a_job = write_job(jobs, "notes.txt", EXAMPLE_JOB)
    bad_key = write_job(jobs, "bad_key.yaml", {**EXAMPLE_JOB, "colour": "red"})

    refused = cli(kinod_root, "submit", str(bad_id), str(not_a_job), str(bad_key))

    assert refused.returncode == 1
    assert f"{bad_id}: 'bad id!' is not a valid job id" in refused.stderr
    assert f"{not_a_job}: not a job file" in refused.stderr
    assert f"{bad_key}: colour: unknown key" in refused.stderr
    assert list((kinod_root / "inbox").iterdir()) == []

    # No daemon is running: the first copy waits in the inbox; a second is refused.
    good = write_job(jobs, "waiting.yaml", EXAMPLE_JOB)
    assert cli(kinod_root, "submit", str(good)).returncode == 0
    again = cli(kinod_root, "submit", str(good))
    assert again.returncode == 1
    assert "already in the inbox" in again.stderr
    assert sorted(p.name for p in (kinod_root / "inbox").iterdir()) == ["waiting.yaml"]


def test_submit_refuses_an_id_that_is_still_queued_or_running(daemon: DaemonProcess) -> None:
    daemon.start()
    later = write_job(daemon.root / "jobs", "later.json",
                      {**EXAMPLE_JOB, "not_before": "2999-01-01T00:00:00Z"})
    long = write_job(daemon.root / "jobs", "long.yaml", LONG_JOB)
    assert cli(daemon.root, "submit", str(later), str(long)).returncode == 0
    daemon.wait_state("later", "queued")
    daemon.wait_state("long", "running")

    result = cli(daemon.root, "submit", str(later), str(long))

    assert result.returncode == 1
    assert "job later is still queued; not submitted again" in result.stderr
    assert "job long is still running; not submitted again" in result.stderr
    assert daemon.sidecar("later")["state"] == "queued"
    assert daemon.sidecar("long")["state"] == "running"
    assert not (daemon.inbox / "later.json").exists()
    # The queued job never starts once stopped.
    stopped = cli(daemon.root, "stop", "later", "--wait")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    sidecar = daemon.sidecar("later")
    assert sidecar["state"] == "stopped" and sidecar["started_at"] is None


# --- status ----------------------------------------------------------------------


def test_status_shows_jobs_and_one_job(daemon: DaemonProcess) -> None:
    daemon.start()
    daemon.drop("shot010.yaml", EXAMPLE_JOB)
    daemon.wait_state("shot010", "succeeded")

    table = cli(daemon.root, "status")
    assert table.returncode == 0, table.stderr
    row = next((x for x in table.stdout.splitlines() if "shot010" in x), "")
    assert "succeeded" in row, table.stdout

    everything = cli(daemon.root, "status", "--json")
    assert everything.returncode == 0, everything.stderr
    assert [s["id"] for s in json.loads(everything.stdout)] == ["shot010"]

    one = cli(daemon.root, "status", "shot010", "--json")
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout) == daemon.sidecar("shot010")

    details = cli(daemon.root, "status", "shot010")
    assert details.returncode == 0, details.stderr
    assert "succeeded" in details.stdout and "example" in details.stdout

    for args in (("status", "nope"), ("status", "nope", "--json")):
        unknown = cli(daemon.root, *args)
        assert unknown.returncode == 3, args
        assert "no job nope" in unknown.stderr


# --- stop ------------------------------------------------------------------------


def test_stop_ends_a_running_job_stopped(daemon: DaemonProcess) -> None:
    daemon.start()
    daemon.drop("long.yaml", LONG_JOB)
    daemon.wait_state("long", "running")

    result = cli(daemon.root, "stop", "long")

    assert result.returncode == 0, result.stderr
    assert "stop requested for long" in result.stdout
    sidecar = daemon.wait_state("long", "succeeded", "failed", "stopped", timeout_s=10)
    assert sidecar["state"] == "stopped"
    assert sidecar["error"]["code"] == "stopped"
    assert sidecar["progress"] < 100
    wait_for(lambda: not (daemon.inbox / "long.stop").exists(),
             what="the .stop file to be removed")

    again = cli(daemon.root, "stop", "long")
    assert again.returncode == 3
    assert "already stopped" in again.stderr


def test_stop_an_unknown_or_invalid_id(kinod_root: Path) -> None:
    write_config(kinod_root)
    unknown = cli(kinod_root, "stop", "nope")
    assert unknown.returncode == 3
    assert "job nope is not queued or running (unknown)" in unknown.stderr
    assert not (kinod_root / "inbox" / "nope.stop").exists()

    invalid = cli(kinod_root, "stop", "../etc")
    assert invalid.returncode == 2
    assert "not a valid job id" in invalid.stderr


# --- settings ----------------------------------------------------------------------


@pytest.mark.parametrize("command", [["status"], ["stop", "x"], ["submit", "x.yaml"],
                                     ["plugins"], ["validate", "x.yaml"]],
                         ids=lambda c: c[0])
def test_a_bad_config_exits_2_naming_the_key(
        command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("colour: red\nworkers: 0\n")
    assert main([*command, "--config", str(config)]) == 2
    message = capsys.readouterr().err
    assert "colour: unknown key" in message
    assert "workers:" in message  # every bad key is named at once


def test_run_refuses_a_bad_config(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("stop_grace: soon\n")
    result = cli(tmp_path, "run", timeout_s=30)
    assert result.returncode == 2
    assert "stop_grace:" in result.stderr
    assert not (tmp_path / "inbox").exists()  # nothing was started


@pytest.mark.parametrize(("name", "value", "fragment"), [
    ("KINOD_WORKRES", "3", "KINOD_WORKRES is not a setting"),
    ("KINOD_WORKERS", "lots", "workers:"),
])
def test_a_bad_environment_override_exits_2_naming_it(
        name: str, value: str, fragment: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    write_config(tmp_path)
    monkeypatch.setenv(name, value)
    assert main(["status", "--config", str(tmp_path / "config.yaml")]) == 2
    assert fragment in capsys.readouterr().err


def test_a_missing_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--config", str(tmp_path / "config.yaml")]) == 2
    assert "no such file (create one with `kinod init`)" in capsys.readouterr().err


# --- known bugs: each passes once the bug is fixed ---------------------------------


def test_status_table_keeps_long_ids_whole(kinod_root: Path) -> None:
    write_config(kinod_root)
    now = datetime.now(UTC)
    sidecar = Sidecar(id="render_shot_010_key_art_v003", type="example", state="failed",
                      node="render-node-17", created_at=now, updated_at=now,
                      error=SidecarError(code="invalid_job", message="type: unknown plugin "
                                         "'nope'; available: example"))
    (kinod_root / "outbox" / f"{sidecar.id}.json").write_bytes(sidecar.to_json())
    result = cli(kinod_root, "status")
    assert result.returncode == 0
    assert sidecar.id in result.stdout


def test_stop_wait_follows_the_resubmitted_run(daemon: DaemonProcess) -> None:
    now = datetime.now(UTC)
    old = Sidecar(id="again", type="example", state="succeeded", progress=100,
                  created_at=now, updated_at=now, finished_at=now)
    (daemon.outbox / "again.json").write_bytes(old.to_json())
    job = write_job(daemon.root / "jobs", "again.yaml", LONG_JOB)
    assert cli(daemon.root, "submit", str(job)).returncode == 0  # no daemon yet: it waits
    stop = subprocess.Popen(
        [sys.executable, "-m", "kinod", "stop", "again", "--wait",
         "--config", str(daemon.config)], cwd=daemon.root,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        daemon.start()
        daemon.wait_state("again", "stopped")
        assert stop.wait(10) == 0
    finally:
        if stop.poll() is None:
            stop.kill()
        stop.communicate()


def test_validate_survives_a_constraint_the_parameter_type_cannot_take(tmp_path: Path) -> None:
    make_plugin(tmp_path / "plugins", "strmin", FAILING_PLUGIN.replace(
        '"type": "integer"', '"type": "string"').replace('"default": 1', '"minimum": 1'))
    write_config(tmp_path, plugin_dirs=["plugins"])
    job = write_job(tmp_path / "jobs", "reel.yaml", {"type": "strmin", "data": {"reel": "a"}})
    result = cli(tmp_path, "validate", str(job))
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1
    assert "failed to load" in result.stdout  # the declaration is refused when the plugin loads


def test_plugins_without_a_config_file_honours_environment_overrides(tmp_path: Path) -> None:
    make_plugin(tmp_path / "plugins", "fails", FAILING_PLUGIN)
    result = kinod_cli("plugins", "--json", cwd=tmp_path,
                       env={"KINOD_PLUGIN_DIRS": str(tmp_path / "plugins")})
    assert result.returncode == 0, result.stderr
    assert "fails" in {p["name"] for p in json.loads(result.stdout)["plugins"]}


# --- folders that are missing or cannot be written: one line, never a traceback ----------


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """stderr, which must be a single line and no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def break_inbox(inbox: Path, how: str) -> str:
    """Make the inbox unusable (in ways that hold for root too); the reason kinod should give."""
    inbox.rmdir()
    if how == "missing":
        return "no such folder"
    inbox.write_text("a file where the inbox should be\n")
    return "not a folder"


@pytest.mark.parametrize("how", ["missing", "a_file"])
@pytest.mark.parametrize("command", [["submit", "JOB"], ["stop", "x"], ["nodes"]],
                         ids=lambda c: c[0])
def test_an_inbox_that_is_missing_or_not_a_folder_exits_2_naming_it(
        kinod_root: Path, how: str, command: list[str]) -> None:
    write_config(kinod_root)
    job = write_job(kinod_root / "jobs", "shot.yaml", EXAMPLE_JOB)
    inbox = kinod_root / "inbox"
    reason = break_inbox(inbox, how)

    result = cli(kinod_root, *[str(job) if arg == "JOB" else arg for arg in command])

    assert result.returncode == 2, result.stderr
    assert one_line_error(result).startswith(f"kinod: inbox {inbox}: {reason}")
    assert how == "a_file" or not inbox.exists()  # kinod never makes the inbox itself


def test_submit_that_cannot_write_into_the_inbox_fails_naming_it(kinod_root: Path) -> None:
    # Root may write anywhere, so the write is made to fail by a file size limit of 0
    # (the shell's ulimit -f): creating the file works, writing a byte into it fails.
    write_config(kinod_root)
    job = write_job(kinod_root / "jobs", "shot.yaml", EXAMPLE_JOB)
    inbox = kinod_root / "inbox"
    result = subprocess.run(
        ["sh", "-c", 'ulimit -f 0 && exec "$@"', "sh", sys.executable, "-m", "kinod",
         "submit", str(job), "--config", str(kinod_root / "config.yaml")],
        capture_output=True, text=True, cwd=kinod_root, timeout=60)

    assert result.returncode == 1, result.stderr
    assert one_line_error(result) == (
        f"{job}: not submitted: cannot write into the inbox {inbox}: File too large")
    assert list(inbox.iterdir()) == []  # no temporary file left behind
    assert "submitted" not in result.stdout


def test_init_that_cannot_make_its_folders_fails_in_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder\n")
    result = kinod_cli("init", str(blocker / "farm"), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert one_line_error(result) == f"kinod: {blocker / 'farm' / 'inbox'}: Not a directory"


def test_nodes_that_cannot_read_the_heartbeats_fails_in_one_line(kinod_root: Path) -> None:
    write_config(kinod_root)
    spool = kinod_root / "inbox" / ".kinod"
    spool.write_text("a file where the spool should be\n")
    result = cli(kinod_root, "nodes")
    assert result.returncode == 1, result.stderr
    assert one_line_error(result) == f"kinod: {spool / 'nodes'}: Not a directory"


def test_status_shows_the_jobs_when_the_heartbeats_cannot_be_read(kinod_root: Path) -> None:
    # In a terminal the table of nodes comes first; a spool that cannot be read must not
    # hide the jobs, which live in the outbox.
    write_config(kinod_root)
    now = datetime.now(UTC)
    sidecar = Sidecar(id="shot", type="example", state="queued", created_at=now, updated_at=now)
    (kinod_root / "outbox" / "shot.json").write_bytes(sidecar.to_json())
    (kinod_root / "inbox" / ".kinod").write_text("a file where the spool should be\n")
    result = cli(kinod_root, "status", env={"TTY_COMPATIBLE": "1"})
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0, result.stderr
    assert "shot" in result.stdout and "queued" in result.stdout


def test_stop_that_cannot_write_its_stop_file_fails_naming_the_inbox(kinod_root: Path) -> None:
    write_config(kinod_root)
    now = datetime.now(UTC)
    running = Sidecar(id="long", type="example", state="running", created_at=now, updated_at=now)
    (kinod_root / "outbox" / "long.json").write_bytes(running.to_json())
    inbox = kinod_root / "inbox"
    # A link to a folder that does not exist where the stop file goes: even root cannot
    # write it.
    (inbox / "long.stop").symlink_to(kinod_root / "gone" / "long.stop")
    result = cli(kinod_root, "stop", "long")
    assert result.returncode == 1, result.stderr
    assert one_line_error(result).startswith(
        f"cannot ask long to stop: cannot write into the inbox {inbox}: ")
    assert "stop requested" not in result.stdout


# --- links others may leave in a shared inbox ---------------------------------------------


def test_submit_never_writes_through_a_link_left_at_its_temporary_name(
        kinod_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The inbox is shared (group-writable): anyone in the group may leave a link there. A
    # temporary name others can guess would let them make submit write where the link points.
    write_config(kinod_root)
    job = write_job(kinod_root / "jobs", "shot.yaml", EXAMPLE_JOB)
    inbox = kinod_root / "inbox"
    victim = kinod_root / "victim"
    victim.write_text("precious\n")
    (inbox / f".shot.yaml.{os.getpid()}.tmp").symlink_to(victim)  # what submit once used

    assert main(["submit", str(job), "--config", str(kinod_root / "config.yaml")]) == 0

    assert "submitted shot" in capsys.readouterr().out
    assert victim.read_text() == "precious\n"
    submitted = inbox / "shot.yaml"
    assert not submitted.is_symlink() and submitted.read_bytes() == job.read_bytes()
    # Made as a plain write makes it: the daemon (of the farm's group) must read it.
    assert stat.S_IMODE(submitted.stat().st_mode) == 0o666 & ~current_umask()


def test_stop_never_makes_a_file_through_a_link_left_at_the_stop_files_name(
        kinod_root: Path) -> None:
    write_config(kinod_root)
    now = datetime.now(UTC)
    running = Sidecar(id="long", type="example", state="running", created_at=now, updated_at=now)
    (kinod_root / "outbox" / "long.json").write_bytes(running.to_json())
    planted = kinod_root / "elsewhere" / "planted"
    planted.parent.mkdir()
    (kinod_root / "inbox" / "long.stop").symlink_to(planted)
    result = cli(kinod_root, "stop", "long")
    assert result.returncode == 1, result.stderr
    assert one_line_error(result).startswith("cannot ask long to stop: ")
    assert not planted.exists()


def current_umask() -> int:
    """This process's umask, read without changing it (os.umask would, for every thread)."""
    status = Path("/proc/self/status").read_text()
    return int(next(x for x in status.splitlines() if x.startswith("Umask:")).split()[1], 8)


# --- submit --chunk ---------------------------------------------------------------

RENDER_JOB = {"name": "Shot 010", "type": "blender",
              "data": {"blend_file": "shot010.blend", "frames": "1-5"}}


def test_submit_chunk_drops_one_job_per_chunk_and_the_final_job(kinod_root: Path) -> None:
    write_config(kinod_root)
    job = write_job(kinod_root / "jobs", "shot010.yaml",
                    {**RENDER_JOB, "then": {"type": "example", "data": {"prompt": "encode"}}})

    result = cli(kinod_root, "submit", "--chunk", "2", str(job))

    assert result.returncode == 0, result.stderr
    ids = ["shot010.0001-0002", "shot010.0003-0004", "shot010.0005-0005", "shot010"]
    assert result.stdout.split() == [word for i in ids for word in ("submitted", i)]
    inbox = kinod_root / "inbox"
    assert sorted(p.name for p in inbox.iterdir()) == sorted(f"{i}.yaml" for i in ids)
    first = yaml.safe_load((inbox / "shot010.0001-0002.yaml").read_text())
    assert first == {"name": "Shot 010 [1-2]", "type": "blender",
                     "data": {"blend_file": "shot010.blend", "frames": "1-2"}}
    final = yaml.safe_load((inbox / "shot010.yaml").read_text())
    assert final == {"type": "example", "data": {"prompt": "encode"}, "after": ids[:3]}


def test_submit_chunk_refuses_what_it_cannot_split_and_drops_nothing(kinod_root: Path) -> None:
    write_config(kinod_root)
    jobs = kinod_root / "jobs"
    no_frames = write_job(jobs, "still.json", {"type": "blender", "data": {}})
    busy = write_job(jobs, "busy.yaml", RENDER_JOB)
    # The second chunk of "busy" is still running: none of its chunks is dropped.
    now = datetime.now(UTC)
    sidecar = Sidecar(id="busy.0004-0005", state="running", created_at=now, updated_at=now)
    (kinod_root / "outbox" / "busy.0004-0005.json").write_bytes(sidecar.to_json())

    result = cli(kinod_root, "submit", "--chunk", "3", str(no_frames), str(busy))

    assert result.returncode == 1
    assert (f"{no_frames}: cannot split into chunks: data.frames: required to split a job "
            "into chunks") in result.stderr
    assert f"{busy}: job busy.0004-0005 is still running; not submitted again" in result.stderr
    assert list((kinod_root / "inbox").iterdir()) == []
    bad_size = cli(kinod_root, "submit", "--chunk", "0", str(busy))
    assert bad_size.returncode == 2 and "is not a number of frames" in bad_size.stderr
