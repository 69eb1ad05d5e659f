"""compile(): capture → passes → backend → a runnable, verified Variant (which saves as a bundle)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from codesign.backends import get_backend
from codesign.build.bundle_write import Verify, write_bundle
from codesign.errors import ConfigError, NumericsError, PassError
from codesign.ir.program import DERIVED_WEIGHTS, REQUEST_OFFSETS, Program, call_inputs, run_in_pieces
from codesign.ir.request import (
    RequestBatch,
    RequestSpec,
    StructuredBatch,
    compact_request_bags,
    flatten_inputs,
)
from codesign.ir.schema import InputSchema, as_request_batch
from codesign.numerics import Tolerance, compare_outputs, output_tensors
from codesign.version import __version__

if TYPE_CHECKING:
    # compile() imports the passes, capture, cost model and sharding plan it uses when it runs, so
    # that a process loading and scoring bundles (the serving runtime) imports none of them.
    from codesign.backends.base import Backend
    from codesign.hardware.target import Target
    from codesign.ir.workload import Workload
    from codesign.passes.manager import Pass
    from codesign.sharding.types import Plan

log = logging.getLogger(__name__)

__all__ = ["BACKEND_TOLERANCE", "COST_CANDIDATES", "Variant", "compile"]

# Inductor/AOTInductor fuse and reorder fp32 reductions; results agree to a few ulps of the sums.
BACKEND_TOLERANCE = {"eager": Tolerance(rtol=1e-5, atol=1e-6)}
COMPILED_TOLERANCE = Tolerance(rtol=1e-4, atol=1e-5)
COST_CANDIDATES = (64, 1024)
# Where the compile record profiles both programs (what `codesign report` plots): one request's
# candidates for the request-scaling curve, and a serving-sized batch for the op profile.
SCALING_CANDIDATES = (1, 4, 16, 64, 256, 1024, 4096)
PROFILE_BATCH = (1024, 16)


@dataclasses.dataclass
class Variant:
    """One compiled form of a model: a pass configuration lowered on a backend for a target.

    Call it with the model's keyword inputs (``variant(**batch.inputs)``) or ``variant.score(batch)``;
    ``variant.save(dir)`` writes a verified bundle that ``codesign.load(dir)`` reads back.
    """

    name: str
    spec: RequestSpec
    target: Target
    backend: Backend
    runner: Callable[..., Any]
    exported: torch.export.ExportedProgram
    artifacts: dict[str, Path]
    passes: list[dict[str, Any]]
    reference_inputs: RequestBatch
    reference_outputs: list[torch.Tensor]
    cost: dict[str, Any] = dataclasses.field(default_factory=dict)
    report: dict[str, Any] | None = None
    program: Program | None = None  # present when compiled in this process, absent when loaded
    cache_key: str = ""
    takes_request_offsets: bool = False  # request-centric variants also take the batch's request offsets
    micro_batch: int | None = None  # score at most this many candidate rows per call (a serving knob)
    plan: Plan | None = None  # embedding sharding plan (multi-device targets); saved as plan.json
    # input path -> {column or "*": table rows}: ids a server must check before scoring (analysis.embedding_id_bounds)
    id_bounds: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    # weight a pass computed -> the model weights it came from (Program.add_buffer); None: not recorded
    # (a bundle written before it was), so weight deltas cannot be checked against it
    derived_weights: dict[str, list[str]] | None = dataclasses.field(default_factory=dict)
    # (tables.bin, its manifest record) of a bundle loaded with planned_tables="leave": a sharded
    # server's rank reads its own blocks from it (codesign.build.shard_blocks)
    sharded_tables: tuple[Path, dict[str, Any]] | None = None

    def __call__(self, **inputs: Any) -> Any:
        if not torch.is_grad_enabled():  # entering no_grad again costs a few µs a call
            return self.runner(**inputs)
        with torch.no_grad():
            return self.runner(**inputs)

    def score(
        self,
        batch: RequestBatch | StructuredBatch | Mapping[str, Any],
        *,
        counts: Sequence[int] | None = None,
        check: bool = True,
    ) -> Any:
        """Scores of a request batch: flat rows (``RequestBatch``), request-centric (``StructuredBatch``),
        or a plain dict of the model's keyword inputs with ``counts`` (candidates per request).

        The batch is checked against the captured schema first (``input_schema``: names, dtypes,
        shapes, offsets, id ranges, and, for a variant that computes user work once per request,
        user rows repeated within a request) and refused with a
        ``RequestError`` subclass naming the input; ``check=False`` skips that for batches already
        checked (the server checks each request when it parses it). A structured batch holds user
        features once per request; it is laid out as the model's flat inputs and request offsets are
        passed when the variant uses them, so a request-sharing variant reads one row per request.

        >>> variant.score({"dense": x, "ids": ids}, counts=[40, 24])
        """
        structured = isinstance(batch, StructuredBatch)  # laid out flat here: its user rows repeat
        # the confirmed first-row bags (a reference run, once) only where a layout depends on them
        compact = self.first_row_bags if structured or self.micro_batch else frozenset()
        batch = as_request_batch(
            batch, counts=counts, spec=self.spec, template=self.reference_inputs, compact=compact
        )
        if check:
            # repeated user rows matter only where the variant reads one row per request
            self.input_schema.check(batch, repeats=self.takes_request_offsets and not structured)
        return run_in_pieces(self, batch, self.spec, self.takes_request_offsets, self.micro_batch, compact)

    @functools.cached_property
    def graph_first_row_bags(self) -> frozenset[str]:
        """Request-level id bags the exported graph reads only at each request's first row (a
        request-sharing variant looks the user's bag up once per request), by ``analysis.first_rows``;
        empty for variants that read every row. ``first_row_bags`` is this claim, confirmed."""
        if not self.takes_request_offsets or not self.spec.request_bags:
            return frozenset()
        from codesign.analysis.first_rows import first_row_bags

        graph = self.exported.graph_module.graph
        names = list(self.exported.graph_signature.user_inputs)
        paths = [p for p, _ in flatten_inputs(call_inputs(self.reference_inputs, True))]
        nodes = {n.name: n for n in graph.nodes if n.op == "placeholder"}
        if len(names) != len(paths) or not all(n in nodes for n in names):
            return frozenset()  # not the layout this variant was exported with: read every row
        placeholders = {p: nodes[n] for p, n in zip(paths, names, strict=True)}
        bags = {v: self.spec.bags[v][0] for v in self.spec.request_bags}
        return first_row_bags(graph, placeholders, bags, REQUEST_OFFSETS)

    @functools.cached_property
    def first_row_bags(self) -> frozenset[str]:
        """The user bags this variant may take once per request (``compact_request_bags``): the graph's
        claim (``graph_first_row_bags``), kept only if the reference batch laid out that way scores the
        reference outputs, on a reference batch with a request of 2 or more candidates (where the two
        layouts differ). Servers then send such a bag once per request instead of once per candidate."""
        try:
            claimed = self.graph_first_row_bags
            if not claimed or not bool((self.reference_inputs.counts > 1).any()):
                return frozenset()
            compact = compact_request_bags(self.reference_inputs, self.spec, claimed)
            got = run_in_pieces(self, compact, self.spec, self.takes_request_offsets, None)
            ok, max_abs, _ = compare_outputs(got, self.reference_outputs, self.tolerance)
        except Exception as exc:  # an analysis or scoring failure: read every row, as before
            log.warning(
                "variant '%s': user bags stay repeated per row (%s: %s)", self.name, type(exc).__name__, exc
            )
            return frozenset()
        if not ok:
            log.warning(
                "variant '%s' reads user bags %s at request-first rows by its graph, but its reference batch laid "
                "out that way is off by %.3g: they stay repeated on every row",
                self.name,
                sorted(claimed),
                max_abs,
            )
            return frozenset()
        return claimed

    @functools.cached_property
    def input_schema(self) -> InputSchema:
        """What a batch must look like to be scored (from the spec, reference batch and id bounds)."""
        return InputSchema.from_reference(self.spec, self.reference_inputs, self.id_bounds)

    @property
    def tolerance(self) -> Tolerance:
        return BACKEND_TOLERANCE.get(self.backend.name, COMPILED_TOLERANCE)

    def check_reference(self) -> tuple[bool, float]:
        """Score the stored reference requests and compare with the reference outputs."""
        ok, max_abs, _ = compare_outputs(
            self.score(self.reference_inputs), self.reference_outputs, self.tolerance
        )
        return ok, max_abs

    def save(
        self, directory: str | Path, *, overwrite: bool = False, verify: Verify = "fresh_process"
    ) -> Path:
        """Write a bundle (manifest.json + exported program + backend artifacts + reference data).

        Before it returns, the bundle is reloaded and scores its reference batch: by default in a
        fresh Python process (``verify="fresh_process"``, a few seconds), or ``"in_process"`` (faster;
        misses what only this process holds), or ``"none"`` (hot loops). A failed check raises
        BundleError and leaves no bundle at ``directory``.

        >>> variant.save("out/din")  # then: codesign.load("out/din")
        """
        return write_bundle(self, Path(directory), overwrite=overwrite, verify=verify)


def _resolve_passes(passes: Sequence[Pass | str] | None) -> list[Pass]:
    from codesign.passes import default_passes, pass_by_name
    from codesign.passes.manager import Pass

    if passes is None:
        return default_passes()
    out: list[Pass] = []
    for p in passes:
        if isinstance(p, str):
            out.append(pass_by_name(p)())
        elif isinstance(p, Pass):
            out.append(p)
        else:
            raise PassError(f"passes must be Pass objects or pass names, got {type(p).__name__}")
    return out


def cache_key(program: Program, passes: Sequence[Pass], backend: Backend, target: Target) -> str:
    """Hash of graph, pass uuids/configs, backend, target and library versions."""
    parts = {
        "graph": program.graph_hash(),
        "passes": [p.uuid() for p in passes],
        "backend": backend.uuid(),
        "target": target.to_dict(),
        "versions": [__version__, torch.__version__, sys.version.split()[0]],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def compile(
    model: torch.nn.Module | Workload | Program,
    example: RequestBatch | None = None,
    spec: RequestSpec | None = None,
    *,
    target: str | Target = "host",
    backend: str | Backend = "eager",
    passes: Sequence[Pass | str] | None = None,
    workdir: str | Path | None = None,
    verify: bool = True,
    micro_batch: int | None = None,
    verify_gates: bool = False,
) -> Variant:
    """Capture (unless given a Program), run passes with verified numerics, lower on a backend.

    ``passes=None`` runs ``codesign.passes.default_passes()`` (request sharing, fusion, cleanup); each
    pass that the cost model gates keeps the program unchanged where it predicts no gain.
    ``micro_batch`` makes ``score`` cut large batches into pieces of that many candidate rows.
    ``verify_gates`` times both sides of every gated pass decision on this machine and records the
    check in the report (``passes[i]["gate_check"]``, with ``wrong`` set where measurement disagrees).

    >>> variant = codesign.compile(model, batch, spec, target="host", backend="aoti")
    >>> scores = variant.score(batch)
    """
    if micro_batch is not None and (
        isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1
    ):
        raise ConfigError(
            f"micro_batch must be a positive number of candidate rows or None, got {micro_batch!r}"
        )
    from codesign.analysis import embedding_id_bounds
    from codesign.hardware.target import get_target
    from codesign.ir.capture import capture
    from codesign.passes.manager import PassManager
    from codesign.sharding.types import Plan

    program = model if isinstance(model, Program) else capture(model, example, spec)
    tgt = get_target(target)
    be = get_backend(backend)
    pass_list = _resolve_passes(passes)
    optimized, report = PassManager(pass_list, tgt, verify=verify, verify_gates=verify_gates).run(program)
    wd = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="codesign-"))
    lowered = be.lower(optimized, tgt, wd)
    reference_outputs = [t.detach().clone() for t in output_tensors(program.run(program.example))]
    variant = Variant(
        name=program.name,
        spec=program.spec,
        target=tgt,
        backend=be,
        runner=lowered.runner,
        exported=lowered.exported,
        artifacts=lowered.artifacts,
        passes=optimized.metadata.get("passes", []),
        reference_inputs=program.example,
        reference_outputs=reference_outputs,
        cost=_cost_figures(program, optimized, tgt),
        report=report.to_dict(),
        program=optimized,
        cache_key=cache_key(program, pass_list, be, tgt),
        takes_request_offsets=optimized.takes_request_offsets,
        micro_batch=micro_batch,
        plan=Plan.from_dict(optimized.metadata["sharding_plan"])
        if "sharding_plan" in optimized.metadata
        else None,
        id_bounds=embedding_id_bounds(program),
        derived_weights=_derived_weights(optimized),
    )
    if verify:
        _verify_backend(variant, program)
    return variant


def _derived_weights(program: Program) -> dict[str, list[str]]:
    """The program's recorded derivations, for the weights it still holds."""
    held = {n for n, _ in program.graph_module.named_buffers()} | {
        n for n, _ in program.graph_module.named_parameters()
    }
    recorded = program.metadata.get(DERIVED_WEIGHTS, {})
    return {name: list(sources) for name, sources in recorded.items() if name in held}


def _verify_backend(variant: Variant, reference: Program) -> None:
    batches = [reference.example, reference.sample_batch([4, 1, 7], seed=777)]
    for batch in batches:
        ok, max_abs, max_rel = compare_outputs(variant.score(batch), reference.run(batch), variant.tolerance)
        if not ok:
            raise NumericsError(
                f"backend '{variant.backend.name}' output differs from the captured reference on "
                f"{batch.num_candidates} candidates: max abs error {max_abs:.3g}, max rel error {max_rel:.3g}",
                fix="try backend 'eager', or report the model: the backend mis-compiled it",
            )


def _cost_figures(original: Program, program: Program, target: Target) -> dict[str, Any]:
    """Predicted figures saved with the variant: the compiled program's estimates, and the original
    and compiled programs' op profiles and request-scaling curves on the target (cost model)."""
    from codesign.hardware.costmodel import estimate, op_profile, scaling_curve

    candidates, requests = PROFILE_BATCH
    return {
        "target": target.name,
        "estimates": [estimate(program, target, n, max(1, n // 64)).summary() for n in COST_CANDIDATES],
        "profile": {
            "original": op_profile(original, target, candidates, requests),
            "compiled": op_profile(program, target, candidates, requests),
        },
        "scaling": {
            "requests": 1,
            "candidates": list(SCALING_CANDIDATES),
            "original_s": scaling_curve(original, target, SCALING_CANDIDATES),
            "compiled_s": scaling_curve(program, target, SCALING_CANDIDATES),
        },
    }
