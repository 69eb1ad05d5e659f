"""Deployable bundles: write, read and verify.

Layout::

    manifest.json        format, schema version, versions, target, backend, passes + knobs, cost
                         figures, cache key, and the sha256 + size of every other file
    program.pt2          the exported program (graph + weights; torch.export archive, no pickles)
    reference.pt         reference requests and outputs (tensors only, loaded weights-only)
    aoti_package.pt2     (aoti backend) AOTInductor package, loaded only after its sha256 matches
    plan.json            (multi-device targets) the embedding sharding plan

A multi-variant bundle (``Bundle``) holds several such bundles and the router policy::

    manifest.json        format codesign-multi-bundle: per variant its folder, the sha256 of its
                         manifest and its profile (latency curve, quality, memory); router.json's sha256
    router.json          the router policy and feature settings (allow-listed configs)
    variants/<name>/     one single-variant bundle per variant

A variant that fails to load (tampered, built for another torch) is left out of rotation and
reported; the others serve. A bundle is data: configs load through the allow-list in ``codesign.config``; the program archive
is checked to hold plain tensors only before torch reads it; nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import re
import shutil
import sys
import time
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.utils._pytree as pytree

import codesign
from codesign.backends import backend_names, get_backend
from codesign.config import config_from_dict
from codesign.errors import BundleError, CodesignError
from codesign.request import RequestBatch, RequestSpec, flatten_inputs
from codesign.router import (
    BudgetedPolicy,
    FeatureConfig,
    LoadTracker,
    Policy,
    Router,
    RulesPolicy,
    policy_from_dict,
)
from codesign.search.objectives import OBJECTIVE_NAMES
from codesign.sharding.types import Plan
from codesign.target import Target
from codesign.variant import Variant, compile
from codesign.variant_profile import (
    DEFAULT_CURVE_CANDIDATES,
    DEFAULT_CURVE_REQUESTS,
    LatencyCurve,
    VariantProfile,
    curve_from_estimates,
    measure_quality,
    profile_variant,
    variant_memory_bytes,
)
from codesign.wire import RequestSchema

if TYPE_CHECKING:
    from codesign.search.result import SearchResult, VariantChoice

__all__ = [
    "BUNDLE_FORMAT",
    "MULTI_FORMAT",
    "SCHEMA_VERSION",
    "Bundle",
    "load",
    "load_bundle",
    "read_manifest",
    "search_record",
    "write_bundle",
]

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "codesign-bundle"
MULTI_FORMAT = "codesign-multi-bundle"
ROUTER = "router.json"
VARIANTS_DIR = "variants"
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


def _empty_folder(directory: Path, overwrite: bool) -> None:
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


def write_bundle(variant: Variant, directory: Path, *, overwrite: bool = False) -> Path:
    """Write ``variant`` to ``directory`` (see module docstring for the layout)."""
    _empty_folder(directory, overwrite)
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
        "id_bounds": variant.id_bounds,
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
        id_bounds=_id_bounds(manifest.get("id_bounds")),
    )


def _micro_batch(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BundleError(f"bundle manifest micro_batch {value!r} is not a positive integer or null")
    return value


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


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")


def _interface(variant: Variant) -> dict[str, Any]:
    """What a client sends to a variant: its spec and its inputs' paths, dtypes and row shapes."""
    leaves = variant.reference_inputs.leaves()
    jagged = set(variant.spec.jagged)
    return {
        "spec": variant.spec.to_dict(),
        "inputs": {
            p: (str(t.dtype), () if p in jagged else tuple(t.shape[1:]))
            for p, t in leaves.items()
            if isinstance(t, torch.Tensor)
        },
    }


@dataclasses.dataclass
class Bundle:
    """Several variants of one model behind one request interface, with their profiles and a router policy.

    >>> bundle = Bundle.build({"full": full, "short": short}, quality_reference="full")
    >>> bundle.save("out/useq-bundle"); bundle = codesign.load_bundle("out/useq-bundle")
    >>> router = bundle.router(); router.decide(RequestFeatures(candidates=200, budget_ms=30))
    """

    variants: dict[str, Variant]  # the variants that loaded (in rotation)
    profiles: dict[str, VariantProfile]  # every variant the bundle lists
    policy: Policy
    features: FeatureConfig = dataclasses.field(default_factory=FeatureConfig)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> why it did not load
    path: Path | None = None
    # from_search: the study's trials and which trial each variant is (search_record); for reports
    search: dict[str, Any] | None = None

    @classmethod
    def build(
        cls,
        variants: Mapping[str, Variant],
        *,
        policy: Policy | None = None,
        features: FeatureConfig | None = None,
        quality_reference: str | None = None,
        quality: Mapping[str, float] | None = None,
        profiles: Mapping[str, VariantProfile] | None = None,
        measure: str = "auto",
        candidates: Sequence[int] = DEFAULT_CURVE_CANDIDATES,
        requests: Sequence[int] = DEFAULT_CURVE_REQUESTS,
        repeats: int = 5,
        labels: Mapping[str, Sequence[str]] | None = None,
    ) -> Bundle:
        """Profile each variant (latency curve, memory; quality given, measured or from ``profiles``).

        ``quality_reference`` names the variant others are measured against (NE change on
        resampled requests); ``quality`` gives figures directly (e.g. from a search); variants
        covered by neither count as lossless and say so in their profile. ``policy`` defaults to
        ``BudgetedPolicy()`` (100 ms).
        """
        if not variants:
            raise BundleError("a bundle needs at least one variant")
        for name in variants:
            if not _NAME.match(name):
                raise BundleError(
                    f"variant name {name!r} is not a safe folder name",
                    fix="use letters, digits, '_', '-', '.', '+' (up to 64 characters)",
                )
        first_name, first = next(iter(variants.items()))
        want = _interface(first)
        for name, v in variants.items():
            got = _interface(v)
            if got != want:
                diff = sorted(
                    k
                    for k in want["inputs"].keys() | got["inputs"].keys()
                    if want["inputs"].get(k) != got["inputs"].get(k)
                )
                raise BundleError(
                    f"variant '{name}' takes other inputs than '{first_name}'"
                    + (f": {diff}" if diff else ": their RequestSpecs differ"),
                    fix="every variant of a bundle must accept the same request (same inputs and RequestSpec)",
                )
        if quality_reference is not None and quality_reference not in variants:
            raise BundleError(f"quality_reference '{quality_reference}' is not one of {list(variants)}")
        given_profiles = dict(profiles or {})
        quality = dict(quality or {})
        measured: dict[str, float] = {}
        if quality_reference is not None:
            to_measure = {
                n: v
                for n, v in variants.items()
                if n not in given_profiles and n not in quality and n != quality_reference
            }
            measured = measure_quality(to_measure, variants[quality_reference]) if to_measure else {}
        out: dict[str, VariantProfile] = {}
        for name, v in variants.items():
            if name in given_profiles:
                out[name] = dataclasses.replace(given_profiles[name], name=name)
                continue
            if name in quality:
                q, source = float(quality[name]), "given"
            elif quality_reference == name:
                q, source = 0.0, "quality reference"
            elif name in measured:
                q, source = measured[name], f"NE change vs '{quality_reference}' on resampled requests"
            else:
                q, source = 0.0, "not measured (assumed lossless)"
            out[name] = profile_variant(
                v,
                name=name,
                quality_loss_pct=q,
                quality_source=source,
                candidates=candidates,
                requests=requests,
                repeats=repeats,
                measure=measure,
                labels=tuple((labels or {}).get(name, ())),
            )
        bundle = cls(dict(variants), out, policy or BudgetedPolicy(), features or FeatureConfig())
        bundle.router()  # validate the policy against the variants now, not at serving time
        return bundle

    @classmethod
    def from_search(
        cls,
        result: SearchResult,
        model: Any,
        *,
        k: int = 3,
        policy: Policy | None = None,
        target: str | Target | None = None,
        **profile_kwargs: Any,
    ) -> Bundle:
        """Compile the variants a search chose (``SearchResult.select_variants``) into a bundle.

        Each variant is named by its roles (``fast``, ``best+small`` ...); its quality is the
        trial's measured NE change. ``model`` is what ``codesign.compile`` takes (a Workload or
        a Program); ``target`` defaults to the search's.
        """
        variants: dict[str, Variant] = {}
        quality: dict[str, float] = {}
        labels: dict[str, tuple[str, ...]] = {}
        choices = result.select_variants(k)
        for choice in choices:
            config = choice.config()
            if config.backend is None:
                raise BundleError(
                    f"trial {choice.trial.number} has no backend: the search tuned passes for "
                    f"{result.target}, which no codesign backend lowers for",
                    fix="search a target with a backend (host, h100 ...) to build a servable bundle",
                )
            name = choice.label
            variants[name] = compile(model, target=target or result.target, **config.compile_args())
            quality[name] = choice.trial.objective("quality_loss_pct")
            labels[name] = (*choice.labels, f"trial-{choice.trial.number}")
        bundle = cls.build(variants, policy=policy, quality=quality, labels=labels, **profile_kwargs)
        bundle.search = search_record(result, choices)
        return bundle

    # ---- use ------------------------------------------------------------------------------
    def router(self, load: LoadTracker | None = None) -> Router:
        """A router over every listed variant; those that failed to load start out of rotation."""
        router = Router(list(self.profiles.values()), self.policy, load, self.features)
        for name, why in self.failed.items():
            router.mark_down(name, why)
        return router

    def schema(self) -> RequestSchema:
        """The request wire format (every variant takes the same); id bounds hold for all variants."""
        first = next(iter(self.variants.values()))
        bounds: dict[str, dict[str, int]] = {}
        for v in self.variants.values():
            for path, per in v.id_bounds.items():
                mine = bounds.setdefault(path, {})
                for col, rows in per.items():
                    mine[col] = min(rows, mine.get(col, rows))
        return RequestSchema.from_reference(first.spec, first.reference_inputs, bounds)

    # ---- files ----------------------------------------------------------------------------
    def save(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write every variant's bundle under ``variants/``, ``router.json`` and the manifest."""
        if self.failed:
            raise BundleError(
                f"this bundle was loaded without {sorted(self.failed)}; saving it would drop them",
                fix="rebuild the bundle from compiled variants",
            )
        d = Path(directory)
        _empty_folder(d, overwrite)
        entries = []
        for name, variant in self.variants.items():
            sub = d / VARIANTS_DIR / name
            write_bundle(variant, sub)
            entries.append(
                {
                    "name": name,
                    "dir": f"{VARIANTS_DIR}/{name}",
                    "manifest_sha256": _sha256(sub / MANIFEST),
                    "profile": self.profiles[name].to_dict(),
                }
            )
        router = {"policy": self.policy.to_dict(), "features": self.features.to_dict()}
        (d / ROUTER).write_text(json.dumps(router, indent=2, sort_keys=True))
        manifest = {
            "format": MULTI_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "created_unix": int(time.time()),
            "versions": {"codesign": codesign.__version__, "torch": torch.__version__},
            "variants": entries,
            "router": {"file": ROUTER, "sha256": _sha256(d / ROUTER)},
        }
        if self.search is not None:
            manifest["search"] = self.search
        (d / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        self.path = d
        return d

    @classmethod
    def load(cls, directory: str | Path, *, strict: bool = False) -> Bundle:
        """Load a multi-variant bundle (or wrap a single-variant one), verifying every file.

        A variant that fails to load is recorded in ``failed`` (and logged) while the others
        load; ``strict=True`` raises instead. If no variant loads, BundleError lists why.
        """
        d = Path(directory)
        if not (d / MANIFEST).is_file():
            read_manifest(d)  # raises the specific "not a bundle" error
        try:
            manifest = json.loads((d / MANIFEST).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{d / MANIFEST} is not valid JSON: {exc}") from exc
        if isinstance(manifest, dict) and manifest.get("format") == BUNDLE_FORMAT:
            return cls._single(d)
        if not isinstance(manifest, dict) or manifest.get("format") != MULTI_FORMAT:
            read_manifest(d)  # foreign format: same message as for single bundles
        version = manifest.get("schema_version")
        if not isinstance(version, int) or not 1 <= version <= SCHEMA_VERSION:
            raise BundleError(
                f"multi-variant bundle schema version {version!r} is not supported (<= {SCHEMA_VERSION})"
            )
        try:
            entries = list(manifest["variants"])
            router_rec = manifest["router"]
        except (KeyError, TypeError) as exc:
            raise BundleError(f"{d / MANIFEST} lacks {exc} (truncated or hand-edited)") from exc
        router_path = d / ROUTER
        if not router_path.is_file() or _sha256(router_path) != router_rec.get("sha256"):
            raise BundleError(
                f"{ROUTER} is missing or does not match its sha256 in the manifest",
                fix="recompile the bundle; never edit bundle files by hand",
            )
        try:
            router_data = json.loads(router_path.read_text())
            policy = policy_from_dict(router_data["policy"])
            features = config_from_dict(router_data.get("features") or FeatureConfig().to_dict())
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{ROUTER} is malformed: {exc!r}") from exc
        except CodesignError as exc:
            raise BundleError(f"{ROUTER} holds an invalid policy: {exc.message}") from exc
        if not isinstance(features, FeatureConfig):
            raise BundleError(f"{ROUTER} 'features' is not a FeatureConfig record")
        variants: dict[str, Variant] = {}
        profiles: dict[str, VariantProfile] = {}
        failed: dict[str, str] = {}
        for entry in entries:
            name = str(entry.get("name", ""))
            if not _NAME.match(name) or entry.get("dir") != f"{VARIANTS_DIR}/{name}":
                raise BundleError(
                    f"manifest lists an unsafe variant entry {entry.get('name')!r} / {entry.get('dir')!r}"
                )
            try:
                profiles[name] = VariantProfile.from_dict(entry["profile"])
            except (CodesignError, KeyError) as exc:
                raise BundleError(f"variant '{name}' has an invalid profile in the manifest: {exc}") from exc
            sub = d / VARIANTS_DIR / name
            try:
                if not (sub / MANIFEST).is_file() or _sha256(sub / MANIFEST) != entry.get("manifest_sha256"):
                    raise BundleError(
                        f"variant '{name}': its manifest is missing or does not match the bundle's record"
                    )
                variants[name] = load(sub)
            except Exception as exc:  # one broken variant must not take the others down
                if strict:
                    raise
                why = exc.message if isinstance(exc, CodesignError) else f"{type(exc).__name__}: {exc}"
                failed[name] = why
                log.error("variant '%s' failed to load and is out of rotation: %s", name, why)
        if not variants:
            raise BundleError(
                f"no variant of {d} loads: " + "; ".join(f"{n}: {w}" for n, w in failed.items()),
                fix="recompile the bundle with this codesign and torch",
            )
        search = manifest.get("search")
        bundle = cls(
            variants, profiles, policy, features, failed, d, search if isinstance(search, dict) else None
        )
        bundle.router()
        return bundle

    @classmethod
    def _single(cls, d: Path) -> Bundle:
        """A single-variant bundle as a one-variant Bundle, profiled from its manifest's cost estimates."""
        variant = load(d)
        try:
            curve = curve_from_estimates(variant)
        except CodesignError:
            curve = LatencyCurve((1,), (1,), ((0.0,),), "unknown (the bundle records no cost estimates)")
        profile = VariantProfile(variant.name, curve, 0.0, "single variant", variant_memory_bytes(variant))
        return cls({variant.name: variant}, {variant.name: profile}, RulesPolicy((), variant.name), path=d)


def search_record(result: SearchResult, choices: Sequence[VariantChoice]) -> dict[str, Any]:
    """What a bundle (or a report) keeps of a search: every trial's objectives and feasibility, the
    Pareto front, and the chosen variants by name (``VariantChoice.label``) with their trial and roles."""
    front = {t.number for t in result.pareto}
    return {
        "study_name": result.study_name,
        "target": result.target,
        "latency_source": result.latency_source,
        "objectives": list(OBJECTIVE_NAMES),
        "settings": result.settings,
        "trials": [
            {
                "number": t.number,
                "state": t.state,
                "values": list(t.values) if t.values is not None else None,
                "feasible": t.feasible,
                "pareto": t.number in front,
            }
            for t in result.trials
        ],
        "chosen": {c.label: {"trial": c.trial.number, "roles": list(c.labels)} for c in choices},
    }


def load_bundle(directory: str | Path, *, strict: bool = False) -> Bundle:
    """Load a bundle for serving: multi-variant, or a single variant wrapped as one (see ``Bundle.load``)."""
    return Bundle.load(directory, strict=strict)
