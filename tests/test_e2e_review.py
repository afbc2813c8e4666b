"""End to end: the daemon stays in charge when plugins are slow or leave threads behind,
and two daemons never share one node's spool."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

from tests.helpers import DaemonProcess, kinod_cli, scripted, wait_end


def test_a_second_daemon_with_the_same_node_name_is_refused(
        start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon()
    second = kinod_cli("run", "--config", str(daemon.config), timeout_s=30)
    assert second.returncode == 2, second.stderr
    assert "already runs as node 'testnode'" in second.stderr
    assert daemon.proc.poll() is None  # the first one goes on
    daemon.drop("after.yaml", scripted(steps=1))
    assert wait_end(daemon, "after")["state"] == "succeeded"
    assert daemon.stop() == 0


def test_a_slow_plugin_constructor_does_not_freeze_the_daemon(
        start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon(workers=2)
    daemon.drop("slow.yaml", {"type": "slow_init", "data": {}})
    daemon.wait_state("slow", "running")
    daemon.drop("quick.yaml", scripted(steps=1))
    assert wait_end(daemon, "quick")["state"] == "succeeded"
    # The slow constructor (3 s) is still going: the quick job did not wait for it.
    assert daemon.sidecar("slow")["state"] == "running"
    assert wait_end(daemon, "slow")["state"] == "succeeded"
    assert daemon.stop() == 0


def test_sigterm_exits_in_time_though_a_plugin_left_an_executor_thread(
        start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon(stop_grace=1)
    daemon.drop("stuck.yaml", {"type": "executor", "data": {"sleep_s": 60}})
    daemon.wait_state("stuck", "running")
    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    # grace 1 s + the runner's 2 s wait after cancelling, well short of the 60 s sleep
    assert daemon.proc.wait(20) == 0
    assert time.monotonic() - started < 15
    assert daemon.sidecar("stuck")["state"] == "queued"
    assert "exiting without waiting for plugin threads" in daemon.log()
