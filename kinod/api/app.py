"""The FastAPI application: its parts, wired once, and what it does at start and stop."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from prometheus_client import CollectorRegistry

from kinod import __version__
from kinod.api import (
    dashboard,
    dashboard_thumbnails,
    dashboard_tickets,
    docs_page,
    errors,
    events,
    farm,
    metrics,
    tasks,
)
from kinod.api.events import EventHub
from kinod.api.guards import Guard
from kinod.api.ids import IdAllocator
from kinod.api.index import OutboxIndex
from kinod.api.jobs import Jobs
from kinod.config import Settings
from kinod.plugins.plugin_loader import PluginRegistry
from kinod.spool import Spool
from kinod.watcher import choose_watch_mode

DESCRIPTION = """\
kinod's HTTP API: a client of the folders like any other. It writes job and control files
into the inbox and reads sidecars from the outbox, so every node's API shows the whole farm.
Errors are `{"error": {"code", "message", "fields"}}` with a 4xx status.
"""


@dataclass
class ApiContext:
    settings: Settings
    index: OutboxIndex
    hub: EventHub
    jobs: Jobs
    metrics: CollectorRegistry
    startup_error: BaseException | None = None


def create_app(settings: Settings, token: str | None,
               registry: PluginRegistry | None = None) -> FastAPI:
    polling = choose_watch_mode(settings.watch, settings.outbox) == "poll"
    index = OutboxIndex(settings.outbox, polling, settings.poll_interval_s if polling
                        else settings.rescan_interval_s)
    hub = EventHub()
    collector = metrics.FarmCollector(index, settings.inbox)
    index.observers += [collector, hub]
    registry = registry if registry is not None else PluginRegistry(settings.plugin_dirs)
    spool = Spool(settings.inbox, settings.node or "")
    context = ApiContext(settings, index, hub,
                         Jobs(settings.inbox, settings.outbox, settings.max_job_bytes, registry,
                              IdAllocator(spool, settings.outbox)),
                         metrics.make_registry(collector))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await index.start()  # the whole outbox is read before the first answer
        except BaseException as exc:
            context.startup_error = exc
            raise
        try:
            yield
        finally:
            hub.close()
            await app.state.dashboard_rows.stop()
            await index.stop()

    app = FastAPI(title="kinod", version=__version__, description=DESCRIPTION,
                  lifespan=lifespan, docs_url=None, redoc_url=None)  # /docs: docs_page
    app.state.api = context
    app.state.tickets = dashboard_tickets.Tickets()
    app.state.dashboard_rows = dashboard.RowCache()
    errors.install(app)
    for module in (tasks, dashboard_thumbnails, events, dashboard_tickets, farm, metrics,
                   docs_page, dashboard):
        app.include_router(module.router)
    app.add_middleware(Guard, token=token, max_body_bytes=settings.max_job_bytes,
                       tickets=app.state.tickets)
    if token is not None:
        app.openapi = lambda: _openapi_with_bearer(app)  # type: ignore[method-assign]
    return app


def _openapi_with_bearer(app: FastAPI) -> dict[str, Any]:
    """The schema, saying that every operation needs the bearer token (``/docs`` then
    offers to enter it)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version,
                             description=app.description, routes=app.routes)
        schema.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"bearer": []}]
        app.openapi_schema = schema
    return app.openapi_schema
