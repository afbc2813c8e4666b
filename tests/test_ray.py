"""The Ray executor end to end: the real daemon (``kinod run`` in a child process) with
``executor: ray``, its ``ray.address`` pointing at a real Ray cluster these tests start.

The cluster is one head node started with ``ray start --head --block`` in a process group
of its own (a separate daemon process can then connect to it by address, as in
production), on 127.0.0.1 with free ports, 2 CPUs, a 100 MB object store, no dashboard,
and a custom resource ``special``. It is shared by the module's tests and its process
group is killed after them. The first test points a daemon at the cluster's port before
the cluster exists, then starts it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    DaemonProcess,
    assert_done,
    executions,
    runs_log,
    scripted,
    spool_files,
    wait_end,
    wait_for,
)

pytestmark = pytest.mark.timeout(180)

RAY = Path(sys.executable).parent / "ray"
PORT_NAMES = ("port", "node-manager-port", "object-manager-port", "dashboard-port",
              "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "metrics-export-port", "ray-client-server-port", "runtime-env-agent-port")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def loopback_only() -> Iterator[None]:
    """Ray's single-machine mode, for the cluster and the daemons (which inherit the
    environment): every Ray process listens on 127.0.0.1 and calls its node that, instead of
    the machine's address on the network."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        patch.setenv("RAY_USAGE_STATS_ENABLED", "0")
        yield


@pytest.fixture(scope="module")
def cluster_ports() -> dict[str, int]:
    return {name: free_port() for name in PORT_NAMES}


@pytest.fixture(scope="module")
def cluster(cluster_ports: dict[str, int]) -> Iterator[str]:
    """A one-node Ray cluster; its address (host:port)."""
    # A short folder: Ray's socket paths under it must stay within 107 characters.
    temp_dir = tempfile.mkdtemp(prefix="kray")
    args = [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
            "--num-cpus=2", "--num-gpus=0", "--object-store-memory=100000000",
            "--include-dashboard=false", "--include-log-monitor=false",
            "--disable-usage-stats", f"--temp-dir={temp_dir}", '--resources={"special": 1}',
            "--min-worker-port=0", "--max-worker-port=0",
            *(f"--{name}={port}" for name, port in cluster_ports.items())]
    out = Path(temp_dir, "ray-start.log")
    with open(out, "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_for(lambda: "Ray runtime started" in out.read_text() or proc.poll() is not None,
                 60, interval_s=0.2, what="the Ray cluster to start")
        assert proc.poll() is None, out.read_text()
        yield f"127.0.0.1:{cluster_ports['port']}"
    finally:
        _kill_group(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the cluster's process group, then SIGKILL to what is left after 5 s
    (some of it ignores SIGTERM)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        proc.poll()
        time.sleep(0.1)
    else:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(10)


def ray_daemon(start_daemon: Callable[..., DaemonProcess], address: str,
               **settings: Any) -> DaemonProcess:
    settings.setdefault("workers", 8)
    settings.setdefault("ray", {"address": address})
    return start_daemon(executor="ray", **settings)


def worker_pid(daemon: DaemonProcess, job_id: str) -> int:
    """The pid of the Ray worker running the scripted plugin for this job, once it runs."""
    line = wait_for(lambda: next((line for line in runs_log(daemon.frames, job_id)
                                  if line.startswith("start ")), None),
                    60, what=f"job {job_id} to start on a Ray worker")
    return int(line.split()[3])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --- the cluster out of reach ------------------------------------------------------------


def test_jobs_wait_while_the_cluster_is_unreachable_and_run_once_it_answers(
        start_daemon: Callable[..., DaemonProcess], cluster_ports: dict[str, int],
        request: pytest.FixtureRequest) -> None:
    address = f"127.0.0.1:{cluster_ports['port']}"
    daemon = ray_daemon(start_daemon, address)
    daemon.drop("early.yaml", scripted(steps=2, step_s=0.05))
    daemon.drop("dropped.yaml", scripted(steps=2, step_s=0.05))
    for job_id in ("early", "dropped"):
        wait_for(lambda job_id=job_id: "waiting for the Ray cluster" in (
            (daemon.sidecar(job_id) or {}).get("message") or ""), 30,
            what=f"{job_id} to say it waits for the cluster")
    wait_for(lambda: f"the Ray cluster at {address} cannot be used: cannot connect" in
             daemon.log(), 30, what="the log to say why")
    assert daemon.proc.poll() is None
    (daemon.inbox / "dropped.stop").touch()  # a waiting job can be stopped
    assert wait_end(daemon, "dropped")["state"] == "stopped"
    assert executions(daemon, "dropped") == 0

    request.getfixturevalue("cluster")  # the cluster comes up at that address
    sidecar = wait_end(daemon, "early", timeout_s=90)
    assert sidecar["state"] == "succeeded", sidecar
    assert (sidecar["attempt"], executions(daemon, "early")) == (1, 1)
    assert "connected to the Ray cluster" in daemon.log()


# --- on a live cluster ----------------------------------------------------------------


def test_the_seed_job_runs_on_the_cluster_with_progress(
        start_daemon: Callable[..., DaemonProcess], cluster: str) -> None:
    daemon = ray_daemon(start_daemon, cluster)
    daemon.drop("seed.yaml", {"type": "example",
                              "data": {"prompt": "beautiful landscape", "steps": 20}})
    seen: list[tuple[str, float, str | None]] = []

    def ended() -> bool:
        sidecar = daemon.sidecar("seed")
        if sidecar is not None:
            seen.append((sidecar["state"], sidecar["progress"], sidecar["message"]))
        return sidecar is not None and sidecar["state"] in ("succeeded", "failed", "stopped")

    wait_for(ended, 60, interval_s=0.01, what="the seed job to end")
    sidecar = daemon.sidecar("seed")
    assert sidecar["state"] == "succeeded", sidecar
    assert sidecar["result"]["prompt"] == "beautiful landscape"
    assert (sidecar["progress"], sidecar["attempt"], sidecar["node"]) == (100, 1, "testnode")
    running = [percent for state, percent, _ in seen if state == "running"]
    assert running == sorted(running)
    assert len({p for p in running if 0 < p < 100}) >= 2, seen  # progress while it ran
    assert any(message and message.startswith("running on Ray node 127.0.0.1")
               for _, _, message in seen), sorted({str(m) for _, _, m in seen})
    assert_done(daemon, "seed", ["1.yaml"])  # moved there just after the final sidecar


def test_a_stop_mid_run_reaches_the_plugin_then_ray_cancel_with_force(
        start_daemon: Callable[..., DaemonProcess], cluster: str) -> None:
    daemon = ray_daemon(start_daemon, cluster, stop_grace=1)
    daemon.drop("polite.yaml", scripted(steps=600, step_s=0.05))
    daemon.drop("deaf.yaml", scripted(steps=600, step_s=0.05, obey_stop=False,
                                      blocking=True))
    deaf_pid = worker_pid(daemon, "deaf")
    worker_pid(daemon, "polite")
    (daemon.inbox / "polite.stop").touch()
    (daemon.inbox / "deaf.stop").touch()

    polite = wait_end(daemon, "polite", timeout_s=30)
    assert polite["state"] == "stopped", polite
    assert "did not stop" not in polite["error"]["message"]
    assert [line.split()[0] for line in runs_log(daemon.frames, "polite")] == ["start", "end"]

    deaf = wait_end(daemon, "deaf", timeout_s=30)
    assert deaf["state"] == "stopped", deaf
    assert "did not stop within the grace period" in deaf["error"]["message"]
    assert "ray.cancel(force=True) kills its worker" in daemon.log()
    wait_for(lambda: not alive(deaf_pid), 10, what="the deaf plugin's worker to be killed")


def test_a_worker_killed_mid_job_fails_the_attempt_as_retryable_and_it_runs_again(
        start_daemon: Callable[..., DaemonProcess], cluster: str, tmp_path: Path) -> None:
    daemon = ray_daemon(start_daemon, cluster)
    gate = tmp_path / "never"
    daemon.drop("victim.yaml", {**scripted(script=["wait", "succeed"], gate=str(gate),
                                           max_wait_s=120), "retries": 1})
    os.kill(worker_pid(daemon, "victim"), signal.SIGKILL)

    sidecar = wait_end(daemon, "victim", timeout_s=60)
    assert sidecar["state"] == "succeeded", sidecar
    assert (sidecar["attempt"], executions(daemon, "victim")) == (2, 2)
    assert "its Ray worker was lost" in (daemon.outbox / "victim.log").read_text()


def test_a_resource_the_cluster_lacks_keeps_a_job_waiting_one_it_has_places_it(
        start_daemon: Callable[..., DaemonProcess], cluster: str) -> None:
    daemon = ray_daemon(start_daemon, cluster, plugins={
        "example": {"ray": {"resources": {"absent": 1}}},
        "scripted": {"ray": {"num_cpus": 0.5, "resources": {"special": 0.5}}}})
    daemon.drop("nowhere.yaml", {"type": "example", "data": {"prompt": "x", "steps": 1}})
    wait_for(lambda: (daemon.sidecar("nowhere") or {}).get("message") ==
             "waiting for a Ray worker", 60, what="the job to be sent to Ray")
    daemon.drop("special.yaml", scripted(steps=1, step_s=0.05))

    assert wait_end(daemon, "special", timeout_s=60)["state"] == "succeeded"
    # Placed where `special` is, by then; the other is still waiting for an `absent` node.
    nowhere = daemon.sidecar("nowhere")
    assert (nowhere["state"], nowhere["progress"], nowhere["message"]) == (
        "running", 0, "waiting for a Ray worker")
    (daemon.inbox / "nowhere.stop").touch()
    assert wait_end(daemon, "nowhere", timeout_s=30)["state"] == "stopped"


def test_five_hundred_jobs_each_run_exactly_once(
        start_daemon: Callable[..., DaemonProcess], cluster: str) -> None:
    daemon = ray_daemon(start_daemon, cluster, workers=16, progress_interval_s=0.5)
    ids = [f"many{n:03d}" for n in range(500)]
    for job_id in ids:
        daemon.drop(f"{job_id}.yaml", scripted(steps=0, tag=job_id))

    def ended() -> bool:
        return len(spool_files(daemon, "done")) == len(ids)

    wait_for(ended, 150, interval_s=0.5, what="500 jobs to end")
    for job_id in ids:
        sidecar = daemon.sidecar(job_id)
        assert sidecar["state"] == "succeeded", sidecar
        assert sidecar["attempt"] == 1
        assert sidecar["result"]["tag"] == job_id
        assert executions(daemon, job_id) == 1


def test_returned_outputs_are_written_into_the_jobs_frames_by_the_daemon(
        start_daemon: Callable[..., DaemonProcess], cluster: str) -> None:
    daemon = ray_daemon(start_daemon, cluster, ray={"address": cluster, "outputs": "returned"})
    daemon.drop("back.yaml", scripted(steps=1, step_s=0.05))

    sidecar = wait_end(daemon, "back", timeout_s=60)
    assert sidecar["state"] == "succeeded", sidecar
    # The plugin wrote into a temporary folder on its worker, gone now; the daemon wrote
    # what came back into data/frames/back/.
    worker_folder = Path(sidecar["result"]["output_dir"])
    assert worker_folder != daemon.frames / "back"
    assert not worker_folder.exists()
    assert [line.split()[0] for line in runs_log(daemon.frames, "back")] == ["start", "end"]
