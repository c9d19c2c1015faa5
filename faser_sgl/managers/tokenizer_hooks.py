"""Front-half extensions: per-request speculation metrics in meta_info, and distinct seeds for
the samples of one parallel-sampling (n > 1) request.

SGLang's TokenizerManager computes spec_accept_length / spec_accept_rate only when its own
speculative algorithm is configured, and assumes one draft length for the whole server.  Our
scheduler ships per-request counters in BatchTokenIDOutput.customized_info (which the
detokenizer passes through); this subclass turns them into meta_info fields with SGLang's names,
through TokenizerManager's documented hook for customized info.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

import msgspec
from sglang.srt.managers.io_struct import TokenizedGenerateReqInput
from sglang.srt.managers.tokenizer_manager import SignalHandler, TokenizerManager

from faser_sgl.managers import lifecycle
from faser_sgl.options import FaserOptions

# The server process's manager, for the HTTP middleware that reads its shutdown state.
ACTIVE = None

# Sampling-params objects recently dispatched, to recognise the copies of an n > 1 fan-out.
FANOUT_MEMORY = 4096


def sample_seed(seed: int, index: int) -> int:
    """Seed of sample ``index`` of a seeded n > 1 request: the seed itself for the first (so
    n=1 and the first of n samples agree), a splitmix64 mix of (seed, index) for the others."""
    if index == 0:
        return seed
    z = (seed + index * 0x9E3779B97F4A7C15) & 0xFFFF_FFFF_FFFF_FFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFF_FFFF_FFFF_FFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFF_FFFF_FFFF_FFFF
    return (z ^ (z >> 31)) & 0x7FFF_FFFF_FFFF_FFFF

SPEC_KEYS = ("spec_verify_ct", "spec_num_correct_drafts", "spec_num_proposed_drafts")


class FaserSignalHandler(SignalHandler):
    def running_phase_sigquit_handler(self, signum=None, frame=None):
        lifecycle.child_died(self.tokenizer_manager)


class FaserTokenizerManager(TokenizerManager):
    def __init__(self, *args, **kwargs):
        global ACTIVE
        super().__init__(*args, **kwargs)
        self._dispatched_params: OrderedDict[int, tuple] = OrderedDict()
        self.signal_handler_class = FaserSignalHandler
        self.child_died = False
        self.shutdown_timeout = FaserOptions.from_env().shutdown_timeout
        ACTIVE = self

    async def sigterm_watchdog(self):
        """SIGTERM: a bounded drain (lifecycle.drain), then SGLang's own stop sequence, which
        finds nothing left to wait for."""
        while not self.gracefully_exit:
            await asyncio.sleep(0.2)
        await lifecycle.drain(self, self.shutdown_timeout)
        await super().sigterm_watchdog()

    async def _send_one_request(self, tokenized_obj):
        """SGLang sends the n samples of a parallel-sampling request as n shallow copies that
        share one SamplingParams object, so a seeded request would give n identical samples.
        The i-th dispatch of the same object gets seed sample_seed(seed, i): distinct samples,
        the same set every time the request is repeated."""
        sp = getattr(tokenized_obj, "sampling_params", None)
        if isinstance(tokenized_obj, TokenizedGenerateReqInput) and sp is not None \
                and sp.sampling_seed is not None and sp.max_new_tokens != 0:
            seen = self._dispatched_params.get(id(sp))
            index = seen[1] if seen is not None and seen[0] is sp else 0
            # Holding sp keeps its id from being reused while it is remembered.
            self._dispatched_params[id(sp)] = (sp, index + 1)
            self._dispatched_params.move_to_end(id(sp))
            while len(self._dispatched_params) > FANOUT_MEMORY:
                self._dispatched_params.popitem(last=False)
            if index:
                tokenized_obj.sampling_params = msgspec.structs.replace(
                    sp, sampling_seed=sample_seed(sp.sampling_seed, index))
        return await super()._send_one_request(tokenized_obj)

    def update_request_meta_info(self, meta_info, state, customized_info, index, finish_reason):
        values = {k: customized_info[k][index] for k in SPEC_KEYS if k in customized_info}
        other = {k: v for k, v in customized_info.items() if k not in SPEC_KEYS}
        if other:
            super().update_request_meta_info(meta_info, state, other, index, finish_reason)
        if not values:
            return
        # Counters are cumulative per request, so the latest message carries the totals.
        meta_info.update(values)
        verify_ct = values.get("spec_verify_ct", 0)
        proposed = values.get("spec_num_proposed_drafts", 0)
        if verify_ct > 0:
            # Tokens per verification pass (accepted drafts + the target's own token), and
            # accepted / proposed drafts.  SGLang divides completion_tokens by verify_ct, which is
            # the same only when every decode step verifies; an adaptive policy also runs plain
            # decode steps (k = 0), whose tokens are no verification's.
            correct = values.get("spec_num_correct_drafts", 0)
            meta_info["spec_accept_length"] = (correct + verify_ct) / verify_ct
        if proposed > 0:
            meta_info["spec_accept_rate"] = values.get("spec_num_correct_drafts", 0) / proposed


def init_faser_tokenizer_manager(server_args, port_args):
    from sglang.srt.entrypoints.engine import init_tokenizer_manager

    return init_tokenizer_manager(server_args, port_args, TokenizerManagerClass=FaserTokenizerManager)
