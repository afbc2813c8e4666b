"""The listing gate alone: a folder is listed again only once its mtime says it changed, a
listing made within a clock tick of a change is not trusted, and a full listing comes every
``safety_s`` whatever the mtime says."""

from __future__ import annotations

import os
from pathlib import Path

from kinod.listing_gate import TICK_S, ListingGate
from tests.helpers import Clock


def test_a_quiet_folder_is_listed_again_only_after_safety_s(tmp_path: Path) -> None:
    clock = Clock()
    gate = ListingGate(tmp_path, clock, safety_s=30)
    assert gate.should_list()  # never listed
    clock.now += 1
    assert gate.should_list()  # listed within a tick of the mtime first seen: again
    clock.now += TICK_S
    assert gate.should_list()  # this listing began TICK_S after: it is up to date
    clock.now += 1
    assert not gate.should_list()
    clock.now += 30
    assert gate.should_list()  # the safety net


def test_an_entry_added_or_removed_makes_the_folder_listed_again(tmp_path: Path) -> None:
    clock = Clock()
    gate = ListingGate(tmp_path, clock, safety_s=300)
    for _ in range(3):
        gate.should_list()
        clock.now += TICK_S
    assert not gate.should_list()
    (tmp_path / "new.yaml").write_text("type: example\n")
    os.utime(tmp_path, ns=(0, os.stat(tmp_path).st_mtime_ns + 1))  # a clock tick later
    assert gate.should_list()
    clock.now += TICK_S + 1
    assert gate.should_list()
    assert not gate.should_list()
    (tmp_path / "new.yaml").unlink()
    os.utime(tmp_path, ns=(0, os.stat(tmp_path).st_mtime_ns + 1))
    assert gate.should_list()


def test_a_folder_that_cannot_be_looked_at_is_always_listed(tmp_path: Path) -> None:
    clock = Clock()
    gate = ListingGate(tmp_path / "gone", clock, safety_s=300)
    for _ in range(3):
        assert gate.should_list()
        clock.now += TICK_S + 1


def test_min_interval_spaces_the_listings_of_an_unchanged_folder_within_the_tick(
        tmp_path: Path) -> None:
    clock = Clock()
    gate = ListingGate(tmp_path, clock, safety_s=30, min_interval_s=0.5)
    assert gate.should_list()
    clock.now += 0.1
    assert not gate.should_list()  # not trusted yet, but listed a moment ago
    clock.now += 0.5
    assert gate.should_list()
    (tmp_path / "new").mkdir()
    assert gate.should_list()  # a change is listed at once, however soon
