"""Model configuration read from a Hugging Face checkpoint directory.

Covers the decoder families the executor implements: LlamaForCausalLM, Qwen2ForCausalLM and
Qwen3ForCausalLM.  Everything else is refused up front with a clear error, because a config we
half-understand would load and then silently compute the wrong thing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

# architectures entry in config.json -> model family
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

# RoPE variants model.RotaryEmbedding implements ("default" means no scaling).
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    architecture: str
    family: str  # "llama" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict[str, Any]]  # None, or a dict with "rope_type" linear|llama3
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # q/k/v projections carry a bias (always for Qwen2)
    o_bias: bool  # o_proj carries a bias (Llama/Qwen3 with attention_bias)
    mlp_bias: bool  # gate/up/down carry a bias (Llama's mlp_bias)
    qk_norm: bool  # per-head RMSNorm on q and k before RoPE (Qwen3)
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: Optional[int] = None
    torch_dtype: Optional[str] = None  # the checkpoint's own dtype, informational

    @property
    def num_hidden_layers(self) -> int:  # HF spelling, for code that mirrors HF configs
        return self.num_layers

    @staticmethod
    def from_pretrained(path: str | Path) -> "ModelConfig":
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} not found: is {path} a Hugging Face model directory?")
        cfg = json.loads(config_file.read_text())
        gen_file = path / "generation_config.json"
        gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
        return ModelConfig.from_dict(cfg, gen, source=str(path))

    @staticmethod
    def from_dict(cfg: dict, generation_config: Optional[dict] = None, source: str = "config") -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            named = archs or [cfg.get("model_type", "<no architectures entry>")]
            raise ValueError(
                f"unsupported architecture {', '.join(map(str, named))} in {source}; "
                f"faser_sgl's executor runs {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        family = SUPPORTED_ARCHITECTURES[arch]

        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise NotImplementedError(f"hidden_act {act!r} in {source}; only silu (SwiGLU) is implemented")
        if cfg.get("use_sliding_window"):
            raise NotImplementedError(f"sliding-window attention (use_sliding_window) in {source} is not implemented")

        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        rope_theta, rope_scaling = _read_rope(cfg, source)
        attention_bias = bool(cfg.get("attention_bias", False))

        return ModelConfig(
            architecture=arch,
            family=family,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            # Explicit null (some Llama configs) also means "derive it".
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 hard-codes bias on q/k/v and none on o; Llama and Qwen3 follow attention_bias
            # for all four projections.
            qkv_bias=True if family == "qwen2" else attention_bias,
            o_bias=False if family == "qwen2" else attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)) if family == "llama" else False,
            qk_norm=family == "qwen3",
            eos_token_ids=_merge_ids(cfg.get("eos_token_id"), (generation_config or {}).get("eos_token_id")),
            bos_token_id=cfg.get("bos_token_id"),
            torch_dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
        )


def _read_rope(cfg: dict, source: str) -> tuple[float, Optional[dict]]:
    """(rope_theta, scaling dict or None) from either config layout.

    transformers < 5 writes ``rope_theta`` and ``rope_scaling`` at the top level; transformers 5
    folds both into ``rope_parameters`` ({"rope_type": ..., "rope_theta": ..., "factor": ...}).
    """
    params = dict(cfg.get("rope_parameters") or {})
    legacy = cfg.get("rope_scaling")
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = dict(legacy) if legacy else params
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind not in SUPPORTED_ROPE_TYPES:
        raise NotImplementedError(
            f"RoPE scaling type {kind!r} in {source} is not implemented (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if kind == "default":
        return float(theta), None
    if "factor" not in scaling:
        raise ValueError(f"RoPE scaling {kind!r} in {source} has no 'factor'")
    scaling = {k: v for k, v in scaling.items() if k not in ("type", "rope_theta")}
    scaling["rope_type"] = kind
    return float(theta), scaling


def _merge_ids(*values) -> list[int]:
    """Ordered union of token ids, each value an int, a list of ints, or None."""
    out: list[int] = []
    for v in values:
        for t in v if isinstance(v, (list, tuple)) else ([] if v is None else [v]):
            if int(t) not in out:
                out.append(int(t))
    return out
