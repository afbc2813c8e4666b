"""What every stage shares: the settings in force, the plugins, the spool and the outbox,
the clocks, the loop's timers, and the stages themselves, wired once by the daemon."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from kinod.config import Settings
from kinod.outbox import Outbox
from kinod.plugins.plugin_loader import PluginRegistry
from kinod.spool import Spool

if TYPE_CHECKING:
    from kinod.hooks import Hooks
    from kinod.stages.dependencies import Dependencies
    from kinod.stages.ending import Ending
    from kinod.stages.fleet import Fleet
    from kinod.stages.holds import Holds
    from kinod.stages.intake import Intake
    from kinod.stages.recovery import Recovery
    from kinod.stages.running import Running
    from kinod.stages.scheduler import Scheduler
    from kinod.stages.stops import Stops

# After the disk refused a write (full, read-only, gone), try again after this long.
RETRY_S = 5.0


def _nothing() -> None:
    pass


@dataclass(eq=False)
class Context:
    """One per daemon. ``settings`` and ``registry`` are replaced on reload: a stage reads
    them here each time, never keeps its own copy.

    A stage calls another only through the public methods of the stage named here; a
    unit test puts fakes in their place.
    """

    settings: Settings
    registry: PluginRegistry
    spool: Spool
    outbox: Outbox
    clock: Callable[[], float]
    wall_clock: Callable[[], float]
    wake: Callable[[], None] = _nothing  # a turn of the loop: dispatch, status
    retry_soon: Callable[[], None] = _nothing  # try again in RETRY_S what the disk refused
    stopping: Callable[[], bool] = lambda: False  # shutting down: start nothing more
    loop: asyncio.AbstractEventLoop | None = None
    timers: AsyncIOScheduler | None = None  # delayed work: not_before releases
    inbox_text: str = field(init=False)  # the inbox as text: paths made per job are text
    intake: Intake = field(init=False)
    scheduler: Scheduler = field(init=False)
    running: Running = field(init=False)
    ending: Ending = field(init=False)
    fleet: Fleet = field(init=False)
    recovery: Recovery = field(init=False)
    stops: Stops = field(init=False)
    holds: Holds = field(init=False)
    dependencies: Dependencies = field(init=False)
    hooks: Hooks = field(init=False)  # completion hooks: told of every end (kinod.hooks)

    def __post_init__(self) -> None:
        self.inbox_text = str(self.settings.inbox)

    @property
    def node(self) -> str:
        return self.settings.node

    def serves(self, plugin: str) -> bool:
        """This node runs jobs of ``plugin`` (``serves`` in the settings)."""
        return self.settings.serves is None or plugin in self.settings.serves

    def stop_file(self, job_id: str) -> str:
        return f"{self.inbox_text}/{job_id}.stop"
