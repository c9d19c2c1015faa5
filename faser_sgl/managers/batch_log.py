"""SGLang's per-step log lines, written by this scheduler in SGLang's wording.

People watch a server's log for these lines, and tools scrape them (SGLang's own
test_large_max_new_tokens waits for "#running-req: 4" to know four requests run at once):

    Prefill batch, #new-seq: 2, #new-token: 512, #cached-token: 0, token usage: 0.25, #running-req: 1, #queue-req: 3,
    Decode batch, #running-req: 4, #token: 812, token usage: 0.40, accept len: 2.31, gen throughput (token/s): 18.20, #queue-req: 0,

A prefill line for every step that carries prompt tokens, a decode line every
--decode-log-interval steps that decode (SGLang's default 40), "accept len" only where the
policy speculates (tokens emitted per verification since the last decode line).
"""

from __future__ import annotations

import logging
import time

logger = logging.getLogger(__name__)


def is_decode(chunk) -> bool:
    """A chunk that feeds one already generated token to get the next (not a prompt or a
    recomputation after retraction, which are prefills)."""
    return chunk.needs_logits and len(chunk.tokens) == 1 and bool(chunk.req.output_ids)


class BatchLog:
    def __init__(self, decode_log_interval: int = 40):
        self.interval = max(1, int(decode_log_interval or 40))
        self.decode_steps = 0
        self._since = time.perf_counter()
        self._generated = 0
        self._verify_marks = (0, 0)  # (verification passes, tokens emitted by them) at the last line

    def after_step(self, chunks, *, running: int, waiting: int, used_slots: int, total_slots: int,
                   generated: int, generator=None) -> None:
        """generated: tokens this step emitted; generator: read for speculation counters."""
        usage = used_slots / total_slots if total_slots else 0.0
        prefills = [c for c in chunks if not is_decode(c)]
        if prefills:
            new_seqs = [c for c in prefills if len(c.req.kv_slots) - len(c.tokens) <= c.req.cached_tokens]
            logger.info(f"Prefill batch, #new-seq: {len(new_seqs)}, "
                      f"#new-token: {sum(len(c.tokens) for c in prefills)}, "
                      f"#cached-token: {sum(c.req.cached_tokens for c in new_seqs)}, "
                      # (the requests decoding beside the prefill, as SGLang's running batch)
                      f"token usage: {usage:.2f}, #running-req: {len(chunks) - len(prefills)}, "
                      f"#queue-req: {waiting}, ")
        self._generated += generated
        if len(prefills) == len(chunks):
            return
        self.decode_steps += 1
        if self.decode_steps % self.interval:
            return
        now = time.perf_counter()
        throughput = self._generated / max(now - self._since, 1e-9)
        self._since, self._generated = now, 0
        msg = f"Decode batch, #running-req: {running}, #token: {used_slots}, token usage: {usage:.2f}, "
        steps = getattr(generator, "num_verify_steps", None)
        if steps is not None:
            emitted = generator.num_accepted + steps
            d_steps, d_emitted = steps - self._verify_marks[0], emitted - self._verify_marks[1]
            self._verify_marks = (steps, emitted)
            msg += f"accept len: {d_emitted / d_steps if d_steps else 0.0:.2f}, "
        logger.info(msg + f"gen throughput (token/s): {throughput:.2f}, #queue-req: {waiting}, ")
