"""Our decoder against Hugging Face transformers (float32) on tiny random models of every
supported family: a prefill, then decode steps, then one ragged batch that mixes a prefill, a
chunked-prefill continuation, decodes and a 4-token verification chunk."""

from __future__ import annotations

import random

import pytest
import torch

from faser_sgl.executor.forward_batch import ForwardBatch
from faser_sgl.executor.model_runner import ModelRunner

ATOL = 1e-4
NUM_SLOTS = 400

VARIANTS = {
    # Llama with Llama-3.1 RoPE scaling (original context 64, so the scaling really bites).
    "llama-rope-llama3": ("llama", {"rope_scaling": {
        "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}),
    "llama-rope-linear": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "qwen2-tied": ("qwen2", {}),  # q/k/v biases, tied embeddings
    "qwen3": ("qwen3", {}),  # q/k norms
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def models(request, tiny_model_factory):
    from transformers import AutoModelForCausalLM

    arch, kwargs = VARIANTS[request.param]
    path = tiny_model_factory(arch, **kwargs)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    runner = ModelRunner(path, max_total_tokens=NUM_SLOTS)
    return hf, runner


@torch.inference_mode()
def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    return hf(torch.tensor([ids])).logits[0].float()


def random_ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 512, (n,), generator=g).tolist()


def scattered_slots(n: int, rng: random.Random, taken: set[int]) -> list[int]:
    """n distinct, non-contiguous, unordered slots: exercises the paged layout."""
    free = [s for s in range(NUM_SLOTS) if s not in taken]
    out = rng.sample(free, n)
    taken.update(out)
    return out


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    diff = (got - want).abs().max().item()
    assert diff < ATOL, f"max |ours - HF| = {diff:.2e}"


def test_prefill_then_decode_matches_hf(models):
    hf, runner = models
    ids = random_ids(40, seed=1)
    ref = hf_logits(hf, ids)
    rng, taken = random.Random(0), set()
    slots = scattered_slots(25, rng, taken)

    logits = runner.forward(ForwardBatch.build([ids[:25]], [slots], [list(range(25))]))
    assert logits.dtype == torch.float32 and logits.shape == (25, runner.vocab_size)
    close(logits, ref[:25])

    for t in range(25, 40):
        slots = slots + scattered_slots(1, rng, taken)
        logits = runner.forward(ForwardBatch.build([[ids[t]]], [slots], [[0]]))
        close(logits[0], ref[t])


def test_ragged_mixed_batch_matches_hf(models):
    """One forward carrying five requests in different phases, scattered over the KV pool."""
    hf, runner = models
    rng, taken = random.Random(1), set()
    seqs = {name: random_ids(n, seed=10 + k) for k, (name, n) in enumerate(
        [("prefill", 17), ("decode_a", 31), ("verify", 16), ("chunk", 44), ("decode_b", 9)])}
    refs = {name: hf_logits(hf, ids) for name, ids in seqs.items()}
    # Tokens already in the cache before the mixed step, and what the mixed step feeds.
    cached = {"prefill": 0, "decode_a": 30, "verify": 12, "chunk": 20, "decode_b": 8}
    slots = {name: scattered_slots(len(ids), rng, taken) for name, ids in seqs.items()}

    # Warm-up: write the cached prefixes (some in one batch, to mix request boundaries).
    warm = [n for n in seqs if cached[n] > 0]
    runner.forward(ForwardBatch.build([seqs[n][:cached[n]] for n in warm],
                                      [slots[n][:cached[n]] for n in warm], [[] for _ in warm]))

    order = ["verify", "decode_a", "prefill", "decode_b", "chunk"]  # not sorted by anything
    new = [seqs[n][cached[n]:] for n in order]
    logits = runner.forward(ForwardBatch.build(new, [slots[n] for n in order],
                                               [list(range(len(x))) for x in new]))
    assert logits.shape[0] == sum(len(x) for x in new)
    row = 0
    for name, toks in zip(order, new):
        close(logits[row:row + len(toks)], refs[name][cached[name]:])
        row += len(toks)


def test_logits_only_for_requested_rows(models):
    hf, runner = models
    ids = random_ids(12, seed=3)
    ref = hf_logits(hf, ids)
    slots = list(range(100, 112))
    logits = runner.forward(ForwardBatch.build([ids], [slots], [[3, 11]]))
    assert logits.shape == (2, runner.vocab_size)
    close(logits, ref[[3, 11]])


def test_bfloat16_tracks_float32(tiny_model_factory):
    """bf16 weights and KV cache: same model, coarser numbers; argmax mostly agrees."""
    path = tiny_model_factory("qwen2")
    ids = random_ids(48, seed=4)
    batch = ForwardBatch.build([ids], [list(range(48))], [list(range(48))])
    ref = ModelRunner(path, max_total_tokens=64).forward(batch)
    bf16 = ModelRunner(path, dtype=torch.bfloat16, max_total_tokens=64)
    assert bf16.kv_cache.k[0].dtype == torch.bfloat16
    got = bf16.forward(batch)
    assert got.dtype == torch.float32
    assert (got - ref).abs().max().item() < 0.1 * ref.abs().max().item()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.8
