"""Speculative decoding through a real server (tiny target + a draft that partly agrees with it:
the target with 2% weight noise, conftest.PARTIAL_DRAFT)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from reference import hf_greedy, load_hf_model
from server_utils import stream_events


# Greedy acceptance of the partial draft is ~0.45 over these prompts: well inside this band, and
# far from both an unrelated draft (~0) and the target itself (1). Only the total is held to it:
# one request's rate swings with its prompt (a repetitive prompt reached 12/13 in CI), and the
# draft's near-ties can flip with the batch it shares a matmul with.
ACCEPT_BAND = (0.2, 0.9)


@pytest.fixture(scope="module", params=["serial", "pipeline"])
def spec_server(request, tiny_model_factory, partial_draft_path, tmp_path_factory):
    """Serial draft-then-verify, and FASER's frontier pipeline in frontiers of 2 (draft and
    verification on the two sides of a core split)."""
    from server_utils import start_server

    target = tiny_model_factory("llama", seed=0)
    draft = partial_draft_path
    frontier = ["--faser-frontier-size", "2"] if request.param == "pipeline" else []
    server = start_server(target, tmp_path_factory.mktemp("spec"), [
        "--max-total-tokens", "2048", "--speculative-policy", "fixed",
        "--speculative-draft-model-path", draft, "--speculative-num-draft-tokens", "4", *frontier])
    server.pipeline = request.param == "pipeline"
    yield server, target
    server.stop()


def test_ragged_speculation_is_lossless_and_frees_kv(spec_server):
    server, target = spec_server
    prompts = [[5, 17, 33], list(range(40, 70)), [7] * 11, [3, 9], list(range(100, 121)), [8, 8, 9]]
    hf = load_hf_model(target)
    expected = [hf_greedy(hf, p, 20) for p in prompts]

    before = server.wait_kv_free()

    def run(i):
        stream = i % 2 == 1
        r = requests.post(f"{server.base_url}/generate", timeout=120, stream=stream, json={
            "input_ids": prompts[i], "stream": stream,
            "sampling_params": {"max_new_tokens": 20, "temperature": 0, "ignore_eos": True,
                                "custom_params": {"num_draft_tokens": i + 1}}})
        assert r.status_code == 200, r.text
        if not stream:
            return r.json()
        events = stream_events(r)
        assert events, "an empty stream"
        ids = [e["output_ids"] for e in events]
        # Every event carries all ids so far; speculation may add several per event.
        assert all(b[:len(a)] == a and len(b) > len(a) for a, b in zip(ids, ids[1:])), ids
        return events[-1]

    with ThreadPoolExecutor(len(prompts)) as pool:
        bodies = list(pool.map(run, range(len(prompts))))
    for i, body in enumerate(bodies):
        assert body["output_ids"] == expected[i], (i, "stream" if i % 2 else "whole")
        meta = body["meta_info"]
        assert meta["finish_reason"] == {"type": "length", "length": 20}, i
        # Per-request speculation metrics, with SGLang's names.
        assert meta["spec_verify_ct"] > 0
        assert meta["spec_num_proposed_drafts"] > 0
        assert 0 <= meta["spec_num_correct_drafts"] <= meta["spec_num_proposed_drafts"]
        assert meta["spec_accept_rate"] == pytest.approx(
            meta["spec_num_correct_drafts"] / meta["spec_num_proposed_drafts"])
        assert meta["spec_accept_length"] == pytest.approx(
            1 + meta["spec_num_correct_drafts"] / meta["spec_verify_ct"])
        assert 1.0 <= meta["spec_accept_length"] <= i + 2  # at most K = i + 1 drafts, + 1
    state = server.wait_kv_free()
    assert state["kv_used_slots"] == 0
    assert state["speculative_policy"] == "fixed"
    assert state["spec_verify_steps"] > before["spec_verify_steps"]
    drafted = state["spec_drafted_tokens"] - before["spec_drafted_tokens"]
    accepted = state["spec_accepted_tokens"] - before["spec_accepted_tokens"]
    # The draft agrees with the target part of the time: some drafts accepted, some rolled back.
    assert drafted > 0 and ACCEPT_BAND[0] < accepted / drafted < ACCEPT_BAND[1], (accepted, drafted)
    assert drafted == sum(b["meta_info"]["spec_num_proposed_drafts"] for b in bodies)
    assert accepted == sum(b["meta_info"]["spec_num_correct_drafts"] for b in bodies)
    assert state["avg_spec_accept_length"] > 1.0
    assert (state["spec_pipelined_steps"] > 0) == server.pipeline, state["spec_pipelined_steps"]


def test_invalid_draft_length_is_a_400(spec_server):
    server, _ = spec_server
    r = requests.post(f"{server.base_url}/generate", timeout=60, json={
        "input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 4, "custom_params": {"num_draft_tokens": -2}}})
    assert 400 <= r.status_code < 500
    assert "num_draft_tokens" in r.text
    server.wait_kv_free()


def test_seeded_sampling_is_the_same_text_whatever_the_draft_length(spec_server):
    """The default scheme (seeded-coupled) samples a seeded request by Gumbel-max with noise of
    (seed, position): any draft length, alone or in a busy batch, gives the text that target-only
    coupled sampling of that seed gives in-process."""
    from spec_harness import Engine

    server, target = spec_server
    params = {"max_new_tokens": 16, "temperature": 0.9, "top_p": 0.95, "ignore_eos": True}

    def run(args):
        seed, k = args
        r = requests.post(f"{server.base_url}/generate", timeout=120, json={
            "input_ids": [4, 5, 6], "sampling_params": {
                **params, "sampling_seed": seed, "custom_params": {"num_draft_tokens": k}}})
        assert r.status_code == 200, r.text
        return r.json()

    jobs = [(seed, k) for seed in (7, 8) for k in (0, 1, 3, 6)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = dict(zip(jobs, pool.map(run, jobs)))
    alone = run((7, 2))
    reference = Engine(target, None, sampling_scheme="coupled")
    expected = {seed: reference.run([reference.make_request([4, 5, 6], 16, sampling_seed=seed, ignore_eos=True,
                                                            temperature=0.9, top_p=0.95)])[0]
                for seed in (7, 8)}
    assert expected[7] != expected[8]
    for (seed, k), body in answers.items():
        assert body["output_ids"] == expected[seed], (seed, k)
    assert alone["output_ids"] == expected[7]
    assert any(body["meta_info"]["spec_num_correct_drafts"] > 0 for body in answers.values())
    server.wait_kv_free()
