"""Greedy generation through ModelRunner + Sampler, continuous-batching style, equals Hugging Face
``generate(do_sample=False)`` token for token; and the KV pool is whole again afterwards."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from faser_sgl.executor.forward_batch import ForwardBatch
from faser_sgl.executor.model_runner import ModelRunner
from faser_sgl.executor.sampler import Sampler, SamplingOptions
from reference import hf_greedy, load_hf_model

CHUNK = 20  # prefill chunk size: longer prompts are fed over several steps


@dataclass
class Req:
    prompt: list[int]
    max_new: int
    arrive: int  # step at which the request joins the batch
    fed: int = 0  # tokens whose K/V are in the cache
    slots: list[int] = field(default_factory=list)
    out: list[int] = field(default_factory=list)

    def next_feed(self) -> list[int]:
        if self.fed < len(self.prompt):
            return self.prompt[self.fed:self.fed + CHUNK]
        return [self.out[-1]]


def run_greedy(runner: ModelRunner, reqs: list[Req]) -> None:
    sampler, greedy = Sampler(), SamplingOptions(temperature=0.0)
    step = 0
    while any(len(r.out) < r.max_new for r in reqs):
        active = [r for r in reqs if r.arrive <= step and len(r.out) < r.max_new]
        step += 1
        if not active:
            continue
        feeds = [r.next_feed() for r in active]
        for r, f in zip(active, feeds):
            r.slots += runner.allocator.alloc(len(f))
        # A step's logits are needed only when it completes the prompt or decodes.
        wants = [r.fed + len(f) >= len(r.prompt) for r, f in zip(active, feeds)]
        batch = ForwardBatch.build(feeds, [r.slots for r in active],
                                   [[len(f) - 1] if w else [] for f, w in zip(feeds, wants)])
        logits = runner.forward(batch)
        sampled = [r for r, w in zip(active, wants) if w]
        tokens = sampler.sample(logits, [greedy] * len(sampled), [r.out for r in sampled])
        for r, f in zip(active, feeds):
            r.fed += len(f)
        for r, t in zip(sampled, tokens.tolist()):
            r.out.append(t)
            if len(r.out) == r.max_new:
                runner.allocator.free(r.slots)
                r.slots = []


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_batched_greedy_equals_hf_generate(arch, tiny_model_factory):
    path = tiny_model_factory(arch)
    runner = ModelRunner(path, max_total_tokens=300)
    hf = load_hf_model(path)
    g = torch.Generator().manual_seed(7)
    lengths, new, arrive = [5, 50, 11, 23, 2], [20, 8, 30, 15, 25], [0, 0, 1, 3, 3]
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in lengths]
    reqs = [Req(p, m, a) for p, m, a in zip(prompts, new, arrive)]

    run_greedy(runner, reqs)

    for r in reqs:
        assert r.out == hf_greedy(hf, r.prompt, r.max_new)
    assert runner.allocator.num_free == runner.allocator.num_total
    assert len({t for r in reqs for t in r.out}) > 20, "outputs too repetitive to test anything"


def test_pool_sized_from_memory_on_cpu(tiny_model_factory):
    runner = ModelRunner(tiny_model_factory("qwen2"))
    # A tiny model's KV is a few KB per token, so the CPU cap (contexts, not RAM) decides.
    assert runner.num_kv_slots == 4 * runner.max_context_len
    assert runner.allocator.num_total == runner.kv_cache.num_slots == runner.num_kv_slots
    assert ModelRunner(tiny_model_factory("qwen2"), num_kv_slots=33).allocator.num_total == 33
