"""kinod as a systemd service: the notify protocol on a real unix datagram socket, reload
by SIGHUP, journald priorities, and unit files that systemd-analyze accepts."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kinod.config import Settings
from kinod.daemon import Daemon
from kinod.plugins.plugin_loader import PluginRegistry
from kinod.systemd import Notifier
from tests.helpers import WORKING_PLUGINS, DaemonProcess, scripted, wait_end, wait_for

UNITS = Path(__file__).parent.parent / "systemd"


class NotifySocket:
    """What systemd would receive on $NOTIFY_SOCKET: (time, message) pairs."""

    def __init__(self) -> None:
        # A short folder: unix socket paths are limited to 107 bytes.
        self._folder = tempfile.mkdtemp(prefix="kinod-notify-")
        self.path = os.path.join(self._folder, "notify")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self._sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._receive, name="notify-socket")
        self._thread.start()

    def _receive(self) -> None:
        while not self._halt.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def close(self) -> None:
        self._halt.set()
        self._thread.join(5)
        self._sock.close()
        shutil.rmtree(self._folder, ignore_errors=True)

    def lines(self) -> list[str]:
        return [line for _, message in list(self.messages) for line in message.splitlines()]

    def has(self, line: str) -> bool:
        return line in self.lines()

    def index(self, line: str, after: int = 0) -> int:
        """Where ``line`` first comes, at or after line number ``after``; -1 if it does not."""
        lines = self.lines()
        return next((i for i in range(after, len(lines)) if lines[i] == line), -1)

    def pings_between(self, start: float, end: float) -> int:
        return sum(1 for at, message in list(self.messages)
                   if start <= at <= end and "WATCHDOG=1" in message.splitlines())


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    yield sock
    sock.close()


# --- the protocol -----------------------------------------------------------------------------


def test_outside_systemd_every_message_is_silent() -> None:
    notifier = Notifier(environ={})
    assert not notifier.enabled and notifier.watchdog_s is None
    notifier.ready("x")
    notifier.watchdog()
    notifier.stopping()  # nothing to send to, nothing raised


def test_each_message_reaches_the_socket(notify: NotifySocket) -> None:
    notifier = Notifier(environ={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "2000000"})
    assert notifier.watchdog_s == 2.0
    notifier.ready("0 running, 0 queued")
    notifier.status("1 running, 0 queued")
    notifier.watchdog()
    notifier.reloading()
    notifier.stopping()
    wait_for(lambda: len(notify.messages) == 5, 5, what="five messages")
    messages = [m for _, m in notify.messages]
    assert messages[0] == "READY=1\nSTATUS=0 running, 0 queued"
    assert messages[1] == "STATUS=1 running, 0 queued"
    assert messages[2] == "WATCHDOG=1"
    assert messages[3].startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert messages[4] == "STOPPING=1\nSTATUS=stopping"
    notifier.close()


def test_an_abstract_socket_address_is_understood() -> None:
    name = f"kinod-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        notifier = Notifier(environ={"NOTIFY_SOCKET": "@" + name})
        notifier.ready()
        notifier.close()
        sock.settimeout(5)
        assert sock.recv(100) == b"READY=1"
    finally:
        sock.close()


def test_a_watchdog_meant_for_another_process_is_not_ours() -> None:
    notifier = Notifier(environ={"NOTIFY_SOCKET": "/nowhere", "WATCHDOG_USEC": "1000000",
                                 "WATCHDOG_PID": str(os.getpid() + 1)})
    assert notifier.watchdog_s is None


# --- the real daemon under a pretend systemd ---------------------------------------------------


def test_the_daemon_speaks_the_notify_protocol_through_its_life(
        kinod_root: Path, start_daemon: Callable[..., DaemonProcess], notify: NotifySocket,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", notify.path)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # pings every 0.1 s
    later_plugins = kinod_root / "later_plugins"
    later_plugins.mkdir()
    daemon = start_daemon(plugin_dirs=[str(WORKING_PLUGINS), str(later_plugins)])
    wait_for(lambda: notify.has("READY=1"), 10, what="READY=1")
    ready_at = next(at for at, m in notify.messages if "READY=1" in m)
    wait_for(lambda: notify.pings_between(ready_at, ready_at + 1.0) >= 5, 10,
             what="watchdog pings")
    assert notify.index("READY=1") > -1 and "STATUS=0 running, 0 queued" in notify.lines()

    gate = kinod_root / "gate"
    daemon.drop("held.yaml", scripted(steps=0, gate=str(gate)))
    wait_for(lambda: "STATUS=1 running, 0 queued" in notify.lines(), 10,
             what="the status to count the running job")
    gate.touch()
    wait_end(daemon, "held")

    # A plugin installed after start comes in with a reload.
    shutil.copytree(WORKING_PLUGINS / "scripted", later_plugins / "latecomer")
    loader = later_plugins / "latecomer" / "loader.py"
    loader.write_text(loader.read_text().replace('"name": "scripted"', '"name": "latecomer"'))
    mark = len(notify.lines())
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: notify.index("RELOADING=1", mark) > -1
             and notify.index("READY=1", notify.index("RELOADING=1", mark)) > -1, 10,
             what="RELOADING=1 then READY=1")
    wait_for(lambda: "reloaded; plugins: " in daemon.log(), 5, what="the reload logged")
    assert "latecomer" in daemon.log().split("reloaded; plugins: ")[1].splitlines()[0]
    daemon.drop("late.yaml", {"type": "latecomer", "data": {"steps": 0}})
    assert wait_end(daemon, "late")["state"] == "succeeded"

    # A broken settings file is refused on reload; the daemon goes on as it was.
    daemon.config.write_text(daemon.config.read_text() + "workers: 0\n")
    mark = len(notify.lines())
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: "reload refused; the settings in force stay" in daemon.log(), 10,
             what="the refusal logged")
    wait_for(lambda: notify.index("READY=1", mark) > -1, 5, what="READY=1 after the refusal")
    assert "workers" in daemon.log().split("reload refused")[1].splitlines()[0]
    daemon.drop("after.yaml", scripted(steps=0))
    assert wait_end(daemon, "after")["state"] == "succeeded"

    mark = len(notify.lines())
    assert daemon.stop() == 0
    assert notify.index("STOPPING=1", mark) > -1


def test_the_status_is_told_again_after_the_daemon_has_been_idle(
        kinod_root: Path, start_daemon: Callable[..., DaemonProcess], notify: NotifySocket,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Idle, the status tick sleeps (no wake-up a second for nothing); the next job wakes it."""
    monkeypatch.setenv("NOTIFY_SOCKET", notify.path)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # pings every 0.1 s: a clock to wait on
    daemon = start_daemon()
    for round_ in ("first", "second"):
        mark = len(notify.lines())
        gate = kinod_root / f"gate-{round_}"
        daemon.drop(f"{round_}.yaml", scripted(steps=0, gate=str(gate)))
        wait_for(lambda m=mark: notify.index("STATUS=1 running, 0 queued", m) > -1, 10,
                 what=f"the status to count the {round_} running job")
        gate.touch()
        wait_end(daemon, round_)
        wait_for(lambda m=mark: notify.index("STATUS=0 running, 0 queued", m) > -1, 10,
                 what=f"the status to say nothing runs after the {round_} job")
        # Two status ticks (1 s apart) and more pass with nothing to tell: the tick sleeps,
        # and no status line is sent meanwhile.
        told_at = time.monotonic()
        wait_for(lambda t=told_at: notify.pings_between(t, time.monotonic()) >= 25, 10,
                 what="2.5 s of watchdog pings")
        idle = [m for at, m in list(notify.messages) if at >= told_at and "STATUS=" in m]
        assert idle == [], f"status sent while idle after the {round_} job: {idle}"
    assert daemon.stop() == 0


def test_a_hung_event_loop_stops_the_watchdog_pings(
        tmp_path: Path, notify: NotifySocket) -> None:
    for folder in ("inbox", "outbox", "frames", "models"):
        (tmp_path / folder).mkdir()
    settings = Settings(inbox=tmp_path / "inbox", outbox=tmp_path / "outbox",
                        frames=tmp_path / "frames", models=tmp_path / "models", node="n1")
    notifier = Notifier(environ={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "100000"})
    daemon = Daemon(settings, PluginRegistry(use_entry_points=False), notifier=notifier)
    loops: list[asyncio.AbstractEventLoop] = []

    async def serve() -> None:
        loops.append(asyncio.get_running_loop())
        await daemon.run()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="daemon")
    thread.start()
    try:
        wait_for(lambda: notify.has("READY=1"), 10, what="READY=1")
        wait_for(lambda: notify.pings_between(time.monotonic() - 0.5, time.monotonic()) >= 3,
                 5, what="pings while the loop turns")
        hung_at = time.monotonic()
        loops[0].call_soon_threadsafe(time.sleep, 1.5)  # the loop hangs for 1.5 s
        wait_for(lambda: time.monotonic() > hung_at + 1.6, 5, what="the hang to pass")
        assert notify.pings_between(hung_at + 0.2, hung_at + 1.4) == 0
        wait_for(lambda: notify.pings_between(hung_at + 1.5, time.monotonic()) >= 3, 5,
                 what="pings again once the loop turns")
    finally:
        loops[0].call_soon_threadsafe(daemon.request_shutdown)
        thread.join(10)
        notifier.close()


# --- journald -----------------------------------------------------------------------------------


def test_under_journald_lines_carry_priorities_and_no_times(
        kinod_root: Path, start_daemon: Callable[..., DaemonProcess],
        monkeypatch: pytest.MonkeyPatch) -> None:
    log = kinod_root / "journal.log"
    log.touch()
    st = os.stat(log)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    daemon = start_daemon(log_name="journal.log")
    daemon.drop("fails.yaml", scripted(outcome="fail"))
    wait_end(daemon, "fails")
    assert daemon.stop() == 0
    lines = log.read_text().splitlines()
    assert any(line.startswith("<6>kinod ready on node") for line in lines), lines
    assert any(line.startswith("<4>job fails running -> failed") for line in lines), lines
    assert all(line[:1] == "<" and line[2:3] == ">" for line in lines if line), lines
    assert "\x1b[" not in log.read_text()  # no colours


def test_a_journal_stream_that_is_not_stderr_changes_nothing(
        kinod_root: Path, start_daemon: Callable[..., DaemonProcess],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")  # stderr was redirected after systemd's
    daemon = start_daemon()
    assert daemon.stop() == 0
    assert " | INFO    | kinod ready on node" in daemon.log()


# --- unit files -----------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (.ci/run installs it)")
@pytest.mark.parametrize("unit", ["kinod.service", "kinod@.service"])
def test_units_pass_systemd_analyze_verify(tmp_path: Path, unit: str) -> None:
    # verify checks that ExecStart exists: point it at this checkout's kinod.
    kinod = Path(sys.executable).parent / "kinod"
    text = (UNITS / unit).read_text().replace("/opt/kinod/.venv/bin/kinod", str(kinod))
    (tmp_path / unit).write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / unit)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert unit not in result.stderr, result.stderr  # no warnings about our unit


@pytest.mark.parametrize("unit", ["kinod.service", "kinod@.service"])
def test_units_ask_for_what_kinod_does(unit: str) -> None:
    text = (UNITS / unit).read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "KillMode=mixed",
                 "ExecReload=/bin/kill -HUP $MAINPID", "User=kinod", "NoNewPrivileges=yes",
                 "ProtectSystem=strict", "ReadWritePaths=/srv/kinod", "ProtectHome=yes",
                 "PrivateTmp=yes", "TimeoutStopSec=30"):
        assert line in text, (unit, line)
    if unit == "kinod@.service":
        assert "Environment=CUDA_VISIBLE_DEVICES=%i" in text
        assert "Environment=KINOD_NODE=%H-gpu%i" in text


# --- folders and permissions ------------------------------------------------------------------
# The kinod group are the people who submit jobs. Whoever can write config.yaml or a plugin
# folder runs code as kinod (plugin_dirs); whoever can write the spool's state (inbox/.kinod)
# forges any job's. The group may write the inbox alone, sticky so that only kinod renames or
# deletes what is in it (.kinod, or the jobs others dropped).

TMPFILES = UNITS / "kinod.tmpfiles.conf"
INBOX = "/srv/kinod/inbox"


def tmpfiles_modes() -> dict[str, int]:
    """kinod.tmpfiles.conf: each path's mode."""
    modes = {}
    for line in TMPFILES.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            _, path, mode, *_ = line.split()
            modes[path] = int(mode.lstrip("~"), 8)
    return modes


def test_only_the_inbox_is_writable_by_those_who_submit_jobs() -> None:
    modes = tmpfiles_modes()
    assert {"/srv/kinod", INBOX, "/srv/kinod/outbox", "/srv/kinod/data/frames",
            "/srv/kinod/models_storage", "/srv/kinod/config.yaml"} <= set(modes), modes
    inbox = modes.pop(INBOX)
    assert inbox & stat.S_IWGRP and inbox & stat.S_ISGID, oct(inbox)  # drops keep the group
    assert inbox & stat.S_ISVTX, oct(inbox)  # sticky: .kinod and others' files stay put
    assert not inbox & stat.S_IWOTH, oct(inbox)
    for path, mode in modes.items():
        assert not mode & (stat.S_IWGRP | stat.S_IWOTH), (path, oct(mode))


@pytest.mark.parametrize("unit", ["kinod.service", "kinod@.service"])
def test_what_the_daemon_makes_the_kinod_group_cannot_write(unit: str) -> None:
    """inbox/.kinod and its folders, sidecars, frames: made under the unit's umask."""
    umasks = [line.split("=", 1)[1] for line in (UNITS / unit).read_text().splitlines()
              if line.startswith("UMask=")]
    assert len(umasks) == 1, umasks
    assert int(umasks[0], 8) & 0o022 == 0o022, umasks


@pytest.mark.skipif(shutil.which("systemd-tmpfiles") is None or os.geteuid() != 0,
                    reason="needs systemd-tmpfiles, and root to give files to kinod")
def test_systemd_tmpfiles_sets_these_modes_on_new_and_old_installs(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("kinod:x:990:990::/srv/kinod:/usr/sbin/nologin\n")
    (tmp_path / "etc" / "group").write_text("kinod:x:990:\n")
    root = tmp_path / "srv" / "kinod"
    (root / "outbox").mkdir(parents=True)  # as an older install left them: group-writable
    (root / "config.yaml").write_text("workers: 1\n")
    for path, mode in ((root, 0o2775), (root / "outbox", 0o2775), (root / "config.yaml", 0o664)):
        os.chmod(path, mode)
        os.chown(path, 990, 990)  # the install gives it all to kinod
    result = subprocess.run(["systemd-tmpfiles", "--create", f"--root={tmp_path}", str(TMPFILES)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for path, mode in tmpfiles_modes().items():
        st = os.lstat(tmp_path / path.lstrip("/"))
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (mode, 990), path
