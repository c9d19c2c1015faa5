"""The fuzzer's invalid requests against a real server: each is refused with a 4xx and a readable
message (never a 5xx, never a hang), and the server keeps serving normal requests after them.

The shapes SGLang 0.5.23's front half answered with a 500 or silently accepted (found by this
fuzzer) are refused by faser_sgl's RequestGuard (managers/request_guard.py); each is pinned in
``test_front_half_gaps_are_refused`` with the word its message must name.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import requests

from faser_sgl.bench.fuzz import (CATEGORIES, CHAT, COMPLETIONS, GENERATE, FuzzCase, invalid_cases,
                                  odd_but_valid_cases, random_invalid_case, send_case)

TIMEOUT = 30.0  # seconds; an answer slower than this counts as a hang

def error_message(text: str) -> str:
    """The message of an error body: SGLang's {"message"}, {"error": {"message"}} or {"error": str},
    FastAPI's {"detail"}; a body that is not a JSON object is its own message."""
    try:
        obj = json.loads(text)
    except ValueError:
        return text
    if not isinstance(obj, dict):
        return text
    if isinstance(obj.get("error"), dict):
        return str(obj["error"].get("message", ""))
    return str(obj.get("message") or obj.get("error") or obj.get("detail") or "")


def assert_refused(server, case: FuzzCase) -> None:
    status, text = send(server, case)
    where = f"{case.name}: {case.method} {case.path} {case.body[:300]!r} -> {status} {text[:500]!r}"
    assert 400 <= status < 500, where
    message = error_message(text)
    assert re.search(r"[a-zA-Z]{3}", message) and "Traceback" not in message, where


def send(server, case: FuzzCase) -> tuple[int, str]:
    try:
        return send_case(server.base_url, case, timeout=TIMEOUT)
    except requests.Timeout:
        pytest.fail(f"{case.name}: no answer in {TIMEOUT}s (hang): {case.method} {case.path} {case.body[:300]!r}")


def assert_still_serving(server) -> None:
    assert server.proc.poll() is None, f"server died:\n{server.log()[-3000:]}"
    params = {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True}
    r = requests.post(f"{server.base_url}/generate", json={"input_ids": [5, 6, 7], "sampling_params": params},
                      timeout=TIMEOUT)
    assert r.status_code == 200 and len(r.json()["output_ids"]) == 3, r.text
    server.wait_kv_free()


@pytest.fixture(scope="module")
def server(tiny_model_path, tmp_path_factory):
    from server_utils import start_server

    server = start_server(tiny_model_path, tmp_path_factory.mktemp("fuzz"), ["--max-total-tokens", "4096"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def limits(server, tiny_model_path) -> dict:
    info = requests.get(f"{server.base_url}/get_server_info", timeout=TIMEOUT).json()
    model = requests.get(f"{server.base_url}/get_model_info", timeout=TIMEOUT).json()["served_model_name"]
    vocab_size = json.loads((Path(tiny_model_path) / "config.json").read_text())["vocab_size"]
    return {"context_length": info["internal_states"][0]["context_length"], "vocab_size": vocab_size, "model": model}


@pytest.mark.parametrize("seed", [0, 1])
def test_invalid_batch_is_refused(server, limits, seed):
    cases = invalid_cases(random.Random(seed), **limits)
    assert len(cases) == len(CATEGORIES)
    for case in cases:
        assert_refused(server, case)
    assert_still_serving(server)


def test_random_invalid_cases_are_refused(server, limits):
    rng = random.Random(5)  # its 30 draws cover 20 categories with one 2 MiB body: the module stays ~1 min
    for _ in range(30):
        assert_refused(server, random_invalid_case(rng, **limits))
    assert_still_serving(server)


def test_odd_but_valid_cases_are_served(server, limits):
    for case in odd_but_valid_cases(random.Random(7), model=limits["model"]):
        status, text = send(server, case)
        assert status == 200, (case.name, case.body, text[:500])


def _case(path: str, body) -> FuzzCase:
    return FuzzCase("pinned", "POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})


CHAT_OK = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
# name: (case, regex its error message must match); SGLang 0.5.23 alone gives a 500 (chat bodies
# and response_format that are not objects, list shapes on /generate, ids beyond int64) or a 200
# (n < 1, lax coercion, non-finite or huge logit_bias) for each.
FRONT_HALF_GAPS = {
    "chat_body_is_a_list": (_case(CHAT, [1, 2, 3]), ""),
    "chat_body_is_null": (_case(CHAT, None), ""),
    "chat_response_format_is_a_string": (_case(CHAT, {**CHAT_OK, "response_format": "json_object"}),
                                         "response_format"),
    "chat_response_format_schema_is_a_string": (
        _case(CHAT, {**CHAT_OK, "response_format": {"type": "json_schema", "schema": "abc"}}), "schema"),
    "generate_sampling_params_list_for_one_prompt": (
        _case(GENERATE, {"input_ids": [5, 6, 7], "sampling_params": [{"max_new_tokens": 2}]}), "sampling_params"),
    "generate_sampling_params_shorter_than_batch": (
        _case(GENERATE, {"input_ids": [[5, 6], [7, 8]], "sampling_params": [{"max_new_tokens": 2}]}),
        "sampling_params"),
    "generate_empty_sampling_params_list": (
        _case(GENERATE, {"input_ids": [5, 6], "sampling_params": []}), "sampling_params"),
    "generate_rid_list_for_one_prompt": (
        _case(GENERATE, {"input_ids": [5, 6], "rid": ["a", "b"], "sampling_params": {"max_new_tokens": 2}}),
        "rid"),
    "completions_prompt_id_beyond_int64": (
        _case(COMPLETIONS, {"prompt": [5, 2**63], "max_tokens": 2}), "vocabulary|range|id"),
    "generate_n_zero": (_case(GENERATE, {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2, "n": 0}}),
                        r"\bn\b"),
    "completions_n_negative": (_case(COMPLETIONS, {"prompt": "hi", "max_tokens": 2, "n": -1}), r"\bn\b"),
    "chat_n_zero": (_case(CHAT, {**CHAT_OK, "n": 0}), r"\bn\b"),
    "completions_max_tokens_true": (_case(COMPLETIONS, {"prompt": "hi", "max_tokens": True}), "max_tokens"),
    "chat_logprobs_yes": (_case(CHAT, {**CHAT_OK, "logprobs": "yes"}), "logprobs"),
    "completions_logit_bias_nan_string": (
        _case(COMPLETIONS, {"prompt": "hi", "max_tokens": 2, "logit_bias": {"5": "NaN"}}), "logit_bias"),
    "generate_logit_bias_1e300": (
        _case(GENERATE, {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2, "logit_bias": {"5": 1e300}}}),
        "logit_bias"),
}


@pytest.mark.parametrize("name", list(FRONT_HALF_GAPS))
def test_front_half_gaps_are_refused(server, name):
    case, word = FRONT_HALF_GAPS[name]
    status, text = send(server, case)
    assert 400 <= status < 500, (status, text[:500])
    assert re.search(word, error_message(text), re.IGNORECASE), text[:500]


def test_oversized_body_is_refused_before_it_is_read(server):
    case = FuzzCase("oversized", "POST", GENERATE, b'{"text": "' + b"a" * (33 << 20) + b'"}',
                    {"Content-Type": "application/json"})
    status, text = send(server, case)
    assert status == 413 and "larger than" in error_message(text)


def test_server_still_serves_after_fuzzing(server):
    assert_still_serving(server)


def test_the_request_size_limit_follows_its_flag(tiny_model_path, tmp_path_factory):
    """--faser-max-request-bytes sets the 413 bound (SGLang's own server has none, so a user
    who sends large batches raises it, or turns it off with 0)."""
    from server_utils import start_server

    limit = 1 << 20
    server = start_server(tiny_model_path, tmp_path_factory.mktemp("body_limit"),
                          ["--max-total-tokens", "4096", "--faser-max-request-bytes", str(limit)])
    try:
        def generate(body: bytes):
            return send(server, FuzzCase("body", "POST", GENERATE, body, {"Content-Type": "application/json"}))

        status, text = generate(b'{"text": "' + b"a" * (2 << 20) + b'"}')
        assert status == 413 and f"larger than {limit} bytes" in error_message(text), (status, text[:300])
        # Under the bound the body is read and judged on what it asks (here: a prompt longer
        # than the context), not on its size.
        status, text = generate(b'{"text": "' + b"a b " * (200 << 10) + b'"}')
        assert status == 400 and "larger than" not in error_message(text), (status, text[:300])
        assert_still_serving(server)
    finally:
        server.stop()
