"""``batch-ema``: one draft length for the whole batch, moved by a smoothed acceptance length kept
per batch-size bucket.  A baseline: SGLang 0.5.23's ``--speculative-adaptive``, restated here so
that FASER is compared with it on our executor, in the same run.

Where the rules come from: the installed SGLang package's
sglang/srt/speculative/adaptive_spec_params.py (its docstrings, rules and defaults), written
anew here in our terms.  SGLang's "steps" of EAGLE with topk 1 are draft tokens per request in
a chain, i.e. our k.

The rules, as we read them:
- Buckets.  The configuration maps batch sizes to buckets (keys "1", "8", "32", "64" by
  default); a batch goes to the bucket with the largest key <= its size, or to the smallest
  bucket when it is smaller than every key.  Each bucket learns on its own: its candidate
  lengths, its current length, a moving average of the accepted drafts per request, a count of
  the batches it has seen.  (SGLang first pads the batch size up to a CUDA-graph size; our
  executor has no such sizes, so the number of decoding requests in the step routes directly.)
- Start.  A bucket starts at the server's length if that is one of its candidates, else at its
  middle candidate (index len // 2); its average starts at that length - 1, a neutral guess.
- Each verified batch: if the bucket's length is above 0, the average moves a fraction alpha
  (default 0.2) of the way to the batch's mean accepted drafts per request.  A batch at length 0
  (nothing drafted) leaves the average alone but is still counted.
- Warm-up and interval.  For the first ``warmup_batches`` batches (default 10) the length does
  not change; after them it is reconsidered every ``update_interval`` batches (default 5).
- Reconsidering, at length 0: probe the next candidate up, whatever the average (a bucket that
  started at 0 has no average yet and takes the probe's length - 1 as its own).
- Reconsidering, above 0: first step down one candidate at a time while the average is at or
  below that lower candidate - 0.5 (or 0.5 when the lower candidate is 0: no accepted drafts at
  all reaches it) plus ``down_hysteresis`` (default -0.25 for bucket 1, 0 for the others: a
  negative value makes dropping harder).  Only if it did not step down, step up one candidate
  at a time while the average exceeds the current candidate - 0.5 plus ``up_hysteresis``
  (default 0).  So the length tracks about one more than the average accepted.
- Ceiling (``ceiling_coeff`` > 0; off by default): a length the step-up did not raise is capped
  at ceil(average * ceiling_coeff) (at least 1), taking the largest candidate under the cap.
- Defaults: bucket 1 candidates [1, 3, 5, 7]; 8: [0, 1, 3]; 32: [0, 1]; 64: [0].

Our adaptations, each forced by our interfaces:
- Candidates above ``--speculative-num-draft-tokens`` K are clamped to K (each candidate c
  becomes min(c, K), duplicates merged): with K = 4 bucket 1's [1, 3, 5, 7] becomes [1, 3, 4],
  so the longest candidate is still "as long as the server allows".
- SGLang folds one verify batch's accepted counts into the average at once; our ``observe`` comes
  per request, so the verifications of a step are collected and folded in at the next
  ``choose_lengths``, into the bucket that step was routed to.  A request counts in the mean
  only if it drafted (the generator may trim one request to 0 drafts for its remaining budget or
  free KV slots); a step whose length was above 0 but that verified nothing (drafting abandoned
  for a newcomer's prefill) is not counted as a batch.
- A request's own ``num_draft_tokens`` caps its length; it cannot raise the batch's.
- ``--faser-batch-ema-config PATH``: a JSON file in the shape of SGLang's
  ``--speculative-adaptive-config`` (integer-string bucket keys, each with ``candidate_steps``
  and optional rule keys; rule keys at the top level are shared defaults).  Unlike SGLang we
  refuse unknown keys, so that a misspelt rule is not silently ignored.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass

from faser_sgl.managers.request import Request
from faser_sgl.speculative.policy import _StaticPolicy

# SGLang 0.5.23's defaults, restated (adaptive_spec_params.py).
DEFAULT_BATCH_EMA_CONFIG: dict = {
    "1": {"candidate_steps": [1, 3, 5, 7], "down_hysteresis": -0.25},
    "8": {"candidate_steps": [0, 1, 3], "down_hysteresis": 0.0},
    "32": {"candidate_steps": [0, 1], "down_hysteresis": 0.0},
    "64": {"candidate_steps": [0], "down_hysteresis": 0.0},
}
RULE_DEFAULTS = {"ema_alpha": 0.2, "update_interval": 5, "warmup_batches": 10,
                 "down_hysteresis": -0.25, "up_hysteresis": 0.0, "ceiling_coeff": 0.0}


@dataclass(frozen=True)
class BucketRules:
    candidates: tuple[int, ...]  # sorted, distinct, clamped to K
    ema_alpha: float
    update_interval: int
    warmup_batches: int
    down_hysteresis: float
    up_hysteresis: float
    ceiling_coeff: float


def _number(where: str, key: str, value, accepts, meaning: str, whole: bool = False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not accepts(value) or (whole and value != int(value)):
        raise ValueError(f"{where}: {key} must be {meaning}, got {value!r}")
    return int(value) if whole else float(value)


def _rules(where: str, merged: dict, max_draft_tokens: int) -> BucketRules:
    unknown = set(merged) - set(RULE_DEFAULTS) - {"candidate_steps"}
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; known: candidate_steps, "
                         f"{', '.join(RULE_DEFAULTS)}")
    steps = merged.get("candidate_steps")
    if not isinstance(steps, list) or not steps or \
            not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in steps):
        raise ValueError(f"{where}: candidate_steps must be a non-empty list of whole numbers >= 0, got {steps!r}")
    rule = {**RULE_DEFAULTS, **merged}
    return BucketRules(
        candidates=tuple(sorted({min(s, max_draft_tokens) for s in steps})),
        ema_alpha=_number(where, "ema_alpha", rule["ema_alpha"], lambda v: 0 < v <= 1, "a number in (0, 1]"),
        update_interval=_number(where, "update_interval", rule["update_interval"], lambda v: v >= 1,
                                "a whole number >= 1", whole=True),
        warmup_batches=_number(where, "warmup_batches", rule["warmup_batches"], lambda v: v >= 0,
                               "a whole number >= 0", whole=True),
        down_hysteresis=_number(where, "down_hysteresis", rule["down_hysteresis"], lambda v: True, "a number"),
        up_hysteresis=_number(where, "up_hysteresis", rule["up_hysteresis"], lambda v: True, "a number"),
        ceiling_coeff=_number(where, "ceiling_coeff", rule["ceiling_coeff"], lambda v: v >= 0, "a number >= 0"))


def parse_batch_ema_config(config: dict, max_draft_tokens: int) -> dict[int, BucketRules]:
    """Bucket start -> its rules; ValueError says what is wrong."""
    if not isinstance(config, dict):
        raise ValueError(f"the configuration must be a JSON object, got {type(config).__name__}")
    shared = {key: value for key, value in config.items() if not key.isdigit()}
    unknown = set(shared) - set(RULE_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown top-level key(s) {sorted(unknown)}: bucket keys are batch sizes "
                         f'("1", "8", ...), shared rules are {", ".join(RULE_DEFAULTS)}')
    buckets = {}
    for key, entry in config.items():
        if key.isdigit():
            if not isinstance(entry, dict):
                raise ValueError(f"bucket {key}: must be a JSON object, got {entry!r}")
            buckets[int(key)] = _rules(f"bucket {key}", {**shared, **entry}, max_draft_tokens)
    if not buckets:
        raise ValueError('at least one bucket is needed, keyed by batch size, e.g. {"1": {"candidate_steps": [1, 3]}}')
    return buckets


def load_batch_ema_config(path: str | None, max_draft_tokens: int) -> dict[int, BucketRules]:
    """``--faser-batch-ema-config PATH`` (None: SGLang's defaults)."""
    if path is None:
        return parse_batch_ema_config(DEFAULT_BATCH_EMA_CONFIG, max_draft_tokens)
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    return parse_batch_ema_config(config, max_draft_tokens)


class EmaBucket:
    """One bucket's learning state and its length rules (module docstring)."""

    def __init__(self, rules: BucketRules, initial_length: int):
        self.rules = rules
        c = rules.candidates
        self.length = initial_length if initial_length in c else c[len(c) // 2]
        self.ema = float(self.length - 1)
        self.batches = 0

    def record(self, mean_accepted: float | None) -> None:
        """One verified batch at this bucket's length (None: a batch at length 0)."""
        r = self.rules
        if self.length > 0 and mean_accepted is not None:
            self.ema += r.ema_alpha * (mean_accepted - self.ema)
        self.batches += 1
        past_warmup = self.batches - r.warmup_batches
        if past_warmup > 0 and past_warmup % r.update_interval == 0:
            self.length = self._reconsider()

    def _reconsider(self) -> int:
        c, r = self.rules.candidates, self.rules
        i = c.index(self.length)
        if self.length == 0:  # probe the next length up after an interval of not drafting
            probe = c[min(i + 1, len(c) - 1)]
            if probe > 0 and self.ema < 0:
                self.ema = float(probe - 1)
            return probe
        start = i
        while i > 0 and self.ema <= (0.5 if c[i - 1] == 0 else c[i - 1] - 0.5) + r.down_hysteresis:
            i -= 1
        if i == start:
            while i < len(c) - 1 and self.ema > c[i] - 0.5 + r.up_hysteresis:
                i += 1
        if r.ceiling_coeff > 0 and c[i] <= self.length:
            ceiling = max(1, math.ceil(self.ema * r.ceiling_coeff))
            while i > 0 and c[i] > ceiling:
                i -= 1
        return c[i]


class BatchEmaLength(_StaticPolicy):
    """Every request of a step drafts its batch-size bucket's current length."""

    name = "batch-ema"

    def __init__(self, max_draft_tokens: int, config_path: str | None = None):
        if max_draft_tokens < 1:
            raise ValueError(f"--speculative-num-draft-tokens must be at least 1, got {max_draft_tokens}")
        self.k = max_draft_tokens  # the most any step drafts (the frontier calibration reads it)
        rules = load_batch_ema_config(config_path, max_draft_tokens)
        self._starts = sorted(rules)
        self.buckets = {start: EmaBucket(rules[start], max_draft_tokens) for start in self._starts}
        self._step: tuple[EmaBucket, int] | None = None  # the last step's bucket and length
        self._accepted: dict[int, int] = {}  # its verifications: id(request) -> accepted drafts

    def bucket_for(self, batch_size: int) -> EmaBucket:
        i = bisect.bisect_right(self._starts, batch_size) - 1
        return self.buckets[self._starts[max(0, i)]]

    def choose_lengths(self, reqs: list[Request], step_tokens: int = 0) -> list[int]:
        if not reqs:
            return []
        self._fold_last_step()
        bucket = self.bucket_for(len(reqs))
        self._step = (bucket, bucket.length)
        k = bucket.length
        return [k if r.requested_draft_len is None else min(k, r.requested_draft_len) for r in reqs]

    def observe(self, req: Request, num_drafted: int, num_accepted: int) -> None:
        if num_drafted > 0:  # (a frontier pipeline may report a request more than once a step)
            self._accepted[id(req)] = self._accepted.get(id(req), 0) + num_accepted

    def _fold_last_step(self) -> None:
        if self._step is not None:
            bucket, length = self._step
            if length == 0:
                bucket.record(None)
            elif self._accepted:
                bucket.record(sum(self._accepted.values()) / len(self._accepted))
        self._step = None
        self._accepted.clear()
