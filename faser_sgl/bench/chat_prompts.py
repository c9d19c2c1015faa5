"""The chat prompts of the in-process benchmarks (scripts/bench_*.py): code and prose, short,
so that tokens/s reflects decoding rather than prefill."""

from __future__ import annotations

CHAT_PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Explain what a mutex is in two sentences.",
    "def merge_sort(xs):",
    "Write a SQL query that counts orders per customer.",
    "What does the `yield` keyword do in Python?",
    "Write a bash one-liner that counts lines in all .py files.",
    "Implement binary search in JavaScript.",
    "Summarize the idea of speculative decoding for LLM inference.",
]


def chat_prompt_ids(tokenizer, num_prompts: int, prompts: list[str] = CHAT_PROMPTS) -> list[list[int]]:
    """The first num_prompts prompts as user turns through the model's chat template (the list
    repeats when more are asked for than it has, e.g. for concurrency 16)."""
    return [list(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=True, return_dict=True)["input_ids"])
            for p in (prompts[i % len(prompts)] for i in range(num_prompts))]
