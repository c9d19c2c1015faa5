"""A draft and a target that share a tokenizer but pad their vocabularies differently.

Model families pad the embedding and LM head past the tokenizer, to a width that suits their
kernels: Qwen2.5-0.5B has 151,936 rows, Qwen2.5-7B/14B/32B 152,064, over one tokenizer of 151,665
tokens.  Such a pair speculates on the ids they share.  The draft's logits are mapped onto the
target's ids as soon as they leave the draft model (``on_target_ids``):

  * draft rows beyond the target's width are dropped: they name no token the target can emit,
    so the draft never proposes them;
  * target ids beyond the draft's width get logit -inf: the draft gives them probability 0.

Every later step (sampling, penalties, grammar masks, coupled noise, rejection sampling, early
exit's candidates) then sees q as a distribution over the target's ids, as wide as p.  Losslessness
needs nothing else: the target still verifies and samples from its full distribution p, and
rejection sampling is exact for any q that is the draft's true proposal distribution.

Whether two tokenizers agree is checked id by id below the smaller width (``check_tokenizers``):
same token string, and the same special tokens, for every shared id.
"""

from __future__ import annotations

import torch


def on_target_ids(logits: torch.Tensor, target_width: int) -> torch.Tensor:
    """Draft logits [..., V_draft] -> [..., target_width]: extra draft rows dropped, missing ones
    -inf (probability 0 after any softmax or penalty).  The same tensor when the widths agree."""
    width = logits.shape[-1]
    if width == target_width:
        return logits
    if width > target_width:
        return logits[..., :target_width]
    missing = logits.new_full(logits.shape[:-1] + (target_width - width,), float("-inf"))
    return torch.cat([logits, missing], dim=-1)


def load_tokenizer(model_path: str):
    """The model directory's tokenizer, or None when it has none (a checkpoint served with
    --skip-tokenizer-init may lack one)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError):
        return None


def first_difference(draft_tokenizer, target_tokenizer, shared: int) -> tuple[int, str, str] | None:
    """The first id below ``shared`` whose token string or special-ness differs between the two
    tokenizers, with each side's description of it; None when they agree on every shared id.
    Ids a tokenizer lacks (the model's padding rows) read as None, so padding matches padding."""
    draft_ids = draft_tokenizer.convert_ids_to_tokens(list(range(shared)))
    target_ids = target_tokenizer.convert_ids_to_tokens(list(range(shared)))
    draft_special = set(draft_tokenizer.all_special_ids)
    target_special = set(target_tokenizer.all_special_ids)
    for i, (d, t) in enumerate(zip(draft_ids, target_ids)):
        if d != t or (i in draft_special) != (i in target_special):
            return i, _describe(d, i in draft_special), _describe(t, i in target_special)
    return None


def _describe(token: str | None, special: bool) -> str:
    if token is None:
        return "no token"
    return f"{token!r}{' (special)' if special else ''}"


def check_tokenizers(draft_path: str, target_path: str, draft_width: int, target_width: int) -> None:
    """Refuse a pair whose tokenizers disagree on a shared id (ValueError naming the first such
    id).  Pairs of one width whose directories carry no tokenizer pass as before (only ids are
    compared there); pairs of different widths must show a tokenizer on both sides."""
    draft_tok, target_tok = load_tokenizer(draft_path), load_tokenizer(target_path)
    if draft_tok is None or target_tok is None:
        if draft_width == target_width:
            return
        missing = draft_path if draft_tok is None else target_path
        raise ValueError(f"draft vocabulary ({draft_width} rows) differs from the target's ({target_width}) "
                         f"and {missing} has no tokenizer to show that the two share their ids")
    shared = min(draft_width, target_width)
    diff = first_difference(draft_tok, target_tok, shared)
    if diff is not None:
        i, d, t = diff
        raise ValueError(f"the draft's and the target's tokenizers differ at id {i} (draft: {d}, target: {t}); "
                         "speculative decoding needs a draft that shares the target's tokenizer")
