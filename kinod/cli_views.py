"""What the CLI shows: job tables, one job, plugins, and following jobs to their end."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table

from kinod.config import Settings
from kinod.control import pause_file
from kinod.models import Sidecar
from kinod.nodes import Heartbeat, read_heartbeats
from kinod.plugins.plugin_loader import PluginRegistry

ReadSidecar = Callable[[Settings, str], "Sidecar | None"]
REFRESH_S = 0.5

err = Console(stderr=True, highlight=False)
# Piped output (grep, awk) gets whole lines: no terminal width to cut them to.
out = Console(highlight=False)
if not out.is_terminal:
    out = Console(highlight=False, width=100_000)

_STATE_STYLE = {"queued": "yellow", "running": "cyan", "succeeded": "green",
                "failed": "red", "stopped": "magenta"}


def show_jobs(settings: Settings, as_json: bool, watch: bool, read: ReadSidecar) -> int:
    def sidecars() -> list[Sidecar]:
        found = []
        for path in sorted(settings.outbox.glob("*.json")):
            sidecar = read(settings, path.stem)
            if sidecar is not None:
                found.append(sidecar)
        return sorted(found, key=lambda s: s.created_at)

    _say_if_paused(settings)
    if as_json:
        print(json.dumps([s.model_dump(mode="json", by_alias=True) for s in sidecars()], indent=2))
        return 0
    if not watch and not out.is_terminal:  # piped: tab-separated, for cut, awk and grep
        for row in [list(JOB_COLUMNS), *(_job_row(s, styled=False) for s in sidecars())]:
            print("\t".join(row))
        return 0
    if not watch:
        try:
            nodes = read_heartbeats(settings.inbox / ".kinod" / "nodes")
        except OSError:  # an inbox that cannot be read: the jobs, from the outbox, still show
            nodes = []
        if len(nodes) > 1:  # several daemons share this inbox: show who is there
            out.print(_nodes_table(nodes))
        out.print(_jobs_table(sidecars()))
        return 0
    with Live(_jobs_table(sidecars()), console=out, auto_refresh=False) as live:
        while True:
            time.sleep(REFRESH_S)
            live.update(_jobs_table(sidecars()), refresh=True)


def _say_if_paused(settings: Settings) -> None:
    """A line on stderr (the table or the piped rows stay as they are) for each pause: the
    farm's, and each known node's (never a listing of an inbox of 100,000 files)."""
    try:
        nodes = [h.node for h in read_heartbeats(settings.inbox / ".kinod" / "nodes")]
    except OSError:  # a spool that cannot be read: the farm's own pause is still told
        nodes = []
    for node in [None, *nodes]:
        path = pause_file(settings.inbox, node)
        if os.path.lexists(path):
            what = "the farm is" if node is None else f"node {node} is"
            err.print(f"{what} paused ({path}): no new job starts there", markup=False)


def show_job(settings: Settings, job_id: str, as_json: bool, watch: bool,
             read: ReadSidecar) -> int:
    sidecar = read(settings, job_id)
    if as_json and not watch:
        print(sidecar.to_json().decode(), end="")
        return 0
    if as_json:  # one compact JSON document per change (JSON Lines) until the job ends
        _print_json_line(sidecar)
        while not sidecar.state.is_terminal:
            time.sleep(REFRESH_S)
            latest = read(settings, job_id) or sidecar
            if latest != sidecar:
                sidecar = latest
                _print_json_line(sidecar)
        return 0 if sidecar.state == "succeeded" else 1
    if not watch:
        out.print(_job_details(sidecar))
        return 0
    with Live(_job_details(sidecar), console=out, auto_refresh=False) as live:
        while not sidecar.state.is_terminal:
            time.sleep(REFRESH_S)
            sidecar = read(settings, job_id) or sidecar
            live.update(_job_details(sidecar), refresh=True)
    return 0 if sidecar.state == "succeeded" else 1


def _print_json_line(sidecar: Sidecar) -> None:
    print(sidecar.model_dump_json(by_alias=True), flush=True)


def show_nodes(settings: Settings, as_json: bool) -> int:
    nodes = read_heartbeats(settings.inbox / ".kinod" / "nodes")
    if as_json:
        print(json.dumps([h.model_dump(mode="json") for h in nodes], indent=2))
    elif not out.is_terminal:  # piped: tab-separated, one node a line
        for row in [list(NODE_COLUMNS), *(_node_row(h) for h in nodes)]:
            print("\t".join(row))
    else:
        out.print(_nodes_table(nodes))
    return 0


def show_plugins(registry: PluginRegistry, as_json: bool) -> None:
    if as_json:
        print(json.dumps({
            "plugins": [
                {"name": p.name, "version": p.version, "description": p.description,
                 "author": p.info.get("author"), "parameters": p.parameters, "source": p.source}
                for p in registry.plugins.values()],
            "errors": registry.errors,
        }, indent=2, default=str))
        return
    table = Table("PLUGIN", "VERSION", "DESCRIPTION", "PARAMETERS", box=None)
    for p in registry.plugins.values():
        table.add_row(p.name, p.version, p.description, _parameters(p.parameters))
    out.print(table)
    for name, error in registry.errors.items():
        err.print(f"[red]failed to load[/red] {name}: ", end="")
        err.print(error, markup=False)


def follow(settings: Settings, jobs: dict[str, str | None], want: str, read: ReadSidecar,
           poll_s: float) -> bool:
    """Wait for each job's run that began after ``jobs[id]`` (a created_at) to end."""
    ended: dict[str, Sidecar] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                  TextColumn("{task.fields[state]}"), console=err, transient=False) as bars:
        tasks = {job_id: bars.add_task(job_id, total=100, state="waiting") for job_id in jobs}
        while len(ended) < len(jobs):
            for job_id, before in jobs.items():
                if job_id in ended:
                    continue
                sidecar = read(settings, job_id)
                if sidecar is None or (before and sidecar.created_at.isoformat() == before):
                    continue  # the new run has not been taken in yet
                bars.update(tasks[job_id], completed=sidecar.progress, state=sidecar.state.value)
                if sidecar.state.is_terminal:
                    ended[job_id] = sidecar
                    if not bars.console.is_terminal:
                        err.print(_summary(sidecar), markup=False)
            if len(ended) < len(jobs):
                time.sleep(poll_s)
    if bars.console.is_terminal:
        for sidecar in ended.values():
            err.print(_summary(sidecar), markup=False)
    return all(s.state == want for s in ended.values())


def _summary(s: Sidecar) -> str:
    line = f"{s.id}: {s.state}"
    if s.error:
        line += f" ({s.error.code}: {s.error.message})"
    return line


JOB_COLUMNS = ("ID", "STATE", "PROGRESS", "ATTEMPT", "TYPE", "NODE", "UPDATED", "MESSAGE")


def _jobs_table(sidecars: list[Sidecar]) -> Table:
    table = Table(*JOB_COLUMNS, box=None)
    for s in sidecars:
        table.add_row(*_job_row(s, styled=True))
    return table


def _job_row(s: Sidecar, styled: bool) -> list[str]:
    state = s.state.value
    if styled:
        style = _STATE_STYLE.get(state, "")
        state = f"[{style}]{state}[/{style}]"
    note = s.error.message if s.error else (s.message or "")
    if not styled:
        note = " ".join(note.split())  # one line per job
    return [s.id, state, f"{s.progress:.0f}%", str(s.attempt), s.type or "", s.node or "",
            _ago(s.updated_at), note]


NODE_COLUMNS = ("NODE", "STATE", "HEARTBEAT", "RUNNING", "QUEUED", "WORKERS", "HOST", "PID",
                "SERVES", "PAUSED")


def _nodes_table(nodes: list[Heartbeat]) -> Table:
    table = Table(*NODE_COLUMNS, box=None)
    for heartbeat in nodes:
        table.add_row(*_node_row(heartbeat))
    return table


def _node_row(h: Heartbeat) -> list[str]:
    # By this machine's clock: a hint for people; daemons never judge liveness by it.
    silent_s = (datetime.now(UTC) - h.heartbeat_at).total_seconds()
    state = "stopped" if h.stopped else "silent" if silent_s > h.lease else "up"
    return [h.node, state, _ago(h.heartbeat_at), str(h.running), str(h.queued), str(h.workers),
            h.host, str(h.pid), ",".join(h.serves), "paused" if h.paused else "-"]


def _job_details(s: Sidecar) -> Group:
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [("id", s.id), ("name", s.name), ("type", s.type),
            ("state", s.state.value), ("progress", f"{s.progress:.1f}%"), ("message", s.message),
            ("attempt", str(s.attempt)), ("node", s.node), ("pid", s.pid),
            ("created", s.created_at), ("started", s.started_at), ("finished", s.finished_at),
            ("updated", s.updated_at)]
    if s.error:
        rows.append(("error", f"{s.error.code}: {s.error.message}"))
    if s.result:
        rows.append(("result", json.dumps(s.result, default=str)))
    for key, value in rows:
        if value is not None:
            table.add_row(key, str(value))
    return Group(table)


def _parameters(parameters: dict) -> str:
    parts = []
    for name, spec in parameters.items():
        spec = spec if isinstance(spec, dict) else {}
        mark = "*" if spec.get("required") else ""
        parts.append(f"{name}{mark}:{spec.get('type', 'any')}")
    return ", ".join(parts)


def _ago(when: datetime) -> str:
    seconds = int((datetime.now(UTC) - when).total_seconds())
    if seconds < 60:
        return f"{seconds}s ago"
    if seconds < 3600:
        return f"{seconds // 60}m ago"
    if seconds < 86400:
        return f"{seconds // 3600}h ago"
    return f"{seconds // 86400}d ago"
