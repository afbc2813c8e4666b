"""Several threads doing one thing at the same moment, for races on real folders."""

from __future__ import annotations

import threading
from collections.abc import Callable

# Rounds of a race: enough to catch a lost race most runs, a second or two on two cores.
ROUNDS = 200


def race(racers: int, act: Callable[[int], object]) -> list[str]:
    """``act(i)`` on ``racers`` threads let go at once. Each one's outcome: "moved" when it
    returned something other than None, "gone" when it returned None or raised
    FileNotFoundError, "exists" when it raised FileExistsError."""
    barrier = threading.Barrier(racers, timeout=10)
    outcomes = [""] * racers

    def run(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = "gone" if act(i) is None else "moved"
        except FileNotFoundError:
            outcomes[i] = "gone"
        except FileExistsError:
            outcomes[i] = "exists"

    threads = [threading.Thread(target=run, args=(i,), name=f"racer{i}") for i in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return outcomes
