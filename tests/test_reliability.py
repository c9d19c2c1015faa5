"""Faults inside a real server (managers/faults.py, switched on by the environment): a target
pass that raises, a draft pass that raises, a stalled output message; a scheduler that dies;
SIGTERM.  The server must fail only the requests involved, free what they held, keep serving,
and end cleanly or promptly."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests

from conftest import PARTIAL_DRAFT  # noqa: F401  (documents which draft the spec server uses)
from server_utils import start_server, stream_events

FAULTS = {"FASER_SGL_FAULT_INJECTION": "1"}
PROMPTS = [[1, 5, 9, 13], [2, 4, 6, 8, 10], [7, 3, 11], [12, 14, 16, 18, 20, 22]]


def generate(server, ids, n=12, rid=None, stream=False, timeout=120):
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": n, "temperature": 0, "ignore_eos": True},
            "stream": stream}
    if rid is not None:
        body["rid"] = rid
    return requests.post(f"{server.base_url}/generate", json=body, timeout=timeout, stream=stream)


def greedy_ids(server, ids, n=12):
    r = generate(server, ids, n)
    assert r.status_code == 200, r.text
    return r.json()["output_ids"]


def run_beside_fault(server, fault_rid, expected):
    """The fault request and every prompt of PROMPTS at once; returns (fault response, outputs)."""
    with ThreadPoolExecutor(len(PROMPTS) + 1) as pool:
        fault = pool.submit(generate, server, [3, 1, 4, 1, 5], 12, fault_rid)
        others = [pool.submit(generate, server, ids) for ids in PROMPTS]
        return fault.result(), [f.result() for f in others]


def check_only_fault_failed(server, fault_rid, expected):
    fault, others = run_beside_fault(server, fault_rid, expected)
    assert fault.status_code == 500, fault.text
    assert "internal error in the forward pass" in fault.text
    for r, want in zip(others, expected):
        assert r.status_code == 200, r.text
        assert r.json()["output_ids"] == want  # bystanders recomputed, output unchanged
    state = server.wait_kv_free()
    assert state["num_failed_requests"] >= 1
    assert greedy_ids(server, PROMPTS[0]) == expected[0]  # still serving, same answers


@pytest.fixture(scope="module")
def fault_server(tiny_model_path, tmp_path_factory):
    server = start_server(tiny_model_path, tmp_path_factory.mktemp("faults"),
                          ["--max-total-tokens", "4096"], env={**FAULTS, "FASER_SGL_FAULT_STALL_S": "3"})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def spec_fault_server(tiny_model_path, partial_draft_path, tmp_path_factory):
    server = start_server(tiny_model_path, tmp_path_factory.mktemp("spec_faults"),
                          ["--max-total-tokens", "4096", "--speculative-policy", "fixed", "--faser-early-exit",
                           "--speculative-draft-model-path", partial_draft_path,
                           "--speculative-num-draft-tokens", "4"], env=FAULTS)
    yield server
    server.stop()


def test_failing_target_pass_fails_only_its_request(fault_server):
    expected = [greedy_ids(fault_server, ids) for ids in PROMPTS]
    check_only_fault_failed(fault_server, "fault-target-1", expected)
    check_only_fault_failed(fault_server, "fault-target-2", expected)  # and again


def test_failing_passes_under_speculation(spec_fault_server):
    expected = [greedy_ids(spec_fault_server, ids) for ids in PROMPTS]
    check_only_fault_failed(spec_fault_server, "fault-draft-1", expected)
    check_only_fault_failed(spec_fault_server, "fault-target-1", expected)  # early-exit verification


def test_stalled_output_holds_only_its_request(fault_server):
    """The stalled request's messages wait 3 s each; the others finish meanwhile, and the
    stalled one still gets its exact output, in order."""
    want = greedy_ids(fault_server, PROMPTS[1])
    done_order = []

    def timed(name, fn):
        r = fn()
        done_order.append(name)
        return r

    with ThreadPoolExecutor(3) as pool:
        stalled = pool.submit(timed, "stalled", lambda: generate(fault_server, PROMPTS[1], rid="fault-stall-1"))
        time.sleep(0.5)
        other = pool.submit(timed, "other", lambda: generate(fault_server, PROMPTS[0]))
        assert other.result().status_code == 200
        assert stalled.result().status_code == 200
    assert done_order == ["other", "stalled"]
    assert stalled.result().json()["output_ids"] == want
    # A streaming client that gives up during the stall: everything it held is freed.
    r = generate(fault_server, PROMPTS[2], n=40, rid="fault-stall-2", stream=True, timeout=2)
    with pytest.raises(requests.exceptions.RequestException):  # read timed out
        stream_events(r)
    r.close()
    time.sleep(4)  # the held messages come due and are dropped with the aborted request
    fault_server.wait_kv_free()
    assert greedy_ids(fault_server, PROMPTS[1]) == want


def scheduler_process(server) -> psutil.Process:
    kids = psutil.Process(server.proc.pid).children(recursive=True)
    found = [p for p in kids if p.name().startswith("faser_sgl::sched")]
    assert len(found) == 1, [p.name() for p in kids]
    return found[0]


def test_dead_scheduler_answers_clients_and_exits_nonzero(tiny_model_path, tmp_path):
    server = start_server(tiny_model_path, tmp_path, ["--max-total-tokens", "4096"],
                          env={**FAULTS, "FASER_SGL_FAULT_STALL_S": "120"})
    try:
        finished_before = server.internal_state()["num_finished_requests"]
        with ThreadPoolExecutor(2) as pool:
            # Held in the scheduler by the stall: certainly in flight when it dies.
            plain = pool.submit(generate, server, PROMPTS[0], 12, "fault-stall-a")
            streamed = pool.submit(lambda: stream_events(
                generate(server, PROMPTS[1], 12, "fault-stall-b", stream=True)))
            deadline = time.monotonic() + 30
            while server.internal_state()["num_finished_requests"] < finished_before + 2 \
                    and time.monotonic() < deadline:
                time.sleep(0.2)  # both finished in the scheduler, their outputs held back
            scheduler_process(server).kill()
            r = plain.result(timeout=60)
            events = streamed.result(timeout=60)
        assert r.status_code == 503 and "scheduler process died" in r.text
        assert events and events[-1]["meta_info"]["finish_reason"]["type"] == "abort"
        assert "scheduler process died" in str(events[-1])
        assert server.proc.wait(timeout=60) == 70
    finally:
        server.stop()


def test_sigterm_drains_running_requests_then_exits_zero(tiny_model_path, tmp_path):
    server = start_server(tiny_model_path, tmp_path, ["--max-total-tokens", "4096"],
                          env={**FAULTS, "FASER_SGL_FAULT_STALL_S": "3"})
    try:
        want = greedy_ids(server, PROMPTS[0])
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(generate, server, PROMPTS[0], 12, "fault-stall-term")
            time.sleep(1.0)
            os.kill(server.proc.pid, signal.SIGTERM)
            time.sleep(0.5)
            refused = generate(server, PROMPTS[1])
            assert refused.status_code == 503 and "shutting down" in refused.text
            assert requests.get(f"{server.base_url}/health", timeout=10).status_code == 503
            r = running.result(timeout=60)
        assert r.status_code == 200 and r.json()["output_ids"] == want
        assert server.proc.wait(timeout=60) == 0
    finally:
        server.stop()


def test_sigterm_aborts_what_outlives_the_timeout(tiny_model_path, tmp_path):
    server = start_server(tiny_model_path, tmp_path, ["--max-total-tokens", "4096", "--faser-shutdown-timeout", "1"],
                          env={**FAULTS, "FASER_SGL_FAULT_STALL_S": "120"})
    try:
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(generate, server, PROMPTS[0], 12, "fault-stall-long")
            time.sleep(1.0)
            os.kill(server.proc.pid, signal.SIGTERM)
            r = running.result(timeout=60)
        assert r.json()["meta_info"]["finish_reason"]["type"] == "abort" if r.status_code == 200 \
            else r.status_code in (500, 503)
        assert server.proc.wait(timeout=60) == 0
    finally:
        server.stop()


def test_planner_runs_a_suspect_alone_until_it_is_cleared():
    """After a failed batch its requests are suspects: each runs in a batch of its own through
    its recomputation and a decode step (the scheduler then clears it), so that a failure names
    the faulty request whatever else is in flight; a fresh request admitted meanwhile runs
    beside the others once no suspect runs."""
    from faser_sgl.executor.kv_cache import SlotAllocator
    from faser_sgl.managers.batch_planner import BatchPlanner
    from faser_sgl.managers.request import Request, StopConditions

    def req(rid):
        return Request(rid=rid, http_worker_ipc=None, prompt_ids=[1, 2, 3],
                       stop=StopConditions(8, frozenset()), sampling=None, stream=False)

    alloc = SlotAllocator(256)
    planner = BatchPlanner(alloc, max_running_requests=8, max_step_tokens=64)
    a, b, c = req("a"), req("b"), req("c")
    for r in (a, b, c):
        planner.add(r)
    chunks = planner.plan()
    assert [ch.req for ch in chunks] == [a, b, c]
    for r in (c, b, a):  # what Scheduler._recover_from_failed_step does
        planner.requeue_suspect(r)
    assert alloc.num_available == 256 and list(planner.waiting) == [a, b, c]
    fresh = req("fresh")
    planner.add(fresh)
    chunks = planner.plan()
    assert [ch.req for ch in chunks] == [a] and chunks[0].needs_logits  # a alone, whole
    assert fresh in planner.running  # admitted past the waiting suspects, but waits for a
    a.suspect = False  # its passes succeeded through a decode step (what Scheduler.step does)
    a.output_ids.append(5)
    chunks = planner.plan()
    assert [ch.req for ch in chunks] == [b]  # the next suspect, alone
    b.suspect = False
    b.output_ids.append(5)
    chunks = planner.plan()
    assert [ch.req for ch in chunks] == [c]
    c.suspect = False
    c.output_ids.append(5)
    assert {ch.req for ch in planner.plan()} == {a, b, c, fresh}


def test_prefills_that_fill_the_pool_do_not_wait_for_each_other():
    """Two requests mid-prefill whose partial KV fills the pool (how retracted requests, being
    re-prefilled, can end up): the earlier one takes the later one's slots (retraction)
    instead of both stalling."""
    from faser_sgl.executor.kv_cache import SlotAllocator
    from faser_sgl.managers.batch_planner import BatchPlanner
    from faser_sgl.managers.request import Request, StopConditions

    def req(rid, n):
        return Request(rid=rid, http_worker_ipc=None, prompt_ids=list(range(1, n + 1)),
                       stop=StopConditions(4, frozenset()), sampling=None, stream=False)

    alloc = SlotAllocator(64)
    planner = BatchPlanner(alloc, max_running_requests=4, max_step_tokens=16)
    early, late = req("early", 48), req("late", 48)
    early.kv_slots, late.kv_slots = alloc.alloc(32), alloc.alloc(32)
    planner.running = [early, late]
    chunks = planner.plan()
    assert [c.req for c in chunks] == [early] and planner.num_retractions == 1
    assert list(planner.waiting) == [late] and not late.kv_slots
