"""Shared fixtures: tiny models built once per session, and a real server on 127.0.0.1."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_model import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def tiny_model_path(tiny_models_dir) -> str:
    return str(build_tiny_model(tiny_models_dir / "llama", arch="llama", seed=0))


@pytest.fixture(scope="session")
def tiny_model_factory(tiny_models_dir):
    def make(arch: str = "llama", seed: int = 0, **kwargs) -> str:
        name = f"{arch}-{seed}-" + "-".join(f"{k}{v}" for k, v in sorted(kwargs.items()))
        return str(build_tiny_model(tiny_models_dir / name, arch=arch, seed=seed, **kwargs))

    return make


@pytest.fixture(scope="module")
def tiny_server(tiny_model_path, tmp_path_factory):
    from server_utils import start_server

    server = start_server(tiny_model_path, tmp_path_factory.mktemp("server"), ["--max-total-tokens", "4096"])
    yield server
    server.stop()
