"""File writes and moves that readers and crashes never see half-done."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_libc = ctypes.CDLL(None, use_errno=True)
# KINOD_PORTABLE_RENAME=1 moves files the portable way (a link, then an unlink) everywhere:
# for mounts whose renameat2 misbehaves, and for tests of that way.
_renameat2 = (None if os.environ.get("KINOD_PORTABLE_RENAME") == "1"
              else getattr(_libc, "renameat2", None))
# How long a process may take between the link and the unlink of a portable move: another
# that finds the link waits this long for it before it calls the move abandoned.
MOVER_GRACE_S = 1.0
# A temporary file is always a new one: never an existing file, nor a link's target.
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def atomic_write(path: str | Path, data: bytes, *, durable: bool = False,
                 folder_flush: FolderFlush | None = None) -> None:
    """Replace ``path`` with ``data`` in one step: a temporary file beside it, then rename.

    ``durable`` also flushes the data and the folder entry to disk, so the new
    content survives a power cut (not only a crash of this process). The folder's
    flush goes through ``folder_flush`` when given: one flush then serves every
    write that waits for it at the moment.
    """
    folder, name = os.path.split(path)
    fd, tmp = new_temporary(folder, name)
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
        if folder_flush is not None:
            folder_flush.flush()
        else:
            fsync_dir(folder)


class FolderFlush:
    """Flushes of one folder's entries to disk, shared by the threads that ask at once.

    A thread calls ``flush`` after its rename into the folder; it returns once a flush
    that began after that call has ended. One thread flushes while the others wait;
    those that asked meanwhile are served together by the next flush, which their
    first arrival starts at once. So a write alone is flushed at once, writes that end
    together share a flush, and nobody waits for company: only what already waits is
    batched. A flush that fails raises in the thread that made it; the others try
    their own.

    ``also``: more syncs each flush makes after the folder's (a journal written beside
    the folder's files, whose lines must be on disk with them).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = folder
        self.flushes = 0  # made so far: how many flushes served the asks
        self.also: list[Callable[[], None]] = []
        self._cond = threading.Condition(threading.Lock())
        self._asked = 0  # asks so far; each is numbered
        self._served = 0  # every ask up to this number is on disk
        self._busy = False

    def flush(self) -> None:
        with self._cond:
            self._asked += 1
            mine = self._asked
            while self._served < mine:
                if self._busy:
                    self._cond.wait()
                    continue
                self._busy = True
                covers = self._asked  # every ask made before the flush begins
                self._cond.release()
                try:
                    fsync_dir(self.folder)
                    for sync in self.also:
                        sync()
                finally:
                    self._cond.acquire()
                    self._busy = False
                    self._cond.notify_all()
                self._served = max(self._served, covers)
                self.flushes += 1


def new_temporary(folder: str, name: str, mode: int = 0o644) -> tuple[int, str]:
    """A new hidden file beside ``name`` (readers skip dot-names), under a name nobody can
    guess: others who may write the folder cannot plant a link there for us to write
    through. Not tempfile.mkstemp: its files are 0600, and ours are ``mode`` less the
    umask. Returns its descriptor, open for writing, and its path."""
    for _ in range(100):
        tmp = os.path.join(folder, f".{name}.{os.urandom(8).hex()}.tmp")
        try:
            return os.open(tmp, _NEW_FILE, mode), tmp
        except FileExistsError:
            continue  # planted, or a chance in 2**64: another name
    raise FileExistsError(errno.EEXIST, "no free temporary name", folder)


def read_whole(path: str | Path) -> bytes:
    """A small file's bytes, by os.open and os.read: open() would also build a buffered
    file object, at the cost of an fstat, an isatty ioctl and two seeks."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return read_rest(fd)
    finally:
        os.close(fd)


_CHUNK = 1 << 16


def read_rest(fd: int, limit: int | None = None) -> bytes:
    """What is left to read of a regular file, up to a little past ``limit`` bytes if given.
    A read shorter than asked is the end of a regular file: a small file takes one read,
    not a second one that returns nothing."""
    chunk = os.read(fd, _CHUNK)
    if len(chunk) < _CHUNK:
        return chunk
    chunks, total = [chunk], len(chunk)
    while (limit is None or total <= limit) and (chunk := os.read(fd, _CHUNK)):
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def move_noreplace(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; FileExistsError if ``dst`` exists, FileNotFoundError if
    ``src`` is gone (another process took it first). Never overwrites.

    A hard link then an unlink is atomic about ``dst`` on every POSIX file
    system, NFS included, and of several processes moving one file, the one
    whose unlink removes ``src`` wins (see ``_unlink_source``); a crash between
    the two leaves one file under two names, and moving it again to the same
    place finishes the move. Where links are refused (some SMB mounts, or
    ``fs.protected_hardlinks`` with another user's file), a check then a
    rename: a rename of one name still succeeds once, so a move to a name only
    this process writes stays exclusive.
    """
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        if same_file(src, dst):
            _follow_move(src, dst)
            return
        if not os.path.lexists(src):  # another process took it meanwhile
            raise FileNotFoundError(errno.ENOENT, "moved away", str(src)) from None
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "destination exists", str(dst)) from None
        os.rename(src, dst)
        return
    _unlink_source(src, dst)


# Several processes moving one file by link and unlink: each links src to its dst, and the
# one whose unlink of src succeeds has moved the file (_unlink_source). Only a process whose
# link made a name decides for that name; one that finds its dst already linked to src
# follows the decision of the process that made it (_follow_move). Were both to decide,
# movers of one file to one name (two nodes setting it aside) beside a mover to another
# name could each remove a name the winner left the file under, its last one included.
# Limits: a mover held up longer than MOVER_GRACE_S between its link and its unlink is
# taken for dead; an NFS unlink of src retried after its reply was lost (and not answered
# from the server's duplicate request cache) reads as lost, and if a loser counts the
# names at that moment, or the file has a hard link made outside kinod, both take their
# names back and the file is gone from the spool.


def _unlink_source(src: Path, dst: Path) -> None:
    """The second half of a move by link, where its race is decided: of processes that each
    linked ``src`` to a name they made, the one whose unlink of ``src`` succeeds moved the
    file; the others take their name back and raise FileNotFoundError."""
    try:
        os.unlink(src)
        return
    except FileNotFoundError:
        pass
    # Someone else unlinked src: a process that moved the file to its own name (then the
    # file has two names, theirs and ours: ours goes), or NFS retrying our own unlink, whose
    # reply was lost (then ours is the only name left: removing it would lose the file). The
    # link count tells them apart, read from a fresh open: NFS revalidates it there.
    if _fresh_stat(dst).st_nlink > 1:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dst)
        raise FileNotFoundError(errno.ENOENT, "another process moved it first", str(src))


def _follow_move(src: Path, dst: Path) -> None:
    """``dst`` already names ``src``'s file: the process that linked it is about to unlink
    ``src``, or a crash cut its move short. A live one decides for its name (raises
    FileNotFoundError here if it lost); an abandoned move is finished. Other names still
    there after the grace (a dead mover's, a hard link made outside) leave ours standing."""
    seen = os.lstat(dst)
    deadline = time.monotonic() + MOVER_GRACE_S
    while same_file(src, dst):
        if time.monotonic() > deadline:
            try:
                os.unlink(src)  # nobody finished it: a crash left it
                return
            except FileNotFoundError:
                break  # decided just now
        time.sleep(0.002)
    # Decided. If another name won, dst's maker removes dst; if dst won, the other names go.
    # The count first, then the name: its maker may remove dst between the two looks.
    deadline = time.monotonic() + MOVER_GRACE_S
    while True:
        names = _fresh_stat(dst).st_nlink
        if not same_file(dst, seen):
            raise FileNotFoundError(errno.ENOENT, "another process moved it first", str(src))
        if names == 1 or time.monotonic() > deadline:
            return
        time.sleep(0.002)


def _fresh_stat(path: Path) -> os.stat_result:
    """``path``'s attributes as the file server has them now (NFS revalidates them at an
    open); FileNotFoundError if it is gone. Closed at once: NFS unlinks an open file by
    renaming it."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        return st  # a link, a FIFO, a device: never opened
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError:  # not readable by us: the attributes at hand
        return st
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


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
        if code == errno.EEXIST and same_file(src, dst):
            # A portable move under way, or cut short after its link: follow it.
            _follow_move(src, dst)
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


def same_file(a: Path, b: Path | os.stat_result) -> bool:
    try:
        return os.path.samestat(os.lstat(a), b if isinstance(b, os.stat_result) else os.lstat(b))
    except OSError:
        return False


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
