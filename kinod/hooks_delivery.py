"""One attempt at telling a hook that a job ended: a command, or a POST to a webhook.

Each returns None when the hook took the delivery, else a short reason for the job's log.
Both are bounded by the hook's ``timeout``; neither reads more of what the hook says back
than a short tail, so a chatty hook cannot grow the daemon's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from kinod.config import HookSettings
from kinod.models import Sidecar

if TYPE_CHECKING:
    import httpx

STDERR_TAIL_BYTES = 2000  # what of a failing command's stderr goes into the job's log
# After a command exits, how long its stderr may stay open (held by a child it left behind).
STDERR_LINGER_S = 0.5


def describe(hook: HookSettings) -> str:
    """The hook as the job's log names it. Not its whole target: a URL's query or a
    command's arguments may hold a token, and anyone who submits jobs reads the job's log."""
    if hook.run is not None:
        return f"command {os.path.basename(hook.run[0]) or hook.run[0]}"
    url = urlsplit(hook.url or "")
    port = f":{url.port}" if url.port else ""
    return f"webhook {url.scheme}://{url.hostname or ''}{port}{url.path or '/'}"


async def attempt(hook: HookSettings, sidecar: Sidecar, sidecar_path: Path,
                  client: httpx.AsyncClient) -> str | None:
    body = sidecar.to_json()
    if hook.run is not None:
        return await run_command(hook.run, hook.timeout, sidecar, sidecar_path, body)
    return await post_webhook(client, hook.url or "", hook.timeout, body)


async def run_command(argv: list[str], timeout_s: float, sidecar: Sidecar,
                      sidecar_path: Path, body: bytes) -> str | None:
    """Run ``argv`` without a shell, the sidecar on its stdin; exit status 0 is delivered.
    In a session of its own, so that a timeout (or the daemon stopping) kills the whole
    process group: a shell script's children too."""
    env = {**os.environ, "KINOD_JOB_ID": sidecar.id, "KINOD_STATE": sidecar.state.value,
           "KINOD_TYPE": sidecar.type or "", "KINOD_SIDECAR": str(sidecar_path)}
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env=env, start_new_session=True)
    except OSError as exc:
        return f"cannot start: {exc.strerror or exc}"
    tail = asyncio.ensure_future(_tail(proc.stderr))
    try:
        async with asyncio.timeout(timeout_s):
            await _feed(proc, body)
            code = await proc.wait()
    except TimeoutError:
        await _kill_group(proc)
        return f"killed after its timeout of {timeout_s:g} s"
    except BaseException:  # the daemon stops: no hook outlives it
        await _kill_group(proc)
        raise
    finally:
        if not tail.done():
            # A child the command left behind may hold stderr open: stop listening soon.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(tail), STDERR_LINGER_S)
            tail.cancel()
    if code == 0:
        return None
    said = ""
    if not tail.cancelled() and tail.exception() is None:
        said = tail.result().decode("utf-8", "replace").strip()
    why = f"exited with status {code}" if code > 0 else f"killed by signal {-code}"
    return f"{why}: {said}" if said else why


async def _feed(proc: asyncio.subprocess.Process, body: bytes) -> None:
    assert proc.stdin is not None
    try:
        proc.stdin.write(body)
        await proc.stdin.drain()
        proc.stdin.close()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the command did not read its stdin: its exit status still decides


async def _tail(stream: asyncio.StreamReader | None) -> bytes:
    """The last STDERR_TAIL_BYTES of ``stream``; the rest is read and dropped."""
    kept = b""
    if stream is None:
        return kept
    while chunk := await stream.read(1 << 14):
        kept = (kept + chunk)[-STDERR_TAIL_BYTES:]
    return kept


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    # The group's id is the command's pid (start_new_session), and stays taken while
    # any of the group lives, so this never reaches another process's group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()


async def post_webhook(client: httpx.AsyncClient, url: str, timeout_s: float,
                       body: bytes) -> str | None:
    """POST the sidecar; any 2xx is delivered. Redirects are not followed, and the answer's
    body is never read: a webhook that says a lot costs nothing."""
    import httpx  # loaded by the client already; here, so that kinod loads it only for one

    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream(
                    "POST", url, content=body, timeout=timeout_s,
                    headers={"content-type": "application/json",
                             "user-agent": "kinod-hook"}) as response:
                status = response.status_code
    except (TimeoutError, httpx.TimeoutException):
        return f"no answer within its timeout of {timeout_s:g} s"
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    if 200 <= status < 300:
        return None
    return f"HTTP {status}"
