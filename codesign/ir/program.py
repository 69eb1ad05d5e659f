"""Program: the one IR handle passed between stages.

A Program wraps an *unlifted* ``torch.fx.GraphModule`` produced by ``torch.export`` (parameters are
attributes, the graph's placeholders are the flattened model inputs, node ``meta['val']`` carries
symbolic shapes), plus the RequestSpec, the capture example and metadata. Passes rewrite the graph
in place on a copy; backends re-export it (``Program.export``) to get an ``ExportedProgram``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.fx.experimental._config
import torch.utils._pytree as pytree
from torch.export import Dim

from codesign.errors import PassError
from codesign.ir.request import RequestBatch, RequestSpec, flatten_inputs, resample_batch, split_candidates
from codesign.numerics import output_tensors

__all__ = [
    "CANDIDATES_DIM",
    "REQUESTS_DIM",
    "REQUEST_OFFSETS",
    "Program",
    "call_inputs",
    "concat_outputs",
    "dynamic_shapes_for",
    "output_tensors",
    "run_in_pieces",
]

CANDIDATES_DIM = "candidates"
REQUESTS_DIM = "requests"  # dim 0 of per-request inputs (RequestSpec.per_request_inputs)
REQUEST_OFFSETS = "request_offsets"  # extra keyword input of request-centric programs: offsets[R+1]
DEFAULT_MAX_CANDIDATES = 1 << 20
# metadata key: buffer a pass computed -> the model weights it was computed from (Program.add_buffer)
DERIVED_WEIGHTS = "derived_weights"


def _dim_name(path: str) -> str:
    return "len_" + "".join(c if c.isalnum() else "_" for c in path)


def dynamic_shapes_for(
    inputs: Mapping[str, Any],
    spec: RequestSpec,
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
    request_offsets: bool = False,
) -> dict[str, Any]:
    """The ``dynamic_shapes`` tree for torch.export: candidate inputs share one ``candidates`` dim.

    With ``request_offsets`` the tree also covers the ``request_offsets`` input (R+1 entries).
    """
    candidates = Dim(CANDIDATES_DIM, min=1, max=max_candidates)
    requests = Dim(REQUESTS_DIM, min=1, max=max_candidates)  # per-request inputs: one row per request
    _, tree = pytree.tree_flatten(dict(inputs))
    shapes: list[Any] = []
    for path, value in flatten_inputs(inputs):
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or path in spec.static_inputs:
            shapes.append(None)
        elif path in spec.per_request_inputs:
            shapes.append({0: requests})
        elif path == spec.request_offsets_input:
            shapes.append({0: requests + 1})
        elif path in spec.bags:
            shapes.append({0: Dim(_dim_name(path), min=0, max=max_candidates * 1024)})
        else:
            shapes.append({0: candidates})
    tree_shapes: dict[str, Any] = pytree.tree_unflatten(shapes, tree)
    if request_offsets:
        tree_shapes[REQUEST_OFFSETS] = {0: Dim("requests_plus_one", min=2, max=max_candidates + 1)}
    return tree_shapes


def call_inputs(batch: RequestBatch, with_request_offsets: bool) -> dict[str, Any]:
    """Keyword inputs of one call: the model's inputs, plus ``request_offsets`` for request-centric programs."""
    if with_request_offsets:
        return {**batch.inputs, REQUEST_OFFSETS: batch.offsets}
    return dict(batch.inputs)


def run_in_pieces(
    runner: Callable[..., Any],
    batch: RequestBatch,
    spec: RequestSpec,
    with_request_offsets: bool,
    micro_batch: int | None,
    compact: Iterable[str] = (),
) -> Any:
    """Call ``runner`` on pieces of at most ``micro_batch`` candidate rows (all at once when None);
    ``compact``: request-level bags the runner reads at request-first rows only (see split_candidates)."""
    pieces = split_candidates(batch, spec, micro_batch, compact) if micro_batch else [batch]
    return concat_outputs([runner(**call_inputs(p, with_request_offsets)) for p in pieces])


def concat_outputs(parts: Sequence[Any]) -> Any:
    """Outputs of consecutive candidate pieces joined along the candidate dimension (dim 0)."""
    if len(parts) == 1:
        return parts[0]
    flat = [pytree.tree_flatten(p) for p in parts]
    leaves = [
        torch.cat(list(column)) if isinstance(column[0], torch.Tensor) else column[0]
        for column in zip(*(f[0] for f in flat), strict=True)
    ]
    return pytree.tree_unflatten(leaves, flat[0][1])


@dataclasses.dataclass
class Program:
    """A captured ranking model: graph, request roles, capture example and metadata."""

    graph_module: torch.fx.GraphModule
    spec: RequestSpec
    example: RequestBatch
    name: str = "model"
    make_batch: Callable[[Sequence[int], int], RequestBatch] | None = None
    max_candidates: int = DEFAULT_MAX_CANDIDATES
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    takes_request_offsets: bool = False  # request-centric programs also take ``request_offsets``
    # sampled batches by (counts, seed): the same for every copy (they depend on the inputs, not the graph);
    # analysis and the pass manager's checks sample the same shapes many times per pipeline
    _batches: dict[tuple[tuple[int, ...], int], RequestBatch] = dataclasses.field(
        default_factory=dict, repr=False, compare=False
    )

    # ---- running -------------------------------------------------------------------------
    def __call__(self, **inputs: Any) -> Any:
        return self.graph_module(**inputs)

    def call_inputs(self, batch: RequestBatch) -> dict[str, Any]:
        """The keyword inputs of one call: the model's inputs, plus the request offsets if the program takes them."""
        return call_inputs(batch, self.takes_request_offsets)

    def run(self, batch: RequestBatch) -> Any:
        with torch.no_grad():
            return self.graph_module(**self.call_inputs(batch))

    def sample_batch(self, candidates: Sequence[int], seed: int) -> RequestBatch:
        """Fresh requests: the workload's generator when known, else resampled from the example.

        Deterministic in (candidates, seed), so each is made once per program and its copies; callers
        must not change the returned tensors in place.
        """
        key = (tuple(int(c) for c in candidates), int(seed))
        if key not in self._batches:
            if self.make_batch is not None:
                self._batches[key] = self.make_batch(list(candidates), seed)
            else:
                self._batches[key] = resample_batch(self.example, self.spec, candidates, seed=seed)
        return self._batches[key]

    # ---- structure -----------------------------------------------------------------------
    @property
    def graph(self) -> torch.fx.Graph:
        return self.graph_module.graph

    @property
    def input_paths(self) -> list[str]:
        return [p for p, _ in flatten_inputs(self.call_inputs(self.example))]

    def placeholders(self) -> dict[str, torch.fx.Node]:
        """Input path -> placeholder node (graph placeholders follow the flattened input order)."""
        nodes = [n for n in self.graph.nodes if n.op == "placeholder"]
        return dict(zip(self.input_paths, nodes, strict=True))

    def op_count(self) -> int:
        return sum(1 for n in self.graph.nodes if n.op in ("call_function", "call_method", "call_module"))

    def copy(self) -> Program:
        """A deep copy whose graph and parameters a pass may change freely."""
        with warnings.catch_warnings():
            # torch's own pytree pickling hooks warn about their deprecated LeafSpec on every deepcopy
            warnings.filterwarnings("ignore", message=r".*LeafSpec", category=FutureWarning)
            gm = copy.deepcopy(self.graph_module)
        return dataclasses.replace(self, graph_module=gm, metadata=dict(self.metadata))

    def shallow_copy(self) -> Program:
        """A copy with its own graph that shares the parameters (cheap; a pass must not change them).

        For trying rewrites that add new buffers but leave existing weights alone (sensitivity
        analysis tries one rewrite per layer).
        """
        # node by node, with each node's meta dict copied but its values (fake tensors) shared: a deepcopy
        # of the graph would copy every fake tensor and cost tens of milliseconds per copy
        graph = torch.fx.Graph()
        graph._codegen = copy.deepcopy(self.graph._codegen)
        output = next(n for n in self.graph.nodes if n.op == "output")
        value = graph.graph_copy(self.graph, {})
        graph.output(value).meta = dict(output.meta)
        gm = torch.fx.GraphModule(self.graph_module, graph)
        return dataclasses.replace(self, graph_module=gm, metadata=dict(self.metadata))

    def recompile(self) -> None:
        self.graph.lint()
        self.graph_module.recompile()

    def verify(self) -> None:
        """Check the IR is well formed: lint, one placeholder per input, values on every op, one output."""
        self.graph.lint()
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(self.input_paths):
            raise PassError(
                f"program '{self.name}' has {len(placeholders)} placeholders for "
                f"{len(self.input_paths)} inputs"
            )
        outputs = [n for n in self.graph.nodes if n.op == "output"]
        if len(outputs) != 1:
            raise PassError(f"program '{self.name}' has {len(outputs)} output nodes")
        for node in self.graph.nodes:
            if node.op == "call_function" and "val" not in node.meta:
                raise PassError(
                    f"node '{node.name}' ({node.target}) carries no meta['val']: a pass "
                    "inserted it without shape metadata",
                    fix="copy or compute node.meta['val']",
                )
            if node.op == "get_attr":
                self.fetch_attr(str(node.target))

    def add_buffer(self, base: str, value: torch.Tensor, sources: Sequence[str] = ()) -> str:
        """Register ``value`` (detached, contiguous) as a buffer under a fresh name starting with ``base``.

        ``sources``: the weights (get_attr targets) it is computed from; recorded, resolved to the
        model's own weights, in ``metadata["derived_weights"]`` so that a weight update knows which
        weights no longer stand alone (``derived_weights``).
        """
        gm = self.graph_module
        name, i = base, 0
        while hasattr(gm, name):
            i += 1
            name = f"{base}_{i}"
        gm.register_buffer(name, value.detach().contiguous())
        derived = self.metadata.setdefault(DERIVED_WEIGHTS, {})
        derived[name] = sorted({o for s in sources for o in derived.get(s, [s])})
        return name

    def fetch_attr(self, target: str) -> Any:
        """The module attribute a ``get_attr`` node names (a parameter, buffer or submodule)."""
        obj: Any = self.graph_module
        for part in target.split("."):
            if not hasattr(obj, part):
                raise PassError(f"get_attr '{target}' names a missing attribute")
            obj = getattr(obj, part)
        return obj

    def dynamic_shapes(self) -> dict[str, Any]:
        return dynamic_shapes_for(
            self.example.inputs, self.spec, self.max_candidates, self.takes_request_offsets
        )

    def export(self, *, size_oblivious_only: bool = False) -> torch.export.ExportedProgram:
        """Re-export the (possibly rewritten) graph with the same dynamic dimensions.

        ``size_oblivious_only``: no plain-export fallback (capture asks this to find graphs that could
        not be re-exported once request sharing adds a request count).
        """
        inputs, dims = self.call_inputs(self.example), self.dynamic_shapes()
        # size-oblivious: a request count of 1 must not be specialized away (R is a size here)
        try:
            with torch.no_grad(), torch.fx.experimental._config.patch(backed_size_oblivious=True):  # type: ignore[attr-defined]  # torch config modules are typed without their options
                return torch.export.export(self.graph_module, (), inputs, dynamic_shapes=dims)
        except Exception as exc:
            # Some kernels test a size against 1 in a way capture could not take out (it copies a
            # transposed input of Linear to contiguous layout, decomposes tensordot): size-oblivious
            # tracing turns that into a guard the candidate dim violates. Without request offsets there
            # is no R to protect, so a plain export is safe.
            if size_oblivious_only or self.takes_request_offsets or "Constraints violated" not in str(exc):
                raise
        with torch.no_grad():
            return torch.export.export(self.graph_module, (), inputs, dynamic_shapes=dims)

    def reexported(self) -> Program:
        """A copy whose graph is re-traced by torch.export: fresh shapes and metadata after a rewrite."""
        return dataclasses.replace(self, graph_module=self.export().module(), metadata=dict(self.metadata))

    def graph_hash(self) -> str:
        """Stable hash of graph code, parameter metadata and a sample of parameter values."""
        h = hashlib.sha256(self.graph_module.code.encode())
        for name, t in sorted(self.graph_module.state_dict().items()):
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            flat = t.detach().reshape(-1)
            if flat.numel():
                step = max(1, flat.numel() // 4096)
                h.update(flat[::step].float().numpy().tobytes())
        return h.hexdigest()
