"""FlashInfer backend vs the torch backend on CUDA (skipped where there is no GPU/flashinfer).

Shapes have head_dim 64 or 128: FlashInfer's FA2 prefill kernels refuse head_dim 16 (fewer than
4 MMA tiles of 16), the default tiny models' head dim, so the model tests use the head_dim 64
variants (tiny_model.HEAD_DIM64_TARGET).  Case ids name the dtype ("bf16", "fp16"): the GPU check
runs ``-k "not fp16"``, since every dtype x head_dim is one more JIT module to build cold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from faser_sgl.executor.attention import create_backend
from faser_sgl.executor.attention.flashinfer_backend import flashinfer_unavailable_reason
from faser_sgl.executor.forward_batch import ForwardBatch
from faser_sgl.executor.model_runner import ModelRunner
from test_executor_attention import ragged_case

REASON = flashinfer_unavailable_reason()
# qwen3 at head_dim 64 (128 over 2 query heads, 1 KV head), sized as tiny_model.HEAD_DIM64_TARGET
QWEN3_HEAD_DIM64 = {"hidden_size": 128, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 128,
                    "init_std": 0.106}

def needs_flashinfer(test):
    return pytest.mark.cuda(pytest.mark.skipif(REASON is not None, reason=REASON or "")(test))


def test_flashinfer_refused_clearly_without_cuda():
    if REASON is None:
        pytest.skip("flashinfer is available here")
    with pytest.raises(RuntimeError, match="CUDA|flashinfer"):
        create_backend("flashinfer", 4, 2, 16, dtype=torch.bfloat16, device="cpu")


@needs_flashinfer
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 2, 64), (8, 8, 128), (14, 2, 64)])
def test_flashinfer_matches_torch_backend(dtype, heads, kv_heads, head_dim):
    batch, q, k, v, cache = ragged_case(heads, kv_heads, head_dim, dtype, "cuda")
    ref_cache = type(cache)(1, cache.num_slots, kv_heads, head_dim, dtype, "cuda")
    ref_cache.k[0].copy_(cache.k[0])
    ref_cache.v[0].copy_(cache.v[0])

    fi = create_backend("flashinfer", heads, kv_heads, head_dim, dtype=dtype, device="cuda")
    fi.begin_forward(batch)
    got = fi.forward(0, q, k, v, cache, batch)

    ref = create_backend("torch", heads, kv_heads, head_dim)
    ref.begin_forward(batch)
    want = ref.forward(0, q.float(), k.float(), v.float(), ref_cache, batch)

    assert got.shape == q.shape and got.dtype == dtype
    assert torch.equal(cache.k[0], ref_cache.k[0])  # both wrote the same K/V
    assert (got.float() - want).abs().max().item() < 2e-2


@needs_flashinfer
def test_runner_logits_flashinfer_vs_torch(tiny_model_factory):
    path = tiny_model_factory("qwen3", **QWEN3_HEAD_DIM64)
    kw = dict(dtype=torch.bfloat16, device="cuda", max_total_tokens=256)
    runners = [ModelRunner(path, attention_backend=name, **kw) for name in ("torch", "flashinfer")]
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (30, 9, 21)]
    slots = [list(range(0, 30)), list(range(40, 49)), list(range(100, 121))]
    # Prefix pass, then a mixed pass (decode, 4-token verify, prefill continuation).
    prefix = [25, 8, 10]
    outs = []
    for r in runners:
        r.forward(ForwardBatch.build([x[:p] for x, p in zip(ids, prefix)],
                                     [s[:p] for s, p in zip(slots, prefix)], [[], [], []]))
        new = [x[p:] for x, p in zip(ids, prefix)]
        outs.append(r.forward(ForwardBatch.build(new, slots, [list(range(len(x))) for x in new])))
    torch_out, fi_out = outs
    assert (torch_out - fi_out).abs().max().item() < 0.05 * torch_out.abs().max().item()
    assert (torch_out.argmax(-1) == fi_out.argmax(-1)).float().mean().item() > 0.9


def test_flashinfer_test_models_have_a_head_dim_fa2_accepts(tiny_model_factory, head_dim64_pair):
    """FA2's prefill needs head_dim / 16 >= 4; the models the FlashInfer tests run have 64."""
    for path in (tiny_model_factory("qwen3", **QWEN3_HEAD_DIM64), *head_dim64_pair):
        config = json.loads((Path(path) / "config.json").read_text())
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        assert head_dim == 64, (path, head_dim)
