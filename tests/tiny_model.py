"""Tiny, randomly initialised Hugging Face checkpoints for tests: no hub, a few seconds to build.

``build_tiny_model(dest, arch=...)`` writes a complete model directory: config.json,
generation_config.json, model.safetensors and a real byte-level BPE tokenizer (trained here on
a small built-in corpus) with ChatML special tokens and a chat template, loadable offline with
AutoTokenizer / AutoModelForCausalLM and servable by faser_sgl.

``get_tiny_model(arch=..., **kw)`` builds once into a cache directory keyed by the arguments and
by this file's source, so test modules (and repeated test runs) share one build.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch a model hub

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
EOS_TOKEN = "<|im_end|>"  # end of an assistant turn: the model's eos everywhere
PAD_TOKEN = "<|endoftext|>"  # also a generation_config eos, as in Qwen's instruct models

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# Training text for the tokenizer: enough distinct English and code to learn a few hundred
# merges in well under a second.
CORPUS = """
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
What is a closure? A closure is a function that remembers the variables of the scope it was made in.
Hello world! How are you today? I am fine, thank you, and you? The weather is nice, so we walk to the station.
Speculative decoding lets a small draft model propose tokens that a larger target model verifies in one pass.
A hash map stores keys and values; lookups take constant time on average, but collisions can slow them down.
Translate to French: the cat sleeps on the warm window sill while the rain falls outside.
Write a Python function that checks whether a number is prime, then explain how it works step by step.
Servers batch many requests together so that the accelerator stays busy and every user sees low latency.
The scheduler admits new requests, splits long prompts into chunks, and frees memory when requests finish.
Once upon a time there was a small robot who wanted to learn how to paint the colours of the sea.
In the morning the market opens early; farmers bring apples, bread, cheese, honey and fresh green beans.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 256 1024 3.14159 2.71828 -1 +7 1e-6 0x1F 0b1010.
def quicksort(xs):
    if len(xs) <= 1:
        return xs
    pivot, rest = xs[0], xs[1:]
    return quicksort([x for x in rest if x < pivot]) + [pivot] + quicksort([x for x in rest if x >= pivot])

def fibonacci(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a

class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        return self.items.pop()

import json, os, sys
with open("data.json") as f:
    data = json.load(f)
print({"name": "value", "count": len(data)})
for i, line in enumerate(sys.stdin):
    if not line.strip():
        continue
    print(i, line.upper())
const add = (a, b) => a + b; let total = [1, 2, 3].reduce(add, 0); console.log(`total=${total}`);
SELECT name, COUNT(*) FROM users WHERE age > 21 GROUP BY name ORDER BY COUNT(*) DESC;
fn main() { let v: Vec<i32> = (1..10).collect(); println!("{:?}", v); }
#include <stdio.h>
int main(void) { printf("hello, world\\n"); return 0; }
"""


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in CORPUS.splitlines() if line.strip()]
    # Repeat the corpus so that pair counts separate clearly and merges are deterministic.
    tok.train_from_iterator(lines * 4, trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer learned {tok.get_vocab_size()} tokens, wanted {vocab_size}: "
                           "grow CORPUS or lower vocab_size")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def _randomise(model, seed: int, std: float, noise_std: float = 0.0, noise_seed: int = 0) -> None:
    """Weights with enough spread that greedy outputs vary and have clear argmax margins:
    HF's default init (std 0.02, zero biases, unit norms) gives near-flat logits, where tiny
    float differences flip argmax ties and biases/norm weights are never exercised."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))
        if noise_std > 0:
            # A relative perturbation of every weight: the model stays close to the unperturbed
            # one (same seed), so as a draft it agrees with it often but not always.
            noise = torch.Generator().manual_seed(10_000 + noise_seed)
            for _, p in model.named_parameters():
                p.mul_(1.0 + noise_std * torch.randn(p.shape, generator=noise))


# For FlashInfer tests: a tiny llama at head_dim 64 (hidden 128 over 2 query heads, 1 KV head:
# GQA group 2, which FlashInfer's FA2 prefill instantiates).  The default tiny models have head_dim
# 16, which FA2's prefill kernels refuse (they need head_dim / 16 >= 4 MMA tiles).  Hidden 128 and
# intermediate 128 keep each checkpoint ~1.7 MiB (hidden 256 made them 5.6 MiB, too much for the
# GPU check's 64 MiB carry).  The weights' spread is the default 0.15 scaled by sqrt(64 / hidden)
# (here 1/sqrt(2)), so logits spread about as the default model's do.  The draft is the target
# perturbed by 2%, as conftest's PARTIAL_DRAFT is the default target's.  Other tests' models are
# unchanged.
HEAD_DIM64_TARGET = {"arch": "llama", "seed": 0, "hidden_size": 128, "num_heads": 2, "num_kv_heads": 1,
                     "intermediate_size": 128, "init_std": 0.106}
HEAD_DIM64_DRAFT = {**HEAD_DIM64_TARGET, "noise_std": 0.02, "noise_seed": 1}


def build_tiny_model(dest_dir: str | os.PathLike, arch: str = "llama", seed: int = 0, vocab_size: int = 512,
                     hidden_size: int = 64, num_layers: int = 3, num_heads: int = 4, num_kv_heads: int = 2,
                     intermediate_size: int = 128, max_position_embeddings: int = 1024,
                     rope_scaling: dict | None = None, tie_word_embeddings: bool | None = None,
                     init_std: float = 0.15, noise_std: float = 0.0, noise_seed: int = 0) -> str:
    """Write a tiny random ``arch`` model ("llama" | "qwen2" | "qwen3") with its tokenizer to
    dest_dir and return the path.  ``noise_std`` > 0 multiplies every weight of the ``seed``
    model by (1 + noise_std * N(0, 1)) (noise drawn from ``noise_seed``): a draft that partly
    agrees with that model.  tie_word_embeddings defaults to True for qwen2 (as in the
    small Qwen2.5 models) and False otherwise; rope_scaling is passed through (e.g. llama3)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(vocab_size)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)

    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if rope_scaling:
        rope = {**rope_scaling, "rope_theta": 10000.0}
    config = AutoConfig.for_model(
        arch,
        architectures=[ARCHITECTURES[arch]],
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        rope_parameters=rope,
        tie_word_embeddings=(arch == "qwen2") if tie_word_embeddings is None else tie_word_embeddings,
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        use_sliding_window=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomise(model, seed, init_std, noise_std, noise_seed)
    model.generation_config = GenerationConfig(bos_token_id=pad_id, eos_token_id=[eos_id, pad_id],
                                               pad_token_id=pad_id)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return str(dest)


def _cache_root() -> Path:
    return Path(os.environ.get("FASER_SGL_TEST_CACHE", Path(tempfile.gettempdir()) / "faser_sgl_tiny_models"))


def get_tiny_model(arch: str = "llama", **kwargs) -> str:
    """build_tiny_model, cached: the directory is keyed by the arguments and this file's source,
    and written under a temporary name then renamed, so concurrent builders never see half a
    model."""
    source = Path(__file__).read_bytes()
    key_src = json.dumps({"arch": arch, **kwargs}, sort_keys=True).encode() + source
    key = hashlib.sha256(key_src).hexdigest()[:16]
    root = _cache_root()
    final = root / f"{arch}-{key}"
    if (final / "config.json").is_file():
        return str(final)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{arch}-", dir=root))
    try:
        build_tiny_model(tmp, arch=arch, **kwargs)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final)
