"""The single-variant bundle format, and writing it (reading and verifying is ``codesign.build.bundle``).

Kept apart from reading so that ``Variant.save`` can write a bundle without importing the reader, which
builds Variants (no import cycle).

A bundle proves itself before ``write_bundle`` returns: it is written to a hidden staging folder beside
``directory``, reloaded and made to score its stored reference batch, and only then moved into place.
``verify`` says where the reload happens:

- ``"fresh_process"`` (the default): a new Python interpreter runs ``python -m codesign.build.bundle
  STAGING`` (the same check ``codesign.load`` makes). It sees only what the bundle holds, so it catches a
  bundle that works only in the process that compiled it (a custom op the model's module registered,
  weights that load back as views, a backend that cannot rebuild its runner). About 5-9 s for a tiny
  eager model on 2 cores, most of it importing torch; an inductor bundle compiles again there.
- ``"in_process"``: the program archive and artifacts are read back from disk in this process and
  scored (0.3-0.7 s for a tiny model); misses what a fresh interpreter would lack.
- ``"none"``: write only (a search trial, a benchmark loop).

A failed check raises BundleError and removes the staging folder; an existing bundle being overwritten
is replaced only after the new one passed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
import torch.utils._pytree as pytree

from codesign.build.shard_blocks import TABLES, put_back_tables, tables_without_weights, write_tables
from codesign.build.signing import file_sha256, remember_written
from codesign.errors import BundleError, CodesignError, PassError
from codesign.ir.program import call_inputs, run_in_pieces
from codesign.ir.request import flatten_inputs
from codesign.numerics import Tolerance, compare_outputs
from codesign.version import __version__

if TYPE_CHECKING:
    from codesign.backends.base import Backend
    from codesign.hardware.target import Target
    from codesign.ir.request import RequestBatch, RequestSpec
    from codesign.sharding.types import Plan

__all__ = [
    "ABI_BOUND_BACKENDS",
    "BUNDLE_FORMAT",
    "CHECK_MARKER",
    "FRESH_PROCESS_TIMEOUT_S",
    "MANIFEST",
    "MULTI_FORMAT",
    "PLAN",
    "PROGRAM",
    "REFERENCE",
    "SAFE_NAME",
    "SCHEMA_VERSION",
    "VERIFY_MODES",
    "SavedVariant",
    "Verify",
    "bundle_tolerance",
    "check_destination",
    "check_in_fresh_process",
    "compare_reference",
    "file_sha256",
    "staged_folder",
    "verify_written",
    "write_bundle",
    "write_bundle_files",
]

log = logging.getLogger(__name__)

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

Verify = Literal["fresh_process", "in_process", "none"]
VERIFY_MODES: tuple[Verify, ...] = ("fresh_process", "in_process", "none")
# The module whose ``python -m`` entry point reloads bundles and scores their reference batches.
CHECK_MODULE = "codesign.build.bundle"
# Prefix of the child's one JSON line per bundle (torch and user code may print to stdout too).
CHECK_MARKER = "codesign-bundle-check: "
# Generous: an inductor or TensorRT bundle compiles again in the child; a hung child must still end.
FRESH_PROCESS_TIMEOUT_S = 1800.0
STDERR_TAIL_CHARS = 3000


def check_destination(directory: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``directory`` unless ``overwrite`` is set and it holds a bundle."""
    if directory.exists() and not directory.is_dir():
        raise BundleError(f"{directory} exists and is not a folder", fix="pick a new folder for the bundle")
    if directory.exists() and any(directory.iterdir()):
        if not overwrite:
            raise BundleError(
                f"{directory} exists and is not empty", fix="pass overwrite=True or pick a new folder"
            )
        if not (directory / MANIFEST).is_file():
            raise BundleError(f"refusing to overwrite {directory}: it is not a codesign bundle")


@contextlib.contextmanager
def staged_folder(directory: Path, overwrite: bool) -> Iterator[Path]:
    """A fresh hidden folder beside ``directory``; moved into its place if the block succeeds.

    On any error the staging folder is removed and ``directory`` is left as it was, so nothing that
    looks like a valid bundle is left behind by a failed save (and an overwritten bundle survives it).
    """
    check_destination(directory, overwrite)
    directory = directory.absolute()  # "." has no name to stage beside
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.parent / f".{directory.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()  # not tempfile.mkdtemp: its 0700 mode would become the bundle's
    try:
        yield staging
        if directory.exists():
            check_destination(directory, overwrite)  # still empty, or still a bundle we may replace
            shutil.rmtree(directory)
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


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
    derived_weights: dict[str, list[str]] | None

    @property
    def tolerance(self) -> Tolerance: ...


def _loosest(tolerances: list[Tolerance]) -> Tolerance:
    floors = [t.min_sqnr_db for t in tolerances if t.min_sqnr_db is not None]
    return Tolerance(
        max(t.rtol for t in tolerances), max(t.atol for t in tolerances), min(floors) if floors else None
    )


def bundle_tolerance(variant: SavedVariant) -> Tolerance:
    """How far a reloaded variant may score from the stored reference outputs.

    The reference outputs are those of the program ``compile`` started from; the variant differs from
    them by its backend's tolerance and by each pass that rewrote it (a fusion reorders sums, an FP8
    pass is held to an SQNR floor), so the loosest of these is stored in the manifest.
    """
    tolerances = [variant.tolerance]
    modified = [str(r.get("name")) for r in (variant.report or {}).get("passes", []) if r.get("modified")]
    if modified:
        from codesign.passes.registry import pass_by_name  # the compiling process has them loaded

        for name in modified:
            try:
                tolerances.append(pass_by_name(name).tolerance)
            except PassError:
                log.warning("pass %r is not registered here; its tolerance is not in the bundle's", name)
    return _loosest(tolerances)


def compare_reference(got: Any, want: list[torch.Tensor], tolerance: Tolerance, what: str) -> float:
    """Max abs error of ``got`` against the reference outputs; BundleError if beyond ``tolerance``."""
    ok, max_abs, max_rel = compare_outputs(got, want, tolerance)
    if not ok:
        bound = (
            f"SQNR >= {tolerance.min_sqnr_db} dB"
            if tolerance.min_sqnr_db is not None
            else f"rtol {tolerance.rtol:g}, atol {tolerance.atol:g}"
        )
        raise BundleError(
            f"{what}: its scores of the stored reference batch differ from the stored reference outputs "
            f"(max abs error {max_abs:.3g}, max rel error {max_rel:.3g}; allowed {bound})",
            fix="the weights or program were changed after compile, or the backend does not reproduce "
            "the compiled program once reloaded: recompile the bundle (codesign compile ... --out); "
            "if it fails again, compile with backend 'eager' or without passes to find the culprit",
        )
    return max_abs


def write_bundle(
    variant: SavedVariant, directory: Path, *, overwrite: bool = False, verify: Verify = "fresh_process"
) -> Path:
    """Write ``variant`` to ``directory`` and prove that it reloads (see the module docstring).

    >>> write_bundle(variant, Path("out/din"), verify="in_process")
    """
    _check_mode(verify)
    directory = Path(directory)
    with staged_folder(directory, overwrite) as staging:
        write_bundle_files(variant, staging)
        verify_written({variant.name: (variant, staging)}, verify)
    return directory


def write_bundle_files(variant: SavedVariant, directory: Path) -> None:
    """Write the files of ``variant``'s bundle into the existing, empty ``directory`` (no check)."""
    sharded: dict[str, Any] | None = None
    if variant.plan is not None:
        # planned tables go to tables.bin by shard (a rank reads its own rows alone), not into the program
        sharded = write_tables(variant.exported, variant.plan, directory / TABLES)
        (directory / PLAN).write_text(variant.plan.to_json())
    with tables_without_weights(variant.exported, list(sharded or ())):
        torch.export.save(variant.exported, str(directory / PROGRAM))
    for name, src in variant.artifacts.items():
        shutil.copyfile(src, directory / name)
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
        "derived_weights": variant.derived_weights,
        "sharded_tables": sharded,
        "tolerance": dataclasses.asdict(bundle_tolerance(variant)),
        "files": files,
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    remember_written(directory / MANIFEST)  # this process generated its native code, if it has any


def _check_mode(verify: str) -> None:
    if verify not in VERIFY_MODES:
        raise BundleError(f"unknown bundle check {verify!r}", fix=f"pass verify= one of {list(VERIFY_MODES)}")


def verify_written(written: Mapping[str, tuple[SavedVariant, Path]], verify: Verify) -> None:
    """Reload the written bundles (variant name -> (variant, folder)) as ``verify`` says.

    BundleError if one does not reload or score its reference batch within its tolerance.
    """
    _check_mode(verify)
    if verify == "none" or not written:
        return
    if verify == "fresh_process":
        check_in_fresh_process({name: path for name, (_, path) in written.items()})
        return
    for name, (variant, path) in written.items():
        _reload_in_process(name, variant, path)


def _reload_in_process(name: str, variant: SavedVariant, directory: Path) -> None:
    """Read the written program and artifacts back in this process and score the reference batch."""
    import codesign.ops  # noqa: F401  # torch.export.load resolves the custom ops a program calls

    what = f"variant '{name}' ({variant.backend.name} bundle reloaded in this process)"
    try:
        exported = torch.export.load(str(directory / PROGRAM))
        if (directory / TABLES).exists():  # planned tables stored by shard: put them back
            record = json.loads((directory / MANIFEST).read_text())["sharded_tables"]
            put_back_tables(exported, directory / TABLES, record)
        example = call_inputs(variant.reference_inputs, variant.takes_request_offsets)
        runner: Callable[..., Any] = variant.backend.load(
            exported, {n: directory / n for n in variant.artifacts}, example
        )
        with torch.no_grad():
            got = run_in_pieces(
                runner,
                variant.reference_inputs,
                variant.spec,
                variant.takes_request_offsets,
                variant.micro_batch,
            )
    except CodesignError:
        raise
    except Exception as exc:
        raise BundleError(
            f"{what} fails to score its reference batch: {type(exc).__name__}: {str(exc)[:1000]}",
            fix="the bundle would not serve: report the model; backend 'eager' or passes=[] may avoid it",
        ) from exc
    compare_reference(got, variant.reference_outputs, bundle_tolerance(variant), what)


def check_in_fresh_process(
    bundles: Mapping[str, Path],
    *,
    timeout_s: float = FRESH_PROCESS_TIMEOUT_S,
    saving: bool = True,
    vouch: bool | None = None,
) -> None:
    """Load each bundle (variant name -> folder) in one new Python process and score its reference batch.

    The child runs ``python -m codesign.build.bundle DIR...``, the check ``codesign.load`` makes, and
    prints one JSON line per bundle. BundleError names the variant, what failed, the child's stderr
    tail and a fix (``saving``: the bundles are being saved, and the error says they were not).
    ``vouch`` (default: ``saving``): this process wrote the bundles, so the child may load their native
    code unsigned (``codesign.build.signing``).

    >>> check_in_fresh_process({"din": Path("out/din"), "dlrm": Path("out/dlrm")}, saving=False)
    """
    if not bundles:
        return
    names = {str(path): name for name, path in bundles.items()}
    # the child must import this very codesign, even when it runs from a source tree
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    # bundles being saved were written by this process, which vouches for their native code
    vouched = saving if vouch is None else vouch
    cmd = [sys.executable, "-m", CHECK_MODULE, *(["--allow-unsigned-native"] if vouched else []), *names]
    unsaved = "; nothing was saved" if saving else ""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BundleError(
            f"the fresh process reloading the bundles of {sorted(bundles)} ran past {timeout_s:.0f} s"
            f"{unsaved}{_tail(exc.stderr)}",
            fix="save with verify='in_process' (this process reloads the bundle), or with verify='none' "
            f"and run `{sys.executable} -m {CHECK_MODULE} DIR` to see where it hangs",
        ) from exc
    results: dict[str, dict[str, Any]] = {}
    for line in proc.stdout.splitlines():
        if line.startswith(CHECK_MARKER):
            with contextlib.suppress(json.JSONDecodeError):
                rec = json.loads(line[len(CHECK_MARKER) :])
                results[str(rec.get("dir"))] = rec
    failures: list[tuple[str, str, str]] = []  # (variant, what failed, fix)
    for path, name in names.items():
        rec = results.get(path)
        if rec is None:
            why = f"the fresh process exited with status {proc.returncode} before it reported on the bundle"
            fix = f"save with verify='none', then run `{sys.executable} -m {CHECK_MODULE} DIR` to see it all"
            failures.append((name, why, fix))
        elif not rec.get("ok"):
            failures.append((name, str(rec.get("error")), str(rec.get("fix") or "see the error above")))
    if failures:
        also = "verify='in_process' skips the new interpreter (it misses what only this process holds), "
        also += "verify='none' skips the check"
        if len(failures) == 1:
            name, why, fix = failures[0]
            raise BundleError(
                f"the bundle of variant '{name}' does not reload in a fresh Python process{unsaved}: "
                f"{why}{_tail(proc.stderr)}",
                fix=f"{fix}; {also}",
            )
        lines = "".join(f"\n  {name}: {why}\n    fix: {fix}" for name, why, fix in failures)
        raise BundleError(
            f"the bundles of variants {[f[0] for f in failures]} do not reload in a fresh Python "
            f"process{unsaved}:{lines}{_tail(proc.stderr)}",
            fix=also,
        )
    log.info("bundles %s reload in a fresh process (%.1f s)", sorted(bundles), time.perf_counter() - t0)


def _tail(stderr: str | bytes | None) -> str:
    if isinstance(stderr, bytes):
        stderr = stderr.decode(errors="replace")
    text = (stderr or "").strip()
    return f"\n--- stderr of the fresh process (tail) ---\n{text[-STDERR_TAIL_CHARS:]}" if text else ""
