"""Prompts waiting on a server: held clocks, ``queue_ahead``, and a server that dies, against
the test peer (real HTTP and websockets on 127.0.0.1) and, where it matters, the real daemon."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kinod.outcome import Outcome, StopReason
from kinod.plugins.base_plugin import PluginResult
from kinod.runner import PluginRun
from tests.comfyui_peer import MODERN, ComfyUITestServer
from tests.helpers import Clock, DaemonProcess, wait_end, wait_for
from tests.test_sdxl_plugin import DEADLINE_S, QUICK, SDXL, SMALL_JOB, JobThread, make_plugin

WAITING_FOR_A_SERVER = "waiting for a server"


@pytest.fixture
def models(tmp_path: Path) -> Path:
    folder = tmp_path / "models_storage" / "StableDiffusion"
    folder.mkdir(parents=True)
    (folder / SDXL).write_bytes(b"not really weights")
    return folder.parent


def messages(job: JobThread) -> list[str]:
    return [message or "" for _, message in list(job.progress)]


def said(job: JobThread, start: str) -> bool:
    return any(message.startswith(start) for message in messages(job))


async def look_again(run: PluginRun) -> None:
    """Let the supervision look at its clocks, as its timers would."""
    for _ in range(3):
        run._wake.set()
        await asyncio.sleep(0)


def test_a_prompt_waiting_in_a_servers_queue_is_timed_only_once_it_runs(
        tmp_path: Path, models: Path) -> None:
    clock = Clock()
    reports: list[tuple[float, str | None]] = []
    with ComfyUITestServer(version=MODERN, checkpoints=(SDXL,)) as server:
        server.hold()
        server.behaviour = "stall"  # once it runs: one step, then nothing

        def plugin() -> Any:
            return make_plugin(tmp_path, models, [server.url])

        async def scenario() -> Outcome:
            run = PluginRun(plugin, "shot010", dict(SMALL_JOB),
                            lambda *report: reports.append(report), clock=clock)
            task = asyncio.create_task(run.run(timeout_s=50.0, stall_timeout_s=5.0,
                                               grace_s=5.0))
            waiting = f"waiting on {server.url}, position 1"
            await asyncio.to_thread(wait_for, lambda: (0.0, waiting) in reports, DEADLINE_S,
                                    what="the prompt to wait in the server's queue")
            clock.now += 1000  # far past both limits, all of it in the server's queue
            await look_again(run)
            assert run._outcome.stop_reason is None
            server.release()
            await asyncio.to_thread(wait_for, lambda: any(
                (m or "").startswith("step 1/") for _, m in reports), DEADLINE_S,
                what="the first step")
            clock.now += 4  # under the stall limit, counted from the start of the run
            await look_again(run)
            assert run._outcome.stop_reason is None
            clock.now += 2
            await look_again(run)
            assert run._outcome.stop_reason is StopReason.STALL
            return await asyncio.wait_for(task, DEADLINE_S)

        outcome = asyncio.run(scenario())
        assert outcome.stop_reason is StopReason.STALL
        assert isinstance(outcome.result, PluginResult) and not outcome.result.success
        [prompt_id] = server.prompts
        assert server.interrupts == [{"prompt_id": prompt_id}]  # stopped: taken off the server


@pytest.mark.parametrize("queue_ahead", [1, 2])
def test_queue_ahead_caps_the_prompts_waiting_on_each_server_and_the_rest_wait_in_kinod(
        tmp_path: Path, models: Path, queue_ahead: int) -> None:
    with (ComfyUITestServer(version=MODERN, checkpoints=(SDXL,)) as a,
          ComfyUITestServer(version=MODERN, checkpoints=(SDXL,)) as b):
        a.hold()
        b.hold()
        jobs = [JobThread(make_plugin(tmp_path, models, [a.url, b.url], f"job{i}",
                                      queue_ahead=queue_ahead), SMALL_JOB, f"job{i}").start()
                for i in range(2 * queue_ahead + 3)]
        wait_for(lambda: len(a.prompts) == len(b.prompts) == queue_ahead, DEADLINE_S,
                 what=f"{queue_ahead} prompt(s) waiting on each server")
        wait_for(lambda: sum(said(job, WAITING_FOR_A_SERVER) for job in jobs) == 3, DEADLINE_S,
                 what="three jobs waiting in kinod")
        # A server counts a prompt when it is posted; its job says so a moment later. The
        # jobs are told apart below by what they said.
        wait_for(lambda: sum(said(job, "queued on") for job in jobs) == 2 * queue_ahead,
                 DEADLINE_S, what="every job with a prompt on a server to say where")
        assert len(a.prompts) == len(b.prompts) == queue_ahead  # no more came meanwhile
        a.release()  # a runs its prompts: the jobs in line go there, b stays as it was
        on_b = [job for job in jobs if said(job, f"queued on {b.url}")]
        rest = [job for job in jobs if job not in on_b]
        results = [job.join() for job in rest]
        assert all(r.success and r.data["server"] == a.url for r in results)
        assert len(b.prompts) == queue_ahead and all(job.result is None for job in on_b)
        b.release()
        assert all(job.join().data["server"] == b.url for job in on_b)
        for job in jobs:  # waiting, in kinod or in a queue, ended when the prompt ran
            waits = [m for m in messages(job) if m.startswith(("waiting", "queued"))]
            assert waits and messages(job).index(waits[-1]) < messages(job).index(
                f"running on {job.result.data['server']}")


def test_a_job_waiting_for_a_server_can_be_stopped(tmp_path: Path, models: Path) -> None:
    with ComfyUITestServer(version=MODERN, checkpoints=(SDXL,)) as server:
        server.hold()
        first = JobThread(make_plugin(tmp_path, models, [server.url], "first"), SMALL_JOB,
                          "first").start()
        wait_for(lambda: server.prompts, DEADLINE_S, what="the first prompt")
        second = JobThread(make_plugin(tmp_path, models, [server.url], "second"), SMALL_JOB,
                           "second").start()
        wait_for(lambda: said(second, WAITING_FOR_A_SERVER), DEADLINE_S, what="the second "
                 "job to wait in kinod")
        second.stop()
        result = second.join()
        assert not result.success and result.error == "stopped on request"
        assert len(server.prompts) == 1  # it never reached the server
        third = JobThread(make_plugin(tmp_path, models, [server.url], "third"), SMALL_JOB,
                          "third").start()  # the stopped job's place in line is not kept
        server.release()
        assert first.join().success and third.join().success
        assert len(server.prompts) == 2


def _jobs_posted_to(server: ComfyUITestServer) -> set[str]:
    """The ids of the jobs whose prompts reached ``server`` (its SaveImage prefix names them)."""
    return {node["inputs"]["filename_prefix"].removeprefix("kinod_")
            for prompt in server.prompts.values() for node in prompt.values()
            if node["class_type"] == "SaveImage"}


def test_a_server_that_dies_takes_down_only_its_own_prompts_which_run_again_elsewhere(
        kinod_root: Path, start_daemon: Callable[..., DaemonProcess]) -> None:
    (kinod_root / "models_storage" / "StableDiffusion").mkdir()
    (kinod_root / "models_storage" / "StableDiffusion" / SDXL).write_bytes(b"weights")
    with (ComfyUITestServer(version=MODERN, checkpoints=(SDXL,)) as dying,
          ComfyUITestServer(version=MODERN, checkpoints=(SDXL,)) as good):
        dying.hold()
        good.hold()
        daemon = start_daemon(workers=6, plugins={"sdxl": {
            "comfyui_urls": [dying.url, good.url], **QUICK}})
        ids = [f"shot{i}" for i in range(6)]
        for job_id in ids:
            daemon.drop(f"{job_id}.json", {"type": "sdxl", "retries": 1, "data": SMALL_JOB})
        wait_for(lambda: len(dying.prompts) == len(good.prompts) == 1, DEADLINE_S,
                 what="a prompt waiting on each server")
        wait_for(lambda: sum(((daemon.sidecar(i) or {}).get("message") or "").startswith(
            WAITING_FOR_A_SERVER) for i in ids) == 4, DEADLINE_S, what="four jobs waiting in kinod")
        dying.behaviour = "die"  # its running prompt's first step kills it
        dying.release()
        wait_for(lambda: not dying.running, DEADLINE_S, what="the server to die")
        good.release()
        ends = {job_id: wait_end(daemon, job_id) for job_id in ids}
        assert {e["state"] for e in ends.values()} == {"succeeded"}, ends
        assert {e["result"]["server"] for e in ends.values()} == {good.url}
        # Its running prompt, and the one handed its place as that started (posted before the
        # crash, or refused by it): those jobs ran again, on the other server; no other did.
        taken_down = _jobs_posted_to(dying)
        again = {job_id for job_id, end in ends.items() if end["attempt"] == 2}
        assert taken_down <= again and 1 <= len(again) <= 2, (taken_down, ends)
        assert {end["attempt"] for job_id, end in ends.items() if job_id not in again} == {1}
        assert len(_jobs_posted_to(good)) == len(ids)
