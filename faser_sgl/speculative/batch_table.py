"""``batch-table``: one draft length for the whole batch, looked up in a user table keyed by
batch size.  A baseline: vLLM's dynamic speculative decoding, restated here so that FASER is
compared with it on our executor, in the same run.

Where the rules come from (written from these descriptions, not from vLLM's code):
- vLLM PR #32374 ("[V1][Spec Decode] Add Dynamic SD", vllm-project/vllm), its description: the
  user gives ``num_speculative_tokens_per_batch_size``, a schedule from batch-size ranges to K;
  ranges are inclusive, "any batch-size gaps inherit the previous configured K", and the K used
  is clamped to ``min(num_speculative_tokens, K)``; without a schedule the feature is off.  The
  K applies to every request of the step.
- vLLM's docs/features/speculative_decoding/dynamic_speculative_decoding.md (the schedule as
  ``[start_bs, end_bs, K]`` entries, e.g. ``[[1, 64, 3], [65, 128, 1], [129, 512, 0]]``), and
  its schedule validation (vllm/v1/spec_decode/dynamic/utils.py, read for the rule only): the
  first range must start at 1 so that every batch size has a K, and batch sizes past the last
  range keep the last range's K.

So between and past the table's entries the lookup is a floor: a batch of n requests gets the K
of the largest start <= n.  Our table therefore lists only starts: ``"1:4,8:2,32:1,64:0"`` means
K = 4 for 1-7 requests, 2 for 8-31, 1 for 32-63 and 0 (no drafting) from 64 up.  The first
start must be 1, as in vLLM.  A K above ``--speculative-num-draft-tokens`` is clamped to it, as
vLLM clamps to ``num_speculative_tokens``.

The batch size is the number of decoding requests in the step (what vLLM calls concurrency:
requests scheduled for a decode step).  The default table is ours, not vLLM's (vLLM ships none,
its author arguing that the right one depends on hardware and model): its starts are SGLang's
adaptive buckets (1, 8, 32, 64; batch_ema.py), and K falls with the batch because verification
rows cost more as the batch fills the accelerator.  It is a reasonable shape, not a tuned one.
"""

from __future__ import annotations

import bisect

from faser_sgl.managers.request import Request
from faser_sgl.speculative.policy import _StaticPolicy

DEFAULT_BATCH_TABLE = "1:4,8:2,32:1,64:0"


def parse_batch_table(text: str) -> list[tuple[int, int]]:
    """``"START:K,START:K,..."`` -> sorted [(start, K)]; ValueError says what is wrong."""
    entries: dict[int, int] = {}
    for part in text.split(","):
        start_text, sep, k_text = part.strip().partition(":")
        try:
            if not sep:
                raise ValueError
            start, k = int(start_text), int(k_text)
        except ValueError:
            raise ValueError(f"each entry is BATCH_SIZE:K with whole numbers, got {part.strip()!r}") from None
        if start < 1 or k < 0:
            raise ValueError(f"batch sizes start at 1 and K is at least 0, got {part.strip()!r}")
        if start in entries:
            raise ValueError(f"batch size {start} appears twice")
        entries[start] = k
    table = sorted(entries.items())
    if table[0][0] != 1:
        # As in vLLM: without an entry for 1, small batches would have no K.
        raise ValueError(f"the first batch size must be 1 (so that every batch has a K), got {table[0][0]}")
    return table


class BatchTableLength(_StaticPolicy):
    """Every request of a step drafts the table's K for the step's batch size."""

    name = "batch-table"

    def __init__(self, max_draft_tokens: int, table: str = DEFAULT_BATCH_TABLE):
        if max_draft_tokens < 1:
            raise ValueError(f"--speculative-num-draft-tokens must be at least 1, got {max_draft_tokens}")
        self.k = max_draft_tokens  # the most any step drafts (the frontier calibration reads it)
        entries = parse_batch_table(table)
        self._starts = [start for start, _ in entries]
        self._lengths = [min(k, max_draft_tokens) for _, k in entries]

    def length_for(self, batch_size: int) -> int:
        """The K of the largest table start <= batch_size (floor; the first start is 1)."""
        return self._lengths[max(0, bisect.bisect_right(self._starts, batch_size) - 1)]

    def choose_lengths(self, reqs: list[Request], step_tokens: int = 0) -> list[int]:
        k = self.length_for(len(reqs))
        # A request's own num_draft_tokens caps its length; it cannot raise the batch's K.
        return [k if r.requested_draft_len is None else min(k, r.requested_draft_len) for r in reqs]
