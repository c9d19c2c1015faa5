"""Draft/target pairs with one tokenizer and differently padded vocabularies (Qwen2.5-0.5B's 151,936
rows against 7B's 152,064) speculate losslessly on their shared ids; pairs whose tokenizers differ
are refused with the first differing id (issue 24, defect 6; speculative/vocab.py).

The tiny models share one 512-token tokenizer; a padded copy adds 64 random rows to the
embedding and the LM head.  Random rows are as likely as real ones, so the padded target emits
ids the narrower draft can neither propose nor embed, far more often than a real model would.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import PARTIAL_DRAFT
from spec_harness import Engine
from test_speculative_sampling import K, NOISY_DRAFT, first_verification_check

SHARED, PADDED = 512, 576
PROMPTS = [[5, 17, 33], list(range(40, 75)), [7] * 11, list(range(100, 123)), [3, 9], [250, 30, 31, 2, 8]]


def padded_copy(src: str, dest: Path, rows: int, seed: int) -> str:
    """The model at src with its vocabulary padded to ``rows`` (random rows, the real ones'
    scale); the tokenizer is unchanged."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    tensors = load_file(str(dest / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in tensors:
            w = tensors[name]
            extra = w.std() * torch.randn(rows - w.shape[0], w.shape[1], generator=gen)
            tensors[name] = torch.cat([w, extra.to(w.dtype)]).contiguous()
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dest / "config.json").read_text())
    config["vocab_size"] = rows
    (dest / "config.json").write_text(json.dumps(config))
    return str(dest)


def swapped_tokenizer_copy(src: str, dest: Path, first: int) -> str:
    """The model at src whose tokenizer swaps the strings of ids ``first`` and ``first + 1``."""
    shutil.copytree(src, dest)
    spec = json.loads((dest / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = (tok for tok, i in vocab.items() if i in (first, first + 1))
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (dest / "tokenizer.json").write_text(json.dumps(spec))
    return str(dest)


@pytest.fixture(scope="module")
def models(tiny_model_factory, tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab_pairs")
    target, partial, noisy = (tiny_model_factory("llama", seed=0), tiny_model_factory(**PARTIAL_DRAFT),
                              tiny_model_factory(**NOISY_DRAFT))
    return {
        "target": target, "target_padded": padded_copy(target, root / "target_padded", PADDED, 1),
        "partial": partial, "partial_padded": padded_copy(partial, root / "partial_padded", PADDED, 2),
        "noisy": noisy, "noisy_padded": padded_copy(noisy, root / "noisy_padded", PADDED, 3),
        "swapped": swapped_tokenizer_copy(partial, root / "swapped", 300),
    }


# (target, draft) by name: the Qwen case (draft narrower) and its mirror (draft wider).
PAIRS = {"draft-narrower": ("target_padded", "partial"), "draft-wider": ("target", "partial_padded")}
VARIANTS = {"fixed": {}, "early-exit": {"early_exit": True},
            # A pinned GPU-like profile: with measured costs a tiny draft costs what the tiny
            # target does, so the faser policy may rightly draft nothing and test nothing.
            "faser-frontier": {"policy": "faser", "frontier_size": 2,
                               "cost_profile": "target=30+0.01,draft=2+0.01"}}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_greedy_output_is_the_targets_own(models, pair, variant):
    target, draft = (models[name] for name in PAIRS[pair])
    reference = Engine(target, None)
    expected = reference.run([reference.make_request(p, 40, temperature=0) for p in PROMPTS])
    engine = Engine(target, draft, k=3, **VARIANTS[variant])
    assert engine.run([engine.make_request(p, 40, temperature=0) for p in PROMPTS]) == expected
    assert engine.generator.num_accepted > 0
    if pair == "draft-narrower":  # the target did emit ids the draft has no row for
        assert any(t >= SHARED for out in expected for t in out)


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_coupled_sampling_is_target_only_sampling(models, pair):
    """Coupled sampling's text is the target's Gumbel-max sequence of the seed: both sides must
    draw the same noise for every shared id whatever their widths."""
    target, draft = (models[name] for name in PAIRS[pair])
    runs = []
    for d in (None, draft):
        engine = Engine(target, d, k=3, sampling_scheme="coupled")
        runs.append(engine.run([engine.make_request(p, 30, temperature=1.0, sampling_seed=i)
                                for i, p in enumerate(PROMPTS)]))
    assert runs[0] == runs[1]
    assert engine.generator.num_accepted > 0


@pytest.mark.parametrize("pair", ["draft-narrower", "draft-wider"])
def test_rejection_sampling_follows_the_target_with_different_widths(models, pair):
    target, draft = (models["target_padded"], models["noisy"]) if pair == "draft-narrower" \
        else (models["target"], models["noisy_padded"])
    check = first_verification_check(lambda: Engine(target, draft, k=K, max_running=250))
    assert 0.2 <= check.acceptance <= 0.9, f"need partial acceptance, got {check.acceptance:.3f}"
    assert check.pvalue_first > 1e-3, f"verified position 1 differs from the target ({check})"
    assert check.pvalue > 1e-3, f"joint of verified positions 1..{K} differs from the target ({check})"
    if pair == "draft-narrower":  # the target's own ids beyond the draft's were part of the law
        assert any(t >= SHARED for out in check.outputs for t in out)


@pytest.mark.parametrize("target", ["target", "target_padded"])
def test_a_pair_whose_tokenizers_differ_is_refused_naming_the_first_differing_id(models, target):
    with pytest.raises(ValueError, match=r"tokenizers differ at id 300 "):
        Engine(models[target], models["swapped"], k=3)


def rewritten_tokenizer_copy(src: str, dest: Path, edit=None) -> str:
    """The model at src with its tokenizer.json re-serialised (other bytes, same content), after
    ``edit(spec)`` if given."""
    shutil.copytree(src, dest)
    spec = json.loads((dest / "tokenizer.json").read_text())
    if edit is not None:
        edit(spec)
    (dest / "tokenizer.json").write_text(json.dumps(spec, indent=1))
    return str(dest)


def test_tokenizers_are_compared_id_by_id_special_tokens_included(models, tmp_path):
    from faser_sgl.speculative.vocab import check_tokenizers

    target = models["target"]
    same = rewritten_tokenizer_copy(models["partial"], tmp_path / "same")
    check_tokenizers(same, target, SHARED, PADDED)  # other bytes, same tokens: accepted

    def unmark_im_start(spec):
        for added in spec["added_tokens"]:
            if added["content"] == "<|im_start|>":
                added["special"] = False

    unmarked = rewritten_tokenizer_copy(models["partial"], tmp_path / "unmarked", unmark_im_start)
    with pytest.raises(ValueError, match=r"differ at id 1 \(draft: '<\|im_start\|>', target: '<\|im_start\|>' \(special\)"):
        check_tokenizers(unmarked, target, SHARED, SHARED)


def test_a_pair_without_tokenizers_is_accepted_only_at_one_width(models, tmp_path):
    from faser_sgl.speculative.vocab import check_tokenizers

    bare = tmp_path / "bare"
    shutil.copytree(models["partial"], bare, ignore=shutil.ignore_patterns("tokenizer*"))
    check_tokenizers(str(bare), models["target"], SHARED, SHARED)
    with pytest.raises(ValueError, match="has no tokenizer"):
        check_tokenizers(str(bare), models["target_padded"], SHARED, PADDED)


def test_draft_logits_are_mapped_onto_the_targets_ids():
    from faser_sgl.speculative.vocab import on_target_ids

    logits = torch.tensor([[1.0, 2.0, 3.0]])
    assert on_target_ids(logits, 3) is logits
    assert on_target_ids(logits, 2).tolist() == [[1.0, 2.0]]
    assert on_target_ids(logits, 5).tolist() == [[1.0, 2.0, 3.0, float("-inf"), float("-inf")]]


def test_rejection_kernels_extend_a_narrower_q_with_zeros():
    from faser_sgl import kernels

    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(5, 12, generator=gen), dim=-1)
    q = torch.softmax(torch.randn(3, 9, generator=gen), dim=-1)
    indptr = torch.tensor([0, 2, 3])
    drafts = torch.tensor([1, 4, 8])
    acc_u = torch.rand(3, generator=gen, dtype=torch.float64)
    samp_u = torch.rand(2, generator=gen, dtype=torch.float64)
    narrow = kernels.rejection_sample(drafts, indptr, q, p, acc_u, samp_u)
    padded = kernels.rejection_sample(drafts, indptr, torch.nn.functional.pad(q, (0, 3)), p, acc_u, samp_u)
    assert all(torch.equal(a, b) for a, b in zip(narrow, padded))
    with pytest.raises(ValueError, match="wider than the target"):
        kernels.rejection_sample(drafts, indptr, torch.nn.functional.pad(q, (0, 5)), p, acc_u, samp_u)
