"""Speculation policies: how many draft tokens each request gets this step.

A policy sees the decoding requests of the step and returns one length per request, so it can
choose differently per request (FASER's adaptive drafter) or the same for all (the fixed-K
baseline of SGLang/vLLM, and the shipping engines' batch-wide adaptive schemes: batch_ema.py,
batch_table.py).  Lengths are upper bounds; the generator trims them to what the
request may still emit and to the free KV slots.
"""

from __future__ import annotations

from typing import Protocol

from faser_sgl.managers.request import Request


class SpeculationPolicy(Protocol):
    name: str

    def choose_lengths(self, reqs: list[Request], step_tokens: int = 0) -> list[int]:
        """Draft length per request for this step (0 = plain decode for that request).
        ``step_tokens``: tokens the target pass carries anyway (decodes' own + prefill)."""

    def observe(self, req: Request, num_drafted: int, num_accepted: int) -> None:
        """Feedback after verification, for policies that adapt."""

    def observe_forward(self, model: str, num_tokens: int, seconds: float) -> None:
        """Measured time of one forward pass of "target" or "draft", for cost-aware policies."""

    def calibration_sizes(self) -> tuple[list[int], list[int]]:
        """Token counts of the target and draft passes to time before serving (see
        SpeculativeGenerator.calibrate); empty lists for policies that ignore costs."""


class _StaticPolicy:
    """A policy that learns nothing from feedback."""

    def observe(self, req: Request, num_drafted: int, num_accepted: int) -> None:
        pass

    def observe_forward(self, model: str, num_tokens: int, seconds: float) -> None:
        pass

    def calibration_sizes(self) -> tuple[list[int], list[int]]:
        return [], []


class NoSpeculation(_StaticPolicy):
    name = "none"

    def choose_lengths(self, reqs: list[Request], step_tokens: int = 0) -> list[int]:
        return [0] * len(reqs)


class FixedLength(_StaticPolicy):
    """The baseline: every request drafts K tokens every step, then verifies."""

    name = "fixed"

    def __init__(self, num_draft_tokens: int):
        if num_draft_tokens < 1:
            raise ValueError(f"--speculative-num-draft-tokens must be at least 1, got {num_draft_tokens}")
        self.k = num_draft_tokens

    def choose_lengths(self, reqs: list[Request], step_tokens: int = 0) -> list[int]:
        # A request may pin its own K (sampling_params.custom_params.num_draft_tokens): that is
        # how a single batch mixes lengths for the ragged-verification tests.
        return [r.requested_draft_len if r.requested_draft_len is not None else self.k for r in reqs]


def make_policy(name: str, num_draft_tokens: int | None, cost_profile: str | None = None,
                batch_table: str | None = None, batch_ema_config: str | None = None) -> SpeculationPolicy:
    """``cost_profile``: ``--speculative-cost-profile`` text, which pins the adaptive policy's
    cost model (see adaptive.parse_cost_profile); the other policies ignore costs and refuse it.
    ``batch_table`` / ``batch_ema_config``: ``--faser-batch-table`` text and the
    ``--faser-batch-ema-config`` path of the two baselines (None: their defaults)."""
    if cost_profile is not None and name not in ("adaptive", "faser"):
        raise ValueError(f"--speculative-cost-profile is only used by --speculative-policy adaptive or faser, not {name!r}")
    if batch_table is not None and name != "batch-table":
        raise ValueError(f"--faser-batch-table is only used by --speculative-policy batch-table, not {name!r}")
    if batch_ema_config is not None and name != "batch-ema":
        raise ValueError(f"--faser-batch-ema-config is only used by --speculative-policy batch-ema, not {name!r}")
    k = num_draft_tokens if num_draft_tokens is not None else 4
    if name == "none":
        return NoSpeculation()
    if name == "fixed":
        return FixedLength(k)
    if name == "adaptive":
        from faser_sgl.speculative.adaptive import AdaptiveLength, parse_cost_profile

        pinned = parse_cost_profile(cost_profile) if cost_profile is not None else None
        return AdaptiveLength(k, pinned)
    if name == "faser":
        # FASER's lengths are the adaptive drafter's; its other mechanisms (early exit) live in
        # the generator and are switched by their own options.
        policy = make_policy("adaptive", num_draft_tokens, cost_profile)
        policy.name = "faser"
        return policy
    # The shipping engines' batch-wide schemes, as baselines on our executor.
    if name == "batch-ema":  # SGLang's --speculative-adaptive
        from faser_sgl.speculative.batch_ema import BatchEmaLength

        return BatchEmaLength(k, batch_ema_config)
    if name == "batch-table":  # vLLM's dynamic speculative decoding
        from faser_sgl.speculative.batch_table import DEFAULT_BATCH_TABLE, BatchTableLength

        return BatchTableLength(k, batch_table if batch_table is not None else DEFAULT_BATCH_TABLE)
    raise ValueError(f"unknown --speculative-policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")


POLICY_NAMES = ("none", "fixed", "adaptive", "faser", "batch-ema", "batch-table")
