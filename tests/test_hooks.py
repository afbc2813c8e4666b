"""Completion hooks: real commands, a real webhook on 127.0.0.1, real files in tmp_path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kinod.config import HookSettings, Settings
from kinod.hooks import (
    Delivery,
    Hooks,
    hook_key,
    journal_line,
    matching_hooks,
    parse_line,
)
from kinod.models import JobState, Sidecar
from kinod.outbox import Outbox
from tests.helpers import wait_for

ENDED = datetime(2026, 11, 26, 1, 7, 37, tzinfo=UTC)


def make_settings(root: Path, hooks: list[dict[str, Any]], node: str = "n1") -> Settings:
    for folder in ("inbox", "outbox"):
        (root / folder).mkdir(exist_ok=True)
    return Settings.model_validate({"inbox": root / "inbox", "outbox": root / "outbox",
                                    "node": node, "hooks": hooks})


def sidecar(job_id: str = "shot010", state: str = "succeeded", type_: str = "example",
            ended: datetime = ENDED) -> Sidecar:
    return Sidecar(id=job_id, name="Shot 010", type=type_, state=JobState(state),
                   progress=100.0, created_at=ended, started_at=ended, finished_at=ended,
                   updated_at=ended, result={"output": "x"},
                   task={"type": type_, "data": {"prompt": "hello"}})


def spool_root(settings: Settings) -> Path:
    return settings.inbox / ".kinod"


def files_in(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if not n.startswith(".")) \
        if folder.is_dir() else []


def segments(hooks: Hooks) -> list[Path]:
    """The journal segments of the hooks' node, oldest first."""
    return [hooks.journal_folder / n for n in files_in(hooks.journal_folder)
            if n.endswith(".jsonl")]


def journal_lines(hooks: Hooks) -> list[tuple[list[str], str]]:
    """Each line of the node's journal: the hooks it names, and the job."""
    lines = []
    for path in segments(hooks):
        for raw in path.read_bytes().splitlines():
            record = json.loads(raw)
            lines.append((record["hooks"], record["sidecar"]["id"]))
    return lines


def cursor(segment: Path) -> int:
    try:
        return int(segment.with_suffix(".cursor").read_text())
    except FileNotFoundError:
        return 0


def settled(hooks: Hooks) -> bool:
    """Every line of the journal is settled, and its cursor says so."""
    return all(cursor(path) == path.stat().st_size for path in segments(hooks))


def write_segment(folder: Path, stem: str, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.jsonl"
    path.write_bytes(data)
    return path


def job_log(settings: Settings, job_id: str = "shot010") -> str:
    try:
        return (settings.outbox / f"{job_id}.log").read_text()
    except FileNotFoundError:
        return ""


@pytest.fixture
def started() -> Iterator[list[Hooks]]:
    """Hooks a test starts; every one is stopped at its end."""
    hooks: list[Hooks] = []
    yield hooks
    for each in hooks:
        each.stop()


def start(started: list[Hooks], settings: Settings, **options: Any) -> Hooks:
    hooks = Hooks(settings, spool_root(settings), **options)
    started.append(hooks)
    hooks.start()
    return hooks


def script(tmp_path: Path, name: str, body: str) -> list[str]:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


# --- a webhook on 127.0.0.1 ---------------------------------------------------------------


class Webhook:
    """An http.server that answers 503 to the first ``refuse`` POSTs, then 200; with
    ``hold`` set, each request waits until ``release`` is set."""

    def __init__(self, refuse: int = 0, hold: bool = False) -> None:
        self.refuse = refuse
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.accepted: list[dict[str, Any]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with hook.lock:
                    hook.requests.append(body)
                    hook.in_flight += 1
                    hook.most_in_flight = max(hook.most_in_flight, hook.in_flight)
                    refused = len(hook.requests) <= hook.refuse
                hook.release.wait(30)
                with hook.lock:
                    hook.in_flight -= 1
                    if not refused:
                        hook.accepted.append(body)
                self.send_response(503 if refused else 200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that gave up (a timeout, a stop) is no error here

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/kinod"
        self.thread = threading.Thread(target=self.server.serve_forever, name="webhook")
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def webhook() -> Iterator[Any]:
    made: list[Webhook] = []

    def make(**options: Any) -> Webhook:
        made.append(Webhook(**options))
        return made[-1]

    yield make
    for each in made:
        each.close()


# --- tests --------------------------------------------------------------------------------


def test_a_command_hook_gets_the_sidecar_on_stdin_and_the_job_in_its_environment(
        tmp_path: Path, started: list[Hooks]) -> None:
    seen = tmp_path / "seen.json"
    argv = script(tmp_path, "hook.py", f"""
        import json, os, sys
        env = {{k: v for k, v in os.environ.items() if k.startswith("KINOD_")}}
        out = {{"env": env, "stdin": json.load(sys.stdin), "argv": sys.argv[1:]}}
        open({str(seen)!r} + ".tmp", "w").write(json.dumps(out))
        os.rename({str(seen)!r} + ".tmp", {str(seen)!r})
        """) + ["a b", "$HOME"]
    settings = make_settings(tmp_path, [{"run": argv}])
    hooks = start(started, settings)
    hooks.enqueue(sidecar())

    got = json.loads(wait_for(lambda: seen.is_file() and seen.read_text(), what="the hook"))
    assert got["env"] == {"KINOD_JOB_ID": "shot010", "KINOD_STATE": "succeeded",
                          "KINOD_TYPE": "example",
                          "KINOD_SIDECAR": str(settings.outbox / "shot010.json")}
    assert got["stdin"] == json.loads(sidecar().to_json())
    assert got["argv"] == ["a b", "$HOME"]  # no shell: words reach it as written
    wait_for(lambda: "delivered (attempt 1 of 6)" in job_log(settings), what="the log line")
    wait_for(lambda: settled(hooks), what="the journal's cursor past the line")
    assert files_in(hooks.pending) == files_in(hooks.claimed) == []


def test_a_refused_webhook_is_retried_then_delivered_exactly_once(
        tmp_path: Path, started: list[Hooks], webhook: Any) -> None:
    server = webhook(refuse=2)
    settings = make_settings(tmp_path, [{"url": server.url, "retries": 5}])
    hooks = start(started, settings, backoff_s=0.05)
    hooks.enqueue(sidecar())

    wait_for(lambda: "delivered (attempt 3 of 6)" in job_log(settings), what="delivery")
    hooks.stop()  # nothing left that could deliver it again
    assert len(server.requests) == 3 and len(server.accepted) == 1
    assert server.accepted[0]["id"] == "shot010" and server.accepted[0]["state"] == "succeeded"
    log = job_log(settings)
    assert log.count("failed: HTTP 503; next attempt in") == 2
    assert f"webhook http://127.0.0.1:{server.server.server_address[1]}/kinod" in log
    assert files_in(hooks.pending) == files_in(hooks.claimed) == []
    assert settled(hooks)  # the line was settled when its first retry went to pending/


def test_a_delivery_cut_short_by_a_stop_is_delivered_by_the_next_start(
        tmp_path: Path, started: list[Hooks], webhook: Any) -> None:
    server = webhook(hold=True)
    settings = make_settings(tmp_path, [{"url": server.url}])
    hooks = start(started, settings)
    hooks.enqueue(sidecar())
    wait_for(lambda: server.in_flight == 1, what="the attempt")

    hooks.stop()  # cuts the attempt short: the hook is still holding it
    assert server.in_flight == 1
    # The line stays unsettled in the journal, read again by the next start.
    [segment] = segments(hooks)
    assert cursor(segment) == 0 and journal_lines(hooks) == [([hook_key(settings.hooks[0])],
                                                               "shot010")]
    assert files_in(hooks.pending) == files_in(hooks.claimed) == []

    server.release.set()
    start(started, settings)
    wait_for(lambda: "delivered" in job_log(settings), what="delivery after the restart")
    # At least once: the attempt cut short counts as not delivered, whatever the server did.
    assert [body["id"] for body in server.requests] == ["shot010", "shot010"]
    assert job_log(settings).count("delivered") == 1


CRASHING_DAEMON = """
import sys, time
from pathlib import Path
from kinod.config import Settings
from kinod.hooks import Hooks
from kinod.models import Sidecar
settings = Settings.model_validate_json(Path(sys.argv[1]).read_text())
hooks = Hooks(settings, settings.inbox / ".kinod")
hooks.start()
hooks.enqueue(Sidecar.model_validate_json(Path(sys.argv[2]).read_text()))
time.sleep(60)
"""


def test_a_delivery_survives_kill_9_of_the_daemon(tmp_path: Path, started: list[Hooks]) -> None:
    # The hook hangs until the file `ok` exists; its pid tells the test it was reached.
    ok, pid_file, done = tmp_path / "ok", tmp_path / "hook.pid", tmp_path / "done"
    argv = script(tmp_path, "hook.py", f"""
        import os, sys, time
        sys.stdin.read()
        if not os.path.exists({str(ok)!r}):
            open({str(pid_file)!r}, "w").write(str(os.getpid()))
            time.sleep(60)
        open({str(done)!r}, "a").write(os.environ["KINOD_JOB_ID"] + "\\n")
        """)
    settings = make_settings(tmp_path, [{"run": argv}])
    (tmp_path / "settings.json").write_text(settings.model_dump_json())
    (tmp_path / "sidecar.json").write_bytes(sidecar().to_json())
    daemon = subprocess.Popen([sys.executable, "-c", CRASHING_DAEMON,
                               str(tmp_path / "settings.json"), str(tmp_path / "sidecar.json")])
    hook_pid = 0
    try:
        hook_pid = int(wait_for(lambda: pid_file.is_file() and pid_file.read_text(),
                                what="the hook to start"))
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)
        if hook_pid:
            os.kill(hook_pid, signal.SIGKILL)  # orphaned by the crash, as in real life
    hooks = Hooks(settings, spool_root(settings))
    # The crash left the line in the journal, unsettled: not lost.
    [segment] = segments(hooks)
    assert cursor(segment) == 0 and [job for _, job in journal_lines(hooks)] == ["shot010"]

    ok.touch()
    started.append(hooks)
    hooks.start()
    wait_for(lambda: done.is_file() and done.read_text() == "shot010\n", what="redelivery")
    # The crashed daemon's segment is closed: once settled, it is removed.
    wait_for(lambda: not segment.exists() and not segment.with_suffix(".cursor").exists(),
             what="the segment's removal")
    assert files_in(hooks.pending) == files_in(hooks.claimed) == []


def test_a_hook_that_hangs_is_killed_with_its_children_after_its_timeout(
        tmp_path: Path, started: list[Hooks]) -> None:
    pids = tmp_path / "pids"
    argv = script(tmp_path, "hang.py", f"""
        import os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(pids)!r} + ".tmp", "w").write(f"{{os.getpid()}} {{child.pid}}")
        os.rename({str(pids)!r} + ".tmp", {str(pids)!r})
        time.sleep(60)
        """)
    settings = make_settings(tmp_path, [{"run": argv, "timeout": 1, "retries": 0}])
    hooks = start(started, settings)
    hooks.enqueue(sidecar(state="failed"))

    wait_for(lambda: "giving up" in job_log(settings), what="the give-up")
    log = job_log(settings)
    assert "killed after its timeout of 1 s" in log and "attempt 1 of 1 failed" in log
    for pid in map(int, pids.read_text().split()):
        wait_for(lambda pid=pid: not _alive(pid), what=f"process {pid} to be gone")
    # Kept for people, its count reset for a retry by hand.
    [name] = wait_for(lambda: files_in(hooks.given_up), what="the file set aside")
    assert f"giving up (kept in given_up/{name})" in log
    assert Delivery.model_validate_json((hooks.given_up / name).read_bytes()).attempts == 0
    assert files_in(hooks.pending) == files_in(hooks.claimed) == []
    wait_for(lambda: settled(hooks), what="the line settled")


def test_a_webhook_that_does_not_answer_times_out(
        tmp_path: Path, started: list[Hooks], webhook: Any) -> None:
    server = webhook(hold=True)
    settings = make_settings(tmp_path, [{"url": server.url, "timeout": 0.5, "retries": 0}])
    hooks = start(started, settings)
    hooks.enqueue(sidecar())
    wait_for(lambda: "giving up" in job_log(settings), what="the give-up")
    assert "no answer within its timeout of 0.5 s" in job_log(settings)
    wait_for(lambda: len(files_in(hooks.given_up)) == 1, what="the file set aside")


def test_a_storm_keeps_a_bounded_number_in_flight_and_the_rest_on_disk(
        tmp_path: Path, started: list[Hooks], webhook: Any) -> None:
    jobs = 300
    server = webhook(hold=True)
    settings = make_settings(tmp_path, [{"url": server.url}])
    hooks = start(started, settings, max_in_flight=4)

    for n in range(jobs):
        hooks.enqueue(sidecar(f"job{n:04d}"))
    # The slow webhook holds nothing up: every end was queued while it stalled.
    wait_for(lambda: server.in_flight == 4, what="four deliveries in flight")
    assert hooks.in_flight == 4 and hooks.read_in <= 1  # held in memory: a bounded few
    assert hooks._reader is not None and hooks._reader.held == 4
    assert len(journal_lines(hooks)) == jobs  # the rest waits on disk, one line each
    assert len(segments(hooks)) == 1 and files_in(hooks.pending) == []

    server.release.set()
    wait_for(lambda: len(server.accepted) == jobs, what="every delivery", timeout_s=60)
    wait_for(lambda: settled(hooks), what="the journal's cursor at its end")
    assert files_in(hooks.pending) == files_in(hooks.claimed) == []
    assert server.most_in_flight == 4
    assert sorted(body["id"] for body in server.accepted) == [f"job{n:04d}" for n in range(jobs)]
    # Oldest first: the first ends were delivered before the last ones.
    order = [body["id"] for body in server.accepted]
    assert order.index("job0000") < order.index(f"job{jobs - 1:04d}")


def test_hooks_are_filtered_by_state_and_plugin(tmp_path: Path) -> None:
    failures = {"run": ["notify-failure"], "on": ["failed", "stopped"], "types": ["sdxl"]}
    successes = {"url": "https://hooks.example/done", "on": ["succeeded"]}
    settings = make_settings(tmp_path, [failures, successes])
    keys = [hook_key(hook) for hook in settings.hooks]

    def told(state: str, type_: str) -> list[str]:
        return sorted(matching_hooks(settings.hooks, sidecar(state=state, type_=type_)))

    assert told("failed", "sdxl") == [keys[0]]
    assert told("stopped", "sdxl") == [keys[0]]
    assert told("failed", "example") == []
    assert told("succeeded", "sdxl") == [keys[1]]
    assert told("succeeded", "example") == [keys[1]]

    hooks = Hooks(settings, spool_root(settings))  # not started: enqueue alone
    hooks.enqueue(sidecar("a", "failed", "sdxl"))
    hooks.enqueue(sidecar("b", "failed", "example"))  # matches nothing: no line
    hooks.enqueue(sidecar("c", "succeeded", "example"))
    assert journal_lines(hooks) == [([keys[0]], "a"), ([keys[1]], "c")]
    assert files_in(hooks.pending) == []


def test_the_same_target_twice_is_told_once() -> None:
    hooks = [HookSettings(url="http://127.0.0.1:1/x", on=["failed"]),
             HookSettings(url="http://127.0.0.1:1/x")]
    assert len(matching_hooks(hooks, sidecar(state="failed"))) == 1


def test_files_that_are_not_deliveries_are_set_aside_and_foreign_hooks_left(
        tmp_path: Path, started: list[Hooks], webhook: Any) -> None:
    server = webhook()
    settings = make_settings(tmp_path, [{"url": server.url}])
    hooks = Hooks(settings, spool_root(settings))
    hooks.pending.mkdir(parents=True)
    # A delivery for a hook this node lacks: another node's, or one the settings dropped.
    other = Delivery(hook="0123456789abcdef", sidecar=sidecar("other"))
    (hooks.pending / f"{0:020d}.0123456789abcdef.other.json").write_bytes(other.to_json())
    # A file naming our hook whose content is no delivery, and one naming a path as its id.
    key = hook_key(settings.hooks[0])
    (hooks.pending / f"{0:020d}.{key}.junk.json").write_text("{not json")
    bad = json.loads(Delivery(hook=key, sidecar=sidecar("x")).to_json())
    bad["sidecar"]["id"] = "../escape"
    (hooks.pending / f"{1:020d}.{key}.x.json").write_text(json.dumps(bad))
    start(started, settings)
    hooks.enqueue(sidecar("good"))

    wait_for(lambda: [b["id"] for b in server.accepted] == ["good"], what="the good one")
    wait_for(lambda: len(files_in(hooks.invalid)) == 2, what="the bad ones set aside")
    assert files_in(hooks.pending) == [f"{0:020d}.0123456789abcdef.other.json"]
    assert not (tmp_path / "escape.log").exists()


def test_a_dead_nodes_claimed_deliveries_can_be_taken_back(
        tmp_path: Path, started: list[Hooks], webhook: Any) -> None:
    server = webhook()
    settings = make_settings(tmp_path, [{"url": server.url}])
    dead = spool_root(settings) / "hooks" / "claimed" / "n2"
    dead.mkdir(parents=True)
    key = hook_key(settings.hooks[0])
    (dead / f"{5:020d}.{key}.left.json").write_bytes(
        Delivery(hook=key, sidecar=sidecar("left")).to_json())
    hooks = start(started, settings)
    assert hooks.take_back("n2") == 1
    wait_for(lambda: [b["id"] for b in server.accepted] == ["left"], what="its delivery")
    assert hooks.take_back("../n2") == 0


def test_without_hooks_nothing_is_written_and_no_thread_runs(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, [])
    hooks = Hooks(settings, spool_root(settings))
    before = threading.active_count()
    hooks.start()
    hooks.enqueue(sidecar())
    assert threading.active_count() == before
    assert files_in(hooks.pending) == [] and segments(hooks) == []
    hooks.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose: it runs nothing.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_hooks_added_by_a_reload_deliver_what_waits(
        tmp_path: Path, started: list[Hooks], webhook: Any) -> None:
    server = webhook()
    settings = make_settings(tmp_path, [])
    hooks = start(started, settings)  # no hooks yet: no thread
    with_hook = make_settings(tmp_path, [{"url": server.url}])
    Hooks(with_hook, spool_root(with_hook)).enqueue(sidecar())  # another node's end
    hooks.update_settings(with_hook)
    wait_for(lambda: [b["id"] for b in server.accepted] == ["shot010"], what="its delivery")


# --- the journal --------------------------------------------------------------------------


def test_an_end_is_journaled_with_its_final_sidecar_and_flushed_in_the_same_flush(
        tmp_path: Path) -> None:
    settings = make_settings(tmp_path, [{"url": "http://127.0.0.1:1/x"}])
    hooks = Hooks(settings, spool_root(settings))  # not started: nothing delivers
    outbox = Outbox(settings.outbox)
    outbox.on_final = hooks.journal  # as the ending stage wires them
    outbox.folder_flush.also.append(hooks.sync)

    outbox.write(sidecar("queued", state="queued"))  # not an end: no line
    outbox.write(sidecar())
    [segment] = segments(hooks)
    assert hooks._writer.live() == (segment.stem, segment.stat().st_size)  # on disk
    assert outbox.folder_flush.flushes == 1  # the sidecar's flush carried the line
    # The ending stage queues the same end: on disk already, nothing more is written.
    hooks.enqueue(sidecar())
    assert journal_lines(hooks) == [([hook_key(settings.hooks[0])], "shot010")]
    # An end this daemon did not journal (one recovery files away) gets its own line.
    hooks.enqueue(sidecar("other"))
    assert [job for _, job in journal_lines(hooks)] == ["shot010", "other"]
    # One whose flush failed is not taken for on disk: queued, it is written and flushed.
    hooks.journal(sidecar("unflushed"))
    hooks.enqueue(sidecar("unflushed"))
    assert [job for _, job in journal_lines(hooks)][2:] == ["unflushed", "unflushed"]
    assert hooks._writer.live()[1] == segment.stat().st_size
    line = json.loads(segment.read_bytes().splitlines()[0])
    assert Sidecar.model_validate(line["sidecar"]) == sidecar()
    # A line break inside a value is escaped in JSON: a line holds one end whatever it says.
    said = sidecar("said").model_copy(update={"result": {"text": "a\nb\r\n  c\u2028"}})
    [delivery] = parse_line(journal_line(["0123456789abcdef"], said))  # type: ignore[misc]
    assert delivery.sidecar == said


def test_a_torn_last_line_and_a_line_that_is_no_delivery_are_skipped(
        tmp_path: Path, started: list[Hooks], webhook: Any) -> None:
    server = webhook()
    settings = make_settings(tmp_path, [{"url": server.url}])
    key = hook_key(settings.hooks[0])
    hooks = Hooks(settings, spool_root(settings))
    good = [journal_line([key], sidecar(f"job{n}")) for n in range(3)]
    bad_id = json.loads(good[0])
    bad_id["sidecar"]["id"] = "../escape"
    # What a crash mid-write, a full disk or another writer can leave in a segment: a
    # line that is not JSON, one naming a path as its job, a line of NULs (a power cut),
    # and a last line cut short.
    data = (good[0] + b"{not json\n" + json.dumps(bad_id).encode() + b"\n" + good[1]
            + b"\0" * 40 + b"\n" + good[2] + good[0][:50])
    segment = write_segment(hooks.journal_folder, f"{1:020d}", data)
    started.append(hooks)
    hooks.start()

    wait_for(lambda: sorted(b["id"] for b in server.accepted) == ["job0", "job1", "job2"],
             what="the whole lines' deliveries")
    wait_for(lambda: not segment.exists(), what="the segment, settled, removed")
    assert hooks._reader is not None and hooks._reader.torn == 1
    assert not (tmp_path / "escape.log").exists()
    assert hooks._thread is not None and hooks._thread.is_alive()


def test_a_restart_reads_on_from_the_cursor(
        tmp_path: Path, started: list[Hooks], webhook: Any) -> None:
    server = webhook()
    settings = make_settings(tmp_path, [{"url": server.url}])
    key = hook_key(settings.hooks[0])
    hooks = Hooks(settings, spool_root(settings))
    lines = [journal_line([key], sidecar(f"job{n}")) for n in range(4)]
    segment = write_segment(hooks.journal_folder, f"{1:020d}", b"".join(lines))
    # The last daemon settled the first two lines before it died.
    segment.with_suffix(".cursor").write_text(f"{len(lines[0]) + len(lines[1])}\n")
    started.append(hooks)
    hooks.start()

    wait_for(lambda: not segment.exists(), what="the rest delivered, the segment removed")
    assert sorted(b["id"] for b in server.accepted) == ["job2", "job3"]
    assert not segment.with_suffix(".cursor").exists()


def test_settled_lines_are_not_delivered_again_after_a_stop(
        tmp_path: Path, started: list[Hooks], webhook: Any) -> None:
    server = webhook()
    settings = make_settings(tmp_path, [{"url": server.url}])
    hooks = start(started, settings)
    for n in range(5):
        hooks.enqueue(sidecar(f"job{n}"))
    wait_for(lambda: all("delivered" in job_log(settings, f"job{n}") for n in range(5)),
             what="five deliveries")
    hooks.stop()
    assert settled(hooks)  # the stop wrote the cursor at the end of the settled lines

    again = start(started, settings)
    again.enqueue(sidecar("job5"))  # a new daemon writes a new segment
    wait_for(lambda: len(server.accepted) == 6, what="the new end's delivery")
    wait_for(lambda: len(segments(again)) == 1, what="the old segment removed")
    assert sorted(b["id"] for b in server.accepted) == [f"job{n}" for n in range(6)]


def test_a_line_for_a_hook_this_node_lacks_is_left_in_pending_for_one_that_has_it(
        tmp_path: Path, started: list[Hooks], webhook: Any) -> None:
    server = webhook()
    settings = make_settings(tmp_path, [{"url": server.url}])
    key = hook_key(settings.hooks[0])
    hooks = Hooks(settings, spool_root(settings))
    segment = write_segment(hooks.journal_folder, f"{1:020d}",
                            journal_line(["0123456789abcdef", key], sidecar()))
    started.append(hooks)
    hooks.start()

    wait_for(lambda: [b["id"] for b in server.accepted] == ["shot010"], what="ours")
    wait_for(lambda: not segment.exists(), what="the line settled")
    [name] = files_in(hooks.pending)
    assert name.split(".")[1] == "0123456789abcdef"
    assert Delivery.model_validate_json((hooks.pending / name).read_bytes()).sidecar == sidecar()


def test_a_dead_nodes_journal_is_taken_over_once_it_has_been_still_for_a_lease(
        tmp_path: Path, started: list[Hooks], webhook: Any) -> None:
    server = webhook()
    settings = make_settings(tmp_path, [{"url": server.url}])
    settings = settings.model_copy(update={"lease": 5.0})
    key = hook_key(settings.hooks[0])
    dead = spool_root(settings) / "hooks" / "journal" / "n2"
    lines = [journal_line([key], sidecar(f"old{n}")) for n in range(3)]
    old = write_segment(dead, f"{1:020d}", b"".join(lines))
    old.with_suffix(".cursor").write_text(f"{len(lines[0])}\n")  # its first was delivered
    os.utime(old, (time.time() - 60, time.time() - 60))
    fresh = write_segment(dead, f"{2:020d}", journal_line([key], sidecar("fresh")))
    hooks = start(started, settings)

    assert hooks.take_back("n2") == 1
    wait_for(lambda: sorted(b["id"] for b in server.accepted) == ["old1", "old2"],
             what="the dead node's deliveries")
    wait_for(lambda: files_in(hooks.journal_folder) == [], what="its segment, removed")
    # Written to within the lease: its node may only be held up; left where it is.
    assert files_in(dead) == [fresh.name]
    assert hooks.take_back("../n2") == 0


def test_a_line_the_disk_cut_short_is_never_appended_to(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(tmp_path, [{"url": "http://127.0.0.1:1/x"}])
    hooks = Hooks(settings, spool_root(settings))
    hooks.enqueue(sidecar("first"))
    real_write = os.write
    calls = {"n": 0}

    def full_disk(fd: int, data: bytes) -> int:  # half the line goes down, then ENOSPC
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, data[:len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError):
        hooks.enqueue(sidecar("torn"))
    monkeypatch.setattr(os, "write", real_write)
    hooks.enqueue(sidecar("after"))  # the ending stage tries again: a new segment

    first, second = segments(hooks)
    assert not first.read_bytes().endswith(b"\n")  # the torn half, last in its segment
    assert [json.loads(raw)["sidecar"]["id"] for raw in second.read_bytes().splitlines()] == [
        "after"]


def test_a_node_without_hooks_takes_no_journal_over(tmp_path: Path,
                                                    started: list[Hooks]) -> None:
    settings = make_settings(tmp_path, [])
    dead = spool_root(settings) / "hooks" / "journal" / "n2"
    old = write_segment(dead, f"{1:020d}", journal_line(["0123456789abcdef"], sidecar()))
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    hooks = start(started, settings)
    assert hooks.take_back("n2") == 0 and old.exists()
