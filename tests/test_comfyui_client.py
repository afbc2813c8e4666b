"""The client against ComfyUI 0.3.64 (the test peer): one test for each point the protocol
README says a client must get right."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from kinod.plugins.sdxl import explain, messages
from tests.comfyui_peer import MODERN, ComfyUITestServer, ws_messages
from tests.test_sdxl_plugin import SDXL, SMALL_JOB, JobThread, make_plugin, run_job

PROTOCOL = Path(__file__).parent / "comfyui_protocol"


def recorded(name: str) -> dict:
    return json.loads((PROTOCOL / name).read_text())


@pytest.fixture
def models(tmp_path: Path) -> Path:
    folder = tmp_path / "models_storage" / "StableDiffusion"
    folder.mkdir(parents=True)
    (folder / SDXL).write_bytes(b"not really weights")
    return folder.parent


@pytest.fixture
def server() -> Iterator[ComfyUITestServer]:
    with ComfyUITestServer(version=MODERN, step_delay_s=0.01) as srv:
        yield srv


def socket_ids(server: ComfyUITestServer) -> list[str]:
    return [parse_qs(urlsplit(path).query)["clientId"][0]
            for method, path, _ in server.requests if urlsplit(path).path == "/ws"]


def test_each_socket_has_a_client_id_of_its_own_and_posts_with_it(tmp_path, models, server):
    for task in ("a", "b"):
        plugin = make_plugin(tmp_path, models, [server.url], task_id=task)
        assert run_job(plugin, SMALL_JOB).join().success
    ids = socket_ids(server)
    assert len(ids) == len(set(ids)) == 2  # never one id on two sockets
    posted = [body["client_id"] for m, path, body in server.requests if path == "/prompt"]
    assert posted == ids


def test_a_run_ending_with_execution_success_then_executing_null_succeeds_once(
        tmp_path, models, server):
    assert server.end_style == "both"  # 0.3.64's own end
    job = run_job(make_plugin(tmp_path, models, [server.url]), SMALL_JOB)
    result = job.join()
    assert result.success, result.error
    assert job.percents == sorted(job.percents) and job.percents[-1] == 100.0
    assert len([r for r in server.requests if r[1].startswith("/view")]) == 1


def test_progress_state_and_other_unknown_messages_are_read_past():
    for message in ws_messages(recorded("ws_transcript_success.json")):
        if message["type"] in ("progress_state", "status", "execution_cached", "executed"):
            event = messages.parse_ws_message(json.dumps(message))
            assert event is None or isinstance(event, messages.Cached)
    states = [m for m in ws_messages(recorded("ws_transcript_success.json"))
              if m["type"] == "progress_state"]
    assert len(states) >= len(ws_messages(recorded("ws_transcript_success.json"))) // 2 - 2


def test_the_executing_resent_on_reconnect_carries_no_prompt_and_is_ignored():
    resent = next(m for m in ws_messages({"ws_messages": recorded(
        "ws_reconnect_midrun.json")["socket2_messages"]}) if m["type"] == "executing")
    assert resent == {"type": "executing", "data": {"node": "3"}}
    assert messages.parse_ws_message(json.dumps(resent)) is None


def test_an_unknown_node_answered_400_reads_as_comfyuis_reason():
    answer = recorded("prompt_error_unknown_node.json")
    text = explain.describe_rejection("http://gpu-1:8188", 400, json.dumps(answer["body"]))
    assert text == ("ComfyUI at http://gpu-1:8188 refused the prompt: Cannot execute because "
                    "node NoSuchNode does not exist.: Node ID '#5'")


def test_a_queued_prompt_whose_history_is_empty_is_waiting_not_lost(tmp_path, models, server):
    server.hold()
    job = JobThread(make_plugin(tmp_path, models, [server.url]), SMALL_JOB).start()
    server.wait_for(lambda: server.prompts, timeout=20)
    [prompt_id] = server.prompts
    assert server.history(prompt_id) == {}
    server.wait_for(lambda: any(m == f"waiting on {server.url}, position 1"
                                for _, m in job.progress), timeout=20)
    server.release()
    result = job.join()
    assert result.success, result.error


def test_the_client_chooses_the_prompt_id_and_newer_servers_keep_it(tmp_path, models, server):
    result = run_job(make_plugin(tmp_path, models, [server.url]), SMALL_JOB).join()
    [body] = [b for m, path, b in server.requests if path == "/prompt"]
    assert result.data["prompt_id"] == body["prompt_id"] in server.prompts


def test_an_older_server_that_chooses_its_own_prompt_id_is_followed_by_that(tmp_path, models):
    with ComfyUITestServer(step_delay_s=0.01) as legacy:
        result = run_job(make_plugin(tmp_path, models, [legacy.url]), SMALL_JOB).join()
        [body] = [b for m, path, b in legacy.requests if path == "/prompt"]
        assert result.success and result.data["prompt_id"] != body["prompt_id"]
        assert result.data["prompt_id"] in legacy.prompts


def test_a_cached_rerun_saves_the_earlier_file_again(tmp_path, models, server):
    first = run_job(make_plugin(tmp_path, models, [server.url], task_id="a"),
                    {**SMALL_JOB, "seed": 5}).join()
    again = run_job(make_plugin(tmp_path, models, [server.url], task_id="b"),
                    {**SMALL_JOB, "seed": 5}).join()
    assert first.success and again.success, again.error
    views = [path for _, path, _ in server.requests if path.startswith("/view")]
    assert len(views) == 2 and views[0] == views[1]  # the same file on the server
