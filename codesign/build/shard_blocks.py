"""Embedding tables stored by shard, so that a rank of a sharded server reads its own rows alone.

A bundle whose variant carries a sharding plan keeps its planned tables out of ``program.pt2``
(there each becomes a one-element placeholder broadcast to the table's shape) and writes them to
``tables.bin``: one contiguous block per distinct piece of the plan (a row range, a column range,
or the whole table for table-wise and replicated tables), in the program's own dtype, each with its
offset, size and sha256 in the manifest (``sharded_tables``). A rank seeks to its blocks and checks
each block's hash on the bytes it read before using them; a whole-model load reads every block and
puts the tables back together. Quantized tables (``selective_fp8``) store their row scales the same
way, cut by the same row ranges.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from codesign.errors import BundleError

if TYPE_CHECKING:
    from codesign.sharding.types import Plan

__all__ = [
    "TABLES",
    "put_back_tables",
    "read_block",
    "read_table",
    "stored_tables",
    "tables_without_weights",
    "write_tables",
]

TABLES = "tables.bin"
_DTYPES = {
    str(d): d
    for d in (torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.float8_e4m3fn)
}
Block = tuple[int, int, int, int]  # row_start, row_end, col_start, col_end


def _weights(exported: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    return {**exported.state_dict, **exported.constants}  # type: ignore[dict-item]


def stored_tables(exported: torch.export.ExportedProgram, plan: Plan) -> dict[str, list[Block]]:
    """Tensor name -> the blocks it is stored in: each planned table by its shards' pieces, and each
    quantized table's row scales by the same row ranges."""
    from codesign.sharding.runtime import find_lookups

    weights = _weights(exported)
    scales = {lk.table: lk.scale for lk in find_lookups(exported.module())[0] if lk.scale}
    out: dict[str, list[Block]] = {}
    for spec in plan.tables:
        if spec.name not in weights:
            raise BundleError(f"the sharding plan names table {spec.name!r}, which the program does not hold")
        pieces = sorted({(s.row_start, s.row_end, s.col_start, s.col_end) for s in plan.shards_of(spec.name)})
        out[spec.name] = pieces
        scale = scales.get(spec.name)
        if scale is not None and scale in weights:
            cols = weights[scale].shape[1] if weights[scale].dim() == 2 else 1
            out[scale] = sorted({(r0, r1, 0, cols) for r0, r1, _, _ in pieces})
    return out


def _block(t: torch.Tensor, b: Block) -> torch.Tensor:
    return (t[b[0] : b[1], b[2] : b[3]] if t.dim() == 2 else t[b[0] : b[1]]).contiguous()


def write_tables(exported: torch.export.ExportedProgram, plan: Plan, path: Path) -> dict[str, Any]:
    """Write the planned tables' blocks to ``path``; the manifest record that finds and checks them."""
    weights = _weights(exported)
    record: dict[str, Any] = {}
    at = 0
    with path.open("wb") as f:
        for name, blocks in stored_tables(exported, plan).items():
            t = weights[name].detach()
            if str(t.dtype) not in _DTYPES:
                raise BundleError(f"table {name!r} has dtype {t.dtype}, which sharded bundles do not store")
            entries = []
            for b in blocks:
                raw = _block(t, b).view(torch.uint8).numpy().tobytes() if t.numel() else b""
                f.write(raw)
                entries.append(
                    {
                        "block": list(b),
                        "offset": at,
                        "bytes": len(raw),
                        "sha256": hashlib.sha256(raw).hexdigest(),
                    }
                )
                at += len(raw)
            record[name] = {"dtype": str(t.dtype), "shape": list(t.shape), "blocks": entries}
    return record


@contextlib.contextmanager
def tables_without_weights(exported: torch.export.ExportedProgram, names: list[str]) -> Iterator[None]:
    """While inside, the named weights of ``exported`` are one-element placeholders of the same shape
    and dtype (what ``torch.export.save`` then writes: a few bytes each); restored on exit."""
    saved: dict[tuple[str, str], torch.Tensor] = {}
    for where in ("state_dict", "constants"):
        table = getattr(exported, where)
        for name in names:
            if name in table:
                t = table[name]
                saved[(where, name)] = t
                stub = torch.zeros((), dtype=t.dtype).expand(t.shape)
                table[name] = (
                    torch.nn.Parameter(stub, requires_grad=False)
                    if isinstance(t, torch.nn.Parameter)
                    else stub
                )
    try:
        with warnings.catch_warnings():  # torch warns that the placeholder is not a "complete tensor"
            warnings.filterwarnings("ignore", message="No complete tensor found")
            yield
    finally:
        for (where, name), t in saved.items():
            getattr(exported, where)[name] = t


def _entry(record: Mapping[str, Any], name: str) -> tuple[torch.dtype, list[int], list[dict[str, Any]]]:
    try:
        entry = record[name]
        dtype, shape, blocks = (
            _DTYPES[entry["dtype"]],
            [int(x) for x in entry["shape"]],
            list(entry["blocks"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"the manifest's sharded_tables record for {name!r} is malformed ({exc})") from exc
    return dtype, shape, blocks


def read_block(path: Path, record: Mapping[str, Any], name: str, block: Block) -> torch.Tensor:
    """One stored block of tensor ``name`` (exactly as the plan cut it), read alone and checked by its sha256."""
    dtype, shape, blocks = _entry(record, name)
    meta = next((b for b in blocks if tuple(b.get("block", ())) == tuple(block)), None)
    if meta is None:
        raise BundleError(
            f"{TABLES} holds no block {list(block)} of {name!r} (the plan and the stored tables disagree)",
            fix="recompile the bundle; never edit bundle files by hand",
        )
    r0, r1, c0, c1 = block
    size = (r1 - r0) * ((c1 - c0) if len(shape) == 2 else 1) * torch.empty((), dtype=dtype).element_size()
    if not all(isinstance(meta.get(k), t) for k, t in (("bytes", int), ("offset", int), ("sha256", str))):
        raise BundleError(f"{TABLES}: the record of block {list(block)} of {name!r} is malformed")
    if meta["bytes"] != size:
        raise BundleError(
            f"{TABLES}: block {list(block)} of {name!r} records {meta['bytes']} bytes, not {size}"
        )
    raw = bytearray(size)  # read into the tensor's own buffer: a block is never held twice
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb", buffering=0) as f:
        f.seek(int(meta["offset"]))
        got = 0
        view = memoryview(raw)
        while got < size:
            n = f.readinto(view[got:])
            if not n:
                break
            got += n
    if got != size or hashlib.sha256(raw).hexdigest() != meta["sha256"]:
        raise BundleError(
            f"{TABLES}: block {list(block)} of {name!r} does not match its sha256 in the manifest "
            "(truncated or tampered with)",
            fix="recompile the bundle; never edit bundle files by hand",
        )
    flat = torch.frombuffer(raw, dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
    rows = flat.view(dtype)
    return rows.reshape(r1 - r0, c1 - c0) if len(shape) == 2 else rows.reshape(r1 - r0, *shape[1:])


def read_table(path: Path, record: Mapping[str, Any], name: str) -> torch.Tensor:
    """The whole tensor ``name``, put back together from its blocks (a single-process load)."""
    dtype, shape, blocks = _entry(record, name)
    out = torch.empty(shape, dtype=dtype)
    covered = torch.zeros(shape[:2] if len(shape) == 2 else shape[:1], dtype=torch.bool)
    for meta in blocks:
        b = tuple(int(x) for x in meta["block"])
        piece = read_block(path, record, name, b)  # type: ignore[arg-type]
        if len(shape) == 2:
            out[b[0] : b[1], b[2] : b[3]] = piece
            covered[b[0] : b[1], b[2] : b[3]] = True
        else:
            out[b[0] : b[1]] = piece
            covered[b[0] : b[1]] = True
    if not bool(covered.all()):
        raise BundleError(f"{TABLES}: the blocks of {name!r} do not cover its {list(shape)} elements")
    return out


def put_back_tables(exported: torch.export.ExportedProgram, path: Path, record: dict[str, Any]) -> None:
    """Replace the program's table placeholders with the tables read from their blocks."""
    for name in record:
        where = exported.state_dict if name in exported.state_dict else exported.constants
        if name not in where:
            raise BundleError(f"{TABLES} stores {name!r}, which the program does not hold")
        old, table = where[name], read_table(path, record, name)
        if tuple(old.shape) != tuple(table.shape) or old.dtype != table.dtype:
            raise BundleError(
                f"{TABLES}: {name!r} is {list(table.shape)} {table.dtype}, the program's is "
                f"{list(old.shape)} {old.dtype}"
            )
        where[name] = (
            torch.nn.Parameter(table, requires_grad=False) if isinstance(old, torch.nn.Parameter) else table
        )
