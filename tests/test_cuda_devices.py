"""CUDA device indices and CUDA splits, checked on a CPU (issue 24, defects 2 and 3).

A GPU-less machine cannot build a CUDA stream, but the start-up path that failed on a GPU is
plain Python: which device string the scheduler passes down, what ``torch.cuda.set_device`` is
given in the draft lane, whether FlashInfer's green-context split is reached with an indexed
device, and what happens (and is said) when it refuses.  These tests fake the CUDA runtime's
edges (the device count and SMs, the stream object, the driver's set-device call, the
green-context module) and run the real code between them: torch's own ``set_device`` still
rejects an index-less device exactly as it does on a GPU.  The CUDA tests
(test_frontier_pipeline.py, test_speculative_cuda.py) check the same on the device."""

from __future__ import annotations

import logging
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from faser_sgl.executor.device import indexed_device, is_cuda
from faser_sgl.managers.scheduler import resolve_dtype, scheduler_device
from faser_sgl.speculative import lanes

ROOT = Path(__file__).resolve().parent.parent
SMS = 132  # an H100 SXM's SM count


class FakeStream:
    def __init__(self, device=None, label="plain"):
        self.device, self.label = device, label


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda as far as building a split goes, on a CPU: device 0 with SMS SMs; the
    driver's set-device call records its index (torch.cuda.set_device itself runs as is)."""
    bound: list[int] = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(multi_processor_count=SMS))
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch._C, "_cuda_setDevice", bound.append, raising=False)
    return bound


def fake_green_ctx(monkeypatch, calls: list):
    """A flashinfer.green_ctx whose split behaves like the real one on a Hopper GPU: the driver
    device is looked up by ``dev.index`` (None is a TypeError there), SM counts are rounded up
    to multiples of 8, and the streams are the draft's group then the remainder."""
    def split_device_green_ctx_by_sm_count(dev, sm_counts):
        if dev.index is None:
            raise TypeError("an integer is required (cuDeviceGet(None))")
        calls.append((dev, list(sm_counts)))
        rounded = [-(-n // 8) * 8 for n in sm_counts]
        counts = rounded + [SMS - sum(rounded)]
        resources = [types.SimpleNamespace(sm=types.SimpleNamespace(smCount=n)) for n in counts]
        return [FakeStream(dev, f"green{n}") for n in counts], resources

    module = types.ModuleType("flashinfer.green_ctx")
    module.split_device_green_ctx_by_sm_count = split_device_green_ctx_by_sm_count
    monkeypatch.setitem(sys.modules, "flashinfer", types.ModuleType("flashinfer"))
    monkeypatch.setitem(sys.modules, "flashinfer.green_ctx", module)


def close_all(splits):
    for s in splits:
        s.close()


# -- defect 2: an indexed device everywhere below the options ---------------------------------

def test_the_lane_binds_an_index_less_cuda_device_by_its_index(fake_cuda):
    """The server passed "cuda"; the lane's torch.cuda.set_device("cuda") raised "Expected a
    torch.device with a specified index" and every faser run on a GPU died at start-up."""
    splits = lanes.make_splits("cuda", 0)  # plain streams: no green context involved
    try:
        assert [s.name for s in splits] == ["cuda:streams"]
        assert splits[0].device == torch.device("cuda", 0)
        assert fake_cuda == [0]  # the lane thread bound itself to cuda:0
    finally:
        close_all(splits)


def test_the_scheduler_runs_on_an_indexed_device():
    assert scheduler_device("flashinfer", 0) == "cuda:0"
    assert scheduler_device("flashinfer", 3) == "cuda:3"  # the launcher's GPU id
    assert scheduler_device("flashinfer", None, current_index=lambda: 2) == "cuda:2"
    assert scheduler_device("torch", 5) == "cpu"
    assert resolve_dtype("auto", "cuda:1") == torch.bfloat16 and resolve_dtype("auto", "cpu") == torch.float32


def test_indexed_device():
    assert indexed_device("cuda", current_index=lambda: 1) == torch.device("cuda", 1)
    assert indexed_device("cuda:2") == torch.device("cuda", 2)
    assert indexed_device("cuda", 4) == torch.device("cuda", 4)
    assert indexed_device("cpu", 4) == torch.device("cpu")
    with pytest.raises(ValueError, match="contradicts"):
        indexed_device("cuda:1", 2)
    assert is_cuda("cuda:3") and is_cuda(torch.device("cuda")) and not is_cuda("cpu")


TYPE_NAMES = {"kind"}  # variables that hold a device's type, not a device (model_runner._pool_size)


def test_no_device_is_compared_to_a_bare_cuda_string():
    """`device == "cuda"` is False for "cuda:0": compare ``torch.device(d).type`` (or is_cuda)."""
    offenders = []
    for path in (ROOT / "faser_sgl").rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for m in re.finditer(r"""([\w.\]\)]+)\s*[!=]=\s*["']cuda["']""", line):
                if not (m.group(1).endswith(".type") or m.group(1) in TYPE_NAMES):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
            if re.search(r"""device\w*\.startswith\(["']cuda["']\)""", line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, offenders


# -- defect 3: green contexts engage, or the fallback says why under a name of its own ----------

def test_green_contexts_engage_on_an_index_less_device(fake_cuda, monkeypatch):
    """The split reached FlashInfer with "cuda" (no index): its TypeError was swallowed and
    every split silently ran on plain streams under the one name "cuda:streams"."""
    calls: list = []
    fake_green_ctx(monkeypatch, calls)
    splits = lanes.make_splits("cuda")  # the faser default: candidates of a quarter and a half
    try:
        assert [s.name for s in splits] == ["cuda:100+32sm", "cuda:68+64sm"]
        assert all(s.green and s.fallback_reason is None for s in splits)
        assert calls == [(torch.device("cuda", 0), [32]), (torch.device("cuda", 0), [64])]
        assert splits[0].draft_stream.label == "green32" and splits[0].target_stream.label == "green100"
    finally:
        close_all(splits)


def test_granted_sms_name_the_split(fake_cuda, monkeypatch):
    fake_green_ctx(monkeypatch, [])
    split = lanes.CudaSplit("cuda:0", 12)  # rounded up to 16 by the green-context split
    try:
        assert split.name == "cuda:116+16sm" and split.draft_sms == 12
    finally:
        split.close()


def test_a_refused_green_context_is_logged_with_its_reason_and_named_apart(fake_cuda, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "flashinfer.green_ctx", None)  # import raises ImportError
    with caplog.at_level(logging.WARNING, logger="faser_sgl.lanes"):
        splits = lanes.make_splits("cuda")
    try:
        names = [s.name for s in splits]
        assert names == ["cuda:streams[32sm unavailable]", "cuda:streams[64sm unavailable]"]
        assert len(set(names + [lanes.cuda_split_name(None)])) == 3  # and apart from plain streams
        for s in splits:
            assert not s.green and "green_ctx" in s.fallback_reason  # ModuleNotFoundError
            assert isinstance(s.draft_stream, FakeStream) and s.draft_stream.label == "plain"
        logged = [r.getMessage() for r in caplog.records if r.name == "faser_sgl.lanes"]
        assert len(logged) == 2
        assert all("ModuleNotFoundError" in m and "no green contexts" in m for m in logged), logged
        assert "cuda:streams[32sm unavailable]" in logged[0]
    finally:
        close_all(splits)


def test_a_driver_refusal_is_logged_too(fake_cuda, monkeypatch, caplog):
    module = types.ModuleType("flashinfer.green_ctx")

    def refuse(dev, sm_counts):
        raise RuntimeError("CUDA error code=915(CUDA_ERROR_INVALID_RESOURCE_CONFIGURATION)")

    module.split_device_green_ctx_by_sm_count = refuse
    monkeypatch.setitem(sys.modules, "flashinfer", types.ModuleType("flashinfer"))
    monkeypatch.setitem(sys.modules, "flashinfer.green_ctx", module)
    with caplog.at_level(logging.WARNING, logger="faser_sgl.lanes"):
        split = lanes.CudaSplit("cuda", 8)
    try:
        assert split.name == "cuda:streams[8sm unavailable]"
        assert "INVALID_RESOURCE_CONFIGURATION" in split.fallback_reason
        assert any("INVALID_RESOURCE_CONFIGURATION" in r.getMessage() for r in caplog.records)
    finally:
        split.close()


def test_splits_of_one_name_are_refused():
    class Named:
        closed = False

        def __init__(self, name):
            self.name = name

        def close(self):
            self.closed = True

    twins = [Named("cuda:streams"), Named("cuda:streams")]
    with pytest.raises(RuntimeError, match="distinct names"):
        lanes._distinct(twins)
    assert all(t.closed for t in twins)
    assert lanes._distinct([Named("a"), Named("b")])
