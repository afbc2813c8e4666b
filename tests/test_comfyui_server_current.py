"""The test peer as ComfyUI 0.3.64, compared field by field with every recording in
``tests/comfyui_protocol/`` (the 2024 server's are checked in test_comfyui_server.py)."""

from __future__ import annotations

import copy
import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from tests.comfyui_peer import MODERN, ComfyUITestServer, ws_messages
from tests.test_comfyui_server import DEADLINE_S, Peer, is_type, png_text

PROTOCOL = Path(__file__).parent / "comfyui_protocol"
CKPT = "random_sdxl.safetensors"  # the recorded server's checkpoints
GARBAGE = "garbage.safetensors"
TIMESTAMPS = ("timestamp",)


def recorded(name: str) -> Any:
    return json.loads((PROTOCOL / name).read_text())


def sent(record: dict[str, Any]) -> dict[str, Any]:
    """The graph a recorded POST /prompt sent."""
    return copy.deepcopy(record["request"]["json"]["prompt"])


def is_end(prompt_id: str) -> Callable[[dict[str, Any]], bool]:
    """0.3.64's last message of a run: executing with node null."""
    return lambda m: m == {"type": "executing", "data": {"node": None, "prompt_id": prompt_id}}


def same(obj: Any, names: dict[str, str]) -> Any:
    """obj with run-to-run values made equal: ids replaced by placeholders, timestamps and
    tracebacks (the server's own code) blanked, lists that are sets in ComfyUI sorted."""
    text = json.dumps(obj)
    for real, placeholder in names.items():
        text = text.replace(real, placeholder)

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if key == "timestamp":
                    value = 0
                elif key == "traceback":
                    value = ["..."]
                elif key in ("nodes", "current_outputs") and isinstance(value, list):
                    value = sorted(value)
                out[key] = walk(value)
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node
    return walk(json.loads(text))


def history_of(entry_body: dict[str, Any]) -> dict[str, Any]:
    """A history answer without the queue number (it counts every prompt the server took)."""
    body = copy.deepcopy(entry_body)
    for entry in body.values():
        entry["prompt"][0] = None
    return body


@pytest.fixture
def make_server() -> Iterator[Callable[..., ComfyUITestServer]]:
    servers: list[ComfyUITestServer] = []

    def make(**kwargs: Any) -> ComfyUITestServer:
        kwargs.setdefault("checkpoints", (CKPT, GARBAGE))
        servers.append(ComfyUITestServer(version=MODERN, **kwargs).start())
        return servers[-1]
    yield make
    for srv in servers:
        srv.stop()


@pytest.fixture
def srv(make_server: Callable[..., ComfyUITestServer]) -> ComfyUITestServer:
    return make_server()


@pytest.fixture
def peer(srv: ComfyUITestServer) -> Iterator[Callable[..., Peer]]:
    peers: list[Peer] = []

    def make(client_id: str | None = None) -> Peer:
        peers.append(Peer(srv, client_id))
        return peers[-1]
    yield make
    for p in peers:
        p.close()


def run(client: Peer, prompt: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    prompt_id = client.submit(prompt)
    return prompt_id, client.until(is_end(prompt_id))


def compare(client: Peer, prompt_id: str, messages: list[dict[str, Any]],
            transcript: dict[str, Any], history: dict[str, Any] | None = None) -> None:
    recorded_id = transcript["post_prompt"]["body"]["prompt_id"]
    names = {transcript["client_id"]: "CLIENT", client.client_id: "CLIENT",
             recorded_id: "PROMPT", prompt_id: "PROMPT"}
    assert same(messages, names) == same(ws_messages(transcript), names)
    if history is not None:
        answer = client.http.get(f"/history/{prompt_id}")
        assert answer.headers["content-type"] == history["headers"]["Content-Type"]
        assert same(history_of(answer.json()), names) == same(history_of(history["body"]), names)


def test_a_cold_run_sends_the_recorded_messages_and_history(srv, peer):
    transcript = recorded("ws_transcript_success.json")
    client = peer()
    prompt_id, messages = run(client, sent(transcript["post_prompt"]))
    compare(client, prompt_id, [client.hello, *messages], transcript,
            recorded("history_success.json"))
    view = recorded("view_success.json")
    image = client.http.get("/view", params={"filename": "kinod_test_00001_.png",
                                             "subfolder": "", "type": "output"})
    assert image.status_code == view["status"]
    for name in ("Content-Type", "Content-Disposition"):
        assert image.headers[name] == view["headers"][name]
    assert image.content[:8].hex() == view["body_head_hex"]
    sample = png_text((PROTOCOL / "sample_output.png").read_bytes())
    assert json.loads(png_text(image.content)["prompt"]) == json.loads(sample["prompt"])


def test_a_cached_rerun_reports_the_earlier_file_again(srv, peer):
    transcript = recorded("ws_transcript_cached_rerun.json")
    client = peer()
    run(client, sent(transcript["post_prompt"]))
    prompt_id, messages = run(client, sent(transcript["post_prompt"]))
    compare(client, prompt_id, [client.hello, *messages], transcript, transcript["history"])


def test_an_interrupted_run_matches_the_recording(srv, peer):
    transcript = recorded("ws_transcript_interrupted.json")
    client = peer()
    warm = sent(transcript["post_prompt"])
    warm["3"]["inputs"]["steps"] = 3
    run(client, warm)
    srv.behaviour = "stall"
    prompt_id = client.submit(sent(transcript["post_prompt"]))
    messages = client.until(is_type("progress", prompt_id))
    answer = client.http.post("/interrupt", json={"prompt_id": prompt_id})
    assert (answer.status_code, answer.text) == (200, transcript["post_interrupt"]["body_text"])
    messages += client.until(is_end(prompt_id))
    compare(client, prompt_id, [client.hello, *messages], transcript,
            recorded("history_interrupted.json"))


def test_a_failing_run_sends_the_recorded_execution_error(srv, peer):
    transcript = recorded("ws_transcript_error.json")
    client = peer()
    run(client, sent(transcript["post_prompt"]))  # EmptyLatentImage is cached, as then
    srv.behaviour = "fail"
    prompt_id, messages = run(client, sent(transcript["post_prompt"]))
    compare(client, prompt_id, [client.hello, *messages], transcript,
            recorded("history_error.json"))


def made_before(srv: ComfyUITestServer, count: int) -> None:
    """Files the recorded server had saved before: its next image's number follows them."""
    assert srv.output_dir is not None
    for n in range(1, count + 1):
        (srv.output_dir / f"kinod_test_{n:05}_.png").write_bytes(b"")


def binary_frames(transcript: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in transcript["ws_messages"] if e.get("binary")]


def test_previews_as_recorded_for_plain_and_feature_flag_clients(make_server):
    srv = make_server(previews=True)
    record = recorded("ws_transcript_previews.json")
    made_before(srv, 4)
    for kind in ("legacy_client", "feature_flags_client"):
        transcript = record[kind]
        client = Peer(srv)
        try:
            hello = [client.hello]
            if kind == "feature_flags_client":
                client.ws.send(json.dumps({"type": "feature_flags",
                                           "data": {"supports_preview_metadata": True}}))
                hello.append(client.next())
            prompt_id, messages = run(client, sent(transcript["post_prompt"]))
            compare(client, prompt_id, hello + messages, transcript)
            # Binary frames, in their place among the others, with the recorded headers.
            want = binary_frames(transcript)
            assert len(client.binary) == len(want) == 3
            for frame, rec in zip(client.binary, want, strict=True):
                assert frame[:4] == bytes.fromhex(rec["head_hex"])[:4]
                if rec["event_type"] == 4:
                    size = struct.unpack(">I", frame[4:8])[0]
                    assert frame[:8].hex() == rec["head_hex"].replace(
                        rec["head_hex"][8:], f"{size:08x}")
                    meta = json.loads(frame[8:8 + size])
                    names = {prompt_id: "P", transcript["post_prompt"]["body"]["prompt_id"]: "P"}
                    assert same(meta, names) == same(rec["metadata"], names)
                    assert frame[8 + size:8 + size + 8].hex() == rec["image_head_hex"]
                else:
                    assert frame[:8].hex() == rec["head_hex"]
                    assert frame[8:16].hex() == rec["image_head_hex"]
        finally:
            client.close()


def test_previews_come_before_progress_only_with_metadata(make_server):
    srv = make_server(previews=True)
    for flags, before in ((False, False), (True, True)):
        client = Peer(srv)
        try:
            if flags:
                client.ws.send(json.dumps({"type": "feature_flags",
                                           "data": {"supports_preview_metadata": True}}))
            order: list[str] = []
            prompt = sent(recorded("ws_transcript_success.json")["post_prompt"])
            prompt["3"]["inputs"]["seed"] = int(flags)  # not cached: the sampler runs
            prompt_id = client.submit(prompt)
            while True:
                frame = client.ws.recv(timeout=DEADLINE_S)
                if isinstance(frame, bytes):
                    order.append("preview")
                    continue
                message = json.loads(frame)
                if message["type"] == "progress":
                    order.append("progress")
                if is_end(prompt_id)(message):
                    break
            expected = ["preview", "progress"] if before else ["progress", "preview"]
            assert order == expected * 3
        finally:
            client.close()


def test_a_reconnect_mid_run_resends_executing_without_a_prompt_id(srv, peer):
    transcript = recorded("ws_reconnect_midrun.json")
    prompt = sent(transcript["post_prompt"])
    first = peer()
    warm = copy.deepcopy(prompt)
    warm["4"]["inputs"]["ckpt_name"] = GARBAGE  # only EmptyLatentImage stays cached, as then
    run(first, warm)
    srv.behaviour = "stall"  # the run waits after its first progress while the socket changes
    prompt_id = first.submit(prompt)
    before = first.until(is_type("progress", prompt_id))
    first.close()
    srv.wait_for(lambda: first.client_id not in srv.connected, timeout=DEADLINE_S)
    second = peer(first.client_id)
    srv.resume()
    after = [second.hello, *second.until(is_end(prompt_id))]
    names = {transcript["client_id"]: "CLIENT", first.client_id: "CLIENT",
             transcript["prompt_id"]: "PROMPT", prompt_id: "PROMPT"}
    want_first = [{"type": e["type"], "data": e["data"]}
                  for e in transcript["socket1_messages"] if "type" in e]
    want_second = [{"type": e["type"], "data": e["data"]}
                   for e in transcript["socket2_messages"] if "type" in e]
    assert same([first.hello, *before], names) == same(want_first, names)
    assert same(after, names) == same(want_second, names)
    entry = second.http.get(f"/history/{prompt_id}").json()[prompt_id]
    assert same(entry["status"], names) == same(transcript["history_status"], names)
    assert entry["outputs"] == transcript["history_outputs"]


def test_two_sockets_with_one_client_id_silence_each_other(srv):
    record = recorded("ws_same_client_id_two_sockets.json")
    client_id = "kinod-2s-test"
    warm = Peer(srv)  # the recording's upstream nodes were cached by an earlier run
    prompt = sent(record["case_A_both_open"]["post_prompt"])
    prompt["3"]["inputs"]["seed"] += 1
    made_before(srv, 1)
    run(warm, prompt)
    warm.close()
    older = Peer(srv, client_id)
    newer = Peer(srv, client_id)
    try:
        case = record["case_A_both_open"]
        prompt_id, messages = run(newer, sent(case["post_prompt"]))
        names = {record["client_id"]: "CLIENT", client_id: "CLIENT", prompt_id: "PROMPT",
                 case["post_prompt"]["body"]["prompt_id"]: "PROMPT"}
        want = [{"type": e["type"], "data": e["data"]}
                for e in case["newer_socket_messages"] if "type" in e]
        got = [newer.hello, *messages]
        assert same(got, names) == same(want[:len(got)], names)
        srv.wait_for(lambda: srv.quiet, timeout=DEADLINE_S)
        with pytest.raises(TimeoutError):
            older.ws.recv(timeout=0)  # the older socket had its greeting only
        older.close()
        srv.wait_for(lambda: client_id not in srv.connected, timeout=DEADLINE_S)
        case = record["case_B_older_closed"]
        again = newer.submit(sent(case["post_prompt"]))
        srv.wait_for(lambda: srv.history(again), timeout=DEADLINE_S)
        srv.wait_for(lambda: srv.quiet, timeout=DEADLINE_S)
        status = srv.history(again)[again]["status"]["status_str"]
        assert status == case["history_status"]
        with pytest.raises(TimeoutError):
            newer.ws.recv(timeout=0)  # nothing at all, not even the status broadcasts
    finally:
        older.close()
        newer.close()


def test_a_client_may_choose_the_prompt_id(srv, peer):
    steps = recorded("prompt_id_client_supplied.json")
    client = peer()
    chosen = steps[0]["request"]["json"]["prompt_id"]
    srv.hold()
    prompt = sent(recorded("ws_transcript_success.json")["post_prompt"])
    answer = client.http.post("/prompt", json={"prompt": prompt, "client_id": client.client_id,
                                               "prompt_id": chosen})
    assert answer.status_code == steps[0]["status"]
    assert answer.json().keys() == steps[0]["body"].keys()
    assert answer.json()["prompt_id"] == chosen
    assert client.http.get(f"/history/{chosen}").json() == steps[1]["body"] == {}
    queue = client.http.get("/queue").json()
    assert [[e[1], e[3], e[4]] for e in queue["queue_pending"]] == [
        [chosen, {"client_id": client.client_id}, ["9"]]]
    again = client.http.post("/prompt", json={"prompt": prompt, "client_id": client.client_id,
                                              "prompt_id": chosen})
    assert (again.status_code, again.json()["prompt_id"]) == (steps[3]["status"], chosen)
    srv.release()
    srv.wait_for(lambda: srv.quiet and srv.history(chosen), timeout=DEADLINE_S)
    history = client.http.get(f"/history/{chosen}").json()
    assert list(history) == list(steps[4]["body"])
    assert history[chosen]["prompt"][0] == again.json()["number"]  # the later run's entry
    number = client.http.post("/prompt", json={"prompt": prompt, "prompt_id": 123})
    assert number.json()["prompt_id"] == steps[5]["body"]["prompt_id"] == "123"


def test_queue_delete_and_interrupt_as_recorded(srv, peer):
    record = {s["step"].split(" (")[0]: s for s in recorded("queue_delete.json")["steps"]}
    steps = recorded("queue_delete.json")["steps"]
    client = peer()
    warm = copy.deepcopy(steps[1]["request"]["json"]["prompt"])
    warm["3"]["inputs"]["seed"] += 1
    run(client, warm)  # the recording's upstream nodes were cached by an earlier run
    srv.behaviour = "stall"
    a = client.submit(steps[0]["request"]["json"]["prompt"])
    client.until(is_type("progress", a))
    b = client.submit(steps[1]["request"]["json"]["prompt"])
    names = {steps[0]["body"]["prompt_id"]: "A", a: "A", steps[1]["body"]["prompt_id"]: "B",
             b: "B", recorded("queue_delete.json")["client_id"]: "C", client.client_id: "C"}

    def queue_ids(body: dict[str, Any]) -> Any:
        return same([[e[1], e[3], e[4]] for e in body["queue_running"]] +
                    [[e[1], e[3], e[4]] for e in body["queue_pending"]], names)
    assert queue_ids(client.http.get("/queue").json()) == queue_ids(steps[2]["body"])
    assert client.http.get("/prompt").json() == steps[3]["body"]
    for step, answer in ((steps[4], client.http.post("/interrupt", json={"prompt_id": b})),
                         (steps[5], client.http.post("/queue", json={"delete": [b]}))):
        assert (answer.status_code, answer.text) == (step["status"], step["body_text"])
    assert queue_ids(client.http.get("/queue").json()) == queue_ids(steps[6]["body"])
    for step, answer in ((steps[7], client.http.post("/queue", json={"delete": [b]})),
                         (steps[8], client.http.post("/interrupt"))):
        assert (answer.status_code, answer.text) == (step["status"], step["body_text"])
    client.until(is_end(a))
    assert client.http.get(f"/history/{b}").json() == steps[9]["body"]
    status = client.http.get(f"/history/{a}").json()[a]["status"]
    assert same(status, names) == same(steps[10]["status_field"], names)
    assert client.http.get("/queue").json() == steps[11]["body"]
    assert record  # every step above was replayed


ERROR_FILES = ("prompt_error_unknown_node.json", "prompt_error_missing_ckpt.json",
               "prompt_error_bad_input_type.json")


def error_cases() -> list[tuple[str, dict[str, Any]]]:
    cases = [(name, recorded(name)) for name in ERROR_FILES]
    cases += [(case["case"], case) for case in recorded("prompt_errors_more.json")]
    return cases


@pytest.mark.parametrize(("name", "case"), error_cases(), ids=[n for n, _ in error_cases()])
def test_prompt_validation_answers_as_recorded(make_server, name, case):
    srv = make_server(checkpoints=(CKPT,))  # as the recorded server, which listed only it
    request = case["request"]
    with httpx.Client(base_url=srv.url, timeout=DEADLINE_S) as http:
        if "raw_body" in request:
            answer = http.post(request["path"], content=request["raw_body"])
        else:
            answer = http.post(request["path"], json=request["json"])
    assert answer.status_code == case["status"]
    if "body_text" in case:
        assert answer.text == case["body_text"]
    elif answer.status_code == 200:  # ids and numbers differ from run to run
        assert answer.json().keys() == case["body"].keys()
        assert answer.json()["node_errors"] == case["body"]["node_errors"]
    else:
        assert same(answer.json(), {}) == same(case["body"], {})


def test_get_endpoints_answer_as_recorded(make_server):
    srv = make_server(checkpoints=(CKPT,))
    with httpx.Client(base_url=srv.url, timeout=DEADLINE_S) as http:
        for case in recorded("misc_get_endpoints.json"):
            answer = http.get(case["request"]["path"])
            assert answer.status_code == case["status"], case["request"]["path"]
            if "body" in case:
                assert answer.json() == case["body"], case["request"]["path"]
        for name in ("object_info.json", "system_stats.json", "queue_idle.json"):
            case = recorded(name)
            answer = http.get(case["request"]["path"])
            assert answer.status_code == case["status"]
            assert answer.headers["content-type"] == case["headers"]["Content-Type"]
            assert answer.json() == case["body"]


def test_the_recorded_workflow_is_the_one_every_transcript_sent():
    workflow = recorded("workflow_sdxl_txt2img_api.json")
    for name in ("ws_transcript_success.json", "ws_transcript_cached_rerun.json"):
        assert recorded(name)["workflow_sent"] == workflow


def test_an_upload_is_listed_by_load_image_and_renamed_when_taken(srv):
    with httpx.Client(base_url=srv.url, timeout=DEADLINE_S) as http:
        names = []
        for _ in range(2):
            answer = http.post("/upload/image", files={"image": ("in.png", b"\x89PNG data")})
            assert answer.status_code == 200
            names.append(answer.json())
        assert names == [{"name": "in.png", "subfolder": "", "type": "input"},
                         {"name": "in (1).png", "subfolder": "", "type": "input"}]
        listed = http.get("/object_info/LoadImage").json()["LoadImage"]
        assert listed["input"]["required"]["image"][0] == ["in (1).png", "in.png"]
    with connect(f"ws://127.0.0.1:{srv.port}/ws") as ws:
        assert json.loads(ws.recv(timeout=DEADLINE_S))["type"] == "status"
