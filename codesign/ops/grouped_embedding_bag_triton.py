"""Triton kernel for ``codesign::grouped_embedding_bag``: one program per (bag, column block).

Ids are already shifted into the concatenated table and bounds-checked by ``flatten_groups``; each
program walks its bag's ids, loads the rows' columns and reduces them (sum / mean / max) in fp32.
Every table's bags are one launch instead of one kernel per table. Imported lazily (CUDA path
only); tested on CPU with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from codesign.ops.embedding_bags import EMBEDDING_BAG_MODES, flatten_groups

__all__ = ["grouped_embedding_bag_triton"]

_CONFIGS = [triton.Config({"BLOCK_D": d}, num_warps=w) for d, w in ((32, 1), (64, 2), (128, 4), (256, 4))]


@triton.jit
def _grouped_bag_kernel(
    w_ptr,
    idx_ptr,
    off_ptr,
    out_ptr,
    D,
    stride_w,
    stride_o,
    MODE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bag = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    start = tl.load(off_ptr + bag)
    end = tl.load(off_ptr + bag + 1)
    if MODE == 2:
        acc = tl.full((BLOCK_D,), float("-inf"), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in range(start, end):
        row = tl.load(idx_ptr + i)
        v = tl.load(w_ptr + row * stride_w + cols, mask=cmask, other=0.0).to(tl.float32)
        if MODE == 2:
            acc = tl.maximum(acc, v)
        else:
            acc += v
    count = end - start
    if MODE == 1:
        acc = acc / tl.maximum(count, 1).to(tl.float32)
    if MODE == 2:
        acc = tl.where(count > 0, acc, 0.0)
    tl.store(out_ptr + bag * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


_autotuned = triton.autotune(configs=_CONFIGS, key=["D"])(_grouped_bag_kernel)


def grouped_embedding_bag_triton(
    weight: torch.Tensor,
    indices: Sequence[torch.Tensor],
    offsets: Sequence[torch.Tensor],
    table_starts: Sequence[int],
    mode: int,
    *,
    block_d: int | None = None,
) -> torch.Tensor:
    """Run the kernel; ``block_d`` fixes the column block and skips autotuning (tests, interpreter)."""
    if mode not in EMBEDDING_BAG_MODES:
        raise ValueError(f"grouped_embedding_bag: mode {mode} is not one of {EMBEDDING_BAG_MODES}")
    ids, bag_offsets = flatten_groups(indices, offsets, table_starts)
    bags, dim = bag_offsets.numel() - 1, weight.shape[1]
    w = weight.contiguous()
    out = torch.empty((bags, dim), device=weight.device, dtype=weight.dtype)
    if bags == 0:
        return out
    args = (w, ids, bag_offsets, out, dim, w.stride(0), out.stride(0))
    if block_d is not None:
        _grouped_bag_kernel[(bags, triton.cdiv(dim, block_d))](*args, MODE=mode, BLOCK_D=block_d)
    else:

        def grid(meta: dict[str, int]) -> tuple[int, int]:
            return (bags, triton.cdiv(dim, meta["BLOCK_D"]))

        _autotuned[grid](*args, MODE=mode)
    return out
