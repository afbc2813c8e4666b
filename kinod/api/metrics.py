"""``GET /metrics``: the farm as Prometheus sees it, from the outbox index and the spool.

Counts are kept as the index changes, so a scrape costs the same with 100 jobs or 100,000.
"""

from __future__ import annotations

import bisect
import os
import time
from collections import Counter
from pathlib import Path

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from kinod.api.index import Entry, OutboxIndex
from kinod.control import pause_file, paused_by
from kinod.models import JobState
from kinod.nodes import read_heartbeats

# Seconds, from a quick image to a long render.
BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 3 * 3600.0, 12 * 3600.0,
           float("inf"))

router = APIRouter()


class FarmCollector(Collector):
    """Jobs by state and plugin, queue depth, running jobs, job durations and heartbeat ages.

    Also an observer of the outbox index: it counts each change as it comes.
    """

    def __init__(self, index: OutboxIndex, inbox: Path) -> None:
        self.index = index
        self.inbox = inbox
        self.nodes = inbox / ".kinod" / "nodes"
        self.jobs: Counter[tuple[str, str]] = Counter()
        # (state, type) -> count per bucket, and the sum of the durations
        self.buckets: dict[tuple[str, str], list[int]] = {}
        self.sums: Counter[tuple[str, str]] = Counter()

    def __call__(self, old: Entry | None, new: Entry | None) -> None:
        if old is not None:
            self._count(old, -1)
        if new is not None:
            self._count(new, 1)

    def _count(self, entry: Entry, sign: int) -> None:
        labels = (entry.state, entry.type or "")
        self.jobs[labels] += sign
        if not self.jobs[labels]:
            del self.jobs[labels]
        if entry.duration_s is None or not JobState(entry.state).is_terminal:
            return
        counts = self.buckets.setdefault(labels, [0] * len(BUCKETS))
        counts[bisect.bisect_left(BUCKETS, entry.duration_s)] += sign
        self.sums[labels] += sign * entry.duration_s

    def collect(self):
        jobs = GaugeMetricFamily("kinod_jobs", "Jobs by state and plugin (latest run of each id)",
                                 labels=["state", "type"])
        for (state, job_type), count in sorted(self.jobs.items()):
            jobs.add_metric([state, job_type], count)
        yield jobs
        by_state = Counter()
        for (state, _), count in self.jobs.items():
            by_state[state] += count
        yield GaugeMetricFamily("kinod_queue_depth", "Jobs queued, waiting for a worker",
                                value=by_state[JobState.QUEUED.value])
        yield GaugeMetricFamily("kinod_jobs_held", "Jobs held, waiting to be released",
                                value=by_state[JobState.HELD.value])
        yield GaugeMetricFamily("kinod_jobs_running", "Jobs running on any node",
                                value=by_state[JobState.RUNNING.value])
        durations = HistogramMetricFamily(
            "kinod_job_duration_seconds", "Ended jobs, from the start of their last attempt "
            "to their end", labels=["state", "type"])
        for labels, counts in sorted(self.buckets.items()):
            cumulative, total = [], 0
            for bound, count in zip(BUCKETS, counts, strict=True):
                total += count
                cumulative.append((_bound(bound), total))
            durations.add_metric(list(labels), cumulative, self.sums[labels])
        yield durations
        yield from self._nodes()

    def _nodes(self):
        ages = GaugeMetricFamily("kinod_node_heartbeat_age_seconds",
                                 "Seconds since each node's last heartbeat (by the clocks of "
                                 "this machine and that one)", labels=["node"])
        up = GaugeMetricFamily("kinod_node_paused", "1 while the node (or the farm) is paused",
                               labels=["node"])
        now = time.time()
        for heartbeat in read_heartbeats(self.nodes):
            if heartbeat.stopped:
                continue
            ages.add_metric([heartbeat.node], max(0.0, now - heartbeat.heartbeat_at.timestamp()))
            up.add_metric([heartbeat.node], float(paused_by(self.inbox, heartbeat.node)
                                                  is not None))
        yield ages
        yield up
        yield GaugeMetricFamily("kinod_farm_paused", "1 while the whole farm is paused",
                                value=float(os.path.lexists(pause_file(self.inbox))))


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def make_registry(collector: FarmCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


@router.get("/metrics", tags=["service"], response_class=Response,
            responses={200: {"content": {"text/plain": {}},
                             "description": "Prometheus text format"}})
async def metrics(request: Request) -> Response:
    """Prometheus metrics: jobs by state and plugin, queue depth, running jobs, a job
    duration histogram, node heartbeat ages."""
    return Response(generate_latest(request.app.state.api.metrics),
                    media_type=CONTENT_TYPE_LATEST)
