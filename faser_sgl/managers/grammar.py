"""Constrained decoding: one xgrammar matcher per request, on the CPU.

``GrammarBackend`` compiles a request's spec (json_schema, regex, ebnf or structural_tag, the
fields of SGLang's SamplingParams) against the model's vocabulary and hands out a
``GrammarState``. The state answers "which tokens may come next" as a bool mask of the model's
logits width, and follows the output in two steps: ``advance`` for speculative tokens (a draft
being verified, undone by ``rollback``) and ``commit`` for the tokens actually emitted.
"""

from __future__ import annotations

import functools
import json
import re

import numpy as np
import torch
import xgrammar as xgr

KINDS = ("json_schema", "regex", "ebnf", "structural_tag")  # SGLang's precedence order
ANY_JSON = "$$ANY$$"  # json_schema value meaning "any JSON value" (SGLang's json_object mode)

_XGR_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # xgrammar's CPU mask kernel
# xgrammar errors read "[12:00:00] /project/cpp/x.cc:42: Check failed: (...) is false: reason".
_XGR_NOISE = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


class GrammarError(ValueError):
    """The spec of a constrained request does not compile; the message names the field."""


def _json(kind: str, spec: str):
    try:
        return json.loads(spec)
    except json.JSONDecodeError as e:
        raise GrammarError(f"invalid {kind}: not JSON ({e})") from e


def apply_mask(logits: torch.Tensor, masks: torch.Tensor) -> None:
    """Set the disallowed entries of ``logits`` ([N, V] or [V]) to -inf, in place.
    ``masks`` is bool, True = allowed, same shape (it is moved to the logits' device)."""
    if logits.device.type == "cpu" and masks.device.type == "cpu" and logits.dtype in _XGR_DTYPES:
        # On CPU, packing to xgrammar's int32 bitmask and using its kernel is ~3x faster than
        # masked_fill_ (about 70 vs 240 us per 152k-token row).
        vocab = masks.shape[-1]
        packed = np.zeros(masks.shape[:-1] + (-(-vocab // 32) * 4,), dtype=np.uint8)
        packed[..., : -(-vocab // 8)] = np.packbits(masks.numpy(), axis=-1, bitorder="little")
        xgr.apply_token_bitmask_inplace(logits, torch.from_numpy(packed.view(np.int32)),
                                        vocab_size=vocab, backend="cpu")
    else:
        logits.masked_fill_(~masks.to(logits.device, non_blocking=True), float("-inf"))


class GrammarState:
    """Matcher of one request. Tokens are either committed (emitted output) or speculative
    (advanced since the last commit/rollback, and counted so they can be undone)."""

    apply = staticmethod(apply_mask)

    def __init__(self, compiled: xgr.CompiledGrammar, vocab_size: int, stop_mask: torch.Tensor,
                 special: frozenset[int]):
        # xgrammar >= 0.2.6 keeps unlimited rollback history (max_rollback_tokens is deprecated
        # and only warns), so any number of speculative tokens can be undone.
        self._matcher = xgr.GrammarMatcher(compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)  # int32 [1, ceil(V / 32)]
        self._vocab_size = vocab_size
        self._stop_mask = stop_mask
        self._special = special
        self._speculative = 0

    @property
    def is_terminated(self) -> bool:
        return self._matcher.is_terminated()

    def mask(self) -> torch.Tensor:
        """bool [vocab_size]: tokens allowed next. Once a stop token has been accepted the
        matcher has no next token (xgrammar refuses to fill), so only stop tokens are allowed."""
        if self._matcher.is_terminated():
            return self._stop_mask.clone()
        self._matcher.fill_next_token_bitmask(self._bitmask)
        # Bit j of int32 word i is token 32 * i + j; on a little-endian host that is bit (j % 8)
        # of byte 4 * i + j // 8, i.e. numpy's "little" bit order over the raw bytes. The
        # unpacked 0/1 bytes are a valid bool tensor as they are (no copy).
        raw = self._bitmask.numpy().view(np.uint8)
        bits = np.unpackbits(raw, count=self._vocab_size, bitorder="little")
        return torch.from_numpy(bits).view(torch.bool)

    def advance(self, token: int) -> bool:
        """Accept ``token`` speculatively; False (state unchanged) if the grammar forbids it."""
        if not self._accept(token):
            return False
        self._speculative += 1
        return True

    def rollback(self) -> None:
        """Undo every speculative advance since the last commit/rollback."""
        if self._speculative:
            self._matcher.rollback(self._speculative)
            self._speculative = 0

    def commit(self, tokens: list[int]) -> None:
        """Drop the speculative tokens, then accept the emitted ``tokens`` for good. Tokens
        the grammar cannot take (after termination, or a forced stop) end the acceptance: the
        request's output is final either way, so they are dropped rather than raised."""
        self.rollback()
        for token in tokens:
            if not self._accept(token):
                break

    def _accept(self, token: int) -> bool:
        # Refuse up front what xgrammar would refuse with a warning printed on stderr.
        if not 0 <= token < self._vocab_size or token in self._special or self.is_terminated:
            return False
        return self._matcher.accept_token(token)


class GrammarBackend:
    """Compiles specs for one model's vocabulary and creates per-request states."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], *,
                 any_whitespace: bool = True, max_whitespace_cnt: int | None = None,
                 cache_size: int = 256):
        """vocab_size is the model's logits width: ids the tokenizer lacks (padding rows) are
        never allowed. stop_token_ids (the model's eos ids) are allowed once the grammar is
        complete. any_whitespace / max_whitespace_cnt: JSON whitespace, as in SGLang's
        defaults (any amount of any JSON whitespace). cache_size: compiled grammars kept (LRU;
        some 1e5 bytes each for a small schema on a 152k vocabulary)."""
        self.vocab_size = vocab_size
        self.stop_token_ids = [int(t) for t in stop_token_ids]
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=self.stop_token_ids)
        # Control tokens (<|im_start|>, ...) decode to their names, so xgrammar would let them
        # spell text, e.g. inside a JSON string, which the detokenizer then drops. xgrammar
        # never allows an empty token: blank them (stop tokens keep their role).
        control = {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
                   if t.special and i not in self.stop_token_ids and i < vocab_size}
        if control:
            vocab = [b"" if i in control else p for i, p in enumerate(info.decoded_vocab)]
            info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=vocab_size,
                                     stop_token_ids=self.stop_token_ids,
                                     add_prefix_space=info.add_prefix_space)
        # Control and padding ids: never allowed (xgrammar's "special" tokens).
        self._special = frozenset(info.special_token_ids) - set(self.stop_token_ids)
        # Our own (kind, spec) LRU instead of xgrammar's cache, which is unbounded by default and
        # known to confuse structural tags of different shapes (xgrammar 0.2.1 - 0.2.7).
        self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self._compile = functools.lru_cache(maxsize=cache_size)(self._compile_uncached)
        self._json_options = dict(any_whitespace=any_whitespace,
                                  max_whitespace_cnt=max_whitespace_cnt)
        self._stop_mask = torch.zeros(vocab_size, dtype=torch.bool)
        self._stop_mask[[t for t in self.stop_token_ids if 0 <= t < vocab_size]] = True

    @staticmethod
    def spec_of(sampling_params) -> tuple[str, str] | None:
        """(kind, spec) of the first constraint set on ``sampling_params``; None if none is."""
        for kind in KINDS:
            spec = getattr(sampling_params, kind, None)
            if spec is not None:
                return kind, spec
        return None

    def new_state(self, kind: str, spec: str) -> GrammarState:
        """A fresh matcher for (kind, spec); raises GrammarError if the spec is invalid."""
        if kind not in KINDS:
            raise GrammarError(f"unknown constraint kind {kind!r} (one of {', '.join(KINDS)})")
        if not isinstance(spec, str):
            raise GrammarError(f"{kind}: expected a string, got {type(spec).__name__}")
        try:
            compiled = self._compile(kind, spec)
        except GrammarError:
            raise
        except (RuntimeError, ValueError, TypeError, KeyError) as e:  # xgrammar raises RuntimeError
            reason = _XGR_NOISE.sub("", str(e).strip()) or type(e).__name__
            raise GrammarError(f"invalid {kind}: {reason}") from e
        return GrammarState(compiled, self.vocab_size, self._stop_mask, self._special)

    def _compile_uncached(self, kind: str, spec: str) -> xgr.CompiledGrammar:
        if kind == "regex":
            return self._compiler.compile_regex(spec)
        if kind == "ebnf":
            return self._compiler.compile_grammar(spec)
        if kind == "json_schema":
            if spec == ANY_JSON:
                return self._compiler.compile_builtin_json_grammar()
            # SGLang's check for keywords xgrammar would silently not enforce (e.g. multipleOf):
            # reject them rather than emit output that breaks the schema. Imported lazily: the
            # serving process has sglang loaded already, a bare import costs seconds.
            from sglang.srt.constrained.json_schema_validation import validate_xgrammar_json_schema

            validate_xgrammar_json_schema(_json(kind, spec))
            return self._compiler.compile_json_schema(spec, **self._json_options)
        tag = _json(kind, spec)  # structural_tag
        if isinstance(tag, dict) and tag.get("structures") is not None:  # legacy form
            tag = {"type": "structural_tag", "format": {
                "type": "triggered_tags", "triggers": tag["triggers"],
                "at_least_one": bool(tag.get("at_least_one", False)),
                "tags": [{"type": "tag", "begin": s["begin"], "end": s["end"],
                          "content": {"type": "json_schema", "json_schema": s.get("schema") or {}}}
                         for s in tag["structures"]]}}
        return self._compiler.compile_structural_tag(json.dumps(tag))
