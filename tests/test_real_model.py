"""The embedded default target (Qwen2.5-Coder-1.5B-Instruct) through the server, float32:
greedy tokens identical to Hugging Face transformers' float32 greedy generate."""

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
]
NEW_TOKENS = [24, 12, 20, 16]


@pytest.fixture(scope="module")
def target_path():
    from faser_sgl import default_models

    if not default_models.is_ready(default_models.TARGET):
        pytest.fail("embedded default model missing: `make test` installs it (python -m faser_sgl.default_models)")
    return default_models.default_target_path()


def test_server_greedy_matches_transformers_fp32(target_path, tmp_path):
    from transformers import AutoTokenizer

    from server_utils import start_server

    tok = AutoTokenizer.from_pretrained(target_path)
    prompt_ids = [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
        for p in PROMPTS
    ]
    prompt_ids = [list(p["input_ids"]) if hasattr(p, "keys") else list(p) for p in prompt_ids]
    assert len({len(p) for p in prompt_ids}) > 1, "prompts must have mixed lengths"

    server = start_server(target_path, tmp_path, ["--faser-dtype", "float32", "--max-total-tokens", "4096"])
    try:
        def run(i):
            r = requests.post(f"{server.base_url}/generate", timeout=600, json={
                "input_ids": prompt_ids[i],
                "sampling_params": {"max_new_tokens": NEW_TOKENS[i], "temperature": 0}})
            assert r.status_code == 200, r.text
            return r.json()["output_ids"]

        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            got = list(pool.map(run, range(len(PROMPTS))))
        state = server.wait_kv_free()
        assert state["kv_free_slots"] == 4096
    finally:
        server.stop()

    hf = load_hf_model(target_path)
    eos = {tok.eos_token_id}
    expected = [hf_greedy(hf, p, n, eos_ids=eos) for p, n in zip(prompt_ids, NEW_TOKENS)]
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, f"prompt {i}: server {tok.decode(g)!r} != transformers {tok.decode(e)!r}"
