"""Hugging Face transformers as the independent reference for greedy decoding (float32)."""

from __future__ import annotations

import torch


def load_hf_model(path: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model


@torch.inference_mode()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_ids: set[int] | None = None) -> list[int]:
    """Greedy continuation with HF's own KV cache; stops after an eos id if eos_ids is given."""
    out = model.generate(
        torch.tensor([prompt_ids]),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        min_new_tokens=0 if eos_ids else max_new_tokens,
        do_sample=False,
        eos_token_id=sorted(eos_ids) if eos_ids else None,
        pad_token_id=0,
    )
    new = out[0, len(prompt_ids):].tolist()
    if eos_ids:
        for i, t in enumerate(new):
            if t in eos_ids:
                return new[: i + 1]
    return new
