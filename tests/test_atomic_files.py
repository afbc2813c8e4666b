"""atomic_write and move_noreplace: whole replacements, no leftovers, no overwrites."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kinod import atomic_files
from kinod.atomic_files import (
    FolderFlush,
    atomic_write,
    flush_tree,
    fsync_dir,
    move_noreplace,
    read_whole,
    rename_noreplace,
)
from tests.racing import ROUNDS, race


def _names(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# --- atomic_write --------------------------------------------------------------------------


def test_atomic_write_creates_a_new_file(fs) -> None:
    folder = Path("/out")
    folder.mkdir()
    atomic_write(folder / "a.json", b'{"x": 1}')
    assert (folder / "a.json").read_bytes() == b'{"x": 1}'
    assert _names(folder) == ["a.json"]


def test_atomic_write_replaces_the_whole_content(fs) -> None:
    path = Path("/out/a.json")
    fs.create_file(path, contents="a much longer old content than the new one\n" * 50)
    atomic_write(path, b"short")
    assert path.read_bytes() == b"short"  # nothing of the old tail survives


def test_atomic_write_replaces_by_rename_so_old_readers_keep_the_old_file(fs) -> None:
    path = Path("/out/a.json")
    fs.create_file(path, contents="old")
    with open(path, "rb") as reader:
        atomic_write(path, b"new")
        # A reader that opened the file before keeps the complete old version.
        assert reader.read() == b"old"
    assert path.read_bytes() == b"new"


def test_atomic_write_leaves_no_temporary_file(fs) -> None:
    folder = Path("/out")
    folder.mkdir()
    for i in range(3):
        atomic_write(folder / "a.json", f"{i}".encode())
    assert _names(folder) == ["a.json"]
    assert (folder / "a.json").read_bytes() == b"2"


def test_atomic_write_writes_empty_and_large_data(fs) -> None:
    folder = Path("/out")
    folder.mkdir()
    big = bytes(range(256)) * 4096  # 1 MiB, more than one write() may take
    atomic_write(folder / "big", big)
    atomic_write(folder / "empty", b"")
    assert (folder / "big").read_bytes() == big
    assert (folder / "empty").read_bytes() == b""


def test_atomic_write_handles_short_writes(fs, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = Path("/out")
    folder.mkdir()
    real_write = os.write

    def short_write(fd: int, data) -> int:  # at most 3 bytes per call, like a slow pipe
        return real_write(fd, bytes(data[:3]))

    monkeypatch.setattr(atomic_files.os, "write", short_write)
    atomic_write(folder / "a", b"0123456789")
    assert (folder / "a").read_bytes() == b"0123456789"


def test_atomic_write_new_file_is_readable_by_others(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.json", b"{}")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == 0o644


def test_failed_write_keeps_the_old_file_and_removes_the_temporary(
        fs, monkeypatch: pytest.MonkeyPatch) -> None:
    path = Path("/out/a.json")
    fs.create_file(path, contents="old")

    def disk_full(fd: int, data) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic_files.os, "write", disk_full)
    with pytest.raises(OSError) as info:
        atomic_write(path, b"new")
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"old"
    assert _names(path.parent) == ["a.json"]


def test_failed_rename_removes_the_temporary(fs) -> None:
    target = Path("/out/a.json")
    target.mkdir(parents=True)  # a folder is in the way: os.replace fails
    with pytest.raises(OSError):
        atomic_write(target, b"new")
    assert _names(target.parent) == ["a.json"]
    assert target.is_dir()


def test_atomic_write_never_writes_through_a_link_planted_at_a_temporary_name(
        tmp_path: Path) -> None:
    """A shared outbox: anyone who may write there plants links at the names a writer
    would use for its temporary file (its pid made them guessable)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    for pid in {os.getpid(), atomic_files.__dict__.get("_pid", 0)}:
        os.symlink(victim, outbox / f".a.json.{pid}.tmp")
    atomic_write(outbox / "a.json", b"new")
    assert victim.read_text() == "precious"
    assert not os.path.islink(outbox / "a.json")
    assert (outbox / "a.json").read_bytes() == b"new"


TOKEN_BYTES = 8  # atomic_write's temporary names carry 8 random bytes


def temporaries_replaced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the temporary files atomic_write renames into place, from now on."""
    names: list[str] = []
    real_replace = os.replace

    def recording_replace(src, dst) -> None:
        names.append(os.path.basename(src))
        real_replace(src, dst)

    monkeypatch.setattr(atomic_files.os, "replace", recording_replace)
    return names


def test_atomic_write_takes_a_new_hidden_name_where_one_is_taken(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    guessed, fresh = b"\x01" * 16, b"\x02" * 16
    tokens = iter([guessed, fresh])
    monkeypatch.setattr(atomic_files.os, "urandom", lambda n: next(tokens)[:n])
    taken = tmp_path / f".a.json.{guessed[:TOKEN_BYTES].hex()}.tmp"
    os.symlink(victim, taken)
    names = temporaries_replaced(monkeypatch)
    atomic_write(tmp_path / "a.json", b"new")
    monkeypatch.undo()
    assert names == [f".a.json.{fresh[:TOKEN_BYTES].hex()}.tmp"]
    assert victim.read_text() == "precious" and os.path.islink(taken)
    assert (tmp_path / "a.json").read_bytes() == b"new"


def test_atomic_write_uses_a_new_temporary_name_each_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = temporaries_replaced(monkeypatch)
    for _ in range(3):
        atomic_write(tmp_path / "a.json", b"{}")
    monkeypatch.undo()
    assert len(set(names)) == 3, names
    assert all(name.startswith(".a.json.") and name.endswith(".tmp") for name in names), names
    assert str(os.getpid()) not in "".join(names)


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every os.fsync as "file" or "dir", on the real file system."""
    calls: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        calls.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return calls


def test_durable_write_flushes_the_file_then_the_folder(tmp_path: Path, fsyncs: list[str]) -> None:
    atomic_write(tmp_path / "a.json", b"data", durable=True)
    assert fsyncs == ["file", "dir"]
    assert (tmp_path / "a.json").read_bytes() == b"data"
    assert _names(tmp_path) == ["a.json"]


def test_a_durable_write_alone_flushes_its_file_then_the_folder_at_once(
        tmp_path: Path, fsyncs: list[str]) -> None:
    shared = FolderFlush(tmp_path)
    atomic_write(tmp_path / "a.json", b"data", durable=True, folder_flush=shared)
    assert fsyncs == ["file", "dir"]
    assert shared.flushes == 1
    atomic_write(tmp_path / "b.json", b"data", durable=True, folder_flush=shared)
    assert fsyncs == ["file", "dir", "file", "dir"]  # alone again: flushed at once again


def test_writes_that_wait_while_a_flush_runs_share_the_next_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Thread A's flush of the folder is held up; B, C and D write meanwhile and ask.
    Their files are flushed each, and one flush of the folder, begun after their asks,
    serves all three: no ask returns before a flush that began after it."""
    real_fsync = os.fsync
    first_flush_began, release_first = threading.Event(), threading.Event()
    log: list[str] = []
    lock = threading.Lock()

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            with lock:
                log.append("dir begins")
                first = log.count("dir begins") == 1
            if first:
                first_flush_began.set()
                assert release_first.wait(30)
            real_fsync(fd)
            with lock:
                log.append("dir ends")
        else:
            real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    shared = FolderFlush(tmp_path)

    def write(name: str) -> None:
        atomic_write(tmp_path / f"{name}.json", name.encode(), durable=True,
                     folder_flush=shared)
        with lock:
            log.append(f"{name} returns")

    a = threading.Thread(target=write, args=("a",))
    a.start()
    assert first_flush_began.wait(30)
    others = [threading.Thread(target=write, args=(name,)) for name in "bcd"]
    for thread in others:
        thread.start()
    while True:  # every one of them has asked (and waits) before A's flush may end
        with shared._cond:
            if shared._asked == 4:
                break
        time.sleep(0.001)
    release_first.set()
    for thread in [a, *others]:
        thread.join(30)
    assert shared.flushes == 2
    assert log.count("dir begins") == 2
    second = log.index("dir begins", log.index("dir begins") + 1)
    for name in "bcd":
        assert log.index(f"{name} returns") > log.index("dir ends", second)
    assert log.index("a returns") > log.index("dir ends")


def test_a_failed_flush_raises_in_its_thread_and_the_next_ask_flushes_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = FolderFlush(tmp_path / "gone")
    with pytest.raises(FileNotFoundError):
        shared.flush()
    (tmp_path / "gone").mkdir()
    shared.flush()
    assert shared.flushes == 1


def test_plain_write_does_not_flush(tmp_path: Path, fsyncs: list[str]) -> None:
    atomic_write(tmp_path / "a.json", b"data")
    assert fsyncs == []
    assert (tmp_path / "a.json").read_bytes() == b"data"


def test_fsync_dir_flushes_a_folder(tmp_path: Path, fsyncs: list[str]) -> None:
    fsync_dir(tmp_path)
    assert fsyncs == ["dir"]


def test_flush_tree_flushes_every_file_and_folder_but_follows_nothing(
        tmp_path: Path, fsyncs: list[str]) -> None:
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"not ours")
    job = tmp_path / "job1"
    (job / "sub").mkdir(parents=True)
    (job / "frame1.png").write_bytes(b"1")
    (job / "sub" / "frame2.png").write_bytes(b"2")
    os.symlink(outside, job / "link.bin")
    os.mkfifo(job / "pipe")
    assert flush_tree(job) == 2
    assert sorted(fsyncs) == ["dir", "dir", "file", "file"]


def test_flush_tree_of_a_missing_folder_flushes_nothing(tmp_path: Path,
                                                        fsyncs: list[str]) -> None:
    assert flush_tree(tmp_path / "never_made") == 0
    assert fsyncs == []


# --- move_noreplace ------------------------------------------------------------------------


def test_move_noreplace_moves(fs) -> None:
    fs.create_file("/in/a.yaml", contents="job")
    move_noreplace(Path("/in/a.yaml"), Path("/in/b.yaml"))
    assert not Path("/in/a.yaml").exists()
    assert Path("/in/b.yaml").read_text() == "job"


def test_move_noreplace_refuses_to_overwrite(fs) -> None:
    fs.create_file("/in/a.yaml", contents="new")
    fs.create_file("/in/b.yaml", contents="old")
    with pytest.raises(FileExistsError):
        move_noreplace(Path("/in/a.yaml"), Path("/in/b.yaml"))
    assert Path("/in/a.yaml").read_text() == "new"
    assert Path("/in/b.yaml").read_text() == "old"


def test_move_noreplace_refuses_to_overwrite_a_dangling_link(fs) -> None:
    fs.create_file("/in/a.yaml", contents="new")
    os.symlink("/nowhere", "/in/b.yaml")
    with pytest.raises(FileExistsError):
        move_noreplace(Path("/in/a.yaml"), Path("/in/b.yaml"))
    assert Path("/in/a.yaml").read_text() == "new"
    assert os.readlink("/in/b.yaml") == "/nowhere"


def test_move_noreplace_when_the_source_is_gone(fs) -> None:
    Path("/in").mkdir()
    with pytest.raises(FileNotFoundError):
        move_noreplace(Path("/in/a.yaml"), Path("/in/b.yaml"))
    assert not Path("/in/b.yaml").exists()


def test_move_noreplace_moves_a_symlink_itself_not_its_target(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("secret")
    os.symlink(target, tmp_path / "link.yaml")
    move_noreplace(tmp_path / "link.yaml", tmp_path / "moved.yaml")
    assert os.path.islink(tmp_path / "moved.yaml")
    assert os.readlink(tmp_path / "moved.yaml") == str(target)
    assert not os.path.lexists(tmp_path / "link.yaml")
    assert target.read_text() == "secret"


@pytest.mark.parametrize("code", [errno.EPERM, errno.ENOTSUP, errno.EMLINK])
def test_move_noreplace_without_hard_links_falls_back_to_rename(
        fs, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    fs.create_file("/in/a.yaml", contents="job")

    def no_links(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(atomic_files.os, "link", no_links)
    move_noreplace(Path("/in/a.yaml"), Path("/in/b.yaml"))
    assert Path("/in/b.yaml").read_text() == "job"
    assert not Path("/in/a.yaml").exists()


def test_move_noreplace_without_hard_links_still_refuses_to_overwrite(
        fs, monkeypatch: pytest.MonkeyPatch) -> None:
    fs.create_file("/in/a.yaml", contents="new")
    fs.create_file("/in/b.yaml", contents="old")

    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(atomic_files.os, "link", no_links)
    with pytest.raises(FileExistsError):
        move_noreplace(Path("/in/a.yaml"), Path("/in/b.yaml"))
    assert Path("/in/b.yaml").read_text() == "old"
    assert Path("/in/a.yaml").read_text() == "new"


def test_move_noreplace_without_hard_links_when_the_source_is_gone(
        fs, monkeypatch: pytest.MonkeyPatch) -> None:
    Path("/in").mkdir()

    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(atomic_files.os, "link", no_links)
    with pytest.raises(FileNotFoundError):
        move_noreplace(Path("/in/a.yaml"), Path("/in/b.yaml"))


def test_move_noreplace_passes_other_errors_on(fs, monkeypatch: pytest.MonkeyPatch) -> None:
    fs.create_file("/in/a.yaml", contents="job")

    def cross_device(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(atomic_files.os, "link", cross_device)
    with pytest.raises(OSError) as info:
        move_noreplace(Path("/in/a.yaml"), Path("/in/b.yaml"))
    assert info.value.errno == errno.EXDEV
    assert Path("/in/a.yaml").read_text() == "job"
    assert not Path("/in/b.yaml").exists()


# --- rename_noreplace (real renameat2: tmp_path, not pyfakefs) ----------------------------


def test_rename_noreplace_moves_the_same_file(tmp_path: Path) -> None:
    src, dst = tmp_path / ".job1.yaml.tmp", tmp_path / "job1.yaml"
    src.write_text("job")
    inode = os.stat(src).st_ino
    rename_noreplace(src, dst)
    assert dst.read_text() == "job"
    assert os.stat(dst).st_ino == inode
    assert os.stat(dst).st_nlink == 1
    assert not os.path.lexists(src)


def test_rename_noreplace_refuses_to_overwrite(tmp_path: Path) -> None:
    src, dst = tmp_path / "new", tmp_path / "old"
    src.write_text("new")
    dst.write_text("old")
    with pytest.raises(FileExistsError):
        rename_noreplace(src, dst)
    assert src.read_text() == "new"
    assert dst.read_text() == "old"


def test_rename_noreplace_when_the_source_is_gone(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        rename_noreplace(tmp_path / "gone", tmp_path / "dst")
    assert not os.path.lexists(tmp_path / "dst")


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOSYS])
def test_rename_noreplace_falls_back_where_renameat2_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    calls: list[bytes] = []

    def refusing_renameat2(olddirfd, old, newdirfd, new, flags) -> int:
        calls.append(old)
        ctypes.set_errno(code)
        return -1

    monkeypatch.setattr(atomic_files, "_renameat2", refusing_renameat2)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_text("job")
    rename_noreplace(src, dst)
    assert calls == [os.fsencode(src)]
    assert dst.read_text() == "job"
    assert not os.path.lexists(src)
    src.write_text("again")
    with pytest.raises(FileExistsError):  # the fallback never overwrites either
        rename_noreplace(src, dst)
    assert dst.read_text() == "job"


def test_rename_noreplace_without_renameat2(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(atomic_files, "_renameat2", None)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_text("job")
    rename_noreplace(src, dst)
    assert dst.read_text() == "job"
    assert not os.path.lexists(src)


# --- the portable move under real concurrency (the fallback of NFS, CephFS, FUSE) ------------


def moved(src: Path, dst: Path) -> Path:
    rename_noreplace(src, dst)
    return dst


@pytest.fixture
def portable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Moves as where renameat2 is refused: a link, then an unlink."""
    monkeypatch.setattr(atomic_files, "_renameat2", None)


@pytest.mark.usefixtures("portable")
def test_movers_to_different_names_never_both_win(tmp_path: Path) -> None:
    src = tmp_path / "job.yaml"
    for round_ in range(ROUNDS):
        src.write_text(f"round {round_}")
        dsts = [tmp_path / f"node{i}" / f"job{round_}.yaml" for i in range(4)]
        for dst in dsts:
            dst.parent.mkdir(exist_ok=True)
        outcomes = race(4, lambda i, d=dsts: moved(src, d[i]))
        assert sorted(outcomes) == ["gone", "gone", "gone", "moved"], (round_, outcomes)
        winner = dsts[outcomes.index("moved")]
        left = [dst for dst in [src, *dsts] if os.path.lexists(dst)]
        assert left == [winner], (round_, outcomes, left)
        assert winner.read_text() == f"round {round_}"
        assert os.stat(winner).st_nlink == 1


@pytest.mark.usefixtures("portable")
def test_movers_to_one_name_never_lose_the_file(tmp_path: Path) -> None:
    src, dst = tmp_path / "job.yaml", tmp_path / "invalid" / "job.yaml"
    dst.parent.mkdir()
    for round_ in range(ROUNDS):
        src.write_text(f"round {round_}")
        outcomes = race(4, lambda i: moved(src, dst))
        assert "moved" in outcomes and "exists" not in outcomes, (round_, outcomes)
        assert dst.read_text() == f"round {round_}", (round_, outcomes)
        assert not os.path.lexists(src)
        assert os.stat(dst).st_nlink == 1
        dst.unlink()


@pytest.mark.usefixtures("portable")
def test_movers_to_shared_and_own_names_leave_one_file(tmp_path: Path) -> None:
    """Two movers aim at one name, two at names of their own: one name keeps the file, and
    only movers that aimed at it say they moved it."""
    src = tmp_path / "job.yaml"
    for round_ in range(ROUNDS):
        src.write_text(f"round {round_}")
        dsts = [tmp_path / f"{name}{round_}.yaml" for name in ("shared", "shared", "b", "c")]
        outcomes = race(4, lambda i, d=dsts: moved(src, d[i]))
        left = [dst for dst in {src, *dsts} if os.path.lexists(dst)]
        assert len(left) == 1, (round_, outcomes, left)
        assert left[0].read_text() == f"round {round_}"
        assert os.stat(left[0]).st_nlink == 1
        winners = {dsts[i] for i, outcome in enumerate(outcomes) if outcome == "moved"}
        assert winners == {left[0]}, (round_, outcomes, left)
        left[0].unlink()


@pytest.mark.usefixtures("portable")
def test_a_mover_that_links_but_finds_the_source_gone_takes_its_link_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, ours, theirs = tmp_path / "job.yaml", tmp_path / "a.yaml", tmp_path / "b.yaml"
    src.write_text("job")
    real_link = os.link

    def link_then_lose(a, b, **kwargs) -> None:
        real_link(a, b, **kwargs)
        real_link(src, theirs)  # another node links it too, and unlinks the source first
        os.unlink(src)

    monkeypatch.setattr(atomic_files.os, "link", link_then_lose)
    with pytest.raises(FileNotFoundError):
        rename_noreplace(src, ours)
    assert not os.path.lexists(ours)
    assert theirs.read_text() == "job" and os.stat(theirs).st_nlink == 1


@pytest.mark.usefixtures("portable")
def test_an_unlink_that_reports_the_source_gone_after_removing_it_still_moved(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NFS retries a request whose reply was lost: the retried unlink says ENOENT."""
    src, dst = tmp_path / "job.yaml", tmp_path / "a.yaml"
    src.write_text("job")
    real_unlink = os.unlink

    def retried_unlink(path, *args, **kwargs) -> None:
        real_unlink(path, *args, **kwargs)
        raise FileNotFoundError(errno.ENOENT, "No such file or directory")

    monkeypatch.setattr(atomic_files.os, "unlink", retried_unlink)
    rename_noreplace(src, dst)
    monkeypatch.undo()
    assert dst.read_text() == "job"
    assert not os.path.lexists(src)


@pytest.mark.parametrize("renameat2", [True, False])
def test_a_move_abandoned_after_its_link_is_finished_after_the_grace(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, renameat2: bool) -> None:
    if not renameat2:
        monkeypatch.setattr(atomic_files, "_renameat2", None)
    monkeypatch.setattr(atomic_files, "MOVER_GRACE_S", 0.05)
    src, dst = tmp_path / "job.yaml", tmp_path / "a.yaml"
    src.write_text("job")
    os.link(src, dst)  # a mover killed between its link and its unlink
    rename_noreplace(src, dst)
    assert dst.read_text() == "job" and os.stat(dst).st_nlink == 1
    assert not os.path.lexists(src)


def test_kinod_portable_rename_forces_the_portable_move(tmp_path: Path) -> None:
    code = "from kinod import atomic_files; print(atomic_files._renameat2 is None)"
    for value, forced in (("1", "True"), ("", "False")):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                env={**os.environ, "KINOD_PORTABLE_RENAME": value}, timeout=60)
        assert result.stdout.strip() == forced, result.stderr


def test_read_whole_reads_a_file_of_any_size_and_raises_for_a_missing_one(
        tmp_path: Path) -> None:
    data = bytes(range(256)) * 1000  # more than one read's worth
    (tmp_path / "big").write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    assert read_whole(tmp_path / "big") == data
    assert read_whole(str(tmp_path / "empty")) == b""
    with pytest.raises(FileNotFoundError):
        read_whole(tmp_path / "missing")
