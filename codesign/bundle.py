"""Deployable bundles: write, read and verify.

Layout::

    manifest.json        format, schema version, versions, target, backend, passes + knobs, cost
                         figures, cache key, and the sha256 + size of every other file
    program.pt2          the exported program (graph + weights; torch.export archive, no pickles)
    reference.pt         reference requests and outputs (tensors only, loaded weights-only)
    aoti_package.pt2     (aoti backend) AOTInductor package, loaded only after its sha256 matches
    plan.json            (multi-device targets) the embedding sharding plan

A bundle is data: configs load through the allow-list in ``codesign.config``; the program archive
is checked to hold plain tensors only before torch reads it; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

import codesign
from codesign.backends import backend_names, get_backend
from codesign.config import config_from_dict
from codesign.errors import BundleError, CodesignError
from codesign.request import RequestBatch, RequestSpec, flatten_inputs
from codesign.sharding.types import Plan
from codesign.target import Target
from codesign.variant import Variant

__all__ = ["BUNDLE_FORMAT", "SCHEMA_VERSION", "load", "read_manifest", "write_bundle"]

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "codesign-bundle"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PROGRAM = "program.pt2"
REFERENCE = "reference.pt"
PLAN = "plan.json"
# Backends whose artifacts contain machine code built against one torch ABI.
ABI_BOUND_BACKENDS = {"aoti"}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_bundle(variant: Variant, directory: Path, *, overwrite: bool = False) -> Path:
    """Write ``variant`` to ``directory`` (see module docstring for the layout)."""
    if directory.exists() and any(directory.iterdir()):
        if not overwrite:
            raise BundleError(
                f"{directory} exists and is not empty", fix="pass overwrite=True or pick a new folder"
            )
        if not (directory / MANIFEST).is_file():
            raise BundleError(f"refusing to overwrite {directory}: it is not a codesign bundle")
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
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
        p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size}
        for p in sorted(directory.iterdir())
        if p.name != MANIFEST
    }
    manifest = {
        "format": BUNDLE_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "created_unix": int(time.time()),
        "versions": {
            "codesign": codesign.__version__,
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
        "files": files,
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    return directory


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Parse and check a bundle's manifest (format, schema version, required keys)."""
    d = Path(directory)
    if not d.is_dir():
        raise BundleError(f"bundle folder {d} does not exist")
    path = d / MANIFEST
    if not path.is_file():
        raise BundleError(
            f"{d} is not a codesign bundle: it has no {MANIFEST}",
            fix="point at the folder written by variant.save() / codesign compile --out",
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON (truncated or edited?): {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(
            f"{d} is a foreign bundle: manifest format is {manifest.get('format')!r}"
            if isinstance(manifest, dict)
            else f"{path} is not a manifest object"
        )
    version = manifest.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION or version < 1:
        raise BundleError(
            f"bundle schema version {version!r} is not supported (this codesign reads 1..{SCHEMA_VERSION})",
            fix="upgrade codesign, or recompile the bundle with this version",
        )
    missing = {"versions", "target", "backend", "passes", "spec", "inputs", "files", "name"} - manifest.keys()
    if missing:
        raise BundleError(f"{path} lacks required keys {sorted(missing)} (truncated or hand-edited)")
    return manifest


def _verify_files(d: Path, manifest: dict[str, Any]) -> dict[str, Path]:
    files = manifest["files"]
    if not isinstance(files, dict):
        raise BundleError("manifest 'files' is not a mapping")
    present = {p.name for p in d.iterdir()} - {MANIFEST}
    extra = present - files.keys()
    if extra:
        raise BundleError(
            f"bundle {d} holds files the manifest does not list: {sorted(extra)}",
            fix="a bundle is sealed at write time; remove the extra files or recompile",
        )
    out: dict[str, Path] = {}
    for name, meta in files.items():
        if "/" in name or "\\" in name or name.startswith("."):
            raise BundleError(f"manifest lists an unsafe file name {name!r}")
        p = d / name
        if not p.is_file():
            raise BundleError(f"bundle {d} is missing {name}", fix="copy the whole bundle folder")
        size = p.stat().st_size
        if size != meta.get("bytes"):
            raise BundleError(
                f"{name} is {size} bytes but the manifest says {meta.get('bytes')}: "
                "the file is truncated or was replaced"
            )
        if _sha256(p) != meta.get("sha256"):
            raise BundleError(
                f"{name} does not match its sha256 in the manifest: the bundle was tampered with",
                fix="recompile the bundle from the model; never edit bundle files by hand",
            )
        out[name] = p
    return out


def _check_program_archive(path: Path) -> None:
    """Refuse a program archive that would make torch unpickle anything."""
    try:
        z = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise BundleError(f"{path.name} is not a torch.export archive") from exc
    with z:
        for name in z.namelist():
            base = name.rsplit("/", 1)[-1]
            if base.startswith(("custom_obj", "opaque_obj")):
                raise BundleError(
                    f"{path.name} holds a pickled object ({name}); codesign bundles carry tensors only"
                )
            if name.endswith("_config.json"):
                config = json.loads(z.read(name)).get("config", {})
                if any(isinstance(v, dict) and v.get("use_pickle") for v in config.values()):
                    raise BundleError(f"{path.name} stores pickled tensors ({name}); refusing to load")
            if "/sample_inputs/" in name:
                try:
                    torch.load(io.BytesIO(z.read(name)), weights_only=True)
                except Exception as exc:
                    raise BundleError(f"{path.name}: sample inputs are not plain tensors ({exc})") from exc


def load(directory: str | Path) -> Variant:
    """Verify and load a bundle: checksums, versions, allow-listed configs; then build the runner.

    >>> variant = codesign.load("out/dlrm-bundle"); variant.score(batch)
    """
    d = Path(directory)
    manifest = read_manifest(d)
    files = _verify_files(d, manifest)
    versions = manifest["versions"]
    backend_rec = manifest["backend"]
    if backend_rec.get("name") not in backend_names():
        raise BundleError(
            f"bundle backend {backend_rec.get('name')!r} is unknown", fix=f"known: {backend_names()}"
        )
    built_with = str(versions.get("torch", "?"))
    if built_with != torch.__version__:
        if backend_rec["name"] in ABI_BOUND_BACKENDS:
            raise BundleError(
                f"bundle was built with torch {built_with}; this is torch {torch.__version__} "
                f"and '{backend_rec['name']}' artifacts are tied to the torch build",
                fix=f"install torch=={built_with} or recompile the bundle",
            )
        log.warning("bundle built with torch %s, loading with %s", built_with, torch.__version__)
    if PROGRAM not in files or REFERENCE not in files:
        raise BundleError(f"bundle lacks {PROGRAM} or {REFERENCE}")
    try:
        backend = get_backend(backend_rec["name"]).__class__(config_from_dict(backend_rec["config"]))
        spec = config_from_dict(manifest["spec"])
        target = Target.from_dict(manifest["target"])
    except CodesignError as exc:
        raise BundleError(f"bundle manifest has an invalid record: {exc.message}") from exc
    if not isinstance(spec, RequestSpec):
        raise BundleError("bundle spec is not a RequestSpec record")
    _check_program_archive(files[PROGRAM])
    exported = torch.export.load(str(files[PROGRAM]))
    try:
        ref = torch.load(files[REFERENCE], weights_only=True)
        treespec = pytree.treespec_loads(manifest["inputs"]["treespec"])
        leaves = [ref["inputs"][p] for p in manifest["inputs"]["paths"]]
        inputs = pytree.tree_unflatten(leaves, treespec)
    except Exception as exc:
        raise BundleError(f"bundle reference data is unreadable: {type(exc).__name__}: {exc}") from exc
    plan = None
    if PLAN in files:
        try:
            plan = Plan.from_json(files[PLAN].read_text())
        except CodesignError as exc:
            raise BundleError(f"bundle {PLAN} is invalid: {exc.message}") from exc
    artifacts = {name: p for name, p in files.items() if name not in (PROGRAM, REFERENCE, PLAN)}
    runner = backend.load(exported, artifacts)
    return Variant(
        name=str(manifest["name"]),
        spec=spec,
        target=target,
        backend=backend,
        runner=runner,
        exported=exported,
        artifacts=artifacts,
        passes=list(manifest["passes"]),
        reference_inputs=RequestBatch(inputs=inputs, offsets=ref["offsets"]),
        reference_outputs=list(ref["outputs"]),
        cost=dict(manifest.get("cost") or {}),
        report=manifest.get("compile_report"),
        program=None,
        cache_key=str(manifest.get("cache_key", "")),
        takes_request_offsets=bool(manifest.get("takes_request_offsets", False)),
        micro_batch=_micro_batch(manifest.get("micro_batch")),
        plan=plan,
    )


def _micro_batch(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BundleError(f"bundle manifest micro_batch {value!r} is not a positive integer or null")
    return value
