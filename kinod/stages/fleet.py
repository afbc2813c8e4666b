"""The fleet: this node among the others on one inbox. It writes this node's heartbeat,
knows whether the node serves the inbox alone (then jobs wait in its own running/),
fences runs another node took over, and takes back the jobs of nodes whose lease ran
out.

Polling nodes also share the work out between them, so that what each poll costs the
file server does not grow with the number of nodes: each queued job has one owner among
the nodes taking jobs (a hash of its id: ``owns``), which claims it first and hears of it
by mail between its turns (kinod.share_mail), and the nodes take turns at listing the
inbox and queued/ (``inbox_turn``), so the fleet lists each about once a
``poll_interval_s`` however many nodes there are. None of it is needed for correctness: a
claim is still a rename, so two nodes that disagree about an owner (one started a moment
ago) race as before, and a job whose owner does not claim it is taken by another node
(kinod.stages.recovery).
"""

from __future__ import annotations

import os
import zlib

from loguru import logger

from kinod.intake import InboxName
from kinod.listing_gate import ListingGate
from kinod.nodes import NodeBoard
from kinod.share_mail import ShareMail
from kinod.stages.context import Context
from kinod.stages.job import Job


class Fleet:
    def __init__(self, ctx: Context, polling: bool) -> None:
        self._ctx = ctx
        # Polling sees another node's start only a heartbeat late: it never waits alone.
        self._polling = polling
        self._board = NodeBoard(ctx.spool.nodes, ctx.node, ctx.settings.lease, ctx.clock)
        # No other node's heartbeat moves: jobs taken in wait in this node's running/
        # (_waiting_here: some may), not in queued/.
        self._alone = False
        self._waiting_here = False
        self.own_lock = f"{ctx.node}.lock"
        # The nodes taking jobs (live, neither stopped nor paused), this one always among
        # them, in name order: every node sees the same list, give or take a heartbeat.
        self._owners = [ctx.node]
        self._mail = ShareMail(ctx.spool.mail, ctx.node)
        # A node starting makes its running/ folder (and lock file): seen by a stat at the
        # next poll, not a heartbeat later.
        self._nodes_gate = ListingGate(ctx.spool.running_root, ctx.clock, ctx.settings.lease)
        # What a poll looks at (see poll_plan): when this node last listed the inbox and
        # queued/, and when it last looked for orphans in its running/.
        self._shared_at = self._orphans_at = ctx.clock()

    def set_lease(self, lease: float) -> None:
        self._board.lease = lease

    async def heartbeat(self) -> None:
        self.beat()
        for job in self._ctx.running.jobs():
            if self.taken_over(job):
                self.fence(job)
        self._take_over_expired()
        self._find_owners()
        self._alone = self._no_other_node()
        if self._waiting_here and not self._alone:
            self.release_waiting()

    def start(self) -> None:
        """The first beat, and whether this node starts alone."""
        self.beat()
        self._find_owners()
        self._alone = self._no_other_node()

    def stop(self) -> None:
        """Shutdown: jobs waiting here go where other nodes (and this one's next start)
        claim them, and the last beat says this node stopped."""
        if self._waiting_here:
            self.release_waiting()
        self.beat(stopped=True)

    def beat(self, stopped: bool = False) -> None:
        ctx = self._ctx
        settings = ctx.settings
        serves = sorted(ctx.registry.plugins if settings.serves is None else settings.serves)
        try:
            held_up_s = self._board.beat(serves, settings.workers, len(ctx.running),
                                         ctx.scheduler.queued(), stopped, ctx.holds.paused)
        except OSError as exc:
            logger.error("cannot write this node's heartbeat: {}", exc)
            return
        if held_up_s is not None and held_up_s > settings.lease:
            logger.warning("this node was held up {:.0f} s, past its lease of {:g} s: other "
                           "nodes may have taken its jobs over", held_up_s, settings.lease)

    # --- alone or shared ----------------------------------------------------------------

    def _no_other_node(self) -> bool:
        """No other node's heartbeat moves. Only where inotify reports another node's start
        at once (see another_node_started); a polling node would see it a heartbeat late."""
        return not self._polling and self._board.alive().keys() <= {self._ctx.node}

    def another_node_started(self) -> None:
        """Its lock file was written: the jobs waiting here go where it can claim them."""
        if not self._alone:
            return
        self._alone = False  # until a heartbeat finds it gone again
        if self._waiting_here:
            self.release_waiting()

    def let_wait_here(self, plugin: str) -> bool:
        """Whether a job taken in for ``plugin`` waits in this node's running/, not in
        queued/: no other node is there to claim it, and the two renames through queued/
        are saved. True also notes that jobs wait here, to release them when that ends."""
        if self._alone and self._ctx.serves(plugin):
            self._waiting_here = True
            return True
        return False

    def release_waiting(self) -> None:
        """Jobs waiting in this node's running/ go to queued/, where every node claims: another
        node serves the inbox now, or this one stops."""
        ctx = self._ctx
        for job in ctx.scheduler.jobs():
            if (ctx.running.is_running(job.id) or ctx.ending.is_unrecorded(job.id)
                    or job.folder != ctx.spool.running):
                continue  # running, or ended with its end not yet recorded
            try:
                job.path = ctx.spool.requeue(job.path)
            except FileNotFoundError:
                ctx.ending.claimed_elsewhere(job)  # taken over while this node was held up
                continue
            except OSError as exc:
                logger.error("cannot move the jobs waiting here to {}: {}; trying again at "
                             "the next heartbeat", ctx.spool.queued, exc)
                return
        self._waiting_here = False

    def served_elsewhere(self, plugin: object) -> bool:
        """A job names a plugin this node has not loaded, but a live node serves."""
        ctx = self._ctx
        if not isinstance(plugin, str) or ctx.registry.get(plugin) is not None:
            return False
        return any(plugin in heartbeat.serves
                   for node, heartbeat in self._board.alive().items() if node != ctx.node)

    # --- sharing the work out (polling) ------------------------------------------------

    def _find_owners(self) -> None:
        """Which nodes take jobs: those with a running/ folder whose heartbeat moves and
        says neither stopped nor paused. A heartbeat a node has not seen move yet counts
        as moving (kinod.nodes), so a node that died before this one started is an owner
        until its lease runs out: its share is taken by others meanwhile."""
        if not self._polling:
            return
        node = self._ctx.node
        self._owners = sorted({node, *(other for other in self._ctx.spool.other_nodes()
                                       if self._board.takes_jobs(other))})

    def nodes_sharing(self) -> int:
        """How many nodes share the work out (1: this one alone, or not polling)."""
        return len(self._owners)

    def owns(self, job_id: str) -> bool:
        """This node claims the queued job first. Always true unless polling beside others."""
        return self._owner(job_id) == self._ctx.node

    def _owner(self, job_id: str) -> str:
        owners = self._owners
        if len(owners) < 2:
            return self._ctx.node
        return owners[zlib.crc32(job_id.encode()) % len(owners)]

    def queued_for_another(self, name: str, job_id: str) -> None:
        """This node queued a job of another node's share: word of it goes to that node's
        mail at the end of this turn (``send_mail``)."""
        self._mail.post(self._owner(job_id), name)

    def send_mail(self) -> None:
        self._mail.send()

    def mail(self) -> list[str]:
        """Names of queued jobs of this node's share that other nodes queued since the last
        look; nothing (and no look) unless it shares the queue out."""
        return self._mail.receive() if len(self._owners) > 1 else []

    def inbox_turn(self, slot: int) -> bool:
        """Whether this node lists the inbox in poll number ``slot`` (the wall clock over
        ``poll_interval_s``): the nodes take turns, in name order. Clocks that disagree
        only make turns overlap or leave gaps; the daemon lists anyway once it has gone
        a whole round without."""
        owners = self._owners
        return len(owners) < 2 or slot % len(owners) == owners.index(self._ctx.node)

    def poll_plan(self) -> tuple[bool, bool]:
        """What this poll lists, when nothing else changed: (the inbox and queued/, this
        node's running/). The inbox and queued/ on this node's turn, or when it has gone a
        whole round of turns without; its running/ (files a fault left there) once a
        ``rescan_interval_s``. Beside other nodes, the fleet so lists the shared folders
        about once a poll however many nodes there are; between its turns a node hears of
        its share by mail (``mail``). Listing queued/ whenever a node wanted work made the
        listings grow with the nodes, each finding a job or two. A job whose owner does
        not claim it is not left waiting for the owner's turn: the node that queued it
        runs it after two polls (kinod.stages.recovery.steal)."""
        ctx = self._ctx
        if self._nodes_gate.should_list():
            self._find_owners()
        poll_s, now = ctx.settings.poll_interval_s, ctx.clock()
        round_s = poll_s * len(self._owners)
        shared = (self.inbox_turn(int(ctx.wall_clock() // poll_s))
                  or now - self._shared_at >= round_s + poll_s / 2)
        if shared:
            self._shared_at = now
        orphans = now - self._orphans_at >= ctx.settings.rescan_interval_s
        if orphans:
            self._orphans_at = now
        return shared, orphans

    # --- other nodes' jobs --------------------------------------------------------------

    def _take_over_expired(self) -> None:
        """Take back the running jobs of nodes whose lease ran out, as their next attempt."""
        ctx = self._ctx
        for node in ctx.spool.other_nodes():
            if not self._board.expired(node):
                continue
            ctx.hooks.take_back(node)  # the deliveries it had under way
            for path in ctx.spool.running_files_of(node):
                taken = ctx.spool.take_over(path)
                if taken is not None:
                    logger.warning("node {} lost its lease (no heartbeat for {:g} s); its job "
                                   "{} is taken back", node, ctx.settings.lease,
                                   InboxName.of(path.name).job_id)
                    ctx.recovery.guarded(ctx.recovery.recover_running, taken)

    def taken_over(self, job: Job) -> bool:
        """This node no longer holds the job's file, and another node has it (or ran it)."""
        if os.path.lexists(job.path):
            return False
        ctx = self._ctx
        if ctx.spool.holds(job.id):
            return True
        sidecar = ctx.outbox.read(job.id)
        return sidecar is not None and (sidecar.node, sidecar.attempt) != (
            ctx.node, job.sidecar.attempt)

    def fence(self, job: Job) -> None:
        """Another node took this job over while this one was held up: stop it here and
        never write its sidecar again; the other node's run is the job's."""
        if job.fenced:
            return
        job.fenced = True
        logger.bind(job_id=job.id).warning(
            "job {}: another node took it over while this node was held up; stopping it "
            "here, its end is not recorded", job.id)
        if job.run is not None:
            job.run.force_stop()
