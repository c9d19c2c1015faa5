"""The speculative step on a GPU (skipped without CUDA): the CPU tests check that every tensor
the step creates names its device (test_speculative_step.py); this runs the same step where a
tensor on the wrong device would fail: greedy, rejection-sampled and coupled-sampled requests,
ragged draft lengths, with the torch attention backend in float32 and FlashInfer in bfloat16."""

from __future__ import annotations

import pytest
import torch

from spec_harness import Engine

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

PROMPTS = [[5, 17, 33], list(range(40, 75)), [7] * 11, list(range(100, 123)), [3, 9], [250, 30, 31, 2, 8]]


def _backends():
    cases = [("torch", torch.float32)]
    try:
        from faser_sgl.executor.attention.flashinfer_backend import flashinfer_unavailable_reason

        if flashinfer_unavailable_reason() is None:
            cases.append(("flashinfer", torch.bfloat16))
    except ImportError:
        pass
    return cases


@pytest.mark.parametrize("backend,dtype", _backends())
def test_speculative_step_on_cuda(tiny_model_factory, partial_draft_path, backend, dtype):
    target = tiny_model_factory("llama", seed=0)
    kw = dict(device="cuda", attention_backend=backend, dtype=dtype)
    reference = Engine(target, None, **kw)
    expected = reference.run([reference.make_request(p, 16, temperature=0) for p in PROMPTS])
    for scheme in ("rejection", "coupled"):
        engine = Engine(target, partial_draft_path, k=4, sampling_scheme=scheme, **kw)
        greedy = [engine.make_request(p, 16, temperature=0, draft_len=i % 6) for i, p in enumerate(PROMPTS)]
        sampled = [engine.make_request(p, 16, temperature=0.8, sampling_seed=i, ignore_eos=True)
                   for i, p in enumerate(PROMPTS)]
        outs = engine.run(greedy + sampled)
        if dtype == torch.float32:
            assert outs[: len(PROMPTS)] == expected  # lossless on the GPU as on the CPU
        assert all(len(o) == 16 for o in outs[len(PROMPTS):])
        assert engine.generator.num_verify_steps > 0 and engine.generator.num_accepted > 0
    if dtype == torch.float32:
        coupled_alone = Engine(target, None, sampling_scheme="coupled", **kw)
        ref = coupled_alone.run([coupled_alone.make_request(p, 16, temperature=0.8, sampling_seed=i,
                                                            ignore_eos=True) for i, p in enumerate(PROMPTS)])
        assert outs[len(PROMPTS):] == ref  # coupled: the same text as target-only sampling
