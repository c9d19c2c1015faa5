"""executor/cpu_linear.py: the row-count-aware CPU linear gives F.linear's results (up to float32
rounding) on every path, converts every projection and the LM head, and keeps greedy output
identical to Hugging Face float32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from faser_sgl.executor import cpu_linear

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="torch without oneDNN")

ALL_ROWS = frozenset(cpu_linear.TIMED_ROWS)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("packed_rows", [frozenset(), ALL_ROWS], ids=["plain", "packed"])
def test_packed_linear_matches_f_linear(bias, packed_rows):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 80, generator=gen)
    b = torch.randn(96, generator=gen) if bias else None
    layer = cpu_linear.PackedLinear(weight, b, packed_rows)
    for rows in (1, 2, 3, 5, 8, 16, 17, 40):
        x = torch.randn(rows, 80, generator=gen)
        torch.testing.assert_close(layer(x), F.linear(x, weight, b), rtol=1e-5, atol=1e-5)
    x3 = torch.randn(2, 3, 80, generator=gen)  # leading dims are kept
    torch.testing.assert_close(layer(x3), F.linear(x3, weight, b), rtol=1e-5, atol=1e-5)
    strided = torch.randn(5, 160, generator=gen)[:, ::2]  # a non-contiguous input
    torch.testing.assert_close(layer(strided), F.linear(strided, weight, b), rtol=1e-5, atol=1e-5)


def test_the_packed_path_really_runs_where_chosen(monkeypatch):
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    layer = cpu_linear.PackedLinear(torch.randn(32, 16), None, frozenset({5}))
    monkeypatch.setattr(cpu_linear.torch.ops.mkldnn, "_linear_pointwise",
                        lambda *a: calls.append(a[0].shape[0]) or real(*a), raising=False)
    for rows in (1, 5, 8, 40):
        layer(torch.randn(rows, 16))
    assert calls == [5, 40]  # 5 was chosen; 40 is above the timed range


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_every_projection_and_the_lm_head_are_converted_and_greedy_output_is_unchanged(
        tiny_model_factory, arch, monkeypatch):
    from faser_sgl.executor.model_runner import ModelRunner
    from reference import hf_greedy, load_hf_model
    from spec_harness import Engine

    path = tiny_model_factory(arch, seed=0)
    # Force the packed path at every row count, whatever the timing says on this machine.
    monkeypatch.setattr(cpu_linear, "choose_paths", lambda weight, packed: ALL_ROWS)
    runner = ModelRunner(path, max_total_tokens=64)
    linears = [m for m in runner.model.modules() if isinstance(m, torch.nn.Linear)]
    assert not linears
    assert isinstance(runner.model.logits_linear, cpu_linear.PackedLinear)
    assert all(rows == ALL_ROWS for rows in runner.linear_plan.values())
    assert runner.linear_plan and len(runner.linear_plan) >= 4
    off = ModelRunner(path, max_total_tokens=64, cpu_linear="off")
    assert off.linear_plan is None and off.model.logits_linear is None

    hf = load_hf_model(path)
    engine = Engine(path, None)
    prompts = [[5, 17, 33], list(range(40, 75)), [7] * 11]
    expected = [hf_greedy(hf, p, 12) for p in prompts]
    assert engine.run([engine.make_request(p, 12, temperature=0) for p in prompts]) == expected


def test_float32_cpu_only(tiny_model_factory):
    from faser_sgl.executor.model_runner import ModelRunner

    path = tiny_model_factory("llama", seed=0)
    assert ModelRunner(path, max_total_tokens=16, dtype=torch.bfloat16).linear_plan is None
    with pytest.raises(ValueError, match="cpu_linear"):
        ModelRunner(path, max_total_tokens=16, cpu_linear="fast")


def test_untimed_row_counts_follow_the_next_timed_count():
    """Only some row counts are timed at start-up; the others must not fall back to F.linear by
    default (10 rows once cost twice what 12 did on the Xeon VM): each follows the next timed
    count above it."""
    timed = frozenset({5, 8, 12})  # the packed path won at these timed counts
    chosen = cpu_linear.fill_untimed(timed)
    assert {7, 9, 10, 11}.issubset(chosen)  # 7 follows 8; 9-11 follow 12
    assert not {13, 14, 15} & chosen  # 16 chose F.linear
    assert not {1, 2, 3, 4, 6} & chosen  # timed counts keep their own choice; 6 is timed
    assert cpu_linear.fill_untimed(frozenset()) == frozenset()
    # A real choice covers every count 1..16 consistently.
    weight = torch.randn(64, 32)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, cpu_linear.PACK_ROWS)
    real = cpu_linear.choose_paths(weight, packed)
    for rows in range(1, cpu_linear.TIMED_ROWS[-1] + 1):
        if rows not in cpu_linear.TIMED_ROWS:
            above = min(t for t in cpu_linear.TIMED_ROWS if t > rows)
            assert (rows in real) == (above in real), rows
