"""The hooks' retries on disk: a delivery waiting for its next attempt is a file in
pending/, named for when it falls due, so nothing waits in memory.

    inbox/.kinod/hooks/pending/<due>.<hook>.<id>.json      a retry waiting; <due> in ns since 1970
    inbox/.kinod/hooks/claimed/<node>/<due>.<hook>.<id>.json  a retry being delivered by <node>
    inbox/.kinod/hooks/given_up/<due>.<hook>.<id>.json     out of retries; kept for people
    inbox/.kinod/hooks/invalid/<name>                      a file that is no delivery

A node claims a pending file by renaming it into its claimed/ folder (only one node's
rename succeeds), and removes it once the hook took it or it ran out of retries: a crash
at any point leaves the file on disk, and it is delivered again. A delivery whose hook is
not in this node's settings is left in pending/ for a node that has it (or for the hook to
come back).
"""

from __future__ import annotations

import contextlib
import heapq
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

from loguru import logger
from pydantic import ValidationError

from kinod.atomic_files import atomic_write
from kinod.config import HookSettings
from kinod.hooks_delivery import describe
from kinod.hooks_format import MAX_DELIVERY_BYTES, Delivery, delivery_name, parse_name
from kinod.logs import log_job_event

MAX_BACKOFF_S = 3600.0


class PendingFiles:
    """This node's view of pending/ and the folders its files move through: what is due,
    claiming it, and where a file goes after its attempt. Used by the delivering thread
    only (``take_back`` aside, which only renames)."""

    def __init__(self, root: Path, node: str, *, backoff_s: float | None, poll_s: float,
                 batch: int) -> None:
        self.pending = root / "pending"
        self.claimed_root = root / "claimed"
        self.claimed = self.claimed_root / node
        self.given_up = root / "given_up"
        self.invalid = root / "invalid"
        self.batch = batch  # names read in at one look at pending/
        self._backoff_s = backoff_s
        self._poll_s = poll_s
        self._unknown_seen = 0

    def take_back(self, node: str) -> int:
        """Put what ``node`` had claimed back in pending/ (``node`` checked by the caller).
        Returns how many files."""
        folder = self.claimed_root / node
        moved = 0
        for name in _names_in(folder):
            with contextlib.suppress(FileNotFoundError):
                os.rename(folder / name, self.pending / name)
                moved += 1
        if moved:
            logger.info("hooks: {} deliveries node {} had under way are queued again",
                        moved, node)
        return moved

    def look(self, known: set[str]) -> tuple[list[str], float]:
        """The oldest names in pending/ that are due and whose hook this node has (``known``
        keys; at most a batch: pending/ may hold many, and only a batch is kept while
        looking), and the seconds until the next one falls due."""
        now_ns = time.time_ns()
        counts = {"unknown": 0, "next_ns": now_ns + int(self._poll_s * 1e9)}

        def due(entries) -> Iterator[tuple[int, str]]:
            for entry in entries:
                if entry.name.startswith("."):
                    continue  # a write under way
                parsed = parse_name(entry.name)
                due_ns, key = parsed if parsed is not None else (0, "")  # foreign: now
                if key and key not in known:
                    counts["unknown"] += 1
                elif due_ns > now_ns:
                    counts["next_ns"] = min(counts["next_ns"], due_ns)
                else:
                    yield due_ns, entry.name

        names: list[str] = []
        try:
            with os.scandir(self.pending) as entries:
                names = [name for _, name in heapq.nsmallest(self.batch, due(entries))]
        except OSError as exc:
            logger.warning("hooks: cannot read {}: {}", self.pending, exc)
        if counts["unknown"] != self._unknown_seen:
            self._unknown_seen = counts["unknown"]
            if self._unknown_seen:
                logger.warning("hooks: {} deliveries in {} are for hooks this node's settings "
                               "do not have; left for a node that has them",
                               self._unknown_seen, self.pending)
        return names, max(0.0, (counts["next_ns"] - now_ns) / 1e9)

    def claim(self, name: str) -> Delivery | None:
        """Rename the file into this node's claimed/ (None if another node was first), and
        read it. A file that is no delivery is set aside in invalid/."""
        path = self.claimed / name
        try:
            os.rename(self.pending / name, path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.warning("hooks: cannot claim {}: {}", name, exc)
            return None
        try:
            return Delivery.model_validate_json(_read_file(path))
        except (OSError, ValidationError, ValueError) as exc:
            logger.warning("hooks: {} is not a delivery, set aside in {}: {}", name,
                           self.invalid, exc)
            with contextlib.suppress(OSError):
                os.rename(path, self.invalid / name)
            return None

    def judge(self, delivery: Delivery, hook: HookSettings, failure: str | None,
              kept_as: str, outbox: Path) -> tuple[str, float]:
        """Log the attempt's outcome in the job's log (in ``outbox``); returns what comes
        next: "done", "give up" (kept in given_up/ as ``kept_as``), or "retry" after the
        returned seconds."""
        sidecar = delivery.sidecar
        number, total = delivery.attempts + 1, hook.retries + 1
        what = f"hook {describe(hook)} ({sidecar.state.value})"
        if failure is None:
            log_job_event(outbox, sidecar.id, "INFO",
                          f"{what}: delivered (attempt {number} of {total})")
            return "done", 0.0
        if number >= total:
            log_job_event(outbox, sidecar.id, "ERROR",
                          f"{what}: attempt {number} of {total} failed: "
                          f"{failure}; giving up (kept in {self.given_up.name}/{kept_as})")
            return "give up", 0.0
        first_s = hook.backoff if self._backoff_s is None else self._backoff_s
        delay_s = min(first_s * 2 ** (number - 1), MAX_BACKOFF_S)
        delay_s *= random.uniform(0.9, 1.1)  # a storm's retries do not all come back at once
        log_job_event(outbox, sidecar.id, "WARNING",
                      f"{what}: attempt {number} of {total} failed: "
                      f"{failure}; next attempt in {delay_s:.1f} s")
        return "retry", delay_s

    # --- a journal line's delivery, written to pending/ ---------------------------------

    def hand_over(self, delivery: Delivery) -> None:
        """A journal line's delivery for a hook this node lacks: a file in pending/, left
        for a node that has it (or for a reload that brings the hook back)."""
        name = delivery_name(time.time_ns(), delivery.hook, delivery.sidecar.id)
        self.write(name, delivery)

    def write(self, name: str, delivery: Delivery) -> None:
        """Raises OSError if the disk refuses."""
        try:
            atomic_write(self.pending / name, delivery.to_json(), durable=True)
        except FileNotFoundError:
            self.pending.mkdir(parents=True, exist_ok=True)
            atomic_write(self.pending / name, delivery.to_json(), durable=True)

    def write_retry(self, delivery: Delivery, delay_s: float) -> None:
        later = delivery_name(time.time_ns() + int(delay_s * 1e9), delivery.hook,
                              delivery.sidecar.id)
        self.write(later, delivery.model_copy(update={"attempts": delivery.attempts + 1}))

    def write_given_up(self, name: str, delivery: Delivery) -> None:
        # Kept with its count reset: moved back into pending/, it is tried afresh.
        atomic_write(self.given_up / name, delivery.model_copy(update={"attempts": 0}).to_json(),
                     durable=True)

    # --- a claimed file, after its attempt ----------------------------------------------

    def finish(self, name: str, delivery: Delivery, outcome: str, delay_s: float) -> None:
        """The claimed file after ``judge``'s ``outcome``: removed once delivered, moved to
        given_up/, or back to pending/ under its next due time."""
        if outcome == "done":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.claimed / name)
        elif outcome == "give up":
            self._rewrite(name, delivery.model_copy(update={"attempts": 0}), self.given_up / name)
        else:
            later = delivery_name(time.time_ns() + int(delay_s * 1e9), delivery.hook,
                                  delivery.sidecar.id)
            self._rewrite(name, delivery.model_copy(update={"attempts": delivery.attempts + 1}),
                          self.pending / later)

    def release(self, name: str) -> None:
        """Put a claimed file back in pending/ as it is, for this node or another later."""
        self._move(name, self.pending / name)

    def _rewrite(self, name: str, delivery: Delivery, dst: Path) -> None:
        """Record the attempts in the claimed file, then move it on: a crash between the two
        leaves it claimed, and taken back at the next start."""
        try:
            atomic_write(self.claimed / name, delivery.to_json())
        except OSError as exc:
            logger.error("hooks: cannot record an attempt of {}: {}", name, exc)
        self._move(name, dst)

    def _move(self, name: str, dst: Path) -> None:
        try:
            os.rename(self.claimed / name, dst)
        except FileNotFoundError:
            pass
        except OSError as exc:  # left claimed: taken back at the next start
            logger.error("hooks: cannot move {} to {}: {}", name, dst.parent, exc)


def _read_file(path: Path) -> bytes:
    """A delivery file's bytes: never through a link, never blocking on a FIFO, never more
    than MAX_DELIVERY_BYTES."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size > MAX_DELIVERY_BYTES:
            raise ValueError("too big")
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _names_in(folder: Path) -> list[str]:
    try:
        with os.scandir(folder) as entries:
            return [e.name for e in entries if not e.name.startswith(".")]
    except FileNotFoundError:
        return []
