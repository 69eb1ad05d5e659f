"""Shared fixtures: tiny example workloads, their captured programs, and single-pass runs (each made once)."""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

import codesign
from codesign.hardware.target import HardwareSpec, Target, get_target
from codesign.ir.program import Program
from codesign.ir.workload import Workload, example_names
from codesign.passes import pass_by_name
from codesign.passes.manager import PassManager, PassRecord

EXAMPLES = tuple(example_names())
assert EXAMPLES, "no example models found under examples/"

warnings.filterwarnings("ignore", module=r"torch\..*")

# A CPU whose numbers are fixed (not calibrated on this machine): cost-model decisions that the tests
# assert must not depend on the machine the tests run on. Roughly a few server cores.
FIXED_CPU = HardwareSpec(
    name="fixed-cpu",
    vendor="test",
    kind="cpu",
    matmul_flops_per_s={"fp32": 2e11, "bf16": 1e11},
    vector_flops_per_s=2e10,
    memory_bandwidth_bytes_per_s=2e10,
    memory_bytes=64e9,
    interconnect_bandwidth_bytes_per_s=2e10,
    devices_per_host=1,
    launch_overhead_s=4e-6,
    view_overhead_s=1e-6,
    compute_efficiency=1.0,
    memory_efficiency=1.0,
    source="tests/conftest.py: fixed numbers for machine-independent tests",
)

_cache_dir: str | None = None


def pytest_configure(config: pytest.Config) -> None:
    # host calibration is cached per machine; tests must not depend on a developer's cache. Set before
    # collection, since test modules resolve targets at import time.
    global _cache_dir
    _cache_dir = tempfile.mkdtemp(prefix="codesign-test-cache-")
    os.environ["CODESIGN_CACHE_DIR"] = _cache_dir
    torch.manual_seed(0)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _cache_dir is not None:
        shutil.rmtree(_cache_dir, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests skip cleanly (with a reason) where there is no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_workloads: dict[str, Workload] = {}
_programs: dict[str, Program] = {}


def tiny_workload(name: str) -> Workload:
    if name not in _workloads:
        _workloads[name] = codesign.load_model_ref(name, size="tiny")
    return _workloads[name]


def tiny_program(name: str) -> Program:
    if name not in _programs:
        _programs[name] = codesign.capture(tiny_workload(name))
    return _programs[name]


def resolve_target(name: str, devices: int = 1) -> Target:
    """A test target by name: ``fixed-cpu`` (FIXED_CPU), ``host`` or a catalogue name."""
    return Target(FIXED_CPU, devices) if name == FIXED_CPU.name else get_target(name, devices)


_runs: dict[tuple[str, str, str, int], tuple[Program, PassRecord]] = {}


def run_pass(pass_name: str, example: str, target: str, devices: int = 1) -> tuple[Program, PassRecord]:
    """The tiny example after ``PassManager([pass_name], target)`` with the pass's default config, and
    its record; each run once per session (the conformance suite and the per-pass tests share them)."""
    key = (pass_name, example, target, devices)
    if key not in _runs:
        out, report = PassManager([pass_name], resolve_target(target, devices)).run(tiny_program(example))
        (record,) = report.passes
        _runs[key] = (out, record)
    out, record = _runs[key]
    return out, copy.deepcopy(record)


def pass_available(pass_name: str, target: str, devices: int = 1) -> bool:
    return pass_by_name(pass_name).unavailable(resolve_target(target, devices)) is None


@pytest.fixture(params=EXAMPLES)
def example_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
