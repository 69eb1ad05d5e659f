"""Selective FP8: put in FP8 only the layers whose quality cost buys a predicted speed-up.

Quantizing a whole ranking model to FP8 moves its normalized entropy (NE) by more than ranking
teams accept; most layers, though, barely notice. The pass:

1. **finds** the quantizable layers: Linears (weights with K, N multiples of 16, as FP8 tensor
   cores need) and embedding tables (``nn.Embedding`` / ``nn.EmbeddingBag`` lookups);
2. **measures** each one alone in FP8 on seeded calibration requests: NE change against labels
   drawn from the full-precision model's own probabilities (synthetic data has no clicks, see
   ``codesign.analysis.quality``), largest logit error and output SQNR. FP8 numerics are emulated exactly
   in fp32 wherever the pass runs, so the figures hold for the target's tensor cores;
3. **predicts** each one's latency saving on the target from the cost model: the GEMM at the FP8
   rate plus the activation-quantizing kernel, against the same GEMM at ``baseline_dtype``
   (small, memory- or launch-bound GEMMs may gain nothing and are never chosen); tables save
   lookup bytes and memory;
4. **selects** the set with the largest saving whose summed NE cost fits the budget (greedy by
   saving per unit of NE, or a 0/1 knapsack), **verifies** the combined set (effects can add up
   or cancel) and backs off, dropping the least valuable layer, until the combined loss fits;
5. **rewrites** the chosen Linears to ``codesign::fp8_linear`` (pre-quantized weight, a following
   activation folded in) and tables to ``codesign::quantized_embedding[_bag]``.

Targets without FP8 matrix units are refused by name. The full report (every layer's
sensitivity and predicted gain, the chosen set, the combined loss) is the pass's stats.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

from codesign.analysis import ProgramAnalysis, analyze, linear_cost
from codesign.analysis.quality import QualityLoss, join_heads, quality_loss
from codesign.config import Config, knob, register_config
from codesign.errors import ConfigError, PassError
from codesign.hardware.costmodel import estimate_analysis, kernel_time_s
from codesign.hardware.target import Target
from codesign.ir.program import Program
from codesign.numerics import Tolerance, sqnr_db
from codesign.ops.fp8_linear import FP8_KERNELS, fp8_linear_cost, quantize_weight, scaled_mm_shape_ok
from codesign.ops.quantize import GRANULARITIES
from codesign.ops.quantized_embedding import (
    QUANTIZED_TABLE_FORMATS,
    quantize_table,
    quantized_lookup_cost,
    table_bytes,
)
from codesign.passes.graph_edit import (
    finish_rewrite,
    insert_call,
    param_value,
    register_constant,
    weights_read,
)
from codesign.passes.manager import GATE_CANDIDATES, GATE_REQUESTS, Pass, PassResult, SkipKind
from codesign.passes.patterns import embedding_bag_lookup, epilogue_activation
from codesign.passes.registry import register_pass

__all__ = [
    "ELIGIBLE_KINDS",
    "FP8_TOLERANCE",
    "Fp8Report",
    "LayerSensitivity",
    "SelectiveFp8",
    "SelectiveFp8Config",
    "select_layers",
]

aten = torch.ops.aten

ELIGIBLE_KINDS = ("linear", "embedding", "linear+embedding")
SELECTIONS = ("greedy", "knapsack")
BASELINE_DTYPES = ("bf16", "fp16", "fp32")
_BASELINE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# Sanity floor the PassManager checks on fresh requests (the NE budget is the real criterion):
# one FP8 GEMM alone gives ~30 dB; a chosen set under a 0.1 % NE budget stays well above 20 dB.
FP8_MIN_SQNR_DB = 15.0
FP8_TOLERANCE = Tolerance(rtol=0.0, atol=0.0, min_sqnr_db=FP8_MIN_SQNR_DB)
# The knapsack weighs NE cost in this many steps of the budget.
_KNAPSACK_STEPS = 200


@register_config
@dataclasses.dataclass(frozen=True)
class SelectiveFp8Config(Config):
    # NE may rise by at most this many percent (worst head)
    quality_budget_pct: float = knob(
        0.1,
        low=0.0,
        high=0.5,
        step=0.025,
        help="largest NE increase (%) the chosen FP8 layers may cost together",
    )
    granularity: str = knob("row", choices=GRANULARITIES, help="FP8 scales per row or per tensor")
    eligible: str = knob("linear+embedding", choices=ELIGIBLE_KINDS, help="layer kinds FP8 may take")
    # fp8 (e4m3) or int8, row-wise scales
    table_format: str = knob(
        "fp8",
        choices=QUANTIZED_TABLE_FORMATS,
        help="storage of quantized embedding tables",
        when=("eligible", ("embedding", "linear+embedding")),
    )
    selection: str = knob("greedy", choices=SELECTIONS, help="how layers are chosen under the budget")
    kernel: str = "auto"  # fp8_linear kernel: auto, scaled_mm, te, emulate
    baseline_dtype: str = "bf16"  # precision the predicted saving is measured against
    # False: every eligible layer within the budget may be chosen, gain or not (all-FP8 studies)
    require_predicted_gain: bool = True
    # False: no budget at all, no back-off (the combined loss is still measured and reported)
    enforce_budget: bool = True
    calibration_requests: int = 8
    calibration_candidates: int = 128  # per request
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()  # the knobs
        choices = {
            "kernel": FP8_KERNELS,
            "baseline_dtype": BASELINE_DTYPES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"selective_fp8: {name}={getattr(self, name)!r} is not one of {allowed}")
        if self.calibration_requests < 1 or self.calibration_candidates < 1:
            raise ConfigError("selective_fp8: calibration_requests and calibration_candidates must be >= 1")


@dataclasses.dataclass
class LayerSensitivity:
    """One quantizable layer: what FP8 alone costs in quality and what it is predicted to save."""

    node: str
    module: str
    kind: str  # "linear" | "embedding" | "embedding_bag"
    shape: tuple[int, int]  # (out, in) of a Linear; (rows, dim) of a table
    eligible: bool
    reason: str = ""  # why not eligible / not chosen
    ne_loss_pct: float | None = None  # |NE change| in %, worst head, this layer alone in FP8
    max_logit_error: float | None = None
    sqnr_db: float | None = None
    baseline_s: float = 0.0  # predicted time at the gate batch, baseline precision
    fp8_s: float = 0.0  # predicted time in FP8 (quantization kernel included)
    memory_saved_bytes: int = 0
    chosen: bool = False

    @property
    def saving_s(self) -> float:
        return self.baseline_s - self.fp8_s

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d["saving_s"] = self.saving_s
        return d


@dataclasses.dataclass
class Fp8Report:
    """The pass's decision, as data: every layer, the chosen set and the combined quality loss."""

    target: str
    budget_pct: float
    selection: str
    layers: list[LayerSensitivity]
    combined: QualityLoss | None  # quality of the chosen set together (None: nothing chosen)
    combined_sqnr_db: float | None
    backed_off: list[str]  # layers dropped after the verification run broke the budget
    predicted_latency_before_s: float
    predicted_latency_after_s: float
    param_bytes_before: int
    param_bytes_after: int

    @property
    def chosen(self) -> list[str]:
        return [layer.node for layer in self.layers if layer.chosen]

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "budget_pct": self.budget_pct,
            "selection": self.selection,
            "chosen": self.chosen,
            "combined_loss_pct": None if self.combined is None else self.combined.exact_pct,
            "combined_max_logit_error": None if self.combined is None else self.combined.max_abs_error,
            "combined_sqnr_db": self.combined_sqnr_db,
            "backed_off": self.backed_off,
            "predicted_latency_before_s": self.predicted_latency_before_s,
            "predicted_latency_after_s": self.predicted_latency_after_s,
            "param_bytes_before": self.param_bytes_before,
            "param_bytes_after": self.param_bytes_after,
            "layers": [layer.to_dict() for layer in self.layers],
        }


# ---- finding layers -----------------------------------------------------------------------


def _module(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    return str(list(stack.values())[-1][0]) if stack else ""


def _find_layers(program: Program, cfg: SelectiveFp8Config) -> list[LayerSensitivity]:
    linears_ok = cfg.eligible in ("linear", "linear+embedding")
    tables_ok = cfg.eligible in ("embedding", "linear+embedding")
    layers: list[LayerSensitivity] = []
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is aten.linear.default:
            w = param_value(program, node.args[1])
            if w is None or w.dim() != 2 or not w.is_floating_point():
                continue
            n_out, k = w.shape
            layer = LayerSensitivity(node.name, _module(node), "linear", (n_out, k), linears_ok)
            if not linears_ok:
                layer.reason = f"linears are not eligible (eligible={cfg.eligible!r})"
            elif not scaled_mm_shape_ok(k, n_out):
                layer.eligible = False
                layer.reason = f"K={k}, N={n_out}: FP8 tensor cores need multiples of 16"
        elif node.target is aten.embedding.default or embedding_bag_lookup(program, node) is not None:
            w = param_value(program, node.args[0])
            if w is None or w.dim() != 2 or not w.is_floating_point():
                continue
            kind = "embedding" if node.target is aten.embedding.default else "embedding_bag"
            rows, dim = w.shape
            layer = LayerSensitivity(node.name, _module(node), kind, (int(rows), int(dim)), tables_ok)
            if not tables_ok:
                layer.reason = f"embedding tables are not eligible (eligible={cfg.eligible!r})"
        else:
            continue
        layers.append(layer)
    return layers


# ---- rewriting ----------------------------------------------------------------------------


class _Quantized:
    """Quantized weights and tables of one program, computed once and shared by every trial."""

    def __init__(self, program: Program, cfg: SelectiveFp8Config) -> None:
        self.program, self.cfg = program, cfg
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, node: torch.fx.Node, weight_arg: int) -> tuple[torch.Tensor, torch.Tensor]:
        if node.name not in self._cache:
            w = param_value(self.program, node.args[weight_arg])
            assert w is not None  # _find_layers only lists nodes with a weight
            if weight_arg == 1:
                self._cache[node.name] = quantize_weight(w, self.cfg.granularity)
            else:
                self._cache[node.name] = quantize_table(w, self.cfg.table_format)
        return self._cache[node.name]


def _replace(node: torch.fx.Node, new: torch.fx.Node) -> None:
    new.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
    node.replace_all_uses_with(new)
    node.graph.erase_node(node)


def _param(program: Program, node: Any) -> torch.Tensor:
    """The parameter a layer reads (its weight); layers are found only where it is one."""
    value = param_value(program, node)
    if value is None:
        raise PassError(f"{getattr(node, 'name', node)} does not read a parameter")
    return value


def _rewrite(program: Program, names: Sequence[str], cfg: SelectiveFp8Config, quantized: _Quantized) -> None:
    """Rewrite the named layers of ``program`` in place to their FP8 / quantized-table ops."""
    graph = program.graph
    nodes = {n.name: n for n in graph.nodes}
    for name in names:
        node = nodes[name]
        weight_node = node.args[1] if node.target is aten.linear.default else node.args[0]
        base = str(getattr(weight_node, "target", "weight")).replace(".", "_")
        w_idx = 1 if node.target is aten.linear.default else 0
        q, scale = quantized.get(node, w_idx)
        sources = weights_read([node])
        q_node = register_constant(program, f"{base}_{'fp8' if w_idx else cfg.table_format}", q, sources)
        s_node = register_constant(program, f"{base}_scale", scale, sources)
        if node.target is aten.linear.default:
            _rewrite_linear(graph, node, q_node, s_node, cfg)
        elif node.target is aten.embedding.default:
            dtype = _param(program, node.args[0]).dtype
            with graph.inserting_before(node):
                new = insert_call(
                    graph,
                    torch.ops.codesign.quantized_embedding.default,
                    (q_node, s_node, node.args[1], dtype),
                )
            _replace(node, new)
        else:
            _rewrite_bag(program, node, q_node, s_node)


def _rewrite_linear(
    graph: torch.fx.Graph, node: torch.fx.Node, q_node: Any, s_node: Any, cfg: SelectiveFp8Config
) -> None:
    bias = node.args[2] if len(node.args) > 2 else None
    last: torch.fx.Node = node
    activation = "none"
    epilogue = epilogue_activation(node)
    if epilogue is not None:
        last, activation = epilogue  # the activation runs in the op's epilogue
    with graph.inserting_before(last):
        new = insert_call(
            graph,
            torch.ops.codesign.fp8_linear.default,
            (node.args[0], q_node, s_node, bias, activation, cfg.granularity, cfg.kernel),
        )
    if last is not node:
        _replace(last, new)
    _replace(node, new)


def _rewrite_bag(program: Program, node: torch.fx.Node, q_node: Any, s_node: Any) -> None:
    lookup = embedding_bag_lookup(program, node)
    if lookup is None:
        raise PassError(f"{node.name} is no longer an EmbeddingBag lookup the quantized op can take")
    weight, ids, offsets, mode = lookup
    graph = program.graph
    with graph.inserting_before(node):
        new = insert_call(
            graph,
            torch.ops.codesign.quantized_embedding_bag.default,
            (q_node, s_node, ids, offsets, mode, weight.dtype),
        )
    for user in list(node.users):  # getitem 0 is the pooled output; the others are unused
        if user.target is operator.getitem and user.args[1] == 0:
            _replace(user, new)
        else:
            graph.erase_node(user)
    _replace(node, new)


# ---- measuring ----------------------------------------------------------------------------


# Measurements by (program, the config fields quality depends on, layer set). A search runs the pass again
# with other budgets and selections on the same program; the measurements are the same, so they are kept.
_MEASURED: collections.OrderedDict[tuple[Any, ...], tuple[QualityLoss, float]] = collections.OrderedDict()
_MEASURED_MAX = 4096


class _Calibration:
    """Seeded calibration requests, the reference heads on them, and trial runs against them."""

    def __init__(self, program: Program, cfg: SelectiveFp8Config, quantized: _Quantized) -> None:
        self.program, self.cfg, self.quantized = program, cfg, quantized
        counts = [cfg.calibration_candidates] * cfg.calibration_requests
        self.batches = [program.sample_batch(counts, seed=cfg.seed + 7919)]
        self.reference = join_heads([program.run(b) for b in self.batches])
        self.key = (
            program.graph_hash(),
            cfg.granularity,
            cfg.table_format,
            cfg.kernel,
            cfg.calibration_requests,
            cfg.calibration_candidates,
            cfg.seed,
        )

    def measure(self, names: Sequence[str]) -> tuple[QualityLoss, float]:
        """(quality loss, worst output SQNR in dB) with the named layers in FP8."""
        key = (*self.key, frozenset(names))
        if key in _MEASURED:
            _MEASURED.move_to_end(key)
            return _MEASURED[key]
        trial = self.program.shallow_copy()
        _rewrite(trial, names, self.cfg, self.quantized)
        trial.recompile()
        heads = join_heads([trial.run(b) for b in self.batches])
        loss = quality_loss(self.reference, heads, seed=self.cfg.seed)
        _MEASURED[key] = (loss, _worst_sqnr(self.reference, heads))
        while len(_MEASURED) > _MEASURED_MAX:
            _MEASURED.popitem(last=False)
        return _MEASURED[key]


def _worst_sqnr(reference: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> float:
    pairs = zip(reference, outputs, strict=True)
    return min((sqnr_db(r, o) for r, o in pairs if r.is_floating_point() and r.numel()), default=math.inf)


def _predict(
    program: Program,
    analysis: ProgramAnalysis,
    layers: Sequence[LayerSensitivity],
    target: Target,
    cfg: SelectiveFp8Config,
) -> None:
    """Fill each layer's predicted baseline / FP8 time at the gate batch and its memory saving."""
    costs = {n.name: n for n in analysis.nodes}
    nodes = {n.name: n for n in program.graph.nodes}
    base_bytes = _BASELINE_BYTES[cfg.baseline_dtype]
    for layer in layers:
        cost = costs[layer.node]
        if layer.kind == "linear":
            n_out, k = layer.shape
            m = math.prod(cost.out_shape) // max(1, n_out)
            bias = len(nodes[layer.node].args) > 2 and nodes[layer.node].args[2] is not None
            base = linear_cost(m, k, n_out, base_bytes, bias)
            fp8 = fp8_linear_cost(m, k, n_out, base_bytes, base_bytes, n_out * base_bytes if bias else 0)
            layer.baseline_s = kernel_time_s(target, base.flops, base.bytes, cfg.baseline_dtype, base.kernels)
            layer.fp8_s = kernel_time_s(target, fp8.flops, fp8.bytes, "fp8", fp8.kernels)
            layer.memory_saved_bytes = k * n_out * 4 - (k * n_out + 4 * n_out)
        else:
            rows, dim = layer.shape
            w_dtype = _param(program, nodes[layer.node].args[0]).dtype
            if layer.kind == "embedding":
                gathered = math.prod(cost.out_shape) // max(1, dim)
            else:  # the analysis counts one FLOP per looked-up value of a bag
                gathered = cost.flops // max(1, dim)
            # the same lookup, reading one byte and a 4-byte scale per row instead of D values
            quantized = quantized_lookup_cost(
                gathered, dim, 1, cost.bytes - gathered * dim * w_dtype.itemsize
            )
            layer.baseline_s = kernel_time_s(target, 0, cost.bytes, None)
            layer.fp8_s = kernel_time_s(target, quantized.flops, quantized.bytes, None, quantized.kernels)
            fmt = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(w_dtype, "fp32")
            layer.memory_saved_bytes = table_bytes(rows, dim, fmt) - table_bytes(rows, dim, cfg.table_format)


# ---- selecting ----------------------------------------------------------------------------


def select_layers(
    layers: Sequence[LayerSensitivity], budget_pct: float, method: str = "greedy", require_gain: bool = True
) -> list[str]:
    """Layers with the largest total predicted saving whose summed NE cost fits ``budget_pct``.

    Only measured, eligible layers with a cost within the budget and (unless ``require_gain`` is
    off) a positive predicted saving take part. ``greedy`` adds them by saving per unit of NE; ``knapsack`` solves the 0/1
    problem exactly on a grid of ``budget / 200`` NE steps.
    """
    pool = [
        layer
        for layer in layers
        if layer.eligible
        and layer.ne_loss_pct is not None
        and (layer.saving_s > 0 or not require_gain)
        and layer.ne_loss_pct <= budget_pct
    ]
    if method == "greedy":
        chosen, spent = [], 0.0
        for layer in sorted(pool, key=lambda l_: (-_value(l_), l_.node)):
            assert layer.ne_loss_pct is not None
            if spent + layer.ne_loss_pct <= budget_pct:
                chosen.append(layer.node)
                spent += layer.ne_loss_pct
        return chosen
    if method != "knapsack":
        raise ConfigError(f"selection {method!r} is not one of {SELECTIONS}")
    if budget_pct == 0 or math.isinf(budget_pct):
        return [layer.node for layer in pool]  # every layer in the pool fits
    unit = budget_pct / _KNAPSACK_STEPS
    weights = [math.ceil((layer.ne_loss_pct or 0.0) / unit - 1e-9) for layer in pool]
    best: list[tuple[float, tuple[int, ...]]] = [(0.0, ())] * (_KNAPSACK_STEPS + 1)
    for i, (layer, w) in enumerate(zip(pool, weights, strict=True)):
        for cap in range(_KNAPSACK_STEPS, w - 1, -1):
            value = best[cap - w][0] + max(layer.saving_s, 1e-15)  # gainless layers count when allowed
            if value > best[cap][0]:
                best[cap] = (value, (*best[cap - w][1], i))
    return [pool[i].node for i in max(best, key=operator.itemgetter(0))[1]]


def _value(layer: LayerSensitivity) -> float:
    """Saving per unit of NE cost (a free layer is worth the most)."""
    return max(layer.saving_s, 1e-15) / max(layer.ne_loss_pct or 0.0, 1e-12)


# ---- the pass -----------------------------------------------------------------------------


@register_pass
class SelectiveFp8(Pass[SelectiveFp8Config]):
    """Linears and embedding tables to FP8/INT8 where a quality budget allows and the target gains."""

    name = "selective_fp8"
    config_class = SelectiveFp8Config
    tolerance = FP8_TOLERANCE
    enabled_by_default = False

    @classmethod
    def unavailable(cls, target: Target) -> str | None:
        if target.hardware.has_fp8:
            return None
        have = ", ".join(sorted(target.hardware.matmul_flops_per_s))
        return (
            f"target '{target.name}' ({target.hardware.name}) has no FP8 matrix units (matrix rates: {have}); "
            "compile for a target with FP8 (h100, h200, l4, mi300x ...: see 'codesign targets')"
        )

    def apply(self, program: Program, target: Target) -> PassResult:
        cfg = self.config
        layers = _find_layers(program, cfg)
        if not any(layer.eligible for layer in layers):
            reason = "no eligible Linear or embedding table" if layers else "no Linear or embedding table"
            return PassResult.skipped(
                program,
                SkipKind.NOT_APPLICABLE,
                reason,
                fix="widen 'eligible' or check the layers' shapes (multiples of 16)",
                layers=[layer.to_dict() for layer in layers],
            )
        quantized = _Quantized(program, cfg)
        calib = _Calibration(program, cfg, quantized)
        gate = analyze(program, GATE_CANDIDATES, GATE_REQUESTS)  # the gates' batch: predictions and totals
        _predict(program, gate, layers, target, cfg)
        for layer in layers:
            if layer.eligible:
                loss, sqnr = calib.measure([layer.node])
                layer.ne_loss_pct, layer.max_logit_error, layer.sqnr_db = (
                    loss.exact_pct,
                    loss.max_abs_error,
                    sqnr,
                )
        budget = cfg.quality_budget_pct if cfg.enforce_budget else math.inf
        chosen = select_layers(layers, budget, cfg.selection, cfg.require_predicted_gain)
        combined, combined_sqnr, backed_off = self._verify(chosen, layers, calib, budget)
        chosen_set = set(chosen)
        for layer in layers:
            layer.chosen = layer.node in chosen_set
            if layer.eligible and not layer.chosen and not layer.reason:
                layer.reason = _why_not(layer, cfg.quality_budget_pct, backed_off)
        before = estimate_analysis(gate, target)
        out = program
        if chosen:
            _rewrite(program, chosen, cfg, quantized)
            out = finish_rewrite(program)
        after = estimate_analysis(analyze(out, GATE_CANDIDATES, GATE_REQUESTS), target) if chosen else before
        report = Fp8Report(
            target.name,
            cfg.quality_budget_pct,
            cfg.selection,
            layers,
            combined,
            combined_sqnr,
            backed_off,
            before.latency_s,
            after.latency_s,
            before.param_bytes,
            after.param_bytes,
        )
        stats = report.to_dict()
        if not chosen:
            return PassResult.skipped(
                out,
                SkipKind.BELOW_THRESHOLD,
                f"no layer fits the NE budget of {cfg.quality_budget_pct}% with a predicted gain",
                fix="raise quality_budget_pct",
                **stats,
            )
        return PassResult(out, True, stats)

    @staticmethod
    def _verify(
        chosen: list[str], layers: Sequence[LayerSensitivity], calib: _Calibration, budget: float
    ) -> tuple[QualityLoss | None, float | None, list[str]]:
        """Measure the chosen set together; drop the least valuable layer until it fits the budget."""
        by_name = {layer.node: layer for layer in layers}
        backed_off: list[str] = []
        while chosen:
            loss, sqnr = calib.measure(chosen)
            if loss.exact_pct <= budget:
                return loss, sqnr, backed_off
            worst = min(chosen, key=lambda n: (_value(by_name[n]), n))
            chosen.remove(worst)
            backed_off.append(worst)
        return None, None, backed_off


def _why_not(layer: LayerSensitivity, budget: float, backed_off: Sequence[str]) -> str:
    if layer.node in backed_off:
        return "dropped: the combined set broke the budget"
    if layer.saving_s <= 0:
        return "no predicted gain on the target"
    if layer.ne_loss_pct is not None and layer.ne_loss_pct > budget:
        return f"NE cost {layer.ne_loss_pct:.4f}% is over the budget alone"
    return "the budget was spent on layers with more saving per NE"
