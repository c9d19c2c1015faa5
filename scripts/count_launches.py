"""Count the GPU kernels one forward pass of this project's executor launches, per decoder layer
and per pass, for the simulator's eager and CUDA-graph GPU profiles (issue 26, item 3).

    PYTHONPATH=. .venv/bin/python scripts/count_launches.py [--json OUT]

The count is taken on the CPU, where every aten operator the executor dispatches is seen by a
TorchDispatchMode, after composite operators decompose (``F.linear`` arrives as ``t`` + ``mm``),
which is what the CUDA dispatcher also runs, one kernel per compute operator.  Operators that
launch nothing on a GPU are not counted: views and reshapes, allocations, metadata.  The
attention backend is the CUDA one's sequence of work (executor/attention/flashinfer_backend.py):
the two KV writes are real operators here (counted), and FlashInfer's paged attention kernel is
counted as one launch per layer (its split-KV decode adds a merge kernel at long contexts,
not counted).  The plan (``begin_forward``) is host work once per pass and launches nothing.

Shapes do not change the count, so tiny dimensions stand in for the real ones: the layer
structure (Qwen3: per-head q/k norms; Qwen2: q/k/v bias; fused qkv and gate/up projections, as
the runner fuses them) is what matters.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from faser_sgl.executor.attention.base import AttentionBackend
from faser_sgl.executor.config import ModelConfig
from faser_sgl.executor.forward_batch import ForwardBatch
from faser_sgl.executor.kv_cache import KVCache
from faser_sgl.executor.model import CausalLM, fuse_projections

# Operators that move no data on a GPU: views, allocations, metadata.
NO_LAUNCH = {
    "view", "_unsafe_view", "reshape", "as_strided", "t", "transpose", "permute", "expand",
    "squeeze", "unsqueeze", "slice", "select", "split", "split_with_sizes", "chunk", "unbind",
    "alias", "detach", "empty", "empty_like", "empty_strided", "lift_fresh", "_reshape_alias",
    "sym_size", "sym_stride", "sym_numel", "is_same_size", "_local_scalar_dense",
}
ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


class KernelCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.section = "pass"
        self.by_section: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NO_LAUNCH:
            self.ops[name] += 1
            self.by_section[self.section] += 1
        return func(*args, **(kwargs or {}))

    def launch(self, n: int = 1) -> None:
        """A kernel this CPU run does not execute (FlashInfer's attention)."""
        self.ops["flashinfer_attention"] += n
        self.by_section[self.section] += n


class CountingAttention(AttentionBackend):
    """FlashInfer's backend's work order: write K/V to the cache, one attention kernel."""

    def __init__(self, counter: KernelCounter, num_heads, num_kv_heads, head_dim):
        super().__init__(num_heads, num_kv_heads, head_dim)
        self.counter = counter

    def begin_forward(self, batch: ForwardBatch) -> None:
        pass

    def forward(self, layer_id, q, k, v, kv_cache, batch):
        kv_cache.write(layer_id, batch.out_cache_loc, k, v)
        self.counter.launch()
        return torch.empty_like(q)


def tiny_config(family: str, layers: int = 2) -> ModelConfig:
    return ModelConfig.from_dict({
        "architectures": [ARCHITECTURES[family]], "vocab_size": 64, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": layers, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 8, "tie_word_embeddings": family != "llama"})


@torch.inference_mode()
def count(family: str, tokens: int = 1) -> dict:
    """Kernels of one pass over ``tokens`` new tokens of one request (a decode when 1), logits
    on the last row: per decoder layer, and outside the layers (embedding, RoPE, final norm,
    LM head)."""
    config = tiny_config(family)
    model = CausalLM(config).to(torch.bfloat16)
    fuse_projections(model)
    kv = KVCache.for_model(config, 64, torch.bfloat16, "cpu")
    batch = ForwardBatch.build([[1] * tokens], [list(range(10, 10 + tokens))], [[tokens - 1]])
    counter = KernelCounter()
    attn = CountingAttention(counter, config.num_heads, config.num_kv_heads, config.head_dim)
    layers = list(model.model.layers)

    def in_section(module, name):
        def pre(*_):
            counter.section = name

        def post(*_):
            counter.section = "pass"
        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    for i, layer in enumerate(layers):
        in_section(layer, f"layer{i}")
    with counter:
        model.forward(batch, kv, attn)
    per_layer = [counter.by_section[f"layer{i}"] for i in range(len(layers))]
    assert len(set(per_layer)) == 1, per_layer  # every layer is the same code
    return {"family": family, "tokens": tokens, "per_layer": per_layer[0],
            "outside_layers": counter.by_section["pass"], "ops": dict(counter.ops.most_common())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the counts here")
    args = ap.parse_args()
    results = [count(family, tokens) for family in ("qwen3", "qwen2") for tokens in (1, 5)]
    for r in results:
        print(f"{r['family']}, {r['tokens']} token(s): {r['per_layer']} kernels per decoder layer, "
              f"{r['outside_layers']} outside the layers")
    print("operators of one qwen3 pass (tiny, 2 layers):", results[0]["ops"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
