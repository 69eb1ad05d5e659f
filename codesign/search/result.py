"""A finished (or paused) search as plain data: its trials, the Pareto front, chosen variants.

Built from an Optuna study, but holds no Optuna objects, so it saves as JSON and the router can
read it without Optuna. The front is computed here, over feasible complete trials, with identical
objective vectors kept once (the lowest trial number), so "distinct variants" means distinct
figures.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from codesign.errors import SearchError
from codesign.passes.manager import Pass
from codesign.search.objectives import OBJECTIVE_NAMES
from codesign.search.space import TrialConfig

__all__ = ["SearchResult", "TrialRecord", "VariantChoice", "pareto_front"]


@dataclasses.dataclass(frozen=True)
class TrialRecord:
    """One trial: its state, the values it tried, its objectives and why it failed or was pruned."""

    number: int
    state: str  # COMPLETE | PRUNED | FAIL | RUNNING | WAITING
    params: dict[str, Any]
    values: tuple[float, ...] | None  # OBJECTIVE_NAMES order
    constraints: tuple[float, ...] | None
    config: dict[str, Any] | None  # TrialConfig.to_dict()
    reason: str = ""  # error or pruning reason
    attrs: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def feasible(self) -> bool:
        return self.constraints is not None and all(c <= 0 for c in self.constraints)

    def objective(self, name: str) -> float:
        if self.values is None:
            raise SearchError(f"trial {self.number} ({self.state}) has no objective values")
        return self.values[OBJECTIVE_NAMES.index(name)]

    def trial_config(self, pass_classes: Mapping[str, type[Pass]] | None = None) -> TrialConfig:
        if self.config is None:
            raise SearchError(f"trial {self.number} ({self.state}) has no configuration recorded")
        return TrialConfig.from_dict(self.config, pass_classes)


def _dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def pareto_front(trials: Sequence[TrialRecord]) -> list[TrialRecord]:
    """Feasible complete trials no other feasible trial dominates; one per objective vector."""
    pool = [t for t in trials if t.state == "COMPLETE" and t.values is not None and t.feasible]
    distinct: dict[tuple[float, ...], TrialRecord] = {}
    for t in sorted(pool, key=lambda t: t.number):
        assert t.values is not None
        distinct.setdefault(t.values, t)
    front = [t for v, t in distinct.items() if not any(_dominates(w, v) for w in distinct)]
    return sorted(front, key=lambda t: t.values or ())


@dataclasses.dataclass(frozen=True)
class VariantChoice:
    """A trial picked for deployment, with the roles it fills (fast, best, small, balanced ...)."""

    labels: tuple[str, ...]
    trial: TrialRecord

    @property
    def label(self) -> str:
        return "+".join(self.labels)

    def config(self, pass_classes: Mapping[str, type[Pass]] | None = None) -> TrialConfig:
        return self.trial.trial_config(pass_classes)


@dataclasses.dataclass
class SearchResult:
    """Everything a search produced. ``pareto`` and ``select_variants`` are computed on demand."""

    study_name: str
    storage: str
    target: str
    latency_source: str
    settings: dict[str, Any]
    trials: list[TrialRecord]

    @property
    def pareto(self) -> list[TrialRecord]:
        return pareto_front(self.trials)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.trials:
            out[t.state] = out.get(t.state, 0) + 1
        return out

    def backends(self) -> dict[str, dict[str, Any]]:
        """Per searched backend: its feasible complete trials and the lowest latency among them,
        fastest backend first (the one that won). Trials of a search with one backend record none."""
        best: dict[str, dict[str, Any]] = {}
        for t in self.trials:
            name = ((t.config or {}).get("backend") or {}).get("name")
            if name is None or t.state != "COMPLETE" or not t.feasible or t.values is None:
                continue
            entry = best.setdefault(name, {"trials": 0, "latency_ms": math.inf, "trial": None})
            entry["trials"] += 1
            if t.objective("latency_ms") < entry["latency_ms"]:
                entry["latency_ms"], entry["trial"] = t.objective("latency_ms"), t.number
        return dict(sorted(best.items(), key=lambda kv: kv[1]["latency_ms"]))

    def select_variants(self, k: int = 3) -> list[VariantChoice]:
        """Up to ``k`` distinct front trials that span it, for the router.

        Roles, in order: ``fast`` (lowest latency), ``best`` (lowest quality loss), ``small``
        (lowest memory), ``balanced`` (closest to the ideal point on objectives scaled to [0, 1]);
        further picks are the front trial farthest from those already chosen. A trial that fills
        several roles carries all their labels (on a front where quality loss is the same
        everywhere, ``fast`` is also ``best``).
        """
        if k < 1:
            raise SearchError(f"select_variants needs k >= 1, got {k}")
        front = self.pareto
        if not front:
            raise SearchError(
                f"study '{self.study_name}' has no feasible complete trial",
                fix="run more trials, or relax the SLO / quality budget / memory capacity",
            )
        scaled = _scaled(front)
        chosen: dict[int, list[str]] = {}
        order: list[int] = []

        def pick(label: str, index: int) -> None:
            if index not in chosen:
                order.append(index)
            chosen.setdefault(index, []).append(label)

        for label, obj in (("fast", 0), ("best", 1), ("small", 2)):
            # ties go to the better of the other objectives, in the order latency, quality, memory
            ranked = sorted(range(len(front)), key=lambda i: (scaled[i][obj], *scaled[i]))
            if len(order) < k or ranked[0] in chosen:
                pick(label, ranked[0])
        if len(order) < k:
            rest = [i for i in range(len(front)) if i not in chosen]
            if rest:
                pick("balanced", min(rest, key=lambda i: math.dist(scaled[i], (0.0, 0.0, 0.0))))
        spread = 1
        while len(order) < k:
            rest = [i for i in range(len(front)) if i not in chosen]
            if not rest:
                break
            far = max(rest, key=lambda i: min(math.dist(scaled[i], scaled[j]) for j in order))
            pick(f"spread-{spread}", far)
            spread += 1
        return [VariantChoice(tuple(chosen[i]), front[i]) for i in order]

    def to_dict(self) -> dict[str, Any]:
        return {
            "study_name": self.study_name,
            "storage": self.storage,
            "target": self.target,
            "latency_source": self.latency_source,
            "objectives": list(OBJECTIVE_NAMES),
            "settings": self.settings,
            "counts": self.counts(),
            "pareto": [t.number for t in self.pareto],
            "backends": self.backends(),
            "trials": [dataclasses.asdict(t) for t in self.trials],
        }

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_dict(), indent=2, default=str))
        return p

    @classmethod
    def load(cls, path: str | Path) -> SearchResult:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise SearchError(f"{path} is not a saved search result: {exc}") from exc
        return cls.from_dict(data, where=str(path))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "the record") -> SearchResult:
        """The inverse of ``to_dict`` (a result JSON already parsed)."""
        try:
            trials = [
                TrialRecord(
                    number=int(t["number"]),
                    state=str(t["state"]),
                    params=dict(t["params"]),
                    values=tuple(t["values"]) if t["values"] is not None else None,
                    constraints=tuple(t["constraints"]) if t["constraints"] is not None else None,
                    config=t["config"],
                    reason=str(t.get("reason", "")),
                    attrs=dict(t.get("attrs", {})),
                )
                for t in data["trials"]
            ]
            return cls(
                data["study_name"],
                data["storage"],
                data["target"],
                data["latency_source"],
                data["settings"],
                trials,
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise SearchError(f"{where} is not a saved search result: {exc}") from exc


def _scaled(front: Sequence[TrialRecord]) -> list[tuple[float, float, float]]:
    """Each objective mapped to [0, 1] over the front (0 = best); constant objectives map to 0."""
    vals = [t.values or () for t in front]
    lo = [min(v[i] for v in vals) for i in range(3)]
    hi = [max(v[i] for v in vals) for i in range(3)]
    return [
        (
            (v[0] - lo[0]) / (hi[0] - lo[0]) if hi[0] > lo[0] else 0.0,
            (v[1] - lo[1]) / (hi[1] - lo[1]) if hi[1] > lo[1] else 0.0,
            (v[2] - lo[2]) / (hi[2] - lo[2]) if hi[2] > lo[2] else 0.0,
        )
        for v in vals
    ]
