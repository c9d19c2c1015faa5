"""Constrained decoding state (faser_sgl.managers.grammar) on the tiny test tokenizer: walks over
the allowed tokens produce text the spec accepts; speculative advance / rollback / commit;
padding rows and termination; invalid specs."""

from __future__ import annotations

import json
import random
import re
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from faser_sgl.managers.grammar import GrammarBackend, GrammarError, GrammarState, apply_mask
from tiny_model import get_tiny_model

STOP_IDS = [2, 0]  # <|im_end|>, <|endoftext|>
PERSON = json.dumps({
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
})


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(get_tiny_model("llama", seed=0))


@pytest.fixture(scope="module")
def vocab_size(tokenizer):
    with open(f"{tokenizer.name_or_path}/config.json") as f:
        config = json.load(f)
    assert config["eos_token_id"] == 2 and tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    return config["vocab_size"]


@pytest.fixture(scope="module")
def backend(tokenizer, vocab_size):
    return GrammarBackend(tokenizer, vocab_size, STOP_IDS)


def allowed(mask: torch.Tensor) -> list[int]:
    return mask.nonzero().flatten().tolist()


def walk(state: GrammarState, pick, max_steps: int = 400) -> list[int]:
    """Emit pick(step, allowed ids) one token at a time (commit, as the scheduler does) until
    the grammar terminates; returns the emitted tokens, the stop token last."""
    out = []
    for step in range(max_steps):
        ids = allowed(state.mask())
        assert ids, f"no token allowed after {out}"
        out.append(pick(step, ids))
        state.commit([out[-1]])
        if state.is_terminated:
            return out
    raise AssertionError(f"not terminated after {max_steps} tokens: {out}")


def text_of(tokenizer, tokens: list[int]) -> str:
    assert tokens[-1] in STOP_IDS and not set(tokens[:-1]) & set(STOP_IDS)
    return tokenizer.decode(tokens[:-1])


def test_spec_of_follows_sglang_precedence():
    spec_of = GrammarBackend.spec_of
    assert spec_of(SimpleNamespace(json_schema=None, regex=None, ebnf=None)) is None
    assert spec_of(SimpleNamespace()) is None
    full = SimpleNamespace(json_schema="{}", regex="a", ebnf="root ::= \"a\"", structural_tag="{}")
    assert spec_of(full) == ("json_schema", "{}")
    assert spec_of(SimpleNamespace(json_schema=None, regex="a", ebnf="e")) == ("regex", "a")
    assert spec_of(SimpleNamespace(ebnf="e", structural_tag="s")) == ("ebnf", "e")
    assert spec_of(SimpleNamespace(structural_tag="s")) == ("structural_tag", "s")


def test_regex_greedy_walk(backend, tokenizer):
    pattern = r"(yes|no|maybe), [0-9]{1,3}!"
    tokens = walk(backend.new_state("regex", pattern), lambda step, ids: ids[0])
    assert re.fullmatch(pattern, text_of(tokenizer, tokens))


def json_walker(tokenizer, seed: int, random_steps: int = 60):
    """Random allowed tokens for random_steps, then prefer closing ones (stop, '"', '}', ']')
    so that a walk over a JSON grammar ends."""
    rng = random.Random(seed)
    text = [tokenizer.decode([i]) for i in range(len(tokenizer))]
    closing = STOP_IDS + [text.index(c) for c in ('"', "}", "]")]

    def pick(step, ids):
        if step >= random_steps:
            for token in closing:
                if token in ids:
                    return token
        return rng.choice(ids)

    return pick


@pytest.mark.parametrize("seed", range(6))
def test_json_schema_random_walk(backend, tokenizer, seed):
    state = backend.new_state("json_schema", PERSON)
    value = json.loads(text_of(tokenizer, walk(state, json_walker(tokenizer, seed))))
    assert set(value) == {"name", "age"}
    assert isinstance(value["name"], str)
    assert isinstance(value["age"], int) and not isinstance(value["age"], bool)


def test_any_json(backend, tokenizer):
    for seed in range(3):
        state = backend.new_state("json_schema", "$$ANY$$")
        json.loads(text_of(tokenizer, walk(state, json_walker(tokenizer, seed, 30))))


def test_ebnf(backend, tokenizer):
    grammar = 'root ::= "(" item ("," item)* ")"\nitem ::= [0-9]+ | "x"'
    rng = random.Random(0)
    tokens = walk(backend.new_state("ebnf", grammar), lambda step, ids: rng.choice(ids))
    assert re.fullmatch(r"\((\d+|x)(,(\d+|x))*\)", text_of(tokenizer, tokens))


def test_structural_tag(backend, tokenizer):
    new_form = {"type": "structural_tag", "format": {
        "type": "tag", "begin": "<a>", "content": {"type": "regex", "pattern": "[0-9]{2}"},
        "end": "</a>"}}
    tokens = walk(backend.new_state("structural_tag", json.dumps(new_form)),
                  lambda step, ids: ids[0])
    assert re.fullmatch(r"<a>[0-9]{2}</a>", text_of(tokenizer, tokens))
    legacy = {"structures": [{"begin": "<f>", "schema": {"type": "integer"}, "end": "</f>"}],
              "triggers": ["<f>"]}
    state = backend.new_state("structural_tag", json.dumps(legacy))
    for token in tokenizer.encode("hi <f>12</f>", add_special_tokens=False):
        assert state.advance(token)
    assert not state.advance(tokenizer.convert_tokens_to_ids("<|im_start|>"))


def test_advance_disallowed_changes_nothing(backend, tokenizer):
    state = backend.new_state("regex", "(yes|no)")
    before = state.mask()
    bad = [i for i in range(backend.vocab_size) if not before[i]]
    for token in (bad[0], bad[-1], -1, backend.vocab_size, 10**9):
        assert state.advance(token) is False
        assert torch.equal(state.mask(), before)
    assert state.advance(allowed(before)[0])
    state.rollback()  # the failed advances were not counted: one rollback restores the start
    assert torch.equal(state.mask(), before)


def test_advance_then_rollback_restores_mask(backend, tokenizer):
    state = backend.new_state("json_schema", PERSON)
    state.commit(tokenizer.encode('{"name": "Bo', add_special_tokens=False))
    start = state.mask()
    rng = random.Random(1)
    draft, masks = [], []
    for _ in range(16):  # a speculative draft, as the speculative generator proposes
        masks.append(state.mask())
        draft.append(rng.choice(allowed(masks[-1])))
        assert state.advance(draft[-1])
    state.rollback()
    assert torch.equal(state.mask(), start) and not state.is_terminated
    state.rollback()  # nothing left to undo
    assert torch.equal(state.mask(), start)
    for token, mask in zip(draft, masks):  # replaying the draft gives the same masks
        assert torch.equal(state.mask(), mask)
        assert state.advance(token)


def test_rollback_undoes_termination(backend, tokenizer):
    state = backend.new_state("regex", "ok")
    state.commit(tokenizer.encode("ok", add_special_tokens=False))
    before = state.mask()
    assert allowed(before) == sorted(STOP_IDS)
    assert state.advance(2) and state.is_terminated
    state.rollback()
    assert not state.is_terminated and torch.equal(state.mask(), before)


def test_commit_after_speculation(backend, tokenizer):
    state = backend.new_state("regex", r"[a-z]+ [0-9]+")
    for token in tokenizer.encode("abc 1", add_special_tokens=False):
        assert state.advance(token)
    emitted = tokenizer.encode("ab", add_special_tokens=False)
    state.commit(emitted)  # drafted tokens dropped, the emitted ones kept
    reference = backend.new_state("regex", r"[a-z]+ [0-9]+")
    reference.commit(emitted)
    assert torch.equal(state.mask(), reference.mask())
    state.rollback()  # committed tokens are not speculative
    assert torch.equal(state.mask(), reference.mask())
    # Emitted tokens the grammar cannot take are ignored (the output is final anyway).
    state.commit(tokenizer.encode("ab!!", add_special_tokens=False))
    assert not state.is_terminated


def test_only_stop_tokens_after_termination(backend, tokenizer):
    state = backend.new_state("regex", "(yes|no)")
    walk(state, lambda step, ids: ids[0])
    assert state.is_terminated
    assert allowed(state.mask()) == sorted(STOP_IDS)
    assert not state.advance(2) and not state.advance(5)
    state.commit([5, 2, 7])  # past the end: ignored, no error
    assert state.is_terminated and allowed(state.mask()) == sorted(STOP_IDS)


def test_control_tokens_never_allowed(backend, tokenizer, capfd):
    """<|im_start|> is text to xgrammar (it decodes to its name) but the detokenizer drops it:
    never allowed, not even inside a JSON string; refused quietly (xgrammar would warn)."""
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    state = backend.new_state("json_schema", "$$ANY$$")
    state.commit(tokenizer.encode('{"a": "x', add_special_tokens=False))
    mask = state.mask()
    assert mask.sum() > 100 and not mask[im_start] and not mask[STOP_IDS].any()
    assert not state.advance(im_start) and not state.advance(-1)
    state.commit(tokenizer.encode('"}', add_special_tokens=False) + [2])
    assert state.is_terminated and not state.advance(2)
    assert "Warning" not in capfd.readouterr().err


def test_padding_rows_never_allowed(tokenizer):
    padded = len(tokenizer) + 45  # model logits wider than the tokenizer, not a multiple of 32
    backend = GrammarBackend(tokenizer, padded, STOP_IDS)
    rng = random.Random(0)
    assert backend.new_state("regex", r"[\s\S]*").mask().sum() > 400  # free text: nearly all
    for kind, spec in [("regex", r"[\s\S]*"), ("json_schema", PERSON), ("json_schema", "$$ANY$$")]:
        state = backend.new_state(kind, spec)
        for _ in range(30):
            mask = state.mask()
            assert mask.shape == (padded,) and mask.dtype == torch.bool
            assert not mask[len(tokenizer):].any()
            if state.is_terminated:
                break
            assert not state.advance(len(tokenizer) + 3)
            state.commit([rng.choice(allowed(mask))])
    logits = torch.zeros(padded)
    apply_mask(logits, mask)
    assert torch.isinf(logits[len(tokenizer):]).all()


def test_apply_mask(backend):
    states = [backend.new_state("regex", "(yes|no)"), backend.new_state("json_schema", PERSON)]
    masks = torch.stack([s.mask() for s in states])
    for dtype in (torch.float32, torch.bfloat16, torch.float64):  # xgrammar kernel / masked_fill
        logits = torch.randn(2, backend.vocab_size, dtype=dtype)
        expected = logits.masked_fill(~masks, float("-inf"))
        apply_mask(logits, masks)
        assert torch.equal(logits, expected)
    row = torch.zeros(backend.vocab_size)
    GrammarState.apply(row, masks[0])
    assert torch.isfinite(row).nonzero().flatten().tolist() == allowed(masks[0])


@pytest.mark.parametrize("kind, spec, reason", [
    ("json_schema", '{"type": "strin"}', 'Unsupported type "strin"'),
    ("json_schema", "{", "not JSON"),
    ("json_schema", '{"type": "integer", "multipleOf": 3}', "multipleOf"),
    ("regex", "(ab", "parenthesis is not closed"),
    ("regex", "a**", "consecutive repetition"),
    ("ebnf", "root ::= foo", 'Rule "foo" is not defined'),
    ("structural_tag", '{"type": "structural_tag"}', "format"),
    ("structural_tag", "nope", "not JSON"),
    ("xml", "<a/>", "unknown constraint kind"),
])
def test_invalid_spec_raises(backend, kind, spec, reason):
    with pytest.raises(GrammarError) as info:
        backend.new_state(kind, spec)
    message = str(info.value)
    assert kind in message and reason in message
    assert ".cc:" not in message  # xgrammar's source location is stripped
    assert isinstance(info.value, ValueError)


def test_compiled_grammars_are_cached(backend):
    backend.new_state("regex", "cache(d)?")
    hits = backend._compile.cache_info().hits
    backend.new_state("regex", "cache(d)?")
    assert backend._compile.cache_info().hits == hits + 1
