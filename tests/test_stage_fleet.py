"""The fleet stage alone: this node among others on one inbox. Other nodes are heartbeat
files written by NodeBoards of their own and files in their running/ folders; the other
stages are fakes, and the lease is counted on a clock moved by hand."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kinod.models import JobState
from kinod.nodes import NodeBoard, read_heartbeat
from kinod.stages.fleet import Fleet
from kinod.stages.job import Job
from tests.stage_fakes import (
    NODE,
    OTHER_NODE,
    FakeRun,
    Rig,
    job_of,
    make_rig,
    sidecar_in,
    write_job,
)


def fleet_rig(tmp_path: Path, polling: bool = False, **settings: object) -> tuple[Rig, Fleet]:
    rig = make_rig(tmp_path, **settings)
    rig.ctx.fleet = fleet = Fleet(rig.ctx, polling=polling)
    return rig, fleet


def other_node(rig: Rig, serves: tuple[str, ...] = ("scripted",),
               stopped: bool = False) -> NodeBoard:
    """Another node on the inbox, one beat written."""
    board = NodeBoard(rig.spool.nodes, OTHER_NODE, rig.ctx.settings.lease, rig.clock)
    board.beat(list(serves), 1, 0, 0, stopped=stopped)
    return board


def held_here(rig: Rig, job_id: str) -> Job:
    """A job held by this node, its file in this node's running/."""
    job = job_of(rig.ctx, write_job(rig.spool.running, job_id))
    rig.scheduler.held[job_id] = job
    return job


def move_to_other_node(rig: Rig, job: Job) -> Path:
    folder = rig.spool.running_root / OTHER_NODE
    folder.mkdir(exist_ok=True)
    return job.path.rename(folder / job.name)


@pytest.mark.parametrize(("case", "waits"), [
    ("alone", True), ("polling", False), ("another node beats", False),
    ("another node stopped", True), ("plugin not served", False)])
def test_jobs_wait_here_only_while_this_node_serves_the_inbox_alone(
        tmp_path: Path, case: str, waits: bool) -> None:
    rig, fleet = fleet_rig(tmp_path, polling=case == "polling",
                           serves=["example"] if case == "plugin not served" else None)
    if case.startswith("another node"):
        other_node(rig, stopped=case.endswith("stopped"))
    fleet.start()
    assert fleet.let_wait_here("scripted") is waits
    assert read_heartbeat(rig.spool.nodes / f"{NODE}.json") is not None


def test_another_node_started_releases_the_jobs_waiting_here_into_queued(
        tmp_path: Path) -> None:
    rig, fleet = fleet_rig(tmp_path)
    fleet.start()
    assert fleet.let_wait_here("scripted")
    waiting, busy, unrecorded, gone = (held_here(rig, job_id) for job_id in
                                       ("waiting", "busy", "unrecorded", "gone"))
    rig.running.running["busy"] = busy
    rig.ending.unrecorded.add("unrecorded")  # ended, its end not yet on disk: it stays
    gone.path.unlink()  # taken over while this node was held up
    fleet.another_node_started()
    assert waiting.path == rig.spool.queued / "waiting.json" and waiting.path.exists()
    assert busy.path.exists() and busy.folder == rig.spool.running
    assert unrecorded.path.exists() and unrecorded.folder == rig.spool.running
    assert rig.ending.called("claimed_elsewhere") == [(gone,)]
    assert not fleet.let_wait_here("scripted")


def test_a_heartbeat_that_finds_another_node_releases_the_jobs_waiting_here(
        tmp_path: Path) -> None:
    rig, fleet = fleet_rig(tmp_path)
    fleet.start()
    assert fleet.let_wait_here("scripted")
    waiting = held_here(rig, "waiting")
    other_node(rig)
    asyncio.run(fleet.heartbeat())
    assert waiting.path == rig.spool.queued / "waiting.json" and waiting.path.exists()


def test_stop_releases_the_jobs_waiting_here_and_beats_stopped(tmp_path: Path) -> None:
    rig, fleet = fleet_rig(tmp_path)
    fleet.start()
    assert fleet.let_wait_here("scripted")
    waiting = held_here(rig, "waiting")
    fleet.stop()
    assert waiting.path == rig.spool.queued / "waiting.json" and waiting.path.exists()
    heartbeat = read_heartbeat(rig.spool.nodes / f"{NODE}.json")
    assert heartbeat is not None and heartbeat.stopped


@pytest.mark.parametrize(("case", "taken"), [
    ("its file still here", False), ("its file on another node", True),
    ("gone, the sidecar another node's", True), ("gone, the sidecar this run's", False)])
def test_taken_over_when_the_file_left_and_another_node_has_the_job(
        tmp_path: Path, case: str, taken: bool) -> None:
    rig, fleet = fleet_rig(tmp_path)
    job = held_here(rig, "t")
    job.sidecar = sidecar_in(JobState.RUNNING, "t")
    if case == "its file on another node":
        move_to_other_node(rig, job)
    elif case.startswith("gone"):
        job.path.unlink()
        node = OTHER_NODE if case.endswith("another node's") else NODE
        rig.ctx.outbox.publish(sidecar_in(JobState.RUNNING, "t", node=node))
    assert fleet.taken_over(job) is taken


def test_a_heartbeat_fences_a_run_another_node_took_over_and_force_stops_it_once(
        tmp_path: Path) -> None:
    rig, fleet = fleet_rig(tmp_path)
    job = held_here(rig, "t")
    run = FakeRun(lambda: None, "t", {}, lambda percent, message: None)
    job.run = run  # a fake of PluginRun
    rig.running.running["t"] = job
    move_to_other_node(rig, job)
    asyncio.run(fleet.heartbeat())
    asyncio.run(fleet.heartbeat())
    assert job.fenced and run.forced == 1


def test_an_expired_nodes_running_files_are_taken_over_and_handed_to_recovery(
        tmp_path: Path) -> None:
    rig, fleet = fleet_rig(tmp_path, lease=10)
    other_node(rig)
    write_job(rig.spool.running_root / OTHER_NODE, "orphan")
    asyncio.run(fleet.heartbeat())  # the first look at its heartbeat: it counts from now
    assert rig.recovery.calls == []
    rig.clock.now += 10  # its heartbeat stood still for a whole lease
    asyncio.run(fleet.heartbeat())
    taken = rig.spool.running / "orphan.json"
    assert taken.exists()
    assert rig.recovery.called("guarded") == [(rig.recovery.recover_running, taken)]


def test_served_elsewhere_only_for_a_plugin_this_node_lacks_and_a_live_node_serves(
        tmp_path: Path) -> None:
    rig, fleet = fleet_rig(tmp_path)
    other_node(rig, serves=("gpu", "scripted"))
    fleet.start()
    assert fleet.served_elsewhere("gpu")
    assert not fleet.served_elsewhere("scripted")  # loaded here: this node takes it in
    assert not fleet.served_elsewhere("nobody") and not fleet.served_elsewhere(None)


def beating_other(rig: Rig, **flags: bool) -> NodeBoard:
    board = other_node(rig, **{k: v for k, v in flags.items() if k == "stopped"})
    if flags.get("paused"):
        board.beat(["scripted"], 1, 0, 0, paused=True)
    (rig.spool.running_root / OTHER_NODE).mkdir(exist_ok=True)
    return board


@pytest.mark.parametrize(("case", "shared"), [
    ("polling beside a live node", True), ("not polling", False), ("alone", False),
    ("the other stopped", False), ("the other paused", False)])
def test_polling_nodes_share_the_queue_by_job_id(tmp_path: Path, case: str,
                                                  shared: bool) -> None:
    rig, fleet = fleet_rig(tmp_path, polling=case != "not polling")
    if case != "alone":
        beating_other(rig, stopped=case == "the other stopped",
                      paused=case == "the other paused")
    fleet.start()
    ids = [f"j{i}" for i in range(100)]
    owned = [job_id for job_id in ids if fleet.owns(job_id)]
    if shared:
        assert fleet.nodes_sharing() == 2 and 20 < len(owned) < 80
        assert fleet.inbox_turn(0) != fleet.inbox_turn(1)  # turns, one poll each
    else:
        assert fleet.nodes_sharing() == 1 and owned == ids
        assert fleet.inbox_turn(0) and fleet.inbox_turn(1)


def test_a_node_whose_lease_ran_out_no_longer_owns_a_share(tmp_path: Path) -> None:
    rig, fleet = fleet_rig(tmp_path, polling=True, lease=10)
    beating_other(rig)
    fleet.start()
    assert fleet.nodes_sharing() == 2
    rig.clock.now += 10  # its heartbeat stood still for a whole lease
    asyncio.run(fleet.heartbeat())
    assert fleet.nodes_sharing() == 1 and all(fleet.owns(f"j{i}") for i in range(20))


def test_a_poll_lists_the_inbox_and_queued_on_its_turn_only_however_short_of_work(
        tmp_path: Path) -> None:
    rig, fleet = fleet_rig(tmp_path, polling=True, poll_interval_s=1, workers=2,
                           rescan_interval_s=30)
    beating_other(rig)
    fleet.start()
    turn = 0 if fleet.inbox_turn(0) else 1  # its turns: turn, turn + 2, ...

    def poll(slot: int) -> tuple[bool, bool]:
        rig.clock.now += 1
        rig.wall.now = slot + 0.5
        return fleet.poll_plan()

    rig.clock.now -= 1
    rig.scheduler.waiting = 0  # nothing waits here: it wants work
    assert poll(turn) == (True, False)  # its turn: the inbox and queued/
    assert poll(turn + 1) == (False, False)  # the other node's turn
    assert poll(turn + 2) == (True, False)
    # Its turns go by unseen (the clocks disagree): a round and more without, it lists.
    assert poll(turn + 1) == (False, False)
    assert poll(turn + 3) == (False, False)
    assert poll(turn + 5) == (True, False)
    rig.clock.now += 30
    assert poll(turn + 7)[1]  # its running/ once a rescan_interval_s


def test_alone_a_poll_lists_the_shared_folders_every_time(tmp_path: Path) -> None:
    rig, fleet = fleet_rig(tmp_path, polling=True, poll_interval_s=1)
    fleet.start()
    for slot in range(4):
        rig.clock.now += 1
        rig.wall.now = slot + 0.5
        assert fleet.poll_plan()[0]


def test_a_job_queued_for_another_nodes_share_is_mailed_to_it(tmp_path: Path) -> None:
    rig, fleet = fleet_rig(tmp_path, polling=True)
    beating_other(rig)
    fleet.start()
    ids = [f"j{i}" for i in range(20)]
    theirs = [job_id for job_id in ids if not fleet.owns(job_id)]
    for job_id in theirs:
        fleet.queued_for_another(f"{job_id}.json", job_id)
    fleet.send_mail()
    mail = rig.spool.mail / OTHER_NODE
    assert mail.read_text().split() == [f"{job_id}.json" for job_id in theirs]
    # Mail for this node is read only while it shares the queue out.
    (rig.spool.mail / rig.spool.running.name).write_text("mine.json\n")
    assert fleet.mail() == ["mine.json"]


def test_a_node_that_shares_nothing_reads_no_mail(tmp_path: Path) -> None:
    rig, fleet = fleet_rig(tmp_path, polling=True)
    fleet.start()
    (rig.spool.mail / rig.spool.running.name).write_text("mine.json\n")
    assert fleet.mail() == []
