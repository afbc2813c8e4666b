"""End to end: the real daemon (``kinod run``) beside the HTTP API, driven with httpx.

Each API is started as ``kinod run`` starts it in-process (``ApiServer``) or as ``kinod
serve`` runs it (``serve`` in a process of its own), on a free loopback port."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kinod import control
from kinod.api.server import ApiServer
from kinod.config import load_settings
from tests.helpers import WORKING_PLUGINS, DaemonProcess, scripted, wait_for, write_config
from tests.test_api import read_events

TASKS = "/api/v1/generator/tasks"
LISTENING = re.compile(r"HTTP API listening on (http://\S+)")


@pytest.fixture
def open_api() -> Iterator[Callable[[Path], httpx.Client]]:
    """The API of a node's settings file, in this process; a client of it."""
    servers: list[ApiServer] = []
    clients: list[httpx.Client] = []

    def start(config: Path) -> httpx.Client:
        settings = load_settings(config, overrides={"http": {"listen": "127.0.0.1:0"}})
        servers.append(ApiServer(settings).start())
        clients.append(httpx.Client(base_url=servers[-1].url, timeout=10))
        return clients[-1]

    yield start
    for client in clients:
        client.close()
    for server in servers:
        server.stop()


@pytest.fixture
def farm(start_daemon: Callable[..., DaemonProcess],
         open_api: Callable[[Path], httpx.Client]) -> tuple[DaemonProcess, httpx.Client]:
    daemon = start_daemon()
    return daemon, open_api(daemon.config)


def wait_task(api: httpx.Client, job_id: str, *states: str, timeout_s: float = 30
              ) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        response = api.get(f"{TASKS}/{job_id}")
        return response.json() if response.status_code == 200 and response.json()[
            "state"] in states else None

    return wait_for(reached, timeout_s, interval_s=0.05, what=f"task {job_id} to be {states}")


def test_the_seed_readme_curl_sequence(farm: tuple[DaemonProcess, httpx.Client]) -> None:
    _, api = farm
    # curl http://localhost:8000/api/v1/generator/plugins
    plugins = api.get("/api/v1/generator/plugins")
    assert plugins.status_code == 200
    assert {"example", "scripted"} <= {info["name"] for info in plugins.json()}
    # curl -X POST .../tasks -H "Content-Type: application/json" -d '{"name": "Test", ...}'
    body = ('{\n    "name": "Test",\n    "type": "scripted",\n    "data": {\n'
            '      "steps": 2\n    }\n  }')
    created = api.post(TASKS, content=body, headers={"Content-Type": "application/json"})
    assert created.status_code == 201, created.text
    assert (created.json()["id"], created.json()["state"]) == ("1", "held")
    # curl -X POST http://localhost:8000/api/v1/generator/tasks/1/generate (no body)
    assert api.post(f"{TASKS}/1/generate").status_code == 202
    done = wait_task(api, "1", "succeeded", "failed", "stopped")
    assert done["state"] == "succeeded" and done["name"] == "Test"


def test_a_task_released_before_any_node_took_it_in_runs(
        farm: tuple[DaemonProcess, httpx.Client]) -> None:
    daemon, api = farm
    daemon.signal(signal.SIGSTOP)  # the seed's create-then-generate, faster than any intake
    try:
        job_id = api.post(TASKS, json=scripted(steps=1)).json()["id"]
        assert api.post(f"{TASKS}/{job_id}/generate").json()["state"] is None
    finally:
        daemon.signal(signal.SIGCONT)
    assert wait_task(api, job_id, "succeeded", "failed", "stopped")["state"] == "succeeded"


def test_a_started_task_runs_to_succeeded(farm: tuple[DaemonProcess, httpx.Client]) -> None:
    daemon, api = farm
    created = api.post(TASKS, json={"name": "go", "start": True, **scripted(steps=2)}).json()
    done = wait_task(api, created["id"], "succeeded", "failed", "stopped")
    assert done["state"] == "succeeded" and done["node"] == "testnode"
    assert done["task"]["data"] == {"steps": 2}
    outputs = api.get(f"{TASKS}/{created['id']}/outputs").json()
    assert "runs.log" in [output["path"] for output in outputs]
    runs = api.get(f"{TASKS}/{created['id']}/outputs/runs.log").text
    assert runs.startswith(f"start {created['id']} ")
    assert api.get(f"{TASKS}/{created['id']}/log").status_code == 200
    listed = api.get(TASKS, params={"state": "succeeded"}).json()["tasks"]
    assert [task["id"] for task in listed] == [created["id"]]


def test_events_show_held_queued_running_succeeded(
        farm: tuple[DaemonProcess, httpx.Client]) -> None:
    daemon, api = farm
    control.pause(daemon.inbox)  # so the released task is seen queued before it runs
    with api.stream("GET", "/api/v1/events", timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines) == "retry: 2000"
        job_id = api.post(TASKS, json=scripted(steps=4, step_s=0.2)).json()["id"]
        states = [read_events(lines, 1)[0]["state"]]
        assert states == ["held"]
        api.post(f"{TASKS}/{job_id}/generate")
        while states[-1] != "queued":
            states.append(read_events(lines, 1)[0]["state"])
        control.resume(daemon.inbox)
        while states[-1] not in ("succeeded", "failed", "stopped"):
            states.append(read_events(lines, 1)[0]["state"])
    ordered = list(dict.fromkeys(states))
    assert ordered == ["held", "queued", "running", "succeeded"], states


def test_metrics_after_real_jobs(farm: tuple[DaemonProcess, httpx.Client]) -> None:
    daemon, api = farm
    job_id = api.post(TASKS, json={"start": True, **scripted(steps=1)}).json()["id"]
    wait_task(api, job_id, "succeeded")

    def samples() -> dict[tuple[str, tuple], float]:
        text = api.get("/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    values = wait_for(lambda: (v := samples()).get(
        ("kinod_jobs", (("state", "succeeded"), ("type", "scripted")))) == 1 and v,
        what="the metrics to count the job")
    labels = (("state", "succeeded"), ("type", "scripted"))
    assert values[("kinod_job_duration_seconds_count", labels)] == 1
    assert values[("kinod_queue_depth", ())] == 0
    assert 0 <= values[("kinod_node_heartbeat_age_seconds", (("node", "testnode"),))] < 60


def test_stop_and_hold_through_the_api(farm: tuple[DaemonProcess, httpx.Client]) -> None:
    daemon, api = farm
    gate = str(daemon.root / "never")
    running = api.post(TASKS, json={"start": True, **scripted(steps=0, gate=gate)}).json()["id"]
    wait_task(api, running, "running")
    assert api.post(f"{TASKS}/{running}/hold").status_code == 409  # a running job goes on
    assert api.post(f"{TASKS}/{running}/stop").status_code == 202
    assert wait_task(api, running, "stopped", "failed", "succeeded")["state"] == "stopped"

    control.pause(daemon.inbox)
    queued = api.post(TASKS, json={"start": True, **scripted(steps=1)}).json()["id"]
    wait_task(api, queued, "queued")
    assert api.post(f"{TASKS}/{queued}/hold").status_code == 202
    wait_task(api, queued, "held")
    control.resume(daemon.inbox)
    assert api.post(f"{TASKS}/{queued}/stop").status_code == 202  # a held job can be stopped
    assert wait_task(api, queued, "stopped", "failed", "succeeded")["state"] == "stopped"
    assert api.post(f"{TASKS}/{queued}/generate").status_code == 409


@pytest.fixture
def serve_process(kinod_root: Path) -> Iterator[Callable[[Path], str]]:
    """``serve`` (what ``kinod serve`` runs) in a process of its own; its URL."""
    procs: list[subprocess.Popen] = []

    def start(config: Path) -> str:
        log = config.parent / "serve.log"
        code = ("import sys; from kinod.api.server import serve; "
                "from kinod.config import load_settings; "
                "sys.exit(serve(load_settings(sys.argv[1])))")
        with open(log, "w") as out:
            procs.append(subprocess.Popen([sys.executable, "-c", code, str(config)],
                                          stdout=out, stderr=subprocess.STDOUT, cwd=kinod_root))
        found = wait_for(lambda: LISTENING.search(log.read_text()) or procs[-1].poll() is not None,
                         what="the API to listen")
        assert procs[-1].poll() is None, log.read_text()
        return found.group(1)

    yield start
    for proc in procs:
        proc.terminate()
        assert proc.wait(10) == 0


def test_two_nodes_and_a_serve_share_ids_and_see_every_job(
        kinod_root: Path, nodes: Callable[..., DaemonProcess],
        open_api: Callable[[Path], httpx.Client], serve_process: Callable[[Path], str]) -> None:
    apis = [open_api(nodes(name).config) for name in ("a", "b")]
    web = kinod_root / "web"
    web.mkdir()
    config = write_config(web, node="web", inbox="../inbox", outbox="../outbox",
                          frames="../data/frames", models="../models_storage",
                          plugin_dirs=[str(WORKING_PLUGINS)],
                          http={"listen": "127.0.0.1:0"})
    apis.append(httpx.Client(base_url=serve_process(config), timeout=10))
    try:
        ids = [apis[n % 3].post(TASKS, json={"start": True, **scripted(steps=1)}).json()["id"]
               for n in range(12)]
        assert sorted(map(int, ids)) == list(range(1, 13))
        for api in apis:
            wait_for(lambda api=api: sorted(
                t["id"] for t in api.get(TASKS, params={"state": "succeeded"}).json()["tasks"]
            ) == sorted(ids), what="every job to be listed as succeeded by every API")
        ran_on = {api.get(f"{TASKS}/{job_id}").json()["node"] for api in apis for job_id in ids}
        assert ran_on <= {"a", "b"}
        nodes_seen = {n["node"] for n in apis[2].get("/api/v1/nodes").json()["nodes"]}
        assert {"a", "b"} <= nodes_seen
    finally:
        apis[2].close()
