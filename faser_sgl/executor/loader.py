"""Load a Hugging Face safetensors checkpoint from a local directory into CausalLM.

The model is built on the meta device (no memory, no random init) and each parameter is then
replaced by the checkpoint tensor, cast to the requested dtype and moved to the device, one
tensor at a time, so peak memory stays near one copy of the weights.

By default every weight is this process's own anonymous memory: each tensor is read from the
file with plain reads straight into its own buffer (no map of the file, so the file's pages are
never counted twice while loading).  The kernel cannot evict anonymous pages on a machine
without swap, so a pass never waits for weights to come back from disk.

``share_mapped=True`` (``--faser-share-weights-mmap``, which launch_cluster passes to its
replicas) instead keeps each CPU tensor already stored in the requested dtype as a view of a
private (copy-on-write) memory map of the file.  Its pages are then the page cache's, shared by
every process serving the same checkpoint, so N replicas on one machine hold one copy of the
weights between them instead of N; a write would give that process its own page, never touch
the file.  The price: page cache is reclaimable, so under memory pressure the kernel may drop
weight pages and a later pass re-reads them from disk (refaults; a 1-token pass once took
2.8 s instead of 0.3 s that way, docs/benchmarks.md).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from faser_sgl.executor.config import ModelConfig
from faser_sgl.executor.model import CausalLM

INDEX_FILE = "model.safetensors.index.json"
# Checkpoint tensors that carry no weight of ours (derived buffers some exporters save).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def checkpoint_files(path: Path) -> list[Path]:
    """The shard files: those the index names if there is one, else every *.safetensors."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are not there: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path} (only safetensors checkpoints load)")
    return files


def load_model(path: str | Path, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu",
               share_mapped: bool = False) -> tuple[CausalLM, ModelConfig]:
    path = Path(path)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
    config = ModelConfig.from_pretrained(path)
    device = torch.device(device)
    with torch.device("meta"):
        model = CausalLM(config)
    wanted = dict(model.named_parameters())
    loaded: set[str] = set()
    unexpected: list[str] = []

    for file in checkpoint_files(path):
        header, data_start = _read_header(file)
        mapped = _map_tensors(file, header, data_start) if share_mapped and device.type == "cpu" else {}
        with open(file, "rb", buffering=0) as raw:
            # In file order, so that the reads are sequential.
            for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
                if name == "lm_head.weight" and config.tie_word_embeddings:
                    continue  # tied: the embedding matrix serves as lm_head
                if name not in wanted:
                    if not name.endswith(IGNORED_SUFFIXES):
                        unexpected.append(name)
                    continue
                tensor = mapped.get(name)
                if tensor is None or tensor.dtype != dtype:
                    tensor = _read_tensor(raw, entry, data_start)
                if tensor is None:  # a dtype the plain reads do not handle
                    with safe_open(str(file), framework="pt", device="cpu") as f:
                        tensor = f.get_tensor(name)
                expected = tuple(wanted[name].shape)
                if tuple(tensor.shape) != expected:
                    raise ValueError(f"{file.name}: {name} has shape {tuple(tensor.shape)}, "
                                     f"the config implies {expected}")
                _set_parameter(model, name, tensor.to(device=device, dtype=dtype))
                loaded.add(name)
                del tensor  # a cast or moved tensor's source goes now, not with the next one
        del mapped

    missing = sorted(set(wanted) - loaded)
    if missing:
        hint = ""
        if missing == ["lm_head.weight"]:
            hint = " (the checkpoint has no lm_head: set tie_word_embeddings in config.json if it is tied)"
        raise ValueError(f"checkpoint {path} lacks {len(missing)} weight(s): "
                         f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}{hint}")
    if unexpected:
        # A weight we would ignore means the config and the checkpoint disagree about the
        # architecture (e.g. biases the config does not announce): refuse rather than guess.
        raise ValueError(f"checkpoint {path} has {len(unexpected)} weight(s) this architecture does "
                         f"not use: {', '.join(sorted(unexpected)[:5])}")
    model.eval()
    model.requires_grad_(False)
    return model, config


# safetensors dtype names of the dtypes load_model serves.
_MAPPABLE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _read_header(file: Path) -> tuple[dict, int]:
    """A safetensors file's tensor entries (dtype, shape, data_offsets) and where its data
    starts (layout: an 8-byte little-endian header length, the JSON header, the data)."""
    with open(file, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(header_len))
    header.pop("__metadata__", None)
    return header, 8 + header_len


def _read_tensor(raw, entry: dict, data_start: int) -> torch.Tensor | None:
    """One tensor read into a new buffer of its own (None for a dtype load_model does not
    serve: safe_open reads those)."""
    dtype = _MAPPABLE_DTYPES.get(entry.get("dtype"))
    if dtype is None:
        return None
    begin, end = entry["data_offsets"]
    buffer = torch.empty(end - begin, dtype=torch.uint8)
    view = memoryview(buffer.numpy())
    done = 0
    while done < len(view):  # a read may return less than asked (large tensors do)
        got = os.preadv(raw.fileno(), [view[done:]], data_start + begin + done)
        if got <= 0:
            raise ValueError(f"{raw.name}: the file ends inside tensor data")
        done += got
    return buffer.view(dtype).view(entry["shape"])


def _map_tensors(file: Path, header: dict, data_start: int) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a view of one copy-on-write map of it."""
    with open(file, "rb") as fh:
        # ACCESS_COPY: MAP_PRIVATE, writable for torch.frombuffer, but a write stays in this
        # process.  The tensors keep the map alive; the file may be closed.
        buffer = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    tensors = {}
    for name, entry in header.items():
        dtype = _MAPPABLE_DTYPES.get(entry.get("dtype"))
        if dtype is None:
            continue
        begin, end = entry["data_offsets"]
        count = (end - begin) // dtype.itemsize
        if count == 0 or (data_start + begin) % dtype.itemsize:
            continue  # empty or misaligned: read into a buffer of its own instead
        tensors[name] = torch.frombuffer(buffer, dtype=dtype, count=count,
                                         offset=data_start + begin).view(entry["shape"])
    return tensors


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_path, _, attr = name.rpartition(".")
    module = model.get_submodule(module_path)
    setattr(module, attr, nn.Parameter(tensor, requires_grad=False))
