"""The sdxl plugin against a real HTTP + websocket server speaking ComfyUI's recorded protocol.

Each job runs as kinod runs it: one plugin instance, ``generate()`` on a thread of its own with
its own event loop, ``stop()`` sent to that loop while ``generate()`` runs.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kinod.plugins.base_plugin import PluginResult
from kinod.plugins.sdxl.loader import SdxlPlugin
from kinod.runner import new_plugin
from tests.comfyui_peer import ComfyUITestServer
from tests.helpers import TERMINAL, DaemonProcess, wait_end, wait_for

SDXL = "sd_xl_base_1.0.safetensors"
SEED_JOB = {"prompt": "beautiful landscape", "model_name": SDXL,
            "negative_prompt": "blurry, low quality", "width": 1024, "height": 1024,
            "steps": 30, "cfg_scale": 7.5, "sampler": "dpmpp_2m_sde"}
SMALL_JOB = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 20}
DEADLINE_S = 30.0  # generous: only a failing test waits this long
# Quick polling and a short grace for a vanished server keep the tests short.
QUICK = {"poll_interval_s": 0.05, "unreachable_grace_s": 1.0, "stop_wait_s": 5.0}


class JobThread:
    """One job run as kinod runs it; ``progress`` collects (percent, message) reports."""

    def __init__(self, plugin: SdxlPlugin, data: dict[str, Any], task_id: str = "shot010"):
        self.plugin = plugin
        self.progress: list[tuple[float, str | None]] = []
        self.result: PluginResult | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._run(task_id, data),),
                                        name=f"job-{task_id}")

    def _report(self, percent: float, message: str | None = None) -> None:
        self.progress.append((percent, message))

    async def _run(self, task_id: str, data: dict[str, Any]) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_ready.set()
        self.result = await self.plugin.generate(task_id, dict(data), self._report)

    def start(self) -> JobThread:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._loop_ready.wait(DEADLINE_S)
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self.plugin.stop(), self._loop).result(DEADLINE_S)

    def join(self) -> PluginResult:
        self._thread.join(DEADLINE_S)
        assert not self._thread.is_alive(), "the job did not end"
        assert self.result is not None
        return self.result

    @property
    def percents(self) -> list[float]:
        return [percent for percent, _ in self.progress]


@pytest.fixture
def models(tmp_path: Path) -> Path:
    folder = tmp_path / "models_storage" / "StableDiffusion"
    folder.mkdir(parents=True)
    (folder / SDXL).write_bytes(b"not really weights")
    return folder.parent


@pytest.fixture
def comfy() -> Iterator[ComfyUITestServer]:
    with ComfyUITestServer(step_delay_s=0.01) as server:
        yield server


def make_plugin(tmp_path: Path, models: Path, urls: list[str], task_id: str = "shot010",
                **settings: Any) -> SdxlPlugin:
    output_dir = tmp_path / "data" / "frames" / task_id
    output_dir.mkdir(parents=True, exist_ok=True)
    plugin = new_plugin(SdxlPlugin, output_dir, {"comfyui_urls": urls, **QUICK, **settings},
                        models)
    assert isinstance(plugin, SdxlPlugin)
    return plugin


def run_job(plugin: SdxlPlugin, data: dict[str, Any]) -> JobThread:
    job = JobThread(plugin, data).start()
    job.join()
    return job


def unused_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def png_text(data: bytes) -> dict[str, str]:
    """A PNG's tEXt chunks, checking its signature and every chunk's CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    text, at = {}, 8
    while at < len(data):
        (size,) = struct.unpack(">I", data[at:at + 4])
        kind, body = data[at + 4:at + 8], data[at + 8:at + 8 + size]
        assert struct.unpack(">I", data[at + 8 + size:at + 12 + size])[0] == zlib.crc32(kind + body)
        if kind == b"tEXt":
            key, _, value = body.partition(b"\0")
            text[key.decode("latin-1")] = value.decode("latin-1")
        at += 12 + size
    return text


def posted(server: ComfyUITestServer) -> list[str]:
    return list(server.prompts)


# --- success -------------------------------------------------------------------------------

@pytest.mark.parametrize("end_style", ["executing_null", "execution_success", "both"])
def test_the_seed_job_saves_pngs_with_comfyuis_metadata_and_rising_progress(
        tmp_path: Path, models: Path, end_style: str) -> None:
    with ComfyUITestServer(step_delay_s=0.01, end_style=end_style) as server:
        plugin = make_plugin(tmp_path, models, [server.url])
        job = run_job(plugin, SEED_JOB)
        result = job.join()
        assert result.success, result.error
        data = result.data
        assert data["server"] == server.url
        assert data["prompt_id"] in server.prompts
        assert data["parameters"] == {**SEED_JOB, "scheduler": "karras", "batch_size": 1,
                                      "seed": data["seed"]}
        assert data["output_dir"] == str(plugin.output_dir.resolve())
        assert set(data["timings"]) == {"queued_s", "generation_s", "download_s", "total_s"}
        assert data["timings"]["total_s"] > 0
        [name] = data["images"]
        image = (plugin.output_dir / name).read_bytes()
        sent = server.prompts[data["prompt_id"]]
        assert json.loads(png_text(image)["prompt"]) == json.loads(json.dumps(sent))
        assert sent["3"]["inputs"]["seed"] == data["seed"]
        assert sent["4"]["inputs"]["ckpt_name"] == SDXL
        assert [p.name for p in plugin.output_dir.iterdir()] == [name]  # no temporary left
    percents = job.percents
    assert percents == sorted(percents) and percents[-1] == 100.0
    sampling = [p for p, message in job.progress if message and message.startswith("step ")]
    assert len(set(sampling)) >= 10  # one report per sampler step (30 of them)


def test_a_batch_saves_every_image(tmp_path: Path, models: Path,
                                   comfy: ComfyUITestServer) -> None:
    plugin = make_plugin(tmp_path, models, [comfy.url])
    result = run_job(plugin, {**SMALL_JOB, "batch_size": 3, "seed": 7}).join()
    assert result.success, result.error
    assert len(result.data["images"]) == 3
    for name in result.data["images"]:
        assert "prompt" in png_text((plugin.output_dir / name).read_bytes())


def test_a_dropped_websocket_falls_back_to_history_and_still_succeeds(
        tmp_path: Path, models: Path) -> None:
    with ComfyUITestServer(step_delay_s=0.05) as server:
        plugin = make_plugin(tmp_path, models, [server.url])
        job = JobThread(plugin, SMALL_JOB).start()
        wait_for(lambda: any(m and m.startswith("step ") for _, m in job.progress), DEADLINE_S,
                 what="the first sampler step")
        server.drop_websockets()
        result = job.join()
        assert result.success, result.error
        # With the websocket up, /queue is asked once to choose the server and once at the end;
        # without it, every poll_interval_s until the prompt is over.
        polls = [r for r in server.requests if r[:2] == ("GET", "/queue")]
        assert len(polls) >= 5, server.requests
        prompt_id = result.data["prompt_id"]
        assert ("GET", f"/history/{prompt_id}", None) in server.requests
        assert (plugin.output_dir / result.data["images"][0]).is_file()


def test_a_message_too_deep_to_parse_is_read_past_and_the_job_succeeds(
        tmp_path: Path, models: Path) -> None:
    # Deeper than any JSON parser recurses: it raises RecursionError, not a ValueError.
    deep = '{"type": "crystools.monitor", "data": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with ComfyUITestServer(step_delay_s=0.01) as server:
        server.extra_messages = [deep, "not json either"]
        plugin = make_plugin(tmp_path, models, [server.url])
        job = run_job(plugin, SMALL_JOB)
        result = job.join()
        assert result.success, result.error
        assert (plugin.output_dir / result.data["images"][0]).is_file()
        # The websocket was read on past the messages: every sampler step came through it.
        steps = [m for _, m in job.progress if m and m.startswith("step ")]
        assert steps == [f"step {i}/20 on {server.url}" for i in range(1, 21)]


# --- stopping ------------------------------------------------------------------------------

def test_stopping_a_running_prompt_interrupts_it(tmp_path: Path, models: Path,
                                                 comfy: ComfyUITestServer) -> None:
    comfy.behaviour = "stall"  # stops after its first step until interrupted
    plugin = make_plugin(tmp_path, models, [comfy.url])
    job = JobThread(plugin, SMALL_JOB).start()
    wait_for(lambda: any(m and m.startswith("step ") for _, m in job.progress), DEADLINE_S,
             what="the first sampler step")
    job.stop()
    result = job.join()
    assert not result.success and result.error == "stopped on request"
    [prompt_id] = posted(comfy)
    assert comfy.interrupts == [{"prompt_id": prompt_id}]
    assert comfy.deleted == []
    assert comfy.history(prompt_id)[prompt_id]["status"]["status_str"] == "error"
    assert list(plugin.output_dir.iterdir()) == []


def test_stopping_a_queued_prompt_deletes_it_and_interrupts_nothing(
        tmp_path: Path, models: Path, comfy: ComfyUITestServer) -> None:
    comfy.hold()
    plugin = make_plugin(tmp_path, models, [comfy.url])
    job = JobThread(plugin, SMALL_JOB).start()
    wait_for(lambda: posted(comfy), DEADLINE_S, what="the prompt to be queued")
    job.stop()
    result = job.join()
    comfy.release()
    assert not result.success and result.error == "stopped on request"
    assert comfy.deleted == posted(comfy)
    assert comfy.interrupts == []
    assert comfy.history(posted(comfy)[0]) == {}  # never ran


def test_another_clients_running_prompt_is_not_interrupted(
        tmp_path: Path, models: Path, comfy: ComfyUITestServer) -> None:
    comfy.behaviour = "stall"
    first = JobThread(make_plugin(tmp_path, models, [comfy.url], "first"), SMALL_JOB).start()
    wait_for(lambda: any(m and m.startswith("step ") for _, m in first.progress), DEADLINE_S,
             what="the first job's sampler")
    second = JobThread(make_plugin(tmp_path, models, [comfy.url], "second"),
                       {**SMALL_JOB, "seed": 3}).start()
    wait_for(lambda: len(posted(comfy)) == 2, DEADLINE_S, what="the second prompt")
    second.stop()
    assert second.join().error == "stopped on request"
    assert comfy.interrupts == []  # the first job's prompt runs on
    assert comfy.deleted == [posted(comfy)[1]]
    first.stop()
    assert first.join().error == "stopped on request"


# --- errors a user can act on ----------------------------------------------------------------

def test_a_missing_model_fails_before_anything_is_sent(tmp_path: Path, models: Path,
                                                       comfy: ComfyUITestServer) -> None:
    plugin = make_plugin(tmp_path, models, [comfy.url])
    result = run_job(plugin, {**SMALL_JOB, "model_name": "sd_xl_refiner_1.0.safetensors"}).join()
    assert not result.success and not result.retryable
    assert "checkpoint 'sd_xl_refiner_1.0.safetensors' is not in" in result.error
    assert f"(checkpoints there: {SDXL})" in result.error
    assert comfy.requests == []


def test_an_unreachable_server_is_a_retryable_error_naming_it(tmp_path: Path,
                                                              models: Path) -> None:
    url = unused_url()
    result = run_job(make_plugin(tmp_path, models, [url]), SMALL_JOB).join()
    assert not result.success and result.retryable
    assert url in result.error and "does not answer" in result.error
    assert "Traceback" not in result.error


def test_a_rejected_prompt_reports_comfyuis_own_reasons(tmp_path: Path, models: Path) -> None:
    # The model is here, but the server was started without it.
    with ComfyUITestServer(checkpoints=("other.safetensors",)) as server:
        result = run_job(make_plugin(tmp_path, models, [server.url]), SMALL_JOB).join()
    assert not result.success and not result.retryable
    assert result.error == (
        f"ComfyUI at {server.url} refused the prompt: CheckpointLoaderSimple (node 4): "
        f"Value not in list: ckpt_name: '{SDXL}' not in ['other.safetensors']")


def test_an_execution_error_reports_the_node_and_comfyuis_message(
        tmp_path: Path, models: Path, comfy: ComfyUITestServer) -> None:
    comfy.behaviour = "fail"
    result = run_job(make_plugin(tmp_path, models, [comfy.url]), SMALL_JOB).join()
    assert not result.success
    assert result.error == (
        f"ComfyUI at {comfy.url} failed in node 4 (CheckpointLoaderSimple): "
        "SafetensorError: Error while deserializing header: header too large")


def test_a_server_that_dies_mid_run_fails_the_job_clearly(tmp_path: Path, models: Path,
                                                          comfy: ComfyUITestServer) -> None:
    comfy.behaviour = "die"
    result = run_job(make_plugin(tmp_path, models, [comfy.url]), SMALL_JOB).join()
    assert not result.success and result.retryable
    assert f"ComfyUI at {comfy.url} stopped answering while prompt" in result.error
    assert "Traceback" not in result.error


def test_a_server_restarted_mid_run_lost_the_prompt_never_done(
        tmp_path: Path, models: Path, comfy: ComfyUITestServer) -> None:
    comfy.behaviour = "die"
    plugin = make_plugin(tmp_path, models, [comfy.url], unreachable_grace_s=DEADLINE_S)
    job = JobThread(plugin, SMALL_JOB).start()
    wait_for(lambda: not comfy.running, DEADLINE_S, what="the server to die")
    comfy.behaviour = "ok"
    comfy.start()  # on the same port, empty: as a restarted ComfyUI
    result = job.join()
    assert not result.success and result.retryable
    assert "no longer knows prompt" in result.error
    assert list(plugin.output_dir.iterdir()) == []


# --- several servers ------------------------------------------------------------------------

def test_jobs_go_to_the_shortest_queue_and_a_busy_server_blocks_no_other(
        tmp_path: Path, models: Path) -> None:
    with ComfyUITestServer() as busy, ComfyUITestServer() as free:
        busy.hold()
        urls = [busy.url, free.url]
        # Both queues are empty: the first job goes to the first server listed, and waits there.
        first = JobThread(make_plugin(tmp_path, models, urls, "first"), SMALL_JOB).start()
        wait_for(lambda: posted(busy), DEADLINE_S, what="the first prompt")
        # That server's queue now holds one prompt: the second job goes to the other one, and
        # finishes while the first job waits.
        second = run_job(make_plugin(tmp_path, models, urls, "second"), SMALL_JOB).join()
        assert second.success, second.error
        assert second.data["server"] == free.url
        assert first.result is None and posted(free) == [second.data["prompt_id"]]
        busy.release()
        result = first.join()
        assert result.success, result.error
        assert result.data["server"] == busy.url


def test_a_server_that_is_down_is_skipped(tmp_path: Path, models: Path,
                                          comfy: ComfyUITestServer) -> None:
    down = unused_url()
    result = run_job(make_plugin(tmp_path, models, [down, comfy.url]), SMALL_JOB).join()
    assert result.success, result.error
    assert result.data["server"] == comfy.url


def test_with_every_server_down_the_error_names_each(tmp_path: Path, models: Path) -> None:
    urls = [unused_url(), unused_url()]
    result = run_job(make_plugin(tmp_path, models, urls), SMALL_JOB).join()
    assert not result.success and result.retryable
    assert result.error.startswith("no ComfyUI server answers: ")
    assert all(url in result.error for url in urls)


# --- through the daemon ---------------------------------------------------------------------

@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_the_seed_job_dropped_in_the_inbox_succeeds_with_live_progress(
        kinod_root: Path, start_daemon: Callable[..., DaemonProcess], isolation: str) -> None:
    (kinod_root / "models_storage" / "StableDiffusion").mkdir()
    (kinod_root / "models_storage" / "StableDiffusion" / SDXL).write_bytes(b"weights")
    with ComfyUITestServer(step_delay_s=0.02) as server:
        daemon = start_daemon(plugins={"sdxl": {"comfyui_urls": [server.url], **QUICK,
                                                "isolation": isolation}})
        daemon.drop("shot010.json", {"type": "sdxl", "data": SEED_JOB})
        seen: list[tuple[str, float, str | None]] = []

        def ended() -> bool:
            sidecar = daemon.sidecar("shot010")
            if sidecar is not None:
                seen.append((sidecar["state"], sidecar["progress"], sidecar["message"]))
            return bool(sidecar) and sidecar["state"] in TERMINAL

        wait_for(ended, DEADLINE_S, interval_s=0.01, what="the sdxl job to end")
        sidecar = daemon.sidecar("shot010")
        assert sidecar["state"] == "succeeded", sidecar
        result = sidecar["result"]
        assert result["server"] == server.url and result["prompt_id"] in server.prompts
        [name] = result["images"]
        image = (daemon.frames / "shot010" / name).read_bytes()
        assert "prompt" in png_text(image)
        assert any(state == "running" and 0 < progress < 100 and (message or "").startswith("step")
                   for state, progress, message in seen)


def test_a_stop_file_interrupts_a_running_sdxl_job(
        kinod_root: Path, start_daemon: Callable[..., DaemonProcess]) -> None:
    (kinod_root / "models_storage" / "StableDiffusion").mkdir()
    (kinod_root / "models_storage" / "StableDiffusion" / SDXL).write_bytes(b"weights")
    with ComfyUITestServer() as server:
        server.behaviour = "stall"
        daemon = start_daemon(plugins={"sdxl": {"comfyui_urls": [server.url], **QUICK}})
        daemon.drop("shot020.json", {"type": "sdxl", "data": SMALL_JOB})
        wait_for(lambda: (daemon.sidecar("shot020") or {}).get("progress", 0) > 0, DEADLINE_S,
                 what="the job's first step")
        (daemon.inbox / "shot020.stop").touch()
        sidecar = wait_end(daemon, "shot020")
        assert sidecar["state"] == "stopped", sidecar
        [prompt_id] = server.prompts
        assert server.interrupts == [{"prompt_id": prompt_id}]
