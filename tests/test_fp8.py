"""Selective FP8: quantized formats, the FP8 Linear and quantized-table ops, and the pass."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

import codesign
from codesign.errors import ConfigError
from codesign.hardware.costmodel import estimate
from codesign.hardware.target import get_target
from codesign.ir.program import Program
from codesign.ir.request import RequestBatch, RequestSpec, offsets_from_counts
from codesign.numerics import sqnr_db
from codesign.ops import (
    Fp8Linear,
    dequantize,
    fp8_linear_reference,
    quantize,
    quantize_table,
    quantize_weight,
    table_bytes,
)
from codesign.passes import (
    SelectiveFp8,
    SelectiveFp8Config,
    all_passes,
    default_passes,
)
from codesign.passes.fp8 import LayerSensitivity, select_layers
from codesign.passes.manager import PassManager, PassRecord, SkipKind
from codesign.search.space import build_space
from tests.conftest import EXAMPLES, run_pass, tiny_program

H100 = get_target("h100")
# e4m3 keeps 3 mantissa bits: rounding to nearest is off by at most half a step, 2^-4 relative
FP8_RELATIVE_STEP = 2.0**-4
# one FP8 GEMM with per-row scales on random data (measured ~31 dB; the floor leaves margin)
FP8_GEMM_MIN_SQNR_DB = 25.0

# the budget the tests' default-config runs use (SelectiveFp8Config's default)
DEFAULT_BUDGET_PCT = 0.1
# examples whose per-layer calibration (26-35 layers) takes tens of seconds: `make test-slow`
HEAVY_EXAMPLES = ("dlrm", "dcnv2")

_reports: dict[tuple[str, float, str], tuple[Program, PassRecord]] = {}


def _run_fp8(
    name: str, budget: float = DEFAULT_BUDGET_PCT, selection: str = "greedy"
) -> tuple[Program, PassRecord]:
    """The tiny example after selective_fp8 for the H100 (the default config's run is shared with the
    conformance suite)."""
    if (budget, selection) == (DEFAULT_BUDGET_PCT, "greedy"):
        return run_pass("selective_fp8", name, "h100")
    key = (name, budget, selection)
    if key not in _reports:
        cfg = SelectiveFp8Config(quality_budget_pct=budget, selection=selection)
        out, report = PassManager([SelectiveFp8(cfg)], H100).run(tiny_program(name))
        _reports[key] = (out, report.passes[0])
    return _reports[key]


def _fp8_ops(program: Program) -> list[str]:
    names = ("fp8_linear", "quantized_embedding")
    return [
        n.name
        for n in program.graph.nodes
        if n.op == "call_function" and any(k in str(n.target) for k in names)
    ]


# ---- formats and ops ------------------------------------------------------------------------


def test_fp8_row_quantization_is_within_half_a_step() -> None:
    t = torch.randn(64, 96) * torch.logspace(-3, 3, 64).unsqueeze(1)  # rows of very different range
    q, scale = quantize(t, "fp8", "row")
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    back = dequantize(q, scale)
    # normal e4m3 values: relative error <= 2^-4; tiny ones (subnormal): half the 2^-9 step, scaled
    bound = FP8_RELATIVE_STEP * t.abs() + scale * 2.0**-10
    assert bool(((back - t).abs() <= bound * (1 + 1e-6)).all())


def test_int8_rows_round_to_nearest_step_and_zero_rows_stay_zero() -> None:
    t = torch.randn(10, 32)
    t[3] = 0
    q, scale = quantize(t, "int8", "row")
    assert q.dtype == torch.int8
    err = (dequantize(q, scale) - t).abs()
    assert bool((err <= scale / 2 + 1e-7).all())
    assert float(dequantize(q, scale)[3].abs().max()) == 0.0


def test_quantize_rejects_bad_input_with_clear_messages() -> None:
    with pytest.raises(ValueError, match="unknown quantized format 'fp4'"):
        quantize(torch.ones(2, 2), "fp4")
    with pytest.raises(ValueError, match="granularity 'col'"):
        quantize(torch.ones(2, 2), "fp8", "col")
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.ones(2), "fp8")


@pytest.mark.parametrize("granularity", ["row", "tensor"])
@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
def test_fp8_linear_emulation_matches_the_float_linear(granularity: str, activation: str) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(3, 5, 64)
    fast = Fp8Linear.from_linear(linear, activation, granularity)
    got = fast(x)
    want = {"none": linear(x), "relu": torch.relu(linear(x)), "gelu": torch.nn.functional.gelu(linear(x))}[
        activation
    ]
    assert got.shape == want.shape and got.dtype == x.dtype
    assert sqnr_db(want, got) >= FP8_GEMM_MIN_SQNR_DB
    # and it is exactly the FP8 arithmetic: the same as multiplying the dequantized operands
    xq, xs = quantize(x.reshape(-1, 64), "fp8", granularity)
    manual = dequantize(xq, xs) @ dequantize(fast.weight, fast.weight_scale).t() + linear.bias
    if activation == "none":
        torch.testing.assert_close(got.reshape(-1, 48), manual, rtol=1e-5, atol=1e-5)


def test_fp8_linear_cpu_scaled_mm_path_agrees_with_emulation() -> None:
    torch.manual_seed(1)
    w, b = torch.randn(32, 64), torch.randn(32)
    q, s = quantize_weight(w, "row")
    x = torch.randn(17, 64)
    emulated = fp8_linear_reference(x, q, s, b, "relu", "row")
    scaled = torch.ops.codesign.fp8_linear(x, q, s, b, "relu", "row", "scaled_mm")
    torch.testing.assert_close(scaled, emulated, rtol=1e-4, atol=1e-4)


def test_fp8_linear_errors_name_the_problem() -> None:
    q, s = quantize_weight(torch.randn(16, 32), "row")
    with pytest.raises(ValueError, match="input has 31 features, the weight takes 32"):
        fp8_linear_reference(torch.randn(2, 31), q, s, None)
    with pytest.raises(ValueError, match="kernel 'cublas' is not one of"):
        torch.ops.codesign.fp8_linear(torch.randn(2, 32), q, s, None, "none", "row", "cublas")
    with pytest.raises(ValueError, match="must be a 2-D"):
        fp8_linear_reference(torch.randn(2, 32), torch.randn(16, 32), s, None)


@pytest.mark.gpu
def test_te_kernel_on_cuda_says_it_needs_transformer_engine_when_missing() -> None:
    # the 'te' kernel runs on CUDA only (on CPU it is the emulation): conftest skips gpu tests without CUDA
    try:
        import transformer_engine  # noqa: F401

        pytest.skip("Transformer Engine is installed")
    except ImportError:
        pass
    q, s = quantize_weight(torch.randn(16, 32, device="cuda"), "row")
    with pytest.raises(RuntimeError, match=r"codesign\[te\]"):
        torch.ops.codesign.fp8_linear(torch.randn(4, 32, device="cuda"), q, s, None, "none", "row", "te")


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_quantized_tables_cut_memory_and_look_up_like_the_dequantized_table(fmt: str) -> None:
    torch.manual_seed(2)
    table = torch.randn(1000, 128)
    q, scale = quantize_table(table, fmt)
    stored = q.numel() * q.element_size() + scale.numel() * scale.element_size()
    assert stored == table_bytes(1000, 128, fmt)
    assert table.numel() * 4 / stored > 3.8  # ~4x vs fp32
    assert table.numel() * 2 / stored > 1.9  # ~2x vs fp16
    ids = torch.randint(0, 1000, (7, 5))
    dense = dequantize(q, scale)
    got = torch.ops.codesign.quantized_embedding(q, scale, ids, torch.float32)
    torch.testing.assert_close(got, torch.nn.functional.embedding(ids, dense), rtol=0, atol=0)
    flat, offsets = torch.randint(0, 1000, (40,)), torch.tensor([0, 3, 3, 20])  # an empty bag too
    for mode, name in ((0, "sum"), (1, "mean"), (2, "max")):
        got = torch.ops.codesign.quantized_embedding_bag(q, scale, flat, offsets, mode, torch.float32)
        want = torch.nn.functional.embedding_bag(flat, dense, offsets, mode=name)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # the lookup error against the fp32 table: FP8 keeps ~2^-4 relative, INT8 half a step of amax/127
    lookup_err = (torch.nn.functional.embedding(ids, dense) - torch.nn.functional.embedding(ids, table)).abs()
    bound = table.abs().amax(1)[ids].unsqueeze(-1) * (FP8_RELATIVE_STEP if fmt == "fp8" else 0.5 / 127)
    assert bool((lookup_err <= bound + 1e-6).all())


def test_quantized_lookup_refuses_out_of_range_ids() -> None:
    q, scale = quantize_table(torch.randn(10, 4), "int8")
    with pytest.raises(IndexError, match="id 10 is out of range for a table of 10 rows"):
        torch.ops.codesign.quantized_embedding(q, scale, torch.tensor([1, 10]), torch.float32)


def test_triton_row_quantizer_in_the_interpreter() -> None:
    code = r"""
import torch
from codesign.ops.fp8_linear_triton import quantize_rows_triton
from codesign.ops.quantize import quantize
x = torch.randn(37, 300) * 3
x[5] = 0
q, s = quantize_rows_triton(x)
q2, s2 = quantize(x, "fp8", "row")
assert torch.equal(s, s2), (s - s2).abs().max()
# the interpreter emulates the fp32->e4m3 cast in numpy and truncates some values that round up to
# the next power of two; on a GPU the cast is exact and tests/test_ops' CUDA test asserts equality
same = (q.float() == q2.float()).float().mean()
assert same > 0.95, same
print("ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


@pytest.mark.gpu
def test_fp8_linear_on_cuda_matches_the_emulation() -> None:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs a CUDA GPU with FP8 tensor cores (sm_89+)")
    from codesign.ops.fp8_linear_triton import quantize_rows_triton

    torch.manual_seed(3)
    x = torch.randn(300, 512, device="cuda")
    q, s = quantize_rows_triton(x)
    q2, s2 = quantize(x, "fp8", "row")
    assert torch.equal(s, s2) and torch.equal(q.float(), q2.float())
    w, b = torch.randn(256, 512, device="cuda"), torch.randn(256, device="cuda")
    for granularity in ("row", "tensor"):
        wq, ws = quantize_weight(w, granularity)
        want = fp8_linear_reference(x, wq, ws, b, "relu", granularity)
        for dtype in (torch.float32, torch.bfloat16):
            got = torch.ops.codesign.fp8_linear(x.to(dtype), wq, ws, b, "relu", granularity, "auto")
            assert got.dtype == dtype
            assert sqnr_db(want, got.float()) > (60 if dtype == torch.float32 else 35)


# ---- the pass -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[pytest.mark.slow] if n in HEAVY_EXAMPLES else []) for n in EXAMPLES]
)
def test_every_example_gets_a_report_and_stays_within_budget(name: str) -> None:
    out, record = _run_fp8(name)
    stats = record.stats
    layers = stats["layers"]
    assert layers, "every example has Linears or tables"
    fields = {"node", "kind", "shape", "ne_loss_pct", "max_logit_error", "sqnr_db", "saving_s", "chosen"}
    assert all(fields <= set(layer) for layer in layers), layers
    eligible = [layer for layer in layers if layer["eligible"]]
    assert eligible and all(layer["ne_loss_pct"] >= 0 and layer["sqnr_db"] > 20 for layer in eligible), (
        eligible
    )
    # every layer left out says why
    assert all(layer["reason"] for layer in layers if not layer["chosen"]), layers
    # on an H100 every example has a table or a Linear worth FP8 within the default budget
    chosen = [layer for layer in layers if layer["chosen"]]
    assert record.modified and chosen and [layer["node"] for layer in chosen] == stats["chosen"]
    assert len(_fp8_ops(out)) == len(chosen)
    assert 0 < stats["combined_loss_pct"] <= DEFAULT_BUDGET_PCT
    assert all(layer["saving_s"] > 0 and layer["eligible"] for layer in chosen)
    assert stats["param_bytes_after"] < stats["param_bytes_before"]
    assert stats["predicted_latency_after_s"] < stats["predicted_latency_before_s"]
    # the pass's own prediction is the manager's (one cost model, one gate batch)
    assert record.predicted_latency_after_s == pytest.approx(stats["predicted_latency_after_s"])


@pytest.mark.slow  # three FP8 runs of dlrm (26 tables): `make test-slow`
def test_a_tighter_budget_is_honoured_and_chooses_fewer_layers() -> None:
    _, loose = _run_fp8("dlrm", 0.1)
    assert loose.modified and loose.stats["combined_loss_pct"] > 0.005  # the tables alone cost ~0.01 %
    for selection in ("greedy", "knapsack"):
        _, tight = _run_fp8("dlrm", 0.005, selection)
        assert tight.modified
        assert tight.stats["combined_loss_pct"] <= 0.005
        assert 0 < len(tight.stats["chosen"]) < len(loose.stats["chosen"])


def test_a_budget_too_tight_quantizes_nothing() -> None:
    out, record = _run_fp8("multitask", 0.0)
    assert not record.modified and record.stats["chosen"] == []
    assert record.skip is not None and record.skip.kind is SkipKind.BELOW_THRESHOLD
    assert "no layer fits the NE budget of 0.0%" in record.skip.message and record.skip.fix
    assert _fp8_ops(out) == [] and out.graph_module.code == tiny_program("multitask").graph_module.code


def _layer(name: str, loss: float, saving_us: float) -> LayerSensitivity:
    return LayerSensitivity(name, "", "linear", (64, 64), True, ne_loss_pct=loss, baseline_s=saving_us * 1e-6)


def test_knapsack_finds_the_best_set_where_greedy_does_not() -> None:
    # greedy takes 'a' (best saving per NE) and then nothing fits; b + c save more in the same budget
    layers = [_layer("a", 0.06, 7.0), _layer("b", 0.05, 5.0), _layer("c", 0.05, 5.0)]
    assert select_layers(layers, 0.1, "greedy") == ["a"]
    assert sorted(select_layers(layers, 0.1, "knapsack")) == ["b", "c"]
    # layers over the budget alone or without a gain never take part
    layers += [_layer("d", 0.2, 50.0), _layer("e", 0.0, -1.0)]
    assert "d" not in select_layers(layers, 0.1, "knapsack") and "e" not in select_layers(layers, 0.1)


def test_targets_without_fp8_are_skipped_by_name() -> None:
    program = tiny_program("dlrm")
    out, report = PassManager([SelectiveFp8()], get_target("a100")).run(program)
    (rec,) = report.passes
    assert not rec.modified and rec.skip is not None and rec.skip.kind is SkipKind.UNAVAILABLE
    assert (
        re.search(r"target 'a100' .* has no FP8 matrix units", rec.skip.message)
        and "h100" in rec.skip.message
    )
    assert out.graph_module.code == program.graph_module.code
    for name in ("a100", "tpu-v5e", "mtia-v2"):
        space = build_space(get_target(name), backends=())
        assert "selective_fp8" in space.excluded and name in space.excluded["selective_fp8"]
        assert not any(p.owner == "selective_fp8" for p in space.params)


def test_fp8_is_opt_in_and_searchable_on_fp8_targets() -> None:
    assert "selective_fp8" in [p.name for p in all_passes()]
    assert "selective_fp8" not in [p.name for p in default_passes()]
    space = build_space(H100, backends=())
    names = {p.name for p in space.params}
    for knob in ("enabled", "quality_budget_pct", "granularity", "eligible", "table_format", "selection"):
        assert f"selective_fp8.{knob}" in names
    assert space.defaults()["selective_fp8.enabled"] is False
    cfg = space.configure({"selective_fp8.enabled": True, "selective_fp8.quality_budget_pct": 0.05})
    fp8 = next(p for p in cfg.passes if p.name == "selective_fp8")
    assert fp8.config.quality_budget_pct == 0.05  # type: ignore[attr-defined]


def test_config_errors_name_the_field_and_choices() -> None:
    with pytest.raises(
        ConfigError, match=r"table_format='fp4' is not a valid categorical in \['fp8', 'int8'\]"
    ):
        SelectiveFp8Config(table_format="fp4")
    with pytest.raises(ConfigError, match=r"quality_budget_pct=-1 is not a valid float in \[0.0, 0.5\]"):
        SelectiveFp8Config(quality_budget_pct=-1)
    with pytest.raises(ConfigError, match="kernel='cublas' is not one of"):
        SelectiveFp8Config(kernel="cublas")


class _WideRanker(torch.nn.Module):
    """One wide hidden layer: a GEMM big enough that FP8 pays on an H100 at serving batch sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(1024, 4096)
        self.out = torch.nn.Linear(4096, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.up(x)))


def _wide_program() -> Program:
    def make(counts: list[int], seed: int) -> RequestBatch:
        g = torch.Generator().manual_seed(seed)
        return RequestBatch({"x": torch.randn(sum(counts), 1024, generator=g)}, offsets_from_counts(counts))

    torch.manual_seed(4)
    return codesign.capture(_WideRanker().eval(), make([3, 2], 0), RequestSpec(), make_batch=make)


def test_a_wide_linear_is_chosen_folds_its_activation_and_is_priced_at_the_fp8_rate() -> None:
    program = _wide_program()
    out, report = PassManager([SelectiveFp8()], H100).run(program)
    stats = report.passes[0].stats
    up = next(layer for layer in stats["layers"] if layer["shape"] == [4096, 1024])
    assert up["chosen"] and up["saving_s"] > 0
    assert next(layer for layer in stats["layers"] if layer["shape"] == [1, 4096])["reason"].startswith(
        "K=4096, N=1"
    )
    ops = [n for n in out.graph.nodes if n.op == "call_function" and "fp8_linear" in str(n.target)]
    assert len(ops) == 1 and ops[0].args[4] == "relu"  # the ReLU runs in the op's epilogue
    assert not any(n.target is torch.ops.aten.relu.default for n in out.graph.nodes)
    fp8_ops = [o for o in estimate(out, H100, 1024).ops if o.op == "fp8_linear.default"]
    assert [o.rate_dtype for o in fp8_ops] == ["fp8"]
    assert stats["predicted_latency_after_s"] < stats["predicted_latency_before_s"]
    assert stats["param_bytes_after"] < stats["param_bytes_before"] / 3  # 4-byte weights became 1-byte
    batch = program.sample_batch([50, 30], seed=3)
    assert sqnr_db(program.run(batch), out.run(batch)) > 25
    # tiny Linears gain nothing on an H100 (launch-bound): the report says so
    _, useq = _run_fp8("useq")
    linears = [layer for layer in useq.stats["layers"] if layer["kind"] == "linear" and layer["eligible"]]
    assert linears and all(layer["reason"] == "no predicted gain on the target" for layer in linears)


def test_fp8_program_lowers_saves_and_reloads_on_the_host() -> None:
    out, _ = _run_fp8("din")
    reference = tiny_program("din")
    batch = reference.sample_batch([6, 1, 9], seed=5)
    with tempfile.TemporaryDirectory() as d:
        variant = codesign.compile(out, target="host", backend="eager", passes=[])
        variant.save(d, verify="in_process")
        loaded = codesign.load(d)
        got = loaded.score(batch)
    torch.testing.assert_close(got, out.run(batch))
    assert sqnr_db(reference.run(batch), got) > 30
