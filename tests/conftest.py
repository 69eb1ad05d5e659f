"""Shared fixtures: tiny example workloads and their captured programs (captured once per session)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

import codesign
from codesign.ir.program import Program
from codesign.ir.workload import Workload

EXAMPLES = ("dlrm", "dcnv2", "din", "multitask", "useq")

warnings.filterwarnings("ignore", module=r"torch\..*")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    # host calibration is cached per machine; tests must not depend on a developer's cache
    os.environ["CODESIGN_CACHE_DIR"] = str(tmp_path_factory.mktemp("codesign-cache"))
    torch.manual_seed(0)


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


@pytest.fixture(params=EXAMPLES)
def example_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
