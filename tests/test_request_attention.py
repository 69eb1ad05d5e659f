"""codesign::request_attention and the rewrite to it: SDPA against per-request K/V, never gathered.

The op is checked against SDPA on K/V gathered per candidate (jagged requests, empty ones, masks,
scales, both CPU strategies); the Triton kernel under ``TRITON_INTERPRET=1`` in a subprocess (the
interpreter is chosen when triton is imported) and compiled for sm_90 without a device. The rewrite
runs on the real pipeline: useq (target attention over the user history) after request sharing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import codesign
from codesign import RequestBatch, RequestSpec, offsets_from_counts
from codesign.analysis import analyze, symbolic_dim
from codesign.analysis.costs import registered_cost
from codesign.hardware.target import get_target
from codesign.ir.program import REQUEST_OFFSETS, Program
from codesign.ops.request_attention import request_attention_reference, use_padding
from codesign.passes import DeadCodeElimination, RequestSharing, RequestSharingConfig
from codesign.passes.graph_edit import insert_call
from codesign.passes.manager import PassManager
from codesign.passes.request_attention import fuse_request_attention
from tests.conftest import tiny_program, tiny_workload

aten = torch.ops.aten
op = torch.ops.codesign.request_attention

# The same products and softmax as SDPA on gathered K/V, in a different order: fp32 rounding only.
FP32_ROUNDING = 1e-5

_COUNTS = (
    [3, 0, 20, 1],  # a loop over requests, one empty
    [1] * 20,  # many single-candidate requests: one padded batched SDPA
    [0, 5, 1, 0, 7] * 4,  # padded, with empty requests
    [33],
)


def _offsets(counts: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int64)


def _gathered_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    counts: list[int],
    mask: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    """What the op must equal, written independently of it: K/V (and a per-request mask) per candidate."""
    index = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    if mask is not None and mask.dim() == 4 and mask.shape[0] == len(counts) > 1:
        mask = mask[index]
    return F.scaled_dot_product_attention(q, k[index], v[index], attn_mask=mask, scale=scale)


@pytest.mark.parametrize("counts", _COUNTS)
@pytest.mark.parametrize("lq", [1, 3])
def test_op_equals_sdpa_on_gathered_kv(counts: list[int], lq: int) -> None:
    g = torch.Generator().manual_seed(len(counts) + lq)
    r, n, heads, length, dh, dv = len(counts), sum(counts), 2, 9, 8, 5
    q = torch.randn(n, lq, heads, dh, generator=g).transpose(1, 2)  # a view, as models make it
    k, v = torch.randn(r, heads, length, dh, generator=g), torch.randn(r, heads, length, dv, generator=g)
    masks = (
        None,
        torch.rand(r, 1, 1, length, generator=g) > 0.3,  # per request, bool (some rows fully masked)
        torch.randn(r, heads, lq, length, generator=g),  # per request, additive
        torch.rand(1, heads, lq, length, generator=g) > 0.5,  # one for all requests
        torch.zeros(1, length, dtype=torch.bool),  # nothing to attend to: zeros, as SDPA gives
    )
    for mask in masks:
        for scale in (None, 0.3):
            got = op(q, k, v, _offsets(counts), mask, scale)
            assert got.shape == (n, heads, lq, dv) and got.is_contiguous()
            want = _gathered_sdpa(q, k, v, counts, mask, scale)
            torch.testing.assert_close(got, want, rtol=FP32_ROUNDING, atol=FP32_ROUNDING)
    torch.testing.assert_close(
        request_attention_reference(q, k, v, _offsets(counts)), _gathered_sdpa(q, k, v, counts, None, None)
    )


def test_both_cpu_strategies_are_covered() -> None:
    assert not use_padding(_COUNTS[0]) and not use_padding(_COUNTS[3])  # a loop over requests
    assert use_padding(_COUNTS[1]) and use_padding(_COUNTS[2])  # one padded batched SDPA


def test_op_without_candidates_and_bad_inputs() -> None:
    k = torch.randn(2, 2, 4, 8)
    empty = op(torch.randn(0, 2, 1, 8), k, k, torch.zeros(3, dtype=torch.int64))
    assert empty.shape == (0, 2, 1, 8)
    q = torch.randn(3, 2, 1, 8)
    with pytest.raises(ValueError, match="rise from 0 to N=3"):
        op(q, k, k, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="same heads"):
        op(q, torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8), torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="one mask per request"):
        op(q, k, k, torch.tensor([0, 1, 3]), torch.ones(3, 1, 1, 4, dtype=torch.bool))


def test_op_exports_with_dynamic_candidates_and_requests() -> None:
    class Attend(torch.nn.Module):
        def forward(self, q: torch.Tensor, kv: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
            return op(q, kv, kv, offsets, None, None)

    n, r = torch.export.Dim("n"), torch.export.Dim("r")
    args = (torch.randn(6, 2, 1, 8), torch.randn(3, 2, 5, 8), _offsets([1, 2, 3]))
    # the fake impl relates the sizes: R + 1 offsets for R requests
    ep = torch.export.export(Attend(), args, dynamic_shapes=({0: n}, {0: r}, {0: r + 1}))
    q, kv = torch.randn(11, 2, 1, 8), torch.randn(4, 2, 5, 8)
    got = ep.module()(q, kv, _offsets([5, 0, 1, 5]))
    torch.testing.assert_close(got, _gathered_sdpa(q, kv, kv, [5, 0, 1, 5], None, None))


def test_flops_and_cost_are_registered() -> None:
    q, k = torch.randn(12, 2, 1, 8), torch.randn(3, 2, 5, 8)
    with FlopCounterMode(display=False) as counter:
        op(q, k, k, _offsets([4, 4, 4]))
    # as torch counts SDPA on the gathered K/V: 2·scores·dh + 2·scores·dv
    assert counter.get_total_flops() == 2 * (12 * 2 * 5) * (8 + 8)
    assert registered_cost(op.default) is not None


# ---- the Triton kernel --------------------------------------------------------------------------

_INTERPRETED = textwrap.dedent("""
    import torch
    from codesign.ops.request_attention import request_attention_reference, use_padding
    from codesign.ops.request_attention_triton import request_attention_triton
    torch.manual_seed(0)
    def offsets(counts):
        return torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int64)
    cases = (
        ([3, 0, 20, 1], 2, 1, 37, 8, 8, (16, 16)),  # blocks cross no request; an empty request
        ([5, 2], 3, 2, 16, 20, 12, (16, 16)),  # Lq > 1, head dims padded to 32 / 16
        ([0, 0], 2, 1, 8, 8, 8, None),  # no candidates at all
        ([40], 2, 1, 70, 16, 16, None),  # one request, the size heuristic, a partial K/V tile
    )
    for counts, heads, lq, length, dh, dv, blocks in cases:
        off, r = offsets(counts), len(counts)
        q = torch.randn(sum(counts), lq, heads, dh).transpose(1, 2)
        k, v = torch.randn(r, heads, length, dh), torch.randn(r, heads, length, dv)
        masks = (  # (mask, scale): none, per-request bool, per-request additive, nothing to attend to
            (None, None),
            (None, 0.3),
            (torch.rand(r, 1, 1, length) > 0.3, None),
            (torch.randn(r, heads, lq, length), 0.3),
            (torch.zeros(1, length, dtype=torch.bool), None),
        )
        for mask, scale in masks:
            got = request_attention_triton(q, k, v, off, mask, scale, blocks=blocks)
            want = request_attention_reference(q, k, v, off, mask, scale)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    print("OK")
""")


def test_triton_kernel_under_the_interpreter() -> None:
    pytest.importorskip("triton", reason="the gpu extra (triton) is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _INTERPRETED], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.stdout.strip().endswith("OK"), done.stdout[-2000:] + done.stderr[-4000:]


def test_triton_kernel_compiles_for_sm90() -> None:
    """The interpreter runs the kernel as Python; this compiles it (to a cubin) as a GPU would, no device needed."""
    triton = pytest.importorskip("triton", reason="the gpu extra (triton) is not installed")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from codesign.ops.request_attention_triton import _request_attention_kernel as kernel

    flags = ("MASK_KIND", "IEEE")
    for dtype, mask_kind, mask_type, ieee in (("fp32", 1, "*u8", True), ("bf16", 2, "*fp32", False)):
        signature = {
            name: (
                "constexpr"
                if name.startswith("BLOCK") or name in flags
                else "*i64"
                if name == "offsets_ptr"
                else mask_type
                if name == "mask_ptr"
                else f"*{dtype}"
                if name.endswith("_ptr")
                else "fp32"
                if name == "scale"
                else "i32"
            )
            for name in kernel.arg_names
        }
        constants = {"MASK_KIND": mask_kind, "IEEE": ieee, "BLOCK_R": 32}
        constants |= {"BLOCK_M": 64, "BLOCK_L": 64, "BLOCK_DH": 16, "BLOCK_DV": 16}
        try:
            compiled = triton.compile(
                ASTSource(fn=kernel, signature=signature, constexprs=constants),
                target=GPUTarget("cuda", 90, 32),
            )
        except RuntimeError as err:  # no CUDA toolchain (ptxas) in this triton build
            pytest.skip(f"triton cannot compile for CUDA here: {err}")
        assert "cubin" in compiled.asm


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_kernel_on_cuda() -> None:
    counts = [300, 0, 1, 64, 511]
    q = torch.randn(sum(counts), 1, 4, 16, device="cuda").transpose(1, 2)
    k, v = torch.randn(5, 4, 64, 16, device="cuda"), torch.randn(5, 4, 64, 16, device="cuda")
    off = _offsets(counts).cuda()
    mask = torch.rand(5, 1, 1, 64, device="cuda") > 0.2
    got = op(q, k, v, off, mask, None)
    torch.testing.assert_close(got, request_attention_reference(q, k, v, off, mask), rtol=1e-4, atol=1e-4)


# ---- the rewrite, on the real pipeline ----------------------------------------------------------

# K/V gathered per candidate: [N, L, d] or [N, H, L, dh]; request sharing's other gathers are [N, d].
_KV_RANK = 3


_shared: list[Program] = []


def _shared_useq() -> Program:
    """useq after request sharing without its attention step (forced: the tiny model may not gain on this
    host), so the rewrite can be applied here; a fresh copy per call."""
    if not _shared:
        forced = RequestSharing(RequestSharingConfig(require_predicted_gain=False, fuse_attention=False))
        shared, report = PassManager([forced], get_target("host")).run(tiny_program("useq"))
        assert report.passes[0].modified
        _shared.append(shared)
    return _shared[0].copy()


def _index_nodes(program: Program) -> tuple[torch.fx.Node, torch.fx.Node]:
    """(request_index, request_offsets): request_index is what gathers R rows back to the N candidates."""
    candidates = _rows_of(next(iter(program.placeholders().values())))
    (request_index,) = {
        n.args[2]
        for n in program.graph.nodes
        if n.target is aten.index_select.default
        and n.args[1] == 0
        and isinstance(n.args[2], torch.fx.Node)
        and n.args[2].op == "call_function"
        and _rows_of(n.args[2]) == candidates
    }
    assert isinstance(request_index, torch.fx.Node)
    return request_index, program.placeholders()[REQUEST_OFFSETS]


def _kv_gathers(program: Program, request_index: torch.fx.Node) -> list[torch.fx.Node]:
    return [
        n
        for n in program.graph.nodes
        if n.target is aten.index_select.default
        and n.args[2] is request_index
        and n.meta["val"].dim() >= _KV_RANK
    ]


def _targets(program: Program, target: object) -> list[torch.fx.Node]:
    return [n for n in program.graph.nodes if n.target is target]


def test_useq_target_attention_reads_kv_once_per_request() -> None:
    w = tiny_workload("useq")
    program = _shared_useq()
    request_index, offsets = _index_nodes(program)
    assert _kv_gathers(program, request_index), "request sharing no longer gathers K/V: update this test"
    before = analyze(program, 4096, 1)
    gathered_kv_bytes = sum(4096 * n.meta["val"][0].numel() * 4 for n in _kv_gathers(program, request_index))

    assert fuse_request_attention(program, request_index, offsets) == 1
    program.recompile()
    program.verify()
    assert not _kv_gathers(program, request_index)
    assert len(_targets(program, op.default)) == 1
    # the gather wrote and SDPA read the K/V copy (twice: as keys and as values); now none is made
    assert before.total_bytes - analyze(program, 4096, 1).total_bytes >= 2 * gathered_kv_bytes

    cleaned, _ = PassManager([DeadCodeElimination()], get_target("host")).run(program)
    exported = cleaned.export().module()  # the fake impl: export with dynamic candidates and requests
    for counts in ([1], [1, 1, 1], [7, 1, 40, 2], [5, 1]):
        batch = w.make_batch(counts, 17)
        with torch.no_grad():
            want = w.model(**batch.inputs)
            torch.testing.assert_close(cleaned.run(batch), want, rtol=FP32_ROUNDING, atol=FP32_ROUNDING)
            got = exported(**cleaned.call_inputs(batch))
            torch.testing.assert_close(got, want, rtol=FP32_ROUNDING, atol=FP32_ROUNDING)


def test_keys_from_compressed_of_need_no_gather() -> None:
    """An N-row K/V node that ``compressed_of`` maps to R rows is used as it is (no gather to walk)."""
    w = tiny_workload("useq")
    program = _shared_useq()
    request_index, offsets = _index_nodes(program)
    (gather,) = _kv_gathers(program, request_index)
    (sdpa,) = [  # the target attention: its query has a row per candidate
        n
        for n in _targets(program, aten.scaled_dot_product_attention.default)
        if _rows_of(n.args[0]) == _rows_of(request_index)
    ]
    key = sdpa.args[1]
    assert isinstance(key, torch.fx.Node)
    heads = key.meta["val"].shape[1]
    with program.graph.inserting_before(sdpa):  # the same views, on the R rows
        split = insert_call(program.graph, aten.unflatten.int, (gather.args[0], -1, [heads, -1]))
        key_r = insert_call(program.graph, aten.transpose.int, (split, 1, 2))

    assert fuse_request_attention(program, request_index, offsets, compressed_of={key: key_r}) == 1
    (fused,) = _targets(program, op.default)
    assert fused.args[1] is key_r and fused.args[2] is key_r
    program.recompile()
    batch = w.make_batch([3, 1, 9], 5)
    with torch.no_grad():
        torch.testing.assert_close(
            program.run(batch), w.model(**batch.inputs), rtol=FP32_ROUNDING, atol=FP32_ROUNDING
        )


def _rows_of(node: object) -> object:
    return symbolic_dim(node.meta["val"].shape[0]) if isinstance(node, torch.fx.Node) else None


def test_causal_or_dropout_attention_is_left_alone() -> None:
    program = _shared_useq()
    request_index, offsets = _index_nodes(program)
    (gather,) = _kv_gathers(program, request_index)
    for sdpa in _targets(program, aten.scaled_dot_product_attention.default):
        q, k, v = sdpa.args[:3]
        sdpa.args = (q, k, v, None, 0.0, True)  # is_causal: the rows of a block see different keys
    assert fuse_request_attention(program, request_index, offsets) == 0
    assert _kv_gathers(program, request_index) == [gather]
    assert not _targets(program, op.default)
    program.recompile()


class _PaddedHistoryAttention(torch.nn.Module):
    """Target attention over a zero-padded history, masked per request: the mask is request-level too."""

    def __init__(self) -> None:
        super().__init__()
        self.item = torch.nn.Embedding(50, 16)
        self.kv = torch.nn.Linear(16, 16)
        self.query = torch.nn.Linear(8, 16)
        self.head = torch.nn.Linear(16, 1)

    def forward(self, history: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        kv = self.kv(self.item(history)).unflatten(-1, (2, -1)).transpose(1, 2)  # [N, 2, L, 8]
        q = self.query(cand).unsqueeze(1).unflatten(-1, (2, -1)).transpose(1, 2)  # [N, 2, 1, 8]
        mask = (history != 0).unsqueeze(1).unsqueeze(1)  # [N, 1, 1, L]
        out = F.scaled_dot_product_attention(q, kv, kv, attn_mask=mask).flatten(1)
        return self.head(out).squeeze(-1)


def _padded_history_batch(counts: Sequence[int], seed: int) -> RequestBatch:
    g = torch.Generator().manual_seed(seed)
    history = torch.randint(1, 50, (len(counts), 12), generator=g)
    history[:, 8:] = 0  # padding
    history[0] = 0  # a request with no history: nothing to attend to
    c = torch.tensor(counts)
    inputs = {"history": history.repeat_interleave(c, 0), "cand": torch.randn(int(c.sum()), 8, generator=g)}
    return RequestBatch(inputs, offsets_from_counts(counts))


def test_a_per_request_mask_is_shared_too() -> None:
    model = _PaddedHistoryAttention().eval()
    spec = RequestSpec(request_inputs=("history",))
    captured = codesign.capture(
        model, _padded_history_batch([2, 3], 0), spec, make_batch=_padded_history_batch
    )
    forced = RequestSharing(RequestSharingConfig(require_predicted_gain=False, fuse_attention=False))
    program, _ = PassManager([forced], get_target("host")).run(captured)
    request_index, offsets = _index_nodes(program)

    assert fuse_request_attention(program, request_index, offsets) == 1
    (fused,) = _targets(program, op.default)
    mask = fused.args[4]
    assert (
        isinstance(mask, torch.fx.Node) and _rows_of(mask) == symbolic_dim(offsets.meta["val"].shape[0]) - 1
    )
    assert not [
        n for n in program.graph.nodes if n.target is aten.index_select.default and n.args[2] is request_index
    ]
    program.recompile()
    for counts in ([1], [4, 1, 6]):
        batch = _padded_history_batch(counts, 9)
        with torch.no_grad():
            torch.testing.assert_close(
                program.run(batch), model(**batch.inputs), rtol=FP32_ROUNDING, atol=FP32_ROUNDING
            )


def test_request_sharing_fuses_target_attention_by_default() -> None:
    forced = RequestSharing(RequestSharingConfig(require_predicted_gain=False))
    shared, report = PassManager([forced], get_target("host")).run(tiny_program("useq"))
    assert report.passes[0].stats["request_attentions"] == 1
    request_index = next(n for n in shared.graph.nodes if n.target is aten.bucketize.Tensor)
    assert not _kv_gathers(shared, request_index)
    assert len(_targets(shared, op.default)) == 1
    w = tiny_workload("useq")
    batch = w.make_batch([3, 1, 9], 5)
    with torch.no_grad():
        torch.testing.assert_close(
            shared.run(batch), w.model(**batch.inputs), rtol=FP32_ROUNDING, atol=FP32_ROUNDING
        )
