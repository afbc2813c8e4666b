"""The dashboard in a real browser: Debian's headless Chromium, driven by Playwright, against
the real daemon (``kinod run``) and the API in this process.

Without chromium these tests are skipped, unless CI is set: then they fail. Screenshots of
the main views are saved under pytest's temporary folder (``dashboard-screenshots*``)."""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from kinod.api.server import ApiServer
from kinod.config import load_settings
from kinod.models import JobState, Sidecar
from kinod.outbox import Outbox
from tests.helpers import WORKING_PLUGINS, DaemonProcess, runs_log, scripted, write_config

CHROMIUM = shutil.which("chromium")
TIMEOUT_MS = 15_000
expect.set_options(timeout=TIMEOUT_MS)

# A plugin that paints one PNG frame, as an image plugin would.
PAINTER = '''\
import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from base_plugin import BasePlugin, PluginResult  # noqa: E402
from PIL import Image  # noqa: E402


class PainterPlugin(BasePlugin):
    async def generate(self, task_id, data, progress_callback=None):
        path = os.path.join(str(self.output_dir), "frame_0001.png")
        Image.new("RGB", (data["width"], data["height"]), (30, 120, 200)).save(path)
        self.update_progress(50.0, progress_callback)
        while data["gate"] and not os.path.exists(data["gate"]):  # a render going on
            await asyncio.sleep(0.05)
            self.update_progress(50.0, progress_callback)
        self.update_progress(100.0, progress_callback)
        return PluginResult(success=True, data={"images": [path]})

    async def stop(self):
        self.should_stop = True

    @classmethod
    def get_plugin_info(cls):
        return {"name": "painter", "version": "1.0", "description": "paints one frame",
                "parameters": {"width": {"type": "integer", "default": 320, "minimum": 1},
                               "height": {"type": "integer", "default": 200, "minimum": 1},
                               "gate": {"type": "string", "default": ""}}}
'''


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if CHROMIUM is None:
        reason = "the dashboard tests need Debian's chromium (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dashboard-screenshots")


@pytest.fixture
def open_page(browser: Browser) -> Iterator[Callable[..., Page]]:
    """A fresh browser context per page. Every request it makes is recorded; one for any
    host but 127.0.0.1 is refused, and fails the test; so does a script error."""
    contexts, requests, errors = [], [], []

    def allow_loopback_only(route: Any) -> None:
        url = route.request.url
        requests.append(url)
        if urlsplit(url).hostname == "127.0.0.1":
            route.continue_()
        else:
            route.abort()

    def start(url: str, width: int = 1400, height: int = 900) -> Page:
        context = browser.new_context(viewport={"width": width, "height": height})
        context.set_default_timeout(TIMEOUT_MS)
        context.route("**/*", allow_loopback_only)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(url)
        return page

    yield start
    for context in contexts:
        context.close()
    assert not errors, errors
    elsewhere = [url for url in requests if urlsplit(url).hostname != "127.0.0.1"]
    assert requests and not elsewhere, elsewhere


@pytest.fixture
def serve_api() -> Iterator[Callable[[Path], str]]:
    servers: list[ApiServer] = []

    def start(config: Path, **http: Any) -> str:
        settings = load_settings(config, overrides={
            "http": {"listen": "127.0.0.1:0", **http}})
        servers.append(ApiServer(settings).start())
        return servers[-1].url or ""

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def farm(start_daemon: Callable[..., DaemonProcess], serve_api: Callable[..., str],
         kinod_root: Path) -> tuple[DaemonProcess, str]:
    """The real daemon with the scripted and painter plugins, and the API beside it."""
    painter = kinod_root / "plugins" / "painter"
    painter.mkdir(parents=True)
    (painter / "__init__.py").write_text("")
    (painter / "loader.py").write_text(PAINTER)
    daemon = start_daemon(plugin_dirs=[str(WORKING_PLUGINS), str(painter.parent)],
                          workers=2)
    return daemon, serve_api(daemon.config)


def shoot(page: Page, path: Path) -> None:
    # Written here: Playwright would write it from a thread of its own, which outlives the test.
    path.write_bytes(page.screenshot())


def row(page: Page, job_id: str) -> Any:
    return page.locator(f'[data-job-id="{job_id}"]')


def state_of(page: Page, job_id: str) -> Any:
    return row(page, job_id).locator(".c-state")


# --- live, from the real daemon ------------------------------------------------------------


def test_a_dropped_job_appears_live_and_its_progress_moves(
        farm: tuple[DaemonProcess, str], open_page: Callable[..., Page], shots: Path) -> None:
    daemon, url = farm
    page = open_page(url + "/")
    expect(page.locator("#live")).to_have_text("live")
    page.evaluate("window.notReloaded = true")
    started = time.monotonic()
    daemon.drop("walk.json", {"name": "a walk", **scripted(steps=30, step_s=0.1)})
    expect(row(page, "walk")).to_be_visible()
    appeared_s = time.monotonic() - started
    assert appeared_s < 1.0, f"the row took {appeared_s:.2f} s"  # typically 0.05 s
    expect(row(page, "walk").locator(".c-name")).to_have_text("a walk")
    seen: list[float] = []

    def progress_value() -> float:
        return float(row(page, "walk").locator("progress").get_attribute("value") or 0)

    deadline = time.monotonic() + 20
    while len(set(seen)) < 3 and time.monotonic() < deadline:
        value = progress_value()
        if not seen or value != seen[-1]:
            seen.append(value)
        page.wait_for_timeout(50)  # the browser's clock: it keeps the page running
    assert len(set(seen)) >= 3 and seen == sorted(seen), seen
    expect(state_of(page, "walk")).to_have_text("succeeded", timeout=30_000)
    expect(row(page, "walk").locator("progress")).to_have_attribute("value", "100")
    assert page.evaluate("window.notReloaded") is True
    expect(page.locator("#counts")).to_contain_text("succeeded 1")
    shoot(page, shots / "jobs.png")


def test_stop_hold_release_and_run_again(farm: tuple[DaemonProcess, str],
                                         open_page: Callable[..., Page],
                                         kinod_root: Path) -> None:
    daemon, url = farm
    page = open_page(url + "/")
    gate = kinod_root / "never"
    daemon.drop("long.json", scripted(steps=1, gate=str(gate)))
    expect(state_of(page, "long")).to_have_text("running")
    # By keyboard: the job's link opens its view, whose log is followed while it runs.
    row(page, "long").get_by_role("link", name="long").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#job-log-follow")).to_have_text("(following)")
    expect(page.locator("#job-log")).to_contain_text("scripted run 1 of long starting")
    page.locator("#job-actions").get_by_role("button", name="Stop").click()
    expect(state_of(page, "long")).to_have_text("stopped")
    expect(page.locator("#notice")).to_contain_text("Job long: stop asked")
    expect(page.locator("#job-facts")).to_contain_text("stopped")
    expect(page.locator("#job-log-follow")).to_have_text("")
    page.keyboard.press("Escape")
    expect(page.locator("#job")).to_be_hidden()

    # Pause the farm from the page, so a dropped job waits queued.
    page.get_by_role("button", name="Pause farm").click()
    expect(page.locator("#farm-state")).to_have_text("farm paused")
    assert (daemon.inbox / ".pause").exists()
    daemon.drop("later.json", scripted(steps=1))
    expect(state_of(page, "later")).to_have_text("queued")
    row(page, "later").get_by_role("button", name="Hold").click()
    expect(state_of(page, "later")).to_have_text("held")
    row(page, "later").get_by_role("button", name="Release").click()
    expect(state_of(page, "later")).to_have_text("queued")
    page.get_by_role("button", name="Resume farm").click()
    expect(state_of(page, "later")).to_have_text("succeeded")

    # Run again: the same task, a new run of the same id.
    row(page, "later").get_by_role("button", name="Run again").click()
    expect(page.locator("#notice")).to_contain_text("Job later: running again")
    deadline = time.monotonic() + 30
    while len([line for line in runs_log(daemon.frames, "later") if line.startswith("end")]
              ) < 2:  # the second run's sidecar was written before it started
        assert time.monotonic() < deadline, runs_log(daemon.frames, "later")
        page.wait_for_timeout(50)
    daemon.wait_state("later", "succeeded")
    expect(state_of(page, "later")).to_have_text("succeeded")
    # An action the job's state refuses says why (a row's button for it is disabled).
    row(page, "later").get_by_role("checkbox").check()
    page.get_by_role("button", name="Stop selected").click()
    page.get_by_role("button", name="Confirm").click()
    expect(page.locator("#notice .error")).to_have_text(
        "Stop: 0 done, 1 refused (later: job later has ended (succeeded)).")


def test_bulk_actions_ask_first(farm: tuple[DaemonProcess, str],
                                open_page: Callable[..., Page]) -> None:
    daemon, url = farm
    page = open_page(url + "/")
    for name in ("b1", "b2", "b3"):
        daemon.drop(f"{name}.json", {"hold": True, **scripted(steps=1)})
    for name in ("b1", "b2", "b3"):
        expect(state_of(page, name)).to_have_text("held")
    for name in ("b1", "b2"):
        row(page, name).get_by_role("checkbox").check()
    expect(page.locator("#bulk-count")).to_have_text("2 selected")
    page.get_by_role("button", name="Stop selected").click()
    expect(page.locator("#confirm-text")).to_have_text("Stop: 2 jobs?")
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator("#confirm")).not_to_be_visible()
    assert not (daemon.inbox / "b1.stop").exists()
    page.get_by_role("button", name="Stop selected").click()
    page.get_by_role("button", name="Confirm").click()
    expect(page.locator("#notice")).to_contain_text("Stop: 2 done")
    for name in ("b1", "b2"):
        expect(state_of(page, name)).to_have_text("stopped")
    expect(state_of(page, "b3")).to_have_text("held")


# --- outputs -------------------------------------------------------------------------------


def test_an_image_job_shows_a_thumbnail_that_opens_the_full_image(
        farm: tuple[DaemonProcess, str], open_page: Callable[..., Page], shots: Path) -> None:
    daemon, url = farm
    daemon.drop("pic.json", {"type": "painter", "data": {"width": 640, "height": 360}})
    daemon.wait_state("pic", "succeeded")
    page = open_page(url + "/#/job/pic")  # a job's own URL opens its view
    expect(page.locator("#job-title")).to_have_text("Job pic")
    thumb = page.locator("#job-outputs img")
    expect(thumb).to_have_attribute("src", re.compile(r"^blob:"))
    page.wait_for_function("""() => {
        const img = document.querySelector('#job-outputs img');
        return img && img.complete && img.naturalWidth === 256; }""")
    assert (daemon.frames / ".thumbnails" / "pic").is_dir()
    shoot(page, shots / "job.png")
    page.get_by_role("button", name="frame_0001.png").click()
    expect(page.locator("#viewer")).to_be_visible()
    page.wait_for_function("""() => {
        const img = document.querySelector('#viewer-img');
        return img.complete && img.naturalWidth === 640; }""")
    page.keyboard.press("Escape")
    expect(page.locator("#viewer")).not_to_be_visible()
    page.keyboard.press("Escape")  # closes the job's view
    expect(page.locator("#job")).to_be_hidden()


def test_a_running_render_shows_its_latest_frame(farm: tuple[DaemonProcess, str],
                                                 open_page: Callable[..., Page],
                                                 kinod_root: Path, shots: Path) -> None:
    daemon, url = farm
    gate = kinod_root / "gate"
    daemon.drop("render.json", {"type": "painter", "data": {"width": 640, "height": 360,
                                                            "gate": str(gate)}})
    daemon.wait_state("render", "running")
    page = open_page(url + "/#/job/render")
    expect(page.locator("#job-preview")).to_be_visible()
    expect(page.locator("#job-preview-name")).to_have_text("frame_0001.png")
    page.wait_for_function("""() => {
        const img = document.querySelector('#job-preview-img');
        return img.complete && img.naturalWidth === 512; }""")
    shoot(page, shots / "render-preview.png")
    gate.touch()
    daemon.wait_state("render", "succeeded")
    expect(page.locator("#job-preview")).to_be_hidden()  # a preview of a running job only


# --- the new job form ----------------------------------------------------------------------


def test_the_form_is_built_from_the_plugins_parameters(
        farm: tuple[DaemonProcess, str], open_page: Callable[..., Page], shots: Path) -> None:
    daemon, url = farm
    page = open_page(url + "/#/new")
    page.get_by_label("Plugin", exact=True).select_option("scripted")
    outcome = page.locator("#f-data\\.outcome")
    expect(outcome).to_have_value('"succeed"')  # the default, in a select of the enum
    assert outcome.locator("option").count() == 8
    steps = page.locator("#f-data\\.steps")
    expect(steps).to_have_attribute("type", "number")
    expect(steps).to_have_attribute("min", "0")
    expect(steps).to_have_value("3")
    expect(page.locator("#f-data\\.blocking")).to_have_attribute("type", "checkbox")
    steps.fill("-2")
    page.locator("#f-data\\.tag").fill("<script>window.pwned=1</script>")
    page.get_by_role("button", name="Submit job").click()
    expect(page.locator("#err-data\\.steps")).not_to_be_empty()
    expect(steps).to_have_attribute("aria-invalid", "true")
    shoot(page, shots / "new-job-errors.png")
    assert not [n for n in os.listdir(daemon.inbox) if n.endswith(".json")]

    steps.fill("1")
    page.locator("#f-id").fill("formed")
    page.locator("#f-name").fill("from the form")
    page.get_by_role("button", name="Submit job").click()
    expect(page.locator("#notice")).to_contain_text("Submitted job formed")
    expect(page.locator("#err-data\\.steps")).to_be_empty()
    sidecar = daemon.wait_state("formed", "succeeded")
    assert sidecar["task"]["data"] == {"outcome": "succeed", "steps": 1, "step_s": 0.05,
                                       "max_wait_s": 60, "blocking": False,
                                       "obey_stop": True, "progress": True,
                                       "tag": "<script>window.pwned=1</script>"}
    page.locator("#notice a").click()
    expect(page.locator("#job-params")).to_contain_text('"tag": "<script>window.pwned=1')
    assert page.evaluate("window.pwned") is None


# --- hostile text, token, nodes: on a folder without a daemon -----------------------------


def publish_hostile(kinod_root: Path) -> None:
    now = datetime.now(UTC)
    hostile = "<img src=x onerror=window.pwned=1>"
    Outbox(kinod_root / "outbox").write(Sidecar(
        id="evil", name=hostile, type="scripted", state=JobState.FAILED, created_at=now,
        updated_at=now, message="<b>not bold</b>", task={"type": "scripted",
                                                          "data": {"tag": hostile}},
        error={"code": "plugin_error", "message": "<script>window.pwned=2</script>"}))
    (kinod_root / "outbox" / "evil.log").write_text(f"line one\n{hostile}\n")


def test_job_text_that_looks_like_html_is_shown_as_text(
        kinod_root: Path, serve_api: Callable[..., str], open_page: Callable[..., Page]
) -> None:
    publish_hostile(kinod_root)
    url = serve_api(write_config(kinod_root, plugin_dirs=[str(WORKING_PLUGINS)]))
    page = open_page(url + "/#/job/evil")
    evil = row(page, "evil")
    expect(evil.locator(".c-name")).to_have_text("<img src=x onerror=window.pwned=1>")
    expect(evil.locator(".c-msg")).to_have_text("<script>window.pwned=2</script>")
    expect(page.locator("#job-log")).to_contain_text("<img src=x onerror=window.pwned=1>")
    expect(page.locator("#job-error")).to_contain_text("<script>window.pwned=2</script>")
    expect(page.locator("#job-params")).to_contain_text("onerror=window.pwned=1")
    page.get_by_label("Search").fill("ONERROR")
    expect(evil).to_be_visible()
    page.get_by_label("Search").fill("nothing like it")
    expect(evil).to_have_count(0)
    # (the preview of a running render is the page's own element, empty here)
    assert page.locator("main img:not(#job-preview-img), main script, main b").count() == 0
    assert page.evaluate("window.pwned") is None


def test_the_page_asks_for_the_token_once_and_follows_live(
        kinod_root: Path, serve_api: Callable[..., str], open_page: Callable[..., Page],
        shots: Path) -> None:
    (kinod_root / "token").write_text("s3cret\n")
    config = write_config(kinod_root, plugin_dirs=[str(WORKING_PLUGINS)])
    url = serve_api(config, token_file="token")
    page = open_page(url + "/")
    login = page.locator("#login")
    expect(login).to_be_visible()
    page.get_by_label("Token", exact=True).fill("wrong")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#login-error")).to_have_text("That token was refused.")
    shoot(page, shots / "token.png")
    page.get_by_label("Token", exact=True).fill("s3cret")
    page.get_by_role("button", name="Sign in").click()
    expect(login).not_to_be_visible()
    expect(page.locator("#live")).to_have_text("live")
    now = datetime.now(UTC)
    Outbox(kinod_root / "outbox").write(Sidecar(id="tok", state=JobState.QUEUED,
                                                created_at=now, updated_at=now))
    expect(state_of(page, "tok")).to_have_text("queued")  # through the event stream
    page.reload()  # kept for the browser session: not asked again
    expect(state_of(page, "tok")).to_have_text("queued")
    expect(login).not_to_be_visible()
    assert page.evaluate("sessionStorage.getItem('kinod.token')") == "s3cret"


def test_nodes_and_pausing_one(kinod_root: Path, start_daemon: Callable[..., DaemonProcess],
                               serve_api: Callable[..., str], open_page: Callable[..., Page],
                               shots: Path) -> None:
    daemon = start_daemon()
    page = open_page(serve_api(daemon.config) + "/#/nodes")
    node = page.locator("#nodes-body tr", has_text="testnode")
    expect(node).to_contain_text("scripted")
    expect(node).to_contain_text("up")
    node.get_by_role("button", name="Pause node").click()
    expect(node).to_contain_text("paused")
    assert (daemon.inbox / ".pause.testnode").exists()
    shoot(page, shots / "nodes.png")
    node.get_by_role("button", name="Resume node").click()
    expect(node.get_by_role("button", name="Pause node")).to_be_visible()
    assert not (daemon.inbox / ".pause.testnode").exists()


@pytest.mark.parametrize(("width", "name"), [(390, "phone"), (1280, "laptop")])
def test_readable_at_phone_and_laptop_widths(
        kinod_root: Path, serve_api: Callable[..., str], open_page: Callable[..., Page],
        shots: Path, width: int, name: str) -> None:
    publish_hostile(kinod_root)
    url = serve_api(write_config(kinod_root, plugin_dirs=[str(WORKING_PLUGINS)]))
    page = open_page(url + "/", width=width, height=800)
    button = row(page, "evil").get_by_role("button", name="Run again")
    expect(button).to_be_visible()
    box = button.bounding_box()
    assert box is not None and box["x"] + box["width"] <= width
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    shoot(page, shots / f"{name}.png")
