"""PluginRun, the way the daemon drives it: a plugin on a thread of its own, supervised
from the daemon's loop (timeouts, stops), with its end settled on that thread."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from kinod.config import load_settings
from kinod.outcome import Outcome, StopReason
from kinod.plugins.base_plugin import BasePlugin, PluginResult
from kinod.plugins.comfyui.loader import ComfySettings, ComfyuiPlugin
from kinod.runner import PluginRun, new_plugin, plugin_settings
from tests.helpers import Clock, wait_for


class Quick(BasePlugin):
    async def generate(self, job_id: str, data: dict[str, Any], progress: Any) -> PluginResult:
        return PluginResult(success=True, data={"job": job_id})


def test_a_plugin_that_returned_is_not_timed_out_while_its_end_is_settled(
        tmp_path: Path) -> None:
    """Flushing a finished job's output to disk can take longer than the job's timeout:
    that time is kinod's, not the plugin's, and no stop or cancel may follow."""
    clock = Clock()
    settling, release = threading.Event(), threading.Event()
    settled: list[Outcome] = []

    def on_ended(outcome: Outcome) -> None:  # on the plugin's thread
        settling.set()
        assert release.wait(15), "never released"
        settled.append(outcome)

    async def scenario() -> Outcome:
        run = PluginRun(Quick, "quick", {}, lambda *_: None, clock=clock, on_ended=on_ended)
        task = asyncio.create_task(run.run(timeout_s=1.0, stall_timeout_s=1.0, grace_s=1.0))
        try:
            await asyncio.to_thread(wait_for, settling.is_set, 15, what="the end being settled")
            clock.now += 100  # far past the timeout, the stall limit, the grace, the cancel
            for _ in range(3):  # let the supervision look again, as its timers would
                run._wake.set()
                await asyncio.sleep(0)
            assert run._outcome.stop_reason is None
            assert not task.done()
        finally:
            release.set()
        return await asyncio.wait_for(task, 15)

    outcome = asyncio.run(scenario())
    assert outcome.stop_reason is None and not outcome.forced
    assert isinstance(outcome.result, PluginResult) and outcome.result.data == {"job": "quick"}
    assert settled == [outcome]


def test_the_top_level_workflows_folder_reaches_the_comfyui_plugin_unless_it_sets_its_own(
        tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("workflows: graphs\nmodels: elsewhere/models\n"
                      "plugins:\n  sdxl:\n    comfyui_urls: [http://gpu1:8188]\n")
    settings = load_settings(config, environ={})
    comfy = plugin_settings(settings, "comfyui")
    assert comfy == {"workflows": str(tmp_path / "graphs")}
    # sdxl and the rest get their own keys only: their settings models may forbid others.
    assert plugin_settings(settings, "sdxl") == {"comfyui_urls": ["http://gpu1:8188"]}
    assert plugin_settings(settings, "noop") == {}
    # The plugin reads its workflows there, not beside the models folder.
    plugin = new_plugin(ComfyuiPlugin, tmp_path / "frames" / "j", comfy, settings.models)
    assert plugin._workflows_folder(ComfySettings.from_plugin(plugin.settings)) == (
        tmp_path / "graphs")
    config.write_text("workflows: graphs\nplugins:\n  comfyui:\n    workflows: /srv/flows\n")
    assert plugin_settings(load_settings(config, environ={}), "comfyui") == {
        "workflows": "/srv/flows"}


class Waits(BasePlugin):
    """Says it waits (as a prompt in a server's queue does), then that its work began, each
    when the test says so; ends once asked to stop."""

    go = threading.Event()
    waiting_said = threading.Event()
    working_said = threading.Event()

    async def generate(self, job_id: str, data: dict[str, Any], progress: Any) -> PluginResult:
        self.update_progress(0, progress, "waiting on a server, position 1", waiting=True)
        self.waiting_said.set()
        await asyncio.to_thread(self.go.wait, 15)
        self.update_progress(0, progress, "running", waiting=False)
        self.working_said.set()
        while not self.should_stop:
            await asyncio.sleep(0.01)
        return PluginResult(success=False, error="stopped")


def test_the_timeout_and_stall_limit_count_only_once_the_plugin_stops_waiting() -> None:
    clock = Clock()
    reports: list[tuple[float, str | None]] = []

    async def look_again(run: PluginRun) -> None:  # as the supervision's timers would
        for _ in range(3):
            run._wake.set()
            await asyncio.sleep(0)

    async def scenario() -> Outcome:
        run = PluginRun(Waits, "waits", {}, lambda *r: reports.append(r), clock=clock)
        task = asyncio.create_task(run.run(timeout_s=10.0, stall_timeout_s=5.0, grace_s=1.0))
        try:
            await asyncio.to_thread(wait_for, Waits.waiting_said.is_set, 15, what="waiting")
            clock.now += 100  # far past both limits, all of it waiting
            await look_again(run)
            assert run._outcome.stop_reason is None
            Waits.go.set()
            await asyncio.to_thread(wait_for, Waits.working_said.is_set, 15, what="working")
            clock.now += 4.5  # under the stall limit since the work began
            await look_again(run)
            assert run._outcome.stop_reason is None
            clock.now += 1  # past it
            await look_again(run)
            assert run._outcome.stop_reason is StopReason.STALL
        finally:
            Waits.go.set()
        return await asyncio.wait_for(task, 15)

    outcome = asyncio.run(scenario())
    assert outcome.stop_reason is StopReason.STALL and outcome.limit_s == 5.0
    assert reports == [(0.0, "waiting on a server, position 1"), (0.0, "running")]


def test_a_callback_without_accepts_waiting_gets_the_seeds_two_arguments() -> None:
    calls: list[tuple[Any, ...]] = []
    plugin = Quick()
    plugin.update_progress(5, lambda *args: calls.append(args), "queued", waiting=True)
    plugin.update_progress(6, lambda *args: calls.append(args), waiting=False)
    assert calls == [(5.0, "queued"), (6.0,)]
