"""The model zoo (tests/zoo): every model captures, compiles with no passes and round-trips through a bundle.

Capture implies compile: a Program that captures must lower with ``passes=[]`` on eager (here), Inductor
and AOTInductor (``make test-slow``) and score any candidate count from 1 like the eager model. The zoo's
models are written the way practitioners write them (per-field embedding lists, one flat float tensor
picked by index lists, feature dicts, EmbeddingBag lists, tensordot/einsum/Conv1d crosses, attention,
multi-task dict outputs), so each one exercises capture and lowering on an idiom of its own.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import codesign
from codesign.ir.program import Program
from codesign.ir.workload import Workload
from codesign.numerics import Tolerance, compare_outputs
from tests.zoo import ZOO, captured, names

# The captured graph and the eager backend run the same aten ops as the model: the brief's bound.
EAGER_TOL = Tolerance(rtol=1e-5, atol=1e-5)
# Inductor/AOTInductor reorder fp32 reductions; the zoo's small sums still agree to 1e-5 (measured: <= 2e-7).
COMPILED_TOL = Tolerance(rtol=1e-5, atol=1e-5)
# request layouts: one candidate, single-candidate requests, jagged requests, single-candidate requests mixed in
CAPTURE_COUNTS = ([1], [3, 1, 7], [1, 5, 1, 2])
SCORE_CANDIDATES = (1, 7, 64)

# bundle round trips in the default run: one model per input/output structure a bundle must keep (a dict
# of inputs, lists of jagged bags, one flat tensor with request columns, a dict of outputs, a program
# whose composite op capture decomposed); the other models round-trip in `make test-slow`
ROUND_TRIP_FAST = ("dcn_v2", "dlrm_lists", "deepfm", "mmoe", "dcn_v1")

_workloads: dict[str, Workload] = {}
_variants: dict[str, codesign.Variant] = {}


def _workload(name: str) -> Workload:
    if name not in _workloads:
        _workloads[name] = ZOO[name]()
    return _workloads[name]


def _program(name: str) -> Program:
    return captured(name)


def _eager_variant(name: str) -> codesign.Variant:
    if name not in _variants:
        _variants[name] = codesign.compile(_program(name), passes=[], backend="eager")
    return _variants[name]


def _eager(w: Workload, batch: codesign.RequestBatch) -> object:
    with torch.no_grad():
        return w.model(**batch.inputs)


def test_the_zoo_has_ten_models_each_with_request_level_fields() -> None:
    assert len(names()) >= 10
    for name in names():
        w = _workload(name)
        assert w.name == name
        spec = w.spec
        assert spec.request_inputs or spec.request_columns, f"{name} declares no request-level input"
        assert not w.model.training
        # the model is plain PyTorch: its class body does not know about codesign
        for cls in {type(m) for m in w.model.modules()} - {torch.nn.Module}:
            if cls.__module__.startswith("tests.zoo"):
                assert "codesign" not in inspect.getsource(cls), f"{cls.__qualname__} uses codesign"


@pytest.mark.parametrize("name", names())
def test_batches_repeat_request_level_fields(name: str) -> None:
    w = _workload(name)
    for counts in CAPTURE_COUNTS:
        batch = w.make_batch(list(counts), 3)
        batch.validate(w.spec)  # request-level inputs really repeat on every row of a request
        assert batch.num_candidates == sum(counts)


# capturing nn.MultiheadAttention re-exports once per op it copies to contiguous layout (~10 s): slow
FAST_NAMES = [pytest.param(n, marks=pytest.mark.slow) if n == "autoint_mha" else n for n in names()]


@pytest.mark.parametrize("name", FAST_NAMES)
def test_capture_matches_eager(name: str) -> None:
    w, program = _workload(name), _program(name)
    program.verify()
    for seed, counts in enumerate(CAPTURE_COUNTS, start=11):
        batch = w.make_batch(list(counts), seed)
        ok, err, _ = compare_outputs(program.run(batch), _eager(w, batch), EAGER_TOL)
        assert ok, (name, counts, err)


@pytest.mark.slow
@pytest.mark.parametrize("name", names())
def test_capture_matches_eager_on_large_batches(name: str) -> None:
    w, program = _workload(name), _program(name)
    for counts in ([1024], [1] * 64 + [960], [4096]):
        batch = w.make_batch(counts, 21)
        ok, err, _ = compare_outputs(program.run(batch), _eager(w, batch), EAGER_TOL)
        assert ok, (name, len(counts), err)


def _check_scores(
    variant: codesign.Variant, w: Workload, candidates: tuple[int, ...], tol: Tolerance
) -> None:
    for n in candidates:
        for counts in ([n], [n, 1, 2]):
            batch = w.make_batch(counts, 100 + n)
            ok, err, _ = compare_outputs(variant.score(batch), _eager(w, batch), tol)
            assert ok, (variant.backend.name, w.name, counts, err)


@pytest.mark.parametrize("name", FAST_NAMES)
def test_captured_program_compiles_without_passes(name: str) -> None:
    _check_scores(_eager_variant(name), _workload(name), SCORE_CANDIDATES, EAGER_TOL)


@pytest.mark.parametrize(
    "name", [n if n in ROUND_TRIP_FAST else pytest.param(n, marks=pytest.mark.slow) for n in names()]
)
def test_eager_bundle_round_trip(name: str, tmp_path: Path) -> None:
    w = _workload(name)
    # reloaded in this process on save (the fresh-process check costs a new interpreter: slow tests)
    loaded = codesign.load(_eager_variant(name).save(tmp_path / name, verify="in_process"))
    assert loaded.check_reference()[0]
    batch = w.make_batch([3, 1, 7], 5)
    ok, err, _ = compare_outputs(loaded.score(batch), _eager(w, batch), EAGER_TOL)
    assert ok, (name, err)


@pytest.mark.slow
@pytest.mark.parametrize("name", names())
def test_eager_variant_scores_4096_candidates_and_reloads_in_a_fresh_process(
    name: str, tmp_path: Path
) -> None:
    w = _workload(name)
    variant = _eager_variant(name)
    _check_scores(variant, w, (4096,), EAGER_TOL)
    loaded = codesign.load(variant.save(tmp_path / name))  # checked in a new interpreter before it returns
    batch = w.make_batch([4096], 6)
    ok, err, _ = compare_outputs(loaded.score(batch), _eager(w, batch), EAGER_TOL)
    assert ok, (name, err)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["inductor", "aoti"])
@pytest.mark.parametrize("name", names())
def test_captured_program_compiles_on_inductor_and_aoti(name: str, backend: str, tmp_path: Path) -> None:
    w = _workload(name)
    variant = codesign.compile(_program(name), passes=[], backend=backend, workdir=tmp_path)
    _check_scores(variant, w, (*SCORE_CANDIDATES, 4096), COMPILED_TOL)


@pytest.mark.slow
def test_reference_dlrm_inductor_bundle_with_default_passes_reloads_in_a_fresh_process(
    tmp_path: Path,
) -> None:
    # constant folding turned the forward's torch.tensor([...]) pair indices into a buffer that the graph
    # still detach_()es; a fresh process's weights are views into the archive, which detach_ refuses
    w = _workload("dlrm_reference")
    variant = codesign.compile(w, backend="inductor", workdir=tmp_path / "work")
    out = tmp_path / "bundle"
    variant.save(out)
    child = f"import codesign; ok, err = codesign.load({str(out)!r}).check_reference(); print(ok, err)"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, env=env, timeout=600, check=False
    )
    assert proc.returncode == 0 and proc.stdout.startswith("True"), proc.stderr[-3000:]
