"""The inbox watcher on real inotify: which events reach the loop, and how."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from kinod.watcher import InboxWatcher

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/mountinfo"),
                                reason="inotify is Linux only")


async def _watch(folders: list[Path], act, until, timeout_s: float = 5.0) -> list[tuple[str, bool]]:
    """Start a watcher, do ``act()``, and collect events until ``until(events)`` holds."""
    events: list[tuple[str, bool]] = []
    arrived = asyncio.Event()

    def callback(path: str, renamed: bool) -> None:
        events.append((path, renamed))
        arrived.set()

    watcher = InboxWatcher(folders, callback)
    watcher.start(asyncio.get_running_loop())
    try:
        act(watcher)
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not until(events):
            remaining = deadline - asyncio.get_running_loop().time()
            assert remaining > 0, f"events seen: {events}"
            arrived.clear()
            try:
                await asyncio.wait_for(arrived.wait(), remaining)
            except TimeoutError:
                pass
    finally:
        watcher.stop()
    return events


def test_a_file_renamed_in_arrives_renamed_and_moves_out_are_not_told(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "leaving.json").write_text("{}")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def act(_: InboxWatcher) -> None:
        os.rename(inbox / "leaving.json", elsewhere / "leaving.json")  # out: not reported
        tmp = tmp_path / "job.json.tmp"
        tmp.write_text("{}")
        os.rename(tmp, inbox / "job.json")  # in: one event, by rename

    events = asyncio.run(_watch([inbox], act, lambda ev: (str(inbox / "job.json"), True) in ev))
    assert all(Path(path).name != "leaving.json" for path, _ in events)


def test_a_file_written_in_place_arrives_as_not_renamed(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    target = str(inbox / "job.yaml")

    def act(_: InboxWatcher) -> None:
        with open(target, "w") as f:
            f.write("type: example\n")

    events = asyncio.run(_watch([inbox], act, lambda ev: (target, False) in ev))
    assert {renamed for path, renamed in events if path == target} == {False}


def test_a_deleted_folder_and_an_overflow_are_passed_on_as_folders(tmp_path: Path) -> None:
    inbox, queued = tmp_path / "inbox", tmp_path / "inbox" / "queued"
    queued.mkdir(parents=True)
    (inbox / "gone").mkdir()

    def act(watcher: InboxWatcher) -> None:
        os.rmdir(inbox / "gone")
        watcher.on_queue_overflow()  # as watchdog's reader does when the kernel's queue did

    events = asyncio.run(_watch([inbox, queued], act, lambda ev: len(ev) >= 3))
    paths = [path for path, _ in events]
    assert str(inbox / "gone") in paths
    assert str(inbox) in paths and str(queued) in paths


def test_events_of_several_files_all_arrive_in_order(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    names = [str(inbox / f"job{i:03d}.json") for i in range(200)]

    def act(_: InboxWatcher) -> None:
        for name in names:
            tmp = tmp_path / "tmp.json"
            tmp.write_text("{}")
            os.rename(tmp, name)

    events = asyncio.run(_watch([inbox], act, lambda ev: len(ev) >= len(names)))
    assert [path for path, _ in events] == names
