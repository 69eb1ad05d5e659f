"""A Workload is what codesign compiles: a model, its RequestSpec and a synthetic request generator.

Model references resolve to workloads: ``path/to/file.py:factory`` (the factory returns a
``Workload``) or the name of an example shipped in the source checkout's ``examples/`` folder.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from codesign.errors import ModelRefError
from codesign.ir.request import RequestBatch, RequestSpec

__all__ = ["BatchFactory", "Workload", "example_names", "examples_dir", "load_model_ref"]

BatchFactory = Callable[[Sequence[int], int], RequestBatch]
"""``make_batch(candidate_counts, seed) -> RequestBatch``: one request per entry of candidate_counts."""


@dataclasses.dataclass
class Workload:
    """A ranking model with everything needed to capture and check it."""

    name: str
    model: torch.nn.Module
    spec: RequestSpec
    make_batch: BatchFactory
    description: str = ""
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def example(self, candidates: Sequence[int] = (6, 3, 9), seed: int = 0) -> RequestBatch:
        return self.make_batch(list(candidates), seed)


def examples_dir() -> Path:
    """The ``examples/`` folder of the source checkout codesign runs from."""
    return Path(__file__).resolve().parent.parent.parent / "examples"


def example_names() -> list[str]:
    d = examples_dir()
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.py") if not p.stem.startswith("_") and _has_build(p))


def _has_build(path: Path) -> bool:
    return "def build(" in path.read_text(encoding="utf-8")


def _import_file(path: Path) -> Any:
    mod_name = f"codesign_user_model_{abs(hash(str(path)))}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ModelRefError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    # as `python path/to/model.py` would: modules beside the model file import (now and when the
    # factory runs), without the user setting PYTHONPATH
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[mod_name]
        raise ModelRefError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    return module


def load_model_ref(ref: str, **factory_kwargs: Any) -> Workload:
    """Resolve ``file.py:factory`` or an example name (``dlrm``, ``dcnv2`` ...) to a Workload.

    ``factory_kwargs`` (e.g. ``size="tiny"``) are passed to the factory.
    """
    if ":" in ref:
        file_part, _, func_name = ref.rpartition(":")
        path = Path(file_part)
        if not path.is_file():
            raise ModelRefError(
                f"model file {file_part!r} does not exist", fix="write path/to/file.py:factory"
            )
    else:
        path = examples_dir() / f"{ref}.py"
        func_name = "build"
        if not path.is_file():
            names = example_names()
            raise ModelRefError(
                f"unknown model reference {ref!r}",
                fix=f"use one of the examples {names} or path/to/file.py:factory"
                if names
                else "examples ship with the source checkout; pass path/to/file.py:factory",
            )
    module = _import_file(path)
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise ModelRefError(
            f"{path} has no callable {func_name!r}", fix="name a function that returns a Workload"
        )
    try:
        result = factory(**factory_kwargs)
    except TypeError as exc:
        raise ModelRefError(f"calling {path}:{func_name}({factory_kwargs}) failed: {exc}") from exc
    if not isinstance(result, Workload):
        raise ModelRefError(
            f"{path}:{func_name} returned {type(result).__name__}, not a codesign.Workload",
            fix="return codesign.Workload(name, model, spec, make_batch)",
        )
    result.model.eval()
    return result
