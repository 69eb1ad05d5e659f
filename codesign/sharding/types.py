"""Plain data of embedding sharding: tables, the device topology, the workload, shards and plans.

Everything here is a frozen dataclass that round-trips through JSON, so a plan can be saved,
diffed, shipped in a bundle and read back by the distributed runtime without running the planner.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from codesign.errors import ShardingError
from codesign.hardware.target import HardwareSpec, Target
from codesign.ops.quantized_embedding import table_bytes

__all__ = [
    "PLAN_SCHEMA",
    "POOLING_MODES",
    "SHARDING_TYPES",
    "TABLE_FORMATS",
    "Plan",
    "PlanWorkload",
    "Shard",
    "TableSpec",
    "Topology",
]

# table_wise: the whole table on one device; row_wise: row blocks on distinct devices (partial
# sums reduced by the all-to-all); column_wise: column blocks on distinct devices (concatenated);
# table_row_wise: row blocks on the devices of one host (reduced over the fast intra-host links);
# data_parallel: a full replica on every device, looked up locally (no communication).
SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel")
# sum / mean / max: EmbeddingBag pooling; none: a plain Embedding (one output row per id)
POOLING_MODES = ("sum", "mean", "max", "none")
TABLE_FORMATS = ("fp32", "bf16", "fp16", "fp8", "int8")
PLAN_SCHEMA = 1

# Bytes per value of the pooled embeddings sent back: 16-bit tables pool in 16 bits; quantized
# tables dequantize to fp32 rows.
_OUTPUT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 4, "int8": 4}


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """One embedding table and how often it is read.

    ``ids_per_sample`` is the average number of ids looked up per scored candidate (the multi-hot
    size); ``bags_per_sample`` the pooled rows it produces per candidate (1 for a per-candidate bag,
    1/candidates for a request-level bag looked up once per request, the id count for a plain
    Embedding). ``storage`` is how the rows are stored (FP8/INT8 rows carry an fp32 scale each).
    """

    name: str
    rows: int
    dim: int
    ids_per_sample: float = 1.0
    bags_per_sample: float = 1.0
    pooling: str = "sum"
    storage: str = "fp32"

    def __post_init__(self) -> None:
        where = f"table {self.name!r}"
        if self.rows < 1 or self.dim < 1:
            raise ShardingError(f"{where} has {self.rows} rows x {self.dim} columns; both must be >= 1")
        if self.ids_per_sample < 0 or self.bags_per_sample < 0:
            raise ShardingError(f"{where}: ids_per_sample and bags_per_sample must be >= 0")
        if self.pooling not in POOLING_MODES:
            raise ShardingError(f"{where}: pooling {self.pooling!r} is not one of {POOLING_MODES}")
        if self.storage not in TABLE_FORMATS:
            raise ShardingError(f"{where}: storage {self.storage!r} is not one of {TABLE_FORMATS}")

    @property
    def params(self) -> int:
        return self.rows * self.dim

    @property
    def bytes(self) -> int:
        return table_bytes(self.rows, self.dim, self.storage)

    def block_bytes(self, rows: int, cols: int) -> int:
        return table_bytes(rows, cols, self.storage)

    @property
    def output_bytes(self) -> int:
        """Bytes per value of a pooled output row."""
        return _OUTPUT_BYTES[self.storage]

    def with_storage(self, storage: str) -> TableSpec:
        return dataclasses.replace(self, storage=storage)


@dataclasses.dataclass(frozen=True)
class PlanWorkload:
    """What one step of the sharded model processes: ``batch_per_device`` candidates on each device.

    The dense part is data-parallel: ``dense_s`` (seconds per device per step, from the cost
    model) adds the same work to every device. Ids travel as ``index_bytes``-wide integers.
    """

    batch_per_device: int = 8192
    dense_s: float = 0.0
    index_bytes: int = 8

    def __post_init__(self) -> None:
        if self.batch_per_device < 1:
            raise ShardingError(f"batch_per_device must be >= 1, got {self.batch_per_device}")
        if self.dense_s < 0 or self.index_bytes < 1:
            raise ShardingError("dense_s must be >= 0 and index_bytes >= 1")


@dataclasses.dataclass(frozen=True)
class Topology:
    """The devices a plan places tables on: one HardwareSpec and one host index per device.

    Devices of one host talk over the interconnect (NVLink); devices on different hosts over the
    scale-out network. Mixed hardware is allowed (``from_groups``).
    """

    devices: tuple[HardwareSpec, ...]
    hosts: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.devices:
            raise ShardingError(
                "the topology has zero devices", fix="plan for at least one device (--devices 1 or more)"
            )
        if len(self.hosts) != len(self.devices):
            raise ShardingError(f"{len(self.devices)} devices but {len(self.hosts)} host indices")

    @classmethod
    def uniform(cls, hardware: HardwareSpec, count: int) -> Topology:
        """``count`` devices of one kind, filling hosts of ``hardware.devices_per_host``."""
        if count < 1:
            raise ShardingError(
                f"cannot plan for {count} devices", fix="plan for at least one device (--devices 1 or more)"
            )
        per_host = max(1, hardware.devices_per_host)
        return cls(tuple([hardware] * count), tuple(i // per_host for i in range(count)))

    @classmethod
    def from_target(cls, target: Target) -> Topology:
        return cls.uniform(target.hardware, target.devices)

    @classmethod
    def from_groups(cls, groups: Sequence[tuple[HardwareSpec, int]]) -> Topology:
        """Heterogeneous: each (hardware, count) group fills hosts of its own."""
        devices: list[HardwareSpec] = []
        hosts: list[int] = []
        next_host = 0
        for hardware, count in groups:
            if count < 1:
                raise ShardingError(f"group {hardware.name!r} has {count} devices; each group needs >= 1")
            per_host = max(1, hardware.devices_per_host)
            for i in range(count):
                devices.append(hardware)
                hosts.append(next_host + i // per_host)
            next_host += -(-count // per_host)
        return cls(tuple(devices), tuple(hosts))

    @property
    def size(self) -> int:
        return len(self.devices)

    def host_devices(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for d, h in enumerate(self.hosts):
            out.setdefault(h, []).append(d)
        return out

    def describe(self) -> str:
        counts: dict[str, int] = {}
        for hw in self.devices:
            counts[hw.name] = counts.get(hw.name, 0) + 1
        kinds = " + ".join(f"{n} x {name}" for name, n in counts.items())
        return f"{kinds} on {len(set(self.hosts))} host(s)"

    def to_dict(self) -> dict[str, Any]:
        groups: list[dict[str, Any]] = []
        for hw, host in zip(self.devices, self.hosts, strict=True):
            if groups and groups[-1]["hardware"]["name"] == hw.name and groups[-1]["hosts"][-1] <= host:
                groups[-1]["hosts"].append(host)
            else:
                groups.append({"hardware": hw.to_dict(), "hosts": [host]})
        return {"groups": groups}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Topology:
        devices: list[HardwareSpec] = []
        hosts: list[int] = []
        for group in data.get("groups", ()):
            hw = HardwareSpec.from_dict(group["hardware"])
            devices += [hw] * len(group["hosts"])
            hosts += [int(h) for h in group["hosts"]]
        return cls(tuple(devices), tuple(hosts))


@dataclasses.dataclass(frozen=True)
class Shard:
    """One piece of one table on one device: rows ``[row_start, row_end)`` x columns ``[col_start, col_end)``."""

    table: str
    kind: str
    index: int
    device: int
    row_start: int
    row_end: int
    col_start: int
    col_end: int
    bytes: int
    cost_s: float


@dataclasses.dataclass(frozen=True)
class Plan:
    """Where every table lives, what each device costs per step, and how far that is from the bound.

    ``lower_bound_s`` is a bound no placement can beat (see ``codesign.sharding.planner``);
    ``max_cost_s / lower_bound_s`` says how close the plan is to optimal.
    """

    tables: tuple[TableSpec, ...]
    topology: Topology
    workload: PlanWorkload
    shards: tuple[Shard, ...]
    device_cost_s: tuple[float, ...]
    device_lookup_s: tuple[float, ...]
    device_comm_s: tuple[float, ...]
    device_bytes: tuple[int, ...]
    device_capacity_bytes: tuple[int, ...]
    lower_bound_s: float
    simple_lower_bound_s: float
    memory_margin: float
    planning_s: float = 0.0
    notes: tuple[str, ...] = ()

    @property
    def max_cost_s(self) -> float:
        return max(self.device_cost_s)

    @property
    def gap(self) -> float:
        """Max device cost over the lower bound (1.0 is optimal)."""
        return self.max_cost_s / self.lower_bound_s if self.lower_bound_s > 0 else 1.0

    @property
    def kinds(self) -> dict[str, str]:
        """Table name -> sharding type."""
        return {s.table: s.kind for s in self.shards}

    def shards_of(self, table: str) -> list[Shard]:
        return sorted((s for s in self.shards if s.table == table), key=lambda s: s.index)

    def table(self, name: str) -> TableSpec:
        for t in self.tables:
            if t.name == name:
                return t
        raise ShardingError(f"the plan has no table {name!r}", fix=f"tables: {[t.name for t in self.tables]}")

    @property
    def total_params(self) -> int:
        return sum(t.params for t in self.tables)

    def per_device(self) -> list[dict[str, Any]]:
        """One row per device: tables held, bytes, capacity, lookup / comm / total seconds."""
        held: dict[int, list[Shard]] = {d: [] for d in range(self.topology.size)}
        for s in self.shards:
            held[s.device].append(s)
        rows = []
        for d in range(self.topology.size):
            kinds: dict[str, int] = {}
            for s in held[d]:
                kinds[s.kind] = kinds.get(s.kind, 0) + 1
            rows.append(
                {
                    "device": d,
                    "host": self.topology.hosts[d],
                    "hardware": self.topology.devices[d].name,
                    "shards": len(held[d]),
                    "by_kind": kinds,
                    "bytes": self.device_bytes[d],
                    "capacity_bytes": self.device_capacity_bytes[d],
                    "lookup_s": self.device_lookup_s[d],
                    "comm_s": self.device_comm_s[d],
                    "cost_s": self.device_cost_s[d],
                }
            )
        return rows

    def summary(self) -> dict[str, Any]:
        kinds: dict[str, int] = {}
        for kind in self.kinds.values():
            kinds[kind] = kinds.get(kind, 0) + 1
        return {
            "tables": len(self.tables),
            "params": self.total_params,
            "devices": self.topology.size,
            "topology": self.topology.describe(),
            "kinds": kinds,
            "max_cost_s": self.max_cost_s,
            "lower_bound_s": self.lower_bound_s,
            "simple_lower_bound_s": self.simple_lower_bound_s,
            "gap": self.gap,
            "max_device_bytes": max(self.device_bytes),
            "planning_s": self.planning_s,
        }

    # ---- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": PLAN_SCHEMA,
            "tables": [dataclasses.asdict(t) for t in self.tables],
            "topology": self.topology.to_dict(),
            "workload": dataclasses.asdict(self.workload),
            "shards": [dataclasses.asdict(s) for s in self.shards],
            "device_cost_s": list(self.device_cost_s),
            "device_lookup_s": list(self.device_lookup_s),
            "device_comm_s": list(self.device_comm_s),
            "device_bytes": list(self.device_bytes),
            "device_capacity_bytes": list(self.device_capacity_bytes),
            "lower_bound_s": self.lower_bound_s,
            "simple_lower_bound_s": self.simple_lower_bound_s,
            "memory_margin": self.memory_margin,
            "planning_s": self.planning_s,
            "notes": list(self.notes),
            "summary": self.summary(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        schema = data.get("schema")
        if schema != PLAN_SCHEMA:
            raise ShardingError(
                f"sharding plan schema {schema!r} is not {PLAN_SCHEMA}",
                fix="re-run `codesign plan` with this version of codesign",
            )
        try:
            plan = cls(
                tables=tuple(TableSpec(**t) for t in data["tables"]),
                topology=Topology.from_dict(data["topology"]),
                workload=PlanWorkload(**data["workload"]),
                shards=tuple(Shard(**s) for s in data["shards"]),
                device_cost_s=tuple(float(x) for x in data["device_cost_s"]),
                device_lookup_s=tuple(float(x) for x in data["device_lookup_s"]),
                device_comm_s=tuple(float(x) for x in data["device_comm_s"]),
                device_bytes=tuple(int(x) for x in data["device_bytes"]),
                device_capacity_bytes=tuple(int(x) for x in data["device_capacity_bytes"]),
                lower_bound_s=float(data["lower_bound_s"]),
                simple_lower_bound_s=float(data["simple_lower_bound_s"]),
                memory_margin=float(data["memory_margin"]),
                planning_s=float(data.get("planning_s", 0.0)),
                notes=tuple(data.get("notes", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ShardingError(f"malformed sharding plan: {type(exc).__name__}: {exc}") from exc
        plan.check()
        return plan

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ShardingError(f"sharding plan is not JSON: {exc}") from exc
        return cls.from_dict(data)

    def check(self) -> None:
        """Every table covered exactly once (rows x columns), devices in range, memory within capacity."""
        k = self.topology.size
        by_table: dict[str, list[Shard]] = {}
        for s in self.shards:  # one pass: shards_of per table is quadratic on large plans
            by_table.setdefault(s.table, []).append(s)
        for t in self.tables:
            shards = sorted(by_table.get(t.name, []), key=lambda s: s.index)
            if not shards:
                raise ShardingError(f"plan places no shard of table {t.name!r}")
            if any(not 0 <= s.device < k for s in shards):
                raise ShardingError(f"plan puts table {t.name!r} on a device outside 0..{k - 1}")
            if shards[0].kind == "data_parallel":
                full = all(
                    (s.row_start, s.row_end, s.col_start, s.col_end) == (0, t.rows, 0, t.dim) for s in shards
                )
                if not full or len({s.device for s in shards}) != k:
                    raise ShardingError(
                        f"data-parallel table {t.name!r} must have a full replica on every device"
                    )
                continue
            area = sum((s.row_end - s.row_start) * (s.col_end - s.col_start) for s in shards)
            if area != t.rows * t.dim or len({s.device for s in shards}) != len(shards):
                raise ShardingError(
                    f"plan's shards of table {t.name!r} do not cover its {t.rows} x {t.dim} values once "
                    "on distinct devices"
                )
