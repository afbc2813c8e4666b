"""End to end: the HTTP API as the command line starts it. `kinod run` serves it in-process
when http.listen is set, `kinod serve` serves it alone, and a listen that would expose the
farm without a token stops the start with exit status 2."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.helpers import DaemonProcess, kinod_cli, scripted, wait_for, write_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=2)
    except httpx.TransportError:
        return None


def test_kinod_run_serves_the_api_when_listen_is_set(start_daemon: Callable[..., DaemonProcess]
                                                     ) -> None:
    port = free_port()
    daemon = start_daemon(http={"listen": f"127.0.0.1:{port}"})
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: answers(f"{base}/healthz"), what="the API to answer")
    created = httpx.post(f"{base}/api/v1/generator/tasks", json={
        "name": "Test", **scripted(outcome="succeed", steps=0), "start": True})
    assert created.status_code == 201, created.text
    task_id = created.json()["id"]
    wait_for(lambda: daemon.sidecar(task_id) and daemon.sidecar(task_id)["state"] == "succeeded",
             what="the task to run on the daemon serving the API")
    assert daemon.stop() == 0
    assert answers(f"{base}/healthz") is None  # the API stops with the daemon


def test_kinod_serve_runs_the_api_alone(kinod_root: Path) -> None:
    port = free_port()
    config = write_config(kinod_root)
    with open(kinod_root / "serve.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "kinod", "serve", "--config",
                                 str(config), "--listen", f"127.0.0.1:{port}"], cwd=kinod_root,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: answers(f"{base}/healthz"), what="kinod serve to answer")
        created = httpx.post(f"{base}/api/v1/generator/tasks",
                             json={"type": "example", "data": {"prompt": "p"}})
        assert created.status_code == 201, created.text
        job_file = kinod_root / "inbox" / f"{created.json()['id']}.json"
        assert job_file.exists()  # a client of the folder: the job waits for a worker node
    finally:
        proc.terminate()
        assert proc.wait(20) == 0, (kinod_root / "serve.log").read_text()


def test_a_listen_beyond_loopback_without_a_token_is_refused_with_status_2(
        kinod_root: Path) -> None:
    config = write_config(kinod_root, http={"listen": "0.0.0.0:8000"})
    for command in ("run", "serve"):
        result = kinod_cli(command, "--config", str(config), cwd=kinod_root, timeout_s=30)
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert "http.listen" in result.stderr and "token" in result.stderr
