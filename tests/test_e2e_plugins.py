"""End to end: plugins from ``plugin_dirs``, broken ones beside working ones, and plugins
that misbehave at run time, on the real daemon.

tests/plugin_fixtures/working holds seed-style plugins that load (``scripted``, and
``init_raises`` whose constructor raises); tests/plugin_fixtures/broken holds ones that
cannot load (a missing import, no BasePlugin subclass, an unknown parameter type).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from tests.helpers import (
    BROKEN_PLUGINS,
    PLUGIN_FIXTURES,
    TERMINAL,
    WORKING_PLUGINS,
    DaemonProcess,
    kinod_cli,
    scripted,
    wait_end,
    wait_for,
)


def spool_done(daemon: DaemonProcess, job_id: str) -> list[str]:
    """What inbox/.kinod/done/<id>/ holds, once it holds something."""
    folder = daemon.inbox / ".kinod" / "done" / job_id
    wait_for(lambda: folder.is_dir() and any(folder.iterdir()), 5,
             what=f"the job file in done/{job_id}/")
    return sorted(p.name for p in folder.iterdir())


def test_broken_plugins_do_not_stop_the_others_from_loading(
        kinod_root: Path, start_daemon: Callable[..., DaemonProcess]) -> None:
    # One more broken plugin, one that is not even Python, made here.
    more = kinod_root / "more_plugins"
    (more / "syntax_error").mkdir(parents=True)
    (more / "syntax_error" / "__init__.py").write_text("")
    (more / "syntax_error" / "loader.py").write_text("def generate(:\n")
    # Broken folders come first, so a failure part-way cannot skip what follows.
    plugin_dirs = [str(BROKEN_PLUGINS), str(more), str(WORKING_PLUGINS)]
    daemon = start_daemon(plugin_dirs=plugin_dirs)
    log = daemon.log()
    for name in ("broken_import", "broken_noclass", "broken_params", "syntax_error"):
        assert f"plugin {name} failed to load" in log, log
    assert re.search(r"plugins: .*example.*init_raises.*scripted", log), log

    daemon.drop("uses_broken.yaml", {"type": "broken_import", "data": {}})
    daemon.drop("uses_scripted.yaml", scripted(tag="ok"))
    daemon.drop("uses_example.yaml", {"type": "example", "data": {"prompt": "p", "steps": 1}})
    sidecar = wait_end(daemon, "uses_broken")
    assert sidecar["state"] == "failed", sidecar
    assert sidecar["error"]["code"] == "invalid_job"
    assert "broken_import" in sidecar["error"]["message"]
    assert "failed to load" in sidecar["error"]["message"]
    for job_id in ("uses_scripted", "uses_example"):
        assert wait_end(daemon, job_id)["state"] == "succeeded", daemon.sidecar(job_id)
    # The output folder is made when a plugin asks for it: example never does.
    assert (daemon.frames / "uses_scripted").is_dir()
    assert not (daemon.frames / "uses_example").exists()
    assert daemon.stop() == 0

    listing = kinod_cli("plugins", "--json", "--config", str(daemon.config), cwd=kinod_root)
    assert listing.returncode == 1, listing
    plugins = json.loads(listing.stdout)
    assert {"example", "scripted", "init_raises"} <= {p["name"] for p in plugins["plugins"]}
    assert {"broken_import", "broken_noclass", "broken_params", "syntax_error"} <= set(
        plugins["errors"])
    assert "kinod_test_module_that_does_not_exist" in plugins["errors"]["broken_import"]


def test_a_seed_style_plugin_gets_its_folder_settings_progress_and_log(
        start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon(plugin_dirs=[str(WORKING_PLUGINS)],
                          plugins={"scripted": {"colour_space": "aces", "max_concurrency": 2}})
    daemon.drop("seeded.yaml", scripted(steps=5, step_s=0.15, tag="t"))
    messages: list[str | None] = []

    def ended() -> bool:
        sidecar = daemon.sidecar("seeded")
        if sidecar is None:
            return False
        messages.append(sidecar["message"])
        return sidecar["state"] in TERMINAL

    wait_for(ended, 30, what="the job to end")
    sidecar = daemon.sidecar("seeded")
    assert sidecar["state"] == "succeeded", sidecar
    assert any(m and re.fullmatch(r"step [1-5]/5", m) for m in messages), messages
    result = sidecar["result"]
    assert result["settings"] == {"colour_space": "aces"}  # kinod's own keys are not passed
    assert Path(result["output_dir"]) == daemon.frames / "seeded"
    assert (daemon.frames / "seeded" / "runs.log").is_file()
    assert result["pid"] == daemon.proc.pid
    # What the plugin logs through the standard library lands in the job's own log.
    assert "scripted run 1 of seeded starting" in (daemon.outbox / "seeded.log").read_text()
    assert daemon.stop() == 0


def test_plugins_that_misbehave_fail_their_job_and_nothing_else(
        start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon(plugin_dirs=[str(WORKING_PLUGINS)], workers=6)
    expected = {
        # job id: (body, error code, text the message must hold)
        "init_fails": ({"type": "init_raises", "data": {}}, "plugin_error", "no GPU"),
        "raises": (scripted(outcome="raise"), "plugin_error", "RuntimeError: scripted explosion"),
        "exits": (scripted(outcome="exit"), "plugin_error", "SystemExit"),
        "garbage": (scripted(outcome="garbage"), "plugin_error", "not a PluginResult"),
        "fails": (scripted(outcome="fail"), "plugin_failed", "scripted failure"),
    }
    for job_id, (body, _, _) in expected.items():
        daemon.drop(f"{job_id}.yaml", body)
    for job_id, (_, code, text) in expected.items():
        sidecar = wait_end(daemon, job_id)
        assert sidecar["state"] == "failed", sidecar
        assert sidecar["error"]["code"] == code, sidecar
        assert text in sidecar["error"]["message"], sidecar
        assert sidecar["result"] is None
    assert daemon.proc.poll() is None  # SystemExit in a plugin did not end the daemon
    daemon.drop("still_serving.yaml", scripted())
    assert wait_end(daemon, "still_serving")["state"] == "succeeded"
    assert daemon.stop() == 0


def test_a_result_json_cannot_hold_still_ends_the_job(
        start_daemon: Callable[..., DaemonProcess]) -> None:
    # A plugin that returns an in-memory object (an image, a tensor) in its result data:
    # the job must still end, not stay "running" for ever, and the daemon goes on.
    daemon = start_daemon(plugin_dirs=[str(WORKING_PLUGINS)], workers=1)
    daemon.drop("odd_result.yaml", scripted(outcome="unserializable"))
    daemon.wait_state("odd_result", "running", *TERMINAL)
    daemon.drop("next_one.yaml", scripted())
    assert wait_end(daemon, "next_one", timeout_s=10)["state"] == "succeeded"
    sidecar = wait_end(daemon, "odd_result", timeout_s=5)
    # Values JSON cannot hold are stored as their text (str()); a set becomes a list.
    assert (sidecar["state"], sidecar["error"]) == ("succeeded", None), sidecar
    image = sidecar["result"]["image"]
    assert re.fullmatch(r"<[\w.]+\._Image object at 0x[0-9a-f]+>", image), image
    assert sidecar["result"] == {"image": image, "tags": ["a"]}
    assert spool_done(daemon, "odd_result") == ["1.yaml"]
    assert daemon.stop() == 0


def test_parameters_named_like_pydantic_attributes_load_and_run(
        start_daemon: Callable[..., DaemonProcess]) -> None:
    # model_config, schema, copy, json: ordinary names for a generator's parameters.
    daemon = start_daemon(plugin_dirs=[str(PLUGIN_FIXTURES / "awkward")])
    assert "plugin param_names failed to load" not in daemon.log(), daemon.log()
    daemon.drop("awkward.yaml", {"type": "param_names",
                                 "data": {"model_config": "sdxl.yaml", "copy": True}})
    sidecar = wait_end(daemon, "awkward")
    assert sidecar["state"] == "succeeded", sidecar
    assert sidecar["result"]["echo"] == {"model_config": "sdxl.yaml", "schema": "v1",
                                         "copy": True, "json": True}
    daemon.drop("awkward_bad.yaml", {"type": "param_names", "data": {"copy": "yes"}})
    sidecar = wait_end(daemon, "awkward_bad")
    assert sidecar["error"]["code"] == "invalid_job", sidecar
    assert "data.model_config:" in sidecar["error"]["message"]
    assert "data.copy:" in sidecar["error"]["message"]
    assert daemon.stop() == 0
