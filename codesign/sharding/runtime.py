"""Run a sharded program across processes with torch.distributed (gloo; CPU tensors).

Every rank scores its own requests. The program's graph is cut in two at its embedding lookups:

1. ``front`` computes every lookup's ids and bag offsets from the rank's inputs;
2. ids travel to the ranks that own the table's shards (one all-to-all of sizes, one of ids and
   bag lengths); a row-wise shard receives only the ids in its rows;
3. each owner pools its shard's rows (``sum`` for row-wise partials) and the pooled rows travel
   back (one all-to-all); the rank joins them: column blocks are concatenated, row-block
   partials summed (then divided by the bag length for ``mean``); replicated tables are looked
   up locally;
4. ``back`` runs the dense part on the pooled embeddings.

A rank keeps only its own shards: the full tables are dropped once sliced.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.fx

from codesign.errors import ShardingError
from codesign.ir.request import flatten_inputs
from codesign.ops.quantized_embedding import QUANTIZED_TABLE_FORMATS, quantize_table
from codesign.sharding.types import Plan, Shard

__all__ = ["ShardedProgram", "find_lookups", "launch", "table_storage"]

aten = torch.ops.aten
_BAG_OPS = (aten.embedding_bag.padding_idx, aten.embedding_bag.default)
_MODES = {0: "sum", 1: "mean", 2: "max"}
_DTYPE_STORAGE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_STORAGE_DTYPE = {v: k for k, v in _DTYPE_STORAGE.items()}


@dataclasses.dataclass(frozen=True)
class Lookup:
    """One EmbeddingBag lookup of the graph: its node, table attribute, ids/offsets nodes, mode."""

    node: str
    table: str  # get_attr target of the weight: the table's name in plans
    ids: str
    offsets: str
    mode: str
    scale: str | None = None  # quantized tables: the get_attr target of the row scales


def _attr(gm: torch.fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def find_lookups(gm: torch.fx.GraphModule) -> tuple[list[Lookup], list[str]]:
    """The shardable lookups of a graph, and why any other embedding lookup is not shardable."""
    lookups, refused = [], []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        is_bag = node.target in _BAG_OPS
        is_qbag = node.target is torch.ops.codesign.quantized_embedding_bag.default
        if not (is_bag or is_qbag or "embedding" in str(node.target)):
            continue
        if not (is_bag or is_qbag):
            refused.append(f"{node.name} ({node.target}): only EmbeddingBag lookups are sharded")
            continue
        args = list(node.args) + [None] * 9
        if is_qbag:
            weight, scale, ids, offsets, mode = args[0], args[1], args[2], args[3], args[4]
            extra_ok = True
        else:
            weight, ids, offsets, scale = args[0], args[1], args[2], None
            mode = args[4] if args[4] is not None else 0
            padding = args[8] if node.target is aten.embedding_bag.padding_idx else None
            extra_ok = args[6] is None and not args[7] and padding in (None, -1)
            if any(u.target is not operator.getitem or (u.args[1] != 0 and u.users) for u in node.users):
                extra_ok = False
        nodes = (weight, ids, offsets) + ((scale,) if is_qbag else ())
        if not extra_ok or not all(isinstance(n, torch.fx.Node) for n in nodes) or weight.op != "get_attr":
            refused.append(f"{node.name}: per-sample weights, padding_idx or include_last_offset")
            continue
        if is_qbag and scale.op != "get_attr":
            refused.append(f"{node.name}: quantized lookup whose scales are not a constant")
            continue
        lookups.append(
            Lookup(
                node.name,
                str(weight.target),
                ids.name,
                offsets.name,
                _MODES[int(mode)],
                str(scale.target) if is_qbag else None,
            )
        )
    return lookups, refused


def table_storage(gm: torch.fx.GraphModule, lookup: Lookup) -> str:
    """The storage format of a lookup's table as the program holds it."""
    weight = _attr(gm, lookup.table)
    if lookup.scale is not None:
        return "int8" if weight.dtype == torch.int8 else "fp8"
    return _DTYPE_STORAGE.get(weight.dtype, "fp32")


def _plain(graph: torch.fx.Graph) -> torch.fx.Graph:
    graph.set_codegen(torch.fx.graph.CodeGen())  # positional placeholders, no pytree specs
    return graph


def _module(gm: torch.fx.GraphModule, graph: torch.fx.Graph) -> torch.fx.GraphModule:
    """``graph`` without dead code, as a GraphModule holding only the attributes it still reads
    (not the full tables)."""

    def build() -> torch.fx.GraphModule:
        root = {
            str(n.target): _attr(gm, str(n.target))
            for n in graph.nodes
            if n.op in ("get_attr", "call_module")
        }
        return torch.fx.GraphModule(root, graph)

    build().graph.eliminate_dead_code()
    return build()


class _LocalShard:
    """One shard this rank owns: its rows/columns of the table, stored as the plan says."""

    def __init__(self, shard: Shard, block: torch.Tensor, scale: torch.Tensor | None, storage: str) -> None:
        """``block``: the shard's rows/columns of the table; ``scale``: their row scales (quantized tables)."""
        self.shard = shard
        self.scale: torch.Tensor | None = None
        if scale is not None:  # already quantized by selective_fp8: keep its bytes and scales
            self.weight = block.contiguous()
            self.scale = scale.contiguous()
        elif storage in QUANTIZED_TABLE_FORMATS:
            self.weight, self.scale = quantize_table(block.float(), storage)
        else:
            self.weight = block.to(_STORAGE_DTYPE[storage]).contiguous()

    @classmethod
    def holding(cls, shard: Shard, weight: torch.Tensor) -> _LocalShard:
        """A shard holding ``weight`` as it is (already in its storage dtype)."""
        out = cls.__new__(cls)
        out.shard, out.weight, out.scale = shard, weight, None
        return out

    def pool(self, ids: torch.Tensor, lengths: torch.Tensor, mode: int) -> torch.Tensor:
        offsets = torch.cumsum(lengths, 0) - lengths
        if self.scale is not None:
            return torch.ops.codesign.quantized_embedding_bag(
                self.weight, self.scale, ids, offsets, mode, torch.float32
            )
        out, *_ = aten._embedding_bag_forward_only(
            self.weight, ids, offsets, False, mode, False, None, False, -1
        )
        return out.float()


class ShardedProgram:
    """A program's graph plus a sharding plan, run collectively by every rank of a process group.

    >>> sharded = ShardedProgram(variant.exported.module(), plan)   # in each of K processes
    >>> scores = sharded(**local_batch.inputs)                      # collective: all ranks call
    """

    def __init__(
        self,
        graph_module: torch.fx.GraphModule,
        plan: Plan,
        group: Any = None,
        blocks: Callable[[str, tuple[int, int, int, int]], torch.Tensor] | None = None,
    ) -> None:
        """``blocks(name, (row_start, row_end, col_start, col_end))``: where this rank's pieces of a
        table (or of its row scales) come from when ``graph_module`` holds placeholders for the
        planned tables (a sharded bundle, ``codesign.build.shard_blocks``); by default they are cut
        from the tables the graph module holds."""
        if not dist.is_initialized():
            raise ShardingError(
                "torch.distributed is not initialized", fix="run under torchrun or codesign.sharding.launch"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        if self.world != plan.topology.size:
            raise ShardingError(
                f"the plan is for {plan.topology.size} devices but the process group has {self.world} ranks",
                fix=f"launch {plan.topology.size} processes or re-plan with --devices {self.world}",
            )
        self.plan = plan
        lookups, refused = find_lookups(graph_module)
        names = {lk.table for lk in lookups}
        missing = sorted(set(t.name for t in plan.tables) - names)
        if missing:
            raise ShardingError(
                f"the plan shards tables {missing} that this program does not look up"
                + (f" ({'; '.join(refused)})" if refused else ""),
                fix="plan for this program (`codesign plan` on the same model and passes)",
            )
        self.lookups = [lk for lk in lookups if lk.table in {t.name for t in plan.tables}]
        self.shards = {lk.node: plan.shards_of(lk.table) for lk in self.lookups}
        self.kind = {lk.node: self.shards[lk.node][0].kind for lk in self.lookups}
        self.by_node = {lk.node: lk for lk in self.lookups}
        # the (lookup, shard) segments every rank sends here, in the order it sends them
        self.incoming = [
            (lk.node, s)
            for lk in self.lookups
            if self.kind[lk.node] != "data_parallel"
            for s in self.shards[lk.node]
            if s.device == self.rank
        ]
        self._build_graphs(graph_module)
        self.local: dict[tuple[str, int], _LocalShard] = {}
        for lk in self.lookups:
            weight = _attr(graph_module, lk.table)
            scale = _attr(graph_module, lk.scale) if lk.scale else None
            storage = plan.table(lk.table).storage
            have = table_storage(graph_module, lk)
            if scale is not None and storage != have:
                raise ShardingError(
                    f"table {lk.table!r} is stored as {have} in the program but the plan says {storage}",
                    fix="plan with the program's own table storage (table_format='model')",
                )
            for s in self.shards[lk.node]:
                if s.device == self.rank:
                    rows, cols = (s.row_start, s.row_end), (s.col_start, s.col_end)
                    if blocks is not None:
                        block = blocks(lk.table, (*rows, *cols))
                        cut = (
                            blocks(lk.scale, (*rows, 0, scale.shape[1] if scale.dim() == 2 else 1))
                            if lk.scale and scale is not None
                            else None
                        )
                    else:
                        block = weight[rows[0] : rows[1], cols[0] : cols[1]]
                        cut = scale[rows[0] : rows[1]] if scale is not None else None
                    self.local[(lk.node, s.index)] = _LocalShard(s, block, cut, storage)

    # ---- graph cut ---------------------------------------------------------------------------
    def _build_graphs(self, gm: torch.fx.GraphModule) -> None:
        front = _plain(_copy_graph(gm.graph))
        by_name = {n.name: n for n in front.nodes}
        out = next(n for n in front.nodes if n.op == "output")
        front.erase_node(out)
        front.output(tuple(by_name[x] for lk in self.lookups for x in (lk.ids, lk.offsets)))
        self.front = _module(gm, front)

        back = _plain(_copy_graph(gm.graph))
        by_name = {n.name: n for n in back.nodes}
        last_placeholder = [n for n in back.nodes if n.op == "placeholder"][-1]
        with back.inserting_after(last_placeholder):
            anchor = last_placeholder
            for lk in self.lookups:
                with back.inserting_after(anchor):
                    anchor = back.placeholder(f"pooled__{lk.node}")
                node = by_name[lk.node]
                anchor.meta = dict(node.meta)
                for user in list(node.users):
                    if user.args[1] == 0:
                        user.replace_all_uses_with(anchor)
                    back.erase_node(user)
                back.erase_node(node)
        self.back = _module(gm, back)
        # the front may keep lookups whose outputs only size a later lookup's offsets (a placeholder
        # table gives the same shapes); the dense part after the cut must not read a planned table
        planned = {lk.table for lk in self.lookups} | {lk.scale for lk in self.lookups if lk.scale}
        kept = sorted(planned & {str(n.target) for n in self.back.graph.nodes if n.op == "get_attr"})
        if kept:
            raise ShardingError(
                f"tables {kept} are read by more than their EmbeddingBag lookups, so they cannot be sharded",
                fix="plan without those tables (sharding constraints) or compile for one device",
            )

    # ---- one call ----------------------------------------------------------------------------
    def __call__(self, **inputs: Any) -> Any:
        flat, ids, lengths = self.route(**inputs)
        return self.finish(flat, self.exchange(ids, lengths))

    def route(self, **inputs: Any) -> tuple[list[Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """This rank's part before any communication: the inputs flattened, each lookup's ids and bag lengths."""
        flat = [v for _, v in flatten_inputs(inputs)]
        with torch.no_grad():
            parts = self.front(*flat)
        # contiguous: ids cut from a column of a [N, F] input are a strided view, and the lookup
        # kernel below reads its ids as if they were packed (it read another field's ids)
        ids = {
            lk.node: parts[2 * i].reshape(-1).to(torch.int64).contiguous()
            for i, lk in enumerate(self.lookups)
        }
        lengths = {}
        for i, lk in enumerate(self.lookups):
            offsets = parts[2 * i + 1].reshape(-1).to(torch.int64)
            end = torch.tensor([ids[lk.node].numel()], dtype=torch.int64)
            lengths[lk.node] = torch.diff(torch.cat([offsets, end]))
        return flat, ids, lengths

    def exchange(
        self, ids: Mapping[str, torch.Tensor], lengths: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The collective part (every rank calls it together): ids to their owners, pooled rows back."""
        with torch.no_grad():
            return self._lookup(ids, lengths)

    def serve_peers(self) -> None:
        """Take part in one ``exchange`` with no lookups of this rank's own: pool what the other ranks
        send to this rank's shards (a rank of a sharded server that has no requests of its own)."""
        empty = torch.empty(0, dtype=torch.int64)
        self.exchange({lk.node: empty for lk in self.lookups}, {lk.node: empty for lk in self.lookups})

    def finish(self, flat: Sequence[Any], pooled: Mapping[str, torch.Tensor]) -> Any:
        """The dense part on this rank's inputs and the pooled embeddings."""
        with torch.no_grad():
            out = self.back(*flat, *(pooled[lk.node] for lk in self.lookups))
        return out[0] if isinstance(out, list | tuple) and len(out) == 1 else out

    def updated(
        self,
        rows: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        graph_module: torch.fx.GraphModule | None = None,
    ) -> ShardedProgram:
        """A new version of this program: the shards of ``rows``' tables (name -> row ids, new full
        rows) copied with those rows changed, every other shard shared with this version; the dense
        halves rebuilt from ``graph_module`` when given (new dense weights). This version is unchanged,
        so calls in flight on it finish on it."""
        quantized = sorted(
            lk.table
            for lk in self.lookups
            if lk.table in rows
            and any(sh.scale is not None for (node, _), sh in self.local.items() if node == lk.node)
        )
        if quantized:
            raise ShardingError(
                f"tables {quantized} are stored quantized on the ranks; changed rows would need quantizing again",
                fix="send a new bundle compiled from the new weights",
            )
        new = copy.copy(self)
        new.local = dict(self.local)
        if graph_module is not None:
            new._build_graphs(graph_module)
        for (node, index), shard in self.local.items():
            table = self.by_node[node].table
            if table not in rows:
                continue
            ids, values = rows[table]
            s = shard.shard
            keep = (ids >= s.row_start) & (ids < s.row_end)
            if not bool(keep.any()):
                continue
            weight = shard.weight.clone()
            part = values[keep][:, s.col_start : s.col_end].to(weight.dtype)
            weight.index_copy_(0, ids[keep] - s.row_start, part)
            new.local[(node, index)] = _LocalShard.holding(s, weight)
        return new

    @property
    def shard_bytes(self) -> int:
        """Bytes of the table shards this rank holds (weights and row scales)."""
        return sum(
            s.weight.nbytes + (s.scale.nbytes if s.scale is not None else 0) for s in self.local.values()
        )

    def _segments(
        self, node: str, ids: torch.Tensor, lengths: torch.Tensor
    ) -> list[tuple[Shard, torch.Tensor, torch.Tensor]]:
        """(shard, ids relative to the shard, bag lengths) to send for each remote-looked-up shard."""
        out = []
        for s in self.shards[node]:
            if self.kind[node] in ("row_wise", "table_row_wise"):
                keep = (ids >= s.row_start) & (ids < s.row_end)
                bag_of = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
                out.append(
                    (s, ids[keep] - s.row_start, torch.bincount(bag_of[keep], minlength=lengths.numel()))
                )
            else:
                out.append((s, ids, lengths))
        return out

    def _lookup(
        self, ids: Mapping[str, torch.Tensor], lengths: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        world = self.world
        sends: list[list[tuple[str, Shard, torch.Tensor, torch.Tensor]]] = [[] for _ in range(world)]
        pooled: dict[str, torch.Tensor] = {}
        for lk in self.lookups:
            if self.kind[lk.node] == "data_parallel":
                local = self.local[(lk.node, self.rank)]
                pooled[lk.node] = local.pool(ids[lk.node], lengths[lk.node], _mode(lk.mode))
                continue
            for s, seg_ids, seg_len in self._segments(lk.node, ids[lk.node], lengths[lk.node]):
                sends[s.device].append((lk.node, s, seg_ids, seg_len))
        # all-to-all 1: segment sizes (the receiver knows which segments come, not their sizes)
        header_in = [
            torch.tensor([x for _, _, i, n in seg for x in (i.numel(), n.numel())], dtype=torch.int64)
            for seg in sends
        ]
        header_out = [torch.empty(2 * len(self.incoming), dtype=torch.int64) for _ in range(world)]
        _all_to_all(header_out, header_in, self.group)
        # all-to-all 2: ids and bag lengths
        payload_in = [
            torch.cat([torch.cat([i, n]) for _, _, i, n in seg]) if seg else torch.empty(0, dtype=torch.int64)
            for seg in sends
        ]
        payload_out = [torch.empty(int(h.sum()), dtype=torch.int64) for h in header_out]
        _all_to_all(payload_out, payload_in, self.group)
        # pool on this rank's shards, for every source
        results_in = []
        for src in range(world):
            sizes = header_out[src].tolist()
            chunks, at = [], 0
            for j, (node, s) in enumerate(self.incoming):
                n_ids, n_bags = sizes[2 * j], sizes[2 * j + 1]
                seg_ids = payload_out[src][at : at + n_ids]
                seg_len = payload_out[src][at + n_ids : at + n_ids + n_bags]
                at += n_ids + n_bags
                mode = _mode(self.by_node[node].mode)
                if self.kind[node] in ("row_wise", "table_row_wise") or mode == 1:
                    mode = 0  # partial sums; a mean is divided by the full bag length at the source
                chunks.append(self.local[(node, s.index)].pool(seg_ids, seg_len, mode).reshape(-1))
            results_in.append(torch.cat(chunks) if chunks else torch.empty(0))
        # all-to-all 3: pooled rows back to the ranks that asked
        results_out = [
            torch.empty(sum(n.numel() * (s.col_end - s.col_start) for _, s, _, n in seg)) for seg in sends
        ]
        _all_to_all(results_out, results_in, self.group)
        parts: dict[str, list[tuple[Shard, torch.Tensor]]] = {}
        for dst, seg in enumerate(sends):
            at = 0
            for node, s, _, n in seg:
                size = n.numel() * (s.col_end - s.col_start)
                parts.setdefault(node, []).append(
                    (s, results_out[dst][at : at + size].reshape(n.numel(), s.col_end - s.col_start))
                )
                at += size
        for lk in self.lookups:
            if lk.node in pooled:
                continue
            pieces = sorted(parts[lk.node], key=lambda x: x[0].index)
            if self.kind[lk.node] == "column_wise":
                value = torch.cat([p for _, p in pieces], dim=1)
            elif self.kind[lk.node] == "table_wise":
                value = pieces[0][1]
            else:
                value = torch.stack([p for _, p in pieces]).sum(0)
            if lk.mode == "mean":
                value = value / lengths[lk.node].clamp(min=1).unsqueeze(1).to(value.dtype)
            pooled[lk.node] = value
        return pooled


def _mode(name: str) -> int:
    return {"sum": 0, "mean": 1, "max": 2}[name]


def _copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    new = torch.fx.Graph()
    value_map: dict[torch.fx.Node, torch.fx.Node] = {}
    out = new.graph_copy(graph, value_map)
    new.output(out)
    return new


COMM_SECONDS = [0.0]  # wall time this process spent in all-to-alls (a server reports its share)


def _all_to_all(outputs: list[torch.Tensor], inputs: list[torch.Tensor], group: Any) -> None:
    """Variable-size all-to-all as one ``all_to_all_single`` (gloo and NCCL both support it)."""
    t0 = time.perf_counter()
    send = torch.cat([t.reshape(-1) for t in inputs]) if inputs else torch.empty(0)
    recv = torch.empty(sum(t.numel() for t in outputs), dtype=send.dtype)
    dist.all_to_all_single(
        recv,
        send,
        output_split_sizes=[t.numel() for t in outputs],
        input_split_sizes=[t.numel() for t in inputs],
        group=group,
    )
    COMM_SECONDS[0] += time.perf_counter() - t0
    at = 0
    for t in outputs:
        t.copy_(recv[at : at + t.numel()].reshape(t.shape))
        at += t.numel()


# ---- launching ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(
    rank: int, world: int, port: int, backend: str, fn: Callable[..., Any], args: Sequence[Any]
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def launch(fn: Callable[..., Any], world_size: int, *args: Any, backend: str | None = None) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` local processes with a process group
    initialized (gloo); torchrun does the same across hosts.

    ``fn`` and ``args`` must be picklable (a module-level function). The runtime exchanges CPU
    tensors; NCCL would need every rank's tensors on its GPU, which it does not do yet."""
    if world_size < 1:
        raise ShardingError(f"world_size must be >= 1, got {world_size}")
    backend = backend or "gloo"
    torch.multiprocessing.spawn(
        _worker, args=(world_size, _free_port(), backend, fn, args), nprocs=world_size
    )
