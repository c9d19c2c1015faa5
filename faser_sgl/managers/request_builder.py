"""From SGLang's tokenized request to this scheduler's Request: the checks that answer a 400
with a message (empty or out-of-vocabulary prompts, lengths beyond the context or the pool,
features this server does not serve, bad logprob or grammar arguments) and the stop, sampling,
logprob and grammar state the request carries."""

from __future__ import annotations

import re

from faser_sgl.managers import logit_processor
from faser_sgl.managers.grammar import GrammarBackend, GrammarError
from faser_sgl.managers.logprobs import make_state as make_logprob_state
from faser_sgl.managers.logprobs import start_input as start_input_logprobs
from faser_sgl.managers.request import Request, StopConditions, uses_coupled_sampling


class BadRequest(ValueError):
    """A request the scheduler refuses; the client gets HTTP 400 with this message."""


def unsupported_feature(msg) -> str | None:
    """The name of a feature msg asks for that faser_sgl does not serve, or None."""
    if getattr(msg, "input_embeds", None) is not None:
        return "input_embeds (embedding input)"
    if getattr(msg, "mm_inputs", None) is not None:
        return "multimodal input (images, video, audio)"
    if getattr(msg, "lora_id", None) is not None or getattr(msg, "lora_path", None) is not None:
        return "LoRA adapters (lora_path)"
    if getattr(msg, "session_id", None) is not None or getattr(msg, "session_params", None):
        return "sessions (session_params)"
    if getattr(msg, "return_hidden_states", False):
        return "return_hidden_states"
    return None


def build_request(s, msg) -> Request:
    """A Request for SGLang's TokenizedGenerateReqInput ``msg`` on scheduler ``s`` (its limits,
    vocabulary, EOS ids, options, grammar backend), or BadRequest naming what is wrong."""
    from faser_sgl.executor.sampler import SamplingOptions

    sp = msg.sampling_params
    refused = unsupported_feature(msg)
    if refused:
        raise BadRequest(f"{refused} is not supported by faser_sgl")
    prompt = [int(t) for t in (msg.input_ids or [])]
    if not prompt:
        raise BadRequest("the prompt is empty: send text or at least one input id")
    bad = [t for t in prompt if not 0 <= t < s.vocab_size]
    if bad:
        raise BadRequest(f"input id {bad[0]} is outside the vocabulary [0, {s.vocab_size})")
    if len(prompt) > s.max_req_input_len:
        raise BadRequest(
            f"the prompt has {len(prompt)} tokens; at most {s.max_req_input_len} fit "
            f"(context length {s.context_len}, KV pool {s.pool_size} tokens)"
        )
    room = min(s.context_len, s.pool_size) - len(prompt)
    max_new = sp.max_new_tokens
    if max_new is None:
        max_new = room
    if max_new < 0:
        raise BadRequest(f"max_new_tokens must be at least 0, got {max_new}")
    if max_new > room:
        raise BadRequest(
            f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new}) exceeds the "
            f"{min(s.context_len, s.pool_size)} tokens one request can hold"
        )
    stop_ids: set[int] = set()
    if not sp.ignore_eos:
        stop_ids = set(s.eos_token_ids) | set(sp.stop_token_ids or ())
    stop_strs = tuple(getattr(sp, "stop_strs", None) or ())
    try:
        stop_regexes = tuple(re.compile(r) for r in (getattr(sp, "stop_regex_strs", None) or ()))
    except (re.error, RecursionError) as err:
        raise BadRequest(f"invalid stop_regex: {err}") from None
    stop = StopConditions(
        max_new_tokens=max_new,
        stop_token_ids=frozenset(stop_ids),
        stop_strs=stop_strs,
        stop_str_max_tokens=int(getattr(sp, "stop_str_max_len", 0) or 0),
        min_new_tokens=int(sp.min_new_tokens or 0),
        stop_regexes=stop_regexes,
        stop_regex_max_len=int(getattr(sp, "stop_regex_max_len", 0) or 0),
    )
    sampling = SamplingOptions.from_sglang(sp, s.vocab_size, sorted(stop_ids))
    sampling.coupled = uses_coupled_sampling(s.options.sampling_scheme, sampling)
    custom = getattr(sp, "custom_params", None) or {}
    draft_len = custom.get("num_draft_tokens") if isinstance(custom, dict) else None
    if draft_len is not None and (not isinstance(draft_len, int) or not 0 <= draft_len <= 64):
        raise BadRequest(f"custom_params.num_draft_tokens must be an integer in [0, 64], got {draft_len!r}")
    try:
        logprob_state = make_logprob_state(bool(msg.return_logprob), msg.logprob_start_len,
                                           msg.top_logprobs_num, msg.token_ids_logprob,
                                           len(prompt), s.vocab_size,
                                           prefill_only=stop.max_new_tokens == 0)
    except ValueError as err:
        raise BadRequest(str(err)) from None
    start_input_logprobs(logprob_state, prompt)
    grammar = None
    spec = GrammarBackend.spec_of(sp)
    if spec is not None:
        if s.grammar_backend is None:
            raise BadRequest("constrained decoding needs the tokenizer (the server runs with "
                             "--skip-tokenizer-init)")
        try:
            grammar = s.grammar_backend.new_state(*spec)
        except GrammarError as err:
            raise BadRequest(str(err)) from None
    req = Request(
        rid=msg.rid,
        http_worker_ipc=msg.http_worker_ipc,
        prompt_ids=prompt,
        stop=stop,
        sampling=sampling,
        stream=bool(msg.stream),
        skip_special_tokens=sp.skip_special_tokens,
        spaces_between_special_tokens=sp.spaces_between_special_tokens,
        no_stop_trim=sp.no_stop_trim,
        requested_draft_len=draft_len,
    )
    req.logprobs, req.grammar = logprob_state, grammar
    try:
        req.logit_processor = logit_processor.load(
            getattr(msg, "custom_logit_processor", None),
            bool(getattr(s.server_args, "enable_custom_logit_processor", False)))
    except logit_processor.LogitProcessorError as err:
        raise BadRequest(str(err)) from None
    if req.logit_processor is not None:
        req.logit_params = logit_processor.params_of(req, getattr(sp, "custom_params", None))
    if s.options.record_acceptance and s.speculative and not req.is_health_check:
        req.spec_steps = []
    if logprob_state is not None and logprob_state.wants_input:
        # Input logprobs need the rows from logprob_start_len on computed, not cached.
        req.cacheable_prefix = logprob_state.cacheable_prefix
    return req
