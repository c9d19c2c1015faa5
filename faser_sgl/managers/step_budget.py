"""The token budget of one scheduler step, from SGLang's --chunked-prefill-size.

SGLang reads the flag as the largest prefill chunk, and a value <= 0 (its tests pass -1) as
"chunked prefill off": a prompt is prefilled whole in one pass, the first one of a batch even
above --max-prefill-tokens.  Our planner has one budget per step (decode tokens plus prefill
chunks), so "off" becomes a budget that holds any prompt the context admits, beside one token
per running request.  It used to become a budget of -1, and a scheduler with a request
waiting and no step it could plan spun at 100% CPU forever.
"""

from __future__ import annotations


def step_token_budget(chunked_prefill_size: int | None, default: int, context_len: int,
                      max_prefill_tokens: int | None, max_running_requests: int) -> int:
    """Tokens one step may carry: ``chunked_prefill_size`` when positive, ``default`` when
    unset (None), and with chunking off (<= 0) the longest prompt the context admits (or
    ``max_prefill_tokens`` if larger) plus one decode token per running request."""
    if chunked_prefill_size is None:
        return default
    if chunked_prefill_size > 0:
        return chunked_prefill_size
    return max(context_len, max_prefill_tokens or 0) + max_running_requests
