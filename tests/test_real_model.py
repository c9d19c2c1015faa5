"""The embedded default pair (Qwen2.5-Coder-1.5B target, 0.5B draft) through the server, float32:
greedy tokens identical to Hugging Face transformers' float32 greedy generate, without
speculation and with fixed-K speculation at per-request K = 1..8 in one concurrent batch."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from reference import hf_greedy, load_hf_model

pytestmark = pytest.mark.real_model

PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "What is a hash map? Answer in one sentence.",
    "def fibonacci(n):",
    "Translate to French: The weather is nice today, so we will walk to the station.",
    "Write a SQL query that lists the ten newest users.",
    "Explain recursion to a child.",
    "import numpy as np\n# normalize the rows of a matrix",
    "List three uses of a linked list.",
]
NEW_TOKENS = [24, 12, 20, 16, 16, 12, 20, 14]


@pytest.fixture(scope="module")
def pair_paths():
    from faser_sgl import default_models

    for model in (default_models.TARGET, default_models.DRAFT):
        if not default_models.is_ready(model):
            pytest.fail("embedded model pair missing: `make test` installs it (python -m faser_sgl.default_models)")
    return default_models.default_target_path(), default_models.default_draft_path()


@pytest.fixture(scope="module")
def prompts_and_reference(pair_paths):
    from transformers import AutoTokenizer

    target = pair_paths[0]
    tok = AutoTokenizer.from_pretrained(target)
    prompt_ids = [
        list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                     tokenize=True, return_dict=True)["input_ids"])
        for p in PROMPTS
    ]
    assert len({len(p) for p in prompt_ids}) > 1, "prompts must have mixed lengths"
    hf = load_hf_model(target)
    expected = [hf_greedy(hf, p, n, eos_ids={tok.eos_token_id}) for p, n in zip(prompt_ids, NEW_TOKENS)]
    del hf
    return tok, prompt_ids, expected


def serve_concurrently(server, prompt_ids, extra_params=None):
    def run(i):
        params = {"max_new_tokens": NEW_TOKENS[i], "temperature": 0, **(extra_params(i) if extra_params else {})}
        r = requests.post(f"{server.base_url}/generate", timeout=900,
                          json={"input_ids": prompt_ids[i], "sampling_params": params})
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(len(prompt_ids)) as pool:
        return list(pool.map(run, range(len(prompt_ids))))


def assert_identical(tok, got, expected):
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, f"prompt {i}: server {tok.decode(g)!r} != transformers {tok.decode(e)!r}"


def test_server_greedy_matches_transformers_fp32(pair_paths, prompts_and_reference, tmp_path):
    from server_utils import start_server

    tok, prompt_ids, expected = prompts_and_reference
    server = start_server(pair_paths[0], tmp_path, ["--faser-dtype", "float32", "--max-total-tokens", "4096"])
    try:
        outs = serve_concurrently(server, prompt_ids)
        assert server.wait_kv_free()["kv_free_slots"] == 4096
    finally:
        server.stop()
    assert_identical(tok, [o["output_ids"] for o in outs], expected)


def test_speculative_ragged_k_matches_transformers_fp32(pair_paths, prompts_and_reference, tmp_path):
    from server_utils import start_server

    tok, prompt_ids, expected = prompts_and_reference
    server = start_server(pair_paths[0], tmp_path, [
        "--faser-dtype", "float32", "--max-total-tokens", "4096", "--speculative-policy", "fixed",
        "--speculative-draft-model-path", pair_paths[1], "--speculative-num-draft-tokens", "8"])
    try:
        # Request i drafts K = i + 1 tokens per step: K = 1..8 verified together, ragged.
        outs = serve_concurrently(server, prompt_ids, lambda i: {"custom_params": {"num_draft_tokens": i + 1}})
        state = server.wait_kv_free()
        assert state["kv_free_slots"] == 4096
        assert state["spec_verify_steps"] > 0
        assert state["avg_spec_accept_length"] > 1.0, state
    finally:
        server.stop()
    assert_identical(tok, [o["output_ids"] for o in outs], expected)
