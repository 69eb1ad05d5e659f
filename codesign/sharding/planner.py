"""Embedding sharding planner: enumerator -> proposer -> partitioner, priced by ``cost``.

- The **enumerator** lists, per table, every allowed way to cut it (table-wise, row-wise and
  column-wise in 2, 4, 8 ... pieces, table-row-wise over one host, data-parallel) that fits a device.
- The **lower bound** no placement can beat: a plan whose slowest device costs M has every piece
  at most M, so each table uses an option whose largest piece is <= M and the devices share at
  least f(M) = sum over tables of the cheapest such option's total. Hence
  ``M >= min over T of max(T, f(T) / K)`` (plus the dense part). It refines the simple bound
  ``max(sum of cheapest totals / K, heaviest indivisible piece)``, which is reported as well.
- The **proposer** picks one option per table: for a piece-size cap T (the T that attains the
  bound, and others) and a limit on piece bytes, the cheapest shard option within both; then it
  replicates tables, most seconds saved per extra byte first, up to several memory fills (a
  greedy knapsack: memory is what limits replicas, and the largest piece must fit beside them).
- The **partitioner** places the pieces: largest first on the device where the load after
  placing it is lowest (memory permitting, one piece of a table per device), then moves or swaps
  pieces off the slowest device while that lowers it. Proposals are tried cheapest total first;
  one whose mean load reaches the best slowest device found cannot beat it and is skipped.

Everything is numpy over devices, so a trillion-parameter set (thousands of pieces on hundreds
of devices) plans in seconds.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence

import numpy as np

from codesign.errors import ShardingError
from codesign.sharding.cost import MIN_COLUMN_BLOCK, DeviceModel, Option, device_model, make_option
from codesign.sharding.types import SHARDING_TYPES, Plan, PlanWorkload, Shard, TableSpec, Topology

__all__ = ["LowerBound", "PlannerConfig", "enumerate_options", "lower_bound", "plan_sharding"]

GIB = 1 << 30
# Pieces larger than these fractions of a device's memory make packing fragile (two cannot share
# a device, and every replica must fit beside the largest); the proposer tries each limit,
# preferring options with smaller pieces where they exist.
PIECE_FRACTIONS = (0.5, 0.25, 0.125)
# Fractions of the smallest device's memory the proposer fills with replicas plus an even spread
# of the shards: a fuller device saves more communication, an emptier one packs shards more
# easily; which wins depends on the set, so the proposals cover the range.
FILLS = (1.0, 0.97, 0.94, 0.9, 0.85, 0.8, 0.7, 0.5, 0.25, 0.0)
# piece-size caps the proposer tries, as multiples of the cap that attains the bound
CAP_FACTORS = (math.inf, 1.0, 0.5)
# memory fractions ``_fit`` demotes replicas to, in turn, until a choice places
DEMOTION_SLACKS = (math.inf, 1.0, 0.9, 0.75, 0.5, 0.0)
# refinement steps each proposal gets before the best ones are refined in full
SCREEN_STEPS = 50


@dataclasses.dataclass(frozen=True)
class PlannerConfig:
    """Planner settings: allowed sharding types, memory margin, per-table constraints.

    ``reserved_bytes`` is taken from every device before tables (the dense model, activations);
    ``memory_margin`` is the fraction of each device's memory left free on top of that.
    ``constraints`` forces a sharding type for named tables. The search stops refining once the
    slowest device is within ``tolerance`` of the lower bound, or after ``time_budget_s`` (a
    bound on the search, not on enumerating options).
    """

    sharding_types: tuple[str, ...] = SHARDING_TYPES
    memory_margin: float = 0.1
    reserved_bytes: float = 0.0
    constraints: Mapping[str, str] = dataclasses.field(default_factory=dict)
    tolerance: float = 0.01
    max_refine_steps: int = 20000
    patience: int = 8
    time_budget_s: float = 7.0

    def __post_init__(self) -> None:
        bad = [t for t in (*self.sharding_types, *self.constraints.values()) if t not in SHARDING_TYPES]
        if bad or not self.sharding_types:
            raise ShardingError(
                f"unknown or no sharding types {bad or list(self.sharding_types)}",
                fix=f"choose from {list(SHARDING_TYPES)}",
            )
        if not 0.0 <= self.memory_margin < 1.0:
            raise ShardingError(f"memory_margin must be in [0, 1), got {self.memory_margin}")


# ---- enumerator --------------------------------------------------------------------------------


def _counts(limit: int) -> list[int]:
    out, k = [], 2
    while k <= limit:
        out.append(k)
        k *= 2
    if limit >= 2 and limit not in out:
        out.append(limit)
    return out


def enumerate_options(
    tables: Sequence[TableSpec],
    topology: Topology,
    workload: PlanWorkload,
    config: PlannerConfig,
    model: DeviceModel,
) -> list[list[Option]]:
    """Every allowed option of every table whose pieces fit a device (raises if a table has none)."""
    k_all = topology.size
    host_sizes = sorted({len(ds) for ds in topology.host_devices().values()})
    multi_host = len(topology.host_devices()) > 1
    biggest, smallest = float(model.capacity_bytes.max()), float(model.capacity_bytes.min())
    out: list[list[Option]] = []
    for i, t in enumerate(tables):
        kinds = (config.constraints[t.name],) if t.name in config.constraints else config.sharding_types
        shapes: list[tuple[str, int]] = []
        for kind in kinds:
            if kind == "table_wise":
                shapes.append((kind, 1))
            elif kind == "data_parallel" and k_all > 1:
                shapes.append((kind, k_all))
            elif kind == "column_wise":
                shapes += [(kind, k) for k in _counts(min(k_all, t.dim // MIN_COLUMN_BLOCK))]
            elif kind == "row_wise" and t.pooling != "max":
                shapes += [(kind, k) for k in _counts(min(k_all, t.rows))]
            elif kind == "table_row_wise" and t.pooling != "max" and multi_host:
                shapes += [(kind, k) for k in host_sizes if 2 <= k <= t.rows]
        options = [make_option(i, t, kind, k, k_all, workload) for kind, k in shapes]
        fitting = [
            o
            for o in options
            if float(o.mem_bytes.max()) <= (smallest if o.kind == "data_parallel" else biggest)
        ]
        if not fitting:
            raise _no_option_error(t, options, kinds, topology, config, biggest)
        out.append(fitting)
    return out


def _no_option_error(
    table: TableSpec,
    options: list[Option],
    kinds: Sequence[str],
    topology: Topology,
    config: PlannerConfig,
    capacity: float,
) -> ShardingError:
    if not options:
        return ShardingError(
            f"table {table.name!r} ({table.rows} x {table.dim}, pooling {table.pooling}) cannot be sharded "
            f"as {list(kinds)} on {topology.size} device(s)",
            fix="allow table_wise or row_wise sharding for it",
        )
    smallest = min(float(o.mem_bytes.max()) for o in options)
    need = math.ceil(table.bytes / max(capacity, 1.0))
    return ShardingError(
        f"table {table.name!r} needs {table.bytes / GIB:.1f} GiB ({table.storage}); its smallest piece with "
        f"{list(kinds)} is {smallest / GIB:.2f} GiB but a device holds {capacity / GIB:.1f} GiB after the "
        f"{config.memory_margin:.0%} margin and reserved bytes",
        fix=f"allow row_wise sharding over >= {need} devices, store tables in fp8/int8 "
        f"({table.with_storage('fp8').bytes / GIB:.1f} GiB), or lower the memory margin",
    )


# ---- lower bound -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LowerBound:
    """The bound, the piece-size cap and memory price that attain it, and the simple bound."""

    seconds: float
    cap_s: float
    memory_price: float
    simple_s: float


class _OptionTable:
    """Every option of every table as flat arrays (options of one table contiguous)."""

    def __init__(self, options: list[list[Option]], model: DeviceModel) -> None:
        self.options = options
        flat = [o for row in options for o in row]
        self.starts = np.cumsum([0] + [len(row) for row in options])[:-1]
        self.table = np.repeat(np.arange(len(options)), [len(row) for row in options])
        self.dp = np.array([o.kind == "data_parallel" for o in flat])
        self.pieces = np.array([o.pieces for o in flat])
        first = np.cumsum(np.concatenate([[0], self.pieces[:-1]]))  # first piece of each option
        owner = np.repeat(np.arange(len(flat)), self.pieces)
        costs = (
            np.outer(np.concatenate([o.lookup_bytes for o in flat]), model.lookup_s_per_byte)
            + np.outer(np.concatenate([o.a2a_bytes for o in flat]), model.a2a_s_per_byte)
            + np.outer(np.concatenate([o.intra_bytes for o in flat]), model.intra_s_per_byte)
        )  # [all pieces, device classes]
        # a replica's piece j sits on device j; a shard may go to its cheapest device
        index = np.arange(owner.size) - first[owner]
        on_own = costs[np.arange(owner.size), model.class_of[np.minimum(index, model.size - 1)]]
        piece = np.where(self.dp[owner], on_own, costs.min(axis=1))
        mem = np.concatenate([o.mem_bytes for o in flat])
        self.costs, self.first = costs, first
        self.total = np.add.reduceat(piece, first)
        self.heavy = np.maximum.reduceat(piece, first)
        self.mem = np.add.reduceat(mem, first)
        self.largest = np.maximum.reduceat(mem, first)

    def device_costs(self, t: int, j: int, model: DeviceModel) -> np.ndarray:
        """[pieces, devices] seconds of each piece of option ``j`` of table ``t`` on each device
        (one row for a replica: its pieces are alike)."""
        g = int(self.starts[t]) + j
        n = 1 if self.dp[g] else int(self.pieces[g])
        return self.costs[int(self.first[g]) : int(self.first[g]) + n][:, model.class_of]

    def best(self, cap: float, price: float) -> tuple[np.ndarray, np.ndarray] | None:
        """Per table: the option minimizing total + price x memory among pieces <= cap, and that value."""
        value = np.where(self.heavy <= cap * (1 + 1e-9), self.total + price * self.mem, np.inf)
        mins = np.minimum.reduceat(value, self.starts)
        if not np.isfinite(mins).all():
            return None
        hit = np.flatnonzero(value == mins[self.table])
        _, first = np.unique(self.table[hit], return_index=True)
        return hit[first], mins

    def demand(self, cap: float, capacity: float) -> tuple[float, float]:
        """Max over memory prices of the Lagrangian bound on the total cost of pieces <= cap
        (weak duality: for every price, sum of min(total + price x mem) - price x capacity is
        below the cheapest memory-feasible choice), and the price attaining it."""

        def dual(price: float) -> tuple[float, float]:
            found = self.best(cap, price)
            if found is None:
                return math.inf, math.inf
            chosen, mins = found
            return float(mins.sum()) - price * capacity, float(self.mem[chosen].sum()) - capacity

        value, over = dual(0.0)
        if over <= 0 or not math.isfinite(value):
            return value, 0.0
        lo, hi = -40.0, 10.0  # log10 of seconds per byte
        best_value, best_price = value, 0.0
        for _ in range(50):
            mid = (lo + hi) / 2
            v, g = dual(10.0**mid)
            if v > best_value:
                best_value, best_price = v, 10.0**mid
            if g > 0:
                lo = mid
            else:
                hi = mid
        return best_value, best_price


def lower_bound(options: list[list[Option]], model: DeviceModel) -> LowerBound:
    """``min over T of max(T, f(T) / K)`` + dense, with f memory-aware (see module docstring)."""
    return _bound(_OptionTable(options, model), model)


def _bound(table: _OptionTable, model: DeviceModel) -> LowerBound:
    k = model.size
    capacity = float(model.capacity_bytes.sum())
    dense_min, dense_mean = float(model.dense_s.min()), float(model.dense_s.mean())
    per_table_total = np.minimum.reduceat(table.total, table.starts)
    per_table_heavy = np.minimum.reduceat(table.heavy, table.starts)
    simple = max(float(per_table_total.sum()) / k + dense_mean, float(per_table_heavy.max()) + dense_min)
    caps = np.unique(table.heavy)
    caps = caps[caps >= per_table_heavy.max()]

    def value(i: int) -> tuple[float, float]:
        demand, price = table.demand(float(caps[i]), capacity)
        return max(float(caps[i]) + dense_min, demand / k + dense_mean), price

    # f(T)/K falls as T grows while T rises: binary search for the crossing, then check neighbours
    lo, hi = 0, len(caps) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        demand, _ = table.demand(float(caps[mid]), capacity)
        if float(caps[mid]) + dense_min >= demand / k + dense_mean:
            hi = mid
        else:
            lo = mid + 1
    best = (math.inf, math.inf, 0.0)
    for i in {max(lo - 1, 0), lo}:
        v, price = value(i)
        if v < best[0]:
            best = (v, float(caps[i]), price)
    return LowerBound(best[0], best[1], best[2], max(simple, 0.0))


# ---- proposer ----------------------------------------------------------------------------------


def _per_table_any(flat: _OptionTable, mask: np.ndarray) -> np.ndarray:
    """``mask`` reduced per table (any) and spread back over that table's options."""
    return np.logical_or.reduceat(mask, flat.starts)[flat.table]


def _per_table_argmin(flat: _OptionTable, mask: np.ndarray, *keys: np.ndarray) -> np.ndarray:
    """Per table, the local index of the first option in ``mask`` minimizing ``keys`` in order."""
    order = np.lexsort((np.arange(mask.size), *reversed(keys), ~mask, flat.table))
    return order[flat.starts] - flat.starts


def _shard_choice(flat: _OptionTable, cap: float, piece_limit: float) -> list[int]:
    """Per table, the cheapest non-replicated option whose heaviest piece is <= cap (the lightest
    one where none is; a replica only where nothing else is allowed), preferring options whose
    pieces take at most ``piece_limit`` bytes."""
    shards = ~flat.dp | ~_per_table_any(flat, ~flat.dp)
    small = shards & (flat.largest <= piece_limit)
    small |= shards & ~_per_table_any(flat, small)
    fits = small & (flat.heavy <= cap * (1 + 1e-9))
    cheapest = _per_table_argmin(flat, fits, flat.total, flat.pieces)
    lightest = _per_table_argmin(flat, shards, flat.heavy, flat.total)
    has_fit = np.logical_or.reduceat(fits, flat.starts)
    return [int(x) for x in np.where(has_fit, cheapest, lightest)]


def _proposals(
    options: list[list[Option]], flat: _OptionTable, cap: float, model: DeviceModel
) -> list[list[int]]:
    """For each piece-size limit of ``PIECE_FRACTIONS``: shards as ``_shard_choice``, then
    replicas, most seconds saved per extra byte first, skipping those that overflow, until
    replicas plus an even spread of the shards fill each of ``FILLS`` of the smallest device (a
    greedy knapsack: replicas trade memory for no communication; finer shards leave more room
    for replicas beside the largest piece, and unfilled memory is slack for packing)."""
    budget = float(model.capacity_bytes.min())
    out: list[list[int]] = []
    for fraction in PIECE_FRACTIONS:
        base = _shard_choice(flat, cap, budget * fraction)
        out += [c for c in _fill_replicas(options, flat, base, model) if c not in out]
    return out


def _fill_replicas(
    options: list[list[Option]], flat: _OptionTable, base: list[int], model: DeviceModel
) -> list[list[int]]:
    """``base`` with replicas added by the greedy knapsack of ``_proposals``, one choice per fill."""
    gains = []
    for t, row in enumerate(options):
        start = int(flat.starts[t])
        dp = [j for j in range(len(row)) if flat.dp[start + j]]
        if dp and not flat.dp[start + base[t]]:
            saved = float(flat.total[start + base[t]] - flat.total[start + dp[0]])
            extra = float(flat.mem[start + dp[0]] - flat.mem[start + base[t]])
            if saved > 0:
                gains.append((saved / max(extra, 1.0), t, dp[0]))
    gains.sort(reverse=True)
    k, budget = model.size, float(model.capacity_bytes.min())
    out: list[list[int]] = []
    for fill in FILLS:
        rep, shard, biggest = _memory(options, base)
        choice = list(base)
        for _, t, j in gains:
            grown = rep + options[t][j].replica_bytes
            shrunk = shard - options[t][base[t]].total_bytes
            # some device holds the largest shard next to every replica
            if grown + max(shrunk / k, biggest) <= fill * budget:
                rep, shard, choice[t] = grown, shrunk, j
        if choice not in out:
            out.append(choice)
    return out


def _memory(options: list[list[Option]], choice: list[int]) -> tuple[float, float, float]:
    """(replicated bytes per device, shard bytes in all, largest shard) of ``choice``."""
    rep = shard = biggest = 0.0
    for t, c in enumerate(choice):
        o = options[t][c]
        if o.kind == "data_parallel":
            rep += o.replica_bytes
        else:
            shard += o.total_bytes
            biggest = max(biggest, o.largest_bytes)
    return rep, shard, biggest


def _spread(options: list[list[Option]], choice: list[int], k: int, largest: bool = True) -> float:
    """Bytes per device with every replica plus an even spread of the shards; with ``largest``,
    plus the largest shard: greedy packing surely stays under that (list scheduling)."""
    rep, shard, biggest = _memory(options, choice)
    return rep + shard / k + (biggest if largest else 0.0)


def _demote_replicas(
    options: list[list[Option]], table: _OptionTable, choice: list[int], model: DeviceModel, slack: float
) -> list[int]:
    """Turn replicated (data-parallel) tables into shards, most bytes per second saved first, until
    ``_spread`` fits ``slack`` of the smallest device."""
    choice = list(choice)
    k = model.size
    budget = float(model.capacity_bytes.min()) * slack
    if _spread(options, choice, k) <= budget:
        return choice
    candidates = []
    for t, c in enumerate(choice):
        if options[t][c].kind != "data_parallel":
            continue
        base = int(table.starts[t])
        alternatives = [j for j, a in enumerate(options[t]) if a.kind != "data_parallel"]
        if not alternatives:
            continue
        alt = min(alternatives, key=lambda j: (float(table.heavy[base + j]), float(table.total[base + j])))
        extra = float(table.total[base + alt]) - float(table.total[base + c])
        candidates.append((options[t][c].replica_bytes / max(extra, 1e-30), t, alt))
    rep, shard, biggest = _memory(options, choice)
    for _, t, alt in sorted(candidates, reverse=True):
        if rep + shard / k + biggest <= budget:
            break
        rep -= options[t][choice[t]].replica_bytes
        shard += options[t][alt].total_bytes
        biggest = max(biggest, options[t][alt].largest_bytes)
        choice[t] = alt
    return choice


# ---- partitioner -------------------------------------------------------------------------------


@dataclasses.dataclass
class _Placement:
    table: int
    option: Option
    piece: int
    device: int
    costs: np.ndarray  # this piece's seconds on every device
    mem: float


class _Partition:
    """Mutable state of one placement attempt."""

    def __init__(self, model: DeviceModel, topology: Topology) -> None:
        self.model = model
        self.topology = topology
        self.loads = model.dense_s.astype(np.float64).copy()
        self.free = model.capacity_bytes.astype(np.float64).copy()
        self.placements: list[_Placement] = []
        self.on_device: list[set[int]] = [set() for _ in range(model.size)]
        self.table_devices: dict[int, set[int]] = {}
        self.failed: str | None = None
        self.choice: list[int] = []
        self.replicas: list[tuple[int, Option]] = []  # (table, option): one full copy per device

    def put(self, p: _Placement, device: int) -> None:
        p.device = device
        self.loads[device] += p.costs[device]
        self.free[device] -= p.mem
        idx = len(self.placements)
        self.placements.append(p)
        self.on_device[device].add(idx)
        self.table_devices.setdefault(p.table, set()).add(device)

    def move(self, idx: int, device: int) -> None:
        p = self.placements[idx]
        old = p.device
        self.loads[old] -= p.costs[old]
        self.free[old] += p.mem
        self.on_device[old].discard(idx)
        self.table_devices[p.table].discard(old)
        p.device = device
        self.loads[device] += p.costs[device]
        self.free[device] -= p.mem
        self.on_device[device].add(idx)
        self.table_devices[p.table].add(device)

    def allowed(self, p: _Placement) -> np.ndarray:
        """Devices this piece may move to: memory left, no other piece of its table, same host
        for table-row-wise pieces."""
        ok = self.free >= p.mem
        others = self.table_devices.get(p.table, set())
        if others:
            ok[list(others)] = False
        if p.option.kind == "table_row_wise":
            ok &= np.asarray(self.topology.hosts) == self.topology.hosts[p.device]
        return ok


def _place(
    options: list[list[Option]],
    flat: _OptionTable,
    choice: list[int],
    model: DeviceModel,
    topology: Topology,
    balanced: bool,
) -> _Partition:
    """Greedy: replicas first, then pieces by their cost, each where the load after it is lowest.

    ``balanced`` scores a device by the larger of its load and memory fractions instead (for
    memory-tight sets, where placing by load alone strands big pieces)."""
    state = _Partition(model, topology)
    chosen = [options[t][c] for t, c in enumerate(choice)]
    target = max(_mean_load(flat, choice, model), 1e-30)
    picked = flat.starts + np.asarray(choice)
    size = np.maximum(flat.heavy[picked] / target, flat.largest[picked] / float(model.capacity_bytes.max()))
    hosts = topology.host_devices()
    order = sorted(range(len(chosen)), key=lambda t: (not flat.dp[picked[t]], -float(size[t])))
    for t in order:
        o, c = chosen[t], flat.device_costs(t, choice[t], model)
        if o.kind == "data_parallel":
            state.replicas.append((t, o))
            state.loads += c[0]
            state.free -= o.mem_bytes[0]
            if (state.free < 0).any():
                state.failed = f"replicas of table {t} overflow a device"
                return state
            continue
        if o.kind == "table_row_wise":
            best: tuple[float, list[int]] | None = None
            for devs in hosts.values():
                if len(devs) != o.pieces or (state.free[devs] < o.mem_bytes).any():
                    continue
                worst = float((state.loads[devs] + c[np.arange(o.pieces), devs]).max())
                if best is None or worst < best[0]:
                    best = (worst, devs)
            if best is None:
                state.failed = f"no host has memory for table {t}"
                return state
            for j, d in enumerate(best[1]):
                state.put(_Placement(t, o, j, d, c[j], float(o.mem_bytes[j])), d)
            continue
        used = np.zeros(model.size, dtype=bool)
        for j in np.argsort(-c.min(axis=1), kind="stable"):
            mem = float(o.mem_bytes[j])
            if balanced:
                score = np.maximum(
                    (state.loads + c[j]) / target,
                    (model.capacity_bytes - state.free + mem) / model.capacity_bytes,
                )
            else:
                score = state.loads + c[j]
            score = np.where(used | (state.free < mem), np.inf, score)
            d = int(np.argmin(score))
            if not math.isfinite(float(score[d])):
                state.failed = f"no device has memory for a piece of table {t}"
                return state
            used[d] = True
            state.put(_Placement(t, o, int(j), d, c[j], mem), d)
    return state


def _refine(state: _Partition, max_steps: int, stop_at: float) -> None:
    """Move, else swap, a piece off the slowest device while that lowers the slowest device."""
    loads = state.loads
    for _ in range(max_steps):
        m = int(np.argmax(loads))
        top = float(loads[m])
        if top <= stop_at:
            return
        movable = list(state.on_device[m])
        best: tuple[float, int, int, int | None] | None = None  # (new max of pair, piece, device, swap)
        for i in movable:
            p = state.placements[i]
            after = np.where(state.allowed(p), loads + p.costs, np.inf)
            d = int(np.argmin(after))
            pair = max(top - float(p.costs[m]), float(after[d]))
            if pair < top * (1 - 1e-9) and (best is None or pair < best[0]):
                best = (pair, i, d, None)
        if best is None:
            best = _best_swap(state, m, movable)
        if best is None:
            return
        _, i, d, j = best
        if j is None:
            state.move(i, d)
        else:
            state.move(i, d)
            state.move(j, m)


def _best_swap(state: _Partition, m: int, movable: list[int]) -> tuple[float, int, int, int | None] | None:
    """The swap of a piece on the slowest device ``m`` with one on a lightly loaded device that
    lowers the larger of the two loads most (vectorized over the pairs of each device)."""
    loads, top = state.loads, float(state.loads[m])
    hosts = state.topology.hosts
    mine = [state.placements[i] for i in movable]
    if not mine:
        return None
    p_m = np.array([p.costs[m] for p in mine])
    p_mem = np.array([p.mem for p in mine])
    p_twrw = np.array([p.option.kind == "table_row_wise" for p in mine])
    best: tuple[float, int, int, int | None] | None = None
    for d in np.argsort(loads)[: min(16, state.model.size)]:
        d = int(d)
        theirs = list(state.on_device[d])
        if d == m or not theirs:
            continue
        qs = [state.placements[j] for j in theirs]
        p_d = np.array([p.costs[d] for p in mine])
        q_m = np.array([q.costs[m] for q in qs])
        q_d = np.array([q.costs[d] for q in qs])
        q_mem = np.array([q.mem for q in qs])
        new_m = top - p_m[:, None] + q_m[None, :]
        new_d = float(loads[d]) - q_d[None, :] + p_d[:, None]
        pair = np.maximum(new_m, new_d)
        ok = (state.free[d] + q_mem[None, :] >= p_mem[:, None]) & (
            state.free[m] + p_mem[:, None] >= q_mem[None, :]
        )
        if hosts[d] != hosts[m]:
            ok &= ~p_twrw[:, None] & ~np.array([q.option.kind == "table_row_wise" for q in qs])[None, :]
        # a table may hold one piece per device: p must not meet its table on d, nor q on m
        ok &= ~np.array([d in state.table_devices[p.table] for p in mine])[:, None]
        ok &= ~np.array([m in state.table_devices[q.table] for q in qs])[None, :]
        pair = np.where(ok, pair, np.inf)
        a, b = np.unravel_index(int(np.argmin(pair)), pair.shape)
        value = float(pair[a, b])
        if value < top * (1 - 1e-9) and (best is None or value < best[0]):
            best = (value, movable[int(a)], d, theirs[int(b)])
    return best


def _fit(
    options: list[list[Option]],
    flat: _OptionTable,
    choice: list[int],
    model: DeviceModel,
    topology: Topology,
    refine_steps: int,
    stop_at: float,
    slacks: Sequence[float] = DEMOTION_SLACKS,
) -> _Partition:
    """Place ``choice`` (demoting replicas to each of ``slacks`` while memory fails), then refine."""
    for slack in slacks:
        choice = _demote_replicas(options, flat, choice, model, slack)
        state = _place(options, flat, choice, model, topology, balanced=False)
        if state.failed:
            state = _place(options, flat, choice, model, topology, balanced=True)
        if not state.failed:
            break
    state.choice = choice
    if not state.failed:
        _refine(state, refine_steps, stop_at)
    return state


def _screen(
    options: list[list[Option]],
    flat: _OptionTable,
    bound: LowerBound,
    model: DeviceModel,
    topology: Topology,
    stop_at: float,
    deadline: float,
) -> tuple[list[_Partition], list[str]]:
    """Fit every proposal as it stands, with a short refinement, cheapest total first; stop where
    the mean load (which the slowest device cannot beat) reaches the best slowest device found.
    Only where none places are replicas demoted. Returns placements, best first, and why others
    failed."""
    proposals: list[list[int]] = []
    for factor in CAP_FACTORS:
        proposals += [c for c in _proposals(options, flat, bound.cap_s * factor, model) if c not in proposals]
    proposals.sort(key=lambda c: _mean_load(flat, c, model))
    screened: list[_Partition] = []
    for choice in proposals:
        if screened and (
            time.perf_counter() > deadline or _mean_load(flat, choice, model) >= screened[0].loads.max()
        ):
            break
        state = _fit(options, flat, choice, model, topology, SCREEN_STEPS, stop_at, slacks=(math.inf,))
        if not state.failed:
            screened.append(state)
            screened.sort(key=lambda st: float(st.loads.max()))
    if screened:
        return screened, []
    notes: list[str] = []
    for choice in proposals:
        state = _fit(options, flat, choice, model, topology, SCREEN_STEPS, stop_at)
        if not state.failed:
            return [state], notes
        notes.append(state.failed)
    return screened, notes


def _mean_load(flat: _OptionTable, choice: list[int], model: DeviceModel) -> float:
    """Mean device load of ``choice`` with every shard on its cheapest device: a floor for its
    slowest device."""
    total = float(flat.total[flat.starts + np.asarray(choice)].sum())
    return (total + float(model.dense_s.sum())) / model.size


def _split_bottlenecks(
    options: list[list[Option]],
    flat: _OptionTable,
    state: _Partition,
    model: DeviceModel,
    topology: Topology,
    config: PlannerConfig,
    stop_at: float,
    deadline: float,
    beat: float,
) -> _Partition:
    """Proposer feedback: cut the heaviest piece on the slowest device into lighter pieces (the
    table's cheapest option with a lighter heaviest piece that memory allows and whose mean load
    is below the best slowest device here and ``beat``), re-place; keep the best placement seen,
    giving up after ``config.patience`` cuts without improvement."""
    best = current = state
    stale = 0
    budget = float(model.capacity_bytes.min())
    while best.loads.max() > stop_at and stale < config.patience and time.perf_counter() < deadline:
        m = int(np.argmax(current.loads))
        pieces = sorted(
            (current.placements[i] for i in current.on_device[m]),
            key=lambda p: -float(p.costs[m]),
        )
        choice: list[int] | None = None
        for p in pieces:
            base = int(flat.starts[p.table])
            heavy = float(flat.heavy[base + current.choice[p.table]])
            for j in sorted(
                range(len(options[p.table])),
                key=lambda j: (float(flat.total[base + j]), options[p.table][j].pieces),
            ):
                if float(flat.heavy[base + j]) >= heavy * (1 - 1e-9):
                    continue
                trial = list(current.choice)
                trial[p.table] = j
                if _mean_load(flat, trial, model) >= min(best.loads.max(), beat):
                    continue  # its mean load already reaches the best slowest device
                if (
                    options[p.table][j].kind != "data_parallel"
                    or _spread(options, trial, model.size, largest=False) <= budget
                ):
                    choice = trial
                    break
            if choice is not None:
                break
        if choice is None:
            break
        current = _fit(options, flat, choice, model, topology, config.max_refine_steps, stop_at)
        if current.failed:
            break
        if current.loads.max() < best.loads.max() * (1 - 1e-6):
            best, stale = current, 0
        else:
            stale += 1
    return best


# ---- facade ------------------------------------------------------------------------------------


def plan_sharding(
    tables: Sequence[TableSpec],
    topology: Topology,
    workload: PlanWorkload | None = None,
    config: PlannerConfig | None = None,
) -> Plan:
    """Place every table on ``topology``, minimizing the slowest device's cost per step.

    >>> plan = plan_sharding(tables, Topology.uniform(get_target("h100").hardware, 8))
    >>> print(plan.max_cost_s / plan.lower_bound_s)   # 1.0 is optimal
    """
    t0 = time.perf_counter()
    workload = workload or PlanWorkload()
    config = config or PlannerConfig()
    if not tables:
        raise ShardingError("no embedding tables to plan", fix="pass at least one TableSpec")
    names = [t.name for t in tables]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ShardingError(f"table names must be unique; repeated: {dup}")
    unknown = sorted(set(config.constraints) - set(names))
    if unknown:
        raise ShardingError(f"constraints name unknown tables {unknown}", fix=f"tables are {names}")
    model = device_model(topology, workload, config.memory_margin, config.reserved_bytes)
    if (model.capacity_bytes <= 0).any():
        raise ShardingError(
            f"reserved bytes ({config.reserved_bytes / GIB:.1f} GiB) and the {config.memory_margin:.0%} margin "
            "leave no memory for tables on some device",
            fix="lower the memory margin or the reserved bytes",
        )
    _check_total_memory(tables, topology, model, config)
    options = enumerate_options(tables, topology, workload, config, model)
    flat = _OptionTable(options, model)
    bound = _bound(flat, model)
    stop_at = bound.seconds * (1 + config.tolerance)
    deadline = t0 + config.time_budget_s
    screened, notes = _screen(options, flat, bound, model, topology, stop_at, t0 + config.time_budget_s / 2)
    best: _Partition | None = None
    for state in screened:  # best first, while time is left and its mean load can beat the best
        if best is not None and _mean_load(flat, state.choice, model) >= best.loads.max():
            continue
        _refine(state, config.max_refine_steps, stop_at)
        beat = math.inf if best is None else float(best.loads.max())
        state = _split_bottlenecks(options, flat, state, model, topology, config, stop_at, deadline, beat)
        if best is None or state.loads.max() < best.loads.max():
            best = state
        if best.loads.max() <= stop_at or time.perf_counter() > deadline:
            break
    if best is None:
        raise ShardingError(
            f"could not fit {len(tables)} tables ({sum(t.bytes for t in tables) / GIB:.1f} GiB) on "
            f"{topology.describe()}: " + "; ".join(notes),
            fix="add devices, store tables in fp8/int8, allow row_wise sharding or lower the memory margin",
        )
    return _to_plan(tables, topology, workload, config, model, best, bound, time.perf_counter() - t0)


def _check_total_memory(
    tables: Sequence[TableSpec], topology: Topology, model: DeviceModel, config: PlannerConfig
) -> None:
    need = sum(t.bytes for t in tables)
    have = float(model.capacity_bytes.sum())
    if need <= have:
        return
    per_device = float(model.capacity_bytes.max())
    fp8 = sum(t.with_storage("fp8").bytes for t in tables)
    raise ShardingError(
        f"{len(tables)} tables need {need / GIB:.1f} GiB ({sum(t.params for t in tables) / 1e9:.2f} B parameters) "
        f"but {topology.describe()} hold {have / GIB:.1f} GiB after the {config.memory_margin:.0%} margin",
        fix=f"use >= {math.ceil(need / per_device)} devices, or fp8/int8 table storage ({fp8 / GIB:.1f} GiB, "
        f"fits >= {math.ceil(fp8 / per_device)} devices)",
    )


def _to_plan(
    tables: Sequence[TableSpec],
    topology: Topology,
    workload: PlanWorkload,
    config: PlannerConfig,
    model: DeviceModel,
    state: _Partition,
    bound: LowerBound,
    seconds: float,
) -> Plan:
    k = model.size
    lookup, comm = np.zeros(k), np.zeros(k)
    shards = []
    pieces = [(p.table, p.piece, p.device, p.option) for p in state.placements]
    pieces += [(t, d, d, o) for t, o in state.replicas for d in range(k)]
    for t, j, d, o in sorted(pieces, key=lambda x: (x[0], x[1])):
        cls = int(model.class_of[d])
        lookup_s = float(o.lookup_bytes[j] * model.lookup_s_per_byte[cls])
        comm_s = float(
            o.a2a_bytes[j] * model.a2a_s_per_byte[cls] + o.intra_bytes[j] * model.intra_s_per_byte[cls]
        )
        lookup[d] += lookup_s
        comm[d] += comm_s
        r0, r1, c0, c1 = o.block(j)
        shards.append(
            Shard(tables[t].name, o.kind, j, d, r0, r1, c0, c1, int(o.mem_bytes[j]), lookup_s + comm_s)
        )
    used = model.capacity_bytes - state.free
    plan = Plan(
        tables=tuple(tables),
        topology=topology,
        workload=workload,
        shards=tuple(shards),
        device_cost_s=tuple(float(x) for x in state.loads),
        device_lookup_s=tuple(float(x) for x in lookup),
        device_comm_s=tuple(float(x) for x in comm),
        device_bytes=tuple(int(x) for x in used),
        device_capacity_bytes=tuple(int(x) for x in model.capacity_bytes),
        lower_bound_s=bound.seconds,
        simple_lower_bound_s=bound.simple_s,
        memory_margin=config.memory_margin,
        planning_s=seconds,
    )
    plan.check()
    return plan
