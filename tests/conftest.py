"""Shared fixtures: tiny models built once (cached, see tiny_model.py), and a real server on
127.0.0.1."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Greedy-identity checks compare against a float32 reference: "--faser-dtype auto" stays float32
# here even on CPUs where it would pick bfloat16 (executor/cpu_dtype.py); servers inherit this.
os.environ.setdefault("FASER_SGL_CPU_DTYPE", "float32")

from tiny_model import get_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_factory():
    """make(arch="llama"|"qwen2"|"qwen3", seed=0, **build_kwargs) -> model directory (str).
    Built once per distinct arguments and cached across sessions (tiny_model.get_tiny_model)."""
    return get_tiny_model


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    return get_tiny_model("llama", seed=0)


@pytest.fixture(scope="module")
def tiny_server(tiny_model_path, tmp_path_factory):
    from server_utils import start_server

    server = start_server(tiny_model_path, tmp_path_factory.mktemp("server"), ["--max-total-tokens", "4096"])
    yield server
    server.stop()


# The target with every weight perturbed by 2% (relative): as a draft it agrees with the tiny
# llama target often but not always (greedy acceptance ~0.45, temperature 1 ~0.85 on the
# speculative tests' prompts), so partial acceptance and the rollback after it are exercised.
PARTIAL_DRAFT = {"arch": "llama", "seed": 0, "noise_std": 0.02, "noise_seed": 1}


@pytest.fixture(scope="session")
def partial_draft_path() -> str:
    return get_tiny_model(**PARTIAL_DRAFT)


@pytest.fixture(scope="session")
def head_dim64_pair() -> tuple[str, str]:
    """(target, draft) at head_dim 64, for FlashInfer (tiny_model.HEAD_DIM64_TARGET says why)."""
    from tiny_model import HEAD_DIM64_DRAFT, HEAD_DIM64_TARGET

    return get_tiny_model(**HEAD_DIM64_TARGET), get_tiny_model(**HEAD_DIM64_DRAFT)
