"""CUDA devices always carry their index below the options ("cuda:0", never "cuda").

An index-less CUDA device breaks things that only show on a GPU: ``torch.cuda.set_device`` (a
pipeline lane binding its thread) refuses it, FlashInfer's green contexts look the driver device
up by ``device.index`` (None raises a TypeError), and it compares unequal to the ``cuda:N`` that
every tensor reports, so ``tensor.device != runner.device`` holds even on the right device.  The
options say "CUDA"; the scheduler and the executor turn that into one indexed device here.
"""

from __future__ import annotations

import torch


def indexed_device(device: str | torch.device, index: int | None = None,
                   current_index=None) -> torch.device:
    """``device`` as a ``torch.device``; a CUDA device always with an index: ``index`` when given
    (the launcher's GPU id), else the one ``device`` names, else the current CUDA device
    (``current_index()``, by default ``torch.cuda.current_device``; a test passes a fake)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device
    if index is not None:
        if device.index is not None and device.index != index:
            raise ValueError(f"device {device} contradicts GPU index {index}")
        return torch.device("cuda", int(index))
    if device.index is not None:
        return device
    return torch.device("cuda", int((current_index or torch.cuda.current_device)()))


def is_cuda(device: str | torch.device) -> bool:
    """True for "cuda" and "cuda:N" alike (never compare a device string to "cuda")."""
    return torch.device(device).type == "cuda"
