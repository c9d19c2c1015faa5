"""SGLang server flags mean here what they mean in SGLang (issue 28, item 3)."""

from __future__ import annotations

import pytest
import requests

from faser_sgl.executor.kv_cache import SlotAllocator
from faser_sgl.managers.batch_planner import BatchPlanner
from faser_sgl.managers.request import Request, StopConditions
from faser_sgl.managers.step_budget import step_token_budget
from faser_sgl.sim.settings import parse_setting


def make_req(rid: str, prompt: int | list[int]) -> Request:
    """prompt: the token ids, or a length (ids 1..n)."""
    ids = list(range(1, prompt + 1)) if isinstance(prompt, int) else list(prompt)
    return Request(rid=rid, http_worker_ipc=None, prompt_ids=ids,
                   stop=StopConditions(8, frozenset()), sampling=None, stream=False)


def test_chunked_prefill_size_sets_the_step_budget_and_non_positive_turns_chunking_off():
    """SGLang: --chunked-prefill-size N caps a prefill chunk; <= 0 (its tests pass -1) turns
    chunked prefill off, whole prompts in one pass.  It used to become a step budget of -1,
    with which the planner admitted nothing and the scheduler spun."""
    assert step_token_budget(None, 2048, 32768, 16384, 64) == 2048
    assert step_token_budget(512, 2048, 32768, 16384, 64) == 512
    for off in (-1, 0):
        assert step_token_budget(off, 2048, 32768, 16384, 64) == 32768 + 64
    assert step_token_budget(-1, 2048, 4096, 16384, 8) == 16384 + 8
    # The simulator reads the flag the same way.
    assert parse_setting("off", "--chunked-prefill-size -1 --context-length 8192").max_step_tokens > 8192
    assert parse_setting("on", "--chunked-prefill-size 256").max_step_tokens == 256


def test_with_chunking_off_a_long_prompt_is_prefilled_in_one_pass_beside_decodes():
    alloc = SlotAllocator(16384)
    budget = step_token_budget(-1, 2048, 8192, None, 4)
    planner = BatchPlanner(alloc, max_running_requests=4, max_step_tokens=budget)
    short = make_req("short", 3)
    planner.add(short)
    assert [len(c.tokens) for c in planner.plan()] == [3]
    short.output_ids.append(7)  # it decodes from now on
    long = make_req("long", 6000)
    planner.add(long)
    chunks = planner.plan()
    assert [(c.req.rid, len(c.tokens)) for c in chunks] == [("short", 1), ("long", 6000)]
    # With a chunk size the same prompt is split, as before.
    chunked = BatchPlanner(SlotAllocator(16384), max_running_requests=4,
                           max_step_tokens=step_token_budget(2048, 2048, 8192, None, 4))
    chunked.add(make_req("long", 6000))
    assert [len(c.tokens) for c in chunked.plan()] == [2048]


def test_refused_flags_name_the_reason_at_start_up(tiny_model_path):
    from faser_sgl.launch_server import prepare_args

    with pytest.raises(SystemExit, match="--schedule-policy lof is not supported by faser_sgl"):
        prepare_args(["--model-path", tiny_model_path, "--schedule-policy", "lof"])
    with pytest.raises(SystemExit, match="--schedule-conservativeness must be >= 0, got -1"):
        prepare_args(["--model-path", tiny_model_path, "--schedule-conservativeness", "-1"])
    with pytest.raises(SystemExit, match=r"--mem-fraction-static must be in \(0, 1\], got 1.5"):
        prepare_args(["--model-path", tiny_model_path, "--mem-fraction-static", "1.5"])
    for flags, reason in [(["--enable-priority-scheduling"], "priority scheduling is not implemented"),
                          (["--num-continuous-decode-steps", "4"], "multi-step decoding is not implemented"),
                          (["--page-size", "16"], "paged one token per slot"),
                          (["--prefill-max-requests", "0"], "must be at least 1, got 0"),
                          (["--enable-prefill-delayer"], "DP-attention"),
                          (["--grammar-backend", "outlines"], "xgrammar only")]:
        with pytest.raises(SystemExit, match=f"{flags[0]}.*{reason}"):
            prepare_args(["--model-path", tiny_model_path, *flags])


def test_ignored_flags_are_named_in_a_warning(tiny_model_path, capsys):
    from faser_sgl.launch_server import prepare_args

    prepare_args(["--model-path", tiny_model_path, "--cuda-graph-max-bs-decode", "8", "--schedule-policy", "lpm",
                  "--scheduler-recv-interval", "4", "--default-priority-value", "3"])
    err = capsys.readouterr().err
    assert "--cuda-graph-max-bs-decode is ignored by faser_sgl" in err
    assert "--scheduler-recv-interval is ignored by faser_sgl" in err
    assert "--default-priority-value is ignored by faser_sgl" in err
    assert "schedule-policy" not in err


def test_lpm_admits_the_longest_cached_prefix_first_and_fcfs_keeps_arrival_order():
    from faser_sgl.managers.prefix_cache import PrefixCache

    shared = list(range(1, 41))
    orders = {}
    for policy in ("fcfs", "lpm"):
        alloc = SlotAllocator(256)
        cache = PrefixCache(alloc)
        planner = BatchPlanner(alloc, max_running_requests=1, max_step_tokens=256, prefix_cache=cache,
                               schedule_policy=policy)
        first = make_req("first", shared)
        planner.add(first)
        planner.plan()
        planner.release(first)  # its KV goes to the cache
        assert cache.matched_len(shared + [99], 41) == 40
        cold = make_req("cold", [500 + i for i in range(30)])
        warm = make_req("warm", shared + [77, 78])
        planner.add(cold)
        planner.add(warm)
        orders[policy] = [c.req.rid for c in planner.plan()]
    assert orders == {"fcfs": ["cold"], "lpm": ["warm"]}
    # Without the prefix cache there is nothing to match: SGLang falls back to fcfs, so do we.
    assert BatchPlanner(SlotAllocator(8), 1, 8, None, schedule_policy="lpm").schedule_policy == "fcfs"
    with pytest.raises(ValueError):
        BatchPlanner(SlotAllocator(8), 1, 8, None, schedule_policy="lof")


def test_prefill_max_requests_caps_the_requests_prefilling_in_one_step():
    """SGLang's --prefill-max-requests: at most N requests in a prefill batch; here at most N
    requests carry a prefill chunk in one step (continuing chunks included), decodes beside."""
    planner = BatchPlanner(SlotAllocator(4096), max_running_requests=8, max_step_tokens=64,
                           prefill_max_requests=1)
    reqs = [make_req(f"r{i}", 40) for i in range(3)]
    for req in reqs:
        planner.add(req)
    steps = []
    for _ in range(4):
        chunks = planner.plan()
        steps.append([(c.req.rid, len(c.tokens)) for c in chunks])
        for c in chunks:
            if c.needs_logits:
                c.req.output_ids.append(7)  # prefilled: it decodes from the next step
    # One prefill per step; the first request decodes beside the second's prefill.
    assert steps[0] == [("r0", 40)]
    assert steps[1] == [("r0", 1), ("r1", 40)]
    assert steps[2] == [("r0", 1), ("r1", 1), ("r2", 40)]
    unlimited = BatchPlanner(SlotAllocator(4096), max_running_requests=8, max_step_tokens=64)
    for i in range(3):
        unlimited.add(make_req(f"u{i}", 20))
    assert len(unlimited.plan()) == 3


@pytest.fixture(scope="module")
def flagged_server(tiny_model_path, tmp_path_factory):
    """One server with the honoured flags SGLang's own tests pass, each checked below."""
    from server_utils import start_server

    server = start_server(tiny_model_path, tmp_path_factory.mktemp("flagged"),
                          ["--max-total-tokens", "4096", "--chunked-prefill-size", "-1",
                           "--schedule-policy", "lpm", "--max-running-requests", "2",
                           "--stream-interval", "4", "--max-queued-requests", "4",
                           "--prefill-max-requests", "1", "--abort-on-priority-when-disabled",
                           "--decode-log-interval", "2"])
    yield server
    server.stop()


def test_a_server_started_with_chunked_prefill_off_serves(flagged_server):
    """SGLang's own test suite starts servers with --chunked-prefill-size -1: /health answered
    503 and the first request waited forever."""
    assert requests.get(flagged_server.base_url + "/health", timeout=30).status_code == 200
    out = requests.post(flagged_server.base_url + "/generate", json={
        "text": "def foo(x):" * 40, "sampling_params": {"max_new_tokens": 8, "temperature": 0}},
        timeout=120)
    assert out.status_code == 200, out.text
    assert out.json()["meta_info"]["completion_tokens"] == 8
    state = flagged_server.internal_state()
    assert state["step_budget_tokens"] > state["context_length"]
    assert state["schedule_policy"] == "lpm"
    assert state["prefill_max_requests"] == 1


def test_a_priority_is_refused_when_the_server_says_so(flagged_server):
    """SGLang's --abort-on-priority-when-disabled: a request that names a priority gets its 503."""
    out = requests.post(flagged_server.base_url + "/generate", json={
        "input_ids": [3, 5, 7, 9], "priority": 5, "sampling_params": {"max_new_tokens": 4}}, timeout=60)
    assert out.status_code == 503 and "Using priority is disabled for this server" in out.text, out.text
    plain = requests.post(flagged_server.base_url + "/generate", json={
        "input_ids": [3, 5, 7, 9], "sampling_params": {"max_new_tokens": 4}}, timeout=60)
    assert plain.status_code == 200, plain.text


def test_max_running_requests_bounds_the_batch(flagged_server):
    from concurrent.futures import ThreadPoolExecutor

    def one(i):
        return requests.post(flagged_server.base_url + "/generate", json={
            "input_ids": [3 + i, 5, 7, 9], "sampling_params": {
                "max_new_tokens": 48, "temperature": 0, "ignore_eos": True}}, timeout=120)

    running, waiting = [], []
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(one, i) for i in range(4)]
        while not all(f.done() for f in futures):
            state = flagged_server.internal_state()
            running.append(state["num_running_reqs"])
            waiting.append(state["num_waiting_reqs"])
        assert all(f.result().status_code == 200 for f in futures)
    assert max(running) == 2 and max(waiting) >= 1, (running, waiting)


def test_max_queued_requests_sheds_load_with_a_503(flagged_server):
    """SGLang's --max-queued-requests: a request that finds the waiting queue full gets a 503
    "The request queue is full." at once; the others are served."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i):
        return requests.post(flagged_server.base_url + "/generate", json={
            "input_ids": [3 + i, 5, 7, 9], "sampling_params": {
                "max_new_tokens": 48, "temperature": 0, "ignore_eos": True}}, timeout=120)

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(one, range(12)))
    shed = [a for a in answers if a.status_code == 503]
    served = [a for a in answers if a.status_code == 200]
    assert len(shed) + len(served) == 12, [a.text for a in answers]
    # At most 2 running + 4 waiting while they arrive together: the rest are shed.
    assert len(shed) >= 2 and len(served) >= 4, [a.status_code for a in answers]
    assert all("The request queue is full." in a.text for a in shed)
    assert requests.get(flagged_server.base_url + "/health", timeout=30).status_code == 200


def test_stream_interval_sends_every_fourth_token(flagged_server):
    from server_utils import stream_events

    r = requests.post(flagged_server.base_url + "/generate", stream=True, json={
        "input_ids": [3, 5, 7, 9], "stream": True,
        "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}}, timeout=120)
    events = stream_events(r)
    counts = [len(e["output_ids"]) for e in events]
    assert counts[-1] == 12 and len(counts) <= 4, counts


def test_mem_fraction_static_and_conservativeness_on_a_server(tiny_model_path, tmp_path):
    """--mem-fraction-static sizes the pool from the machine's whole memory as SGLang does (not
    the CPU's fixed 32768 slots), and --schedule-conservativeness 2 makes admission keep the
    running requests' whole output budgets free (ratio 0.7 x 2, at most 1)."""
    import psutil
    from server_utils import start_server

    mem = psutil.virtual_memory()
    # Room for the server's processes and pools beyond what is in use now: 4 GiB.
    fraction = round(1 - (mem.available - 4 * 2**30) / mem.total, 4)
    server = start_server(tiny_model_path, tmp_path / "server",
                          ["--mem-fraction-static", str(fraction), "--schedule-conservativeness", "2"])
    try:
        state = server.internal_state()
        assert state["kv_total_slots"] != 32768
        assert 16 <= state["kv_total_slots"] and state["kv_total_slots"] * 384 <= 4 * 2**30, state
        # It started at min(0.7 x 2, 1) and decays by 0.86 / 600 per decode step (the
        # warm-up request's few steps); conservativeness 1 would start at 0.7.
        assert 0.95 < state["new_token_ratio"] <= 1.0
        out = requests.post(server.base_url + "/generate", json={
            "input_ids": [3, 5, 7, 9], "sampling_params": {"max_new_tokens": 8, "temperature": 0}},
            timeout=120)
        assert out.status_code == 200, out.text
    finally:
        server.stop()


def test_the_idle_scheduler_trims_its_heap(flagged_server):
    """After serving, the idle scheduler hands its heap's free pages back (heap_trim.py)."""
    import time

    out = requests.post(flagged_server.base_url + "/generate", json={
        "input_ids": [3, 5, 7, 9], "sampling_params": {"max_new_tokens": 4}}, timeout=60)
    assert out.status_code == 200
    deadline = time.monotonic() + 30
    while flagged_server.internal_state()["heap_trims"] < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert flagged_server.internal_state()["heap_trims"] >= 1


def test_the_scheduler_runs_with_a_bounded_onednn_cache(flagged_server):
    """launch_server bounds oneDNN's primitive cache before the scheduler process starts, and the
    scheduler's own environment (what oneDNN reads there) carries the bound."""
    import os

    from faser_sgl.executor.onednn_cache import DEFAULT_CAPACITY, ENV, LEGACY_ENV

    expected = DEFAULT_CAPACITY
    if os.environ.get(ENV) or os.environ.get(LEGACY_ENV):  # the user's own bound is kept
        expected = int(os.environ.get(ENV) or os.environ[LEGACY_ENV])
    assert flagged_server.internal_state()["onednn_primitive_cache_capacity"] == expected


def test_the_log_has_sglangs_batch_lines_at_the_decode_log_interval(flagged_server):
    """SGLang's per-step log lines (batch_log.py): people and tools read them, SGLang's own
    test_large_max_new_tokens waits for "#running-req: N" in them."""
    out = requests.post(flagged_server.base_url + "/generate", json={
        # A first token no other test's prompt starts with (test_max_queued_requests_... sends
        # [3 + i, ...] for i < 12), so the radix cache holds no prefix of it.
        "input_ids": [101, 17, 19, 23, 29],
        "sampling_params": {"max_new_tokens": 9, "temperature": 0, "ignore_eos": True}},
        timeout=120)
    assert out.status_code == 200, out.text
    log = flagged_server.log()
    assert "Prefill batch, #new-seq: 1, #new-token: 5, #cached-token: 0," in log
    decode_lines = [line for line in log.splitlines() if "Decode batch, #running-req: 1, #token:" in line]
    # 8 decode steps after the prefill's first token, a line every 2 of them.
    assert len(decode_lines) >= 4, log[-3000:]
    assert "gen throughput (token/s):" in decode_lines[-1] and "#queue-req: 0" in decode_lines[-1]
