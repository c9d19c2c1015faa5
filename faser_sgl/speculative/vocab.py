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

from pathlib import Path

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


def token_table(model_path: str, size: int) -> tuple[list[str | None], set[int]] | None:
    """The token string of every id below ``size`` (None for ids the tokenizer lacks: the model's
    padding rows) and the ids of its special tokens; None when the directory has no tokenizer
    (a checkpoint served with --skip-tokenizer-init may lack one).  tokenizer.json is read with
    the tokenizers library directly: transformers' AutoTokenizer takes several times as long on
    a 152k vocabulary, and this runs at every start."""
    path = Path(model_path) / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))
        added = tok.get_added_tokens_decoder()
        return [tok.id_to_token(i) for i in range(size)], {i for i, t in added.items() if t.special}
    from transformers import AutoTokenizer  # a tokenizer without tokenizer.json (sentencepiece)

    try:
        tok = AutoTokenizer.from_pretrained(model_path)
    except Exception:  # no tokenizer files, or none transformers can read: nothing to compare
        return None
    added = tok.added_tokens_decoder
    return tok.convert_ids_to_tokens(list(range(size))), {i for i, t in added.items() if t.special}


def first_difference(draft: tuple[list, set[int]], target: tuple[list, set[int]]) -> tuple[int, str, str] | None:
    """The first id where two token tables (``token_table``, same size) differ in the token's
    string or special-ness, with each side's description of it; None when they agree.  Ids
    neither tokenizer has read as None on both sides, so padding matches padding."""
    (draft_tokens, draft_special), (target_tokens, target_special) = draft, target
    for i, (d, t) in enumerate(zip(draft_tokens, target_tokens)):
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
    if _same_tokenizer_file(draft_path, target_path):
        return  # one tokenizer.json, byte for byte: nothing to compare (the common case, fast)
    shared = min(draft_width, target_width)
    draft, target = token_table(draft_path, shared), token_table(target_path, shared)
    if draft is None or target is None:
        if draft_width == target_width:
            return
        missing = draft_path if draft is None else target_path
        raise ValueError(f"draft vocabulary ({draft_width} rows) differs from the target's ({target_width}) "
                         f"and {missing} has no tokenizer to show that the two share their ids")
    diff = first_difference(draft, target)
    if diff is not None:
        i, d, t = diff
        raise ValueError(f"the draft's and the target's tokenizers differ at id {i} (draft: {d}, target: {t}); "
                         "speculative decoding needs a draft that shares the target's tokenizer")


def _same_tokenizer_file(draft_path: str, target_path: str) -> bool:
    a, b = Path(draft_path) / "tokenizer.json", Path(target_path) / "tokenizer.json"
    if not (a.is_file() and b.is_file()) or a.stat().st_size != b.stat().st_size:
        return False
    return a.read_bytes() == b.read_bytes()
