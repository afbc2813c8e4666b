"""atomic_write and move_noreplace: whole replacements, no leftovers, no overwrites."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from pathlib import Path

import pytest

from kinod import atomic_files
from kinod.atomic_files import (
    atomic_write,
    flush_tree,
    fsync_dir,
    move_noreplace,
    read_whole,
    rename_noreplace,
)


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


def test_read_whole_reads_a_file_of_any_size_and_raises_for_a_missing_one(
        tmp_path: Path) -> None:
    data = bytes(range(256)) * 1000  # more than one read's worth
    (tmp_path / "big").write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    assert read_whole(tmp_path / "big") == data
    assert read_whole(str(tmp_path / "empty")) == b""
    with pytest.raises(FileNotFoundError):
        read_whole(tmp_path / "missing")
