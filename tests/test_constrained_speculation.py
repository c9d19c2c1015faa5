"""Constrained decoding (xgrammar) under speculation stays lossless: the draft proposes under
the grammar, each verified position is the target's distribution masked by the grammar state
after the drafts before it, and the matcher rolls back what was rejected.  Greedy: the same
text as target-only constrained decoding, for every policy, the pipeline and early exit.
Sampling: the law of a verified token is the masked target's."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict

import pytest
import torch
from transformers import AutoTokenizer

from faser_sgl.executor.forward_batch import ForwardBatch
from faser_sgl.managers.grammar import GrammarBackend
from faser_sgl.offline_engine import OfflineEngine
from test_speculative_sampling import chi2_sf, stratified_chi2

REGEX = r"(red|green|blue|the [a-z]+) [0-9]{1,3}"
SCHEMA = json.dumps({"type": "object", "additionalProperties": False, "required": ["answer", "count"],
                     "properties": {"answer": {"enum": ["yes", "no"]},
                                    "count": {"type": "integer", "minimum": 0, "maximum": 999}}})
PROMPTS = [[5, 17, 42, 9, 88], [300, 12, 5, 5, 6, 19], [41, 7, 7, 64, 250, 11, 301]]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(scope="module")
def backend(tokenizer, tiny_model_path):
    config = json.load(open(f"{tiny_model_path}/config.json"))
    return GrammarBackend(tokenizer, config["vocab_size"], [0, 2])


def run_constrained(engine, backend, kind, spec, new=40, **sampling):
    """The constrained requests, batched with an unconstrained one (returned last)."""
    reqs = [engine.make_request(p, new, stop_token_ids=[0, 2], grammar=backend.new_state(kind, spec),
                                **({"temperature": 0.0} | sampling)) for p in PROMPTS]
    free = engine.make_request(PROMPTS[0][::-1], new, stop_token_ids=[0, 2], temperature=0.0)
    engine.run(reqs + [free])
    return reqs + [free]


CASES = {
    "fixed": dict(policy="fixed"),
    "fixed-pipeline": dict(policy="fixed", frontier_size=1, pipeline_split=0),
    "fixed-exit": dict(policy="fixed", early_exit=True,
                       exit_options={"layers": "1", "threshold": 0.0, "draft_prob": float("inf")}),
    "adaptive": dict(policy="adaptive"),
    "faser": dict(policy="faser"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_constrained_output_is_the_targets(tiny_model_path, partial_draft_path, backend, tokenizer, case):
    plain = OfflineEngine(tiny_model_path, policy="none", kv_slots=2048)
    spec = OfflineEngine(tiny_model_path, partial_draft_path, num_draft_tokens=3, kv_slots=2048, **CASES[case])
    for kind, text in (("regex", REGEX), ("json_schema", SCHEMA)):
        ref = run_constrained(plain, backend, kind, text)
        got = run_constrained(spec, backend, kind, text)
        for r, g in zip(ref, got):
            assert g.output_ids == r.output_ids
            out = tokenizer.decode(g.output_ids, skip_special_tokens=True)
            if g.grammar is not None and g.finished_reason["type"] == "stop":  # ended by the grammar, not the length
                if kind == "regex":
                    assert re.fullmatch(REGEX, out), out
                else:
                    data = json.loads(out)
                    assert data["answer"] in ("yes", "no") and 0 <= data["count"] <= 999
    assert spec.runner.allocator.num_free == spec.runner.allocator.num_total
    if case.startswith("fixed"):
        assert spec.generator.num_drafted > 0


def masked_target_probs(engine, backend, spec, prompt, output, params):
    """The target's distribution after prompt + output, masked by the grammar after output."""
    seq = prompt + output
    slots = engine.runner.allocator.alloc(len(seq))
    try:
        logits = engine.runner.forward(ForwardBatch.build([seq], [slots], [[len(seq) - 1]]))
    finally:
        engine.runner.allocator.free(slots)
    state = backend.new_state("regex", spec)
    state.commit(output)
    logits = logits.clone().masked_fill(~state.mask(), float("-inf"))
    opts = engine.make_request(seq, 1, **params).sampling
    return engine.sampler.probs(logits, [opts], [output])[0].double()


def test_sampled_verified_tokens_follow_the_masked_target(tiny_model_path, backend):
    """Rejection sampling under a grammar: token 2 (a verified draft position) given token 1
    follows the masked target's law (chi-square stratified by token 1)."""
    from conftest import PARTIAL_DRAFT
    from tiny_model import get_tiny_model

    draft = get_tiny_model(**{**PARTIAL_DRAFT, "noise_std": 0.05})
    params = {"temperature": 1.0, "top_k": 4}
    spec = r"[a-z ]{2,12}"
    engine = OfflineEngine(tiny_model_path, draft, policy="fixed", num_draft_tokens=2, kv_slots=16384)
    engine.generator.MIN_CATCH_UP_TOKENS = 1 << 20
    engine.generator.DRAFT_BESIDE_PREFILL = True  # token 2 of every request is a verified draft
    prompt = [11, 12, 13]
    n = 1200
    reqs = [engine.make_request(prompt, 3, stop_token_ids=[0, 2], sampling_seed=500 + i,
                                grammar=backend.new_state("regex", spec), **params) for i in range(n)]
    engine.run(reqs)
    assert engine.generator.num_drafted > n // 2 and engine.generator.num_accepted < engine.generator.num_drafted
    by_first = defaultdict(Counter)
    for r in reqs:
        if len(r.output_ids) >= 2:
            by_first[r.output_ids[0]][r.output_ids[1]] += 1
    strata = {}
    for first, observed in by_first.items():
        p = masked_target_probs(engine, backend, spec, prompt, [first], params)
        strata[first] = (observed, {t: float(p[t]) for t in torch.nonzero(p).flatten().tolist()})
    stat, dof = stratified_chi2(strata)
    assert dof > 3
    assert chi2_sf(stat, dof) > 1e-3, (stat, dof)
