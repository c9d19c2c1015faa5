"""Work waiting and no forward pass for too long: the scheduler says why and acts, never spins.

The run loop plans a step whenever it has work.  A planner that cannot plan anything (a step
budget of -1 tokens once turned every prompt away; any future bug may do the same) leaves the
loop polling at full speed with requests waiting forever and /health failing without a word.
This watchdog measures the time since the last completed step while work waits, against a
deadline that grows with the longest recent step (a long prefill is not a stall) and never falls
below a floor.  When it is overdue the scheduler logs the planner's state, answers the requests
that can never start with the reason, and otherwise exits like a dead scheduler (clients get
503, the server exits 70), which a supervisor restarts, instead of hanging.
"""

from __future__ import annotations

import logging
import time
from http import HTTPStatus

from faser_sgl.managers.request import finish_abort

logger = logging.getLogger(__name__)


class SchedulerStalled(RuntimeError):
    """Work waited past the watchdog's deadline with no step the planner could run."""


class ProgressWatchdog:
    # The deadline is at least this many times the longest recent step...
    STEP_MULTIPLE = 50.0
    # ... which decays by this factor per completed step, so one slow step is forgotten.
    STEP_DECAY = 0.99

    def __init__(self, floor_s: float, clock=time.monotonic):
        if floor_s <= 0:
            raise ValueError(f"the progress timeout must be positive, got {floor_s}")
        self.floor_s = floor_s
        self.clock = clock
        self.last_progress = clock()
        self.longest_step_s = 0.0

    def progressed(self, step_seconds: float = 0.0) -> None:
        """A step completed (or the scheduler acted on a stall): the wait starts again."""
        self.last_progress = self.clock()
        self.longest_step_s = max(step_seconds, self.longest_step_s * self.STEP_DECAY)

    def idle(self) -> None:
        """Nothing to do is not a stall."""
        self.last_progress = self.clock()

    @property
    def deadline_s(self) -> float:
        return max(self.floor_s, self.STEP_MULTIPLE * self.longest_step_s)

    def overdue(self) -> float | None:
        """Seconds waited since the last progress, if past the deadline; else None."""
        waited = self.clock() - self.last_progress
        return waited if waited > self.deadline_s else None


def act_on_stall(watchdog: ProgressWatchdog, planner, extra_slots_per_decode: int) -> list:
    """If work waited past the deadline: log the planner's state, release the waiting requests
    that could never start (each finished with a 503 naming why) and return them for the
    scheduler to answer; if there are none, the scheduler is stuck by a defect: raise
    SchedulerStalled, which the scheduler process handles like its death (clients get 503,
    the server exits 70).  Returns [] when nothing is overdue."""
    waited = watchdog.overdue()
    if waited is None or not planner.has_work():
        return []
    state = planner.describe()
    logger.error("no forward pass for %.0f s with work waiting; planner state: %s", waited, state)
    doomed = [(r, why) for r in list(planner.waiting)
              if (why := planner.why_never_admitted(r, extra_slots_per_decode)) is not None]
    if not doomed:
        raise SchedulerStalled(f"no forward pass for {waited:.0f} s with work waiting ({state})")
    for req, why in doomed:
        planner.release(req)
        req.finished_reason = finish_abort(f"this request can never start on this server: {why}",
                                           HTTPStatus.SERVICE_UNAVAILABLE)
    logger.error("answered %d request(s) that can never start: %s", len(doomed), doomed[0][1])
    watchdog.progressed()
    return [r for r, _ in doomed]
