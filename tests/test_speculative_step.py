"""One speculative step in detail: tensors on the logits' device, the draft's catch-up within the
step budget, counters that stop where the output stops, stop strings inside an accepted run,
and coupled sampling whose text does not depend on the draft length."""

from __future__ import annotations

import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from spec_harness import Engine

PROMPTS = [[5, 17, 33], list(range(40, 75)), [7] * 11, list(range(100, 123)), [3, 9], [250, 30, 31, 2, 8]]


@pytest.fixture(scope="module")
def target(tiny_model_factory):
    return tiny_model_factory("llama", seed=0)


class RequireExplicitDevice(TorchFunctionMode):
    """Records every tensor factory called from faser_sgl code without an explicit ``device=``.
    On a CPU-only machine that is the only trace of a tensor that would land on the CPU while
    the logits live on a GPU (the kernels would then get host pointers, or torch would refuse
    to mix devices)."""

    FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full,
                 torch.arange, torch.rand, torch.randn, torch.randint, torch.linspace, torch.eye}

    def __init__(self):
        super().__init__()
        self.offenders: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FACTORIES and "device" not in kwargs:
            caller = sys._getframe(1)
            if "/faser_sgl/" in caller.f_code.co_filename:
                self.offenders.add(f"{caller.f_code.co_filename}:{caller.f_lineno} torch.{func.__name__}")
        return func(*args, **kwargs)


def test_every_tensor_a_step_creates_names_its_device(target, partial_draft_path):
    """Greedy, rejection-sampled and coupled-sampled requests, with partial acceptance, through
    whole speculative steps: no factory call in faser_sgl leaves the device to chance."""
    for scheme in ("rejection", "coupled"):
        engine = Engine(target, partial_draft_path, k=3, sampling_scheme=scheme)
        reqs = [engine.make_request(p, 12, temperature=t, sampling_seed=i)
                for i, (p, t) in enumerate(zip(PROMPTS, [0, 0.8, 1.0, 0, 0.7, 1.2]))]
        mode = RequireExplicitDevice()
        with mode:
            engine.run(reqs)
        assert engine.generator.num_accepted > 0 and engine.generator.num_verify_steps > 0
        assert not mode.offenders, sorted(mode.offenders)


def test_the_checker_sees_an_implicit_device():
    """The wrapper is not blind: a factory without device= from faser_sgl code is caught."""
    from faser_sgl.kernels import accept_reject

    mode = RequireExplicitDevice()
    with mode:
        accept_reject.make_uniforms(torch.tensor([0, 2], device="cpu"), [None])
        torch.zeros(3)  # from the test file itself: not faser_sgl code, not recorded
    assert not mode.offenders
    with mode:
        # to_fixed_point is faser_sgl code; FIXED_POINT_SCALE is a float, so force a factory.
        exec(compile("import torch\ntorch.zeros(2)\n", "/x/faser_sgl/fake.py", "exec"))
    assert any("fake.py" in o for o in mode.offenders)


def test_draft_catch_up_stays_within_the_step_budget(target, partial_draft_path):
    """After a 300-token prompt (prefilled in 64-token chunks) the draft model has seen nothing;
    catching it up must also go in passes of at most the step budget, not one 300-token pass."""
    budget = 64
    prompt = [(i * 37) % 500 + 3 for i in range(300)]
    reference = Engine(target, None, max_step_tokens=budget)
    expected = reference.run([reference.make_request(prompt, 48, temperature=0)])
    engine = Engine(target, partial_draft_path, k=3, max_step_tokens=budget)
    draft_passes: list[int] = []
    forward = engine.generator.draft.forward
    engine.generator.draft.forward = lambda feeds, slots: draft_passes.append(sum(map(len, feeds))) or forward(feeds, slots)
    assert engine.run([engine.make_request(prompt, 48, temperature=0)]) == expected
    assert draft_passes and max(draft_passes) <= budget, draft_passes
    assert sum(draft_passes) >= len(prompt)  # the whole prompt was fed, in chunks
    assert engine.generator.num_verify_steps > 0


def test_a_catch_up_pass_lasts_about_two_target_steps(target, partial_draft_path):
    """The catch-up budget follows the measured pass costs: where the draft prefills at a real
    cost per token (a CPU), a pass over a new prompt is cut to what runs in twice the step's
    target pass; where a pass costs the same whatever its size (a GPU), the whole step budget."""
    from faser_sgl.speculative.adaptive import CostCurve

    engine = Engine(target, partial_draft_path, k=3, max_step_tokens=2048)
    gen = engine.generator
    cpu = {"target": CostCurve(0.3, 0.012), "draft": CostCurve(0.12, 0.0075)}
    gpu = {"target": CostCurve(0.02, 0.00001), "draft": CostCurve(0.005, 0.000001)}
    for costs in (cpu, gpu):
        for model, curve in costs.items():
            for n in (1, 4, 64, 1024):
                curve.observe(n, curve.prior[0] + curve.prior[1] * n)
    gen.pass_costs = cpu
    # A 4-request step: target 0.35 s, so at most 0.7 s of draft catch-up: 64 tokens (0.59 s).
    assert gen._catch_up_budget(4) == 64
    gen.pass_costs = gpu
    assert gen._catch_up_budget(4) == 2048


def test_retraction_resets_the_draft_and_its_catch_up_is_chunked_too(target, partial_draft_path):
    """A pool too small for every request at once forces retraction; each retracted request's
    draft cache restarts from zero, and its catch-up obeys the budget as well."""
    budget = 24
    prompts = [[(i * 13 + j * 7) % 400 + 3 for j in range(40)] for i in range(4)]
    reference = Engine(target, None, max_step_tokens=budget)
    expected = reference.run([reference.make_request(p, 30, temperature=0) for p in prompts])
    engine = Engine(target, partial_draft_path, k=3, slots=150, max_running=4, max_step_tokens=budget,
                    test_retract_interval=3)  # admission avoids retraction; force some
    draft_passes: list[int] = []
    forward = engine.generator.draft.forward
    engine.generator.draft.forward = lambda feeds, slots: draft_passes.append(sum(map(len, feeds))) or forward(feeds, slots)
    assert engine.run([engine.make_request(p, 30, temperature=0) for p in prompts]) == expected
    assert engine.planner.num_retractions > 0
    assert max(draft_passes) <= budget


def _whole_catch_up(engine):
    """The draft catches up on a prompt in one pass, so that every step after the first token
    verifies (the invariant below counts on it; the budget has its own tests)."""
    engine.generator.MIN_CATCH_UP_TOKENS = 1 << 20
    return engine


def _tokens_per_pass_invariant(req) -> None:
    """With fixed K and nothing but verification steps after the first token, every output token
    is either an accepted draft or the one token its verification pass adds."""
    assert len(req.output_ids) == 1 + req.spec_accepted_drafts + req.spec_verify_ct
    assert req.spec_accepted_drafts <= req.spec_drafted_tokens


def test_counters_stop_where_a_stop_token_cuts_an_accepted_run(target):
    """An identical draft accepts every draft; a stop token in the middle of a run ends the output
    there, and the drafts after it must not count as accepted."""
    reference = Engine(target, None)
    prompt = list(range(40, 60))
    full = reference.run([reference.make_request(prompt, 40, temperature=0)])[0]
    cuts = 0
    for stop_at in range(3, 16):
        stop_tok = full[stop_at]
        if stop_tok in full[:stop_at]:
            continue
        engine = _whole_catch_up(Engine(target, target, k=4))
        req = engine.make_request(prompt, 40, temperature=0, stop_token_ids=[stop_tok])
        engine.run([req])
        assert req.output_ids == full[: stop_at + 1]
        _tokens_per_pass_invariant(req)
        gen = engine.generator
        assert (gen.num_accepted, gen.num_drafted, gen.num_verify_steps) == (
            req.spec_accepted_drafts, req.spec_drafted_tokens, req.spec_verify_ct)
        cuts += stop_at % 5 != 0  # stop inside a run of 5 tokens, not at its last one
    assert cuts >= 3


def test_stop_strings_meet_speculation(target, partial_draft_path):
    """A stop string found by decoding the text, inside a multi-token accepted run: output ends
    exactly where target-only decoding with the same stop string ends, counters stay honest."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target)
    reference = Engine(target, None, tokenizer=tok)
    checked = 0
    for prompt in PROMPTS:
        full = reference.run([reference.make_request(prompt, 30, temperature=0)])[0]
        text = tok.decode(full[6:], skip_special_tokens=True)
        stop = text.strip()[:3]
        if len(stop) < 2:
            continue
        expected = reference.run([reference.make_request(prompt, 30, temperature=0, stop=(stop,))])[0]
        assert len(expected) < 30
        for draft in (target, partial_draft_path):
            engine = _whole_catch_up(Engine(target, draft, k=4, tokenizer=tok))
            req = engine.make_request(prompt, 30, temperature=0, stop=(stop,))
            engine.run([req])
            assert req.output_ids == expected
            assert req.finished_reason == {"type": "stop", "matched": stop}
            assert req.spec_accepted_drafts + req.spec_verify_ct <= len(req.output_ids) - 1
            if draft == target:
                _tokens_per_pass_invariant(req)
        checked += 1
    assert checked >= 3


# -- coupled sampling ---------------------------------------------------------------------------

SAMPLED = {"temperature": 0.9, "top_p": 0.95}


def _seeded_outputs(engine: Engine, seeds, draft_lens=None, first: int = 0) -> list[list[int]]:
    """Request i (counted from ``first``) has seed seeds[i] and prompt PROMPTS[i % 6]."""
    reqs = [engine.make_request(PROMPTS[(first + i) % len(PROMPTS)], 20, sampling_seed=s, ignore_eos=True,
                                draft_len=None if draft_lens is None else draft_lens[i], **SAMPLED)
            for i, s in enumerate(seeds)]
    return engine.run(reqs)


def test_coupled_sampling_gives_the_same_text_whatever_k_batch_or_policy(target, partial_draft_path):
    seeds = list(range(12))
    target_only = _seeded_outputs(Engine(target, None, sampling_scheme="coupled"), seeds)
    assert len({tuple(o) for o in target_only}) == len(seeds)  # really sampled
    outputs = {}
    for k in (1, 3, 5):
        engine = Engine(target, partial_draft_path, k=k, sampling_scheme="coupled")
        outputs[k] = _seeded_outputs(engine, seeds)
        assert outputs[k] == target_only, k
        gen = engine.generator
        assert 0 < gen.num_accepted < gen.num_drafted
    # The adaptive policy: lengths vary per request and per step with its estimates.
    adaptive = Engine(target, partial_draft_path, k=4, policy="adaptive", sampling_scheme="coupled",
                      cost_profile="target=20+0.5,draft=1+0.1")
    assert _seeded_outputs(adaptive, seeds) == target_only
    assert adaptive.generator.num_verify_steps > 0
    # Ragged lengths in one batch, and each request alone.
    engine = Engine(target, partial_draft_path, k=4, sampling_scheme="coupled")
    assert _seeded_outputs(engine, seeds, draft_lens=[i % 6 for i in seeds]) == target_only
    for i in (0, 5):
        alone = Engine(target, partial_draft_path, k=2, max_running=1, sampling_scheme="coupled")
        assert _seeded_outputs(alone, [seeds[i]], first=i)[0] == target_only[i]


def test_rejection_sampling_text_depends_on_k(target, partial_draft_path):
    """Why coupled sampling exists: with the request's own stream, the draws depend on k."""
    seeds = list(range(12))
    by_k = [_seeded_outputs(Engine(target, partial_draft_path, k=k, sampling_scheme="rejection"), seeds)
            for k in (1, 3)]
    assert by_k[0] != by_k[1]


def test_seeded_coupled_scheme_only_couples_seeded_requests(target):
    engine = Engine(target, None, sampling_scheme="seeded-coupled")
    assert engine.make_request([1], 4, temperature=1.0, sampling_seed=3).sampling.coupled
    assert not engine.make_request([1], 4, temperature=1.0).sampling.coupled
    assert not engine.make_request([1], 4, temperature=0, sampling_seed=3).sampling.coupled
    with pytest.raises(ValueError, match="sampling scheme"):
        Engine(target, None, sampling_scheme="bogus").make_request([1], 4, temperature=1.0)


def _count_draft_passes(engine) -> list[int]:
    calls = []
    forward = engine.generator.draft.forward
    engine.generator.draft.forward = lambda feeds, slots: calls.append(len(feeds)) or forward(feeds, slots)
    return calls


def test_a_step_carrying_a_prefill_drafts_nothing(target, partial_draft_path):
    """Under speculation a new request's prefill shares the step with the decodes, which feed
    only their newest token: no draft passes and no verification rows stand before the new
    prompt's first token, and the decodes still advance one token (so arrivals cannot starve
    them).  The next step drafts again."""
    engine = _whole_catch_up(Engine(target, partial_draft_path, k=3))
    running = engine.make_request(PROMPTS[1], 30, temperature=0)
    engine.planner.add(running)
    engine.step()  # its prefill
    engine.step()  # a speculative step
    assert engine.generator.num_verify_steps == 1
    newcomer = engine.make_request(PROMPTS[0], 4, temperature=0)
    engine.planner.add(newcomer)
    draft_calls = _count_draft_passes(engine)
    before, verified = len(running.output_ids), engine.generator.num_verify_steps
    engine.step()
    assert len(newcomer.output_ids) == 1 and len(running.output_ids) == before + 1
    assert not draft_calls and engine.generator.num_verify_steps == verified
    engine.step()
    assert draft_calls and engine.generator.num_verify_steps > verified
    # Without speculation nothing changes: prefill and decodes share a step, as before.
    plain = Engine(target, None)
    first = plain.make_request(PROMPTS[1], 30, temperature=0)
    plain.planner.add(first)
    plain.step()
    plain.planner.add(plain.make_request(PROMPTS[0], 4, temperature=0))
    chunks = plain.planner.plan()
    assert len(chunks) == 2
    for c in chunks:
        plain.planner.take_back(c)


@pytest.mark.parametrize("frontier_size,yield_at", [(0, 1), (0, 2), (0, 3), (2, 1), (2, 2)],
                         ids=["serial-1", "serial-2", "serial-3", "pipeline-1", "pipeline-2"])
def test_a_preempted_draft_phase_changes_nothing_but_time(target, partial_draft_path, frontier_size, yield_at):
    """should_yield() True before the yield_at-th draft pass (1 = before the catch-up pass)
    abandons the step: no token is emitted, the KV pool and every request's state are as before
    the step (the draft's catch-up on committed tokens is kept), and the run goes on to the
    target-only text with every slot back in the pool.  Pipelined (frontiers of 2): the first
    frontier's two passes are the preemptible ones."""
    reference = Engine(target, None).run([Engine(target, None).make_request(p, 16, temperature=0)
                                          for p in PROMPTS[:3]])
    engine = _whole_catch_up(Engine(target, partial_draft_path, k=3, frontier_size=frontier_size))
    reqs = [engine.make_request(p, 16, temperature=0) for p in PROMPTS[:3]]
    for r in reqs:
        engine.planner.add(r)
    engine.step()  # prefills
    engine.step()  # one speculative step
    free = engine.runner.allocator.num_free
    state = [(list(r.output_ids), list(r.kv_slots)) for r in reqs]
    calls = _count_draft_passes(engine)
    engine.generator.should_yield = lambda: len(calls) + 1 >= yield_at
    assert engine.step() == []
    assert len(calls) == yield_at - 1 and engine.generator.num_preempted_steps == 1
    assert engine.runner.allocator.num_free == free
    assert [(r.output_ids, r.kv_slots) for r in reqs] == state
    assert all(r.draft_cached <= len(r.kv_slots) for r in reqs)  # never past its cache
    engine.generator.should_yield = None
    while engine.planner.has_work():
        engine.step()
    assert [r.output_ids for r in reqs] == reference
    assert engine.runner.allocator.num_free == engine.runner.allocator.num_total
