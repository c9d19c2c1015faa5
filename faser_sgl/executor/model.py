"""Llama / Qwen2 / Qwen3 decoder in plain torch, run over one ragged ForwardBatch.

Module and parameter names mirror Hugging Face's (``model.layers.N.self_attn.q_proj.weight``...)
so that checkpoints load by name.  The numerics follow HF's as well (RMSNorm in float32, RoPE
tables in float32 then cast, rotate_half convention) so float32 logits agree to ~1e-5.

The layer loop is explicit: ``forward`` = ``embed`` -> ``forward_layers(0, L)`` -> ``compute_logits``,
so that verification can later run layers in segments and stop or prune rows in between.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from faser_sgl.executor.attention.base import AttentionBackend
from faser_sgl.executor.config import ModelConfig
from faser_sgl.executor.forward_batch import ForwardBatch
from faser_sgl.executor.kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            # One fused op instead of seven small ones; in float32 it is HF's arithmetic (the
            # per-layer dispatch of the small ops cost ~2% of a CPU decode step).
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalise in float32 and scale in the model dtype, exactly as HF does.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class RotaryEmbedding:
    """cos/sin tables for arbitrary positions (HF's rotate_half convention).

    Not an nn.Module on purpose: the frequencies are derived from the config, never loaded, and
    computing them per device on first use keeps meta-device construction in the loader simple.
    """

    def __init__(self, config: ModelConfig):
        self.head_dim = config.head_dim
        self.theta = config.rope_theta
        self.scaling = config.rope_scaling
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            # On the host, as HF computes them, then moved: the same bits on every device.
            exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device="cpu").float() / self.head_dim
            inv = 1.0 / (self.theta ** exponents)
            if self.scaling is not None:
                kind = self.scaling["rope_type"]
                if kind == "linear":
                    inv = inv / self.scaling["factor"]
                elif kind == "llama3":
                    inv = _llama3_inv_freq(inv, self.scaling)
            self._inv_freq[device] = inv.to(device)
        return self._inv_freq[device]

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [T, 1, head_dim] (broadcast over heads), in dtype."""
        freqs = positions.float()[:, None] * self.inv_freq(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1 frequency scaling: low frequencies divided by factor, high ones kept, and a
    smooth blend in between (wavelengths measured against the original context length)."""
    factor = s["factor"]
    low, high = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s.get("original_max_position_embeddings", 8192)
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.qkv_proj = None  # set by fuse_projections, replacing the three above

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: ForwardBatch,
                kv_cache: KVCache, attn: AttentionBackend) -> torch.Tensor:
        t = x.shape[0]
        if self.qkv_proj is not None:
            kv_dim = self.num_kv_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split([self.num_heads * self.head_dim, kv_dim, kv_dim], dim=-1)
            v = v.contiguous()  # q and k are copied by RoPE below; v goes to the cache as is
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:  # Qwen3 normalises each head before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attn.forward(self.layer_id, q, k, v, kv_cache, batch)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.gate_up_proj = None  # set by fuse_projections, replacing gate_proj and up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


def _concat_linears(parts: list[nn.Linear]) -> nn.Linear:
    """One linear whose output is the parts' outputs side by side."""
    weight = torch.cat([p.weight.detach() for p in parts])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=parts[0].bias is not None, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if parts[0].bias is not None:
        fused.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]), requires_grad=False)
    return fused


def fuse_projections(model: "CausalLM") -> None:
    """Replace q/k/v by one qkv_proj and gate/up by one gate_up_proj in every layer (after
    loading, which goes by the checkpoint's separate names).  Each output element is the same
    dot product, so results change by float32 rounding at most; a pass makes two linear calls
    fewer per layer, and the wider products run closer to the weight-read limit on a CPU
    (docs/benchmarks.md).  One layer at a time, so memory peaks at one extra layer."""
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.qkv_proj is None:
            attn.qkv_proj = _concat_linears([attn.q_proj, attn.k_proj, attn.v_proj])
            attn.q_proj = attn.k_proj = attn.v_proj = None
        if mlp.gate_up_proj is None:
            mlp.gate_up_proj = _concat_linears([mlp.gate_proj, mlp.up_proj])
            mlp.gate_proj = mlp.up_proj = None


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_id)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, rope, batch, kv_cache, attn) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, batch, kv_cache, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    """HF's ``model.*`` submodule: embeddings, layers, final norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        # Tied checkpoints reuse the embedding matrix; a separate lm_head would only duplicate
        # it (and tying two Parameters across meta -> device moves is fragile).
        self.lm_head = None if config.tie_word_embeddings else \
            nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config)
        # Set by executor.cpu_linear on a CPU: the LM head as a row-count-aware linear.
        self.logits_linear = None

    @property
    def num_layers(self) -> int:
        return len(self.model.layers)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def rope(self, batch: ForwardBatch, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary(batch.positions, dtype)

    def forward_layers(self, hidden: torch.Tensor, batch: ForwardBatch, kv_cache: KVCache,
                       attn: AttentionBackend, start: int, end: int,
                       rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Run layers [start, end) on hidden ([T, hidden]); each layer writes its K/V for the
        batch's new tokens.  ``rope`` can be passed in to share it between segments."""
        if rope is None:
            rope = self.rope(batch, hidden.dtype)
        for layer in self.model.layers[start:end]:
            hidden = layer(hidden, rope, batch, kv_cache, attn)
        return hidden

    def plain_lm_head_weight(self) -> torch.Tensor:
        """The LM head as a plain [vocab, hidden] matrix, for code that reads rows of it (early
        exit's logit lens).  A packed LM head (executor.cpu_linear) cannot be read by row, so
        the first call turns it back into a plain one: the head is kept once, in the form its
        readers need (about 0.9 GB for a 1.5B model's untied head), and the logits go through
        F.linear from then on."""
        if self.lm_head is None:
            return self.model.embed_tokens.weight
        if not isinstance(self.lm_head, nn.Linear):
            plain = nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False)
            plain.weight = nn.Parameter(self.lm_head.dense_weight(), requires_grad=False)
            self.lm_head = plain  # the packed head goes with the module it belonged to
            if self.logits_linear is not None:
                self.logits_linear = plain
        return self.lm_head.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + lm_head on the given rows ([L, hidden]) -> float32 [L, vocab]."""
        hidden = self.model.norm(hidden)
        if self.logits_linear is not None:
            return self.logits_linear(hidden).float()
        return F.linear(hidden, self.plain_lm_head_weight()).float()

    def forward(self, batch: ForwardBatch, kv_cache: KVCache, attn: AttentionBackend) -> torch.Tensor:
        """Float32 logits for the rows batch.logits_indices: [L, vocab]."""
        attn.begin_forward(batch)
        hidden = self.embed(batch.input_ids)
        rope = self.rope(batch, hidden.dtype)
        hidden = self.forward_layers(hidden, batch, kv_cache, attn, 0, self.num_layers, rope)
        return self.compute_logits(hidden[batch.logits_indices])
