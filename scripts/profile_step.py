"""Where the time of one target decode step and one verification pass goes, on this CPU.

    python scripts/profile_step.py [--batch 1 8] [--context 256] [--verify-tokens 5] [--cpu-linear auto]

For each batch size it builds that many requests with a cached prefix of ``--context`` tokens
on the embedded target (float32, faser_sgl's executor) and times, as the scheduler runs them:

- a decode step: one new token per request, logits on every request's row, greedy argmax;
- a verification pass: ``--verify-tokens`` new tokens per request (newest + drafts), logits on
  every row, greedy argmax per row (what greedy acceptance reads).

Each pass is split into exclusive time per part, measured by wrapping the executor's pieces with
a stack of timers (a part's time excludes the parts inside it): the linear layers, the LM head,
attention (the backend: KV write, gather, SDPA) and its per-pass planning, RMSNorm, rotary, the
SwiGLU activation, the residual adds and the per-layer Python around them, batch building and the
host-to-model move, argmax, and "other" = wall time minus all parts.  Medians of ``--repeats``.
The weight-read bandwidth of the linear layers is set against ``torch.sum`` over 512 MB.
"""

from __future__ import annotations

import argparse
import collections
import functools
import platform
import statistics
import time

import torch
from torch import nn

from faser_sgl.executor import cpu_linear, model as model_mod
from faser_sgl.executor.attention.torch_backend import TorchAttention
from faser_sgl.executor.forward_batch import ForwardBatch


class PartTimer:
    """Exclusive wall time per label, for nested wrapped calls."""

    def __init__(self):
        self.exclusive = collections.defaultdict(float)
        self._stack: list[list] = []  # [label, start, time of children]

    def wrap(self, label_of, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            label = label_of(*args) if callable(label_of) else label_of
            self._stack.append([label, time.perf_counter(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                lab, start, children = self._stack.pop()
                elapsed = time.perf_counter() - start
                self.exclusive[lab] += elapsed - children
                if self._stack:
                    self._stack[-1][2] += elapsed
        return timed

    def reset(self):
        self.exclusive.clear()


def instrument(timer: PartTimer, vocab_size: int) -> None:
    """Wrap the executor's classes (this process only)."""

    def linear_label(module, x):
        return "lm_head" if module.weight.shape[0] == vocab_size else "linear"

    nn.Linear.forward = timer.wrap(linear_label, nn.Linear.forward)
    cpu_linear.PackedLinear.forward = timer.wrap(linear_label, cpu_linear.PackedLinear.forward)
    model_mod.RMSNorm.forward = timer.wrap("rmsnorm", model_mod.RMSNorm.forward)
    model_mod.apply_rotary = timer.wrap("rotary", model_mod.apply_rotary)
    model_mod.RotaryEmbedding.__call__ = timer.wrap("rotary", model_mod.RotaryEmbedding.__call__)
    model_mod.Attention.forward = timer.wrap("attention glue (views)", model_mod.Attention.forward)
    model_mod.MLP.forward = timer.wrap("swiglu activation", model_mod.MLP.forward)
    model_mod.DecoderLayer.forward = timer.wrap("residual adds + layer python", model_mod.DecoderLayer.forward)
    model_mod.CausalLM.embed = timer.wrap("embedding", model_mod.CausalLM.embed)
    TorchAttention.forward = timer.wrap("attention (kv write, gather, sdpa)", TorchAttention.forward)
    TorchAttention.begin_forward = timer.wrap("attention planning", TorchAttention.begin_forward)
    ForwardBatch.build = staticmethod(timer.wrap("batch build + move", ForwardBatch.build))
    ForwardBatch.to = timer.wrap("batch build + move", ForwardBatch.to)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--context", type=int, default=256, help="cached tokens per request")
    ap.add_argument("--verify-tokens", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--cpu-linear", default="auto", choices=["auto", "off"])
    args = ap.parse_args()

    from faser_sgl import default_models
    from faser_sgl.executor.model_runner import ModelRunner
    from faser_sgl.executor.sampler import Sampler, SamplingOptions

    target = default_models.ensure(default_models.TARGET)
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    print(f"# {platform.node()} ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"float32, cpu_linear={args.cpu_linear}, context {args.context}; median ms per pass\n")

    max_batch = max(args.batch)
    runner = ModelRunner(str(target), dtype=torch.float32, cpu_linear=args.cpu_linear,
                         max_total_tokens=max_batch * (args.context + args.verify_tokens) + 16)
    vocab = runner.config.vocab_size
    sampler = Sampler()
    greedy = SamplingOptions(temperature=0.0)
    weight_bytes = sum(p.numel() * p.element_size() for n, p in runner.model.named_parameters()
                       if n != "model.embed_tokens.weight" or runner.model.lm_head is None)

    # Cached prefixes, written once by a real prefill.
    gen = torch.Generator().manual_seed(0)
    prefixes, slot_lists = [], []
    for _ in range(max_batch):
        ids = torch.randint(100, 20000, (args.context,), generator=gen).tolist()
        slots = runner.allocator.alloc(args.context + args.verify_tokens)
        runner.forward(ForwardBatch.build([ids], [slots[: args.context]], [[args.context - 1]]))
        prefixes.append(ids)
        slot_lists.append(slots)

    timer = PartTimer()
    instrument(timer, vocab)

    def one_pass(batch_size: int, q: int) -> None:
        feeds = [[11] * q for _ in range(batch_size)]
        slots = [s[: args.context + q] for s in slot_lists[:batch_size]]
        rows = [list(range(q)) for _ in range(batch_size)]
        logits = runner.forward(ForwardBatch.build(feeds, slots, rows))
        timed_argmax(logits)

    timed_argmax = timer.wrap("argmax (greedy sampling)",
                              lambda logits: sampler.greedy_tokens(logits, [greedy] * logits.shape[0]))

    big = torch.ones(128 * 2**20)
    sum_ms = min(_time_ms(lambda: big.sum()) for _ in range(5))
    sum_gbs = big.numel() * 4 / (sum_ms / 1e3) / 1e9
    del big

    for batch_size in args.batch:
        for label, q in (("decode", 1), (f"verify {args.verify_tokens}", args.verify_tokens)):
            one_pass(batch_size, q)  # warm-up
            walls, parts = [], collections.defaultdict(list)
            for _ in range(args.repeats):
                timer.reset()
                walls.append(_time_ms(lambda: one_pass(batch_size, q)))
                for k, v in timer.exclusive.items():
                    parts[k].append(v * 1e3)
            wall = statistics.median(walls)
            med = {k: statistics.median(v) for k, v in parts.items()}
            med["other (unwrapped python, logits slicing)"] = max(0.0, wall - sum(med.values()))
            linear_ms = med.get("linear", 0) + med.get("lm_head", 0)
            print(f"## batch {batch_size}, {label} ({batch_size * q} tokens): {wall:.1f} ms; linear + LM "
                  f"head read the weights at {weight_bytes / (linear_ms / 1e3) / 1e9:.1f} GB/s "
                  f"({weight_bytes / (linear_ms / 1e3) / 1e9 / sum_gbs:.0%} of torch.sum's {sum_gbs:.1f} GB/s); "
                  f"whole pass {weight_bytes / (wall / 1e3) / 1e9 / sum_gbs:.0%}\n")
            print("| part | ms | share |\n|---|---|---|")
            for k, v in sorted(med.items(), key=lambda kv: -kv[1]):
                print(f"| {k} | {v:.2f} | {v / wall:.1%} |")
            print(flush=True)


def _time_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


if __name__ == "__main__":
    main()
