"""Logprobs with SGLang's meaning and shapes: input (prompt) and output token logprobs, top-k
logprobs and logprobs of chosen token ids.

Output token t at position j gets log_softmax(adjusted_j / temperature)[t], where adjusted_j is
the target's logit row after penalties, logit_bias and the grammar mask: the distribution the
token was sampled (or, under speculation, verified) from, before top-k/top-p/min-p filtering,
as SGLang's sampler reports it.  Greedy requests have temperature 1.  A token accepted from a
draft gets the target's row at its position, so logprobs do not depend on speculation.

Input logprobs start at prompt position s = logprob_start_len (SGLang's rule: -1 means "none"
unless token_ids_logprob asks for them).  Entry i covers prompt token s + i: the log_softmax of
the raw logits at position s + i - 1, taken at the token; the prompt's very first token has no
context and gets None.  (SGLang 0.5.23's scheduler also reports None for token s when s > 0,
but sglang.lang's select, whose token healing and greedy_token_selection read that entry,
then fails on SGLang's own server; here the entry has its value, as SGLang's frontend expects.)
The prompt's last row predicts the first output token and belongs to the output.  Input rows
come from prefill chunks as they run (chunked prefill spreads them over steps); a retracted
request's recomputation records nothing twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class TokenLogprob:
    """One position's figures: the chosen token's logprob, the top-k, the asked-for ids'."""
    value: float
    token: int
    top_values: Optional[list[float]] = None
    top_ids: Optional[list[int]] = None
    chosen_values: Optional[list[float]] = None


@dataclass(eq=False)
class LogprobState:
    start_len: int  # first prompt position reported; len(prompt) (or more) = no input logprobs
    top_num: int
    token_ids: Optional[list[int]]
    prompt_len: int
    input_next: int = 0  # next prompt position whose row (predicting the token after it) is due
    inputs: list = field(default_factory=list)  # TokenLogprob per reported prompt token
    input_sent: bool = False
    outputs: list = field(default_factory=list)  # TokenLogprob per output token
    num_sent: int = 0

    def __post_init__(self):
        self.input_next = max(self.start_len - 1, 0)

    @property
    def cacheable_prefix(self) -> int:
        """Prompt tokens that may come from the prefix cache: the rows from s - 1 on must run."""
        return max(self.start_len - 1, 0)

    @property
    def wants_input(self) -> bool:
        return self.start_len < self.prompt_len

    @property
    def input_complete(self) -> bool:
        return not self.wants_input or self.input_next >= self.prompt_len - 1

    def input_rows(self, first_pos: int, num_tokens: int) -> list[int]:
        """Rows (0-based within a chunk feeding positions first_pos ..) to record this step."""
        lo = max(first_pos, self.input_next)
        hi = min(first_pos + num_tokens, self.prompt_len - 1)
        return list(range(lo - first_pos, hi - first_pos)) if self.wants_input and hi > lo else []


def make_state(return_logprob: bool, start_len: Optional[int], top_num: Optional[int],
               token_ids: Optional[list[int]], prompt_len: int, vocab_size: int,
               prefill_only: bool = False) -> Optional[LogprobState]:
    """A request's logprob state, or None when it asked for none.  Raises ValueError on values
    SGLang would refuse.  One deliberate difference: a prefill-only request (max_new_tokens=0)
    with the default start scores its whole prompt, where SGLang 0.5.23 returns nothing at all;
    sglang.lang's unconditional_likelihood_normalized relies on that (it fails on SGLang)."""
    if not return_logprob:
        return None
    top_num = int(top_num or 0)
    if top_num < 0:
        raise ValueError(f"top_logprobs_num must be >= 0, got {top_num}")
    if top_num > vocab_size:
        raise ValueError(f"top_logprobs_num {top_num} exceeds the vocabulary size {vocab_size}")
    if token_ids is not None:
        token_ids = [int(t) for t in token_ids]
        bad = [t for t in token_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"token_ids_logprob has id {bad[0]} outside the vocabulary [0, {vocab_size})")
    start = -1 if start_len is None else int(start_len)
    if start == -1:
        start = 0 if prefill_only else prompt_len  # output logprobs only, SGLang's default
    if start < 0 or start > prompt_len:
        raise ValueError(f"logprob_start_len={start} must be in [0, {prompt_len}] (the prompt's length) or -1")
    return LogprobState(start, top_num, token_ids, prompt_len)


def start_input(state: Optional[LogprobState], prompt: list[int]) -> None:
    """Open an input range that starts at the prompt's first token: it has no context, so it is
    reported without a logprob (None)."""
    if state is not None and state.wants_input and state.start_len == 0 and not state.inputs:
        state.inputs.append(TokenLogprob(None, prompt[0], None, None, None))


def _entries(logprobs: torch.Tensor, tokens: list[int], state: LogprobState) -> list[TokenLogprob]:
    """TokenLogprob per row of logprobs [N, V] (float32) at tokens [N]."""
    rows = torch.arange(len(tokens))
    values = logprobs[rows, torch.tensor(tokens, dtype=torch.int64)].tolist()
    tops = logprobs.topk(state.top_num, dim=-1) if state.top_num else None
    chosen = logprobs[:, state.token_ids].tolist() if state.token_ids is not None else None
    out = []
    for i, (v, t) in enumerate(zip(values, tokens)):
        out.append(TokenLogprob(
            v, t,
            tops.values[i].tolist() if tops is not None else None,
            tops.indices[i].tolist() if tops is not None else None,
            chosen[i] if chosen is not None else None))
    return out


def output_entries(adjusted: torch.Tensor, temperature: float, tokens: list[int],
                   state: LogprobState) -> list[TokenLogprob]:
    """Figures of output tokens from their adjusted logit rows [N, V] (N == len(tokens))."""
    if not tokens:
        return []
    logprobs = torch.log_softmax(adjusted[: len(tokens)].float().cpu() / temperature, dim=-1)
    return _entries(logprobs, tokens, state)


def record_input(state: LogprobState, first_pos: int, rows: list[int], logits: torch.Tensor,
                 prompt: list[int]) -> None:
    """Record the input rows ``rows`` (chunk-relative, as input_rows returned them) whose raw
    logits are ``logits`` [len(rows), V]."""
    if not rows:
        return
    positions = [first_pos + r for r in rows]
    logprobs = torch.log_softmax(logits.float().cpu(), dim=-1)
    state.inputs.extend(_entries(logprobs, [prompt[p + 1] for p in positions], state))
    state.input_next = positions[-1] + 1


def message_fields(states: list[Optional[LogprobState]], finished: list[bool]) -> dict:
    """BatchTokenIDOutput's logprob fields for one message: per request the entries not sent
    yet (input ones once, in the first message after the prompt was processed)."""
    names = ("input_token_logprobs_val", "input_token_logprobs_idx", "output_token_logprobs_val",
             "output_token_logprobs_idx", "input_top_logprobs_val", "input_top_logprobs_idx",
             "output_top_logprobs_val", "output_top_logprobs_idx", "input_token_ids_logprobs_val",
             "input_token_ids_logprobs_idx", "output_token_ids_logprobs_val", "output_token_ids_logprobs_idx")
    out = {n: [] for n in names}
    for state, done in zip(states, finished):
        inputs, outputs = [], []
        if state is not None:
            if not state.input_sent and (state.input_complete or done):
                inputs, state.input_sent = state.inputs, True
            outputs = state.outputs[state.num_sent:]
            state.num_sent = len(state.outputs)
        token_ids = state.token_ids if state is not None else None
        out["input_token_logprobs_val"].append([e.value for e in inputs])
        out["input_token_logprobs_idx"].append([e.token for e in inputs])
        out["output_token_logprobs_val"].append([e.value for e in outputs])
        out["output_token_logprobs_idx"].append([e.token for e in outputs])
        out["input_top_logprobs_val"].append([e.top_values for e in inputs])
        out["input_top_logprobs_idx"].append([e.top_ids for e in inputs])
        out["output_top_logprobs_val"].append([e.top_values for e in outputs])
        out["output_top_logprobs_idx"].append([e.top_ids for e in outputs])
        out["input_token_ids_logprobs_val"].append([e.chosen_values for e in inputs])
        out["input_token_ids_logprobs_idx"].append(
            [None if e.value is None else token_ids for e in inputs])
        out["output_token_ids_logprobs_val"].append([e.chosen_values for e in outputs])
        out["output_token_ids_logprobs_idx"].append([token_ids for _ in outputs])
    return out


def kept_entries(req, entries: list, kept: int) -> list:
    """The output entries to record for a step that kept ``kept`` of its emitted tokens.  A
    prefill-only request (max_new_tokens=0) that asked for chosen token ids keeps the entry of
    the token its prompt's last row would have given, generated or not: SGLang reports that
    next-token row for such requests, and its /v1/score reads output_token_ids_logprobs[0]."""
    if kept == 0 and entries and req.stop.max_new_tokens == 0 and req.logprobs.token_ids is not None \
            and not req.logprobs.outputs:
        return entries[:1]
    return entries[:kept]


# -- the generators' side ---------------------------------------------------------------------
def input_row_plan(chunks) -> list[list[int]]:
    """Per scheduled chunk, the rows (chunk-relative) whose logits give input logprobs this
    step; the generator asks for them before the chunk's own sampling rows."""
    plan = []
    for c in chunks:
        state = c.req.logprobs
        if state is None or state.input_complete:
            plan.append([])
        else:
            plan.append(state.input_rows(len(c.req.kv_slots) - len(c.tokens), len(c.tokens)))
    return plan


def consume_input_rows(chunks, plan: list[list[int]], row_counts: list[int],
                       logits: torch.Tensor) -> torch.Tensor:
    """Record the input logprob rows (each chunk's first len(plan[i]) of its row_counts[i]
    logits rows) and return the logits without them."""
    if not any(plan):
        return logits
    keep, offset = [], 0
    for c, rows, count in zip(chunks, plan, row_counts):
        if rows:
            first_pos = len(c.req.kv_slots) - len(c.tokens)
            record_input(c.req.logprobs, first_pos, rows, logits[offset: offset + len(rows)], c.req.prompt_ids)
        keep.extend(range(offset + len(rows), offset + count))
        offset += count
    return logits[torch.tensor(keep, dtype=torch.int64, device=logits.device)]


def emitted_entries(sampler, req, rows: torch.Tensor, histories, tokens: list[int]) -> list[TokenLogprob]:
    """Figures of tokens emitted from rows [>= len(tokens), V] (one row per token, histories the
    output before each), for a request that asked for logprobs; [] otherwise."""
    state = req.logprobs
    if state is None or not tokens:
        return []
    n = len(tokens)
    adjusted = sampler.adjusted_logits(rows[:n], [req.sampling] * n, list(histories)[:n])
    return output_entries(adjusted, req.sampling.temperature, tokens, state)
