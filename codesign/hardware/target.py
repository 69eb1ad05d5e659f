"""Targets: hardware specs as data (datasheet numbers with units and sources) and the calibrated host.

Never branch on a target's name inside a pass: read the numbers here. Peak rates are *dense*
(datasheet figures "with sparsity" are halved). A target that cannot run on this machine is still
planned for by the cost model; ``Target.runs_here`` says which case applies.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.fx

from codesign.analysis import FLOPS_PER_ELEMENT
from codesign.errors import TargetError
from codesign.hardware.timing import median_latency

__all__ = [
    "CATALOGUE",
    "OP_CLASSES",
    "HardwareSpec",
    "Target",
    "calibrate_host",
    "get_target",
    "host_calibration_path",
    "op_class",
    "target_names",
]

log = logging.getLogger(__name__)

TERA = 1e12
GIGA = 1e9

# Typical achieved fractions of datasheet peaks for well-shaped kernels (GEMMs ~70-80% of tensor
# peak, streaming kernels ~80% of HBM bandwidth). The host is calibrated, so its fractions are 1.
DATASHEET_COMPUTE_EFFICIENCY = 0.75
DATASHEET_MEMORY_EFFICIENCY = 0.8


@dataclasses.dataclass(frozen=True)
class HardwareSpec:
    """One accelerator (or the host CPU). Rates in FLOP/s per dtype, bandwidths in bytes/s."""

    name: str
    vendor: str
    kind: str  # "gpu" | "tpu" | "asic" | "cpu"
    matmul_flops_per_s: Mapping[str, float]  # dtype ("fp32", "tf32", "bf16", "fp16", "fp8", "int8") -> peak
    vector_flops_per_s: float  # elementwise / non-matrix fp32 rate
    memory_bandwidth_bytes_per_s: float
    memory_bytes: float
    interconnect_bandwidth_bytes_per_s: float
    devices_per_host: int
    launch_overhead_s: float
    source: str
    view_overhead_s: float = 0.0  # views launch no kernel on accelerators; on the host each is dispatched
    # bandwidth per device to devices on *other* hosts (the scale-out NIC); None: the interconnect
    # spans hosts too (TPU ICI) or no figure is known, so the interconnect figure is used
    network_bandwidth_bytes_per_s: float | None = None
    compute_efficiency: float = DATASHEET_COMPUTE_EFFICIENCY
    memory_efficiency: float = DATASHEET_MEMORY_EFFICIENCY
    notes: str = ""
    # per op class (OP_CLASSES): fixed seconds per kernel and achieved bytes/s, fitted on this machine's
    # micro-benchmarks (the host); empty for datasheet targets, which use the two figures above
    op_overhead_s: Mapping[str, float] = dataclasses.field(default_factory=dict)
    op_bandwidth_bytes_per_s: Mapping[str, float] = dataclasses.field(default_factory=dict)
    # what one call of an exported program costs before its first op (input flattening, shape guards):
    # fixed seconds plus seconds per input tensor; measured on the host, 0 for datasheet targets
    call_overhead_s: float = 0.0
    call_overhead_per_input_s: float = 0.0

    def overhead_s(self, op_class: str) -> float:
        """Fixed time of one kernel of ``op_class`` (the generic launch overhead where not fitted)."""
        return self.op_overhead_s.get(op_class, self.launch_overhead_s)

    def bandwidth_bytes_per_s(self, op_class: str) -> float:
        """Achievable bytes/s for kernels of ``op_class`` (the efficiency-scaled memory bandwidth where not fitted)."""
        fitted = self.op_bandwidth_bytes_per_s.get(op_class)
        return fitted if fitted else self.memory_bandwidth_bytes_per_s * self.memory_efficiency

    @property
    def scale_out_bandwidth_bytes_per_s(self) -> float:
        """Per-device bandwidth to other hosts (the interconnect's where no network figure is given)."""
        if self.network_bandwidth_bytes_per_s is None:
            return self.interconnect_bandwidth_bytes_per_s
        return self.network_bandwidth_bytes_per_s

    @property
    def has_fp8(self) -> bool:
        return "fp8" in self.matmul_flops_per_s

    def matmul_rate(self, dtype: str) -> tuple[float, str]:
        """Achievable matmul FLOP/s for ``dtype`` and the dtype rate actually used (fallbacks noted)."""
        for candidate in _RATE_FALLBACK.get(dtype, (dtype, "fp32")):
            if candidate in self.matmul_flops_per_s:
                return self.matmul_flops_per_s[candidate] * self.compute_efficiency, candidate
        rate = max(self.matmul_flops_per_s.values())
        return rate * self.compute_efficiency, "best"

    def to_dict(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        d["matmul_flops_per_s"] = dict(self.matmul_flops_per_s)
        d["op_overhead_s"] = dict(self.op_overhead_s)
        d["op_bandwidth_bytes_per_s"] = dict(self.op_bandwidth_bytes_per_s)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> HardwareSpec:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise TargetError(f"hardware spec has unknown fields {sorted(unknown)}")
        values: dict[str, Any] = dict(data)  # values from JSON; their names were checked above
        return cls(**values)


_RATE_FALLBACK = {
    "fp32": ("fp32",),
    "bf16": ("bf16", "fp16", "fp32"),
    "fp16": ("fp16", "bf16", "fp32"),
    "fp8": ("fp8", "bf16", "fp16", "fp32"),
    "int8": ("int8", "bf16", "fp32"),
}

_TORCH_DTYPE_RATE = {
    "float32": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "float8_e4m3fn": "fp8",
    "float8_e5m2": "fp8",
    "int8": "int8",
}


def rate_dtype(torch_dtype: str) -> str:
    """Map a torch dtype name to the rate class of the catalogue (``fp32`` for anything else)."""
    return _TORCH_DTYPE_RATE.get(torch_dtype, "fp32")


def _gpu(
    name: str,
    vendor: str,
    rates: Mapping[str, float],
    vector: float,
    bw: float,
    mem: float,
    link: float,
    source: str,
    notes: str = "",
    per_host: int = 8,
    network: float | None = None,
) -> HardwareSpec:
    return HardwareSpec(
        name=name,
        vendor=vendor,
        kind="gpu",
        matmul_flops_per_s=rates,
        vector_flops_per_s=vector,
        memory_bandwidth_bytes_per_s=bw,
        memory_bytes=mem,
        interconnect_bandwidth_bytes_per_s=link,
        devices_per_host=per_host,
        launch_overhead_s=4e-6,
        source=source,
        notes=notes,
        network_bandwidth_bytes_per_s=network,
    )


_HOPPER = {
    "fp32": 67 * TERA,
    "tf32": 494.7 * TERA,
    "bf16": 989.4 * TERA,
    "fp16": 989.4 * TERA,
    "fp8": 1978.9 * TERA,
    "int8": 1978.9 * TERA,
}

CATALOGUE: dict[str, HardwareSpec] = {
    "h100": _gpu(
        "h100",
        "NVIDIA",
        _HOPPER,
        67 * TERA,
        3.35e12,
        80 * GIGA,
        900 * GIGA,
        "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM5 column (sparsity figures halved); "
        "DGX H100 user guide (one 400 Gb/s ConnectX-7 port per GPU)",
        "NVLink 4: 900 GB/s per GPU within a host; 50 GB/s per GPU between hosts",
        network=50 * GIGA,
    ),
    "h200": _gpu(
        "h200",
        "NVIDIA",
        _HOPPER,
        67 * TERA,
        4.8e12,
        141 * GIGA,
        900 * GIGA,
        "NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column (sparsity figures halved)",
        "same compute as H100 SXM; 141 GB HBM3e; 400 Gb/s per GPU between hosts (as DGX H100)",
        network=50 * GIGA,
    ),
    "a100": _gpu(
        "a100",
        "NVIDIA",
        {"fp32": 19.5 * TERA, "tf32": 156 * TERA, "bf16": 312 * TERA, "fp16": 312 * TERA, "int8": 624 * TERA},
        19.5 * TERA,
        2.039e12,
        80 * GIGA,
        600 * GIGA,
        "NVIDIA A100 Tensor Core GPU datasheet, A100 80GB SXM column; DGX A100 user guide "
        "(one 200 Gb/s HDR port per GPU)",
        "no FP8 tensor cores; 25 GB/s per GPU between hosts",
        network=25 * GIGA,
    ),
    "a100-40gb": _gpu(
        "a100-40gb",
        "NVIDIA",
        {"fp32": 19.5 * TERA, "tf32": 156 * TERA, "bf16": 312 * TERA, "fp16": 312 * TERA, "int8": 624 * TERA},
        19.5 * TERA,
        1.555e12,
        40 * GIGA,
        600 * GIGA,
        "NVIDIA A100 Tensor Core GPU datasheet, A100 40GB SXM; DGX A100 user guide "
        "(one 200 Gb/s HDR port per GPU)",
        "no FP8 tensor cores; 25 GB/s per GPU between hosts",
        network=25 * GIGA,
    ),
    "l4": _gpu(
        "l4",
        "NVIDIA",
        {
            "fp32": 30.3 * TERA,
            "tf32": 60 * TERA,
            "bf16": 121 * TERA,
            "fp16": 121 * TERA,
            "fp8": 242.5 * TERA,
            "int8": 242.5 * TERA,
        },
        30.3 * TERA,
        300 * GIGA,
        24 * GIGA,
        64 * GIGA,
        "NVIDIA L4 Tensor Core GPU datasheet (sparsity figures halved)",
        "PCIe Gen4 x16 (64 GB/s) between devices; 100 Gb/s Ethernet per GPU between hosts (assumed)",
        network=12.5 * GIGA,
    ),
    "mi300x": _gpu(
        "mi300x",
        "AMD",
        {
            "fp32": 163.4 * TERA,
            "tf32": 653.7 * TERA,
            "bf16": 1307.4 * TERA,
            "fp16": 1307.4 * TERA,
            "fp8": 2614.9 * TERA,
            "int8": 2614.9 * TERA,
        },
        163.4 * TERA,
        5.3e12,
        192 * GIGA,
        896 * GIGA,
        "AMD Instinct MI300X accelerator data sheet (dense figures)",
        "Infinity Fabric: 7 links x 128 GB/s; 400 Gb/s NIC per GPU between hosts (assumed)",
        network=50 * GIGA,
    ),
    "tpu-v5e": HardwareSpec(
        name="tpu-v5e",
        vendor="Google",
        kind="tpu",
        matmul_flops_per_s={"bf16": 197 * TERA, "fp32": 197 * TERA, "int8": 393 * TERA},
        vector_flops_per_s=197 * TERA / 16,
        memory_bandwidth_bytes_per_s=819 * GIGA,
        memory_bytes=16 * GIGA,
        interconnect_bandwidth_bytes_per_s=400 * GIGA,
        devices_per_host=8,
        launch_overhead_s=1e-6,
        source="Google Cloud TPU v5e documentation (system architecture table)",
        notes="fp32 matmuls run as bf16 passes (XLA default precision); no FP8; vector rate estimated",
    ),
    "tpu-v5p": HardwareSpec(
        name="tpu-v5p",
        vendor="Google",
        kind="tpu",
        matmul_flops_per_s={"bf16": 459 * TERA, "fp32": 459 * TERA, "int8": 918 * TERA},
        vector_flops_per_s=459 * TERA / 16,
        memory_bandwidth_bytes_per_s=2765 * GIGA,
        memory_bytes=95 * GIGA,
        interconnect_bandwidth_bytes_per_s=1200 * GIGA,
        devices_per_host=4,
        launch_overhead_s=1e-6,
        source="Google Cloud TPU v5p documentation (system architecture table)",
        notes="docs list FP8 at the bf16 rate (no gain), so FP8 is treated as absent; vector rate estimated",
    ),
    "tpu-v6e": HardwareSpec(
        name="tpu-v6e",
        vendor="Google",
        kind="tpu",
        matmul_flops_per_s={"bf16": 918 * TERA, "fp32": 918 * TERA, "int8": 1836 * TERA},
        vector_flops_per_s=918 * TERA / 16,
        memory_bandwidth_bytes_per_s=1638 * GIGA,
        memory_bytes=32 * GIGA,
        interconnect_bandwidth_bytes_per_s=800 * GIGA,
        devices_per_host=8,
        launch_overhead_s=1e-6,
        source="Google Cloud TPU v6e (Trillium) documentation (system architecture table)",
        notes="no FP8 listed; vector rate estimated",
    ),
    "mtia-v2": HardwareSpec(
        name="mtia-v2",
        vendor="Meta",
        kind="asic",
        matmul_flops_per_s={"int8": 354 * TERA, "bf16": 177 * TERA, "fp16": 177 * TERA, "fp32": 2.76 * TERA},
        vector_flops_per_s=2.76 * TERA,
        memory_bandwidth_bytes_per_s=204.8 * GIGA,
        memory_bytes=128 * GIGA,
        interconnect_bandwidth_bytes_per_s=32 * GIGA,
        devices_per_host=24,
        launch_overhead_s=5e-6,
        source="Meta, 'Our next generation Meta Training and Inference Accelerator' (2024-04-10): dense GEMM "
        "354 TOPS INT8 / 177 TFLOPS FP16-BF16, SIMD FP32 2.76 TFLOPS, 128 GB LPDDR5 at 204.8 GB/s",
        notes="fp32 rate is the SIMD rate (no fp32 GEMM listed); 256 MB on-chip SRAM at 2.7 TB/s not modeled; "
        "no FP8; 2 chips per board, 12 boards per host over PCIe Gen5 x8",
    ),
}


@dataclasses.dataclass(frozen=True)
class Target:
    """A hardware spec and a device count: what the cost model and passes plan for."""

    hardware: HardwareSpec
    devices: int = 1

    @property
    def name(self) -> str:
        return self.hardware.name

    @property
    def runs_here(self) -> bool:
        """True when programs for this target can run (and be measured) on this machine."""
        if self.hardware.kind == "cpu":
            return True
        if self.hardware.kind == "gpu" and torch.cuda.is_available():
            return self.hardware.name in torch.cuda.get_device_name().lower().replace(" ", "")
        return False

    @property
    def is_this_machine(self) -> bool:
        """True when the target *is* this machine (the calibrated host, or the GPU installed here), so a
        program timed here is timed on the target; a CPU spec of some other machine runs here but is not."""
        if self.hardware.kind == "cpu":
            return self.hardware.name == "host"
        return self.runs_here

    def to_dict(self) -> dict[str, object]:
        return {"hardware": self.hardware.to_dict(), "devices": self.devices}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Target:
        hw = data.get("hardware")
        if not isinstance(hw, Mapping):
            raise TargetError(f"target record has no hardware spec: {data!r}")
        devices = data.get("devices", 1)
        if not isinstance(devices, int) or isinstance(devices, bool):
            raise TargetError(f"target record has a non-integer device count: {devices!r}")
        return cls(HardwareSpec.from_dict(hw), devices)


def target_names() -> list[str]:
    return ["host", *sorted(CATALOGUE)]


def get_target(name: str | Target, devices: int = 1) -> Target:
    """A catalogue target by name (``h100``, ``tpu-v5e`` ...), or ``host`` (calibrated on first use)."""
    if isinstance(name, Target):
        return name
    key = name.lower().strip()
    if devices < 1:
        raise TargetError(f"devices must be >= 1, got {devices}")
    if key in ("host", "cpu"):
        return Target(calibrate_host(), devices)
    if key not in CATALOGUE:
        raise TargetError(f"unknown target {name!r}", fix=f"choose one of {target_names()}")
    return Target(CATALOGUE[key], devices)


# ---- host calibration -------------------------------------------------------------------------


def _cache_dir() -> Path:
    return Path(os.environ.get("CODESIGN_CACHE_DIR", Path.home() / ".cache" / "codesign"))


def _host_key() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    raw = f"{cpu}|{os.cpu_count()}|{torch.get_num_threads()}|{torch.__version__}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


_RANKING_GEMMS = ((1024, 256, 256), (4096, 64, 128), (256, 512, 512), (2048, 128, 512), (512, 1024, 256))

# Op classes the host calibration fits one fixed cost and one achieved bandwidth for (the analysis'
# op names map to them in ``op_class``): dispatch and kernel set-up differ by an order of magnitude
# between a tiny elementwise add and an addmm or an embedding_bag, so one per-op figure underestimates
# every program made of small ops.
OP_CLASSES = ("gemm", "lookup", "movement", "norm", "vector")
_LOOKUP_OPS = ("embedding", "_embedding_bag", "grouped_embedding_bag", "quantized_embedding")
_MOVEMENT_OPS = (
    "cat", "stack", "index_select", "index.", "gather", "clone", "_to_copy", "copy", "repeat", "bucketize",
    "constant_pad_nd", "where", "scatter", "masked_fill", "arange", "full", "zeros", "ones", "new_",
)  # fmt: skip
_NORM_OPS = ("softmax", "_softmax", "log_softmax", "layer_norm", "native_layer_norm", "batch_norm", "sum", "mean",
             "amax", "amin", "max", "min", "var", "std", "norm", "cumsum", "logsumexp")  # fmt: skip


def op_class(op: str, engine: str) -> str:
    """The calibration class of an analysed op (``NodeCost.op``, e.g. ``addmm.default``) and its engine."""
    if engine in ("matmul", "fp8"):
        return "gemm"
    name = op.removeprefix("codesign.")
    if name.startswith(_LOOKUP_OPS):
        return "lookup"
    if name.startswith(_MOVEMENT_OPS):
        return "movement"
    if name.startswith(_NORM_OPS):
        return "norm"
    return "vector"


def _best_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _gemm_rate(m: int, k: int, n: int, dtype: torch.dtype) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    torch.mm(a, b)
    return 2 * m * k * n / _best_time(lambda: torch.mm(a, b), 5)


def _per_node_time(op: Any, args: Any, x: torch.Tensor) -> list[float]:
    """Seconds per node of an FX graph chaining 100 calls of ``op``: dispatch as programs pay it."""
    graph = torch.fx.Graph()
    node = graph.placeholder("x")
    for _ in range(100):
        node = graph.call_function(op, args(node))
    graph.output(node)
    chain = torch.fx.GraphModule(torch.nn.Module(), graph)
    chain(x)
    return [_best_time(lambda: chain(x), 3) / 100 for _ in range(5)]


def _node_seconds(
    op: Any,
    inputs: tuple[torch.Tensor, ...],
    args: Callable[..., tuple[Any, ...]] | None = None,
    copies: int = 20,
) -> float:
    """Median seconds per node of an FX graph making ``copies`` independent calls of ``op`` on ``inputs``
    (``args`` arranges the placeholders into the op's arguments): one graph node as a program runs it
    (dispatch, allocation, the kernel)."""
    graph = torch.fx.Graph()
    nodes = [graph.placeholder(f"x{i}") for i in range(len(inputs))]
    call = args(*nodes) if args is not None else tuple(nodes)
    graph.output([graph.call_function(op, call) for _ in range(copies)])
    module = torch.fx.GraphModule(torch.nn.Module(), graph)
    return median_latency(lambda: module(*inputs), 7) / copies


def _bandwidth(fixed: float, seconds: float, nbytes: float) -> float:
    """Bytes/s of a large call that took ``seconds``, of which ``fixed`` is the op's fixed cost."""
    return nbytes / max(seconds - fixed, 1e-9)


def _measure_op_classes(gemm_rate: float = 0.0) -> dict[str, float]:
    """Fixed cost and achieved bandwidth per op class. The fixed cost is the median over the ops of
    that class as exported graphs hold them (``linear``, not ``addmm``; composite views such as
    ``reshape``), each called on tiny inputs; the bandwidth comes from one serving-sized call of a
    representative op. The GEMM rate comes from the ranking GEMMs, not from here."""
    aten = torch.ops.aten
    out: dict[str, float] = {}
    small, big = torch.randn(2, 8), torch.randn(4096, 128)
    big_bytes = big.numel() * big.element_size()
    w, b = torch.randn(8, 8), torch.randn(8)
    ids, offs, table = torch.tensor([1, 2]), torch.tensor([0, 1]), torch.randn(1000, 8)
    # op as exported graphs hold it -> (its class, seconds per node on tiny inputs, chained)
    chained: dict[str, tuple[str, float]] = {
        "add": ("vector", _node_seconds(aten.add.Tensor, (small, small))),
        "mul": ("vector", _node_seconds(aten.mul.Tensor, (small, small))),
        "relu": ("vector", _node_seconds(aten.relu.default, (small,))),
        "sigmoid": ("vector", _node_seconds(aten.sigmoid.default, (small,))),
        "index_select": (
            "movement",
            _node_seconds(aten.index_select.default, (small, torch.arange(2)), lambda x, i: (x, 0, i)),
        ),
        "cat": ("movement", _node_seconds(aten.cat.default, (small, small), lambda x, y: ([x, y], 1))),
        "softmax": ("norm", _node_seconds(aten._softmax.default, (small,), lambda x: (x, -1, False))),
        "layer_norm": (
            "norm",
            _node_seconds(aten.layer_norm.default, (small, b, b), lambda x, g, h: (x, [8], g, h)),
        ),
        "embedding": ("lookup", _node_seconds(aten.embedding.default, (table, ids))),
        "embedding_bag": (
            "lookup",
            _node_seconds(
                aten.embedding_bag.padding_idx,
                (table, ids, offs),
                lambda t, i, o: (t, i, o, False, 0, False, None, False, None),
            ),
        ),
        "linear": ("gemm", _node_seconds(aten.linear.default, (small, w, b))),
    }
    fixed = {kind: [t for k, t in chained.values() if k == kind] for kind in OP_CLASSES}
    if gemm_rate > 0:  # a small GEMM's cost beyond its FLOPs at the median rate (threading set-up, packing)
        x, w2, b2 = torch.randn(64, 128), torch.randn(64, 128), torch.randn(64)
        t = _node_seconds(aten.linear.default, (x, w2, b2))
        fixed["gemm"].append(max(t - 2 * 64 * 128 * 64 / gemm_rate, chained["linear"][1]))
    for kind, times in fixed.items():
        out[f"{kind}_fixed"] = statistics.median(times)  # a GEMM: the mean of the tiny and the small one
    # the same ops interleaved, as a program runs them, cost more than chained with themselves
    out["program_factor"] = _program_factor({op: t for op, (_, t) in chained.items()})
    # achieved bandwidth of one large call per class (bytes as the analysis counts them)
    t1 = _node_seconds(aten.add.Tensor, (big, big), copies=8)
    out["vector_bw"] = _bandwidth(out["vector_fixed"], t1, 3 * big_bytes)
    perm = torch.randperm(big.shape[0])
    t1 = _node_seconds(aten.index_select.default, (big, perm), lambda x, i: (x, 0, i), copies=8)
    out["movement_bw"] = _bandwidth(out["movement_fixed"], t1, 2 * big_bytes + perm.numel() * 8)
    t1 = _node_seconds(aten._softmax.default, (big,), lambda x: (x, -1, False), copies=8)
    out["norm_bw"] = _bandwidth(out["norm_fixed"], t1, 2 * big_bytes)
    table, bags, hot = torch.randn(100_000, 64), 4096, 8
    ids, offsets = torch.randint(0, table.shape[0], (bags * hot,)), torch.arange(0, bags * hot, hot)
    t1 = _node_seconds(aten.embedding_bag.default, (table, ids, offsets), copies=8)
    looked_up = ids.numel() * (table.shape[1] * 4 + 8) + bags * table.shape[1] * 4
    out["lookup_bw"] = _bandwidth(out["lookup_fixed"], t1, looked_up)
    return out


def _program_factor(chained: Mapping[str, float]) -> float:
    """How much more an op's fixed cost is inside a program than in a chain of identical calls.

    A chain of one op keeps the dispatcher's and allocator's paths hot; a program interleaves
    different ops and pays colder paths on each (1.4-1.6x on the 2-core host). Measured on a graph that
    cycles through the calibrated ops on tiny inputs, against the sum of their chained figures.
    """
    aten = torch.ops.aten
    graph = torch.fx.Graph()
    x, w, b, ids, table = (graph.placeholder(n) for n in ("x", "w", "b", "ids", "table"))
    rounds, h = 20, x
    for _ in range(rounds):
        h = graph.call_function(aten.linear.default, (h, w, b))
        h = graph.call_function(aten.relu.default, (h,))
        pooled = graph.call_function(aten.embedding.default, (table, ids))
        h = graph.call_function(aten.cat.default, ([h, pooled], 0))
        h = graph.call_function(aten.index_select.default, (h, 0, ids))
        h = graph.call_function(aten._softmax.default, (h, -1, False))
        h = graph.call_function(aten.layer_norm.default, (h, [8], b, b))
        h = graph.call_function(aten.mul.Tensor, (h, h))
        h = graph.call_function(aten.sigmoid.default, (h,))
        h = graph.call_function(aten.add.Tensor, (h, h))
    graph.output(h)
    module = torch.fx.GraphModule(torch.nn.Module(), graph)
    args = (torch.randn(2, 8), torch.randn(8, 8), torch.randn(8), torch.tensor([0, 1]), torch.randn(10, 8))
    per_round = median_latency(lambda: module(*args), 21) / rounds
    ops = (
        "linear",
        "relu",
        "embedding",
        "cat",
        "index_select",
        "softmax",
        "layer_norm",
        "mul",
        "sigmoid",
        "add",
    )
    return max(1.0, per_round / sum(chained[op] for op in ops))  # against the same ops' chained figures


def _measure_call_overhead() -> dict[str, float]:
    """Seconds one call of an exported program pays before and after its ops, as fixed + per input:
    two exported one-op programs (1 and 16 inputs) timed against their op alone."""
    from torch.export import Dim, export

    class Sum(torch.nn.Module):
        def forward(self, *xs: torch.Tensor) -> torch.Tensor:
            return torch.stack(xs).sum(0) if len(xs) > 1 else xs[0] + 1

    times = {}
    for count in (1, 16):
        xs = tuple(torch.randn(4, 2) for _ in range(count))
        rows = Dim("rows", min=1, max=1 << 20)
        ep = export(Sum(), xs, dynamic_shapes=(tuple({0: rows} for _ in xs),))
        module, eager = ep.module(), Sum()
        with torch.no_grad():
            whole = median_latency(functools.partial(module, *xs), 51)
            ops = median_latency(functools.partial(eager, *xs), 51)
        times[count] = max(whole - ops, 0.0)
    per_input = max(times[16] - times[1], 0.0) / 15
    return {"call_fixed": max(times[1] - per_input, 0.0), "call_per_input": per_input}


def _measure_op_classes_median(gemm_rate: float, rounds: int = 3) -> dict[str, float]:
    """Each op-class figure as the median of ``rounds`` calibrations (single runs of the large calls
    differ by up to 3x on shared hosts)."""
    runs = [_measure_op_classes(gemm_rate) for _ in range(rounds)]
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def _measure_host() -> dict[str, float]:
    with torch.no_grad():
        # median achieved rate over GEMM shapes typical of ranking towers (tall-skinny, narrow N)
        fp32 = statistics.median(_gemm_rate(m, k, n, torch.float32) for m, k, n in _RANKING_GEMMS)
        bf16 = statistics.median(_gemm_rate(m, k, n, torch.bfloat16) for m, k, n in _RANKING_GEMMS)
        src = torch.randn(16 * 1024 * 1024 // 4 * 4)  # 64 MiB
        dst = torch.empty_like(src)
        dst.copy_(src)
        bw = 2 * src.numel() * 4 / _best_time(lambda: dst.copy_(src), 10)
        # per-op cost as programs pay it: one FX graph node dispatching a tiny aten op
        x = torch.randn(2, 2)
        per_op = _per_node_time(torch.ops.aten.add.Tensor, lambda n: (n, n), x)
        # views as exported graphs hold them: most are composite (reshape, flatten, transpose ...)
        per_view = [
            statistics.median(_per_node_time(op, args, x))
            for op, args in (
                (torch.ops.aten.view.default, lambda n: (n, [2, 2])),
                (torch.ops.aten.reshape.default, lambda n: (n, [2, 2])),
                (torch.ops.aten.transpose.int, lambda n: (n, 0, 1)),
                (torch.ops.aten.slice.Tensor, lambda n: (n, 0, 0, 2)),
            )
        ]
        # cache-resident elementwise work, counted in the analysis' FLOPs-per-element units
        vec = torch.randn(64 * 1024)
        sigmoid_flops = FLOPS_PER_ELEMENT[torch.ops.aten.sigmoid.default]
        vector = sigmoid_flops * vec.numel() / _best_time(lambda: torch.sigmoid(vec), 20)
        classes = _measure_op_classes_median(fp32)
        calls = _measure_call_overhead()
    return {
        "fp32": fp32,
        "bf16": bf16,
        "bandwidth": bw,
        "launch": statistics.median(per_op),
        "vector": vector,
        "view": statistics.median(per_view),
        **classes,
        **calls,
    }


_CALIBRATION_KEYS = frozenset(
    {"fp32", "bf16", "bandwidth", "launch", "vector", "view"}
    | {f"{c}_fixed" for c in OP_CLASSES}
    | {f"{c}_bw" for c in OP_CLASSES if c != "gemm"}
    | {"call_fixed", "call_per_input", "program_factor"}
)


def host_calibration_path() -> Path:
    """Where this machine's calibration is cached: one file per CPU model, core and thread count, torch."""
    return _cache_dir() / f"host-{_host_key()}.json"


def calibrate_host(force: bool = False) -> HardwareSpec:
    """The host CPU as a HardwareSpec, from a ~1 s micro-benchmark (cached per CPU/threads/torch)."""
    path = host_calibration_path()
    data: dict[str, float] | None = None
    if not force and path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            data = None
    if data is None or not data.keys() >= _CALIBRATION_KEYS:
        data = _measure_host()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data))
        except OSError as exc:  # a read-only home must not stop compilation
            log.warning("could not cache host calibration at %s: %s", path, exc)
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 16 * GIGA
    return HardwareSpec(
        name="host",
        vendor=platform.machine(),
        kind="cpu",
        matmul_flops_per_s={"fp32": data["fp32"], "bf16": data["bf16"]},
        vector_flops_per_s=data["vector"],
        memory_bandwidth_bytes_per_s=data["bandwidth"],
        memory_bytes=float(mem),
        interconnect_bandwidth_bytes_per_s=data["bandwidth"],
        devices_per_host=1,
        launch_overhead_s=data["launch"],
        view_overhead_s=data["view"] * data["program_factor"],
        compute_efficiency=1.0,
        memory_efficiency=1.0,
        op_overhead_s={c: data[f"{c}_fixed"] * data["program_factor"] for c in OP_CLASSES},
        op_bandwidth_bytes_per_s={c: data[f"{c}_bw"] for c in OP_CLASSES if f"{c}_bw" in data},
        call_overhead_s=data["call_fixed"],
        call_overhead_per_input_s=data["call_per_input"],
        source=f"measured on this host ({torch.get_num_threads()} threads, torch {torch.__version__})",
        notes="median GEMM rate over ranking-shaped GEMMs, 64 MiB copy bandwidth, per-node dispatch time of an FX graph of tiny adds",
    )
