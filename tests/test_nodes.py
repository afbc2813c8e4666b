"""Heartbeats and leases, judged by the watcher's own clock; and choosing the watch mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from kinod import watcher
from kinod.nodes import NodeBoard, read_heartbeats
from kinod.watcher import choose_watch_mode, file_system_type
from tests.helpers import Clock


def test_a_beat_writes_a_heartbeat_others_read(tmp_path: Path) -> None:
    board = NodeBoard(tmp_path, "a", lease=10, clock=Clock())
    board.beat(["sdxl"], workers=4, running=1, queued=2)
    (heartbeat,) = read_heartbeats(tmp_path)
    assert (heartbeat.node, heartbeat.seq, heartbeat.serves, heartbeat.running,
            heartbeat.queued, heartbeat.stopped) == ("a", 1, ["sdxl"], 1, 2, False)


def test_a_node_expires_only_after_a_whole_lease_without_a_change(tmp_path: Path) -> None:
    a_clock, b_clock = Clock(), Clock()
    a = NodeBoard(tmp_path, "a", lease=10, clock=a_clock)
    b = NodeBoard(tmp_path, "b", lease=10, clock=b_clock)
    a.beat([], 1, 0, 0)
    assert not b.expired("a")  # first look: the lease starts now
    b_clock.now += 9
    assert not b.expired("a")
    a.beat([], 1, 0, 0)  # a change: the lease starts again when it is seen
    b_clock.now += 9
    assert not b.expired("a")
    b_clock.now += 9
    assert not b.expired("a")
    b_clock.now += 1
    assert b.expired("a")


def test_a_node_clock_far_off_changes_nothing(tmp_path: Path) -> None:
    """Liveness never compares the machines' clocks: only whether the heartbeat moves."""
    a_clock, b_clock = Clock(), Clock()
    a_clock.now = -1e9  # wildly different from b's
    a = NodeBoard(tmp_path, "a", lease=10, clock=a_clock)
    b = NodeBoard(tmp_path, "b", lease=10, clock=b_clock)
    for _ in range(5):
        a.beat([], 1, 0, 0)
        b_clock.now += 5
        assert not b.expired("a")


def test_a_node_without_a_heartbeat_expires_a_lease_after_the_first_look(
        tmp_path: Path) -> None:
    clock = Clock()
    b = NodeBoard(tmp_path, "b", lease=10, clock=clock)
    assert not b.expired("ghost")
    clock.now += 10
    assert b.expired("ghost")


def test_beat_reports_how_long_this_node_was_held_up(tmp_path: Path) -> None:
    clock = Clock()
    a = NodeBoard(tmp_path, "a", lease=10, clock=clock)
    assert a.beat([], 1, 0, 0) is None
    clock.now += 42
    assert a.beat([], 1, 0, 0) == 42


def test_alive_lists_moving_nodes_and_leaves_out_stopped_ones(tmp_path: Path) -> None:
    clock = Clock()
    a = NodeBoard(tmp_path, "a", lease=10, clock=clock)
    NodeBoard(tmp_path, "b", lease=10, clock=clock).beat(["x"], 1, 0, 0)
    NodeBoard(tmp_path, "c", lease=10, clock=clock).beat([], 1, 0, 0, stopped=True)
    a.beat([], 1, 0, 0)
    assert sorted(a.alive()) == ["a", "b"]
    clock.now += 11
    a.beat([], 1, 0, 0)
    assert sorted(a.alive()) == ["a"]


MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:35 / /srv/farm rw,relatime shared:20 - nfs4 filer:/farm rw,vers=4.2
41 40 0:36 / /srv/farm/scratch rw shared:21 - tmpfs tmpfs rw
42 22 0:37 / /mnt/with\\040space rw shared:22 - fuse.sshfs host:/x rw
"""


def test_file_system_type_takes_the_deepest_mount(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    assert file_system_type(Path("/srv/farm/inbox"), info) == "nfs4"
    assert file_system_type(Path("/srv/farm/scratch/inbox"), info) == "tmpfs"
    assert file_system_type(Path("/srv/farmer"), info) == "ext4"
    assert file_system_type(Path("/mnt/with space/inbox"), info) == "fuse.sshfs"
    assert file_system_type(Path("/x"), tmp_path / "missing") is None


def test_watch_mode_auto_polls_network_file_systems(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watcher, "InotifyFD", object())  # as on Linux, wherever this runs
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO + "43 22 0:38 / /mnt/smb rw - cifs //nas/farm rw\n"
                                "44 22 0:39 / /mnt/ceph rw - ceph 10.0.0.1:/ rw\n")
    for network in ("/srv/farm/inbox", "/mnt/with space/inbox", "/mnt/smb/inbox",
                    "/mnt/ceph/inbox"):
        assert choose_watch_mode("auto", Path(network), info) == "poll", network
    for local in ("/srv/farmer/inbox", "/srv/farm/scratch/inbox"):  # ext4, tmpfs
        assert choose_watch_mode("auto", Path(local), info) == "inotify", local
    # No mount table to read: inotify, as on a local disk.
    assert choose_watch_mode("auto", Path("/srv/farm/inbox"), tmp_path / "missing") == "inotify"
    # A setting other than auto is taken as it is.
    assert choose_watch_mode("inotify", Path("/srv/farm/inbox"), info) == "inotify"
    assert choose_watch_mode("poll", Path("/srv/farmer/inbox"), info) == "poll"


def test_watch_mode_auto_polls_where_there_is_no_inotify(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watcher, "InotifyFD", None)
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    assert choose_watch_mode("auto", Path("/srv/farmer/inbox"), info) == "poll"
