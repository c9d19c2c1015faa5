"""Logprobs (SGLang's input/output/top/token-id logprobs) against Hugging Face's float32 forward,
and unchanged by speculation, the frontier pipeline, chunked prefill and the prefix cache."""

from __future__ import annotations

import pytest
import torch

from faser_sgl.offline_engine import OfflineEngine
from reference import load_hf_model

PROMPT = [5, 17, 42, 9, 88, 120, 33, 7, 64, 250, 11, 301, 47, 2 + 90, 18, 77, 5, 17, 42, 9]
NEW = 10
TOP = 4
IDS = [3, 10, 99]
ATOL = 2e-4  # float32 rows of a 1-token pass vs a K-token verification differ in the last bits


@pytest.fixture(scope="module")
def hf(tiny_model_path):
    return load_hf_model(tiny_model_path)


def run(engine, prompt, new, start_len, **kw):
    req = engine.make_request(prompt, new, temperature=0.0,
                              logprobs={"start_len": start_len, "top_num": TOP, "token_ids": IDS}, **kw)
    engine.run([req])
    return req


@torch.inference_mode()
def hf_logprobs(hf, ids):
    logits = hf(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def test_input_and_output_logprobs_match_the_reference(tiny_model_path, hf):
    # A small step budget: the prompt is prefilled in chunks, its input rows over several steps.
    engine = OfflineEngine(tiny_model_path, policy="none", kv_slots=512, max_step_tokens=6)
    start = 3
    req = run(engine, PROMPT, NEW, start)
    out = req.output_ids
    assert len(out) == NEW
    ref = hf_logprobs(hf, PROMPT + out)
    state = req.logprobs
    # Input: SGLang's shape, one entry per token of prompt[start:], the logprob of token p
    # given the tokens before it (here start > 0, so the first entry has one too).
    assert [e.token for e in state.inputs] == PROMPT[start:]
    for i, e in enumerate(state.inputs, start=start):
        assert e.value == pytest.approx(ref[i - 1, PROMPT[i]].item(), abs=ATOL)
        top = ref[i - 1].topk(TOP)
        assert e.top_ids == top.indices.tolist()
        assert e.top_values == pytest.approx(top.values.tolist(), abs=ATOL)
        assert e.chosen_values == pytest.approx(ref[i - 1, IDS].tolist(), abs=ATOL)
    # Output: token j is the greedy choice at row len(prompt) - 1 + j, with its logprob there.
    assert [e.token for e in state.outputs] == out
    for j, e in enumerate(state.outputs):
        row = ref[len(PROMPT) - 1 + j]
        assert out[j] == int(row.argmax())
        assert e.value == pytest.approx(row[out[j]].item(), abs=ATOL)
        assert e.top_ids[0] == out[j]
        assert e.chosen_values == pytest.approx(row[IDS].tolist(), abs=ATOL)


@pytest.mark.parametrize("policy", ["none", "fixed"])
def test_prefill_only_request_scores_the_prompt(tiny_model_path, partial_draft_path, hf, policy):
    """max_new_tokens=0 with logprob_start_len=0 (how sgl.select scores its choices): the prompt
    is computed, every token after the first gets a logprob, nothing is generated; with chosen
    token ids asked for, the prompt's last row gives one output entry (SGLang's next-token row,
    which its /v1/score reads), with and without speculation."""
    draft = partial_draft_path if policy != "none" else None
    engine = OfflineEngine(tiny_model_path, draft, policy=policy, kv_slots=512)
    req = run(engine, PROMPT, 0, 0)
    assert req.output_ids == [] and req.finished_reason["type"] == "length"
    ref = hf_logprobs(hf, PROMPT)
    values = [e.value for e in req.logprobs.inputs]
    assert values[0] is None and len(values) == len(PROMPT)
    assert values[1:] == pytest.approx([ref[i - 1, PROMPT[i]].item() for i in range(1, len(PROMPT))], abs=ATOL)
    [next_row] = req.logprobs.outputs
    assert next_row.chosen_values == pytest.approx(ref[len(PROMPT) - 1, IDS].tolist(), abs=ATOL)
    assert engine.runner.allocator.num_free == engine.runner.allocator.num_total


@pytest.mark.parametrize("policy,frontier", [("fixed", 0), ("fixed", 1), ("adaptive", 0), ("faser", 0)])
def test_logprobs_unchanged_by_speculation(tiny_model_path, partial_draft_path, policy, frontier):
    plain = OfflineEngine(tiny_model_path, policy="none", kv_slots=1024)
    spec = OfflineEngine(tiny_model_path, partial_draft_path, policy=policy, num_draft_tokens=3,
                         kv_slots=1024, frontier_size=frontier, pipeline_split=0 if frontier else None)
    prompts = [PROMPT, PROMPT[5:] + [7, 7, 8], [300, 12, 5, 5, 6, 19, 200, 41]]
    for prompt in prompts:
        a, b = run(plain, prompt, 16, 2), run(spec, prompt, 16, 2)
        assert b.output_ids == a.output_ids
        assert len(a.logprobs.inputs) == len(prompt) - 2
        for ea, eb in zip(a.logprobs.outputs + a.logprobs.inputs, b.logprobs.outputs + b.logprobs.inputs):
            assert (eb.token, eb.top_ids) == (ea.token, ea.top_ids)
            assert eb.value == pytest.approx(ea.value, abs=ATOL)
            assert eb.chosen_values == pytest.approx(ea.chosen_values, abs=ATOL)
        assert len(b.logprobs.outputs) == len(b.output_ids)
    if policy == "fixed":  # (the cost-aware policies may rightly not draft on the tiny pair)
        assert spec.generator.num_accepted > 0  # drafts were accepted: tokens came from them
    assert spec.runner.allocator.num_free == spec.runner.allocator.num_total


def test_sampled_logprobs_use_the_temperature(tiny_model_path, hf):
    """Sampled output: the logprob is of the temperature-scaled target distribution."""
    engine = OfflineEngine(tiny_model_path, policy="none", kv_slots=512)
    req = engine.make_request(PROMPT, 6, temperature=0.7, sampling_seed=3,
                              logprobs={"start_len": -1, "top_num": 0, "token_ids": None})
    engine.run([req])
    ref = hf_logprobs(hf, PROMPT + req.output_ids)
    assert req.logprobs.inputs == []
    for j, e in enumerate(req.logprobs.outputs):
        row = torch.log_softmax(torch.log_softmax(ref[len(PROMPT) - 1 + j], -1) / 0.7, -1)
        assert e.value == pytest.approx(row[req.output_ids[j]].item(), abs=ATOL)
        assert e.top_ids is None and e.chosen_values is None
