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


# The load harness's ``--dataset chat``: everyday assistant requests (explanations, advice,
# short writing, some code), each sent as one user turn through the model's chat template.  A
# chat-style workload beside HumanEval's code completions: acceptance differs between the two
# (prose is harder for a small draft to guess than boilerplate code).
CHAT_DATASET = CHAT_PROMPTS + [
    "Give three tips for writing clear commit messages.",
    "What is the difference between a process and a thread?",
    "Write a short, friendly email declining a meeting invitation.",
    "Explain how HTTPS keeps a connection private, for a beginner.",
    "List the planets of the solar system in order from the sun.",
    "Why is the sky blue? Answer in one paragraph.",
    "Write a haiku about debugging late at night.",
    "How do I reverse a list in Python? Show two ways.",
    "What are the pros and cons of microservices?",
    "Explain recursion to a ten-year-old.",
    "Suggest a name for a coffee shop that also sells books.",
    "What is a hash table and why are lookups fast?",
    "Translate 'Where is the train station?' into French, Spanish and German.",
    "Write a Python class for a stack with push, pop and peek.",
    "Describe the water cycle in four steps.",
    "How does garbage collection work in Java, briefly?",
    "What should I pack for a three-day hiking trip?",
    "Explain the CAP theorem with an example.",
    "Write a regular expression that matches an email address and explain it.",
    "What is the difference between TCP and UDP?",
    "Give me a simple recipe for tomato soup.",
    "How can I improve the performance of a slow SQL query?",
    "Write a limerick about a cat who learned to code.",
    "What does a load balancer do?",
    "Explain what gradient descent is in simple terms.",
    "Write a JavaScript function that debounces another function.",
    "What are good habits for staying focused while working from home?",
    "Explain the difference between git merge and git rebase.",
    "Summarize the plot of Romeo and Juliet in three sentences.",
    "How do vaccines train the immune system?",
    "Write a unit test in pytest for a function that adds two numbers.",
    "What is the time complexity of quicksort, and why?",
]
