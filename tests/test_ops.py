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

from codesign.ops import ACTIVATIONS, broadcast_linear_reference


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
        want = fn(x @ w.T + b + row[idx])
        torch.testing.assert_close(torch.ops.codesign.broadcast_linear(x, w, b, row, idx, act), want)
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


def test_triton_kernel_under_the_interpreter() -> None:
    pytest.importorskip("triton", reason="the gpu extra (triton) is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _INTERPRETED], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.stdout.strip().endswith("OK"), done.stdout[-2000:] + done.stderr[-4000:]


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
