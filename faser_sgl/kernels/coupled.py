"""Coupled sampling: Gumbel-max with noise that depends only on (request seed, output position).

Standard speculative rejection sampling draws a number of uniforms that depends on how many
tokens were drafted, so a seeded request's text changes with the draft length, the batch and
the policy.  Here every position t of a request's output has its own noise vector g_t, a
function of (seed, t) and nothing else, and both models pick by Gumbel-max:

    token_t = argmax_x  log p_t(x) + g_t(x)      (target; p_t its final sampling distribution)
    draft_t = argmax_x  log q_t(x) + g_t(x)      (draft, same noise)

A draft token is accepted exactly when it equals the target's pick at that position, which is
greedy acceptance on the target's Gumbel-max tokens.  Lossless: g_t is independent of g_<t, so
given the tokens before t (a function of g_<t only) token_t is an exact sample of p_t.  And the
emitted text is the target's Gumbel-max sequence whatever was drafted: the same for any k, any
batch, any policy, and equal to target-only sampling of that seed.  The price is acceptance:
P(draft_t == token_t) is at most (and usually below) 1 - TV(p_t, q_t), which rejection sampling
reaches exactly; scripts/bench_sampling_schemes.py measures the difference on the real pair.
"""

from __future__ import annotations

from typing import Sequence

import torch

_MASK64 = (1 << 64) - 1


def noise_key(seed: int, position: int) -> int:
    """A 63-bit generator seed for (seed, position): SplitMix64 finalisers over both, so nearby
    seeds and positions give unrelated streams."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(position) + 1) & _MASK64
    for _ in range(2):
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x >> 1


def gumbel_noise(seed: int, position: int, vocab: int, device: torch.device | str) -> torch.Tensor:
    """g_t for one position: [vocab] float64 standard Gumbel, drawn on ``device`` from a generator
    seeded by noise_key (so the same on every call on that device; CPU and CUDA differ)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(noise_key(seed, position))
    u = torch.rand(vocab, generator=gen, dtype=torch.float64, device=device)
    # u == 0 gives -inf: that token never wins, which is the u -> 0 limit anyway.
    return -torch.log(-torch.log(u))


def coupled_tokens(probs: torch.Tensor, seeds: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
    """Gumbel-max pick per row of probs [N, V]: row i uses the noise of (seeds[i], positions[i]).
    Tokens of probability 0 (filtered by top-k/top-p/min-p, or greedy rows' other tokens) are
    never picked.  Returns [N] int64 on probs' device."""
    if probs.shape[0] != len(seeds) or len(seeds) != len(positions):
        raise ValueError(f"{probs.shape[0]} rows, {len(seeds)} seeds, {len(positions)} positions")
    if probs.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=probs.device)
    vocab = probs.shape[1]
    noise = torch.stack([gumbel_noise(s, t, vocab, probs.device) for s, t in zip(seeds, positions)])
    return torch.argmax(torch.log(probs.to(torch.float64)) + noise, dim=-1)
