"""Tiny randomly initialised Llama / Qwen2 / Qwen3 checkpoints with a real BPE tokenizer.

Built in a second or two, offline: a byte-level BPE trained on a small built-in corpus, a chat
template, and a model saved by transformers as safetensors, so every loader and server path runs
exactly as with a real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = """
def fibonacci(n):
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

class Stack:
    def __init__(self):
        self.items = []
    def push(self, item):
        self.items.append(item)
    def pop(self):
        return self.items.pop()

The quick brown fox jumps over the lazy dog. Hello world, this is a small test corpus for a
tiny tokenizer. Speculative decoding drafts tokens with a small model and verifies them with a
large one, so the output stays exactly the same while the server gets faster.
for i in range(10): print(i * i)
what is x? and y? hello there. def add(a, b): return a + b
"""

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(dest: Path, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", bos_token=None)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(dest)
    return fast


def build_tiny_model(dest: str | Path, arch: str = "llama", seed: int = 0, vocab_size: int = 512,
                     num_layers: int = 2, hidden_size: int = 64, init_std: float = 0.15) -> Path:
    """Write a tiny checkpoint to dest (idempotent) and return its path."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    dest = Path(dest)
    if (dest / "config.json").exists() and (dest / "model.safetensors").exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(dest, vocab_size)
    common = dict(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        bos_token_id=None, tie_word_embeddings=False, rms_norm_eps=1e-6,
        # A larger init spread than the default makes greedy output varied, not one repeated id.
        initializer_range=init_std,
    )
    if arch == "llama":
        config = LlamaConfig(**common)
    elif arch == "qwen2":
        config = Qwen2Config(**common)
    elif arch == "qwen3":
        config = Qwen3Config(head_dim=hidden_size // 4, **common)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.05)  # Qwen2's q/k/v biases start at zero otherwise
    model.save_pretrained(dest)
    return dest
