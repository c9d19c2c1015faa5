"""Turn request progress into SGLang's BatchTokenIDOutput for the detokenizer."""

from __future__ import annotations

from array import array

from faser_sgl.managers.logprobs import message_fields
from faser_sgl.managers.request import PROMPT_TAIL_FOR_DETOKENIZER, Request


def should_send(req: Request, stream_interval: int, non_stream_interval: int) -> bool:
    """Whether req has output worth a message this step."""
    if req.finish_sent:
        return False
    if req.finished:
        return True
    pending = len(req.output_ids) - req.num_sent
    if pending <= 0:
        return False
    if req.stream:
        # Spec decoding adds several tokens a step; send whenever an interval boundary passed.
        return len(req.output_ids) // stream_interval > req.num_sent // stream_interval
    return len(req.output_ids) // non_stream_interval > req.num_sent // non_stream_interval


def build_output(reqs: list[Request], speculative: bool):
    """One BatchTokenIDOutput carrying each request's not-yet-sent ids; marks them sent."""
    from sglang.srt.managers.io_struct import BatchTokenIDOutput

    n = len(reqs)
    decode_ids, read_offsets, new_ids = [], [], []
    for req in reqs:
        fresh = req.output_ids[req.num_sent:]
        if not req.started_output:
            # The detokenizer decodes the first tokens behind a short prompt tail so that their
            # leading spaces / merged bytes come out as they would in the full text.
            tail = req.prompt_ids[-PROMPT_TAIL_FOR_DETOKENIZER:]
            decode_ids.append(array("l", tail + req.output_ids))
            read_offsets.append(len(tail))
            req.started_output = True
        else:
            decode_ids.append(array("l", fresh))
            read_offsets.append(0)
        new_ids.append(array("l", fresh))
        req.num_sent = len(req.output_ids)
        if req.finished:
            req.finish_sent = True

    logprob_fields = message_fields([r.logprobs for r in reqs], [r.finished for r in reqs])
    out = BatchTokenIDOutput(
        rids=[r.rid for r in reqs],
        http_worker_ipcs=[r.http_worker_ipc for r in reqs],
        finished_reasons=[r.finished_reason for r in reqs],
        decoded_texts=["" for _ in range(n)],
        decode_ids=decode_ids,
        read_offsets=read_offsets,
        output_ids=new_ids,
        skip_special_tokens=[r.skip_special_tokens for r in reqs],
        spaces_between_special_tokens=[r.spaces_between_special_tokens for r in reqs],
        no_stop_trim=[r.no_stop_trim for r in reqs],
        prompt_tokens=[len(r.prompt_ids) for r in reqs],
        reasoning_tokens=[0] * n,
        completion_tokens=[len(r.output_ids) for r in reqs],
        cached_tokens=[r.cached_tokens for r in reqs],
        **logprob_fields,
        output_token_entropy_val=None,
        output_token_sampling_mask=None,
        output_hidden_states=None,
        routed_experts=None,
        indexer_topk=None,
        placeholder_tokens_idx=None,
        placeholder_tokens_val=None,
        retraction_counts=[r.retraction_count for r in reqs],
    )
    if speculative:
        from sglang.srt.managers.io_struct import wrap_as_pickle

        out.spec_verify_ct = [r.spec_verify_ct for r in reqs]
        out.spec_num_correct_drafts = [r.spec_accepted_drafts for r in reqs]
        # Per-request counters for meta_info (see managers/tokenizer_hooks.py).
        out.customized_info = wrap_as_pickle({
            "spec_verify_ct": [r.spec_verify_ct for r in reqs],
            "spec_num_correct_drafts": [r.spec_accepted_drafts for r in reqs],
            "spec_num_proposed_drafts": [r.spec_drafted_tokens for r in reqs],
        })
    return out
