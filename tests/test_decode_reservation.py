"""Admission that keeps room for the running requests' future tokens (SGLang's new_token_ratio,
managers/decode_reservation.py), against the real planner and slot allocator."""

from __future__ import annotations

import pytest

from faser_sgl.executor.kv_cache import SlotAllocator
from faser_sgl.managers.batch_planner import BatchPlanner
from faser_sgl.managers.decode_reservation import DecodeReservation
from faser_sgl.managers.request import Request, StopConditions

EOS = frozenset({0})


def make_req(rid: str, prompt: int, max_new: int, stop_ids=EOS) -> Request:
    return Request(rid=rid, http_worker_ipc=None, prompt_ids=list(range(1, prompt + 1)),
                   stop=StopConditions(max_new, stop_ids), sampling=None, stream=False)


def test_the_ratio_decays_without_retraction_and_resets_to_the_observed_use_after_one():
    reservation = DecodeReservation(1.0)
    assert reservation.ratio == pytest.approx(0.7)
    for _ in range(300):
        reservation.decoded_without_retraction()
    assert reservation.ratio == pytest.approx(0.7 - 300 * (0.7 - 0.098) / 600)
    for _ in range(1000):
        reservation.decoded_without_retraction()
    assert reservation.ratio == pytest.approx(0.098)  # 0.14 of the start, and no lower
    running = [make_req("a", 4, 100), make_req("b", 4, 100)]
    running[0].output_ids = [5] * 60
    running[1].output_ids = [5] * 40
    reservation.retracted(running)
    assert reservation.ratio == pytest.approx((100 + 20 * 2) / 201)
    assert DecodeReservation(2.0).ratio == 1.0 and DecodeReservation(0.0).ratio == 0.0
    with pytest.raises(ValueError, match=">= 0"):
        DecodeReservation(-1.0)


def test_admission_keeps_room_for_the_running_requests_outputs_scaled_by_conservativeness():
    """A (10-token prompt, up to 100 new tokens) runs in a 150-slot pool; B (10 + 40) is
    admitted once A decodes, because A keeps 0.7 x 99 slots for its output; at
    conservativeness 2 (ratio 1) A keeps all 99, and B waits."""
    for conservativeness, b_admitted in ((1.0, True), (2.0, False)):
        planner = BatchPlanner(SlotAllocator(150), max_running_requests=8, max_step_tokens=64,
                               conservativeness=conservativeness)
        a, b = make_req("a", 10, 100), make_req("b", 10, 40)
        planner.add(a)
        planner.add(b)
        first = planner.plan()
        # In A's admission step B waits: a request admitted now counts its whole budget.
        assert [c.req for c in first] == [a] and list(planner.waiting) == [b]
        a.output_ids.append(5)
        second = planner.plan()
        assert (b in [c.req for c in second]) == b_admitted, conservativeness


def test_a_request_ignoring_eos_reserves_its_whole_output():
    reservation = DecodeReservation(1.0)
    greedy, forced = make_req("g", 4, 100), make_req("f", 4, 100, stop_ids=frozenset())
    assert reservation.future_tokens(greedy) == pytest.approx(70)
    assert reservation.future_tokens(forced) == 100
    forced.output_ids = [5] * 30
    assert reservation.future_tokens(forced) == 70 and reservation.new_request_tokens(forced) == 4 + 30 + 70


def run_burst(conservativeness: float, stop_ids) -> tuple[BatchPlanner, int]:
    """12 requests at once (10-token prompts, each running to its 60-token limit) into a pool
    of 200 slots, a quarter of what they need together; returns the planner and steps."""
    planner = BatchPlanner(SlotAllocator(200), max_running_requests=16, max_step_tokens=64,
                           conservativeness=conservativeness)
    reqs = [make_req(f"r{i}", 10, 60, stop_ids) for i in range(12)]
    for r in reqs:
        planner.add(r)
    steps = 0
    while planner.has_work():
        steps += 1
        assert steps < 2000, planner.describe()
        for chunk in planner.plan():
            if chunk.needs_logits:
                chunk.req.output_ids.append(5)
                if len(chunk.req.output_ids) >= chunk.req.stop.max_new_tokens:
                    planner.release(chunk.req)
    assert all(len(r.output_ids) == 60 for r in reqs)
    assert planner.allocator.num_available == 200
    return planner, steps


def test_a_burst_that_would_thrash_is_admitted_without_retraction():
    """Without reserving for running requests (conservativeness 0) the burst is admitted as
    soon as prompts fit, the requests grow into each other and the newest are retracted and
    recomputed; reserving for requests that ignore EOS (whose whole budget will be used) admits
    only what will fit, and nothing is retracted; with EOS-able requests that run to their
    limit anyway the 0.7 ratio over-admits, retraction raises it to what they used, and the
    retractions stay fewer than without a reservation."""
    unreserved, _ = run_burst(0.0, EOS)
    assert unreserved.num_retractions > 0
    exact, _ = run_burst(1.0, frozenset())
    assert exact.num_retractions == 0
    learned, _ = run_burst(1.0, EOS)
    assert learned.num_retractions < unreserved.num_retractions
    assert learned.reservation.ratio > 0.7  # raised by a retraction to the requests' real use


def test_the_output_clip_follows_sglangs_variable(monkeypatch):
    """SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION bounds what a request's max_new_tokens counts for, as
    in SGLang (its test_large_max_new_tokens lowers it so that four long requests run at once
    in a small pool)."""
    ignoring_eos = make_req("a", 10, 8000, stop_ids=frozenset())
    assert DecodeReservation().future_tokens(ignoring_eos) == 4096
    monkeypatch.setenv("SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION", "256")
    reservation = DecodeReservation()
    assert reservation.future_tokens(ignoring_eos) == 256
    assert reservation.new_request_tokens(make_req("b", 10, 8000)) == 10 + 256
    planner = BatchPlanner(SlotAllocator(1536), max_running_requests=8, max_step_tokens=512)
    for i in range(4):  # 4 x (10 + 256) fit in 1536 slots; with the default clip only one runs
        planner.add(make_req(f"r{i}", 10, 8000))
    planner.plan()
    assert len(planner.running) == 4
