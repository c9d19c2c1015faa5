"""``--faser-dtype auto`` on a CPU (executor/cpu_dtype.py): bf16 only where the flags say the
CPU multiplies it natively and a timing confirms it is faster."""

from __future__ import annotations

import pytest
import torch

from faser_sgl.executor import cpu_dtype


@pytest.fixture
def unpinned(monkeypatch):
    monkeypatch.delenv(cpu_dtype.ENV_VAR, raising=False)


def _never_measured():
    raise AssertionError("a CPU without native bf16 must not be timed")


def test_without_native_flags_float32_and_no_timing(unpinned):
    dtype, why = cpu_dtype.choose_cpu_dtype({"avx2", "avx512f", "fma"}, measure=_never_measured)
    assert dtype == torch.float32 and "emulated" in why


@pytest.mark.parametrize("flag", ["amx_bf16", "avx512_bf16"])
def test_native_flag_and_faster_timing_picks_bf16(unpinned, flag):
    dtype, why = cpu_dtype.choose_cpu_dtype({flag, "avx512f"}, measure=lambda: 0.5)
    assert dtype == torch.bfloat16 and flag in why


def test_native_flag_but_near_tie_keeps_float32(unpinned):
    dtype, why = cpu_dtype.choose_cpu_dtype({"amx_bf16"}, measure=lambda: 0.95)
    assert dtype == torch.float32 and "0.95x" in why


def test_environment_pins_the_choice(monkeypatch):
    monkeypatch.setenv(cpu_dtype.ENV_VAR, "bfloat16")
    assert cpu_dtype.choose_cpu_dtype(set(), measure=_never_measured)[0] == torch.bfloat16
    monkeypatch.setenv(cpu_dtype.ENV_VAR, "float16")
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        cpu_dtype.choose_cpu_dtype(set())


def test_this_machine_agrees_with_its_flags(unpinned):
    """The real probe: on a CPU without the flags float32; with them, the measured ratio decides."""
    flags = cpu_dtype.cpu_flags()
    dtype, why = cpu_dtype.choose_cpu_dtype(flags)
    if not cpu_dtype.native_bf16(flags):
        assert dtype == torch.float32
    else:
        assert ("bf16 linear takes" in why) and (dtype == torch.bfloat16) == ("needs <=" not in why)


def test_the_suite_runs_float32():
    # conftest pins it; without this every greedy-identity test would compare bf16 runs on AMX CPUs.
    from faser_sgl.managers.scheduler import resolve_dtype

    assert resolve_dtype("auto", "cpu") == torch.float32
