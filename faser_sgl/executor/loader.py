"""Load a Hugging Face safetensors checkpoint from a local directory into CausalLM."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from faser_sgl.executor.config import ModelConfig
from faser_sgl.executor.model import CausalLM


def load_model(path: str | Path, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> tuple[CausalLM, ModelConfig]:
    path = Path(path)
    config = ModelConfig.from_pretrained(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    with torch.device("meta"):
        model = CausalLM(config)
    params = dict(model.named_parameters())
    loaded: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name in params:
                    loaded[name] = f.get_tensor(name).to(dtype)
    if "lm_head.weight" not in loaded and "model.embed_tokens.weight" in loaded:
        # Tied embeddings: the checkpoint stores the matrix once.
        loaded["lm_head.weight"] = loaded["model.embed_tokens.weight"]
    missing = sorted(set(params) - set(loaded))
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} weights, e.g. {missing[:3]}")
    for name, tensor in loaded.items():
        expected = tuple(params[name].shape)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {expected}")
    model.load_state_dict(loaded, strict=False, assign=True)
    # Buffers (rotary frequencies) were created on the meta device: rebuild them for real.
    model.model.rotary_emb = type(model.model.rotary_emb)(config)
    model.to(device)
    model.eval()
    return model, config
