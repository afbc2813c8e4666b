"""The only module that moves job files. A job's state on disk is the folder its file is in.

    inbox/<id>.yaml                      dropped, not yet accepted
    inbox/.kinod/queued/<id>.yaml        accepted, waiting to run on any node
    inbox/.kinod/held/<id>.yaml          accepted, held until released (SPEC §8)
    inbox/.kinod/running/<node>/<id>.yaml  held by daemon <node>: being taken in, waiting
                                           while <node> serves the inbox alone, or running
    inbox/.kinod/done/<id>/<n>.yaml      ended: the n-th run of <id>
    inbox/.kinod/duplicates/<id>/<n>.yaml  resubmitted while <id> was queued or running
    inbox/.kinod/invalid/<name>          a name that is not a valid job id
    inbox/.kinod/counts/<id>.json        how often <id> crashed a daemon or failed retryably
    inbox/.kinod/nodes/<node>.json       the heartbeat of daemon <node> (kinod.nodes)
    inbox/.kinod/mail/<node>             names of queued jobs of <node>'s share, a hint
                                         (polling nodes: kinod.share_mail)

Everything lives inside the inbox, on the same file system, so every move is
an atomic rename: a crash leaves each file in exactly one of these places.
(Where renameat2 is refused, NFS among them, a move is a link then an unlink,
and a crash between the two leaves a file under two names; recovery and the
next move of the file finish it: see kinod.atomic_files.)
Several daemons may share the inbox: the rename that takes a file into
running/<node>/ succeeds for one of them only, and only the daemon holding a
job's file there writes the job's sidecar.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path

from kinod.atomic_files import atomic_write, rename_noreplace
from kinod.errors import ConfigError
from kinod.intake import JOB_SUFFIXES
from kinod.listing_gate import ListingGate

# running/ (a folder per node) is listed whatever its mtime says (kinod.listing_gate) once
# RUNNING_SAFETY_S for each node folder in it: the fleet as a whole then lists it about
# once a RUNNING_SAFETY_S however many nodes share the inbox, where one period per node
# made the listings grow with the nodes. At least once a RUNNING_SAFETY_MAX_S: NFS's
# default acdirmax, past which a client's cached mtime shows the change itself.
RUNNING_SAFETY_S = 5.0
RUNNING_SAFETY_MAX_S = 60.0
# running/ is looked up for every file dropped, on every node: listed at most this often
# while its mtime stays as it was.
RUNNING_MIN_INTERVAL_S = 0.5


class Spool:
    def __init__(self, inbox: Path, node: str) -> None:
        self.inbox = inbox
        self.root = inbox / ".kinod"
        self.queued = self.root / "queued"
        self.held = self.root / "held"
        self.running_root = self.root / "running"
        self.running = self.running_root / node
        self.done = self.root / "done"
        self.duplicates = self.root / "duplicates"
        self.invalid = self.root / "invalid"
        self.counts = self.root / "counts"
        self.nodes = self.root / "nodes"
        self.mail = self.root / "mail"
        # As text too: the paths made for every job are joined as strings, not Paths.
        self._running_root, self._queued, self._held, self._counts, self._running = map(
            str, (self.running_root, self.queued, self.held, self.counts, self.running))
        # A node's folder made since the last listing shows within the gate's safety_s
        # even where a client caches the folder's attributes (NFS).
        self._running_gate = ListingGate(self.running_root, time.monotonic, RUNNING_SAFETY_S,
                                         RUNNING_MIN_INTERVAL_S)
        # Ids whose done/<id>/ prepare_done made, empty, for finish to rename into.
        self._done_made: set[str] = set()
        self._running_cache: list[str] | None = None

    def ensure_folders(self) -> None:
        for folder in (self.queued, self.held, self.running, self.done, self.duplicates,
                       self.invalid, self.counts, self.nodes, self.mail):
            folder.mkdir(parents=True, exist_ok=True)

    def lock_node(self) -> int:
        """Hold this node's lock for as long as the returned descriptor stays open.

        Two daemons with one node name on one inbox would each take the other's
        running jobs for crashed ones and run them again: the second one is refused.
        """
        path = self.running.parent / f"{self.running.name}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(f"another kinod (pid {holder}) already runs as node "
                              f"{self.running.name!r} on {self.inbox}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # at offset 0: the file was just opened
        return fd

    def accept(self, src: Path) -> Path:
        """inbox → running/<node>: this daemon alone takes the file in (FileNotFoundError if
        another was first). It then writes the first sidecar, and ``release``s the job.

        The suffix is made lower case (``u1.YAML`` → ``u1.yaml``): every file inside the
        spool has a lower-case suffix, so ``holds`` looks for one spelling only.
        """
        dst = self.running / _spool_name(src.name)
        if os.path.lexists(dst):
            self.set_aside_duplicate(dst, _job_id(dst))
        rename_noreplace(src, dst)
        return dst

    def release(self, running: Path) -> Path:
        """running/<node> → queued, for any daemon to claim. FileExistsError (and nothing
        moved) if a file of that name is queued already: an active job of that id."""
        dst = self.queued / _spool_name(running.name)
        rename_noreplace(running, dst)
        return dst

    def take_over(self, path: Path) -> Path | None:
        """Another node's running/ → this node's: its lease ran out. None if another live
        node took it first."""
        dst = self.running / _spool_name(path.name)
        try:
            rename_noreplace(path, dst)
        except (FileNotFoundError, FileExistsError):
            return None
        return dst

    def put_on_hold(self, running: Path) -> Path:
        """running/<node> → held/, where it waits to be released. A file of that name held
        already (it cannot be: its id is active) is set aside, never replaced."""
        return self._move_in(running, self.held)

    def held_job(self, job_id: str) -> Path | None:
        """The file of a held job, or None."""
        for suffix in JOB_SUFFIXES:
            if os.path.lexists(path := f"{self._held}/{job_id}{suffix}"):
                return Path(path)
        return None

    def claim_held(self, job_id: str) -> Path | None:
        """held/ → running/<node>, to release, hold or stop it; None if it is not held (or
        another node claimed it first)."""
        held = self.held_job(job_id)
        return self.claim(held) if held is not None else None

    def holds(self, job_id: str, *, here_only: bool = False) -> bool:
        """A file of ``job_id`` is queued, held or running on some node: the job is active.
        ``here_only``: running on this node, not on others (see ``held_file``)."""
        return self.held_file(job_id, here_only=here_only) is not None

    def held_file(self, job_id: str, *, here_only: bool = False) -> str | None:
        """The path of the file of ``job_id`` queued, held or running on some node; None if
        the job is not active.

        Running folders, queued/ and held/, then the running folders again: a file that
        moves between them meanwhile (a claim, a requeue) is seen in one of the looks.
        Only lower-case suffixes are looked for: every move into the spool makes them so.

        ``here_only`` leaves out the other nodes' running folders, which cost three
        lookups each: for a caller that knows no other node runs the job.
        """
        # Strings, not Paths: this runs for every job taken in.
        running = [self._running] if here_only else self._running_folders()
        names = [job_id + suffix for suffix in JOB_SUFFIXES]
        for folder in (*running, self._queued, self._held, *running):
            for name in names:
                if os.path.lexists(path := f"{folder}/{name}"):
                    return path
        return None

    def other_nodes(self) -> list[str]:
        """Nodes other than this one with a running/ folder."""
        return [name for name in map(os.path.basename, self._running_folders())
                if name != self.running.name]

    def running_files_of(self, node: str) -> list[Path]:
        return _files_in(self.running_root / node)

    def _running_folders(self) -> list[str]:
        """Each node's running/ folder. Listed again only when running/'s mtime says a
        folder may have come or gone (kinod.listing_gate): looking up an id runs for every
        file dropped, on every node, and a listing each time would grow with the nodes."""
        if self._running_gate.should_list() or self._running_cache is None:
            try:
                with os.scandir(self._running_root) as entries:
                    self._running_cache = [e.path for e in entries
                                           if e.is_dir(follow_symlinks=False)]
            except FileNotFoundError:
                self._running_cache = []
            self._running_gate.safety_s = min(
                RUNNING_SAFETY_MAX_S, RUNNING_SAFETY_S * max(1, len(self._running_cache)))
        return self._running_cache

    def claim(self, queued: Path) -> Path | None:
        """queued → running/<node>; None if the file is gone (someone else took it).

        A plain rename: the source vanishing is what makes a claim exclusive.
        Only this daemon writes running/<node>/; a file of the same name left
        there (it cannot be running) is set aside, never replaced. Not flushed to
        disk: a claim a power cut undoes puts the job back in queued/, and it runs
        again, as after any crash.
        """
        dst = self.running / _spool_name(queued.name)
        if os.path.lexists(dst):
            self.set_aside_duplicate(dst, _job_id(dst))
        try:
            os.rename(queued, dst)
        except FileNotFoundError:
            return None
        return dst

    def requeue(self, running: Path) -> Path:
        """running → queued: to run again after a retryable failure, a crash or a shutdown.

        A file of the same name already in queued/ is a later submission that
        should have waited: it is set aside as a duplicate, never overwritten.
        """
        return self._move_in(running, self.queued)

    def _move_in(self, running: Path, folder: Path) -> Path:
        """running/<node> → ``folder``; a file of that name there already is set aside as a
        duplicate, never overwritten."""
        dst = folder / _spool_name(running.name)
        while True:
            try:
                rename_noreplace(running, dst)
                return dst
            except FileExistsError:
                self.set_aside_duplicate(dst, _job_id(dst))

    def finish(self, path: Path, job_id: str) -> Path:
        """→ done/<id>/<n>.<ext>, where the job file stays for good."""
        made = job_id in self._done_made
        self._done_made.discard(job_id)
        return self._file_away(path, self.done / job_id, made)

    def prepare_done(self, job_id: str) -> None:
        """Make done/<id>/ ahead of ``finish``, on any thread (making a folder is the
        dearest step of filing a job away): ``finish`` then renames into it at once. A
        folder there already (an earlier run's) is left to ``finish`` to count."""
        try:
            os.mkdir(self.done / job_id)
        except OSError:
            return
        self._done_made.add(job_id)

    def set_aside_duplicate(self, path: Path, job_id: str) -> Path:
        return self._file_away(path, self.duplicates / job_id)

    def set_aside_invalid(self, path: Path) -> Path:
        dst = self.invalid / path.name
        n = 1
        while True:
            try:
                rename_noreplace(path, dst)
                return dst
            except FileExistsError:
                n += 1
                dst = self.invalid / f"{path.name[:200]}.{n}"  # a name may be 255 bytes already

    def count(self, job_id: str, event: str) -> int:
        """Count one more ``event`` ("crashes", "failures") of the current run of ``job_id``;
        returns the new total. Kept on disk, so restarts do not reset it."""
        path = self.counts / f"{job_id}.json"
        try:
            counts = json.loads(path.read_bytes())
        except (FileNotFoundError, ValueError):
            counts = {}
        counts[event] = int(counts.get(event, 0)) + 1
        atomic_write(path, json.dumps(counts).encode(), durable=True)
        return counts[event]

    def forget_counts(self, job_id: str) -> None:
        """The run ended: its counts go (one cheap unlink when there are none)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{self._counts}/{job_id}.json")

    def queued_names(self) -> set[str]:
        """The names in queued/, as text: a backlog of 100,000 Paths costs 20 MB and
        seconds of CPU at every rescan."""
        return set(_names_in(self.queued))

    def running_files(self) -> list[Path]:
        return _files_in(self.running)

    def running_names(self) -> list[str]:
        return _names_in(self.running)

    def _file_away(self, path: Path, folder: Path, made: bool = False) -> Path:
        """Move to ``folder/<n><suffix>``, n one more than any run number there
        (``made``: the folder was made empty for this move a moment ago).

        FileNotFoundError if ``path`` is gone, or the spool with it (the inbox was
        deleted): the inbox itself is never re-created behind its owner's back.
        """
        try:
            if not made:
                os.mkdir(folder)
            n = 1  # a new id's folder, the common case: nothing to list
        except FileExistsError:
            numbers = [int(stem) for stem, _, _ in
                       (name.partition(".") for name in os.listdir(folder)) if stem.isdigit()]
            n = max(numbers, default=0) + 1
        while True:
            dst = folder / f"{n}{_suffix(path)}"
            try:
                rename_noreplace(path, dst)
                return dst
            except FileExistsError:
                n += 1
            except FileNotFoundError:
                if made and os.path.lexists(path):  # the folder made ahead went meanwhile
                    made = False
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(folder)
                    continue
                with contextlib.suppress(OSError):
                    folder.rmdir()  # made for nothing: another node took the file (if empty)
                raise


def _job_id(path: Path) -> str:
    return path.name.rpartition(".")[0]


def _spool_name(name: str) -> str:
    """A job file's name inside the spool: its suffix in lower case. Also on the moves
    between spool folders, which so bring a file left by an older kinod into line."""
    stem, dot, suffix = name.rpartition(".")
    return f"{stem}.{suffix.lower()}" if dot else name


def _suffix(path: Path) -> str:
    return path.suffix.lower() or ".yaml"


def _names_in(folder: Path) -> list[str]:
    """The names of the job files in ``folder`` (none if it is gone); hidden ones are
    temporaries."""
    try:
        with os.scandir(folder) as entries:
            return [e.name for e in entries if not e.name.startswith(".")]
    except FileNotFoundError:
        return []


def _files_in(folder: Path) -> list[Path]:
    return [folder / name for name in _names_in(folder)]
