"""The draft model: a second, smaller model that proposes tokens for the target to verify.

It shares the target's KV slot numbering: the draft's own KV cache has as many slots as the
target's pool, and the token at slot s in the target cache is the token at slot s in the draft
cache.  One allocator then serves both, and freeing a rejected token's slot rolls back both
caches at once.  The draft lags the target: it is fed only when its request drafts (see
spec_generator), and after a fully accepted run its last draft token was never fed to it;
``Request.draft_cached`` records how far it got.
"""

from __future__ import annotations

import torch

from faser_sgl.executor.forward_batch import ForwardBatch
from faser_sgl.speculative.vocab import check_tokenizers, on_target_ids


class DraftWorker:
    def __init__(self, runner, target_runner):
        """runner: from DraftWorker.load, then passed to the target's ModelRunner as ``draft``,
        which sized and allocated both KV pools from one memory budget."""
        self.runner = runner
        # The pair may pad its vocabularies differently (Qwen2.5-0.5B 151,936 rows, 7B 152,064)
        # if its tokenizers agree on the shared ids; forward then speaks the target's ids.
        self.target_vocab_size = target_runner.config.vocab_size
        check_tokenizers(runner.model_path, target_runner.model_path, runner.config.vocab_size,
                         self.target_vocab_size)
        if runner.allocator is None or runner.allocator.num_total != target_runner.allocator.num_total:
            raise ValueError("the draft's KV pool must have the target's slot count: pass the "
                             "draft's runner to the target's ModelRunner as draft=")

    @staticmethod
    def load(model_path: str, dtype: torch.dtype, device: str, attention_backend: str,
             cpu_linear: str = "auto", share_weights_mmap: bool = False):
        """The draft's runner with its weights loaded but no KV pool yet, so that the target's
        pool sizing sees the memory both models' weights take."""
        from faser_sgl.executor.model_runner import ModelRunner

        return ModelRunner(model_path, dtype=dtype, device=device,
                           attention_backend=attention_backend, defer_kv=True, cpu_linear=cpu_linear,
                           share_weights_mmap=share_weights_mmap)

    def forward(self, feeds: list[list[int]], slots: list[list[int]]) -> torch.Tensor:
        """Feed each request its tokens (KV written at the tail of its slots); logits of the
        last fed token of each request on the target's ids, [B, V_target] (speculative/vocab.py:
        rows the target lacks dropped, rows the draft lacks -inf)."""
        batch = ForwardBatch.build(self._embeddable(feeds), slots, [[len(f) - 1] for f in feeds])
        return on_target_ids(self.runner.forward(batch), self.target_vocab_size)

    def _embeddable(self, feeds: list[list[int]]) -> list[list[int]]:
        """A target wider than the draft may emit (or be prompted with) ids the draft has no
        row for: padding rows no tokenizer names.  The draft reads them as its own last row
        (a padding row too, in a padded vocabulary); only its guesses after them can suffer,
        and the target verifies every guess."""
        width = self.runner.config.vocab_size
        if width >= self.target_vocab_size:
            return feeds
        return [[t if t < width else width - 1 for t in feed] for feed in feeds]
