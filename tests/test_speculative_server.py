"""Speculative decoding through a real server (tiny target + a different tiny draft)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from reference import hf_greedy, load_hf_model


@pytest.fixture(scope="module")
def spec_server(tiny_model_factory, tmp_path_factory):
    from server_utils import start_server

    target = tiny_model_factory("llama", seed=0)
    draft = tiny_model_factory("llama", seed=1)
    server = start_server(target, tmp_path_factory.mktemp("spec"), [
        "--max-total-tokens", "2048", "--speculative-policy", "fixed",
        "--speculative-draft-model-path", draft, "--speculative-num-draft-tokens", "4"])
    yield server, target
    server.stop()


def test_ragged_speculation_is_lossless_and_frees_kv(spec_server):
    server, target = spec_server
    prompts = [[5, 17, 33], list(range(40, 70)), [7] * 11, [3, 9], list(range(100, 121)), [8, 8, 9]]
    hf = load_hf_model(target)
    expected = [hf_greedy(hf, p, 20) for p in prompts]

    def run(i):
        r = requests.post(f"{server.base_url}/generate", timeout=120, json={
            "input_ids": prompts[i], "stream": i % 2 == 1,
            "sampling_params": {"max_new_tokens": 20, "temperature": 0, "ignore_eos": True,
                                "custom_params": {"num_draft_tokens": i + 1}}})
        assert r.status_code == 200, r.text
        return r

    with ThreadPoolExecutor(len(prompts)) as pool:
        responses = list(pool.map(run, range(len(prompts))))
    for i, r in enumerate(responses):
        if i % 2 == 0:
            body = r.json()
            assert body["output_ids"] == expected[i], i
            meta = body["meta_info"]
            # Per-request speculation metrics, with SGLang's names.
            assert meta["spec_verify_ct"] > 0
            assert meta["spec_num_proposed_drafts"] > 0
            assert 0.0 <= meta["spec_accept_rate"] <= 1.0
            assert meta["spec_accept_length"] == pytest.approx(
                1 + meta["spec_num_correct_drafts"] / meta["spec_verify_ct"])
            assert 1.0 <= meta["spec_accept_length"] <= i + 2  # at most K = i + 1 drafts, + 1
    state = server.wait_kv_free()
    assert state["kv_used_slots"] == 0
    assert state["speculative_policy"] == "fixed"
    assert state["spec_verify_steps"] > 0
    assert state["spec_accepted_tokens"] < state["spec_drafted_tokens"]  # rejections rolled back
    assert state["avg_spec_accept_length"] >= 1.0


def test_invalid_draft_length_is_a_400(spec_server):
    server, _ = spec_server
    r = requests.post(f"{server.base_url}/generate", timeout=60, json={
        "input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 4, "custom_params": {"num_draft_tokens": -2}}})
    assert 400 <= r.status_code < 500
    assert "num_draft_tokens" in r.text
    server.wait_kv_free()


def test_sampling_with_speculation_is_seeded(spec_server):
    server, _ = spec_server
    body = {"input_ids": [4, 5, 6], "sampling_params": {
        "max_new_tokens": 16, "temperature": 0.9, "top_p": 0.95, "sampling_seed": 7, "ignore_eos": True}}
    a = requests.post(f"{server.base_url}/generate", json=body, timeout=60).json()["output_ids"]
    b = requests.post(f"{server.base_url}/generate", json=body, timeout=60).json()["output_ids"]
    assert a == b and len(a) == 16
    server.wait_kv_free()
