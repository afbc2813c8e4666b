"""The endpoints the dashboard adds to the HTTP API, without a browser: the page and its
files, the compact listing, run again, bulk actions, pausing, thumbnails and event tickets."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from PIL import Image

from kinod.api.dashboard_tickets import TICKET_TTL_S, Tickets
from kinod.models import SidecarError
from tests.helpers import Clock
from tests.test_api import T0, TASKS, error_of, publish, sidecar, start_api  # noqa: F401

JOBS = "/api/v1/dashboard/jobs"
ACTIONS = "/api/v1/dashboard/actions"


@pytest.fixture
def api(start_api: Callable[..., httpx.Client]) -> httpx.Client:  # noqa: F811
    return start_api()


def png(path: Path, size: tuple[int, int] = (640, 480), colour: tuple[int, int, int] = (200, 80, 30)
        ) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


# --- the page ------------------------------------------------------------------------------


def test_the_page_and_its_files_allow_nothing_from_elsewhere(api: httpx.Client) -> None:
    page = api.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        asset = api.get(f"/ui/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
        assert asset.headers["x-content-type-options"] == "nosniff"
    for name in ("index.html", "../app.py", "nope.js", "%2e%2e%2fdashboard.py"):
        assert api.get(f"/ui/{name}").status_code == 404, name
    # No address of another site anywhere in what the page loads.
    static = Path(__file__).parent.parent / "kinod" / "api" / "static"
    for path in static.iterdir():
        if path.suffix in (".html", ".js", ".css"):
            text = path.read_text()
            assert "http://" not in text and "https://" not in text and "//cdn" not in text
    # Text goes into the page as text: nothing in the script parses a string as markup.
    script = (static / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink


# --- every job, compactly ------------------------------------------------------------------


def test_the_compact_listing_has_every_job_and_follows_changes(api: httpx.Client,
                                                               kinod_root: Path) -> None:
    failed = sidecar("2", "failed", minutes=1).model_copy(update={
        "name": "<b>bold</b>", "message": "m" * 400,
        "error": SidecarError(code="plugin_error", message="it broke")})
    publish(kinod_root / "outbox", sidecar("1", "running", minutes=0), failed)
    body = api.get(JOBS).json()
    rows = [dict(zip(body["columns"], row, strict=True)) for row in body["rows"]]
    assert [row["id"] for row in rows] == ["1", "2"]  # oldest first
    assert rows[1]["name"] == "<b>bold</b>" and rows[1]["error"] == "it broke"
    assert len(rows[1]["message"]) == 300 and rows[1]["message"].endswith("…")
    assert rows[0]["created"] == T0.timestamp() * 1000 and rows[0]["finished"] is None
    newest = api.get(JOBS, params={"newest": 1}).json()  # a first paint's part
    assert [row[0] for row in newest["rows"]] == ["2"] and newest["total"] == 2
    assert body["total"] == 2
    publish(kinod_root / "outbox", sidecar("1", "succeeded"))

    def state_of_1() -> str:
        body = api.get(JOBS).json()
        return body["rows"][0][body["columns"].index("state")]

    deadline = time.monotonic() + 10
    while state_of_1() != "succeeded":
        assert time.monotonic() < deadline, "the listing never saw the change"
        time.sleep(0.02)


# --- run again, bulk actions, pausing ------------------------------------------------------


def test_run_again_resubmits_an_ended_task_under_its_id(api: httpx.Client,
                                                        kinod_root: Path) -> None:
    task = {"name": "again", "type": "scripted", "data": {"steps": 2}, "hold": True,
            "priority": 3}
    ended = sidecar("7", "failed").model_copy(update={"task": task})
    publish(kinod_root / "outbox", ended, sidecar("8", "running"),
            sidecar("9", "succeeded").model_copy(update={"task": {"type": "nope"}}))
    created = api.post(f"{TASKS}/7/rerun")
    assert created.status_code == 201, created.text
    assert created.json()["state"] == "queued" and created.json()["task"]["hold"] is False
    written = (kinod_root / "inbox" / "7.json").read_text()
    assert '"priority": 3' in written and '"steps": 2' in written
    assert error_of(api.post(f"{TASKS}/7/rerun"), 409)  # waiting in the inbox now
    assert error_of(api.post(f"{TASKS}/8/rerun"), 409)["message"].startswith("job 8 is running")
    assert error_of(api.post(f"{TASKS}/nope/rerun"), 404)
    assert "type" in error_of(api.post(f"{TASKS}/9/rerun"), 422)["fields"]


def test_bulk_actions_answer_each_job(api: httpx.Client, kinod_root: Path) -> None:
    publish(kinod_root / "outbox", sidecar("1", "queued"), sidecar("2", "held"),
            sidecar("3", "succeeded"))
    result = api.post(ACTIONS, json={"action": "stop", "ids": ["1", "2", "3", "1", "4"]})
    assert result.status_code == 200, result.text
    outcomes = {r["id"]: (r["ok"], r["status"]) for r in result.json()["results"]}
    assert outcomes == {"1": (True, 202), "2": (True, 202), "3": (False, 409), "4": (False, 404)}
    assert result.json()["done"] == 2 and result.json()["failed"] == 2
    assert {"1.stop", "2.stop"} <= set(os.listdir(kinod_root / "inbox"))
    for bad in ({"action": "delete", "ids": ["1"]}, {"action": "stop", "ids": []},
                {"action": "stop", "ids": ["../x"]}):
        assert error_of(api.post(ACTIONS, json=bad), 422)["fields"]


def test_pause_and_resume_the_farm_or_a_node(api: httpx.Client, kinod_root: Path) -> None:
    inbox = kinod_root / "inbox"
    assert api.post("/api/v1/farm/pause").json() == {"node": None, "paused": True}
    assert (inbox / ".pause").exists() and api.get("/api/v1/nodes").json()["paused"] is True
    assert api.post("/api/v1/farm/resume").json()["paused"] is False
    assert not (inbox / ".pause").exists()
    assert api.post("/api/v1/nodes/gpu-1/pause").json() == {"node": "gpu-1", "paused": True}
    assert (inbox / ".pause.gpu-1").exists()
    assert api.post("/api/v1/nodes/gpu-1/resume").status_code == 200
    assert not (inbox / ".pause.gpu-1").exists()
    for bad in (".hidden", "..", "a%2Fb", "%C2%85", "%E2%80%A8", "%F0%9F%90%91" * 80):
        assert api.post(f"/api/v1/nodes/{bad}/pause").status_code in (404, 422), bad
    assert not [name for name in os.listdir(inbox) if name.startswith(".pause")]


# --- thumbnails ----------------------------------------------------------------------------


def test_thumbnails_are_small_cached_beside_the_frames_and_made_again(
        api: httpx.Client, kinod_root: Path) -> None:
    frames = kinod_root / "data" / "frames"
    publish(kinod_root / "outbox", sidecar("5"))
    image = png(frames / "5" / "out" / "frame 1.png")
    url = f"{TASKS}/5/thumbnails/out/frame%201.png"
    first = api.get(url, params={"size": 100})
    assert first.status_code == 200 and first.headers["content-type"] == "image/webp"
    with Image.open(io.BytesIO(first.content)) as thumb:
        assert thumb.size == (128, 96)  # 100 rounds up to 128
    cached = list((frames / ".thumbnails" / "5").iterdir())
    assert len(cached) == 1 and cached[0].stat().st_mtime_ns == image.stat().st_mtime_ns
    again = api.get(url, params={"size": 100}, headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304
    png(image, size=(200, 400), colour=(0, 0, 255))  # the image changes
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    changed = api.get(url, params={"size": 100})
    with Image.open(io.BytesIO(changed.content)) as thumb:
        assert thumb.size == (64, 128)
    assert changed.headers["etag"] != first.headers["etag"]


def test_thumbnails_only_of_images_inside_the_jobs_frames(api: httpx.Client,
                                                           kinod_root: Path) -> None:
    frames = kinod_root / "data" / "frames"
    outside = png(kinod_root / "secret.png")
    png(frames / "6" / "ok.png")
    (frames / "6" / "link.png").symlink_to(outside)
    (frames / "6" / "notes.txt").write_text("hello")
    (frames / "6" / "broken.png").write_bytes(b"not an image")
    base = f"{TASKS}/6/thumbnails"
    assert api.get(f"{base}/ok.png").status_code == 200
    assert error_of(api.get(f"{base}/link.png"), 404)
    assert error_of(api.get(f"{base}/notes.txt"), 404)
    assert error_of(api.get(f"{base}/broken.png"), 422)["code"] == "invalid"
    assert error_of(api.get(f"{base}/..%2F..%2Fsecret.png"), 400)
    assert api.get(f"{TASKS}/..%2Fsecret/thumbnails/x.png").status_code in (404, 422)
    assert error_of(api.get(f"{base}/ok.png", params={"size": 5000}), 422)
    assert not (frames / ".thumbnails" / "6" / "link.png").exists()


# --- the token and the event tickets -------------------------------------------------------


def test_with_a_token_the_page_is_open_and_a_ticket_opens_the_events_only(
        start_api: Callable[..., httpx.Client], kinod_root: Path) -> None:  # noqa: F811
    (kinod_root / "token").write_text("s3cret\n")
    api = start_api(http={"listen": "127.0.0.1:0", "token_file": "token"})
    assert api.get("/").status_code == 200 and api.get("/ui/app.js").status_code == 200
    for sneaky in ("/ui/%2e%2e/api/v1/dashboard/jobs", "/ui/..%2Fapi%2Fv1%2Fdashboard%2Fjobs",
                   "/ui//api/v1/dashboard/jobs"):
        assert api.get(sneaky).status_code == 404, sneaky  # the open prefix opens no route
    for path in (JOBS, "/api/v1/events"):
        error_of(api.get(path), 401)
    error_of(api.post("/api/v1/events/ticket"), 401)
    good = {"Authorization": "Bearer s3cret"}
    ticket = api.post("/api/v1/events/ticket", headers=good).json()
    assert ticket["expires_in_s"] == TICKET_TTL_S
    with api.stream("GET", "/api/v1/events", params={"ticket": ticket["ticket"]}) as stream:
        assert stream.status_code == 200
        assert next(stream.iter_lines()) == "retry: 2000"
    forged = ticket["ticket"][:-1] + ("0" if ticket["ticket"][-1] != "0" else "1")
    for params in ({"ticket": forged}, {"ticket": ""}, {"ticket": "9999999999.x"},
                   {"ticket": [ticket["ticket"], ticket["ticket"]]}):
        error_of(api.get("/api/v1/events", params=params), 401)
    # The ticket opens nothing else.
    for path in (JOBS, TASKS, "/metrics", "/api/v1/events/"):
        error_of(api.get(path, params={"ticket": ticket["ticket"]}), 401)
    error_of(api.post("/api/v1/farm/pause", params={"ticket": ticket["ticket"]}), 401)
    assert not (kinod_root / "inbox" / ".pause").exists()


def test_tickets_run_out() -> None:
    clock = Clock()
    tickets = Tickets(clock)
    ticket = tickets.issue()
    assert tickets.valid(ticket)
    clock.now += TICKET_TTL_S
    assert tickets.valid(ticket)
    clock.now += 1
    assert not tickets.valid(ticket)
    assert not Tickets(clock).valid(Tickets(clock).issue().replace(".", ".0", 1))
    assert not tickets.opens("POST", "/api/v1/events", f"ticket={tickets.issue()}".encode())
    assert tickets.opens("GET", "/api/v1/events", f"ticket={tickets.issue()}".encode())

