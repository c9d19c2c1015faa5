"""SGLang's custom logit processors (managers/logit_processor.py), through a real server: the
processor decides the tokens, a stateful one sees one call per generated token, and under
speculation a request with a processor drafts nothing while its neighbours keep drafting."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from sglang.srt.sampling.custom_logit_processor import CustomLogitProcessor

from reference import hf_greedy, load_hf_model


def processor_classes():
    """The processors.  dill ships a class by value, but the globals of its methods by reference
    to their module (this test module): a client's processor defined in its __main__ script
    travels whole, one defined in a module needs that module importable where the server runs,
    hence PYTHONPATH in the servers below (SGLang's own tests run as scripts, from __main__)."""

    class ForceToken(CustomLogitProcessor):
        """Every row: only custom_params["token_id"] may be drawn."""

        def __call__(self, logits, custom_param_list):
            for i, params in enumerate(custom_param_list):
                logits[i, :] = -float("inf")
                logits[i, params["token_id"]] = 0.0
            return logits

    class CountUpAfterDelay(CustomLogitProcessor):
        """Leaves the first `delay` tokens alone, then forces token_id, token_id + 1, ... (reads
        the request's own output through "__req__", mutates its params: one call per token)."""

        def __call__(self, logits, custom_param_list):
            for i, params in enumerate(custom_param_list):
                if params["delay"] > 0:
                    params["delay"] -= 1
                    continue
                outputs = params["__req__"].output_ids
                forced = params["token_id"] if params["delay"] == 0 else outputs[-1] + 1
                params["delay"] = -1
                logits[i, :] = -float("inf")
                logits[i, forced] = 0.0
            return logits

    return ForceToken, CountUpAfterDelay


TESTS_DIR = {"PYTHONPATH": str(Path(__file__).resolve().parent)}


@pytest.fixture(scope="module")
def plain_server(tiny_model_path, tmp_path_factory):
    from server_utils import start_server

    server = start_server(tiny_model_path, tmp_path_factory.mktemp("lp"), [
        "--max-total-tokens", "2048", "--enable-custom-logit-processor"], env=TESTS_DIR)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def spec_server_for_processors(tiny_model_factory, partial_draft_path, tmp_path_factory):
    from server_utils import start_server

    target = tiny_model_factory("llama", seed=0)
    server = start_server(target, tmp_path_factory.mktemp("spec_lp"), [
        "--max-total-tokens", "2048", "--speculative-policy", "fixed",
        "--speculative-draft-model-path", partial_draft_path, "--speculative-num-draft-tokens", "4",
        "--enable-custom-logit-processor"], env=TESTS_DIR)
    yield server, target
    server.stop()


def _generate(base_url, ids, processor=None, params=None, n=12, temperature=0.0):
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": n, "temperature": temperature,
                                                  "ignore_eos": True}}
    if processor is not None:
        body["custom_logit_processor"] = processor.to_str()
        body["sampling_params"]["custom_params"] = params
    r = requests.post(f"{base_url}/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _check_processors(base_url, hf, target_path):
    ForceToken, CountUpAfterDelay = processor_classes()
    forced = _generate(base_url, [5, 17, 33], ForceToken, {"token_id": 77}, temperature=1.0)
    assert forced["output_ids"] == [77] * 12
    free = hf_greedy(hf, [9, 4, 21], 3)
    counted = _generate(base_url, [9, 4, 21], CountUpAfterDelay, {"token_id": 200, "delay": 3})
    assert counted["output_ids"] == free + list(range(200, 209))
    return forced, counted


def test_custom_logit_processors_without_speculation(plain_server, tiny_model_path):
    hf = load_hf_model(tiny_model_path)
    _check_processors(plain_server.base_url, hf, tiny_model_path)
    plain = _generate(plain_server.base_url, [9, 4, 21])  # the processor of a request stays its own
    assert plain["output_ids"] == hf_greedy(hf, [9, 4, 21], 12)


def test_a_request_with_a_logit_processor_drafts_nothing_beside_drafting_ones(spec_server_for_processors):
    server, target = spec_server_for_processors
    hf = load_hf_model(target)
    prompts = [list(range(40, 60)), [7] * 9, [3, 9, 12]]
    with ThreadPoolExecutor(4) as pool:  # the processors' requests run beside drafting ones
        futures = [pool.submit(_generate, server.base_url, p, n=16) for p in prompts]
        forced, counted = _check_processors(server.base_url, hf, target)
        plain = [f.result() for f in futures]
    for body, prompt in zip(plain, prompts):
        assert body["output_ids"] == hf_greedy(hf, prompt, 16)  # still lossless
    assert sum(b["meta_info"]["spec_num_proposed_drafts"] for b in plain) > 0
    for body in (forced, counted):
        assert body["meta_info"].get("spec_num_proposed_drafts", 0) == 0
    assert server.wait_kv_free()["kv_used_slots"] == 0


def test_a_processor_that_does_not_load_is_a_400(plain_server):
    r = requests.post(f"{plain_server.base_url}/generate", timeout=60, json={
        "input_ids": [1, 2, 3], "custom_logit_processor": '{"callable": "00ff"}',
        "sampling_params": {"max_new_tokens": 2}})
    assert r.status_code == 400, r.text
    assert "custom_logit_processor" in r.text
    assert requests.get(f"{plain_server.base_url}/health", timeout=30).status_code == 200
