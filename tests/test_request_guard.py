"""RequestGuard's body checks on their own: the shapes it refuses, and valid requests of every
kind it must let through untouched (a false refusal would break real clients)."""

from __future__ import annotations

import json

import pytest

from faser_sgl.managers.request_guard import CHAT, COMPLETIONS, GENERATE, check_body

MSG = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}

VALID = [
    (GENERATE, {"text": "hi", "sampling_params": {"max_new_tokens": 2, "n": 2, "logit_bias": {"5": -100}}}),
    (GENERATE, {"input_ids": [1, 2, 3], "rid": "abc"}),
    (GENERATE, {"text": ["a", "b"], "sampling_params": [{"max_new_tokens": 1}, {"max_new_tokens": 2}],
                "rid": ["x", "y"]}),
    (GENERATE, {"input_ids": [[1, 2], [3]], "sampling_params": {"temperature": 0}}),
    (GENERATE, {"text": "hi", "sampling_params": None, "stream": True}),
    (COMPLETIONS, {"model": "m", "prompt": [1, 2, 3], "max_tokens": 4, "logprobs": 2, "echo": True}),
    (COMPLETIONS, {"model": "m", "prompt": [[1, 2], [3]], "n": 2, "logit_bias": {"7": 2.5}, "seed": 3}),
    (CHAT, {"model": "m", "messages": MSG, "logprobs": True, "top_logprobs": 2, "stream": False}),
    (CHAT, {"model": "m", "messages": MSG, "response_format": {"type": "json_object"}}),
    (CHAT, {"model": "m", "messages": MSG,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}}),
    (CHAT, {"model": "m", "messages": MSG, "max_completion_tokens": 8, "response_format": None}),
    (GENERATE, b"not json at all"),  # left to SGLang, which refuses it itself
]

REFUSED = [
    (CHAT, [1, 2], "object"),
    (CHAT, {"messages": MSG, "response_format": "json_object"}, "response_format"),
    (CHAT, {"messages": MSG, "response_format": {"type": "json_schema", "schema": {"properties": {"strict": 5}}}},
     "properties"),
    (GENERATE, {"input_ids": [1], "sampling_params": [{}]}, "single prompt"),
    (GENERATE, {"text": ["a", "b", "c"], "sampling_params": [{}, {}]}, "batch of 3"),
    (GENERATE, {"text": "a", "rid": ["r1"]}, "rid"),
    (GENERATE, {"input_ids": [1, -4]}, "out of range"),
    (GENERATE, {"text": "a", "sampling_params": {"n": 0}}, "n must"),
    (GENERATE, {"text": "a", "sampling_params": {"logit_bias": {"3": 1e300}}}, "logit_bias"),
    (COMPLETIONS, {"prompt": [5, 2**63]}, "out of range"),
    (COMPLETIONS, {"prompt": "a", "max_tokens": True}, "max_tokens"),
    (COMPLETIONS, {"prompt": "a", "logit_bias": {"5": "NaN"}}, "logit_bias"),
    (COMPLETIONS, {"prompt": "a", "logprobs": True}, "logprobs"),
    (CHAT, {"messages": MSG, "logprobs": "yes"}, "logprobs"),
    (CHAT, {"messages": MSG, "n": -1}, "n must"),
]


@pytest.mark.parametrize("path,body", VALID)
def test_valid_requests_pass(path, body):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    assert check_body(path, raw) is None


@pytest.mark.parametrize("path,body,word", REFUSED)
def test_refused_shapes_name_the_problem(path, body, word):
    message = check_body(path, json.dumps(body).encode())
    assert message is not None and word in message


def test_prompt_longer_than_any_tokenization_of_the_context_is_refused(tiny_model_path):
    from transformers import AutoTokenizer

    from faser_sgl.managers.request_guard import prompt_char_limit

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    limit = prompt_char_limit(tokenizer, 16)
    longest = max(len(t) for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
    assert limit == 16 * longest
    # The bound is sound: the text of the 16 longest-stringed tokens is within it.
    ok = json.dumps({"text": "a" * limit}).encode()
    assert check_body(GENERATE, ok, limit) is None
    for path, body in [(GENERATE, {"text": "a" * (limit + 1)}),
                       (COMPLETIONS, {"prompt": ["x", "b" * (limit + 1)]}),
                       (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "c" * (limit + 1)}]}]})]:
        assert "characters" in check_body(path, json.dumps(body).encode(), limit)
