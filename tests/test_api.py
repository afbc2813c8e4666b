"""The HTTP API in-process, on a folder without a daemon: what it writes, what it refuses,
how it lists, streams and counts the sidecars it finds."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kinod.api.ids import IdAllocator
from kinod.api.server import ApiServer
from kinod.config import Settings, load_settings
from kinod.errors import ConfigError
from kinod.models import JobState, Sidecar
from kinod.nodes import NodeBoard
from kinod.outbox import Outbox
from kinod.spool import Spool
from tests.helpers import WORKING_PLUGINS, wait_for, write_config

TASKS = "/api/v1/generator/tasks"
T0 = datetime(2026, 11, 26, 1, 0, tzinfo=UTC)


def settings_for(root: Path, **extra: Any) -> Settings:
    extra.setdefault("http", {"listen": "127.0.0.1:0"})
    return load_settings(write_config(root, plugin_dirs=[str(WORKING_PLUGINS)], **extra))


@pytest.fixture
def start_api(kinod_root: Path) -> Iterator[Callable[..., httpx.Client]]:
    """An API on the test folder (settings as given), and a client of it; stopped after."""
    servers: list[ApiServer] = []
    clients: list[httpx.Client] = []

    def start(**extra: Any) -> httpx.Client:
        server = ApiServer(settings_for(kinod_root, **extra)).start()
        servers.append(server)
        clients.append(httpx.Client(base_url=server.url, timeout=10))
        return clients[-1]

    yield start
    for client in clients:
        client.close()
    for server in servers:
        server.stop()


@pytest.fixture
def api(start_api: Callable[..., httpx.Client]) -> httpx.Client:
    return start_api()


def sidecar(job_id: str, state: str = "succeeded", minutes: int = 0, job_type: str = "scripted",
            duration_s: float | None = 2.0) -> Sidecar:
    created = T0 + timedelta(minutes=minutes)
    ended = JobState(state).is_terminal
    started = created if state in ("running", "succeeded", "failed", "stopped") else None
    return Sidecar(id=job_id, type=job_type, state=JobState(state), created_at=created,
                   updated_at=created, started_at=started,
                   finished_at=created + timedelta(seconds=duration_s or 0) if ended else None)


def publish(outbox: Path, *sidecars: Sidecar) -> None:
    for one in sidecars:
        Outbox(outbox).write(one)


def inbox_names(root: Path) -> set[str]:
    return {name for name in os.listdir(root / "inbox") if name != ".kinod"}


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"code", "message", "fields"}
    return error


# --- creating tasks ------------------------------------------------------------------------


def test_created_tasks_get_integer_ids_and_are_held_unless_started(
        api: httpx.Client, kinod_root: Path) -> None:
    first = api.post(TASKS, json={"name": "Test", "type": "scripted", "data": {"steps": 1}})
    assert first.status_code == 201, first.text
    assert first.json()["id"] == "1" and first.json()["state"] == "held"
    assert first.headers["location"] == f"{TASKS}/1"
    second = api.post(TASKS, json={"type": "scripted", "start": True})
    assert (second.json()["id"], second.json()["state"]) == ("2", "queued")
    named = api.post(TASKS, json={"type": "scripted", "id": "shot010", "priority": 5})
    assert named.json()["id"] == "shot010"
    written = json.loads((kinod_root / "inbox" / "1.json").read_text())
    assert written == {"name": "Test", "type": "scripted", "data": {"steps": 1}, "hold": True}
    assert json.loads((kinod_root / "inbox" / "2.json").read_text())["hold"] is False
    assert json.loads((kinod_root / "inbox" / "shot010.json").read_text())["priority"] == 5
    assert inbox_names(kinod_root) == {"1.json", "2.json", "shot010.json"}


def test_an_id_in_use_is_refused_and_taken_ids_are_skipped(api: httpx.Client,
                                                            kinod_root: Path) -> None:
    publish(kinod_root / "outbox", sidecar("1", "running"), sidecar("2", "succeeded"))
    (kinod_root / "inbox" / "3.yaml").write_text("type: scripted\n")  # dropped by hand
    conflict = error_of(api.post(TASKS, json={"type": "scripted", "id": "1"}), 409)
    assert conflict["fields"] == {"id": "in use"}
    error_of(api.post(TASKS, json={"type": "scripted", "id": "3"}), 409)
    # an ended job's id may run again (a new run); a new id skips every id in use
    assert api.post(TASKS, json={"type": "scripted", "id": "2"}).status_code == 201
    assert api.post(TASKS, json={"type": "scripted"}).json()["id"] == "4"


def test_ids_are_unique_across_nodes_taking_them_at_once(kinod_root: Path) -> None:
    inbox, outbox = kinod_root / "inbox", kinod_root / "outbox"
    allocators = [IdAllocator(Spool(inbox, node), outbox) for node in ("a", "b", "c")]
    taken: list[str] = []
    lock = threading.Lock()

    def take(allocator: IdAllocator) -> None:
        for _ in range(100):
            job_id = allocator.allocate()
            with lock:
                taken.append(job_id)

    threads = [threading.Thread(target=take, args=(a,)) for a in allocators]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(map(int, taken)) == list(range(1, 301))
    # a new allocator (a restarted API) never hands one out again
    assert IdAllocator(Spool(inbox, "d"), outbox).allocate() == "301"


@pytest.mark.parametrize(("body", "fields"), [
    ({"type": "scripted", "colour": "red"}, {"colour": "unknown key"}),
    ({"type": "nope"}, {"type": "unknown plugin 'nope'"}),
    ({"type": "scripted", "data": {"steps": "20", "bogus": 1}},
     {"data.steps": "Input should be a valid integer", "data.bogus": "unknown key"}),
    ({"name": 5, "type": "scripted", "data": {"steps": "x"}},
     {"name": "Input should be a valid string", "data.steps": "valid integer"}),
    ({"type": "scripted", "id": "../etc"}, {"id": "String should match pattern"}),
    ({"type": "scripted", "start": True, "hold": True}, {"start": "hold", "hold": "start"}),
    ({"data": {}}, {"type": "required"}),
    ({"type": "scripted", "timeout": -1, "retries": 1000},
     {"timeout": "greater than 0", "retries": "less than or equal to 100"}),
])
def test_bad_tasks_are_refused_naming_every_bad_field(api: httpx.Client, kinod_root: Path,
                                                      body: dict, fields: dict) -> None:
    error = error_of(api.post(TASKS, json=body), 422)
    assert set(error["fields"]) == set(fields)
    for field, words in fields.items():
        assert words in error["fields"][field]
        assert field in error["message"]
    assert inbox_names(kinod_root) == set()


@pytest.mark.parametrize(("content", "status", "field"), [
    (b'{"type": "scripted",', 400, "body"),
    (b'{"type": "scripted", "data": {"steps": NaN}}', 422, "data"),
    (b'{"type": "scripted", "data": {"x": 1e999}}', 422, "data"),
    (b'[1, 2]', 422, "body"),
    (b'{"type": "scripted", "data": ' + b"[" * 100 + b"]" * 100 + b"}", 422, "data"),
    (b'{"type": "scripted", "data": {"script": ' + b"[" * 70 + b"]" * 70 + b"}}", 422, "body"),
    (b'{"type": "scripted", "data": {"n": 1' + b"0" * 5000 + b"}}", 400, None),
])
def test_broken_bodies_are_client_errors(api: httpx.Client, kinod_root: Path, content: bytes,
                                         status: int, field: str | None) -> None:
    response = api.post(TASKS, content=content, headers={"Content-Type": "application/json"})
    error = error_of(response, status)
    if field is not None:
        assert field in error["fields"], error
    assert inbox_names(kinod_root) == set()


def test_bodies_past_max_job_bytes_are_refused(start_api: Callable[..., httpx.Client],
                                               kinod_root: Path) -> None:
    api = start_api(max_job_bytes=1000)
    big = {"type": "scripted", "data": {}, "name": "x" * 2000}
    assert error_of(api.post(TASKS, json=big), 413)["code"] == "too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it comes
        yield b'{"type": "scripted", "name": "'
        for _ in range(20):
            yield b"x" * 100
        yield b'"}'

    chunked = api.post(TASKS, content=chunks(), headers={"Content-Type": "application/json"})
    assert error_of(chunked, 413)["code"] == "too_large"
    assert inbox_names(kinod_root) == set()


def test_unknown_routes_and_wrong_methods_answer_json(api: httpx.Client) -> None:
    assert error_of(api.get("/api/v1/nope"), 404)["code"] == "not_found"
    assert error_of(api.delete(f"{TASKS}/1"), 405)["code"] == "method_not_allowed"
    assert error_of(api.get(f"{TASKS}/a%01b"), 422)["fields"].keys() == {"id"}
    assert error_of(api.get(f"{TASKS}/.hidden"), 422)["fields"].keys() == {"id"}
    assert error_of(api.get(f"{TASKS}/%2e%2e%2fetc"), 404)["code"] == "not_found"


# --- asking a task something ---------------------------------------------------------------


def test_controls_drop_files_only_where_they_mean_something(api: httpx.Client,
                                                            kinod_root: Path) -> None:
    inbox = kinod_root / "inbox"
    publish(kinod_root / "outbox", sidecar("h", "held"), sidecar("q", "queued"),
            sidecar("r", "running"), sidecar("done", "succeeded"))
    assert api.post(f"{TASKS}/h/generate").status_code == 202
    assert (inbox / "h.release").exists()
    assert api.post(f"{TASKS}/q/hold").json() == {"id": "q", "action": "hold", "state": "queued"}
    assert (inbox / "q.hold").exists()
    assert api.post(f"{TASKS}/r/stop").status_code == 202
    assert (inbox / "r.stop").exists()
    error_of(api.post(f"{TASKS}/r/hold"), 409)
    for action in ("generate", "stop", "hold"):
        error_of(api.post(f"{TASKS}/done/{action}"), 409)
        error_of(api.post(f"{TASKS}/ghost/{action}"), 404)
    # a held job released twice, a queued one released: nothing more to drop
    assert api.post(f"{TASKS}/q/generate").status_code == 202
    assert inbox_names(kinod_root) == {"h.release", "q.hold", "r.stop"}
    # a task still waiting in the inbox, not yet taken in: its control file waits with it
    created = api.post(TASKS, json={"type": "scripted"}).json()["id"]
    assert api.post(f"{TASKS}/{created}/generate").json()["state"] is None
    assert (inbox / f"{created}.release").exists()


def test_one_task_its_log_and_its_outputs(api: httpx.Client, kinod_root: Path) -> None:
    publish(kinod_root / "outbox", sidecar("j1"))
    assert api.get(f"{TASKS}/j1").json()["state"] == "succeeded"
    error_of(api.get(f"{TASKS}/j2"), 404)
    error_of(api.get(f"{TASKS}/j1/log"), 404)
    (kinod_root / "outbox" / "j1.log").write_text("started\nended\n")
    log = api.get(f"{TASKS}/j1/log")
    assert log.text == "started\nended\n" and log.headers["content-type"].startswith("text/plain")
    frames = kinod_root / "data" / "frames"
    (frames / "j1" / "sub").mkdir(parents=True)
    (frames / "j1" / "a.png").write_bytes(b"png")
    (frames / "j1" / "sub" / "b.txt").write_text("b")
    (frames / "secret.txt").write_text("not yours")
    (frames / "j1" / "escape").symlink_to(frames / "secret.txt")
    (frames / "j1" / "away").symlink_to(frames, target_is_directory=True)
    listed = api.get(f"{TASKS}/j1/outputs").json()
    assert [(f["path"], f["size"]) for f in listed] == [("a.png", 3), ("sub/b.txt", 1)]
    assert api.get(f"{TASKS}/j1/outputs/sub/b.txt").content == b"b"
    assert api.get(f"{TASKS}/j1/outputs").status_code == 200
    for path in ("escape", "away/secret.txt", "%2e%2e/secret.txt", "sub/%2e%2e/%2e%2e/secret.txt",
                 "..%2fsecret.txt", "sub//b.txt", "%00"):
        response = api.get(f"{TASKS}/j1/outputs/{path}")
        assert response.status_code in (400, 404), (path, response.text)
        assert b"not yours" not in response.content
    error_of(api.get(f"{TASKS}/nope/outputs"), 404)


# --- listing, following, counting ----------------------------------------------------------


def test_listing_is_newest_first_paged_and_filtered(api: httpx.Client, kinod_root: Path) -> None:
    states = ["succeeded", "failed", "queued", "running", "held"]
    publish(kinod_root / "outbox", *(
        sidecar(f"j{n:02d}", states[n % 5], minutes=n, job_type="example" if n % 2 else "sdxl")
        for n in range(25)))
    wait_for(lambda: len(api.get(TASKS, params={"limit": 1000}).json()["tasks"]) == 25,
             what="the index to hold every sidecar")
    seen, cursor = [], None
    while True:
        page = api.get(TASKS, params={"limit": 10, **({"cursor": cursor} if cursor else {})})
        body = page.json()
        seen += [task["id"] for task in body["tasks"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"j{n:02d}" for n in reversed(range(25))]
    failed = api.get(TASKS, params={"state": "failed", "type": "example"}).json()["tasks"]
    assert [t["id"] for t in failed] == ["j21", "j11", "j01"]
    two = api.get(TASKS, params=[("state", "held"), ("state", "queued"), ("limit", 3)]).json()
    assert [t["id"] for t in two["tasks"]] == ["j24", "j22", "j19"]
    assert two["next_cursor"] is not None
    assert error_of(api.get(TASKS, params={"cursor": "nonsense"}), 400)["fields"] == {
        "cursor": "not a cursor this API gave"}
    assert "limit" in error_of(api.get(TASKS, params={"limit": 0}), 422)["fields"]


def test_the_index_follows_the_outbox(api: httpx.Client, kinod_root: Path) -> None:
    outbox = kinod_root / "outbox"

    def ids() -> list[str]:
        return [t["id"] for t in api.get(TASKS).json()["tasks"]]

    publish(outbox, sidecar("a", "queued"))
    wait_for(lambda: ids() == ["a"], what="a new sidecar to be listed")
    publish(outbox, sidecar("a", "running"))
    wait_for(lambda: api.get(TASKS, params={"state": "running"}).json()["tasks"],
             what="a changed sidecar to be listed")
    (outbox / "junk.json").write_text("{not a sidecar")
    (outbox / "a.json").unlink()  # gone: noticed at the next rescan
    wait_for(lambda: ids() == [], timeout_s=10, what="a deleted sidecar to leave the list")


def read_events(lines: Iterator[str], want: int) -> list[dict[str, Any]]:
    """The data of the next ``want`` task events of an open stream's lines."""
    found, event = [], None
    for line in lines:
        if line.startswith("event:"):
            event = line.partition(":")[2].strip()
        elif line.startswith("data:") and event == "task":
            found.append(json.loads(line.partition(":")[2]))
            if len(found) == want:
                return found
    raise AssertionError(f"the stream ended after {found}")


def test_events_stream_every_sidecar_change(api: httpx.Client, kinod_root: Path) -> None:
    outbox = kinod_root / "outbox"
    with api.stream("GET", "/api/v1/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        assert next(lines) == "retry: 2000"  # sent once the stream is subscribed
        seen = []
        for state in ("held", "queued", "running", "succeeded"):
            publish(outbox, sidecar("e1", state))
            seen += read_events(lines, 1)
        assert [(e["id"], e["state"]) for e in seen] == [
            ("e1", "held"), ("e1", "queued"), ("e1", "running"), ("e1", "succeeded")]
        assert seen[-1]["schema"] == "kinod.sidecar/1"


def test_metrics_count_jobs_durations_and_heartbeats(api: httpx.Client, kinod_root: Path) -> None:
    publish(kinod_root / "outbox", sidecar("s1", duration_s=2.0), sidecar("s2", duration_s=20.0),
            sidecar("q1", "queued"), sidecar("r1", "running", job_type="example"),
            sidecar("h1", "held"))
    NodeBoard(kinod_root / "inbox" / ".kinod" / "nodes", "n1", 60).beat(["scripted"], 2, 1, 1)
    wait_for(lambda: b"kinod_jobs_held 1.0" in api.get("/metrics").content,
             what="the metrics to count every sidecar")
    families = {f.name: f for f in text_string_to_metric_families(api.get("/metrics").text)}
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for family in families.values() for s in family.samples}
    assert values[("kinod_jobs", (("state", "succeeded"), ("type", "scripted")))] == 2
    assert values[("kinod_jobs", (("state", "running"), ("type", "example")))] == 1
    assert values[("kinod_queue_depth", ())] == 1
    assert values[("kinod_jobs_running", ())] == 1
    duration = (("state", "succeeded"), ("type", "scripted"))
    assert values[("kinod_job_duration_seconds_count", duration)] == 2
    assert values[("kinod_job_duration_seconds_sum", duration)] == 22.0
    assert values[("kinod_job_duration_seconds_bucket", (("le", "5.0"), *duration))] == 1
    assert 0 <= values[("kinod_node_heartbeat_age_seconds", (("node", "n1"),))] < 60
    assert values[("kinod_farm_paused", ())] == 0


def test_nodes_and_pauses(api: httpx.Client, kinod_root: Path) -> None:
    NodeBoard(kinod_root / "inbox" / ".kinod" / "nodes", "n1", 60).beat(["scripted"], 2, 0, 0)
    (kinod_root / "inbox" / ".pause.n1").touch()
    body = api.get("/api/v1/nodes").json()
    assert body["paused"] is False
    assert [(n["node"], n["paused"], n["serves"]) for n in body["nodes"]] == [
        ("n1", True, ["scripted"])]


# --- who may ask ---------------------------------------------------------------------------


def test_a_token_guards_everything_but_healthz(start_api: Callable[..., httpx.Client],
                                               kinod_root: Path) -> None:
    (kinod_root / "token").write_text("s3cret\n")
    api = start_api(http={"listen": "127.0.0.1:0", "token_file": "token"})
    for path in (TASKS, "/metrics", "/docs", "/openapi.json", "/api/v1/events", "/nope"):
        response = api.get(path)
        assert error_of(response, 401)["code"] == "unauthorized", path
        assert response.headers["www-authenticate"] == "Bearer"
    for header in ("Bearer wrong", "Basic s3cret", "s3cret", "Bearer", "Bearer s3cret2"):
        error_of(api.get(TASKS, headers={"Authorization": header}), 401)
    assert api.get("/healthz").json() == {"status": "ok"}
    good = {"Authorization": "Bearer s3cret"}
    assert api.get(TASKS, headers=good).status_code == 200
    assert api.post(TASKS, json={"type": "scripted"}).status_code == 401
    assert api.post(TASKS, json={"type": "scripted"}, headers=good).status_code == 201
    schema = api.get("/openapi.json", headers=good).json()
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_without_a_token_only_loopback_and_no_other_site(api: httpx.Client) -> None:
    assert error_of(api.get(TASKS, headers={"Host": "evil.example:8000"}), 403)
    cross_site = api.post(f"{TASKS}/1/stop", headers={"Origin": "https://evil.example"})
    assert error_of(cross_site, 403)["code"] == "forbidden"
    assert api.get(TASKS, headers={"Origin": "http://localhost:8000"}).status_code == 200
    assert api.get(TASKS, headers={"Host": "localhost:8000"}).status_code == 200


@pytest.mark.parametrize(("http", "token", "key"), [
    ({"listen": "0.0.0.0:8000"}, None, "http.listen"),
    ({"listen": "192.0.2.1:8000"}, None, "http.listen"),
    ({"listen": "farm.example:8000"}, None, "http.listen"),
    ({"listen": "127.0.0.1:80000"}, None, "http.listen"),
    ({"listen": "8000"}, None, "http.listen"),
    ({"listen": "127.0.0.1:0", "token_file": "missing"}, None, "http.token_file"),
    ({"listen": "0.0.0.0:0", "token_file": "token"}, "", "http.token_file"),
])
def test_refused_at_start_naming_the_key(kinod_root: Path, http: dict, token: str | None,
                                         key: str) -> None:
    if token is not None:
        (kinod_root / "token").write_text(token)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        ApiServer(settings_for(kinod_root, http=http))


def test_stops_within_a_second_or_two_with_a_stream_open(kinod_root: Path) -> None:
    server = ApiServer(settings_for(kinod_root)).start()
    with httpx.Client(base_url=server.url, timeout=10) as client, \
            client.stream("GET", "/api/v1/events") as response:
        lines = response.iter_lines()
        assert next(lines) == "retry: 2000"
        began = time.monotonic()
        server.stop()
        assert time.monotonic() - began < 2.5
        assert list(lines) == [""]  # the stream ended, cleanly
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/healthz", timeout=2)


def test_docs_are_served_from_this_api_with_nothing_loaded_from_elsewhere(
        api: httpx.Client) -> None:
    page = api.get("/docs")
    assert page.status_code == 200
    loaded = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert loaded and all(url.startswith("/ui/swagger/") for url in loaded), loaded
    assert "cdn" not in page.text
    for asset in ("/ui/swagger/swagger-ui-bundle.js", "/ui/swagger/swagger-ui.css"):
        answer = api.get(asset)
        assert answer.status_code == 200 and len(answer.content) > 1000, asset
    assert api.get("/ui/swagger/package.json").status_code == 404


def test_a_task_being_taken_in_can_be_released_before_its_sidecar_exists(
        api: httpx.Client, kinod_root: Path) -> None:
    # A daemon has moved the file into the spool and not yet written its held sidecar:
    # neither the inbox nor the outbox shows it, and the API must not answer 404.
    created = api.post(TASKS, json={"type": "example", "data": {"prompt": "p"}})
    task_id = created.json()["id"]
    spool = Spool(kinod_root / "inbox", "somenode")
    spool.ensure_folders()
    spool.accept(kinod_root / "inbox" / f"{task_id}.json")
    (kinod_root / "outbox" / f"{task_id}.json").unlink(missing_ok=True)
    assert api.post(f"{TASKS}/{task_id}/generate").status_code == 202
    assert (kinod_root / "inbox" / f"{task_id}.release").exists()
    assert api.post(f"{TASKS}/nosuchtask/generate").status_code == 404
