"""The spool: where a job file lives is its state; every move is atomic and loses nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kinod import atomic_files
from kinod import spool as spool_module
from kinod.spool import Spool
from tests.racing import ROUNDS, race

INBOX = Path("/farm/inbox")


@pytest.fixture
def spool(fs) -> Spool:
    INBOX.mkdir(parents=True)
    spool = Spool(INBOX, "node1")
    spool.ensure_folders()
    return spool


def drop(name: str, text: str = "type: example\n") -> Path:
    path = INBOX / name
    path.write_text(text)
    return path


def paths(listing: list[Path]) -> list[str]:
    # pyfakefs patches pathlib, so compare paths as text.
    return sorted(os.fspath(p) for p in listing)


def all_contents(root: Path) -> list[str]:
    return sorted(p.read_text() for p in root.rglob("*") if p.is_file())


def test_layout_lives_inside_the_inbox(spool: Spool) -> None:
    assert spool.queued == INBOX / ".kinod" / "queued"
    assert spool.running == INBOX / ".kinod" / "running" / "node1"
    assert spool.done == INBOX / ".kinod" / "done"
    for folder in (spool.queued, spool.running, spool.done, spool.duplicates, spool.invalid):
        assert folder.is_dir()


def test_ensure_folders_twice_is_harmless(spool: Spool) -> None:
    (spool.queued / "a.yaml").write_text("x")
    spool.ensure_folders()
    assert (spool.queued / "a.yaml").read_text() == "x"


def test_accept_takes_the_file_into_this_nodes_running_folder(spool: Spool) -> None:
    src = drop("job1.yaml", "body")
    held = spool.accept(src)
    assert held == spool.running / "job1.yaml"
    assert held.read_text() == "body"
    assert not src.exists()
    assert paths(spool.running_files()) == [os.fspath(held)]


@pytest.fixture(params=["renameat2", "portable"])
def moves(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways a file moves: one renameat2, or (NFS, CephFS, FUSE) a link, then an unlink."""
    if request.param == "portable":
        monkeypatch.setattr(atomic_files, "_renameat2", None)
    return request.param


def test_running_is_listed_less_often_by_each_node_the_more_nodes_share_it(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its safety listing (whatever the mtime says) comes once RUNNING_SAFETY_S a node
    folder, so the fleet as a whole lists it about as often however many nodes it has."""
    monkeypatch.setattr(spool_module, "RUNNING_SAFETY_S", 5.0)
    monkeypatch.setattr(spool_module, "RUNNING_SAFETY_MAX_S", 60.0)
    now = [1000.0]
    spool._running_gate._clock = lambda: now[0]
    spool.holds("a")
    assert spool._running_gate.safety_s == 5.0  # this node's folder alone
    for n in range(2, 4):
        Spool(INBOX, f"node{n}").ensure_folders()
    now[0] += 5.0
    spool.holds("a")
    assert spool.other_nodes() == ["node2", "node3"]
    assert spool._running_gate.safety_s == 15.0
    for n in range(4, 30):
        Spool(INBOX, f"node{n}").ensure_folders()
    now[0] += 14.0
    assert len(spool.other_nodes()) == 2  # not listed again yet
    now[0] += 1.0
    assert len(spool.other_nodes()) == 28
    assert spool._running_gate.safety_s == 60.0  # never more than NFS's acdirmax


@pytest.mark.usefixtures("moves")
def test_accept_on_two_nodes_only_one_wins(tmp_path: Path) -> None:
    """Four nodes take in one dropped file at the same moment: one holds it, every time."""
    nodes = [Spool(tmp_path, f"node{i}") for i in range(4)]
    for node in nodes:
        node.ensure_folders()
    for round_ in range(ROUNDS):
        src = tmp_path / f"job{round_}.yaml"
        src.write_text(f"round {round_}")
        outcomes = race(4, lambda i, s=src: nodes[i].accept(s))
        assert sorted(outcomes) == ["gone", "gone", "gone", "moved"], (round_, outcomes)
        held = [path for node in nodes for path in node.running_files()]
        assert held == [nodes[outcomes.index("moved")].running / src.name], (round_, held)
        assert held[0].read_text() == f"round {round_}" and not src.exists()
        assert os.stat(held[0]).st_nlink == 1
        held[0].unlink()


def test_accept_completes_a_half_done_move(spool: Spool) -> None:
    src = drop("job1.yaml", "body")
    os.link(src, spool.running / "job1.yaml")  # a fallback move cut short after its link
    held = spool.accept(src)
    assert held == spool.running / "job1.yaml"
    assert held.read_text() == "body"
    assert not src.exists()


def test_release_queues_a_held_file(spool: Spool) -> None:
    queued = spool.release(spool.accept(drop("job1.yaml", "body")))
    assert queued == spool.queued / "job1.yaml"
    assert queued.read_text() == "body"
    assert spool.running_files() == []


def test_release_of_a_name_already_queued_raises_and_moves_nothing(spool: Spool) -> None:
    (spool.queued / "job1.yaml").write_text("first")
    held = spool.accept(drop("job1.yaml", "second"))
    with pytest.raises(FileExistsError):
        spool.release(held)
    assert held.read_text() == "second"
    assert (spool.queued / "job1.yaml").read_text() == "first"


def test_holds_sees_queued_and_every_nodes_running_files(spool: Spool) -> None:
    other = Spool(INBOX, "node2")
    other.ensure_folders()
    assert not spool.holds("a")
    spool.release(spool.accept(drop("a.yaml")))
    other.accept(drop("b.json"))
    assert spool.holds("a") and spool.holds("b") and not spool.holds("c")
    assert spool.other_nodes() == ["node2"]
    assert paths(spool.running_files_of("node2")) == [os.fspath(other.running / "b.json")]


@pytest.mark.usefixtures("moves")
def test_take_over_moves_another_nodes_file_once(tmp_path: Path) -> None:
    """Three live nodes take a dead node's running job back at the same moment: one gets it,
    every time."""
    dead = Spool(tmp_path, "dead")
    nodes = [Spool(tmp_path, f"node{i}") for i in range(3)]
    for node in (dead, *nodes):
        node.ensure_folders()
    for round_ in range(ROUNDS):
        (tmp_path / f"job{round_}.yaml").write_text(f"round {round_}")
        held = dead.accept(tmp_path / f"job{round_}.yaml")
        outcomes = race(3, lambda i, h=held: nodes[i].take_over(h))
        assert sorted(outcomes) == ["gone", "gone", "moved"], (round_, outcomes)
        taken = [path for node in nodes for path in node.running_files()]
        assert taken == [nodes[outcomes.index("moved")].running / held.name], (round_, taken)
        assert taken[0].read_text() == f"round {round_}" and not held.exists()
        assert os.stat(taken[0]).st_nlink == 1
        taken[0].unlink()


def test_accept_of_a_vanished_file_raises_file_not_found(spool: Spool) -> None:
    with pytest.raises(FileNotFoundError):
        spool.accept(INBOX / "gone.yaml")
    assert spool.queued_names() == set()


def test_claim_moves_to_this_nodes_running_folder(spool: Spool) -> None:
    queued = spool.release(spool.accept(drop("job1.yaml", "body")))
    running = spool.claim(queued)
    assert running == INBOX / ".kinod" / "running" / "node1" / "job1.yaml"
    assert running.read_text() == "body"
    assert spool.queued_names() == set()
    assert paths(spool.running_files()) == [os.fspath(running)]


def test_claim_of_a_vanished_file_returns_none(spool: Spool) -> None:
    assert spool.claim(spool.queued / "gone.yaml") is None
    assert spool.running_files() == []


def test_claim_twice_the_second_loses(spool: Spool) -> None:
    queued = spool.release(spool.accept(drop("job1.yaml")))
    other_node = Spool(INBOX, "node2")
    other_node.ensure_folders()
    assert spool.claim(queued) is not None
    assert other_node.claim(queued) is None
    assert other_node.running_files() == []


def test_requeue_moves_back_to_queued(spool: Spool) -> None:
    running = spool.accept(drop("job1.yaml", "body"))
    queued = spool.requeue(running)
    assert queued == spool.queued / "job1.yaml"
    assert queued.read_text() == "body"
    assert spool.running_files() == []


def test_requeue_never_loses_a_queued_file_of_the_same_name(spool: Spool) -> None:
    # Another daemon on the same inbox (or a resubmission) queued the same id meanwhile.
    running = spool.running / "job1.yaml"
    running.write_text("the run being handed back")
    (spool.queued / "job1.yaml").write_text("a newer submission")
    try:
        spool.requeue(running)
    except FileExistsError:
        pass
    assert all_contents(spool.root) == ["a newer submission", "the run being handed back"]


def test_claim_never_loses_a_running_file_of_the_same_name(spool: Spool) -> None:
    (spool.running / "job1.yaml").write_text("left over from a crash")
    (spool.queued / "job1.yaml").write_text("queued")
    spool.claim(spool.queued / "job1.yaml")
    assert all_contents(spool.root) == ["left over from a crash", "queued"]


def test_finish_numbers_runs_and_keeps_each_suffix(spool: Spool) -> None:
    first = spool.finish(drop("job1.yaml", "run 1"), "job1")
    second = spool.finish(drop("job1.json", '{"run": 2}'), "job1")
    third = spool.finish(drop("job1.YML", "run 3"), "job1")
    folder = spool.done / "job1"
    assert (first, second, third) == (folder / "1.yaml", folder / "2.json", folder / "3.yml")
    assert first.read_text() == "run 1"
    assert second.read_text() == '{"run": 2}'
    assert third.read_text() == "run 3"
    assert sorted(os.listdir(INBOX)) == [".kinod"]


def test_finish_renames_into_a_done_folder_prepared_ahead(spool: Spool) -> None:
    held = spool.accept(drop("job1.yaml", "body"))
    spool.prepare_done("job1")
    assert (spool.done / "job1").is_dir() and os.listdir(spool.done / "job1") == []
    assert spool.finish(held, "job1") == spool.done / "job1" / "1.yaml"
    assert (spool.done / "job1" / "1.yaml").read_text() == "body"


def test_finish_counts_the_runs_in_a_done_folder_that_was_there(spool: Spool) -> None:
    spool.finish(spool.accept(drop("job1.yaml", "first")), "job1")
    held = spool.accept(drop("job1.yaml", "second"))
    spool.prepare_done("job1")  # there already: left to finish to count
    assert spool.finish(held, "job1") == spool.done / "job1" / "2.yaml"


def test_finish_makes_again_a_prepared_done_folder_that_went(spool: Spool) -> None:
    held = spool.accept(drop("job1.yaml", "body"))
    spool.prepare_done("job1")
    (spool.done / "job1").rmdir()
    assert spool.finish(held, "job1") == spool.done / "job1" / "1.yaml"


def test_finish_from_running(spool: Spool) -> None:
    running = spool.accept(drop("job1.yaml", "body"))
    done = spool.finish(running, "job1")
    assert done == spool.done / "job1" / "1.yaml"
    assert done.read_text() == "body"
    assert spool.running_files() == []


def test_finish_keeps_jobs_apart(spool: Spool) -> None:
    a = spool.finish(drop("a.yaml", "a"), "a")
    b = spool.finish(drop("b.yaml", "b"), "b")
    assert a == spool.done / "a" / "1.yaml"
    assert b == spool.done / "b" / "1.yaml"


def test_finish_never_overwrites_an_earlier_run(spool: Spool) -> None:
    folder = spool.done / "job1"
    folder.mkdir()
    (folder / "1.yaml").write_text("run 1")
    (folder / "3.yaml").write_text("run 3")  # run 2 was removed by hand
    new = spool.finish(drop("job1.yaml", "run 4"), "job1")
    assert new.read_text() == "run 4"
    assert (folder / "1.yaml").read_text() == "run 1"
    assert (folder / "3.yaml").read_text() == "run 3"


def test_finish_never_reuses_a_run_number_with_another_suffix(spool: Spool) -> None:
    folder = spool.done / "job1"
    folder.mkdir()
    (folder / "2.yaml").write_text("run 2")  # run 1 was removed by hand
    new = spool.finish(drop("job1.json", "{}"), "job1")
    # done/<id>/<n>.* is "the n-th run": two files may not both claim to be run 2.
    assert new.stem != "2", f"{new.name} reuses the number of 2.yaml"
    assert new.read_text() == "{}"


def test_file_without_suffix_is_kept_as_yaml(spool: Spool) -> None:
    done = spool.finish(drop("job1", "body"), "job1")
    assert done == spool.done / "job1" / "1.yaml"


def test_set_aside_duplicate_numbers_each_duplicate(spool: Spool) -> None:
    first = spool.set_aside_duplicate(drop("job1.yaml", "dup 1"), "job1")
    second = spool.set_aside_duplicate(drop("job1.json", "dup 2"), "job1")
    folder = spool.duplicates / "job1"
    assert (first, second) == (folder / "1.yaml", folder / "2.json")
    assert first.read_text() == "dup 1"
    assert second.read_text() == "dup 2"
    assert not (spool.done / "job1").exists()


def test_set_aside_invalid_keeps_the_name_and_numbers_repeats(spool: Spool) -> None:
    first = spool.set_aside_invalid(drop("bad name!.yaml", "1"))
    second = spool.set_aside_invalid(drop("bad name!.yaml", "2"))
    third = spool.set_aside_invalid(drop("bad name!.yaml", "3"))
    assert first == spool.invalid / "bad name!.yaml"
    assert second == spool.invalid / "bad name!.yaml.2"
    assert third == spool.invalid / "bad name!.yaml.3"
    assert [p.read_text() for p in (first, second, third)] == ["1", "2", "3"]


def test_set_aside_invalid_moves_a_symlink_not_its_target(spool: Spool, fs) -> None:
    fs.create_file("/etc/secret", contents="secret")
    os.symlink("/etc/secret", INBOX / "link.yaml")
    moved = spool.set_aside_invalid(INBOX / "link.yaml")
    assert moved == spool.invalid / "link.yaml"
    assert os.path.islink(moved)
    assert not os.path.lexists(INBOX / "link.yaml")
    assert Path("/etc/secret").read_text() == "secret"


def test_listings_skip_dot_files_and_missing_folders(fs) -> None:
    INBOX.mkdir(parents=True)
    spool = Spool(INBOX, "node1")
    assert spool.queued_names() == set()  # before ensure_folders
    assert spool.running_files() == []
    spool.ensure_folders()
    (spool.queued / "a.yaml").write_text("a")
    (spool.queued / ".a.yaml.123.tmp").write_text("partial")
    assert spool.queued_names() == {"a.yaml"}


def test_nodes_have_separate_running_folders(fs) -> None:
    INBOX.mkdir(parents=True)
    a, b = Spool(INBOX, "a"), Spool(INBOX, "b")
    a.ensure_folders()
    b.ensure_folders()
    running = a.accept(drop("job1.yaml"))
    assert paths(a.running_files()) == [os.fspath(running)]
    assert b.running_files() == []
    assert a.queued == b.queued


def test_counts_count_up_per_job_and_event_and_forget_resets(spool: Spool) -> None:
    assert [spool.count("job1", "crashes") for _ in range(3)] == [1, 2, 3]
    assert spool.count("job1", "failures") == 1  # per event
    assert spool.count("job2", "crashes") == 1  # per job
    spool.forget_counts("job1")
    assert spool.count("job1", "crashes") == 1
    assert spool.count("job1", "failures") == 1
    spool.forget_counts("never-counted")  # nothing to forget: no error
    assert sorted(os.listdir(spool.counts)) == ["job1.json", "job2.json"]


def test_counts_survive_a_garbled_file(spool: Spool) -> None:
    (spool.counts / "job1.json").write_text("not json")
    assert spool.count("job1", "crashes") == 1
    (spool.counts / "job2.json").write_text("")
    assert spool.count("job2", "crashes") == 1


def test_a_move_cut_short_after_its_link_is_finished_not_duplicated(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "inbox", "node1")
    spool.ensure_folders()
    running = spool.running / "job1.yaml"
    running.write_text("the run")
    os.link(running, spool.queued / "job1.yaml")  # killed between link and unlink
    assert spool.requeue(running) == spool.queued / "job1.yaml"
    assert not running.exists()
    assert (spool.queued / "job1.yaml").read_text() == "the run"
    assert list(spool.duplicates.iterdir()) == []


def test_invalid_names_at_the_length_limit_are_set_aside_twice(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "inbox", "node1")
    spool.ensure_folders()
    name = "x" * 250 + ".yaml"
    for content in ("first", "second"):
        (spool.inbox / name).write_text(content)
        spool.set_aside_invalid(spool.inbox / name)
    assert sorted(p.read_text() for p in spool.invalid.iterdir()) == ["first", "second"]


# --- suffixes in any case (u1.YAML): every file inside the spool has a lower-case one -------


def test_a_job_taken_in_under_an_upper_case_suffix_is_held_under_a_lower_case_one(
        spool: Spool) -> None:
    other = Spool(INBOX, "node2")
    other.ensure_folders()
    held = other.accept(drop("u1.YAML", "body"))
    assert held == other.running / "u1.yaml"
    assert held.read_text() == "body"
    assert not (INBOX / "u1.YAML").exists()
    # Another node sees the job active wherever its file is: taken in, queued, claimed.
    assert spool.holds("u1")
    queued = other.release(held)
    assert queued == spool.queued / "u1.yaml"
    assert spool.holds("u1")
    assert spool.claim(queued) == spool.running / "u1.yaml"
    assert other.holds("u1")


def test_here_only_leaves_out_the_other_nodes_running_folders(spool: Spool) -> None:
    other = Spool(INBOX, "node2")
    other.ensure_folders()
    other.accept(drop("elsewhere.json"))
    spool.accept(drop("here.json"))
    spool.release(spool.accept(drop("queued.json")))
    assert spool.holds("elsewhere") and not spool.holds("elsewhere", here_only=True)
    assert spool.holds("here", here_only=True) and spool.holds("queued", here_only=True)


@pytest.mark.parametrize("name", ["u1.YAML", "u1.Yml", "u1.JSON", "u1.jSoN"])
def test_every_spelling_of_the_suffix_is_held_as_one_job(spool: Spool, name: str) -> None:
    other = Spool(INBOX, "node2")
    other.ensure_folders()
    other.accept(drop(name))
    assert spool.holds("u1")
    assert not spool.holds("u2")


def test_files_left_in_the_spool_with_upper_case_suffixes_are_moved_to_lower_case_ones(
        spool: Spool) -> None:
    # An older kinod kept the suffix as written: the next move brings each file into line.
    dead = Spool(INBOX, "dead")
    dead.ensure_folders()
    (spool.running / "r1.YAML").write_text("r1")
    (spool.running / "r2.Yml").write_text("r2")
    (spool.queued / "q1.JSON").write_text("q1")
    (dead.running / "d1.YAML").write_text("d1")
    assert spool.release(spool.running / "r1.YAML") == spool.queued / "r1.yaml"
    assert spool.requeue(spool.running / "r2.Yml") == spool.queued / "r2.yml"
    assert spool.claim(spool.queued / "q1.JSON") == spool.running / "q1.json"
    assert spool.take_over(dead.running / "d1.YAML") == spool.running / "d1.yaml"
    assert all(spool.holds(job_id) for job_id in ("r1", "r2", "q1", "d1"))
    assert all_contents(spool.root) == ["d1", "q1", "r1", "r2"]
