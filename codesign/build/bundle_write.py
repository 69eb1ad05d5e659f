"""The single-variant bundle format, and writing it (reading and verifying is ``codesign.build.bundle``).

Kept apart from reading so that ``Variant.save`` can write a bundle without importing the reader, which
builds Variants (no import cycle).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.utils._pytree as pytree

from codesign.errors import BundleError
from codesign.ir.request import flatten_inputs
from codesign.version import __version__

if TYPE_CHECKING:
    from codesign.backends.base import Backend
    from codesign.hardware.target import Target
    from codesign.ir.request import RequestBatch, RequestSpec
    from codesign.sharding.types import Plan

__all__ = [
    "ABI_BOUND_BACKENDS",
    "BUNDLE_FORMAT",
    "MANIFEST",
    "MULTI_FORMAT",
    "PLAN",
    "PROGRAM",
    "REFERENCE",
    "SAFE_NAME",
    "SCHEMA_VERSION",
    "SavedVariant",
    "empty_folder",
    "file_sha256",
    "write_bundle",
]

BUNDLE_FORMAT = "codesign-bundle"
MULTI_FORMAT = "codesign-multi-bundle"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PROGRAM = "program.pt2"
REFERENCE = "reference.pt"
PLAN = "plan.json"
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
# Backends whose artifacts contain machine code built against one torch ABI.
ABI_BOUND_BACKENDS = {"aoti"}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def empty_folder(directory: Path, overwrite: bool) -> None:
    """Create ``directory``, or empty it when it holds a bundle and ``overwrite`` is set."""
    if directory.exists() and any(directory.iterdir()):
        if not overwrite:
            raise BundleError(
                f"{directory} exists and is not empty", fix="pass overwrite=True or pick a new folder"
            )
        if not (directory / MANIFEST).is_file():
            raise BundleError(f"refusing to overwrite {directory}: it is not a codesign bundle")
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)


class SavedVariant(Protocol):
    """What a bundle records of a variant (``codesign.build.variant.Variant`` has all of it).

    Spelled out here so that writing a bundle does not import the module that defines Variants, which
    itself writes bundles (``Variant.save``).
    """

    name: str
    spec: RequestSpec
    target: Target
    backend: Backend[Any]
    exported: torch.export.ExportedProgram
    artifacts: dict[str, Path]
    passes: list[dict[str, Any]]
    reference_inputs: RequestBatch
    reference_outputs: list[torch.Tensor]
    cost: dict[str, Any]
    report: dict[str, Any] | None
    cache_key: str
    takes_request_offsets: bool
    micro_batch: int | None
    plan: Plan | None
    id_bounds: dict[str, dict[str, int]]


def write_bundle(variant: SavedVariant, directory: Path, *, overwrite: bool = False) -> Path:
    """Write ``variant`` to ``directory`` (see module docstring for the layout)."""
    empty_folder(directory, overwrite)
    torch.export.save(variant.exported, str(directory / PROGRAM))
    for name, src in variant.artifacts.items():
        shutil.copyfile(src, directory / name)
    if variant.plan is not None:
        (directory / PLAN).write_text(variant.plan.to_json())
    ref = variant.reference_inputs
    leaves = {p: t for p, t in flatten_inputs(ref.inputs) if isinstance(t, torch.Tensor)}
    torch.save(
        {"inputs": leaves, "offsets": ref.offsets, "outputs": list(variant.reference_outputs)},
        directory / REFERENCE,
    )
    _, treespec = pytree.tree_flatten(dict(ref.inputs))
    files = {
        p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size}
        for p in sorted(directory.iterdir())
        if p.name != MANIFEST
    }
    manifest = {
        "format": BUNDLE_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "created_unix": int(time.time()),
        "versions": {
            "codesign": __version__,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
        "name": variant.name,
        "target": variant.target.to_dict(),
        "backend": {
            "name": variant.backend.name,
            "uuid": variant.backend.uuid(),
            "config": variant.backend.config.to_dict(),
        },
        "passes": variant.passes,
        "spec": variant.spec.to_dict(),
        "inputs": {"paths": list(leaves), "treespec": pytree.treespec_dumps(treespec)},
        "cost": variant.cost,
        "compile_report": variant.report,
        "cache_key": variant.cache_key,
        "takes_request_offsets": variant.takes_request_offsets,
        "micro_batch": variant.micro_batch,
        "id_bounds": variant.id_bounds,
        "files": files,
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    return directory
