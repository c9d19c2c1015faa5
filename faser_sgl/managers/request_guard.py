"""Checks on generation request bodies before SGLang's front half parses them.

The fuzzer (faser_sgl/bench/fuzz.py) found request shapes that SGLang 0.5.23 answers with a
500 (its validators call .get() on a non-object, index a sampling_params list shorter than the
batch, overflow an int64 array) or silently accepts (n < 1, max_tokens=true, NaN logit_bias).
A client error must be a 4xx with a message, so the RequestGuard middleware refuses those
shapes with a 400 and passes every other request through untouched: what SGLang already
validates well is left to it.  Bodies beyond --faser-max-request-bytes (default MAX_BODY_BYTES)
get a 413 before being buffered.
"""

from __future__ import annotations

import json
import math
import re

GENERATE, COMPLETIONS, CHAT = "/generate", "/v1/completions", "/v1/chat/completions"
GUARDED_PATHS = (GENERATE, COMPLETIONS, CHAT)
# Far above any prompt a context window holds (a 128k-token prompt is ~1 MiB as JSON ids).
MAX_BODY_BYTES = 32 << 20
INT64_LIMIT = 2**63
# OpenAI integer and boolean fields, which pydantic's lax mode would otherwise coerce.
OPENAI_INT_FIELDS = ("max_tokens", "max_completion_tokens", "n", "top_logprobs", "seed", "top_k",
                     "min_tokens")
OPENAI_BOOL_FIELDS = ("stream", "echo")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_n(n, where: str) -> str | None:
    if n is not None and (not _is_int(n) or n < 1):
        return f"{where}n must be an integer >= 1, got {n!r}"
    return None


def _check_logit_bias(bias, where: str) -> str | None:
    if bias is None:
        return None
    if not isinstance(bias, dict):
        return f"{where}logit_bias must be an object mapping token ids to numbers"
    for token, value in bias.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) \
                or not math.isfinite(value) or not -100 <= value <= 100:
            return f"{where}logit_bias values must be numbers in [-100, 100], got {value!r} for {token!r}"
    return None


def _check_token_ids(ids) -> str | None:
    """Every int in a (nested) prompt of token ids fits an int64 and is not negative."""
    stack = [ids]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif _is_int(item) and not 0 <= item < INT64_LIMIT:
            return f"token id {item} is out of range"
    return None


def _check_stop_regex(value, where: str) -> str | None:
    """SGLang's front half answers a stop_regex that does not compile with a 500."""
    patterns = [value] if isinstance(value, str) else value
    if patterns is None:
        return None
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        return f"{where}stop_regex must be a string or a list of strings"
    for pattern in patterns:
        try:
            re.compile(pattern)
        except (re.error, RecursionError) as err:
            return f"{where}invalid stop_regex {pattern!r}: {err}"
    return None


def _check_sampling_params(params, where: str) -> str | None:
    if params is None:
        return None
    if not isinstance(params, dict):
        return f"{where}sampling_params must be an object"
    return (_check_n(params.get("n"), where) or _check_logit_bias(params.get("logit_bias"), where)
            or _check_stop_regex(params.get("stop_regex"), where))


def check_generate(body: dict) -> str | None:
    text, ids = body.get("text"), body.get("input_ids")
    batched = isinstance(text, list) or (isinstance(ids, list) and any(isinstance(x, list) for x in ids))
    size = len(text if isinstance(text, list) else ids) if batched else 1
    error = _check_token_ids(ids) if ids is not None else None
    if error:
        return error
    params, rid = body.get("sampling_params"), body.get("rid")
    if isinstance(params, list):
        if not batched:
            return "sampling_params must be an object for a single prompt (a list only for a batch)"
        if len(params) != size:
            return f"sampling_params has {len(params)} entries for a batch of {size} prompts"
        for i, p in enumerate(params):
            error = _check_sampling_params(p, f"sampling_params[{i}]: ")
            if error:
                return error
    else:
        error = _check_sampling_params(params, "")
        if error:
            return error
    if isinstance(rid, list) and (not batched or len(rid) != size):
        return "rid must be a string for a single prompt, or a list with one rid per prompt"
    if rid is not None and not isinstance(rid, (str, list)):
        return "rid must be a string (or a list of strings for a batch)"
    return None


def _check_response_format(rf) -> str | None:
    if rf is None:
        return None
    if not isinstance(rf, dict):
        return "response_format must be an object such as {\"type\": \"json_object\"}"
    for key in ("json_schema", "schema"):
        if key in rf and rf[key] is not None and not isinstance(rf[key], dict):
            return f"response_format.{key} must be an object"
    schema = rf.get("schema") or (rf.get("json_schema") or {}).get("schema")
    if schema is not None and not isinstance(schema, dict):
        return "response_format.json_schema.schema must be an object"
    properties = (schema or {}).get("properties")
    if properties is not None and (not isinstance(properties, dict)
                                   or not all(isinstance(v, dict) for v in properties.values())):
        return "a JSON schema's properties must be an object of schema objects"
    return None


def check_openai(path: str, body: dict) -> str | None:
    for name in OPENAI_INT_FIELDS:
        value = body.get(name)
        if value is not None and not _is_int(value):
            return f"{name} must be an integer, got {value!r}"
    bool_fields = OPENAI_BOOL_FIELDS + (("logprobs",) if path == CHAT else ())
    for name in bool_fields:
        value = body.get(name)
        if value is not None and not isinstance(value, bool):
            return f"{name} must be true or false, got {value!r}"
    if path == COMPLETIONS:
        value = body.get("logprobs")
        if value is not None and not _is_int(value):
            return f"logprobs must be an integer (top logprobs per token), got {value!r}"
        error = _check_token_ids(body.get("prompt")) if isinstance(body.get("prompt"), list) else None
        if error:
            return error
    return (_check_n(body.get("n"), "") or _check_logit_bias(body.get("logit_bias"), "")
            or _check_response_format(body.get("response_format"))
            or _check_stop_regex(body.get("stop_regex"), ""))


def _texts(path: str, body: dict) -> list[str]:
    """The prompt texts of a request (each becomes at least one token per max_token_chars)."""
    if path == GENERATE:
        text = body.get("text")
    elif path == COMPLETIONS:
        text = body.get("prompt")
    else:
        messages = body.get("messages")
        parts = []
        for m in messages if isinstance(messages, list) else ():
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts += [p.get("text") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        return ["".join(parts)]
    if isinstance(text, str):
        return [text]
    return [t for t in text if isinstance(t, str)] if isinstance(text, list) else []


def check_body(path: str, raw: bytes, max_prompt_chars: int | None = None) -> str | None:
    """The reason to refuse this body with a 400, or None to let SGLang handle it (including
    bodies that are not JSON at all, which SGLang refuses well itself).  max_prompt_chars: a
    prompt text longer than this cannot fit the context whatever its tokens (see
    prompt_char_limit); it is refused before the tokenizer spends seconds on it."""
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(body, dict):
        return "the request body must be a JSON object"
    error = check_generate(body) if path == GENERATE else check_openai(path, body)
    if error is None and max_prompt_chars is not None:
        longest = max((len(t) for t in _texts(path, body)), default=0)
        if longest > max_prompt_chars:
            return (f"the prompt has {longest} characters, more than the model's context can hold "
                    f"(at most {max_prompt_chars} for this tokenizer and context length)")
    return error


def prompt_char_limit(tokenizer, context_len: int) -> int | None:
    """context_len x the longest token's string: no text longer than this tokenizes into
    context_len tokens (a decoded character is at least one character of its token's string,
    byte-level or sentencepiece), so such a prompt is refused without tokenizing it."""
    try:
        longest = max(len(t) for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
                      if isinstance(t, str))
    except Exception:  # an unusual tokenizer: no bound, SGLang still refuses after tokenizing
        return None
    return context_len * max(longest, 1)


async def _answer(send, status: int, message: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "BadRequestError", "code": status},
                       "message": message, "code": status}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """ASGI middleware: buffer a guarded POST's body, refuse it (400/413) or replay it to the
    app; later receive() calls go to the client's stream, so disconnects are still seen."""

    def __init__(self, app, max_body_bytes: int | None = MAX_BODY_BYTES, manager=None):
        self.app = app
        self.max_body_bytes = max_body_bytes  # None: no limit (--faser-max-request-bytes 0)
        self.manager = manager  # () -> the TokenizerManager, for the prompt length bound
        self._char_limit: int | None = None
        self._char_limit_known = False

    def _max_prompt_chars(self) -> int | None:
        if not self._char_limit_known:
            manager = self.manager() if self.manager is not None else None
            if manager is None or getattr(manager, "tokenizer", None) is None:
                return None
            self._char_limit = prompt_char_limit(manager.tokenizer, manager.context_len)
            self._char_limit_known = True
        return self._char_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in GUARDED_PATHS:
            await self.app(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its request
            chunk = message.get("body", b"")
            size += len(chunk)
            if self.max_body_bytes is not None and size > self.max_body_bytes:
                await _answer(send, 413, f"request body larger than {self.max_body_bytes} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        error = check_body(scope["path"], raw, self._max_prompt_chars())
        if error is not None:
            await _answer(send, 400, error)
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
