"""Read what a report shows from bundles, search results, FP8 reports and sharding plans.

Everything is read from JSON (manifests, router.json, plan.json, saved results): a report never
loads compiled code, so it can be written on any machine for a bundle built for any target.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from codesign.build.bundle_write import BUNDLE_FORMAT, MANIFEST, PLAN
from codesign.build.profiling import VariantProfile
from codesign.config import config_from_dict
from codesign.errors import CodesignError, ReportError
from codesign.hardware.target import Target
from codesign.search.result import SearchResult
from codesign.serving.deployment import MULTI_FORMAT, ROUTER, VARIANTS_DIR, search_record
from codesign.serving.router import FeatureConfig, Router, policy_from_dict
from codesign.sharding.types import PLAN_SCHEMA, Plan

__all__ = ["ReportData", "VariantRecord", "load_sources"]

JSON_KINDS = (
    "give a bundle directory, a search result (codesign search --out), an FP8 report "
    "(codesign fp8 --out) or a sharding plan (codesign plan --out)"
)
STORAGE_PREFIXES = ("sqlite:///", "postgresql://", "postgresql+", "mysql://", "journal:")


@dataclasses.dataclass
class VariantRecord:
    """One compiled variant as its manifest describes it (plus its profile in a multi-variant bundle)."""

    name: str
    source: str  # the bundle directory it came from
    manifest: dict[str, Any]
    plan: Plan | None = None
    profile: VariantProfile | None = None
    measured: dict[str, Any] | None = None  # request scaling timed here (report.measure.measure_scaling)

    @property
    def target(self) -> Target | None:
        try:
            return Target.from_dict(self.manifest["target"])
        except (KeyError, TypeError, CodesignError):
            return None

    @property
    def backend(self) -> str:
        return str((self.manifest.get("backend") or {}).get("name", "?"))

    @property
    def passes(self) -> list[dict[str, Any]]:
        return list((self.manifest.get("compile_report") or {}).get("passes", []))

    @property
    def cost(self) -> dict[str, Any]:
        return dict(self.manifest.get("cost") or {})


@dataclasses.dataclass
class ReportData:
    """Everything found in the report's inputs; each section renders only what is present."""

    inputs: list[str] = dataclasses.field(default_factory=list)
    variants: list[VariantRecord] = dataclasses.field(default_factory=list)
    router: dict[str, Any] | None = None  # {"describe": Router.describe(), "profiles": {name: profile}}
    search: dict[str, Any] | None = None  # bundle.search_record format
    fp8: list[tuple[str, dict[str, Any]]] = dataclasses.field(default_factory=list)  # (label, stats)
    plans: list[tuple[str, Plan]] = dataclasses.field(default_factory=list)  # (label, plan)
    not_measured: list[str] = dataclasses.field(default_factory=list)  # why (report.measure.measure_scaling)

    def fp8_reports(self) -> list[tuple[str, dict[str, Any]]]:
        """FP8 pass stats from every variant that ran the pass (with a layer table), then given files."""
        out = []
        for v in self.variants:
            for rec in v.passes:
                if rec.get("name") == "selective_fp8" and rec.get("stats", {}).get("layers"):
                    out.append((f"variant '{v.name}'", rec["stats"]))
        return out + self.fp8

    def sharding_plans(self) -> list[tuple[str, Plan]]:
        return [(f"variant '{v.name}'", v.plan) for v in self.variants if v.plan is not None] + self.plans


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"cannot read {path} as JSON: {exc}") from exc


def _plan(data: Any, where: Path) -> Plan:
    try:
        return Plan.from_dict(data)
    except CodesignError as exc:
        raise ReportError(f"{where}: {exc.message}") from exc


def _variant(directory: Path, name: str, profile: VariantProfile | None = None) -> VariantRecord:
    manifest = _read_json(directory / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise ReportError(f"{directory / MANIFEST} is not a codesign bundle manifest")
    plan_path = directory / PLAN
    plan = _plan(_read_json(plan_path), plan_path) if plan_path.is_file() else None
    return VariantRecord(name, str(directory), manifest, plan, profile)


def _add_multi(data: ReportData, directory: Path, manifest: Mapping[str, Any]) -> None:
    profiles: dict[str, VariantProfile] = {}
    for entry in manifest.get("variants", []):
        name = str(entry.get("name", ""))
        try:
            profiles[name] = VariantProfile.from_dict(entry["profile"])
        except (KeyError, TypeError, CodesignError) as exc:
            raise ReportError(f"{directory}: variant {name!r} has no readable profile: {exc}") from exc
        # as Bundle.save writes it: a plain folder name under variants/, so nothing outside the bundle is read
        if name in ("", ".", "..") or Path(name).name != name or entry.get("dir") != f"{VARIANTS_DIR}/{name}":
            raise ReportError(
                f"{directory}: variant {name!r} lists folder {entry.get('dir')!r}, not {VARIANTS_DIR}/{name}"
            )
        data.variants.append(_variant(directory / VARIANTS_DIR / name, name, profiles[name]))
    router_json = _read_json(directory / ROUTER)
    try:
        policy = policy_from_dict(router_json["policy"])
        features = config_from_dict(router_json.get("features") or FeatureConfig().to_dict())
        if not isinstance(features, FeatureConfig):
            raise ReportError(f"{directory / ROUTER}: 'features' is not a FeatureConfig record")
        router = Router(list(profiles.values()), policy, features=features)
    except (KeyError, TypeError, CodesignError) as exc:
        raise ReportError(f"{directory / ROUTER}: {exc}") from exc
    data.router = {"describe": router.describe(), "profiles": profiles}
    if "search" in manifest:
        data.search = _checked_search(manifest["search"], directory / MANIFEST)


def _checked_search(record: Any, where: Path) -> dict[str, Any]:
    """A bundle's search record (``bundle.search_record``), checked before anything plots it."""
    try:
        assert isinstance(record, dict)
        for t in record["trials"]:
            assert isinstance(t["number"], int) and isinstance(t["pareto"], bool)
            assert t["values"] is None or all(isinstance(x, int | float) for x in t["values"])
        for c in record["chosen"].values():
            assert isinstance(c["trial"], int) and isinstance(c["roles"], list)
    except (AssertionError, KeyError, TypeError, AttributeError) as exc:
        raise ReportError(
            f"{where}: its 'search' record is malformed ({type(exc).__name__} {exc})",
            fix="rebuild the bundle with Bundle.from_search / codesign bundle --from-search",
        ) from exc
    return dict(record)


def _add_json(data: ReportData, path: Path) -> None:
    try:
        obj = _read_json(path)
    except ReportError as exc:
        raise ReportError(f"{exc.message}: a file input must be JSON", fix=JSON_KINDS) from exc
    if isinstance(obj, dict) and "study_name" in obj and "trials" in obj:
        try:
            result = SearchResult.from_dict(obj, where=str(path))
        except CodesignError as exc:
            raise ReportError(exc.message) from exc
        data.search = _search_from_result(result)
    elif isinstance(obj, dict) and obj.get("schema") == PLAN_SCHEMA and "shards" in obj:
        data.plans.append((path.name, _plan(obj, path)))
    elif isinstance(obj, dict) and "layers" in obj and "budget_pct" in obj:
        data.fp8.append((path.name, obj))
    else:
        raise ReportError(f"{path} is none of the JSON files a report reads", fix=JSON_KINDS)


def _search_from_result(result: SearchResult) -> dict[str, Any]:
    try:
        choices = result.select_variants(3)
    except CodesignError:
        choices = []  # no feasible trial: the report still shows every trial
    return search_record(result, choices)


def load_sources(inputs: Sequence[str | Path], *, study: str | None = None) -> ReportData:
    """Read each input: a bundle directory (single- or multi-variant), a saved search result, an
    FP8 report or a sharding plan (JSON), or an Optuna storage URL (with ``study``)."""
    if not inputs:
        raise ReportError(
            "a report needs at least one input", fix="give a bundle directory or a search result"
        )
    data = ReportData()
    for item in inputs:
        text = str(item)
        data.inputs.append(text)
        if text.startswith(STORAGE_PREFIXES):
            if study is None:
                raise ReportError(
                    f"{text} is a study storage: name the study with --study-name NAME (study= in Python)"
                )
            from codesign.search.tuner import load_result

            data.search = _search_from_result(load_result(text, study))
            continue
        path = Path(text)
        if path.is_dir():
            manifest_path = path / MANIFEST
            if not manifest_path.is_file():
                raise ReportError(f"{path} is a folder without {MANIFEST}: not a codesign bundle")
            manifest = _read_json(manifest_path)
            fmt = manifest.get("format") if isinstance(manifest, dict) else None
            if fmt == MULTI_FORMAT:
                _add_multi(data, path, manifest)
            elif fmt == BUNDLE_FORMAT:
                data.variants.append(_variant(path, str(manifest.get("name", path.name))))
            else:
                raise ReportError(f"{manifest_path} has format {fmt!r}, not a codesign bundle")
        elif path.is_file():
            _add_json(data, path)
        else:
            raise ReportError(
                f"{text} does not exist",
                fix="give a bundle directory, a JSON file, or a storage URL (sqlite:///..., journal:...)",
            )
    return data
