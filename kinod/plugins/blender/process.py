"""Blender as a child process group: started, read line by line, stopped, always reaped.

Blender runs in a session of its own, so a stop reaches every process it started
(SIGTERM to the group, SIGKILL once the grace is over), and it is killed by the kernel
if the thread that started it dies with the daemon (``PR_SET_PDEATHSIG``): no Blender
is left behind, even by a daemon killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import fcntl
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

READ_BYTES = 65536
BATCH_S = 0.1  # how often Blender's output is read while it runs
PIPE_BYTES = 1 << 20
MAX_LINE = 65536  # longer lines are cut: a line is for reading, not for holding memory
PR_SET_PDEATHSIG = 1


def _prctl():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl
    except (OSError, AttributeError):
        return None  # not Linux: a daemon killed by force may leave Blender running


_PRCTL = _prctl()


def _die_with_parent(parent_pid: int):
    def preexec() -> None:  # runs in the child, between fork and exec: nothing that locks
        if _PRCTL is not None:
            _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class BlenderProcess:
    """One Blender command line running in its own process group."""

    def __init__(self, argv: list[str], cwd: Path) -> None:
        self.argv = argv
        self.cwd = cwd
        self.proc: asyncio.subprocess.Process | None = None
        self._output: int | None = None  # the reading end of Blender's stdout and stderr

    async def start(self) -> None:
        """Start it; OSError if the executable cannot run."""
        # A pipe of our own, read without asyncio's transport, which would wake the loop for
        # each line Blender prints (a thousand a job, each about 50 us of the daemon's CPU).
        reading, writing = os.pipe()
        with contextlib.suppress(OSError, AttributeError):  # Linux: room for 0.1 s of output
            fcntl.fcntl(writing, fcntl.F_SETPIPE_SZ, PIPE_BYTES)  # and more: it never waits
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=writing,
                stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent(os.getpid()))
        except BaseException:
            os.close(reading)
            raise
        finally:
            os.close(writing)  # Blender holds it now: its end (and its children's) is EOF
        os.set_blocking(reading, False)
        self._output = reading

    async def lines(self) -> AsyncIterator[str]:
        """Its output, a line at a time (a carriage return ends a line too). What it prints
        is read every BATCH_S, or at once when it ends, not as each line comes."""
        assert self.proc is not None and self._output is not None
        ended = asyncio.ensure_future(self.proc.wait())
        pending = b""
        try:
            while True:
                try:
                    chunk = os.read(self._output, READ_BYTES)
                except BlockingIOError:  # nothing more for now: let lines gather
                    if ended.done():  # what it started may hold the pipe still
                        await asyncio.sleep(BATCH_S)
                    else:
                        await asyncio.wait([ended], timeout=BATCH_S)
                    continue
                if not chunk:
                    break
                pending += chunk
                *complete, pending = pending.replace(b"\r", b"\n").split(b"\n")
                for raw in complete:
                    yield raw[:MAX_LINE].decode("utf-8", "replace")
                pending = pending[-MAX_LINE:]
            if pending:
                yield pending.decode("utf-8", "replace")
        finally:
            ended.cancel()

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to Blender and everything it started."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    async def wait(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    async def finish(self) -> None:
        """Make sure nothing of it runs any more: kill the group and reap Blender. Safe to
        call at any time, also while the task is being cancelled."""
        if self.proc is None:
            return
        cancelled = False
        if self.proc.returncode is None:
            self.signal_group(signal.SIGKILL)
            while True:
                try:
                    await asyncio.shield(self.proc.wait())
                    break
                except asyncio.CancelledError:
                    cancelled = True  # Blender is dying: reap it all the same, then obey
        # Blender has ended; anything it left in its group goes too.
        self.signal_group(signal.SIGKILL)
        if self._output is not None:
            os.close(self._output)
            self._output = None
        if cancelled:
            raise asyncio.CancelledError
