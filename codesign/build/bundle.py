"""Deployable bundles: write, read and verify.

Layout::

    manifest.json        format, schema version, versions, target, backend, passes + knobs, cost
                         figures, cache key, and the sha256 + size of every other file
    program.pt2          the exported program (graph + weights; torch.export archive, no pickles)
    reference.pt         reference requests and outputs (tensors only, loaded weights-only)
    aoti_package.pt2     (aoti backend) AOTInductor package, loaded only after its sha256 matches
    plan.json            (multi-device targets) the embedding sharding plan

Several such bundles behind a router policy form a deployment bundle (``codesign.serving.deployment``,
format ``codesign-multi-bundle``). A bundle is data: configs load through the allow-list in ``codesign.config``; the program archive
is checked to hold plain tensors only before torch reads it; nothing is unpickled.

Loading ends by scoring the stored reference batch and comparing with the stored reference outputs
within the manifest's tolerance, so a bundle whose files were edited and resealed, or that does not
reproduce its scores here, is refused. ``python -m codesign.build.bundle DIR...`` makes that check in
its own interpreter (what ``Variant.save`` runs before it returns) and prints one JSON line per bundle.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
import weakref
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.utils._pytree as pytree

from codesign.backends import backend_class, backend_names
from codesign.build.bundle_write import (
    ABI_BOUND_BACKENDS,
    BUNDLE_FORMAT,
    CHECK_MARKER,
    MANIFEST,
    MULTI_FORMAT,
    PLAN,
    PROGRAM,
    REFERENCE,
    SCHEMA_VERSION,
    compare_reference,
)
from codesign.build.shard_blocks import TABLES, put_back_tables
from codesign.build.signing import SIGNATURE, Trust, check_native_trust
from codesign.build.variant import Variant
from codesign.config import config_from_dict
from codesign.errors import BundleError, CodesignError
from codesign.ir.program import call_inputs
from codesign.ir.request import RequestBatch, RequestSpec
from codesign.numerics import Tolerance

__all__ = ["check_reference_outputs", "load", "main", "read_manifest"]

log = logging.getLogger(__name__)


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Parse and check a bundle's manifest (format, schema version, required keys)."""
    return _read_manifest(Path(directory))[0]


def _read_manifest(d: Path) -> tuple[dict[str, Any], bytes]:
    """The checked manifest and the bytes it was parsed from (read once: what is verified is what is used)."""
    if not d.is_dir():
        raise BundleError(f"bundle folder {d} does not exist")
    path = d / MANIFEST
    if not path.is_file():
        raise BundleError(
            f"{d} is not a codesign bundle: it has no {MANIFEST}",
            fix="point at the folder written by variant.save() / codesign compile --out",
        )
    if path.is_symlink():
        raise BundleError(f"{path} is a symbolic link; a bundle holds its own files")
    with path.open("rb") as f:
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path} is over the {MAX_MANIFEST_BYTES} byte limit")
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        detail = exc if not isinstance(exc, RecursionError) else "nested too deep"
        raise BundleError(f"{path} is not valid JSON (truncated or edited?): {detail}") from exc
    if isinstance(manifest, dict) and manifest.get("format") == MULTI_FORMAT:
        raise BundleError(
            f"{d} is a multi-variant bundle (variants {[v.get('name') for v in manifest.get('variants', [])]})",
            fix="load it with codesign.load_bundle(path), or load one variant from its variants/<name> folder",
        )
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
    return manifest, raw


def _private_copy(
    d: Path, manifest: dict[str, Any], raw_manifest: bytes, by_block: frozenset[str] = frozenset()
) -> tuple[Path, dict[str, Path]]:
    """Copy the bundle's files into a private folder, hashing each as it is copied, and return the copy.

    Everything after this reads the copy: a file swapped in the bundle folder after its check (an
    archive, a shared library, the manifest) cannot reach the loader. The copy lives as long as the
    process (or the variant, see ``load``). Files in ``by_block`` (a sharded rank's ``tables.bin``)
    are not copied: the caller reads parts of them and checks each part's own sha256 on the bytes read.
    """
    files = manifest["files"]
    if not isinstance(files, dict) or not all(isinstance(m, dict) for m in files.values()):
        raise BundleError("manifest 'files' is not a mapping of name -> {sha256, bytes}")
    present = {p.name for p in d.iterdir()} - {MANIFEST, SIGNATURE}
    extra = present - files.keys()
    if extra:
        raise BundleError(
            f"bundle {d} holds files the manifest does not list: {sorted(extra)}",
            fix="a bundle is sealed at write time; remove the extra files or recompile",
        )
    copy = Path(tempfile.mkdtemp(prefix="codesign-bundle-"))  # mode 0700: this user's alone
    atexit.register(shutil.rmtree, copy, True)
    (copy / MANIFEST).write_bytes(raw_manifest)
    signature = d / SIGNATURE
    if signature.exists():
        if signature.is_symlink() or not signature.is_file() or signature.stat().st_size > 1 << 16:
            raise BundleError(f"{signature} is not a signature file (a link, a folder or over 64 KiB)")
        (copy / SIGNATURE).write_bytes(signature.read_bytes())
    out: dict[str, Path] = {}
    for name, meta in files.items():
        if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith(".") or not name:
            raise BundleError(f"manifest lists an unsafe file name {name!r}")
        p = d / name
        if (
            p.is_symlink()
        ):  # a link can point anywhere: the checksum would vouch for a file outside the bundle
            raise BundleError(
                f"bundle {d}: {name} is a symbolic link ({p.readlink()}); a bundle holds its own files",
                fix="copy the bundle with its files (cp -rL), not links to them",
            )
        if not p.is_file():
            raise BundleError(f"bundle {d} is missing {name}", fix="copy the whole bundle folder")
        if name in by_block:
            if p.stat().st_size != meta.get("bytes"):
                raise BundleError(
                    f"{name} is {p.stat().st_size} bytes but the manifest says {meta.get('bytes')}: "
                    "the file is truncated or was replaced"
                )
            out[name] = p
            continue
        h, size = hashlib.sha256(), 0
        try:
            fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError as exc:
            raise BundleError(f"bundle {d}: cannot open {name}: {exc.strerror}") from exc
        with os.fdopen(fd, "rb") as src, (copy / name).open("wb") as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                h.update(chunk)
                size += len(chunk)
                dst.write(chunk)
        if size != meta.get("bytes"):
            raise BundleError(
                f"{name} is {size} bytes but the manifest says {meta.get('bytes')}: "
                "the file is truncated or was replaced"
            )
        if h.hexdigest() != meta.get("sha256"):
            raise BundleError(
                f"{name} does not match its sha256 in the manifest: the bundle was tampered with",
                fix="recompile the bundle from the model; never edit bundle files by hand",
            )
        out[name] = copy / name
    return copy, out


MAX_MANIFEST_BYTES = 64 << 20
# What torch.export.save writes into program.pt2 (under its one top folder), and nothing else: a name
# torch would unpickle or that this list does not know is refused before torch reads the archive.
_PROGRAM_ENTRY = re.compile(
    r"[A-Za-z0-9_.-]+/("
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|"
    r"models/[A-Za-z0-9_.-]+\.json|"
    r"data/(weights|constants)/[A-Za-z0-9_]+|"
    r"data/(weights|constants)/[A-Za-z0-9_.-]+_config\.json|"
    r"data/sample_inputs/[A-Za-z0-9_.-]+\.pt"
    r")"
)


def _check_stored_entries(path: Path) -> zipfile.ZipFile:
    """Open a torch zip archive whose entries are all stored uncompressed and fit in the file: no entry
    can inflate past what is on disk (a 1 GB entry deflated to a few KB is refused before it is read)."""
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise BundleError(f"{path.name} is not a torch archive: {exc}") from exc
    total = 0
    for info in z.infolist():
        total += info.file_size
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
            z.close()
            raise BundleError(
                f"{path.name}: entry {info.filename} is compressed ({info.compress_size} -> {info.file_size} "
                "bytes); torch writes archives uncompressed, so this one was made by something else",
                fix="recompile the bundle; never edit bundle files by hand",
            )
    if total > path.stat().st_size:
        z.close()
        raise BundleError(f"{path.name}: its entries claim {total} bytes, more than the file holds")
    return z


def _check_program_archive(path: Path) -> None:
    """Refuse a program archive that would make torch unpickle anything, or that calls unknown ops."""
    z = _check_stored_entries(path)
    with z:
        for name in z.namelist():
            base = name.rsplit("/", 1)[-1]
            if ("/data/weights/" in name or "/data/constants/" in name) and base.endswith(".pt"):
                # torch.export.load reads a legacy weights/constants file with torch.load(weights_only=False)
                raise BundleError(
                    f"{path.name} holds a legacy pickled weights file ({name}); codesign bundles carry tensors only",
                    fix="recompile the bundle with this codesign (torch.export.save writes weights as tensors)",
                )
            if base.startswith(("custom_obj", "opaque_obj")):
                raise BundleError(
                    f"{path.name} holds a pickled object ({name}); codesign bundles carry tensors only"
                )
            if not _PROGRAM_ENTRY.fullmatch(name) or ".." in name.split("/"):
                raise BundleError(
                    f"{path.name} holds an entry torch.export does not write: {name!r}",
                    fix="recompile the bundle; never edit bundle files by hand",
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
            if "/models/" in name and name.endswith(".json"):
                _check_operators(path.name, json.loads(z.read(name)))


@contextlib.contextmanager
def _malformed(d: Path) -> Iterator[None]:
    """A manifest record of the wrong shape (a list for an object, a number for a name, nesting too
    deep) is a BundleError naming the manifest, not a raw error from deep inside the loader."""
    try:
        yield
    except (KeyError, TypeError, AttributeError, ValueError, IndexError, RecursionError) as exc:
        raise BundleError(
            f"{d / MANIFEST} is malformed (truncated or hand-edited): {type(exc).__name__}: {str(exc)[:200]}",
            fix="recompile the bundle; never edit bundle files by hand",
        ) from exc


def _check_operators(archive: str, model: Any) -> None:
    """Name the operators a serialized program calls that this process has not registered.

    torch.export.load only logs which operator it could not resolve and raises a generic error; a
    bundle that needs an op registered by the model's own module fails here with that op's name.
    """
    targets: set[str] = set()
    stack = [model]
    while stack:  # node targets at any depth (subgraphs of higher-order ops included)
        obj = stack.pop()
        if isinstance(obj, dict):
            target = obj.get("target")
            if isinstance(target, str) and target.startswith("torch.ops."):
                targets.add(target)
            stack.extend(obj.values())
        elif isinstance(obj, list):
            stack.extend(obj)
    missing = sorted(t for t in targets if not _resolves(t))
    if missing:
        raise BundleError(
            f"{archive} calls operators this process has not registered: {missing}",
            fix="codesign.load registers codesign's own ops; import the module that defines the others "
            "(torch.library) before loading, or compile the model without them",
        )


def _resolves(target: str) -> bool:
    obj: Any = torch.ops
    try:
        for part in target.split(".")[2:]:
            obj = getattr(obj, part)
    except (AttributeError, RuntimeError):
        return False
    return True


def load(
    directory: str | Path,
    *,
    check_reference: bool = True,
    trusted_keys: Sequence[str | Path] = (),
    allow_unsigned_native: bool = False,
    manifest_sha256: str | None = None,
    planned_tables: Literal["load", "leave"] = "load",
) -> Variant:
    """Verify and load a bundle: checksums, versions, allow-listed configs; build the runner; score.

    A bundle with native code (AOTInductor, TensorRT) loads only when a key in ``trusted_keys`` (PEM
    public keys; also ``$CODESIGN_TRUSTED_KEYS``) signed it, this process wrote it, or
    ``allow_unsigned_native`` accepts the risk (``codesign.build.signing``). ``manifest_sha256``: the
    manifest must be exactly this (a multi-variant bundle pins each variant's manifest). The files
    are checked and loaded from a private copy, so none can be swapped between its check and its use.

    With ``check_reference`` (the default) the loaded variant scores the stored reference batch and
    must match the stored reference outputs within the manifest's tolerance (BundleError otherwise):
    this catches weights edited and resealed, and a backend that does not rebuild the same program
    here. It costs one call of the model (and, for inductor, its compile); ``check_reference=False``
    skips it.

    A bundle compiled for several devices keeps its planned tables in ``tables.bin``
    (``codesign.build.shard_blocks``); they are read back into the program unless
    ``planned_tables="leave"``: then the variant holds placeholders, cannot score by itself and is
    not checked, and ``variant.sharded_tables`` tells a rank of a sharded server where its blocks are
    (``codesign.serving.sharded``).

    >>> variant = codesign.load("out/dlrm-bundle"); variant.score(batch)
    """
    # Imported here, not with the module: the custom ops a program may call (which torch.export.load
    # needs registered), the target catalogue and the sharding plan pull in the ops and analysis
    # layers; loading a bundle pays for them, importing the serving runtime does not.
    import codesign.ops  # noqa: F401
    from codesign.hardware.target import Target
    from codesign.sharding.types import Plan

    d = Path(directory)
    with _malformed(d):
        manifest, raw_manifest = _read_manifest(d)
        if manifest_sha256 is not None and hashlib.sha256(raw_manifest).hexdigest() != manifest_sha256:
            raise BundleError(f"{d / MANIFEST} does not match the sha256 its bundle records for it")
        if planned_tables not in ("load", "leave"):
            raise BundleError(f"planned_tables must be 'load' or 'leave', not {planned_tables!r}")
        sharded = manifest.get("sharded_tables")
        leave = planned_tables == "leave" and bool(sharded)
        copy, files = _private_copy(d, manifest, raw_manifest, frozenset({TABLES}) if leave else frozenset())
        versions = manifest["versions"]
        backend_rec = manifest["backend"]
        if not isinstance(versions, dict) or not isinstance(backend_rec, dict):
            raise BundleError(f"{d / MANIFEST}: 'versions' and 'backend' must be objects")
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
    # before anything is unpacked or opened: native code only from a bundle someone trusted vouches for
    others = {n: p for n, p in files.items() if n not in (PROGRAM, REFERENCE, PLAN, TABLES)}
    check_native_trust(
        copy,
        others,
        Trust.of(trusted_keys, allow_unsigned_native),
        backend_class(backend_rec["name"]).native_artifacts,
        manifest_sha=hashlib.sha256(raw_manifest).hexdigest(),
        shown=d,
    )
    if PROGRAM not in files or REFERENCE not in files:
        raise BundleError(f"bundle lacks {PROGRAM} or {REFERENCE}")
    try:
        with _malformed(d):
            backend = backend_class(backend_rec["name"])(config_from_dict(backend_rec["config"]))
            spec = config_from_dict(manifest["spec"])
            target = Target.from_dict(manifest["target"])
    except BundleError:
        raise
    except CodesignError as exc:
        raise BundleError(f"bundle manifest has an invalid record: {exc.message}") from exc
    if not isinstance(spec, RequestSpec):
        raise BundleError("bundle spec is not a RequestSpec record")
    _check_program_archive(files[PROGRAM])
    _check_stored_entries(files[REFERENCE])
    exported = torch.export.load(str(files[PROGRAM]))
    try:
        ref = torch.load(files[REFERENCE], weights_only=True)
        if not isinstance(ref, dict) or not isinstance(manifest["inputs"], dict):
            raise TypeError("the reference record or the manifest's 'inputs' is not an object")
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
    artifacts = {name: p for name, p in files.items() if name not in (PROGRAM, REFERENCE, PLAN, TABLES)}
    stored = _stored_tables(d, sharded, files, plan)
    if stored is not None and not leave:
        put_back_tables(exported, *stored)
    reference = RequestBatch(inputs=inputs, offsets=ref["offsets"])
    with _malformed(d):  # every manifest record read before the backend opens anything
        fields = _variant_records(manifest, reference)
        tolerance = manifest.get("tolerance")
        _tolerance(tolerance, Tolerance(rtol=0.0, atol=0.0))  # its shape, checked whether or not it is used
    example = call_inputs(reference, fields["takes_request_offsets"])
    runner = _runs_elsewhere(d) if leave else backend.load(exported, artifacts, example)
    variant = Variant(
        spec=spec,
        target=target,
        backend=backend,
        runner=runner,
        exported=exported,
        artifacts=artifacts,
        reference_inputs=reference,
        reference_outputs=list(ref["outputs"]),
        program=None,
        plan=plan,
        sharded_tables=stored if leave else None,
        **fields,
    )
    if check_reference and not leave:
        check_reference_outputs(variant, _tolerance(tolerance, variant.tolerance), d)
    weakref.finalize(variant, shutil.rmtree, copy, True)  # the private copy goes with the variant
    return variant


def _stored_tables(
    d: Path, record: Any, files: dict[str, Path], plan: Any
) -> tuple[Path, dict[str, Any]] | None:
    """(tables.bin, its manifest record) of a bundle that stores its planned tables by shard."""
    if record is None:
        return None
    if not isinstance(record, dict) or TABLES not in files or plan is None:
        raise BundleError(
            f"{d / MANIFEST}: 'sharded_tables' needs an object record, {TABLES} and {PLAN}",
            fix="recompile the bundle; never edit bundle files by hand",
        )
    return files[TABLES], record


def _runs_elsewhere(d: Path) -> Any:
    def runner(**inputs: Any) -> Any:
        raise BundleError(
            f"this variant of {d} was loaded without its planned tables (planned_tables='leave'): it scores "
            "only as a rank of a sharded server",
            fix="codesign serve BUNDLE --devices K, or codesign.load(BUNDLE) for a single-process variant",
        )

    return runner


def _variant_records(manifest: dict[str, Any], reference: RequestBatch) -> dict[str, Any]:
    """The Variant fields the manifest holds, each of the type it must be."""
    passes, cost, report = manifest["passes"], manifest.get("cost") or {}, manifest.get("compile_report")
    takes = manifest.get("takes_request_offsets", False)
    if not isinstance(passes, list):
        raise TypeError(f"'passes' must be a list of pass records, got {type(passes).__name__}")
    if not isinstance(cost, dict) or not (report is None or isinstance(report, dict)):
        raise TypeError("'cost' and 'compile_report' must be objects")
    if not isinstance(takes, bool) or not isinstance(manifest.get("name"), str):
        raise TypeError("'takes_request_offsets' must be true/false and 'name' a string")
    return {
        "name": manifest["name"],
        "passes": list(passes),
        "cost": dict(cost),
        "report": report,
        "cache_key": str(manifest.get("cache_key", "")),
        "takes_request_offsets": takes,
        "micro_batch": _micro_batch(manifest.get("micro_batch")),
        "id_bounds": _checked_id_bounds(_id_bounds(manifest.get("id_bounds")), reference),
        "derived_weights": _derived_weights(manifest.get("derived_weights")),
    }


def check_reference_outputs(variant: Variant, tolerance: Tolerance, directory: Path) -> float:
    """Score the variant's reference batch; its max abs error, or BundleError naming the bundle."""
    what = f"bundle {directory} (variant '{variant.name}', backend '{variant.backend.name}')"
    try:
        got = variant.score(variant.reference_inputs)
    except CodesignError:
        raise
    except Exception as exc:
        raise BundleError(
            f"{what} loads but fails to score its stored reference batch: {type(exc).__name__}: "
            f"{str(exc)[:1000]}",
            fix="the bundle cannot serve: recompile it with this codesign and torch; if it fails again, "
            "compile with backend 'eager' or without passes and report the model",
        ) from exc
    return compare_reference(got, variant.reference_outputs, tolerance, what)


def _tolerance(value: Any, default: Tolerance) -> Tolerance:
    """The manifest's tolerance record (bundles written before it existed use the backend's)."""
    if value is None:
        return default
    try:
        tol = Tolerance(
            rtol=float(value["rtol"]),
            atol=float(value["atol"]),
            min_sqnr_db=None if value.get("min_sqnr_db") is None else float(value["min_sqnr_db"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BundleError(f"bundle manifest tolerance {value!r} is not a tolerance record ({exc!r})") from exc
    if not (tol.rtol >= 0 and tol.atol >= 0):
        raise BundleError(f"bundle manifest tolerance {value!r} has a negative bound")
    return tol


def _micro_batch(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BundleError(f"bundle manifest micro_batch {value!r} is not a positive integer or null")
    return value


def _derived_weights(value: Any) -> dict[str, list[str]] | None:
    """The manifest's derived-weights record (None in bundles written before it existed)."""
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, list) and all(isinstance(x, str) for x in v)
        for k, v in value.items()
    ):
        raise TypeError("'derived_weights' must map a weight name to a list of weight names")
    return {k: list(v) for k, v in value.items()}


def _id_bounds(value: Any) -> dict[str, dict[str, int]]:
    if value is None:
        return {}
    ok = isinstance(value, dict) and all(
        isinstance(per, dict)
        and all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in per.values())
        for per in value.values()
    )
    if not ok:
        raise BundleError(
            f"bundle manifest id_bounds {value!r} is not a mapping of input -> {{column: rows}}"
        )
    return {str(k): {str(c): int(r) for c, r in per.items()} for k, per in value.items()}


def _checked_id_bounds(
    bounds: dict[str, dict[str, int]], reference: RequestBatch
) -> dict[str, dict[str, int]]:
    """Bounds that name real inputs and columns, and that the stored reference ids satisfy: a bound
    that does not would fail (or refuse) every request at serving time, so the bundle is refused now."""
    leaves = reference.leaves()
    for path, per in bounds.items():
        t = leaves.get(path)
        if not isinstance(t, torch.Tensor):
            raise BundleError(f"bundle manifest id_bounds names '{path}', which is not a tensor input")
        for column, rows in per.items():
            if column == "*":
                ids = t.reshape(-1)
            elif column.isdigit() and t.dim() == 2 and int(column) < t.shape[1]:
                ids = t[:, int(column)]
            else:
                raise BundleError(
                    f"bundle manifest id_bounds['{path}'] names column {column!r}, which input '{path}' of "
                    f"shape {list(t.shape)} does not have",
                    fix="recompile the bundle; never edit its manifest by hand",
                )
            if ids.numel() and not bool(((ids >= 0) & (ids < rows)).all()):
                raise BundleError(
                    f"bundle manifest id_bounds['{path}'][{column!r}] = {rows} rows, but the reference batch "
                    f"holds ids outside 0..{rows - 1}",
                    fix="recompile the bundle; never edit its manifest by hand",
                )
    return bounds


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m codesign.build.bundle DIR...``: load each bundle and check its reference outputs.

    Prints one line per bundle, ``CHECK_MARKER`` + JSON (``dir``, ``ok``, ``max_abs_error``,
    ``seconds`` or ``error``, ``fix``); exits 1 if any bundle fails. ``Variant.save`` runs it in a
    fresh interpreter; it imports only what loading needs. ``--allow-unsigned-native`` first: the
    caller wrote the bundles (``Variant.save`` checking what it just wrote) and vouches for them.
    """
    dirs = list(sys.argv[1:] if argv is None else argv)
    allow_native = bool(dirs) and dirs[0] == "--allow-unsigned-native"
    dirs = dirs[1:] if allow_native else dirs
    if not dirs:
        print(
            "usage: python -m codesign.build.bundle [--allow-unsigned-native] BUNDLE_DIR...", file=sys.stderr
        )
        return 2
    failed = 0
    for d in dirs:
        t0 = time.perf_counter()
        rec: dict[str, Any] = {"dir": d}
        try:
            variant = load(d, check_reference=False, allow_unsigned_native=allow_native)
            manifest = read_manifest(d)
            tol = _tolerance(manifest.get("tolerance"), variant.tolerance)
            rec.update(ok=True, max_abs_error=check_reference_outputs(variant, tol, Path(d)))
        except CodesignError as exc:
            rec.update(ok=False, error=exc.message, fix=exc.fix)
        except Exception as exc:  # anything else is a bug to show in full
            traceback.print_exc()
            rec.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:2000]}", fix=None)
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        failed += not rec["ok"]
        print(CHECK_MARKER + json.dumps(rec, default=str), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
