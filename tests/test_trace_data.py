"""The Azure traces ship with the package: the simulator and the load harness find them by short
name on any machine, never through a path of one development machine."""

from __future__ import annotations

import builtins
import glob
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

import faser_sgl
from faser_sgl.bench import workloads
from faser_sgl.sim import arrivals

PACKAGE = Path(faser_sgl.__file__).resolve().parent
REPO = PACKAGE.parent
NAMES = {"azure-code": 8819, "azure-conv": 19366}


@pytest.fixture
def no_outside_files(monkeypatch):
    """Any file read outside the package (and the test's own tmp files) fails, as on a machine
    where the development machine's trace folder does not exist."""
    real_open = builtins.open

    def guarded(file, *args, **kwargs):
        path = Path(file).resolve() if isinstance(file, (str, Path)) else None
        if path is not None and path.suffix == ".csv" and PACKAGE not in path.parents:
            raise FileNotFoundError(f"{path}: not shipped with faser_sgl")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)


@pytest.mark.parametrize("name", sorted(NAMES))
def test_short_names_resolve_inside_the_package(name):
    path = workloads.resolve_trace(name)
    assert PACKAGE in path.resolve().parents and path.is_file()
    assert arrivals.resolve_trace(name) == path  # one map for the simulator and the harness
    readme = (path.parent / "README.md").read_text()
    assert "CC-BY 4.0" in readme and "Splitwise" in readme and path.name in readme


@pytest.mark.parametrize("name", sorted(NAMES))
def test_simulator_replays_a_trace_by_name(name, no_outside_files):
    wl = arrivals.trace_workload(name, 40, 10.0, 1.0, seed=0)
    assert wl.num_requests == 40 and wl.arrivals_s[0] == 0.0
    assert wl.detail["trace"].startswith(f"faser_sgl/data/traces/{workloads.resolve_trace(name).name} (")
    assert "Splitwise" in wl.detail["citation"]
    lengths = arrivals.LengthSource(name)
    assert len(lengths.pairs) == NAMES[name]


def test_harness_replays_a_trace_by_name(no_outside_files):
    args = SimpleNamespace(request_rates=[], num_prompts=0, trace="azure-code", trace_time_scale=20.0,
                           trace_sample=1.0, bursty_num_prompts=30, seed=0, output_len=8)
    [wl] = workloads.build_workloads(args, ["a prompt", "another"], [2, 2])
    assert len(wl.arrivals_s) == 30 and wl.arrivals_s[0] == 0.0
    assert wl.detail["trace"].startswith("faser_sgl/data/traces/AzureLLMInferenceTrace_code.csv (30 requests")


def test_package_data_declares_the_traces_and_their_readme():
    """An installed (non-editable) copy carries what pyproject's package data names."""
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = {Path(f).name for pattern in patterns["faser_sgl"] for f in glob.glob(str(PACKAGE / pattern))}
    assert {p.name for p in workloads.AZURE_TRACES.values()} | {"README.md"} <= shipped


def test_no_code_names_a_development_machines_folder():
    marker = "/work/" + "shared"  # (split so that this file does not name it either)
    offenders = [str(p.relative_to(REPO)) for top in ("faser_sgl", "scripts", "tests")
                 for p in (REPO / top).rglob("*") if p.is_file() and p.suffix in (".py", ".sh")
                 and marker in p.read_text(errors="ignore")]
    assert not offenders, offenders
