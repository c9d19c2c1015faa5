"""The scheduler's progress watchdog (issue 28, item 2): work waiting and no forward pass past a
deadline is logged and answered, never left spinning."""

from __future__ import annotations

import time

import psutil
import pytest

from faser_sgl.executor.kv_cache import SlotAllocator
from faser_sgl.managers.batch_planner import BatchPlanner
from faser_sgl.managers.progress_watchdog import ProgressWatchdog, SchedulerStalled
from faser_sgl.managers.request import Request, StopConditions
from faser_sgl.managers.scheduler import Scheduler
from faser_sgl.options import FaserOptions
from server_utils import start_server
from test_reliability import FAULTS, PROMPTS, generate, scheduler_process


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_req(rid: str, prompt_len: int = 4) -> Request:
    return Request(rid=rid, http_worker_ipc=None, prompt_ids=list(range(1, prompt_len + 1)),
                   stop=StopConditions(8, frozenset()), sampling=None, stream=False)


def test_deadline_has_a_floor_grows_with_long_steps_and_idle_is_no_stall():
    clock = FakeClock()
    dog = ProgressWatchdog(10.0, clock)
    clock.now += 9.9
    assert dog.overdue() is None
    clock.now += 0.2
    assert dog.overdue() == pytest.approx(10.1)
    dog.progressed(0.5)  # a 0.5 s step: deadline 50 x 0.5 = 25 s
    assert dog.deadline_s == pytest.approx(25.0)
    clock.now += 20
    assert dog.overdue() is None
    dog.idle()
    clock.now += 24
    assert dog.overdue() is None
    for _ in range(500):  # the long step is forgotten step by step
        dog.progressed(0.01)
    assert dog.deadline_s == pytest.approx(10.0)
    with pytest.raises(ValueError):
        ProgressWatchdog(0.0)


def bare_scheduler(planner: BatchPlanner, clock: FakeClock) -> tuple[Scheduler, list]:
    """The scheduler's stall handling on a planner alone (no models, no sockets)."""
    sched = Scheduler.__new__(Scheduler)
    sched.planner = planner
    sched.watchdog = ProgressWatchdog(5.0, clock)
    sched.options = FaserOptions()
    sched.speculative = False
    sched.stats = {"num_failed_requests": 0}
    sent: list = []
    sched.send_outputs = sent.extend
    return sched, sent


def test_a_request_that_can_never_start_is_answered_with_the_reason():
    clock = FakeClock()
    planner = BatchPlanner(SlotAllocator(64), max_running_requests=4, max_step_tokens=0)
    sched, sent = bare_scheduler(planner, clock)
    req = make_req("never")
    planner.add(req)
    assert planner.plan() == []  # the planted state: work waiting, nothing to plan
    sched._check_progress()
    assert sent == []  # not overdue yet
    clock.now += 6
    sched._check_progress()
    assert sent == [req] and not planner.has_work()
    assert req.finished_reason["status_code"] == 503
    assert "can never start" in req.finished_reason["message"]
    assert "a step may carry 0 tokens" in req.finished_reason["message"]
    assert sched.stats["num_failed_requests"] == 1
    # A prompt larger than the whole pool, for the same reason.
    small_pool = BatchPlanner(SlotAllocator(8), max_running_requests=4, max_step_tokens=64)
    assert "more KV slots than the pool's 8" in small_pool.why_never_admitted(make_req("big", 20))
    assert small_pool.why_never_admitted(make_req("fits", 6)) is None


def test_a_stall_with_no_reason_raises_so_the_scheduler_exits_like_a_dead_one():
    clock = FakeClock()
    planner = BatchPlanner(SlotAllocator(64), max_running_requests=4, max_step_tokens=64)
    planner.plan = lambda *a, **k: []  # a planted planner defect
    sched, sent = bare_scheduler(planner, clock)
    planner.add(make_req("stuck"))
    clock.now += 6
    with pytest.raises(SchedulerStalled, match="no forward pass for 6 s"):
        sched._check_progress()
    assert sent == []


def test_server_with_a_planted_no_progress_state_answers_503_and_exits_70(tiny_model_path, tmp_path):
    """The whole path in a real server: a planner that plans nothing while a request waits
    (managers/faults.py, rid fault-noplan) trips the watchdog after --faser-progress-timeout;
    the client gets the dead-scheduler 503 and the server exits 70, as when the scheduler dies."""
    server = start_server(tiny_model_path, tmp_path, ["--max-total-tokens", "4096",
                                                      "--faser-progress-timeout", "3"], env=FAULTS)
    try:
        assert generate(server, PROMPTS[0]).status_code == 200  # healthy before
        scheduler = scheduler_process(server)
        started = time.monotonic()
        r = generate(server, PROMPTS[1], rid="fault-noplan-1")
        assert r.status_code == 503 and "scheduler process died" in r.text, r.text
        assert 3 <= time.monotonic() - started < 60
        assert server.proc.wait(timeout=60) == 70
        assert not scheduler.is_running() or scheduler.status() == psutil.STATUS_ZOMBIE
        log = "\n".join(p.read_text(errors="replace") for p in tmp_path.rglob("*.log"))
        assert "no forward pass for" in log and "'waiting': 1" in log
    finally:
        server.stop()
