"""Decide where a request's output ends after new tokens are appended.

Speculative decoding can accept several tokens in one step, so the check takes the whole run of
new tokens and returns how many of them to keep: everything after the first stop token, stop
string or length limit is dropped, never emitted.
"""

from __future__ import annotations

from typing import Optional

from faser_sgl.managers.request import Request, finish_length, finish_stop


class StopChecker:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer  # may be None (--skip-tokenizer-init): no stop strings then

    def append(self, req: Request, new_tokens: list[int]) -> int:
        """Append new_tokens to req.output_ids up to the first finish condition.

        Sets req.finished_reason when the request finished; returns the number appended.
        """
        if len(req.output_ids) >= req.stop.max_new_tokens:
            # max_new_tokens=0 (a prefill-only request: input logprobs, prefix caching): the
            # prompt's last row was computed, its token is not output.
            req.finished_reason = finish_length(req.stop.max_new_tokens)
            return 0
        for i, token in enumerate(new_tokens):
            req.output_ids.append(token)
            reason = self._finish_reason(req, token)
            if reason is not None:
                req.finished_reason = reason
                return i + 1
        return len(new_tokens)

    def _finish_reason(self, req: Request, token: int) -> Optional[dict]:
        stop = req.stop
        if token in stop.stop_token_ids and len(req.output_ids) > stop.min_new_tokens:
            return finish_stop(token)
        if stop.stop_strs and self.tokenizer is not None:
            matched = self._matched_stop_str(req)
            if matched is not None:
                return finish_stop(matched)
        if stop.stop_regexes and self.tokenizer is not None:
            matched = self._matched_stop_regex(req)
            if matched is not None:
                return finish_stop(matched)
        if len(req.output_ids) >= stop.max_new_tokens:
            return finish_length(stop.max_new_tokens)
        return None

    def _matched_stop_str(self, req: Request) -> Optional[str]:
        # A stop string that completes with this token lies within its last few tokens; decode
        # a window one token longer than the longest stop string (tokens can merge characters).
        window = req.output_ids[-(req.stop.stop_str_max_tokens + 2):]
        text = self.tokenizer.decode(window, skip_special_tokens=req.skip_special_tokens)
        for s in req.stop.stop_strs:
            if s in text:
                return s
        return None

    def _matched_stop_regex(self, req: Request) -> Optional[str]:
        """The first stop_regex pattern found in the output's tail (SGLang's rule and its
        matched_stop: the pattern itself)."""
        window = req.output_ids[-(req.stop.stop_regex_max_len + 1):]
        text = self.tokenizer.decode(window, skip_special_tokens=req.skip_special_tokens)
        for pattern in req.stop.stop_regexes:
            if pattern.search(text):
                return pattern.pattern
        return None
