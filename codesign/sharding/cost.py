"""The sharding perf model: what a piece of a table costs on a device, per step.

Per device: lookup bytes / HBM bandwidth + all-to-all bytes / link bandwidth (+ the dense part).
A piece is summarised by three byte counts (HBM traffic, all-to-all traffic, intra-host reduce
traffic) and its storage; a device by the seconds one byte of each costs there. A piece's cost
on a device is then a dot product, so the partitioner can price a piece on every device at once.

Traffic model (B = global batch, I = B x ids per sample, G = B x bags per sample):

- table-wise: reads I rows, writes G pooled rows, receives I ids + G offsets, sends G pooled rows;
- column-wise (k blocks): each block receives every id and sends its columns of every bag;
- row-wise (k blocks): each block receives the ids in its rows (ids assumed spread evenly over
  row blocks: hashed ids) and sends a *partial* pooled row for every bag (reduce-scatter);
- table-row-wise: row-wise over the devices of one host; partials are reduced over the
  intra-host links, then each block sends 1/k of the reduced rows to the other hosts;
- data-parallel: each device looks up its own local batch in its replica; nothing is sent.

All-to-all bytes leave a device evenly towards all K-1 peers: the share to the same host uses the
interconnect, the rest the scale-out network; the two are added (conservative: no overlap).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from codesign.sharding.types import PlanWorkload, TableSpec, Topology

__all__ = ["LINK_EFFICIENCY", "MIN_COLUMN_BLOCK", "DeviceModel", "Option", "device_model", "make_option"]

# Achieved fraction of link bandwidth in a large all-to-all (assumed, like the HBM efficiency the
# catalogue applies to streaming kernels).
LINK_EFFICIENCY = 0.8
# Column blocks narrower than this waste most of each memory transaction on a row gather.
MIN_COLUMN_BLOCK = 4


@dataclasses.dataclass(frozen=True)
class DeviceModel:
    """Seconds per byte of each traffic class, per *device class* (devices with equal figures:
    same hardware, same host size), and per-device usable memory and dense time."""

    lookup_s_per_byte: np.ndarray  # [classes]
    a2a_s_per_byte: np.ndarray  # [classes]
    intra_s_per_byte: np.ndarray  # [classes]
    class_of: np.ndarray  # [devices] -> class index
    capacity_bytes: np.ndarray  # [devices]
    dense_s: np.ndarray  # [devices]

    @property
    def size(self) -> int:
        return int(self.capacity_bytes.shape[0])

    def on_devices(self, per_class: np.ndarray) -> np.ndarray:
        """Expand the last axis from classes to devices."""
        return per_class[..., self.class_of]


def device_model(
    topology: Topology, workload: PlanWorkload, memory_margin: float, reserved_bytes: float = 0.0
) -> DeviceModel:
    """Per-device coefficients: HBM and link seconds per byte, memory left after margin and reserve."""
    k = topology.size
    per_host = {h: len(ds) for h, ds in topology.host_devices().items()}
    classes: dict[tuple[float, float, float], int] = {}
    class_of = np.zeros(k, dtype=np.int64)
    cap = np.zeros(k)
    for d, hw in enumerate(topology.devices):
        link = hw.interconnect_bandwidth_bytes_per_s * LINK_EFFICIENCY
        net = hw.scale_out_bandwidth_bytes_per_s * LINK_EFFICIENCY
        same = per_host[topology.hosts[d]]
        key = (
            1.0 / (hw.memory_bandwidth_bytes_per_s * hw.memory_efficiency),
            ((same - 1) / k) / link + ((k - same) / k) / net,
            1.0 / link,
        )
        class_of[d] = classes.setdefault(key, len(classes))
        cap[d] = hw.memory_bytes * (1.0 - memory_margin) - reserved_bytes
    coeff = np.asarray(list(classes), dtype=np.float64).reshape(-1, 3)
    return DeviceModel(coeff[:, 0], coeff[:, 1], coeff[:, 2], class_of, cap, np.full(k, workload.dense_s))


@dataclasses.dataclass(frozen=True)
class Option:
    """One way to shard one table: ``pieces`` blocks and each block's traffic and storage."""

    table: int
    kind: str
    pieces: int
    rows: int
    dim: int
    lookup_bytes: np.ndarray
    a2a_bytes: np.ndarray
    intra_bytes: np.ndarray
    mem_bytes: np.ndarray

    def __post_init__(self) -> None:
        # summaries the proposer reads many times
        object.__setattr__(self, "total_bytes", float(self.mem_bytes.sum()))
        object.__setattr__(self, "largest_bytes", float(self.mem_bytes.max()))
        object.__setattr__(self, "replica_bytes", float(self.mem_bytes[0]))

    total_bytes: float = dataclasses.field(init=False, default=0.0)
    largest_bytes: float = dataclasses.field(init=False, default=0.0)
    replica_bytes: float = dataclasses.field(init=False, default=0.0)

    def costs(self, model: DeviceModel) -> np.ndarray:
        """[pieces, device classes] seconds of each block on each class of device."""
        return (
            np.outer(self.lookup_bytes, model.lookup_s_per_byte)
            + np.outer(self.a2a_bytes, model.a2a_s_per_byte)
            + np.outer(self.intra_bytes, model.intra_s_per_byte)
        )

    def block(self, j: int) -> tuple[int, int, int, int]:
        """(row_start, row_end, col_start, col_end) of piece ``j``."""
        if self.kind == "column_wise":
            return 0, self.rows, self.dim * j // self.pieces, self.dim * (j + 1) // self.pieces
        if self.kind in ("row_wise", "table_row_wise"):
            return self.rows * j // self.pieces, self.rows * (j + 1) // self.pieces, 0, self.dim
        return 0, self.rows, 0, self.dim


def make_option(
    index: int, table: TableSpec, kind: str, k: int, devices: int, workload: PlanWorkload
) -> Option:
    """The blocks and traffic of sharding ``table`` as ``kind`` in ``k`` pieces (``devices`` in all)."""
    batch = workload.batch_per_device * devices
    ids = batch * table.ids_per_sample
    bags = batch * (table.ids_per_sample if table.pooling == "none" else table.bags_per_sample)
    ib, ob = workload.index_bytes, table.output_bytes
    per_value = table.block_bytes(1, 2) - table.block_bytes(1, 1)
    scale = table.block_bytes(1, 1) - per_value  # per-row scale of quantized formats (else 0)
    j = np.arange(k if kind != "table_wise" else 1)
    n = j.size
    if kind == "data_parallel":
        n, rows, cols = devices, np.full(devices, table.rows), np.full(devices, table.dim)
    elif kind == "column_wise":
        rows = np.full(n, table.rows)
        cols = table.dim * (j + 1) // n - table.dim * j // n
    elif kind in ("row_wise", "table_row_wise"):
        rows = table.rows * (j + 1) // n - table.rows * j // n
        cols = np.full(n, table.dim)
    else:
        rows, cols = np.full(1, table.rows), np.full(1, table.dim)
    row_bytes = cols * per_value + scale
    mem = rows * row_bytes
    if kind == "data_parallel":
        lookup = np.full(n, (ids * (table.dim * per_value + scale) + bags * table.dim * ob) / devices)
        a2a = intra = np.zeros(n)
    else:
        got = ids * rows / table.rows
        lookup = got * row_bytes + bags * cols * ob
        if kind == "table_row_wise":
            a2a = (got + bags) * ib + bags * cols * ob / n
            intra = bags * cols * ob * (n - 1) / n
        else:
            a2a = (got + bags) * ib + bags * cols * ob
            intra = np.zeros(n)
    return Option(
        index,
        kind,
        n,
        table.rows,
        table.dim,
        np.asarray(lookup, dtype=np.float64),
        np.asarray(a2a, dtype=np.float64),
        np.asarray(intra, dtype=np.float64),
        np.asarray(mem, dtype=np.float64),
    )
