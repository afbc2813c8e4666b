from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from loguru import logger

from tests.helpers import WORKING_PLUGINS, DaemonProcess, write_config


@pytest.fixture(autouse=True)
def no_leaked_threads(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves threads running (observers, plugin threads, schedulers)."""
    before = set(threading.enumerate())
    yield
    if request.node.get_closest_marker("leaks_threads"):
        return
    deadline = time.monotonic() + 5
    while True:
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert not leaked, f"threads left running: {[t.name for t in leaked]}"


@pytest.fixture
def caplog_loguru(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """loguru's records in pytest's caplog."""
    handler_id = logger.add(caplog.handler, format="{message}", level="DEBUG")
    yield caplog
    logger.remove(handler_id)


@pytest.fixture
def kinod_root(tmp_path: Path) -> Path:
    for folder in ("inbox", "outbox", "data/frames", "models_storage"):
        (tmp_path / folder).mkdir(parents=True)
    return tmp_path


@pytest.fixture
def daemon(kinod_root: Path) -> Iterator[DaemonProcess]:
    """The real daemon, in its own process, on a fresh folder; stopped after the test."""
    proc = DaemonProcess(kinod_root, write_config(kinod_root))
    yield proc
    if proc.proc is not None and proc.proc.poll() is None:
        proc.kill()


@pytest.fixture
def start_daemon(kinod_root: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Start ``kinod run`` with these settings, by default with the working test plugins
    and a 2 s stop grace; each start logs to its own file. All are killed after the test."""
    started: list[DaemonProcess] = []

    def start(log_name: str = "daemon.log", **settings: Any) -> DaemonProcess:
        settings.setdefault("plugin_dirs", [str(WORKING_PLUGINS)])
        settings.setdefault("stop_grace", 2)
        proc = DaemonProcess(kinod_root, write_config(kinod_root, **settings))
        proc.log_path = kinod_root / log_name  # a fresh log: "kinod ready" is looked for in it
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.kill()


@pytest.fixture
def nodes(kinod_root: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Start a daemon as node ``name`` on the shared folder, with its own settings file (several
    nodes on one inbox); each is killed after the test, resumed first if it was stopped."""
    started: list[DaemonProcess] = []

    def start(name: str, env: dict[str, str] | None = None, **settings: Any) -> DaemonProcess:
        settings.setdefault("plugin_dirs", [str(WORKING_PLUGINS)])
        settings.setdefault("stop_grace", 2)
        folder = kinod_root / f"node-{name}"
        folder.mkdir(exist_ok=True)
        config = write_config(folder, node=name, inbox="../inbox", outbox="../outbox",
                              frames="../data/frames", models="../models_storage", **settings)
        daemon = DaemonProcess(kinod_root, config, env)
        daemon.log_path = folder / f"daemon{len(started)}.log"
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.send_signal(signal.SIGCONT)
            daemon.kill()
