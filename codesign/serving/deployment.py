"""A deployment bundle: several variants of one model behind one request interface, and the router policy.

Layout (each variant is a single-variant bundle, ``codesign.build.bundle``)::

    manifest.json        format codesign-multi-bundle: per variant its folder, the sha256 of its
                         manifest and its profile (latency curve, quality, memory); router.json's sha256
    router.json          the router policy and feature settings (allow-listed configs)
    variants/<name>/     one single-variant bundle per variant

A variant that fails to load (tampered, built for another torch) is left out of rotation and
reported; the others serve.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from codesign.build.bundle import MAX_MANIFEST_BYTES, load, read_manifest
from codesign.build.bundle_write import (
    BUNDLE_FORMAT,
    MANIFEST,
    MULTI_FORMAT,
    SAFE_NAME,
    SCHEMA_VERSION,
    Verify,
    file_sha256,
    staged_folder,
    verify_written,
    write_bundle_files,
)
from codesign.build.profiling import (
    DEFAULT_CURVE_CANDIDATES,
    DEFAULT_CURVE_REQUESTS,
    LatencyCurve,
    VariantProfile,
    curve_from_estimates,
    measure_quality,
    profile_variant,
    variant_memory_bytes,
)
from codesign.build.signing import Trust, remember_written, verify_signature, written_here
from codesign.build.variant import Variant, compile
from codesign.config import config_from_dict
from codesign.errors import BundleError, CodesignError
from codesign.ir.request import RequestBatch, StructuredBatch
from codesign.ir.schema import as_request_batch
from codesign.serving.router import (
    BudgetedPolicy,
    FeatureConfig,
    LoadTracker,
    Policy,
    RequestFeatures,
    Router,
    RulesPolicy,
    policy_from_dict,
)
from codesign.serving.wire import RequestSchema
from codesign.version import __version__

if TYPE_CHECKING:
    from codesign.hardware.target import Target
    from codesign.search.result import SearchResult, VariantChoice

__all__ = ["MULTI_FORMAT", "Bundle", "load_bundle", "search_record"]

log = logging.getLogger(__name__)

ROUTER = "router.json"
VARIANTS_DIR = "variants"


def request_interface(variant: Variant) -> dict[str, Any]:
    """What a client sends to a variant: its spec and its inputs' paths, dtypes and row shapes."""
    leaves = variant.reference_inputs.leaves()
    jagged = set(variant.spec.bags)
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
        _check_variants(variants)
        if quality_reference is not None and quality_reference not in variants:
            raise BundleError(f"quality_reference '{quality_reference}' is not one of {list(variants)}")
        given_profiles = dict(profiles or {})
        qualities = _qualities(variants, quality_reference, dict(quality or {}), given_profiles)
        out: dict[str, VariantProfile] = {}
        for name, v in variants.items():
            if name in given_profiles:
                out[name] = dataclasses.replace(given_profiles[name], name=name)
                continue
            q, source = qualities[name]
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

    def score(
        self,
        batch: RequestBatch | StructuredBatch | Mapping[str, Any],
        *,
        counts: Sequence[int] | None = None,
        variant: str | None = None,
        budget_ms: float | None = None,
        tier: str | None = None,
    ) -> Any:
        """Scores of a batch from the variant the router picks (or ``variant``), after the input checks.

        The batch is checked once against the bundle's schema (the checks ``Variant.score`` and the
        server make; id bounds hold for every variant). The router decides for the whole batch from
        its largest request, ``budget_ms`` and ``tier``, as the server does for one request.

        >>> bundle.score({"dense": x, "ids": ids}, counts=[40], budget_ms=20)
        """
        first = next(iter(self.variants.values()))
        structured = isinstance(batch, StructuredBatch)
        flat = as_request_batch(batch, counts=counts, spec=first.spec, template=first.reference_inputs)
        shares = any(v.takes_request_offsets for v in self.variants.values())
        self._schema.inputs.check(flat, repeats=shares and not structured)
        features = RequestFeatures(candidates=int(flat.counts.max()), budget_ms=budget_ms, tier=tier)
        name = self.router().decide(features, force=variant).variant
        return self.variants[name].score(flat, check=False)

    @functools.cached_property
    def _schema(self) -> RequestSchema:
        return self.schema()

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
    def save(
        self, directory: str | Path, *, overwrite: bool = False, verify: Verify = "fresh_process"
    ) -> Path:
        """Write every variant's bundle under ``variants/``, ``router.json`` and the manifest.

        As ``Variant.save``: every variant is reloaded and scores its reference batch before this
        returns (by default all of them in one fresh Python process); if one fails, BundleError names
        it and nothing is left at ``directory``.
        """
        if self.failed:
            raise BundleError(
                f"this bundle was loaded without {sorted(self.failed)}; saving it would drop them",
                fix="rebuild the bundle from compiled variants",
            )
        d = Path(directory)
        with staged_folder(d, overwrite) as staging:
            entries = []
            written = {}
            for name, variant in self.variants.items():
                sub = staging / VARIANTS_DIR / name
                sub.mkdir(parents=True)
                write_bundle_files(variant, sub)
                written[name] = (variant, sub)
                entries.append(
                    {
                        "name": name,
                        "dir": f"{VARIANTS_DIR}/{name}",
                        "manifest_sha256": file_sha256(sub / MANIFEST),
                        "profile": self.profiles[name].to_dict(),
                    }
                )
            verify_written(written, verify)
            router = {"policy": self.policy.to_dict(), "features": self.features.to_dict()}
            (staging / ROUTER).write_text(json.dumps(router, indent=2, sort_keys=True))
            manifest = {
                "format": MULTI_FORMAT,
                "schema_version": SCHEMA_VERSION,
                "created_unix": int(time.time()),
                "versions": {"codesign": __version__, "torch": torch.__version__},
                "variants": entries,
                "router": {"file": ROUTER, "sha256": file_sha256(staging / ROUTER)},
            }
            if self.search is not None:
                manifest["search"] = self.search
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
            remember_written(staging / MANIFEST)
        self.path = d
        return d

    @classmethod
    def load(
        cls,
        directory: str | Path,
        *,
        strict: bool = False,
        trusted_keys: Sequence[str | Path] = (),
        allow_unsigned_native: bool = False,
        planned_tables: Literal["load", "leave"] = "load",
    ) -> Bundle:
        """Load a multi-variant bundle (or wrap a single-variant one), verifying every file.

        A variant that fails to load is recorded in ``failed`` (and logged) while the others
        load; ``strict=True`` raises instead. If no variant loads, BundleError lists why. Native
        code loads as ``codesign.load`` allows; a signature on the top manifest (``codesign sign``)
        vouches for every variant, since it holds their manifests' sha256. ``planned_tables``: as in
        ``codesign.load`` (``"leave"``: for a rank of a sharded server).
        """
        d = Path(directory)
        if not (d / MANIFEST).is_file():
            read_manifest(d)  # raises the specific "not a bundle" error
        with (d / MANIFEST).open("rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)  # read once: what is verified below is what is used
        if len(raw) > MAX_MANIFEST_BYTES:
            raise BundleError(f"{d / MANIFEST} is over the {MAX_MANIFEST_BYTES} byte limit of a manifest")
        try:
            manifest = json.loads(raw.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise BundleError(f"{d / MANIFEST} is not valid JSON: {type(exc).__name__}") from exc
        if isinstance(manifest, dict) and manifest.get("format") == BUNDLE_FORMAT:
            return cls._single(d, trusted_keys, allow_unsigned_native, planned_tables)
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
            if not isinstance(router_rec, dict) or not all(isinstance(e, dict) for e in entries):
                raise TypeError("'router' and each 'variants' entry must be objects")
        except (KeyError, TypeError) as exc:
            raise BundleError(
                f"{d / MANIFEST} lacks {exc} or is malformed (truncated or hand-edited)"
            ) from exc
        trust = Trust.of(trusted_keys, allow_unsigned_native)
        digest = hashlib.sha256(raw).hexdigest()
        signed = verify_signature(d, trust.trusted_keys, manifest_sha=digest) is not None
        native_ok = allow_unsigned_native or signed or written_here(digest)
        policy, features = _read_router(d, router_rec)
        variants, profiles, failed = _load_variants(
            d, entries, strict, trust.trusted_keys, native_ok, planned_tables
        )
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
    def _single(
        cls,
        d: Path,
        trusted_keys: Sequence[str | Path],
        allow_unsigned_native: bool,
        planned_tables: Literal["load", "leave"] = "load",
    ) -> Bundle:
        """A single-variant bundle as a one-variant Bundle, profiled from its manifest's cost estimates."""
        variant = load(
            d,
            trusted_keys=trusted_keys,
            allow_unsigned_native=allow_unsigned_native,
            planned_tables=planned_tables,
        )
        try:
            curve = curve_from_estimates(variant)
        except CodesignError:
            curve = LatencyCurve((1,), (1,), ((0.0,),), "unknown (the bundle records no cost estimates)")
        profile = VariantProfile(variant.name, curve, 0.0, "single variant", variant_memory_bytes(variant))
        return cls({variant.name: variant}, {variant.name: profile}, RulesPolicy((), variant.name), path=d)


def _read_router(d: Path, record: Mapping[str, Any]) -> tuple[Policy, FeatureConfig]:
    """The policy and feature settings of ``router.json``, after its sha256 matches the manifest."""
    router_path = d / ROUTER
    raw = router_path.read_bytes() if router_path.is_file() and not router_path.is_symlink() else b""
    if not raw or hashlib.sha256(raw).hexdigest() != record.get("sha256"):
        raise BundleError(
            f"{ROUTER} is missing or does not match its sha256 in the manifest",
            fix="recompile the bundle; never edit bundle files by hand",
        )
    try:
        router_data = json.loads(raw.decode("utf-8"))
        policy = policy_from_dict(router_data["policy"])
        features = config_from_dict(router_data.get("features") or FeatureConfig().to_dict())
    except (KeyError, TypeError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or UTF-8
        raise BundleError(f"{ROUTER} is malformed: {type(exc).__name__}") from exc
    except CodesignError as exc:
        raise BundleError(f"{ROUTER} holds an invalid policy: {exc.message}") from exc
    if not isinstance(features, FeatureConfig):
        raise BundleError(f"{ROUTER} 'features' is not a FeatureConfig record")
    return policy, features


def _load_variants(
    d: Path,
    entries: Sequence[Any],
    strict: bool,
    trusted_keys: Sequence[Path],
    native_ok: bool,
    planned_tables: Literal["load", "leave"] = "load",
) -> tuple[dict[str, Variant], dict[str, VariantProfile], dict[str, str]]:
    """(variants that load, every listed profile, why each other variant failed)."""
    variants: dict[str, Variant] = {}
    profiles: dict[str, VariantProfile] = {}
    failed: dict[str, str] = {}
    for entry in entries:
        name = str(entry.get("name", ""))
        if not SAFE_NAME.match(name) or entry.get("dir") != f"{VARIANTS_DIR}/{name}":
            raise BundleError(
                f"manifest lists an unsafe variant entry {entry.get('name')!r} / {entry.get('dir')!r}"
            )
        try:
            profiles[name] = VariantProfile.from_dict(entry["profile"])
        except (CodesignError, KeyError) as exc:
            raise BundleError(f"variant '{name}' has an invalid profile in the manifest: {exc}") from exc
        sub = d / VARIANTS_DIR / name
        try:
            pinned = entry.get("manifest_sha256")
            if not (sub / MANIFEST).is_file() or not isinstance(pinned, str):
                raise BundleError(
                    f"variant '{name}': its manifest is missing or does not match the bundle's record"
                )
            # load checks the manifest bytes it reads against the pin (no second read to swap)
            variants[name] = load(
                sub,
                trusted_keys=trusted_keys,
                allow_unsigned_native=native_ok,
                manifest_sha256=pinned,
                planned_tables=planned_tables,
            )
        except Exception as exc:  # one broken variant must not take the others down
            if strict:
                raise
            why = exc.message if isinstance(exc, CodesignError) else f"{type(exc).__name__}: {exc}"
            failed[name] = why
            log.error("variant '%s' failed to load and is out of rotation: %s", name, why)
    return variants, profiles, failed


def _check_variants(variants: Mapping[str, Variant]) -> None:
    """At least one variant, safe folder names, and one request interface for all."""
    if not variants:
        raise BundleError("a bundle needs at least one variant")
    for name in variants:
        if not SAFE_NAME.match(name):
            raise BundleError(
                f"variant name {name!r} is not a safe folder name",
                fix="use letters, digits, '_', '-', '.', '+' (up to 64 characters)",
            )
    first_name, first = next(iter(variants.items()))
    want = request_interface(first)
    for name, v in variants.items():
        got = request_interface(v)
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


def _qualities(
    variants: Mapping[str, Variant],
    reference: str | None,
    given: Mapping[str, float],
    profiles: Mapping[str, VariantProfile],
) -> dict[str, tuple[float, str]]:
    """(NE change %, where it comes from) of each variant without a given profile."""
    to_measure = {
        n: v for n, v in variants.items() if n not in profiles and n not in given and n != reference
    }
    measured = (
        measure_quality(to_measure, variants[reference]) if reference is not None and to_measure else {}
    )
    out: dict[str, tuple[float, str]] = {}
    for name in variants:
        if name in given:
            out[name] = (float(given[name]), "given")
        elif reference == name:
            out[name] = (0.0, "quality reference")
        elif name in measured:
            out[name] = (measured[name], f"NE change vs '{reference}' on resampled requests")
        else:
            out[name] = (0.0, "not measured (assumed lossless)")
    return out


def search_record(result: SearchResult, choices: Sequence[VariantChoice]) -> dict[str, Any]:
    """What a bundle (or a report) keeps of a search: every trial's objectives and feasibility, the
    Pareto front, and the chosen variants by name (``VariantChoice.label``) with their trial and roles."""
    from codesign.search.objectives import OBJECTIVE_NAMES  # search is loaded already: result is its own

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


def load_bundle(
    directory: str | Path,
    *,
    strict: bool = False,
    trusted_keys: Sequence[str | Path] = (),
    allow_unsigned_native: bool = False,
    planned_tables: Literal["load", "leave"] = "load",
) -> Bundle:
    """Load a bundle for serving: multi-variant, or a single variant wrapped as one (see ``Bundle.load``)."""
    return Bundle.load(
        directory,
        strict=strict,
        trusted_keys=trusted_keys,
        allow_unsigned_native=allow_unsigned_native,
        planned_tables=planned_tables,
    )
