"""SGLang's custom logit processors (--enable-custom-logit-processor), served as SGLang does.

A request carries a processor serialized by ``CustomLogitProcessor.to_str()`` and its
``sampling_params.custom_params``; the processor is called on the request's logit row before a
token is drawn from it, with the request's params dict (the same dict at every call, with
``"__req__"`` set to the request, so a stateful processor can count calls and read
``__req__.output_ids``).  As in SGLang it runs after penalties, logit bias and the grammar mask
and before temperature and top-k/p, and the logprobs reported are those of the processed row.

Under speculation such a request drafts nothing: a processor is arbitrary code that may keep
state per call, so it must see exactly one call per generated token, in order, each on the
row of the token the request really has; verification rows of drafts that may be rejected
would break that.  (The rest of the batch keeps drafting.)
"""

from __future__ import annotations

import torch


class LogitProcessorError(ValueError):
    pass


def load(serialized: str | None, enabled: bool):
    """The processor of a request, or None; LogitProcessorError if it cannot be served."""
    if not serialized:
        return None
    if not enabled:  # (SGLang's TokenizerManager refuses these first; a direct caller may not)
        raise LogitProcessorError("custom_logit_processor needs the server started with "
                                  "--enable-custom-logit-processor")
    from sglang.srt.sampling.custom_logit_processor import CustomLogitProcessor

    try:
        return CustomLogitProcessor.from_str(serialized)
    except Exception as err:  # a payload that does not deserialize is the client's error
        raise LogitProcessorError(f"custom_logit_processor could not be loaded: {err}") from None


def params_of(req, custom_params) -> dict:
    """The params dict handed to the processor at every call for req."""
    params = dict(custom_params) if isinstance(custom_params, dict) else {}
    params["__req__"] = req
    return params


def apply(req, logits: torch.Tensor) -> torch.Tensor:
    """req's processor on its logit rows ([rows, vocab], one per token to draw); a new tensor."""
    rows = logits.shape[0]
    out = req.logit_processor(logits.clone(), [req.logit_params] * rows)
    if out.shape != logits.shape:
        raise RuntimeError(f"custom logit processor returned shape {tuple(out.shape)} for "
                           f"logits of shape {tuple(logits.shape)}")
    return out
