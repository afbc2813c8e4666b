"""End to end: completion hooks and retention on the real daemon (SPEC §10). Webhooks go to a
local ``http.server`` on 127.0.0.1 that refuses until a test lets it accept."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.helpers import DaemonProcess, scripted, spool_files, wait_end, wait_for

QUICK = scripted(outcome="succeed", steps=0)


class Receiver:
    """Answers 503 until ``accepting``; keeps the body of every POST it accepted."""

    def __init__(self) -> None:
        self.accepting = False
        self.refused = 0
        self.accepted: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if receiver.accepting:
                    receiver.accepted.append(json.loads(body))
                    self.send_response(204)
                else:
                    receiver.refused += 1
                    self.send_response(503)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def test_a_command_hook_gets_the_sidecar_in_its_environment_and_on_stdin(
        start_daemon: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    told = tmp_path / "told"
    told.mkdir()
    script = tmp_path / "hook.py"
    script.write_text(
        "import json, os, sys\n"
        "env = {k: v for k, v in os.environ.items() if k.startswith('KINOD_')}\n"
        f"path = os.path.join({str(told)!r}, env['KINOD_JOB_ID'] + '.json')\n"
        "json.dump({'env': env, 'stdin': json.load(sys.stdin)}, open(path, 'w'))\n")
    daemon = start_daemon(hooks=[{"run": [sys.executable, str(script)], "on": ["succeeded"]}])
    daemon.drop("good.yaml", QUICK)
    daemon.drop("bad.yaml", scripted(outcome="fail", steps=0))
    assert wait_end(daemon, "good")["state"] == "succeeded"
    assert wait_end(daemon, "bad")["state"] == "failed"
    told_good = wait_for(lambda: (told / "good.json").exists() and
                         json.loads((told / "good.json").read_text()), what="the hook to run")
    assert told_good["env"]["KINOD_STATE"] == "succeeded"
    assert told_good["env"]["KINOD_TYPE"] == "scripted"
    assert told_good["env"]["KINOD_SIDECAR"] == str(daemon.outbox / "good.json")
    assert told_good["stdin"]["id"] == "good" and told_good["stdin"]["state"] == "succeeded"
    wait_for(lambda: "delivered" in (daemon.outbox / "good.log").read_text(),
             what="the delivery in the job's log")
    assert not (told / "bad.json").exists()  # filtered out by `on`


def test_a_webhook_is_retried_across_a_kill_and_delivered_once_accepted(
        start_daemon: Callable[..., DaemonProcess], receiver: Receiver) -> None:
    hooks = [{"url": receiver.url, "retries": 20, "backoff": 0.2}]
    daemon = start_daemon(hooks=hooks)
    daemon.drop("w.yaml", QUICK)
    assert wait_end(daemon, "w")["state"] == "succeeded"  # its end never waits for the hook
    wait_for(lambda: receiver.refused >= 2, what="two refused attempts")
    daemon.kill()  # kill -9, a delivery under way or waiting
    receiver.accepting = True
    daemon = start_daemon(log_name="second.log", hooks=hooks)
    wait_for(lambda: receiver.accepted, what="the delivery after the restart")
    assert [body["id"] for body in receiver.accepted] == ["w"]
    log = (daemon.outbox / "w.log").read_text()
    assert "failed" in log and "delivered" in log
    wait_for(lambda: not spool_files(daemon, "hooks", "pending"), what="pending/ to empty")
    assert len(receiver.accepted) == 1


def test_a_hook_that_hangs_is_killed_and_never_holds_up_the_farm(
        start_daemon: Callable[..., DaemonProcess]) -> None:
    hang = [sys.executable, "-c", "import time; time.sleep(120)"]
    daemon = start_daemon(hooks=[{"run": hang, "timeout": 1, "retries": 0}])
    daemon.drop("h1.yaml", QUICK)
    daemon.drop("h2.yaml", QUICK)
    assert wait_end(daemon, "h1")["state"] == wait_end(daemon, "h2")["state"] == "succeeded"
    wait_for(lambda: "giving up" in (daemon.outbox / "h1.log").read_text(), timeout_s=20,
             what="the hung hook to be killed and given up")
    assert spool_files(daemon, "hooks", "given_up")


def test_retention_prunes_old_ended_jobs_and_spares_held_and_depended_on_ones(
        start_daemon: Callable[..., DaemonProcess]) -> None:
    keep_days = 2 / 86400  # two seconds
    daemon = start_daemon(keep_ended_days=keep_days, keep_ended_frames=False)
    daemon.drop("old.yaml", QUICK)
    daemon.drop("base.yaml", QUICK)
    daemon.drop("held.yaml", {**QUICK, "hold": True})
    ended = wait_end(daemon, "old")
    wait_end(daemon, "base")
    daemon.wait_state("held", "held")
    daemon.drop("next.yaml", {**QUICK, "after": ["base"], "hold": True})  # wants base
    daemon.wait_state("next", "held")
    assert daemon.stop() == 0
    finished = datetime.fromisoformat(ended["finished_at"]).timestamp()
    wait_for(lambda: time.time() > finished + 2.5, what="the jobs to be old enough")

    daemon = start_daemon(log_name="second.log", keep_ended_days=keep_days,
                          keep_ended_frames=False)  # retention runs once at start
    wait_for(lambda: not (daemon.outbox / "old.json").exists(), what="old to be pruned")
    assert not (daemon.outbox / "old.log").exists()
    assert spool_files(daemon, "done", "old") == []
    assert not (daemon.frames / "old").exists()
    assert daemon.sidecar("held")["state"] == "held"
    assert daemon.sidecar("base")["state"] == "succeeded"  # a held job runs after it
    assert "old" in daemon.log()
