"""Seeded generator of invalid / hostile HTTP requests for soak runs and tests.

Every case from ``invalid_cases`` / ``random_invalid_case`` is one the server should refuse with
a 4xx and a readable message: never a 5xx, a hang or a crash. All values come from the caller's
``random.Random``, so a failing batch replays from its seed.

Unusual but *valid* input (odd unicode in an otherwise fine prompt) is not an error: it lives in
``odd_but_valid_cases``, which the server should answer with 200. A lone surrogate escape
(``"\\ud800"``) is not valid input: SGLang's JSON parser refuses it with a 400, so it only appears
in the invalid cases. Streaming requests are not generated: an error found after a stream has
started can only be reported inside a 200 stream, so "a 4xx" is not the right expectation there.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Callable

import requests

GENERATE = "/generate"
COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
ROUTES = (GENERATE, COMPLETIONS, CHAT)
JSON_HEADERS = {"Content-Type": "application/json"}

# Python's json writes NaN / Infinity / -Infinity literals (non-standard JSON some parsers take);
# the strings are what a lax parser may turn into the same floats.
NON_FINITE = [float("nan"), float("inf"), float("-inf"), "NaN", "nan", "Infinity", "-Infinity", "inf"]
# Odd but legal code points: NUL, RTL override / mark, zero-width joiner, BOM, a non-BMP emoji.
ODD_UNICODE = ["\x00", "\u202e", "\u200f", "\u200d", "\ufeff", "\U0001f600"]
LONE_SURROGATES = ["\ud800", "\udfff", "\udbff"]


@dataclass
class FuzzCase:
    name: str  # short stable category name, e.g. "malformed_json", "non_finite_temperature"
    method: str  # "POST" / "GET"
    path: str  # "/generate", "/v1/chat/completions", "/v1/completions"
    body: bytes  # raw body: encoded JSON or deliberately broken bytes
    headers: dict[str, str] = field(default_factory=lambda: dict(JSON_HEADERS))


@dataclass
class _Limits:
    context_length: int
    vocab_size: int
    model: str


def _encode(obj) -> bytes:
    # allow_nan keeps NaN / Infinity literals: exactly the non-standard JSON worth sending.
    return json.dumps(obj, allow_nan=True).encode()


def _post(name: str, path: str, obj) -> FuzzCase:
    return FuzzCase(name, "POST", path, _encode(obj))


def _ids(rng: random.Random, lim: _Limits, n: int) -> list[int]:
    return [rng.randrange(3, lim.vocab_size) for _ in range(n)]  # 0-2 are the special tokens


def _valid_body(rng: random.Random, path: str, lim: _Limits, max_tokens: int = 4) -> dict:
    """A small request the server would serve on ``path``: the base each field fuzz mutates."""
    if path == GENERATE:
        return {"input_ids": _ids(rng, lim, rng.randint(1, 8)), "sampling_params": {"max_new_tokens": max_tokens}}
    if path == COMPLETIONS:
        return {"model": lim.model, "prompt": "Hello world", "max_tokens": max_tokens}
    return {"model": lim.model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "Hello world"}]}


def _with_param(rng: random.Random, path: str, lim: _Limits, key: str, value) -> dict:
    """A valid body with one sampling parameter set to ``value``, where that route reads it."""
    body = _valid_body(rng, path, lim)
    if path == GENERATE:
        body["sampling_params"][key] = value
    else:
        body["max_tokens" if key == "max_new_tokens" else key] = value
    return body


def _with_prompt_ids(rng: random.Random, path: str, lim: _Limits, ids: list[int]) -> dict:
    body = _valid_body(rng, path, lim)
    body["input_ids" if path == GENERATE else "prompt"] = ids
    return body


def _with_text(rng: random.Random, path: str, lim: _Limits, text: str) -> dict:
    body = _valid_body(rng, path, lim)
    if path == GENERATE:
        return {"text": text, "sampling_params": body["sampling_params"]}
    if path == COMPLETIONS:
        return {**body, "prompt": text}
    return {**body, "messages": [{"role": "user", "content": text}]}


# --- broken bodies and transport -------------------------------------------------------------

def _malformed_json(rng, lim):
    path = rng.choice(ROUTES)
    good = _encode(_valid_body(rng, path, lim))
    body = rng.choice([
        good[:rng.randrange(1, len(good) - 1)],  # truncated
        good + rng.choice([b"}", b"]]", b" x", b",{}"]),  # trailing garbage
        good.replace(b'"', b"'"),  # single quotes
        good[:-2] + b'"',  # unclosed string
    ])
    return FuzzCase("malformed_json", "POST", path, body)


def _not_utf8(rng, lim):
    path = rng.choice(ROUTES)
    good = _encode(_valid_body(rng, path, lim))
    junk = rng.choice([b"\xff\xfe", b"\x80", b"\xc0\x80", b"\xfe\xff\xff"])  # never valid UTF-8
    cut = good.index(b'"') + 1  # inside the first key
    return FuzzCase("not_utf8", "POST", path, good[:cut] + junk + good[cut:])


def _empty_body(rng, lim):
    return FuzzCase("empty_body", "POST", rng.choice(ROUTES), rng.choice([b"", b" ", b"\n"]))


def _wrong_content_type(rng, lim):
    path = rng.choice(ROUTES)
    kind = rng.choice(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
    return FuzzCase("wrong_content_type", "POST", path, _encode(_valid_body(rng, path, lim)), {"Content-Type": kind})


def _wrong_method(rng, lim):
    path = rng.choice(ROUTES)
    return FuzzCase("wrong_method", "GET", path, _encode(_valid_body(rng, path, lim)))


def _wrong_top_level_type(rng, lim):
    top = rng.choice([[1, 2, 3], [{"text": "hi"}], "hello", 42, 3.5, None, True])
    return _post("wrong_top_level_type", rng.choice(ROUTES), top)


# --- wrong field types ----------------------------------------------------------------------

def _prompt_wrong_type(rng, lim):
    path = rng.choice(ROUTES)
    body = _valid_body(rng, path, lim)
    if path == GENERATE:
        del body["input_ids"]
        body["text"] = rng.choice([rng.randint(-10**6, 10**6), {"a": 1}, True, ["a", 5]])
    elif path == COMPLETIONS:
        body["prompt"] = rng.choice([{"text": "hi"}, {"a": [1, 2]}, True])
    else:
        body["messages"] = rng.choice(["hello", {"role": "user", "content": "hi"}, 7])
    return _post("prompt_wrong_type", path, body)


def _sampling_params_wrong_type(rng, lim):
    body = _valid_body(rng, GENERATE, lim)
    body["sampling_params"] = rng.choice(["greedy", 5, True])
    return _post("sampling_params_wrong_type", GENERATE, body)


def _batch_shape_mismatch(rng, lim):
    """/generate's list-valued fields whose shape does not match the prompt(s)."""
    k = rng.randint(2, 4)
    batch = {"input_ids": [_ids(rng, lim, 3) for _ in range(k)], "sampling_params": {"max_new_tokens": 4}}
    single = _valid_body(rng, GENERATE, lim)
    body = rng.choice([
        {**single, "sampling_params": [{"max_new_tokens": 4}]},  # a list for one prompt
        {**rng.choice([single, batch]), "sampling_params": []},
        {**batch, "sampling_params": [{"max_new_tokens": 4}] * (k - 1)},  # too few for the batch
        {**single, "rid": ["a", "b"]},  # several ids for one prompt
        {**batch, "rid": [f"r{i}" for i in range(k + 1)]},
    ])
    return _post("batch_shape_mismatch", GENERATE, body)


def _max_tokens_wrong_type(rng, lim):
    path = rng.choice(ROUTES)
    value = rng.choice(["many", "ten", rng.uniform(1.1, 9.9), True, [4], {"n": 4}])
    return _post("max_tokens_wrong_type", path, _with_param(rng, path, lim, "max_new_tokens", value))


def _stop_wrong_type(rng, lim):
    path = rng.choice(ROUTES)
    value = rng.choice([rng.randint(1, 1000), 3.5, {"s": "x"}, [1, 2], ["a", 5]])
    return _post("stop_wrong_type", path, _with_param(rng, path, lim, "stop", value))


def _response_format_wrong_type(rng, lim):
    path = rng.choice([COMPLETIONS, CHAT])
    body = _valid_body(rng, path, lim)
    body["response_format"] = rng.choice([
        "json_object", ["x"], 5, {"type": "json_schema", "schema": "abc"},
        {"type": "json_schema", "schema": {"properties": {"strict": 5}}}, {"type": "yaml"}])
    return _post("response_format_wrong_type", path, body)


# --- non-finite and out-of-range numbers ----------------------------------------------------

def _non_finite_sampling_param(rng, lim):
    path = rng.choice(ROUTES)
    key = rng.choice(["temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty"])
    return _post(f"non_finite_{key}", path, _with_param(rng, path, lim, key, rng.choice(NON_FINITE)))


def _out_of_range_sampling_param(rng, lim):
    path = rng.choice(ROUTES)
    key, value = rng.choice([
        ("max_new_tokens", rng.choice([-5, -1, 10**30])),
        ("top_k", rng.choice([10**30, -2, -(10**30)])),
        ("temperature", rng.choice([-1.0, -0.01, -(10**30)])),
        ("top_p", rng.choice([2.0, 1.0001, -0.5, 0.0])),
        ("frequency_penalty", rng.choice([-2.5, 2.5, 10**30])),
        ("presence_penalty", rng.choice([-2.5, 2.5, -(10**30)])),
    ])
    return _post(f"out_of_range_{key}", path, _with_param(rng, path, lim, key, value))


def _bad_n(rng, lim):
    path = rng.choice(ROUTES)  # /generate reads n from sampling_params
    return _post("bad_n", path, _with_param(rng, path, lim, "n", rng.choice([0, -1, -(10**9)])))


def _bogus_logprobs(rng, lim):
    path = rng.choice(ROUTES)
    body = _valid_body(rng, path, lim)
    if path == GENERATE:
        body.update(rng.choice([{"return_logprob": True, "top_logprobs_num": rng.choice([-3, 10**6])},
                                {"return_logprob": "yes"}]))
    elif path == COMPLETIONS:
        body["logprobs"] = rng.choice([-1, -(10**9), 10**6, "many"])
    else:
        body.update(rng.choice([{"logprobs": True, "top_logprobs": rng.choice([-1, 10**6])}, {"logprobs": "yes"}]))
    return _post("bogus_logprobs", path, body)


def _bad_logit_bias(rng, lim):
    path = rng.choice(ROUTES)
    token = str(rng.randrange(3, lim.vocab_size))
    value = rng.choice([
        {"abc": 1.0}, {str(lim.vocab_size): 1.0}, {"-1": 1.0}, {token: "x"},
        {token: rng.choice(NON_FINITE)}, {token: 1e300}])  # 1e300 is +inf in float32 logits
    return _post("bad_logit_bias", path, _with_param(rng, path, lim, "logit_bias", value))


# --- token ids and lengths ------------------------------------------------------------------

def _out_of_vocab_ids(rng, lim):
    bad = rng.choice([lim.vocab_size, lim.vocab_size + rng.randint(1, 1000), -1, 2**40, 2**63])
    ids = _ids(rng, lim, rng.randint(0, 6))
    ids.insert(rng.randint(0, len(ids)), bad)
    path = rng.choice([GENERATE, COMPLETIONS])
    return _post("out_of_vocab_ids", path, _with_prompt_ids(rng, path, lim, ids))


def _prompt_longer_than_context(rng, lim):
    ids = _ids(rng, lim, lim.context_length + rng.randint(1, lim.context_length))
    path = rng.choice([GENERATE, COMPLETIONS])
    return _post("prompt_longer_than_context", path, _with_prompt_ids(rng, path, lim, ids))


def _max_tokens_past_context(rng, lim):
    path = rng.choice(ROUTES)
    ask = lim.context_length + rng.randint(0, 4 * lim.context_length)  # no room even with a 1-token prompt
    return _post("max_tokens_past_context", path, _valid_body(rng, path, lim, max_tokens=ask))


def _oversized_text(rng, lim):
    # 2-4 MiB of text: far beyond any context, well under the 8 MiB a soak run may send.
    size = rng.randint(2, 4) * 1024 * 1024
    words = ["hello", "world", "the", "quick", "fox", "42", "data"]
    text = " ".join(rng.choice(words) for _ in range(size // 4))[:size]  # words average < 4 chars + space
    path = rng.choice(ROUTES)
    return _post("oversized_text", path, _with_text(rng, path, lim, text))


def _odd_unicode_with_bad_input(rng, lim):
    """Odd unicode is only invalid next to something invalid, or as a lone surrogate."""
    path = rng.choice(ROUTES)
    odd = "".join(rng.choice(ODD_UNICODE) for _ in range(rng.randint(0, 4)))
    if rng.random() < 0.5:
        body = _with_text(rng, path, lim, "hi " + odd + rng.choice(LONE_SURROGATES + ODD_UNICODE))
        bad = rng.choice([-7, "x"])
        if path == GENERATE:
            body["sampling_params"]["max_new_tokens"] = bad
        else:
            body["max_tokens"] = bad
    else:  # a lone surrogate between plain characters (next to another surrogate it may pair up)
        body = _with_text(rng, path, lim, "hi " + odd + rng.choice(LONE_SURROGATES) + " x")
    return _post("odd_unicode_with_bad_input", path, body)


# --- OpenAI-route specifics -----------------------------------------------------------------

def _bad_chat_messages(rng, lim):
    body = _valid_body(rng, CHAT, lim)
    kind = rng.choice(["missing", "empty", "unknown_role", "no_role", "content_int"])
    if kind == "missing":
        del body["messages"]
    else:
        body["messages"] = {
            "empty": [], "no_role": [{"content": "hi"}],
            "unknown_role": [{"role": rng.choice(["wizard", "", "USER!", "bot"]), "content": "hi"}],
            "content_int": [{"role": "user", "content": rng.randint(0, 99)}],
        }[kind]
    return _post("bad_chat_messages", CHAT, body)


def _grammar_does_not_compile(rng, lim):
    path = rng.choice(ROUTES)
    if path == CHAT and rng.random() < 0.5:  # chat takes a schema only through response_format
        body = _valid_body(rng, path, lim)
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}
        return _post("grammar_does_not_compile", path, body)
    key, value = rng.choice([
        ("regex", rng.choice(["([a-z", "a{2,1}", "(?P<x>a)(?P<x>b)", "[z-a]", "*abc"])),
        ("json_schema", rng.choice(['{"type": "strin"}', "{not json", '{"type": 5}'])),
    ][:1 if path == CHAT else 2])
    return _post("grammar_does_not_compile", path, _with_param(rng, path, lim, key, value))


CATEGORIES: list[Callable[[random.Random, _Limits], FuzzCase]] = [
    _malformed_json, _not_utf8, _empty_body, _wrong_content_type, _wrong_method, _wrong_top_level_type,
    _prompt_wrong_type, _sampling_params_wrong_type, _batch_shape_mismatch, _max_tokens_wrong_type,
    _stop_wrong_type, _response_format_wrong_type, _non_finite_sampling_param, _out_of_range_sampling_param,
    _bad_n, _bogus_logprobs, _bad_logit_bias, _out_of_vocab_ids, _prompt_longer_than_context,
    _max_tokens_past_context, _oversized_text, _odd_unicode_with_bad_input, _bad_chat_messages,
    _grammar_does_not_compile,
]


def invalid_cases(rng: random.Random, *, context_length: int, vocab_size: int, model: str) -> list[FuzzCase]:
    """A seeded batch of invalid requests (one of each category, with randomized values)."""
    lim = _Limits(context_length, vocab_size, model)
    return [make(rng, lim) for make in CATEGORIES]


def random_invalid_case(rng: random.Random, *, context_length: int, vocab_size: int, model: str) -> FuzzCase:
    """One invalid request drawn from all categories."""
    return rng.choice(CATEGORIES)(rng, _Limits(context_length, vocab_size, model))


def odd_but_valid_cases(rng: random.Random, *, model: str) -> list[FuzzCase]:
    """Odd unicode in otherwise valid requests: the server should answer each with 200."""
    def odd_text() -> str:
        return "hi " + "".join(rng.choice(ODD_UNICODE) for _ in range(rng.randint(1, 6))) + " there"

    return [
        _post("odd_unicode_generate", GENERATE, {"text": odd_text(), "sampling_params": {"max_new_tokens": 2}}),
        _post("odd_unicode_completions", COMPLETIONS, {"model": model, "prompt": odd_text(), "max_tokens": 2}),
        _post("odd_unicode_chat", CHAT, {"model": model, "max_tokens": 2,
                                         "messages": [{"role": "user", "content": odd_text()}]}),
    ]


def send_case(base_url: str, case: FuzzCase, timeout: float = 60.0, headers: dict | None = None) -> tuple[int, str]:
    """Send it with `requests`; return (status_code, response text)."""
    response = requests.request(case.method, base_url.rstrip("/") + case.path, data=case.body,
                                headers={**case.headers, **(headers or {})}, timeout=timeout)
    return response.status_code, response.text
