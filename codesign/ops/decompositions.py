"""codesign's ops in aten terms, for compilers that fuse aten (Inductor).

A custom op is opaque to Inductor: it is called as an extern kernel, and nothing around it is fused
(the bias and activation of a ``broadcast_linear`` cannot join the next op's loop). ``decompose``
rewrites each op that has an aten form here into a call of that form, so that dynamo traces through
it and Inductor generates the code itself — C++ loops on the CPU, Triton on CUDA.

The forms avoid host syncs (no ``int(tensor)``, no ``.tolist()``), since a sync is a graph break
under dynamo. Bounds are still checked: Inductor asserts every indirect index it generates
(``assert_indirect_indexing``), and the grouped lookup checks each table's rows with an assert that
runs on the device.

Two ops stay opaque, each for a reason in ``OPAQUE``: their kernels are what they are for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.fx

from codesign.ops.broadcast_linear import broadcast_linear_reference
from codesign.ops.embedding_bags import EMBEDDING_BAG_MODES
from codesign.ops.fused_linear import fused_linear_reference
from codesign.ops.quantized_embedding import dequantized_rows, pool_rows

__all__ = ["DECOMPOSITIONS", "OPAQUE", "decompose", "decompose_exported", "opaque_nodes"]


def _grouped_embedding_bag(
    weight: torch.Tensor,
    indices: Sequence[torch.Tensor],
    offsets: Sequence[torch.Tensor],
    table_starts: Sequence[int],
    mode: int,
) -> torch.Tensor:
    """One ``embedding_bag`` over ids shifted into the joint table; per-table bounds asserted on the device."""
    torch._check(mode in EMBEDDING_BAG_MODES)
    ids, bag_offsets, first = [], [], 0
    for t, (idx, off) in enumerate(zip(indices, offsets, strict=True)):
        local = idx.reshape(-1).to(torch.int64)
        rows = table_starts[t + 1] - table_starts[t]
        torch._assert_async(
            ((local >= 0) & (local < rows)).all(),
            f"grouped_embedding_bag: an id is out of range for table {t} of the group ({rows} rows)",
        )
        ids.append(local + table_starts[t])
        bag_offsets.append(off.reshape(-1).to(torch.int64) + first)
        first = first + local.shape[0]
    flat = torch.cat(ids)
    ends = torch.cat([*bag_offsets, flat.new_full((1,), flat.shape[0])])
    out, *_ = torch.ops.aten._embedding_bag_forward_only(weight, flat, ends, False, mode, False, None, True)
    return out


def _quantized_embedding(
    weight: torch.Tensor, scale: torch.Tensor, ids: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    rows = dequantized_rows(weight, scale, ids, check=False)
    return rows.to(out_dtype).reshape(*ids.shape, weight.shape[1])


def _quantized_embedding_bag(
    weight: torch.Tensor,
    scale: torch.Tensor,
    ids: torch.Tensor,
    offsets: torch.Tensor,
    mode: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    torch._check(mode in EMBEDDING_BAG_MODES)
    return pool_rows(dequantized_rows(weight, scale, ids, check=False), offsets, mode).to(out_dtype)


def _ops() -> dict[str, Callable[..., torch.Tensor]]:
    import codesign.ops  # noqa: F401  (registers the ops)

    return {
        "broadcast_linear": broadcast_linear_reference,
        "fused_linear": fused_linear_reference,
        "grouped_embedding_bag": _grouped_embedding_bag,
        "quantized_embedding": _quantized_embedding,
        "quantized_embedding_bag": _quantized_embedding_bag,
    }


DECOMPOSITIONS: dict[torch._ops.OpOverload, Callable[..., torch.Tensor]] = {
    getattr(torch.ops.codesign, name).default: fn for name, fn in _ops().items()
}

OPAQUE: dict[torch._ops.OpOverload, str] = {
    torch.ops.codesign.request_attention.default: (
        "per-request blocks of candidates: an aten form would either copy each request's K/V to every "
        "candidate (what the op exists to avoid) or loop over requests on the host; it runs its own "
        "kernel (CPU blocks, Triton on CUDA)"
    ),
    torch.ops.codesign.fp8_linear.default: (
        "FP8 GEMM: on CUDA it is cuBLASLt scaled-mm or Transformer Engine, kernels Inductor would call "
        "as extern kernels anyway; on the CPU it is an exact FP8 emulation for tests"
    ),
}


def decompose(gm: torch.fx.GraphModule) -> int:
    """Point every decomposable codesign op node of ``gm`` at its aten form, in place; how many changed.

    The graph keeps its nodes and arguments (the forms take the ops' signatures), so nothing else
    about the graph changes; ``gm`` is recompiled.
    """
    changed = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in DECOMPOSITIONS:
            node.target = DECOMPOSITIONS[node.target]
            changed += 1
    if changed:
        gm.recompile()
    return changed


def decompose_exported(exported: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``exported`` with its decomposable codesign ops traced into aten (for AOTInductor).

    Re-traced with size-oblivious shapes, as ``Program.export`` traces: a request count of 1 must stay
    a size, not become a specialization the decomposition's trace guards against.
    """
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):  # type: ignore[attr-defined]  # torch config modules are typed without their options
        return exported.run_decompositions(dict(DECOMPOSITIONS))


def opaque_nodes(gm: torch.fx.GraphModule) -> list[str]:
    """Names of the codesign op nodes ``decompose`` leaves for Inductor to call as kernels."""
    return [
        n.name
        for n in gm.graph.nodes
        if n.op == "call_function"
        and isinstance(n.target, torch._ops.OpOverload)
        and n.target.namespace == "codesign"
    ]
