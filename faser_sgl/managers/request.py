"""One generation request as the scheduler tracks it, and its finish conditions."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Optional

# How many prompt tokens the first output message carries so that the detokenizer can decode
# the first output tokens in context (a token's text can depend on the one before it).
PROMPT_TAIL_FOR_DETOKENIZER = 5


def finish_length(length: int) -> dict:
    return {"type": "length", "length": length}


def finish_stop(matched: int | str) -> dict:
    return {"type": "stop", "matched": matched}


def finish_abort(message: str, status_code: Optional[int] = None) -> dict:
    reason: dict[str, Any] = {"type": "abort", "message": message}
    if status_code is not None:
        # The TokenizerManager turns an abort with a 4xx/5xx status into an HTTP error.
        reason["status_code"] = int(status_code)
        reason["err_type"] = "BadRequestError" if status_code == HTTPStatus.BAD_REQUEST else "Error"
    return reason


SAMPLING_SCHEMES = ("rejection", "coupled", "seeded-coupled")


def uses_coupled_sampling(scheme: str, sampling) -> bool:
    """Whether a request samples by coupled Gumbel-max (faser_sgl/kernels/coupled.py) rather than
    from its own random stream with rejection sampling of drafts.  "rejection": never;
    "coupled": every sampled request; "seeded-coupled": requests that carry a sampling_seed, so
    their text does not depend on draft lengths, batch or policy."""
    if scheme not in SAMPLING_SCHEMES:
        raise ValueError(f"unknown sampling scheme {scheme!r}; choose one of {', '.join(SAMPLING_SCHEMES)}")
    if sampling is None or sampling.is_greedy:
        return False
    return scheme == "coupled" or (scheme == "seeded-coupled" and sampling.seed is not None)


@dataclass
class StopConditions:
    max_new_tokens: int
    stop_token_ids: frozenset[int]  # eos ids + the request's stop_token_ids; empty if ignore_eos
    stop_strs: tuple[str, ...] = ()
    stop_str_max_tokens: int = 0  # longest stop string in tokens, bounds the text to re-decode
    min_new_tokens: int = 0  # stop tokens do not end the output before this many tokens
    # SGLang's stop_regex: compiled patterns, searched in the output's tail text; the tail is
    # the last stop_regex_max_len + 1 tokens (the longest match in characters, SGLang's bound).
    stop_regexes: tuple = ()
    stop_regex_max_len: int = 0


@dataclass(eq=False)
class Request:
    rid: str
    http_worker_ipc: Optional[str]
    prompt_ids: list[int]
    stop: StopConditions
    sampling: Any  # faser_sgl.executor.sampler.SamplingOptions
    stream: bool
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    arrival_time: float = field(default_factory=time.monotonic)

    output_ids: list[int] = field(default_factory=list)
    # KV slots of the tokens already in the cache, in order.  They cover the first
    # len(kv_slots) tokens of prompt_ids + output_ids.
    kv_slots: list[int] = field(default_factory=list)
    finished_reason: Optional[dict] = None
    num_sent: int = 0  # output ids already sent to the detokenizer
    started_output: bool = False  # the first message (with the prompt tail) went out
    finish_sent: bool = False
    retraction_count: int = 0
    # Tokens whose KV the draft model holds (same slots as the target's; it lags, fed lazily).
    draft_cached: int = 0
    # Per-request draft length asked for in sampling_params.custom_params (fixed policy).
    requested_draft_len: Optional[int] = None
    # SGLang's custom logit processor and the params dict it gets at every call (with
    # "__req__"); such a request drafts nothing (managers/logit_processor.py says why).
    logit_processor: Any = None
    logit_params: Optional[dict] = None
    # Speculative decoding counters, per request (SGLang's names where they exist).
    spec_verify_ct: int = 0
    spec_accepted_drafts: int = 0
    spec_drafted_tokens: int = 0
    # [(drafts verified, accepted), ...] per verification, when --faser-record-acceptance is on.
    spec_steps: Optional[list] = None
    # The adaptive policy's decayed (successes, trials) of draft-token acceptance, its prior's
    # pseudo-counts included; None until first observed (adaptive.AdaptiveLength._counts).
    spec_accept_stats: Optional[tuple[float, float]] = None
    # Its summed deviation from the population's rate and its trials, undecayed
    # (prior_strength.PriorStrength pairs them with later verifications).
    spec_accept_deviation: Optional[tuple[float, float]] = None
    # The prior inside spec_accept_stats: (its rate, its remaining pseudo-trials).
    spec_accept_prior: Optional[tuple[float, float]] = None
    # Logprobs asked for (managers/logprobs.LogprobState) and the grammar constraining the
    # output (managers/grammar.GrammarState), or None.
    logprobs: Any = None
    grammar: Any = None
    # Prefix cache: prompt tokens whose KV came from the cache at first admission (meta_info's
    # cached_tokens), and the cache's handle on the prefix this request holds (locked).
    cached_tokens: int = 0
    prefix_handle: Any = None
    prefix_len: int = 0  # leading kv_slots shared with the cache (never freed by the request)
    # How many leading prompt tokens may come from the cache (input logprobs need the rest
    # computed; one token is always fed, its row samples the first output token).
    cacheable_prefix: Optional[int] = None
    # In a batch whose forward pass failed: it is recomputed, never beside another suspect,
    # and fails for good if a pass holding it fails again (Scheduler._recover_from_failed_step).
    suspect: bool = False

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_cached(self) -> int:
        return len(self.kv_slots)

    @property
    def finished(self) -> bool:
        return self.finished_reason is not None

    @property
    def is_health_check(self) -> bool:
        return self.rid.startswith("HEALTH_CHECK")

    @property
    def num_uncached(self) -> int:
        return self.num_tokens - len(self.kv_slots)

    def uncached_ids(self) -> list[int]:
        """Tokens whose KV is not in the cache yet: what the next forward must feed."""
        return self.all_ids[self.num_cached:]
