"""The comfyui plugin: any API-format workflow, against the test peer as ComfyUI 0.3.64."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kinod.errors import InvalidJob
from kinod.intake import check_job
from kinod.plugins.comfyui import node_types
from kinod.plugins.comfyui.loader import ComfyuiPlugin
from kinod.plugins.comfyui.workflows import MAX_WORKFLOW_BYTES
from kinod.plugins.plugin_loader import PluginRegistry
from kinod.plugins.sdxl.parameters import check_parameters
from kinod.plugins.sdxl.workflow import build_txt2img
from kinod.runner import new_plugin
from tests.comfyui_peer import MODERN, ComfyUITestServer
from tests.test_sdxl_plugin import QUICK, SDXL, JobThread, png_text

REPO = Path(__file__).parent.parent
SHIPPED = REPO / "workflows"
SMALL = {"Empty Latent Image.width": 64, "Empty Latent Image.height": 64, "KSampler.steps": 3}


@pytest.fixture(autouse=True)
def fresh_node_types() -> Iterator[None]:
    """Node types are kept per URL: a later test's server may get an earlier one's port."""
    node_types.forget()
    yield
    node_types.forget()


@pytest.fixture
def server() -> Iterator[ComfyUITestServer]:
    with ComfyUITestServer(version=MODERN, checkpoints=(SDXL,), extra_nodes=True,
                           previews=True) as srv:
        yield srv


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    made = {name: tmp_path / name for name in ("workflows", "models_storage", "frames")}
    for folder in made.values():
        folder.mkdir()
    for shipped in SHIPPED.glob("*.json"):
        (made["workflows"] / shipped.name).write_bytes(shipped.read_bytes())
    return made


def plugin_for(folders: dict[str, Path], server: ComfyUITestServer, task_id: str = "job1",
               **settings: Any) -> ComfyuiPlugin:
    output_dir = folders["frames"] / task_id
    plugin = new_plugin(ComfyuiPlugin, output_dir,
                        {"comfyui_urls": [server.url], "workflows": str(folders["workflows"]),
                         **QUICK, **settings}, folders["models_storage"])
    assert isinstance(plugin, ComfyuiPlugin)
    return plugin


def run(plugin: ComfyuiPlugin, data: dict[str, Any]) -> JobThread:
    job = JobThread(plugin, data).start()  # type: ignore[arg-type]
    job.join()
    return job


def write_workflow(folders: dict[str, Path], name: str, graph: Any) -> None:
    (folders["workflows"] / name).write_text(json.dumps(graph))


def test_null_optional_parameters_get_their_defaults_and_the_workflow_is_required():
    registry = PluginRegistry()
    nulls = {"inputs": None, "images": None, "randomize_seeds": None}
    _, _, data = check_job({"type": "comfyui", "data": {"workflow": "w", **nulls}}, registry)
    assert data == {"workflow": "w", "inputs": {}, "images": {}, "randomize_seeds": True}
    with pytest.raises(InvalidJob, match="workflow"):
        check_job({"type": "comfyui", "data": {"workflow": None, **nulls}}, registry)


def test_the_shipped_txt2img_workflow_is_the_sdxl_plugins_own_graph():
    shipped = json.loads((SHIPPED / "sdxl_txt2img.json").read_text())
    params = check_parameters({"prompt": "beautiful landscape",
                               "negative_prompt": "blurry, low quality", "seed": 42})
    graph = build_txt2img(params, "kinod")
    assert {nid: {k: v for k, v in node.items() if k != "_meta"}
            for nid, node in shipped.items()} == graph


def test_overrides_by_title_and_id_and_random_seeds_are_sent_and_recorded(folders, server):
    plugin = plugin_for(folders, server)
    job = run(plugin, {"workflow": "sdxl_txt2img",
                       "inputs": {**SMALL, "Prompt.text": "a red fox", "7.text": "fog"}})
    result = job.join()
    assert result.success, result.error
    data = result.data
    sent = server.prompts[data["prompt_id"]]
    assert (sent["6"]["inputs"]["text"], sent["7"]["inputs"]["text"]) == ("a red fox", "fog")
    assert sent["5"]["inputs"]["width"] == 64 and sent["3"]["inputs"]["steps"] == 3
    assert data["inputs"] == {"5.width": 64, "5.height": 64, "3.steps": 3,
                              "6.text": "a red fox", "7.text": "fog"}
    assert data["seeds"] == {"3.seed": sent["3"]["inputs"]["seed"]}
    assert sent["3"]["inputs"]["seed"] != 42  # randomized: the API format has no "control"
    [saved] = data["files"]
    assert (saved["node"], saved["kind"]) == ("9", "images")
    image = (plugin.output_dir / saved["file"]).read_bytes()
    assert json.loads(png_text(image)["prompt"]) == sent
    assert job.percents == sorted(job.percents) and job.percents[-1] == 100.0
    assert any(m and m.startswith("node ") for _, m in job.progress)


def test_a_seed_the_job_sets_or_randomize_off_keeps_it(folders, server):
    for data in ({"inputs": {**SMALL, "KSampler.seed": 7}},
                 {"inputs": SMALL, "randomize_seeds": False}):
        plugin = plugin_for(folders, server)
        result = run(plugin, {"workflow": "sdxl_txt2img.json", **data}).join()
        assert result.success, result.error
        expected = 7 if "KSampler.seed" in data["inputs"] else 42
        assert result.data["seeds"] == {"3.seed": expected}


def test_every_bad_override_is_named_before_anything_is_sent(folders, server):
    plugin = plugin_for(folders, server)
    result = run(plugin, {"workflow": "sdxl_txt2img", "inputs": {
        "Nope.text": 1, "6.nope": 2, "bad": 3}, "images": {"KSampler": "x.png"}}).join()
    assert not result.success and not result.retryable
    for part in ("data.inputs.Nope.text: no node has id or title 'Nope'",
                 "data.inputs.6.nope: node 6 (CLIPTextEncode) has no input 'nope'",
                 "data.inputs.bad: write it as", ):
        assert part in result.error
    assert not server.requests


@pytest.mark.parametrize(("content", "message"), [
    ({"nodes": [], "links": [], "version": 0.4}, "UI format"),
    ("{not json", "not JSON"),
    ({"1": {"inputs": {}}}, "not an API-format workflow"),
    ([1, 2], "not an API-format workflow"),
])
def test_a_file_that_is_no_api_workflow_is_refused_saying_how_to_export(folders, server,
                                                                        content, message):
    path = folders["workflows"] / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    result = run(plugin_for(folders, server), {"workflow": "bad"}).join()
    assert not result.success and message in result.error
    if message != "not JSON":
        assert "Export (API)" in result.error
    assert not server.requests


def test_an_oversized_workflow_or_a_path_out_of_the_folder_is_refused(folders, server):
    (folders["workflows"] / "big.json").write_bytes(b" " * (MAX_WORKFLOW_BYTES + 1))
    result = run(plugin_for(folders, server), {"workflow": "big"}).join()
    assert not result.success and "more than a workflow may be" in result.error
    result = run(plugin_for(folders, server), {"workflow": "../frames/x"}).join()
    assert not result.success and "must name a file inside" in result.error
    assert not server.requests


def test_a_node_class_the_server_lacks_is_named_and_nothing_is_queued(folders, server):
    graph = json.loads((SHIPPED / "sdxl_txt2img.json").read_text())
    graph["10"] = {"class_type": "UltimateSDUpscale", "inputs": {"image": ["8", 0]}}
    write_workflow(folders, "upscale.json", graph)
    result = run(plugin_for(folders, server), {"workflow": "upscale"}).join()
    assert not result.success and "UltimateSDUpscale" in result.error
    assert ("GET", "/object_info", None) in server.requests
    assert not server.prompts


def test_img2img_uploads_the_image_and_uses_the_name_the_server_gave(folders, server):
    source = folders["frames"] / "shot1" / "in.png"
    source.parent.mkdir()
    source.write_bytes(b"\x89PNG fake")
    assert server.input_dir is not None
    (server.input_dir / "in.png").write_bytes(b"taken")  # the server renames ours
    plugin = plugin_for(folders, server)
    result = run(plugin, {"workflow": "sdxl_img2img", "images": {"Input image": "shot1/in.png"},
                          "inputs": {"KSampler.steps": 2}}).join()
    assert result.success, result.error
    sent = server.prompts[result.data["prompt_id"]]
    assert sent["2"]["inputs"]["image"] == "in (1).png" == result.data["images"]["2"]
    [upload] = server.uploads
    assert (upload["filename"], upload["bytes"]) == ("in.png", b"\x89PNG fake")


@pytest.mark.parametrize("path", ["/etc/passwd", "../../etc/passwd", "nope.png"])
def test_an_image_outside_the_frames_and_models_folders_is_refused(folders, server, path):
    result = run(plugin_for(folders, server), {"workflow": "sdxl_img2img",
                                                "images": {"2": path}}).join()
    assert not result.success and "data.images.2" in result.error
    assert not server.requests


def test_every_output_is_saved_video_and_audio_too_but_no_preview(folders, server):
    graph = json.loads((SHIPPED / "sdxl_txt2img.json").read_text())
    graph["5"]["inputs"].update(width=64, height=64)
    graph["3"]["inputs"]["steps"] = 2
    graph["10"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    graph["11"] = {"class_type": "VHS_VideoCombine", "inputs": {
        "images": ["8", 0], "frame_rate": 8, "filename_prefix": "clips/kinod"}}
    graph["12"] = {"class_type": "KinodTestTone", "inputs": {"seconds": 1.0}}
    graph["13"] = {"class_type": "SaveAudio", "inputs": {"audio": ["12", 0],
                                                         "filename_prefix": "audio/kinod"}}
    write_workflow(folders, "everything.json", graph)
    plugin = plugin_for(folders, server)
    result = run(plugin, {"workflow": "everything"}).join()
    assert result.success, result.error
    kinds = sorted((f["node"], f["kind"], Path(f["file"]).suffix) for f in result.data["files"])
    assert kinds == [("11", "gifs", ".gif"), ("13", "audio", ".flac"), ("9", "images", ".png")]
    for saved in result.data["files"]:
        assert (plugin.output_dir / saved["file"]).stat().st_size > 0
    assert sorted(p.name for p in plugin.output_dir.iterdir()) == sorted(
        f["file"] for f in result.data["files"])


def test_stopping_a_running_workflow_interrupts_it(folders, server):
    server.behaviour = "stall"
    plugin = plugin_for(folders, server)
    job = JobThread(plugin, {"workflow": "sdxl_txt2img", "inputs": SMALL})  # type: ignore[arg-type]
    job.start()
    server.wait_for(lambda: any(m and m.startswith("step") for _, m in job.progress), timeout=20)
    job.stop()
    result = job.join()
    assert not result.success and result.error == "stopped on request"
    assert [i["prompt_id"] for i in server.interrupts] == list(server.prompts)


def test_node_types_are_read_once_and_again_before_a_check_fails_on_them(folders, server):
    def reads() -> int:
        return sum(path == "/object_info" for _, path, _ in server.requests)

    for task_id in ("a", "b"):
        result = run(plugin_for(folders, server, task_id), {"workflow": "sdxl_txt2img",
                                                            "inputs": SMALL}).join()
        assert result.success, result.error
    assert reads() == 1
    graph = json.loads((SHIPPED / "sdxl_txt2img.json").read_text())
    graph["10"] = {"class_type": "KinodNewNode", "inputs": {"image": ["8", 0]}}
    write_workflow(folders, "newer.json", graph)
    result = run(plugin_for(folders, server, "c"), {"workflow": "newer"}).join()
    assert not result.success and "KinodNewNode" in result.error
    assert reads() == 2  # asked again: the server may have gained the node since
