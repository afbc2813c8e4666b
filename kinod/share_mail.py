"""Word of queued jobs to the node whose share they are, so that polling nodes find their
share without listing the whole of queued/ at every poll.

A node that queues another node's job appends the job file's name to that node's mail
file (``inbox/.kinod/mail/<node>``), one write per node and turn. A node stats its own
mail file at every poll and reads only what was appended since (a change marker that is
cheap to poll); the queue itself is listed once a round of turns (kinod.stages.fleet).

Mail is a hint, never the truth: queued/ is. A name read is looked at there like any
other, and a name lost (two nodes appending at once over NFS, a line torn, a file
rotated as a node appends) only makes its job wait for the next listing, or for another
node to take it. Names that are not a plain file name are ignored. Nothing is written
through a link, nor does a FIFO planted there block: mail is appended as a job's log is
(kinod.logs.append_job_line), and read with O_NOFOLLOW and O_NONBLOCK.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

from loguru import logger

from kinod.atomic_files import read_rest
from kinod.logs import append_job_line

# A mail file read to its end is started afresh past this size; a writer that opened it
# just before loses its lines (see above).
ROTATE_BYTES = 64 * 1024
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class ShareMail:
    def __init__(self, folder: Path, node: str) -> None:
        self.folder = folder
        self._own = folder / node
        self._outgoing: defaultdict[str, list[str]] = defaultdict(list)
        self._read_to: tuple[int, int] = (0, 0)  # (inode, offset) of the own file

    # --- sending ----------------------------------------------------------------------

    def post(self, owner: str, name: str) -> None:
        """Note ``name`` for ``owner``; sent by ``send``."""
        self._outgoing[owner].append(name)

    def send(self) -> None:
        """Append each owner's names to its mail file, one write each."""
        if not self._outgoing:
            return  # the common case: called at every turn of the daemon's loop
        outgoing, self._outgoing = self._outgoing, defaultdict(list)
        for owner, names in outgoing.items():
            try:
                append_job_line(self.folder / owner, "".join(f"{name}\n" for name in names))
            except OSError as exc:  # a hint lost: the owner finds them at its next listing
                logger.debug("cannot post to {}'s mail: {}", owner, exc)

    # --- receiving --------------------------------------------------------------------

    def receive(self) -> list[str]:
        """The names appended to this node's mail since the last call (a stat when none)."""
        try:
            st = os.stat(self._own, follow_symlinks=False)
        except OSError:
            return []
        inode, offset = self._read_to
        if st.st_ino != inode or st.st_size < offset:
            offset = 0  # a new file: rotated here, or made again
        if st.st_size == offset:
            return []
        try:
            fd = os.open(self._own, _READ)
        except OSError:
            return []
        try:
            inode = os.fstat(fd).st_ino
            os.lseek(fd, offset, os.SEEK_SET)
            data = read_rest(fd)
        finally:
            os.close(fd)
        complete = data.rfind(b"\n") + 1  # a line being appended is read next time
        offset += complete
        self._read_to = (inode, offset)
        if offset >= ROTATE_BYTES:
            self._rotate()
        return [name for line in data[:complete].decode(errors="replace").splitlines()
                if (name := line.strip()) and _is_plain_name(name)]

    def _rotate(self) -> None:
        try:
            os.unlink(self._own)
        except OSError:
            return
        self._read_to = (0, 0)


def _is_plain_name(name: str) -> bool:
    return "/" not in name and "\0" not in name and not name.startswith(".")
