"""Per-node costs of a Program at a concrete batch size: ``analyze`` -> ``ProgramAnalysis``.

Shapes in the graph are symbolic in the candidate count (and jagged lengths); ``analyze`` binds the
symbols to the sizes of a concrete batch and records, per node: FLOPs, bytes moved, parameter bytes
read (all from the op-cost registry, ``codesign.analysis.costs``), output dtype and shape, and the
node's role (``codesign.analysis.roles``). The cost model prices these nodes on a target; nothing
downstream re-derives an op's formula.
"""

from __future__ import annotations

import dataclasses
import math

from codesign.analysis.costs import Engine, cost_of
from codesign.analysis.graph_queries import module_of, op_name, tensor_values
from codesign.analysis.roles import Role, propagate_roles
from codesign.analysis.shapes import ConcreteShapes, symbol_env
from codesign.ir.program import Program
from codesign.ir.request import RequestBatch, even_counts

__all__ = ["NodeCost", "ProgramAnalysis", "analyze"]


@dataclasses.dataclass(frozen=True)
class NodeCost:
    """Cost of one graph node at a concrete batch size.

    ``engine`` says which units run its FLOPs (``"matmul"``, ``"fp8"`` tensor cores or ``"vector"``)
    and ``kernels`` how many launches one call makes: both come from the op's registered cost.
    """

    name: str
    op: str
    flops: int
    bytes: int
    param_bytes: int
    dtype: str
    role: Role
    is_view: bool
    module: str
    out_shape: tuple[int, ...]
    engine: Engine = "vector"
    kernels: int = 1

    @property
    def arithmetic_intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else math.inf


@dataclasses.dataclass
class ProgramAnalysis:
    """All node costs of a Program for ``candidates`` rows spread over ``requests`` requests."""

    nodes: list[NodeCost]
    candidates: int
    requests: int
    param_bytes: int
    inputs: int = 0  # tensors one call takes (flattened): each is flattened and guarded per call

    @property
    def total_flops(self) -> int:
        return sum(n.flops for n in self.nodes)

    @property
    def total_bytes(self) -> int:
        return sum(n.bytes for n in self.nodes)

    @property
    def kernels(self) -> list[NodeCost]:
        """Nodes that launch work (views and bookkeeping excluded)."""
        return [n for n in self.nodes if not n.is_view]

    def flops_by_role(self) -> dict[Role, int]:
        out = dict.fromkeys(Role, 0)
        for n in self.nodes:
            out[n.role] += n.flops
        return out

    def flops_per_candidate(self) -> float:
        return self.total_flops / max(1, self.candidates)


def analyze(
    program: Program, candidates: int | RequestBatch = 64, requests: int = 1, *, seed: int = 0
) -> ProgramAnalysis:
    """Per-node FLOPs, bytes, parameter bytes and role at a concrete batch size.

    ``candidates`` is a total candidate count (split evenly over ``requests``) or a batch whose
    sizes bind the graph's symbolic dimensions.

    >>> analyze(program, 1024, requests=4).flops_per_candidate()
    """
    if isinstance(candidates, RequestBatch):
        batch = candidates
    else:
        if candidates < requests or requests < 1:
            raise ValueError(f"need candidates >= requests >= 1, got {candidates=} {requests=}")
        batch = program.sample_batch(even_counts(candidates, requests), seed)
    shapes = ConcreteShapes(symbol_env(program, batch), fallback=batch.num_candidates)
    roles = propagate_roles(program)
    nodes: list[NodeCost] = []
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        cost = cost_of(node, shapes)
        first = next(iter(tensor_values(node)), None)
        nodes.append(
            NodeCost(
                name=node.name,
                op=op_name(node),
                flops=int(cost.flops),
                bytes=int(cost.bytes),
                param_bytes=int(cost.param_bytes),
                dtype=str(first.dtype).removeprefix("torch.") if first is not None else "-",
                role=roles.get(node.name, Role.CANDIDATE),
                is_view=cost.is_view,
                module=module_of(node),
                out_shape=shapes.shape(first) if first is not None else (),
                engine=cost.engine,
                kernels=cost.kernels,
            )
        )
    return ProgramAnalysis(
        nodes,
        batch.num_candidates,
        batch.num_requests,
        _stored_param_bytes(program),
        len(program.input_paths),
    )


def _stored_param_bytes(program: Program) -> int:
    """Bytes of parameter and buffer storage, each storage once (views such as unpacked index pairs share one)."""
    seen: set[int] = set()
    total = 0
    for t in [*program.graph_module.parameters(), *program.graph_module.buffers()]:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total
