"""codesign::broadcast_linear: reference semantics, export/fake shapes, and the Triton kernel.

The Triton kernel runs on CPU under ``TRITON_INTERPRET=1`` in a subprocess (the interpreter is chosen
when triton is imported, so it must not leak into this process); on CUDA it is checked directly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from codesign.ops import (
    ACTIVATIONS,
    EMBEDDING_BAG_MODES,
    broadcast_linear_reference,
    grouped_embedding_bag_reference,
)


def test_reference_matches_the_unfused_computation() -> None:
    x, w, b = torch.randn(9, 6), torch.randn(4, 6), torch.randn(4)
    row, idx = torch.randn(3, 4), torch.tensor([0, 0, 1, 2, 2, 2, 1, 0, 2])
    for act, fn in (
        ("none", lambda t: t),
        ("relu", torch.relu),
        ("sigmoid", torch.sigmoid),
        ("gelu", torch.nn.functional.gelu),
        ("tanh", torch.tanh),
    ):
        for bias in (b, None):
            want = fn(x @ w.T + (0 if bias is None else bias) + row[idx])
            torch.testing.assert_close(torch.ops.codesign.broadcast_linear(x, w, bias, row, idx, act), want)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        broadcast_linear_reference(x, w, b, row, idx, "swish")
    assert set(ACTIVATIONS) == {"none", "relu", "sigmoid", "gelu", "tanh"}


def test_exports_with_dynamic_rows() -> None:
    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(5, 3))

        def forward(self, x: torch.Tensor, row: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return torch.ops.codesign.broadcast_linear(x, self.w, None, row, idx, "relu")

    n, r = torch.export.Dim("n"), torch.export.Dim("r")
    x, row, idx = torch.randn(6, 3), torch.randn(2, 5), torch.tensor([0, 1, 1, 0, 1, 1])
    ep = torch.export.export(M(), (x, row, idx), dynamic_shapes=({0: n}, {0: r}, {0: n}))
    x2, row2, idx2 = torch.randn(11, 3), torch.randn(4, 5), torch.randint(0, 4, (11,))
    model = M()
    model.load_state_dict(ep.module().state_dict())
    got = ep.module()(x2, row2, idx2)
    assert got.shape == (11, 5)
    torch.testing.assert_close(got, model(x2, row2, idx2))


_INTERPRETED = textwrap.dedent("""
    import torch
    from codesign.ops.broadcast_linear import broadcast_linear_reference
    from codesign.ops.broadcast_linear_triton import broadcast_linear_triton
    torch.manual_seed(0)
    for act in ("none", "relu", "sigmoid", "gelu", "tanh"):
        for m, k, n, r, bias in ((37, 20, 33, 5, True), (1, 16, 16, 1, False), (64, 70, 9, 3, True)):
            x, w, row = torch.randn(m, k), torch.randn(n, k), torch.randn(r, n)
            b = torch.randn(n) if bias else None
            idx = torch.randint(0, r, (m,))
            got = broadcast_linear_triton(x, w, b, row, idx, act, blocks=(16, 16, 16))
            torch.testing.assert_close(got, broadcast_linear_reference(x, w, b, row, idx, act), rtol=1e-5, atol=1e-5)
    print("OK")
""")


def _run_interpreted(code: str) -> None:
    """Run ``code`` in a fresh interpreter with TRITON_INTERPRET=1; it prints OK when every check passed."""
    pytest.importorskip("triton", reason="the gpu extra (triton) is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert done.stdout.strip().endswith("OK"), done.stdout[-2000:] + done.stderr[-4000:]


def test_triton_kernel_under_the_interpreter() -> None:
    _run_interpreted(_INTERPRETED)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_kernel_on_cuda() -> None:
    x, w, b = (
        torch.randn(513, 256, device="cuda"),
        torch.randn(128, 256, device="cuda"),
        torch.randn(128, device="cuda"),
    )
    row, idx = torch.randn(7, 128, device="cuda"), torch.randint(0, 7, (513,), device="cuda")
    got = torch.ops.codesign.broadcast_linear(x, w, b, row, idx, "relu")
    torch.testing.assert_close(
        got, broadcast_linear_reference(x, w, b, row, idx, "relu"), rtol=1e-4, atol=1e-4
    )


# ---- codesign::fused_linear and codesign::grouped_embedding_bag ---------------------------------


def test_fused_linear_matches_linear_then_activation() -> None:
    x, w, b = torch.randn(9, 6), torch.randn(4, 6), torch.randn(4)
    got = torch.ops.codesign.fused_linear(x, w, b, "gelu")
    torch.testing.assert_close(got, torch.nn.functional.gelu(x @ w.T + b))
    torch.testing.assert_close(torch.ops.codesign.fused_linear(x, w, None, "none"), x @ w.T)


def _tables() -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    tables = [torch.randn(r, 5, generator=g) for r in (7, 1, 12)]
    ids = [torch.randint(0, t.shape[0], (n,), generator=g) for t, n in zip(tables, (9, 0, 4), strict=True)]
    offsets = [torch.tensor([0, 3, 3, 8]), torch.tensor([0, 0]), torch.tensor([0])]  # empty bags included
    return tables, ids, offsets


def test_grouped_embedding_bag_equals_one_lookup_per_table() -> None:
    tables, ids, offsets = _tables()
    starts = [0, 7, 8, 20]
    for mode, name in EMBEDDING_BAG_MODES.items():
        got = torch.ops.codesign.grouped_embedding_bag(torch.cat(tables), ids, offsets, starts, mode)
        want = torch.cat(
            [
                torch.nn.functional.embedding_bag(i, t, o, mode=name)
                for t, i, o in zip(tables, ids, offsets, strict=True)
            ]
        )
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="expected T, T and T\\+1"):
        grouped_embedding_bag_reference(torch.cat(tables), ids, offsets, starts[:-1], 0)
    with pytest.raises(ValueError, match="mode 3"):
        grouped_embedding_bag_reference(torch.cat(tables), ids, offsets, starts, 3)


def test_grouped_embedding_bag_exports_with_dynamic_bags() -> None:
    class Lookup(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(20, 5))

        def forward(
            self, a: torch.Tensor, oa: torch.Tensor, b: torch.Tensor, ob: torch.Tensor
        ) -> torch.Tensor:
            return torch.ops.codesign.grouped_embedding_bag(self.weight, [a, b], [oa, ob], [0, 8, 20], 0)

    n, la, lb = torch.export.Dim("n"), torch.export.Dim("la"), torch.export.Dim("lb")
    args = (
        torch.randint(0, 8, (6,)),
        torch.tensor([0, 2, 4]),
        torch.randint(0, 12, (5,)),
        torch.tensor([0, 1, 3]),
    )
    ep = torch.export.export(Lookup(), args, dynamic_shapes=({0: la}, {0: n}, {0: lb}, {0: n}))
    more = (
        torch.randint(0, 8, (9,)),
        torch.tensor([0, 2, 4, 4, 7]),
        torch.randint(0, 12, (2,)),
        torch.tensor([0, 1, 1, 1, 2]),
    )
    assert ep.module()(*more).shape == (10, 5)


_INTERPRETED_FUSION = textwrap.dedent("""
    import torch
    from codesign.ops import EMBEDDING_BAG_MODES, fused_linear_reference, grouped_embedding_bag_reference
    from codesign.ops.broadcast_linear_triton import fused_linear_triton
    from codesign.ops.grouped_embedding_bag_triton import grouped_embedding_bag_triton
    torch.manual_seed(0)
    for act in ("none", "relu", "sigmoid", "gelu", "tanh"):
        for m, k, n, bias in ((37, 20, 33, True), (1, 16, 16, False)):
            x, w = torch.randn(m, k), torch.randn(n, k)
            b = torch.randn(n) if bias else None
            got = fused_linear_triton(x, w, b, act, blocks=(16, 16, 16))
            torch.testing.assert_close(got, fused_linear_reference(x, w, b, act), rtol=1e-5, atol=1e-5)
    tables = [torch.randn(r, 37) for r in (7, 1, 12)]
    ids = [torch.randint(0, t.shape[0], (n,)) for t, n in zip(tables, (9, 0, 4))]
    offsets = [torch.tensor([0, 3, 3, 8]), torch.tensor([0, 0]), torch.tensor([0])]
    for mode in EMBEDDING_BAG_MODES:
        args = (torch.cat(tables), ids, offsets, [0, 7, 8, 20], mode)
        got = grouped_embedding_bag_triton(*args, block_d=16)
        torch.testing.assert_close(got, grouped_embedding_bag_reference(*args), rtol=1e-6, atol=1e-6)
    print("OK")
""")


def test_fusion_kernels_under_the_interpreter() -> None:
    _run_interpreted(_INTERPRETED_FUSION)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fusion_kernels_on_cuda() -> None:
    x, w, b = (
        torch.randn(513, 256, device="cuda"),
        torch.randn(128, 256, device="cuda"),
        torch.randn(128, device="cuda"),
    )
    torch.testing.assert_close(
        torch.ops.codesign.fused_linear(x, w, b, "relu"), torch.relu(x @ w.T + b), rtol=1e-4, atol=1e-4
    )
    tables, ids, offsets = _tables()
    cuda = [t.cuda() for t in ids], [o.cuda() for o in offsets]
    got = torch.ops.codesign.grouped_embedding_bag(torch.cat(tables).cuda(), *cuda, [0, 7, 8, 20], 0)
    want = grouped_embedding_bag_reference(torch.cat(tables), ids, offsets, [0, 7, 8, 20], 0)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
