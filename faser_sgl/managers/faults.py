"""Fault injection for reliability tests: make a chosen request's forward pass raise, or hold
back its output messages, inside a real server.

Off unless the server's environment has FASER_SGL_FAULT_INJECTION=1 (tests set it; nothing
else should).  When on, a request opts in through its rid (SGLang's /generate takes a "rid"
field), so a test picks exactly which requests are involved and every other request in the same
batch is a bystander whose fate the test can check:

- rid starting with ``fault-target``: every target forward pass of a batch holding this request
  raises (after the step has started, so the recovery path meets half-done state).
- rid starting with ``fault-draft``: every draft-model pass of such a batch raises.
- rid starting with ``fault-stall``: the request's messages to the detokenizer are held back
  for FASER_SGL_FAULT_STALL_S seconds (default 3) each, in order, while the scheduler keeps
  running the rest of the batch.
- rid starting with ``fault-noplan``: while such a request waits or runs, the planner plans
  nothing (a planted planner defect: work waiting and no step, for the progress watchdog).
"""

from __future__ import annotations

import os
import time
from collections import deque

ENV_SWITCH = "FASER_SGL_FAULT_INJECTION"
ENV_STALL_SECONDS = "FASER_SGL_FAULT_STALL_S"
TARGET_PREFIX = "fault-target"
DRAFT_PREFIX = "fault-draft"
STALL_PREFIX = "fault-stall"
NOPLAN_PREFIX = "fault-noplan"


class InjectedFault(RuntimeError):
    """What an injected fault raises (a real exception type, handled like any other)."""


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH) == "1"


class FaultInjector:
    def __init__(self, stall_seconds: float | None = None):
        self.stall_seconds = float(os.environ.get(ENV_STALL_SECONDS, "3")) if stall_seconds is None \
            else stall_seconds
        self._batch_rids: tuple[str, ...] = ()
        self._held: deque[tuple[float, str, object]] = deque()  # (due time, rid, message)
        self.num_raised = 0

    # -- forward passes ------------------------------------------------------------------------
    def arm(self, rids) -> None:
        """The rids of the step about to run (the wrapped passes check them)."""
        self._batch_rids = tuple(rids)

    def wrap(self, runner, prefix: str) -> None:
        """Make runner.forward raise while a batch holds a request whose rid starts with prefix."""
        forward = runner.forward

        def faulty_forward(*args, **kwargs):
            involved = [rid for rid in self._batch_rids if rid.startswith(prefix)]
            if involved:
                self.num_raised += 1
                raise InjectedFault(f"injected {prefix} fault (requests {involved})")
            return forward(*args, **kwargs)

        runner.forward = faulty_forward

    def wrap_planner(self, planner) -> None:
        """Make planner.plan return no chunks while a request whose rid starts with
        NOPLAN_PREFIX waits or runs."""
        plan = planner.plan

        def stuck_plan(*args, **kwargs):
            if any(r.rid.startswith(NOPLAN_PREFIX) for r in [*planner.waiting, *planner.running]):
                return []
            return plan(*args, **kwargs)

        planner.plan = stuck_plan

    # -- output messages -----------------------------------------------------------------------
    def split_stalled(self, reqs: list) -> tuple[list, list]:
        """(requests whose output goes out now, requests whose output is held back).  A request
        with a message already held waits behind it, so its messages keep their order."""
        held_rids = {rid for _, rid, _ in self._held}
        now, later = [], []
        for req in reqs:
            (later if req.rid.startswith(STALL_PREFIX) or req.rid in held_rids else now).append(req)
        return now, later

    def hold(self, rid: str, message) -> None:
        self._held.append((time.monotonic() + self.stall_seconds, rid, message))

    def due(self) -> list:
        """Held messages whose stall is over, oldest first."""
        out, now = [], time.monotonic()
        while self._held and self._held[0][0] <= now:
            out.append(self._held.popleft()[2])
        return out

    @property
    def holding(self) -> bool:
        return bool(self._held)
