"""The speculative step on a GPU (skipped without CUDA): the CPU tests check that every tensor
the step creates names its device (test_speculative_step.py); this runs the same step where a
tensor on the wrong device would fail: greedy, rejection-sampled and coupled-sampled requests,
ragged draft lengths, with the torch attention backend in float32 and FlashInfer in bfloat16.

Then the shipped combination, end to end (issue 24, defect 4): the faser policy with the frontier
pipeline and early exit, whose truncations re-plan the attention backend mid-pass; lossless in
float32 against target-only greedy, FlashInfer in bfloat16 in-process, and a bf16 FlashInfer
server over HTTP.  ``scripts/gpu_check.sh --dry-run`` rehearses these on a CPU
(FASER_GPU_CHECK_REHEARSAL=1: the torch backend stands in for FlashInfer, float32 on the CPU);
without CUDA and that variable they are skipped like the rest.

FlashInfer runs the head_dim 64 tiny pair (conftest.head_dim64_pair): its FA2 prefill kernels
refuse the default tiny models' head_dim 16."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from faser_sgl.executor.forward_batch import ForwardBatch
from spec_harness import Engine

ON_CUDA = torch.cuda.is_available()
REHEARSAL = not ON_CUDA and os.environ.get("FASER_GPU_CHECK_REHEARSAL") == "1"

PROMPTS = [[5, 17, 33], list(range(40, 75)), [7] * 11, list(range(100, 123)), [3, 9], [250, 30, 31, 2, 8]]
DEVICE = "cuda" if ON_CUDA else "cpu"

# The combination's knobs.  Frontiers of 2 with k=4 pipeline every step with 3+ drafts; a pass
# cost dominated by its fixed part makes long drafts pay; pruning by the lens rule alone
# (cost_model None) truncates wherever the rule predicts a rejection, where the faser policy's
# own cost model would prune only when it pays (which depends on timings).  How many drafts the
# faser drafter picks still depends on what it has seen (on some runs it stops drafting after its
# first pruned step), so each test runs it beside fixed K=4 with the same pipeline and exit rule,
# which pipelines and truncates on every step: correctness is required of both, the mechanics
# (pipelined steps, re-plans after truncation) of the pair.
COST_PROFILE = "target=100+10,draft=1+0.1"
EXIT_BY_RULE = {"cost_model": None, "layers": "2", "threshold": 1.0}
POLICIES = ("faser", "fixed")


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
@pytest.mark.cuda
@pytest.mark.skipif(not ON_CUDA, reason="no CUDA device")
def test_speculative_step_on_cuda(tiny_model_factory, partial_draft_path, head_dim64_pair, backend, dtype):
    target, draft = (tiny_model_factory("llama", seed=0), partial_draft_path) if backend == "torch" \
        else head_dim64_pair
    kw = dict(device="cuda", attention_backend=backend, dtype=dtype)
    reference = Engine(target, None, **kw)
    assert reference.runner.device.index is not None  # "cuda" became "cuda:N" in the executor too
    expected = reference.run([reference.make_request(p, 16, temperature=0) for p in PROMPTS])
    for scheme in ("rejection", "coupled"):
        engine = Engine(target, draft, k=4, sampling_scheme=scheme, **kw)
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


# -- the shipped combination ---------------------------------------------------------------------

def combination_engine(target, draft, policy, **kw):
    return Engine(target, draft, k=4, policy=policy, frontier_size=2,
                  cost_profile=COST_PROFILE if policy == "faser" else None,
                  early_exit=True, exit_options=EXIT_BY_RULE, device=DEVICE, **kw)


def count_replans(engine, monkeypatch) -> list[int]:
    """Calls of the target's attention plan on a batch that early exit truncated mid-pass
    (the re-plan FlashInfer needs there): each appends the truncated batch's size."""
    truncated: set[int] = set()
    original = ForwardBatch.truncate

    def truncate(self, new_q):
        cut = original(self, new_q)
        truncated.add(id(cut))
        return cut

    monkeypatch.setattr(ForwardBatch, "truncate", truncate)
    replans: list[int] = []
    plan = engine.runner.attn.begin_forward

    def counting_plan(batch):
        if id(batch) in truncated:
            replans.append(batch.batch_size)
        return plan(batch)

    monkeypatch.setattr(engine.runner.attn, "begin_forward", counting_plan)
    return replans


def assert_combination_ran(runs: dict):
    """runs: policy -> (engine, replans).  Prints what each policy did (the GPU check's log)."""
    for policy, (engine, replans) in runs.items():
        gen = engine.generator
        assert gen.policy.name == policy
        print(f"{policy}: pipelined steps {gen.num_pipelined_steps}, rows pruned "
              f"{gen.early_exit.stats.as_dict()['rows_pruned']}, re-plans after truncation {len(replans)}, "
              f"modes {dict(gen.controller.choices)}, splits {[s.name for s in gen.splits]}, "
              f"drafts accepted {gen.num_accepted}/{gen.num_drafted}")
    # The perturbed draft agrees with the target often but not always: some drafts are accepted
    # and some rejected, so both the accept and the rollback paths run.
    assert any(0 < e.generator.num_accepted < e.generator.num_drafted for e, _ in runs.values())
    assert sum(e.generator.num_pipelined_steps for e, _ in runs.values()) > 0
    assert sum(e.generator.early_exit.stats.as_dict()["rows_pruned"] for e, _ in runs.values()) > 0
    assert any(replans for _, replans in runs.values()), "no attention re-plan after an early-exit truncation"


@pytest.mark.cuda
@pytest.mark.skipif(not (ON_CUDA or REHEARSAL), reason="no CUDA device (FASER_GPU_CHECK_REHEARSAL=1: on the CPU)")
def test_combination_is_lossless_in_float32(head_dim64_pair, monkeypatch):
    """Faser policy + pipeline + early-exit truncations, torch attention in float32 on the GPU:
    greedy output is target-only greedy output, token for token."""
    target, draft = head_dim64_pair
    reference = Engine(target, None, device=DEVICE)
    expected = reference.run([reference.make_request(p, 24, temperature=0) for p in PROMPTS])
    runs = {}
    for policy in POLICIES:
        engine = combination_engine(target, draft, policy)
        runs[policy] = (engine, count_replans(engine, monkeypatch))
        outs = engine.run([engine.make_request(p, 24, temperature=0) for p in PROMPTS])
        assert outs == expected, policy
    assert_combination_ran(runs)


@pytest.mark.cuda
@pytest.mark.skipif(not (ON_CUDA or REHEARSAL), reason="no CUDA device (FASER_GPU_CHECK_REHEARSAL=1: on the CPU)")
def test_combination_in_bfloat16_with_flashinfer(head_dim64_pair, monkeypatch):
    """The same in bfloat16 through FlashInfer (re-planned after each truncation): bf16 rounding
    differs between batch shapes, so the check is that it runs, frees every slot, and mostly
    agrees with FlashInfer's own target-only greedy output."""
    backend = "flashinfer" if ON_CUDA else "torch"  # the rehearsal's stand-in
    target, draft = head_dim64_pair
    kw = dict(attention_backend=backend, dtype=torch.bfloat16)
    reference = Engine(target, None, device=DEVICE, **kw)
    expected = reference.run([reference.make_request(p, 24, temperature=0, ignore_eos=True) for p in PROMPTS])
    runs = {}
    for policy in POLICIES:
        engine = combination_engine(target, draft, policy, **kw)
        runs[policy] = (engine, count_replans(engine, monkeypatch))
        outs = engine.run([engine.make_request(p, 24, temperature=0, ignore_eos=True) for p in PROMPTS])
        assert all(len(o) == 24 for o in outs)
        same = sum(a == b for o, e in zip(outs, expected) for a, b in zip(o, e))
        assert same >= 0.5 * 24 * len(PROMPTS), (policy, outs, expected)
    assert_combination_ran(runs)
    if ON_CUDA:
        pinned = os.environ.get("FASER_SGL_FLASHINFER_BACKEND", "auto")
        ran = engine.runner.attn.kernel_backend
        print(f"flashinfer kernel backend: {ran} (asked: {pinned})")
        assert ran in ("fa2", "fa3") and (pinned == "auto" or ran == pinned)


@pytest.fixture(scope="module")
def combination_server(head_dim64_pair, tmp_path_factory):
    from server_utils import start_server

    target, draft = head_dim64_pair
    backend = ["--faser-attention-backend", "flashinfer", "--faser-dtype", "bfloat16"] if ON_CUDA \
        else ["--faser-dtype", "float32"]  # the rehearsal: the CPU server, torch attention
    server = start_server(target, tmp_path_factory.mktemp("combination"), [
        "--max-total-tokens", "4096", "--speculative-policy", "faser",
        "--speculative-draft-model-path", draft, "--speculative-num-draft-tokens", "4",
        "--speculative-cost-profile", COST_PROFILE, "--faser-frontier-size", "2",
        "--faser-exit-layers", "1", "--faser-exit-threshold", "-3", "--faser-exit-draft-prob", "inf",
        *backend])
    yield server
    server.stop()


@pytest.mark.cuda
@pytest.mark.skipif(not (ON_CUDA or REHEARSAL), reason="no CUDA device (FASER_GPU_CHECK_REHEARSAL=1: on the CPU)")
def test_combination_server_smoke(combination_server, record_property):
    """The faser server as shipped on a GPU (FlashInfer, bfloat16, auto split), over HTTP:
    concurrent requests complete with their lengths and every slot comes back.  The faser
    policy prunes only where its cost model says so, so the counts are recorded, not required."""
    import requests

    def generate(prompt):
        r = requests.post(f"{combination_server.base_url}/generate", timeout=120, json={
            "input_ids": prompt, "sampling_params": {"max_new_tokens": 32, "temperature": 0, "ignore_eos": True}})
        assert r.status_code == 200, r.text
        return r.json()["output_ids"]

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        outs = list(pool.map(generate, PROMPTS * 2))
    assert all(len(o) == 32 for o in outs)
    assert outs[: len(PROMPTS)] == outs[len(PROMPTS):] or ON_CUDA  # bf16 may differ by batch shape
    state = combination_server.wait_kv_free()
    assert state["kv_used_slots"] == 0 and state["speculative_policy"] == "faser"
    splits = (state.get("spec_frontier_pipeline") or {})
    for key, value in (("pipelined_steps", state.get("spec_pipelined_steps")),
                       ("rows_pruned", (state.get("spec_early_exit") or {}).get("rows_pruned")),
                       ("frontier_pipeline", splits)):
        record_property(key, str(value))
        print(f"{key}: {value}")
