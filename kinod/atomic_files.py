"""File writes and moves that readers and crashes never see half-done."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
from pathlib import Path

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)
# The writer's pid names its temporary files; kept, not asked for at every write.
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def atomic_write(path: str | Path, data: bytes, *, durable: bool = False) -> None:
    """Replace ``path`` with ``data`` in one step: a temporary file beside it, then rename.

    ``durable`` also flushes the data and the folder entry to disk, so the new
    content survives a power cut (not only a crash of this process).
    """
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{_pid}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    if durable:
        fsync_dir(folder)


def read_whole(path: str | Path) -> bytes:
    """A small file's bytes, by os.open and os.read: open() would also build a buffered
    file object, at the cost of an fstat, an isatty ioctl and two seeks."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def move_noreplace(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; FileExistsError if ``dst`` exists, FileNotFoundError if
    ``src`` is gone (another process took it first). Never overwrites.

    A hard link then an unlink is atomic about ``dst`` on every POSIX file
    system, NFS included; a crash between the two leaves one file under two
    names, and moving it again finishes the move. Where links are not
    supported (some SMB mounts), a check then a rename, enough for one daemon
    per folder.
    """
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        if not _same_file(src, dst):
            raise
        # An earlier move was cut short after its link (or another process is halfway
        # through this one): finish it.
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "destination exists", str(dst)) from None
        os.rename(src, dst)
        return
    try:
        os.unlink(src)
    except FileNotFoundError:
        pass


def rename_noreplace(src: Path, dst: Path) -> None:
    """Like ``move_noreplace``, but one atomic rename where the system has one that can
    refuse to overwrite (Linux's renameat2): a watcher of ``dst``'s folder sees a file moved
    in, complete, and a newer file renamed over ``src`` meanwhile is never unlinked with it.
    Elsewhere (some network file systems) it falls back to ``move_noreplace``."""
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst),
                      _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code == errno.EEXIST and _same_file(src, dst):
            # A fallback move cut short after its link: finish it.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(src)
            return
        # Not supported here: move the portable way. ENOENT too: the portable move raises
        # FileNotFoundError just the same if the file is gone (and sees the fake file
        # systems tests put in os's place, which libc cannot).
        if code not in (errno.ENOENT, errno.EINVAL, errno.ENOSYS, errno.ENOTSUP,
                        errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), str(src), None, str(dst))
    move_noreplace(src, dst)


def flush_tree(folder: Path) -> int:
    """Flush every regular file under ``folder``, and every folder's entries, to disk;
    returns how many files. Links are not followed; what vanishes meanwhile is skipped."""
    files = 0
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            try:
                if not stat.S_ISREG(os.lstat(path).st_mode):
                    continue
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            files += 1
        with contextlib.suppress(FileNotFoundError):
            fsync_dir(Path(parent))
    return files


def fsync_dir(folder: str | Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samestat(os.lstat(a), os.lstat(b))
    except OSError:
        return False


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
