"""What every benchmark needs: a farm folder, job files, a kinod daemon to start and stop,
and ways to see what it writes without slowing it down (inotify, not polling).

Only what the README documents is relied on: sidecars are replaced by a rename into the
outbox, an ended job's file is filed under ``inbox/.kinod/done/<id>/``, and the daemon
says ``READY=1`` on ``$NOTIFY_SOCKET`` once its start-up scan is done.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

from kinod.watcher import file_system_type

BENCH = Path(__file__).resolve().parent
PLUGINS = BENCH / "plugins"
JOB = json.dumps({"type": "noop", "data": {}})
TERMINAL = frozenset({"succeeded", "failed", "stopped"})


class BenchError(RuntimeError):
    """A measurement that could not be made (a daemon that died, a run past its limit)."""


# --- farms ----------------------------------------------------------------------------------


def make_farm(root: Path, **settings) -> Path:
    """The folders and config.yaml of one daemon; returns the config's path.

    ``settle_s`` is 0: every job here is renamed into place, which kinod reads at once
    anyway, but a file system's coarse clock can give a renamed file a ctime equal to its
    mtime, and a file found by a scan would then wait a second for nothing.
    """
    for folder in ("inbox", "outbox", "data/frames", "models_storage"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    values = {"node": "bench", "plugin_dirs": [str(PLUGINS)], "settle_s": 0,
              "log_level": "WARNING", **settings}
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(values))
    return config


def job_name(i: int) -> str:
    return f"job{i:06d}.json"


def write_jobs(folder: Path, n: int, job: str = JOB) -> list[str]:
    """n job files in ``folder``, each written under a dot-name and renamed into place."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = job_name(i)
        tmp = folder / f".{name}.tmp"
        tmp.write_text(job)
        os.rename(tmp, folder / name)
        names.append(name)
    return names


def drop(staged: Path, inbox: Path, names: list[str]) -> None:
    """Rename staged job files into the inbox, as fast as one process can."""
    for name in names:
        os.rename(staged / name, inbox / name)


def read_sidecar(path: Path) -> dict | None:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def count_ended(outbox: Path) -> int:
    """Sidecars in the outbox whose state is terminal."""
    ended = 0
    for entry in os.scandir(outbox):
        if entry.name.endswith(".json") and entry.is_file():
            sidecar = read_sidecar(Path(entry.path))
            if sidecar is not None and sidecar.get("state") in TERMINAL:
                ended += 1
    return ended


# --- inotify --------------------------------------------------------------------------------

IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_Q_OVERFLOW = 0x4000
_EVENT = struct.Struct("iIII")
_libc = ctypes.CDLL(None, use_errno=True)


class Inotify:
    """Linux inotify through libc: every event, in order, none coalesced."""

    def __init__(self) -> None:
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.overflowed = False

    def watch(self, folder: Path, mask: int) -> None:
        if _libc.inotify_add_watch(self.fd, os.fsencode(folder), mask) < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), str(folder))

    def read(self, timeout_s: float) -> list[tuple[int, str]]:
        """(mask, name) of the events queued now, waiting up to ``timeout_s`` for one."""
        if not select.select([self.fd], [], [], max(timeout_s, 0))[0]:
            return []
        try:
            buffer = os.read(self.fd, 1 << 20)
        except BlockingIOError:
            return []
        events, offset = [], 0
        while offset < len(buffer):
            _, mask, _, length = _EVENT.unpack_from(buffer, offset)
            offset += _EVENT.size
            name = buffer[offset:offset + length].rstrip(b"\0").decode(errors="replace")
            offset += length
            if mask & IN_Q_OVERFLOW:
                self.overflowed = True
            events.append((mask, name))
        return events

    def close(self) -> None:
        os.close(self.fd)


class SidecarWatch:
    """Sees each sidecar write in an outbox (every write is a rename into it) the moment it
    is made, and counts them per job."""

    def __init__(self, outbox: Path) -> None:
        self.outbox = outbox
        self.writes: dict[str, int] = {}
        self._inotify = Inotify()
        self._inotify.watch(outbox, IN_MOVED_TO)

    def wait_for(self, job_id: str, states: frozenset[str] | set[str],
                 timeout_s: float) -> tuple[float, dict]:
        """(perf_counter when seen, sidecar) once ``job_id``'s sidecar is in one of
        ``states``; the time is taken after the read that showed it."""
        path, name = self.outbox / f"{job_id}.json", f"{job_id}.json"
        deadline = time.monotonic() + timeout_s
        sidecar = read_sidecar(path)
        while sidecar is None or sidecar.get("state") not in states:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{job_id}: no sidecar in {sorted(states)} within "
                                 f"{timeout_s:g} s (last seen: {sidecar and sidecar['state']})")
            events = self._inotify.read(min(left, 1.0))
            for _, n in events:
                self.writes[n] = self.writes.get(n, 0) + 1
            if not events or any(n == name for _, n in events):  # quiet for 1 s: look anyway
                sidecar = read_sidecar(path)
        return time.perf_counter(), sidecar

    def drain(self) -> None:
        """Count the writes made so far that no ``wait_for`` has read yet."""
        for _, n in self._inotify.read(0):
            self.writes[n] = self.writes.get(n, 0) + 1

    def first(self, states: frozenset[str], timeout_s: float,
              alive=lambda: True) -> tuple[float, str]:
        """(perf_counter, job id) of the first sidecar written in one of ``states``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and alive():
            for _, name in self._inotify.read(min(deadline - time.monotonic(), 1.0)):
                if name.endswith(".json") and not name.startswith("."):
                    sidecar = read_sidecar(self.outbox / name)
                    if sidecar is not None and sidecar.get("state") in states:
                        return time.perf_counter(), name[:-5]
        raise BenchError(f"no sidecar in {sorted(states)} within {timeout_s:g} s"
                         + ("" if alive() else " (the writer died)"))

    def close(self) -> None:
        self._inotify.close()


class Arrivals:
    """The names that appear in a folder (created or renamed in), by inotify, with a
    listing of the folder where events may have been lost."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._inotify = Inotify()
        self._inotify.watch(folder, IN_CREATE | IN_MOVED_TO)
        self.names = set(os.listdir(folder))  # what came before the watch

    def wait_count(self, n: int, deadline: float, alive=lambda: True) -> float | None:
        """perf_counter when ``n`` names have appeared; None past ``deadline`` (monotonic)
        or once ``alive()`` says the writer is gone."""
        while len(self.names) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not alive():
                return None
            events = self._inotify.read(min(left, 1.0))
            self.names.update(name for _, name in events if name)
            if self._inotify.overflowed or not events:
                self._inotify.overflowed = False
                self.names.update(os.listdir(self.folder))
        return time.perf_counter()

    def close(self) -> None:
        self._inotify.close()


# --- the daemon -----------------------------------------------------------------------------


class Daemon:
    """``kinod run`` on a farm, as a child process with ``$NOTIFY_SOCKET`` set: ``ready``
    waits for its READY=1. Its stderr (WARNING and up) goes to ``daemon.log`` in the farm.
    Use as a context manager: leaving it stops the daemon (SIGTERM, then SIGKILL)."""

    def __init__(self, config: Path, *args: str) -> None:
        self.root = config.parent
        self._socket_path = self.root / "notify.sock"
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._socket.bind(str(self._socket_path))
        self._socket.settimeout(0.2)  # so that the reader sees ``_closing``
        self._ready = threading.Event()
        self._closing = False
        # The daemon sends STATUS= lines now and then: keep reading, so that it never
        # blocks on a full socket.
        self._reader = threading.Thread(target=self._read_notifications, daemon=True)
        self._reader.start()
        self._log = open(self.root / "daemon.log", "ab")  # noqa: SIM115 (closed in stop)
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kinod", "run", "--config", str(config), *args],
            stdout=subprocess.DEVNULL, stderr=self._log,
            env={**os.environ, "NOTIFY_SOCKET": str(self._socket_path)})
        self.pid = self.proc.pid

    def _read_notifications(self) -> None:
        while not self._closing:
            try:
                message = self._socket.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            if b"READY=1" in message.split(b"\n"):
                self.ready_at = time.perf_counter()
                self._ready.set()

    def ready(self, timeout_s: float = 60) -> float:
        """Seconds from the start until READY=1."""
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.1):
            if self.proc.poll() is not None:
                raise BenchError(f"kinod exited with {self.proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"kinod not ready within {timeout_s:g} s")
        return self.ready_at - self.started

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu_s(self) -> float:
        return cpu_seconds(self.pid)

    def peak_rss_mb(self) -> float:
        """The most memory it has held at once (VmHWM), in MB (10^6 bytes)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
        raise BenchError("no VmHWM in /proc")

    def log_tail(self, lines: int = 10) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.root / "daemon.log").read_text(errors="replace")
                             .splitlines()[-lines:])
        return ""

    def stop(self, timeout_s: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._closing = True
        self._reader.join(1)
        self._socket.close()
        self._log.close()
        with contextlib.suppress(FileNotFoundError):
            self._socket_path.unlink()

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process, all its threads (those ended too)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def child(args: list[str], **popen) -> Iterator[subprocess.Popen]:
    """A helper process that is stopped (SIGTERM, then SIGKILL) however the block ends."""
    proc = subprocess.Popen(args, **popen)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --- the machine ----------------------------------------------------------------------------


def machine(work: Path) -> str:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = f" ({line.split(':', 1)[1].strip()})"
                break
    fs_type = file_system_type(work) or "unknown"
    if fs_type == "ext4" and not has_journal(work):
        fs_type = "ext4 without a journal"
    return (f"{os.cpu_count()} cores{model}, Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}, file system {fs_type}")


def has_journal(folder: Path) -> bool:
    """False for an ext4 file system the kernel keeps no journal for (none listed in
    /proc/fs/jbd2). It matters to every figure here: without one, ext4 skips each inode
    freed in the last minute or more when it looks for a free one, so creating a file
    costs more the more files were replaced or removed before (see the README)."""
    st = os.stat(folder)
    try:
        device = os.path.basename(os.readlink(
            f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"))
    except OSError:
        return True  # cannot tell: say nothing
    if not os.path.isdir(f"/proc/fs/ext4/{device}"):
        return True
    with contextlib.suppress(FileNotFoundError):  # gone: no file system has a journal
        return any(name.startswith(f"{device}-") for name in os.listdir("/proc/fs/jbd2"))
    return False
