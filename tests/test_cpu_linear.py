"""executor/cpu_linear.py: the packed CPU linear gives F.linear's results (up to float32
rounding) at every row count, each projection keeps one copy of its weight in the form timing
chose, the choice follows the median of interleaved trials (not one lucky or unlucky sample),
and greedy output stays identical to Hugging Face float32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from faser_sgl.executor import cpu_linear

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="torch without oneDNN")


@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear_at_every_row_count(bias):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 80, generator=gen)
    b = torch.randn(96, generator=gen) if bias else None
    layer = cpu_linear.PackedLinear.from_weight(weight, b)
    # 1 row (decode) .. 17, and a prefill chunk's worth: the one packed copy serves them all.
    for rows in (*range(1, 18), 40, 2048):
        x = torch.randn(rows, 80, generator=gen)
        torch.testing.assert_close(layer(x), F.linear(x, weight, b), rtol=1e-5, atol=1e-5)
    x3 = torch.randn(2, 3, 80, generator=gen)  # leading dims are kept
    torch.testing.assert_close(layer(x3), F.linear(x3, weight, b), rtol=1e-5, atol=1e-5)
    strided = torch.randn(5, 160, generator=gen)[:, ::2]  # a non-contiguous input
    torch.testing.assert_close(layer(strided), F.linear(strided, weight, b), rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.dense_weight(), weight)


def _dense_and_packed_elements(model) -> tuple[int, int]:
    dense = sum(p.numel() for p in model.parameters())
    dense += sum(t.numel() for m in model.modules() for t in vars(m).values()
                 if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter) and not t.is_mkldnn)
    packed = sum(m.packed.numel() for m in model.modules() if isinstance(m, cpu_linear.PackedLinear))
    return dense, packed


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_each_weight_is_held_once_in_the_form_timing_chose(tiny_model_factory, arch):
    """The server used to keep every projection twice (plain for F.linear + oneDNN packed):
    ~7 GB more for the 1.5B target, so two servers did not fit on a 24 GiB machine.  Whatever
    the timing chooses on this machine, the loaded model holds each weight once."""
    from safetensors import safe_open

    from faser_sgl.executor.model_runner import ModelRunner

    path = tiny_model_factory(arch, seed=0)
    runner = ModelRunner(path, max_total_tokens=16)
    with safe_open(f"{path}/model.safetensors", framework="pt") as f:
        stored = sum(torch.Size(f.get_slice(name).get_shape()).numel() for name in f.keys()
                     if not (name == "lm_head.weight" and runner.config.tie_word_embeddings))
    dense, packed = _dense_and_packed_elements(runner.model)
    assert dense + packed == stored
    for module in runner.model.modules():
        if isinstance(module, cpu_linear.PackedLinear):
            assert getattr(module, "weight", None) is None
    assert set(runner.linear_plan.values()) <= {cpu_linear.PACKED, cpu_linear.PLAIN}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_packed_projections_and_lm_head_keep_greedy_output_unchanged(tiny_model_factory, arch, monkeypatch):
    from faser_sgl.executor.model_runner import ModelRunner
    from reference import hf_greedy, load_hf_model
    from spec_harness import Engine

    path = tiny_model_factory(arch, seed=0)
    # Force the packed form everywhere, whatever the timing says on this machine.
    monkeypatch.setattr(cpu_linear, "choose_form_by_timing", lambda weight, packed: cpu_linear.PACKED)
    runner = ModelRunner(path, max_total_tokens=64)
    assert not [m for m in runner.model.modules() if isinstance(m, torch.nn.Linear)]
    assert runner.linear_plan and set(runner.linear_plan.values()) == {cpu_linear.PACKED}
    assert len(runner.linear_plan) >= 4
    model = runner.model
    if model.lm_head is not None:
        assert model.logits_linear is model.lm_head
        # early exit's lens reads rows of the head: on request the head turns plain, still
        # one copy, and the logits stay what they were
        packed_head = model.lm_head
        hidden = torch.randn(3, model.config.hidden_size)
        before = model.compute_logits(hidden)
        assert torch.equal(model.plain_lm_head_weight(), packed_head.dense_weight())
        assert isinstance(model.lm_head, torch.nn.Linear) and model.logits_linear is model.lm_head
        assert model.plain_lm_head_weight() is model.lm_head.weight
        assert torch.allclose(model.compute_logits(hidden), before, rtol=1e-4, atol=1e-5)
    else:  # tied: the embedding matrix stays the one (plain) copy, F.linear serves the head
        assert model.logits_linear is None
        assert model.plain_lm_head_weight() is model.model.embed_tokens.weight
    off = ModelRunner(path, max_total_tokens=64, cpu_linear="off")
    assert off.linear_plan is None and off.model.logits_linear is None

    hf = load_hf_model(path)
    engine = Engine(path, None)
    prompts = [[5, 17, 33], list(range(40, 75)), [7] * 11]
    expected = [hf_greedy(hf, p, 12) for p in prompts]
    assert engine.run([engine.make_request(p, 12, temperature=0) for p in prompts]) == expected


def test_plain_form_keeps_the_nn_linear(tiny_model_factory, monkeypatch):
    from faser_sgl.executor.model_runner import ModelRunner

    monkeypatch.setattr(cpu_linear, "choose_form_by_timing", lambda weight, packed: cpu_linear.PLAIN)
    runner = ModelRunner(tiny_model_factory("llama", seed=0), max_total_tokens=16)
    assert set(runner.linear_plan.values()) == {cpu_linear.PLAIN}
    assert not [m for m in runner.model.modules() if isinstance(m, cpu_linear.PackedLinear)]


def test_float32_cpu_only(tiny_model_factory):
    from faser_sgl.executor.model_runner import ModelRunner

    path = tiny_model_factory("llama", seed=0)
    assert ModelRunner(path, max_total_tokens=16, dtype=torch.bfloat16).linear_plan is None
    with pytest.raises(ValueError, match="cpu_linear"):
        ModelRunner(path, max_total_tokens=16, cpu_linear="fast")


class FakeMachine:
    """A clock that only the timed products move: each call of a form costs what ``cost``
    says for that form and the running call count (so a test can script noise and drifts)."""

    def __init__(self, monkeypatch, cost):
        self.now, self.calls, self.cost = 0.0, 0, cost
        real_linear, real_packed = F.linear, torch.ops.mkldnn._linear_pointwise

        def timed(form, real):
            def call(*args):
                self.now += cost(form, self.calls)
                self.calls += 1
                return real(*args)
            return call

        monkeypatch.setattr(F, "linear", timed(cpu_linear.PLAIN, real_linear))
        monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", timed(cpu_linear.PACKED, real_packed),
                            raising=False)

    def timer(self) -> float:
        return self.now


def _choose(machine) -> str:
    weight = torch.randn(32, 16)
    return cpu_linear.choose_form(cpu_linear.measure([weight], [cpu_linear.pack(weight)], timer=machine.timer))


def test_a_lucky_sample_does_not_decide_the_form(monkeypatch):
    """F.linear costs 1.0 but now and then (every 5th call) gets the core to itself and takes
    0.1; packed always costs 0.8.  The best-of-few timing of the old code let such one sample
    decide; the median of the interleaved trials does not."""
    machine = FakeMachine(monkeypatch, lambda form, n: (0.1 if n % 5 == 0 else 1.0) if form == "plain" else 0.8)
    assert _choose(machine) == cpu_linear.PACKED


def test_an_unlucky_sample_does_not_decide_the_form(monkeypatch):
    """The other way round: packed is the faster form (0.8 vs 1.0) but one call in five is
    preempted (x10): the median still picks it."""
    machine = FakeMachine(monkeypatch, lambda form, n: 1.0 if form == "plain" else (8.0 if n % 5 == 1 else 0.8))
    assert _choose(machine) == cpu_linear.PACKED


def test_a_slow_phase_of_the_machine_falls_on_both_forms(monkeypatch):
    """F.linear is truly faster here (1.0 vs 1.1), and the machine runs 4x slower for the first
    35% of the calls (another process on the cores).  Timing one form after the other would
    charge the slow phase to the first one; interleaved trials charge both alike."""
    total = [0]

    def cost(form, n):
        base = 1.0 if form == "plain" else 1.1
        return base * (4.0 if n < 0.35 * total[0] else 1.0)

    rows = len(cpu_linear.TIMED_ROWS)
    total[0] = 2 * rows * (cpu_linear.TRIALS + 1)  # warm-up + trials, both forms
    machine = FakeMachine(monkeypatch, cost)
    assert _choose(machine) == cpu_linear.PLAIN
    assert machine.calls == total[0]


def test_the_form_follows_the_geometric_mean_over_row_counts():
    rows = (1, 5, 16)
    # packed 20% slower at 1 row, 40% faster at 5 and 16: packed
    med = {(1, "plain"): 1.0, (1, "packed"): 1.2, (5, "plain"): 2.0, (5, "packed"): 1.2,
           (16, "plain"): 3.0, (16, "packed"): 1.8}
    assert cpu_linear.choose_form(med) == cpu_linear.PACKED
    # packed 30% slower everywhere: plain
    assert cpu_linear.choose_form({(r, f): (1.3 if f == "packed" else 1.0) for r in rows
                                   for f in ("plain", "packed")}) == cpu_linear.PLAIN


def test_a_replaced_plain_weight_is_freed_before_the_next_is_packed(monkeypatch):
    """Peak memory while converting stays the timed sample over one copy of the model: once a
    shape's form is chosen, when a weight is packed, every weight packed before it has already
    been freed (here the sample is one weight per shape)."""
    import weakref

    from torch import nn

    model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 16)) for _ in range(3)])
    model.requires_grad_(False)
    alive_at_pack, earlier = [], []
    real_pack = cpu_linear.pack

    def pack(weight):
        alive_at_pack.append(sum(ref() is not None for ref in earlier))
        earlier.append(weakref.ref(weight))
        return real_pack(weight)

    monkeypatch.setattr(cpu_linear, "pack", pack)
    monkeypatch.setattr(cpu_linear, "choose_form_by_timing", lambda weights, packs: cpu_linear.PACKED)
    monkeypatch.setattr(cpu_linear, "timing_sample_size", lambda weight_bytes, count: 1)
    cpu_linear.accelerate(model)
    assert alive_at_pack == [0] * 6
    assert all(ref() is None for ref in earlier)


def test_forms_are_timed_on_enough_weights_to_leave_the_cache(monkeypatch):
    """A weight timed alone stays in the last-level cache (480 MiB on the Xeon of
    docs/benchmarks.md, more than a 110 MB gate/up matrix), where F.linear's 1-row kernel
    looked 30-70% faster than packed and timing chose it for the 1.5B's gate/up and down; in a
    pass, weights come from memory.  So a shape is timed over as many of its weights as twice
    the cache holds, each read once per sweep."""
    from torch import nn

    monkeypatch.setattr(cpu_linear, "last_level_cache_bytes", lambda: 10 * 32 * 16 * 4)
    assert cpu_linear.timing_sample_size(32 * 16 * 4, 100) == 20
    assert cpu_linear.timing_sample_size(32 * 16 * 4, 7) == 7
    assert cpu_linear.timing_sample_size(10**9, 7) == 1
    model = nn.Sequential(*[nn.Linear(16, 32) for _ in range(30)], nn.Linear(32, 8))
    timed = {}
    monkeypatch.setattr(cpu_linear, "choose_form_by_timing",
                        lambda weights, packs: timed.setdefault(tuple(weights[0].shape), len(packs))
                        and cpu_linear.PACKED)
    cpu_linear.accelerate(model)
    assert timed == {(32, 16): 20, (8, 32): 1}
    swept = []
    monkeypatch.setattr(cpu_linear, "packed_linear", lambda x, p, bias=None: swept.append(p))
    weights = [torch.randn(32, 16) for _ in range(3)]
    cpu_linear.measure(weights, ["a", "b", "c"], rows_list=(1,), trials=1)
    assert swept == ["a", "b", "c"] * 2  # warm-up and one trial, each a sweep over all weights
