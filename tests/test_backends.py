"""Backends: eager, inductor (torch.compile) and AOTInductor packages loadable without the source."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import codesign
from codesign.backends import InductorBackend, InductorConfig, TensorRTBackend, TensorRTConfig, get_backend
from codesign.backends.tensorrt import import_torch_tensorrt
from codesign.errors import BackendError, ConfigError
from codesign.hardware.target import get_target
from codesign.numerics import compare_outputs
from tests.conftest import EXAMPLES, tiny_program, tiny_workload


def test_unknown_backend_and_target_it_cannot_run() -> None:
    with pytest.raises(BackendError, match="unknown backend 'tvm'"):
        get_backend("tvm")
    with pytest.raises(BackendError, match="cannot run on target 'h100'"):
        codesign.compile(tiny_program("din"), target="h100", backend="eager")
    with pytest.raises(ConfigError, match="not a valid categorical"):
        InductorBackend(InductorConfig(mode="fastest"))


@pytest.mark.slow  # torch.compile of a whole model (~17 s on 2 cores)
def test_inductor_backend_matches_eager() -> None:
    w = tiny_workload("multitask")
    variant = codesign.compile(tiny_program("multitask"), backend="inductor")
    batch = w.make_batch([5, 1, 2], 3)
    ok, err, _ = compare_outputs(variant.score(batch), w.model(**batch.inputs), variant.tolerance)
    assert ok, err
    assert variant.backend.uuid() != get_backend("eager").uuid()


def _aoti_round_trip(name: str, tmp_path: Path) -> None:
    variant = codesign.compile(tiny_program(name), target=get_target("host"), backend="aoti")
    bundle = variant.save(tmp_path / name)
    assert (bundle / "aoti_package.pt2").is_file()
    # a fresh interpreter with no access to the model source loads and scores the bundle
    code = (
        "import sys, codesign\n"
        "v = codesign.load(sys.argv[1], allow_unsigned_native=True)\n"  # this test wrote it: its own code
        "ok, err = v.check_reference()\n"
        "print('OK' if ok else f'BAD {err}')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(bundle)], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert done.stdout.strip().endswith("OK"), done.stdout + done.stderr
    w = tiny_workload(name)
    loaded = codesign.load(bundle)
    for counts in ([1], [4, 9]):
        batch = w.make_batch(counts, 8)
        with torch.no_grad():
            ok, err, _ = compare_outputs(loaded.score(batch), w.model(**batch.inputs), loaded.tolerance)
        assert ok, (counts, err)


# an AOTInductor C++ build per example (30 s and more each): `make test-slow`
@pytest.mark.slow
@pytest.mark.parametrize("name", EXAMPLES)
def test_aoti_round_trip_every_example(name: str, tmp_path: Path) -> None:
    _aoti_round_trip(name, tmp_path)


def test_tensorrt_declares_nvidia_gpus_and_says_what_is_missing() -> None:
    trt = get_backend("tensorrt")
    assert trt.supports(get_target("h100")) and trt.supports(get_target("l4"))
    assert not trt.supports(get_target("host")) and not trt.supports(get_target("mi300x"))
    with pytest.raises(BackendError, match=r"does not support target .host.*runs on gpu devices from NVIDIA"):
        codesign.compile(tiny_program("din"), backend="tensorrt")
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="cannot run on target 'h100'"):
            codesign.compile(tiny_program("din"), target="h100", backend="tensorrt")
    try:
        import torch_tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(
            BackendError, match=r"(?s)needs torch-tensorrt.*pip install 'codesign\[tensorrt\]'"
        ):
            import_torch_tensorrt()
    with pytest.raises(ConfigError, match="precision='int4'"):
        TensorRTBackend(TensorRTConfig(precision="int4"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tensorrt_round_trip_on_gpu(tmp_path: Path) -> None:
    pytest.importorskip("torch_tensorrt", reason="the tensorrt extra is not installed")
    name = torch.cuda.get_device_name().lower().replace(" ", "")
    target = next((t for t in ("h100", "h200", "a100", "l4") if t in name), None)
    if target is None:
        pytest.skip(f"no catalogue target for {name}")
    w = tiny_workload("multitask")
    variant = codesign.compile(tiny_program("multitask"), target=target, backend="tensorrt")
    loaded = codesign.load(variant.save(tmp_path / "trt"))
    batch = w.make_batch([3, 40], 2)
    ok, err, _ = compare_outputs(loaded.score(batch), w.model(**batch.inputs), loaded.tolerance)
    assert ok, err


# an AOTInductor build that times GEMM kernel choices (~40 s on 2 cores): `make test-slow`
@pytest.mark.slow
def test_aoti_max_autotune_mode_reaches_inductor_and_scores_as_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._inductor

    from codesign.backends.aoti import AotiBackend, AotiConfig

    seen: list[dict[str, object]] = []
    real = torch._inductor.aoti_compile_and_package

    def recording(*args: object, **kwargs: object) -> object:
        seen.append(dict(kwargs.get("inductor_configs") or {}))  # type: ignore[call-overload]
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", recording)
    w = tiny_workload("multitask")
    backend = AotiBackend(AotiConfig(mode="max-autotune-no-cudagraphs"))
    variant = codesign.compile(tiny_program("multitask"), backend=backend, passes=[])
    assert seen and seen[0].get("max_autotune") is True
    assert backend.uuid() != get_backend("aoti").uuid()  # the mode is part of the cache key
    batch = w.make_batch([5, 1, 2], 3)
    ok, err, _ = compare_outputs(variant.score(batch), w.model(**batch.inputs), variant.tolerance)
    assert ok, err
