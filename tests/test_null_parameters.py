"""A plugin parameter given as null counts as left out, for every built-in plugin.

In YAML ``steps:`` with no value is null, and whoever wrote it means "the default": an
optional parameter gets its default (or stays absent if it has none), a required one is
reported as required. ``kinod validate`` and the daemon agree, and the plugin never sees
the null.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kinod.errors import InvalidJob
from kinod.intake import check_job
from kinod.plugins.plugin_loader import BUILTIN_DIR, LoadedPlugin, PluginRegistry
from tests.comfyui_peer import ComfyUITestServer
from tests.helpers import DaemonProcess, drop_job, kinod_cli, wait_end

BUILT_IN = ["example", "sdxl"]
SDXL_MODEL = "sd_xl_base_1.0.safetensors"


def built_in(name: str) -> tuple[PluginRegistry, LoadedPlugin]:
    registry = PluginRegistry()
    plugin = registry.get(name)
    assert plugin is not None, registry.errors
    return registry, plugin


def declared(plugin: LoadedPlugin) -> dict[str, dict[str, Any]]:
    return plugin.info["parameters"]


def defaults(plugin: LoadedPlugin) -> dict[str, Any]:
    return {name: spec["default"] for name, spec in declared(plugin).items() if "default" in spec}


def job_text(plugin: str, prompt: str | None, optional: list[str]) -> str:
    """A YAML job whose listed parameters have no value (null), as people write them."""
    lines = [f"type: {plugin}", "data:", f"  prompt: {prompt or ''}"]
    return "\n".join(lines + [f"  {name}:" for name in optional]) + "\n"


def optional(plugin: LoadedPlugin) -> list[str]:
    return [name for name, spec in declared(plugin).items() if not spec.get("required")]


def test_the_built_in_plugins_are_the_ones_tested_here() -> None:
    registry = PluginRegistry()
    assert sorted(name for name, plugin in registry.plugins.items()
                  if Path(plugin.source).parent == BUILTIN_DIR) == sorted(
        [*BUILT_IN, "blender", "comfyui"])  # no prompt: the test below, and comfyui's in
                                            # tests/test_comfyui_plugin.py


def test_null_optional_blender_parameters_get_their_defaults() -> None:
    registry, plugin = built_in("blender")
    required = {"blend_file": "shot.blend", "frames": "1-10"}
    nulls = {name: None for name in optional(plugin) if name not in required}
    assert nulls
    _, _, data = check_job({"type": "blender", "data": {**required, **nulls}}, registry)
    _, _, left_out = check_job({"type": "blender", "data": required}, registry)
    assert data == left_out == {**defaults(plugin), **required}


@pytest.mark.parametrize("name", BUILT_IN)
def test_null_optional_parameters_get_their_defaults(name: str) -> None:
    registry, plugin = built_in(name)
    nulls = dict.fromkeys(optional(plugin))
    assert nulls, "every built-in plugin has optional parameters"
    _, _, data = check_job({"type": name, "data": {"prompt": "x", **nulls}}, registry)
    assert data == {"prompt": "x", **defaults(plugin)}
    _, _, left_out = check_job({"type": name, "data": {"prompt": "x"}}, registry)
    assert data == left_out


@pytest.mark.parametrize("name", BUILT_IN)
def test_a_null_prompt_is_reported_required(name: str) -> None:
    registry, plugin = built_in(name)
    with pytest.raises(InvalidJob) as info:
        check_job({"type": name, "data": {"prompt": None, **dict.fromkeys(optional(plugin))}},
                  registry)
    assert info.value.message == "data.prompt: required"


@pytest.mark.parametrize("name", BUILT_IN)
def test_kinod_validate_takes_null_as_left_out(tmp_path: Path, name: str) -> None:
    _, plugin = built_in(name)
    good = tmp_path / "good.yaml"
    good.write_text(job_text(name, "x", optional(plugin)))
    bad = tmp_path / "bad.yaml"
    bad.write_text(job_text(name, None, optional(plugin)))
    result = kinod_cli("validate", str(good), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"{good}: ok ({name})"
    result = kinod_cli("validate", str(bad), cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.strip() == f"{bad}: invalid: data.prompt: required"


def test_the_daemon_runs_null_parameters_as_their_defaults(
        kinod_root: Path, start_daemon: Callable[..., DaemonProcess]) -> None:
    checkpoints = kinod_root / "models_storage" / "StableDiffusion"
    checkpoints.mkdir()
    (checkpoints / SDXL_MODEL).write_bytes(b"weights")
    _, example = built_in("example")
    _, sdxl = built_in("sdxl")
    with ComfyUITestServer(step_delay_s=0.001) as server:
        daemon = start_daemon(plugins={"sdxl": {"comfyui_urls": [server.url],
                                                "poll_interval_s": 0.05}})
        inbox = daemon.inbox
        drop_job(inbox, "ex.yaml", job_text("example", "x", optional(example)))
        drop_job(inbox, "sd.yaml", job_text("sdxl", "x", optional(sdxl)))
        drop_job(inbox, "ex_no_prompt.yaml", job_text("example", None, optional(example)))
        drop_job(inbox, "sd_no_prompt.yaml", job_text("sdxl", None, optional(sdxl)))

        ex = wait_end(daemon, "ex")
        assert ex["state"] == "succeeded", ex["error"]
        assert ex["result"]["steps"] == defaults(example)["steps"]
        sd = wait_end(daemon, "sd")
        assert sd["state"] == "succeeded", sd["error"]
        used = sd["result"]["parameters"]
        assert isinstance(used.pop("seed"), int)  # no default: a random one, reported
        assert used == {"prompt": "x", **defaults(sdxl)}
        for job_id in ("ex_no_prompt", "sd_no_prompt"):
            sidecar = wait_end(daemon, job_id)
            assert sidecar["state"] == "failed", sidecar
            assert sidecar["error"] == {"code": "invalid_job",
                                        "message": "data.prompt: required"}
        assert daemon.stop() == 0
