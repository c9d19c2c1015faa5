"""Front-half extension: per-request speculation metrics in meta_info.

SGLang's TokenizerManager computes spec_accept_length / spec_accept_rate only when its own
speculative algorithm is configured, and assumes one draft length for the whole server.  Our
scheduler ships per-request counters in BatchTokenIDOutput.customized_info (which the
detokenizer passes through); this subclass turns them into meta_info fields with SGLang's names,
through TokenizerManager's documented hook for customized info.
"""

from __future__ import annotations

from sglang.srt.managers.tokenizer_manager import TokenizerManager

SPEC_KEYS = ("spec_verify_ct", "spec_num_correct_drafts", "spec_num_proposed_drafts")


class FaserTokenizerManager(TokenizerManager):
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
