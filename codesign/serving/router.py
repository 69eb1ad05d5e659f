"""Variant router: request features (+ live load) -> the variant that fits the request.

Three policies, each a frozen config that ``router.json`` stores through the config allow-list:

- ``RulesPolicy``: ordered threshold rules on features (``history_length < 32 and tier in
  (free,)`` -> ``short``), first match wins, else the default variant;
- ``BudgetedPolicy``: the best-quality variant whose predicted latency fits the request's
  remaining budget (budget minus time already spent), with headroom; the fastest if none fits;
- ``LoadAwarePolicy``: budgeted, but the prediction adds the work already queued or running on
  the device (all variants share it) and scales by the recent observed/predicted latency ratio,
  so traffic moves to cheaper variants as queues build, before deadlines are missed.

A variant taken out of rotation (failed to load, raised at run time) is skipped; the decision
then says which variant it fell back from. Every ``Decision`` can ``explain()`` itself. Deciding
is plain Python over a handful of variants (a few microseconds; ``benchmarks/router.py``).
"""

from __future__ import annotations

import dataclasses
import operator
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from codesign.build.profiling import VariantProfile
from codesign.config import Config, config_from_dict, register_config
from codesign.errors import ConfigError, RoutingError

__all__ = [
    "FEATURES",
    "BudgetedPolicy",
    "Decision",
    "FeatureConfig",
    "LoadAwarePolicy",
    "LoadTracker",
    "Policy",
    "RequestFeatures",
    "Router",
    "Rule",
    "RulesPolicy",
    "policy_from_dict",
]

FEATURES = ("candidates", "history_length", "tier", "value", "budget_ms")
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
    "in": lambda a, b: a in b,
    "not in": lambda a, b: a not in b,
}


@dataclasses.dataclass(frozen=True, slots=True)
class RequestFeatures:
    """What the router reads of a request. ``elapsed_ms`` is time already spent (parsing, queueing)."""

    candidates: int
    history_length: int | None = None
    tier: str | None = None
    value: float | None = None
    budget_ms: float | None = None
    elapsed_ms: float = 0.0


@register_config
@dataclasses.dataclass(frozen=True)
class Rule(Config):
    """``when`` maps a feature to ``(op, value)``; every condition must hold. A missing feature never matches.

    >>> Rule("short", {"history_length": ("<", 32), "tier": ("in", ("free",))}, name="light users")
    """

    variant: str
    when: Mapping[str, tuple[str, Any]]
    name: str = ""

    def __post_init__(self) -> None:
        conds: dict[str, tuple[str, Any]] = {}
        for feature, cond in dict(self.when).items():
            if feature not in FEATURES:
                raise ConfigError(
                    f"rule '{self.label}' tests unknown feature {feature!r}", fix=f"features: {FEATURES}"
                )
            if not isinstance(cond, list | tuple) or len(cond) != 2 or cond[0] not in _OPS:
                raise ConfigError(
                    f"rule '{self.label}' condition on {feature!r} is {cond!r}",
                    fix=f"write (op, value) with op one of {list(_OPS)}",
                )
            op, value = cond
            if op in ("in", "not in"):
                if not isinstance(value, list | tuple):
                    raise ConfigError(f"rule '{self.label}': '{op}' needs a list of values, got {value!r}")
                value = tuple(value)
            conds[feature] = (op, value)
        object.__setattr__(self, "when", conds)

    @property
    def label(self) -> str:
        return self.name or f"-> {self.variant}"

    def matches(self, f: RequestFeatures) -> bool:
        for feature, (op, value) in self.when.items():
            got = getattr(f, feature)
            if got is None:
                return False
            try:
                if not _OPS[op](got, value):
                    return False
            except TypeError:
                return False
        return True

    def describe(self) -> str:
        conds = " and ".join(f"{k} {op} {v!r}" for k, (op, v) in self.when.items()) or "always"
        return f"{self.label} ({conds})"


@register_config
@dataclasses.dataclass(frozen=True)
class RulesPolicy(Config):
    """First matching rule wins; ``default`` serves requests no rule matches."""

    rules: tuple[Rule, ...]
    default: str


@register_config
@dataclasses.dataclass(frozen=True)
class BudgetedPolicy(Config):
    """Best quality whose predicted latency is within (budget - elapsed) * (1 - headroom)."""

    default_budget_ms: float = 100.0
    headroom: float = 0.2

    def __post_init__(self) -> None:
        _check_budget(self.default_budget_ms, self.headroom)


@register_config
@dataclasses.dataclass(frozen=True)
class LoadAwarePolicy(Config):
    """Budgeted, with queued/running work and the recent observed/predicted ratio in the prediction.

    ``stale_s``: a variant's own ratio is trusted this long after its last batch; after that the
    ratio over all variants (the machine's current slowdown) stands in for it.
    """

    default_budget_ms: float = 100.0
    headroom: float = 0.2
    stale_s: float = 2.0

    def __post_init__(self) -> None:
        _check_budget(self.default_budget_ms, self.headroom)
        if self.stale_s <= 0:
            raise ConfigError(f"stale_s must be > 0 seconds, got {self.stale_s}")


Policy = RulesPolicy | BudgetedPolicy | LoadAwarePolicy


def _check_budget(budget_ms: float, headroom: float) -> None:
    if not budget_ms > 0:
        raise ConfigError(f"default_budget_ms must be > 0, got {budget_ms}")
    if not 0 <= headroom < 1:
        raise ConfigError(f"headroom must be in [0, 1), got {headroom}")


def policy_from_dict(data: dict[str, Any]) -> Policy:
    """A policy from its ``to_dict()`` record (allow-listed classes only)."""
    policy = config_from_dict(data)
    if not isinstance(policy, RulesPolicy | BudgetedPolicy | LoadAwarePolicy):
        raise ConfigError(f"{type(policy).__name__} is not a router policy")
    return policy


@register_config
@dataclasses.dataclass(frozen=True)
class FeatureConfig(Config):
    """How the server derives features a client did not send.

    ``history_input``: a request-level id input whose length is the user's history length (the
    count of ids other than ``padding_id``; for an id bag, its length).
    """

    history_input: str = ""
    padding_id: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    """Which variant serves a request, and why (``explain()``)."""

    variant: str
    policy: str
    kind: str  # rule | default | fits | none-fit | forced | fallback
    predicted_ms: float
    allowed_ms: float | None = None
    rule: str | None = None
    passed_over: tuple[tuple[str, float], ...] = ()  # better-quality variants predicted too slow
    fallback_from: str | None = None
    unavailable: tuple[str, ...] = ()

    def explain(self) -> str:
        parts = []
        if self.kind == "forced":
            parts.append(f"'{self.variant}' requested by the client")
        elif self.kind == "rule":
            parts.append(f"rule {self.rule} chose '{self.variant}'")
        elif self.kind == "default":
            parts.append(f"no rule matched; default '{self.variant}'")
        elif self.kind == "fits":
            parts.append(
                f"'{self.variant}' is the best quality predicted to fit: {self.predicted_ms:.2f} ms <= "
                f"{self.allowed_ms:.2f} ms allowed"
            )
        elif self.kind == "none-fit":
            parts.append(
                f"no variant fits {self.allowed_ms:.2f} ms; '{self.variant}' is the fastest "
                f"({self.predicted_ms:.2f} ms predicted)"
            )
        if self.passed_over:
            parts.append(
                "passed over " + ", ".join(f"'{n}' ({ms:.2f} ms predicted)" for n, ms in self.passed_over)
            )
        if self.fallback_from:
            parts.append(f"fell back from '{self.fallback_from}', which is out of rotation")
        elif self.unavailable:
            parts.append(f"out of rotation: {', '.join(self.unavailable)}")
        return f"{self.policy}: " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "policy": self.policy,
            "kind": self.kind,
            "predicted_ms": round(self.predicted_ms, 4),
            "explanation": self.explain(),
        }


class LoadTracker:
    """Live load per variant, written by the serving runtime and read by ``LoadAwarePolicy``.

    Counts requests and candidates waiting and running on each variant, and keeps an exponential
    moving average of observed / predicted batch latency per variant and over all variants.
    """

    def __init__(self, names: Iterable[str], smoothing: float = 0.3) -> None:
        if not 0 < smoothing <= 1:
            raise ConfigError(f"smoothing must be in (0, 1], got {smoothing}")
        self._lock = threading.Lock()
        self.smoothing = smoothing
        self.queued: dict[str, list[int]] = {n: [0, 0] for n in names}  # requests, candidates
        self.running: dict[str, list[int]] = {n: [0, 0] for n in self.queued}
        self.ratio: dict[str, float] = {}
        self.updated: dict[str, float] = {}
        self.global_ratio: float | None = None

    def enqueue(self, name: str, candidates: int) -> None:
        with self._lock:
            q = self.queued[name]
            q[0] += 1
            q[1] += candidates

    def start(self, name: str, requests: int, candidates: int) -> None:
        with self._lock:
            q, r = self.queued[name], self.running[name]
            q[0] -= requests
            q[1] -= candidates
            r[0] += requests
            r[1] += candidates

    def forget(self, name: str, requests: int, candidates: int) -> None:
        """Queued work that leaves without running (re-routed, shed, cancelled)."""
        with self._lock:
            q = self.queued[name]
            q[0] -= requests
            q[1] -= candidates

    def finish(self, name: str, requests: int, candidates: int) -> None:
        with self._lock:
            r = self.running[name]
            r[0] -= requests
            r[1] -= candidates

    def observe(self, name: str, predicted_s: float, observed_s: float) -> None:
        if predicted_s <= 0:
            return
        ratio = min(max(observed_s / predicted_s, 0.05), 50.0)
        a = self.smoothing
        with self._lock:
            old = self.ratio.get(name)
            self.ratio[name] = ratio if old is None else (1 - a) * old + a * ratio
            self.updated[name] = time.monotonic()
            g = self.global_ratio
            self.global_ratio = ratio if g is None else (1 - a) * g + a * ratio

    def correction(self, name: str, stale_s: float, now: float) -> float:
        if now - self.updated.get(name, -1e18) <= stale_s:
            return self.ratio[name]
        return self.global_ratio if self.global_ratio is not None else 1.0

    def snapshot(self) -> dict[str, dict[str, float]]:
        with self._lock:
            return {
                n: {
                    "queued_requests": self.queued[n][0],
                    "queued_candidates": self.queued[n][1],
                    "running_requests": self.running[n][0],
                    "running_candidates": self.running[n][1],
                    "latency_ratio": self.ratio.get(n, 1.0),
                }
                for n in self.queued
            }


class Router:
    """Picks a variant per request under a policy; keeps the set of variants in rotation.

    >>> router = Router(profiles, BudgetedPolicy(default_budget_ms=50))
    >>> router.decide(RequestFeatures(candidates=300, budget_ms=20)).explain()
    """

    def __init__(
        self,
        profiles: Sequence[VariantProfile],
        policy: Policy,
        load: LoadTracker | None = None,
        features: FeatureConfig | None = None,
    ) -> None:
        if not profiles:
            raise RoutingError("a router needs at least one variant profile")
        names = [p.name for p in profiles]
        if len(set(names)) != len(names):
            raise RoutingError(f"variant names must be unique, got {names}")
        self.profiles = {p.name: p for p in profiles}
        self.policy = policy
        self.features = features or FeatureConfig()
        self.load = load if load is not None else LoadTracker(names)
        # best quality first; among equals, the cheaper at a typical size first
        self.by_quality = sorted(
            names, key=lambda n: (self.profiles[n].quality_loss_pct, self.profiles[n].latency(64))
        )
        self.down: dict[str, str] = {}
        if isinstance(policy, RulesPolicy):
            for name in [r.variant for r in policy.rules] + [policy.default]:
                if name not in self.profiles:
                    raise RoutingError(
                        f"router policy names variant '{name}', which the bundle does not hold",
                        fix=f"variants: {names}",
                    )
        self.policy_name = {RulesPolicy: "rules", BudgetedPolicy: "budgeted", LoadAwarePolicy: "load-aware"}[
            type(policy)
        ]

    # ---- rotation --------------------------------------------------------------------------
    # ``down`` is replaced, never mutated: request threads iterate it while a worker marks a variant down
    def mark_down(self, name: str, reason: str) -> None:
        self.down = {**self.down, name: reason}

    def mark_up(self, name: str) -> None:
        self.down = {n: r for n, r in self.down.items() if n != name}

    @property
    def available(self) -> list[str]:
        return [n for n in self.by_quality if n not in self.down]

    # ---- deciding ----------------------------------------------------------------------------
    def decide(self, f: RequestFeatures, force: str | None = None) -> Decision:
        """The variant for one request. ``force`` names a variant the client asked for."""
        if len(self.down) == len(self.profiles):
            raise RoutingError(
                "no variant is in rotation: " + "; ".join(f"{n}: {r}" for n, r in self.down.items()),
                fix="check the server log; reload the bundle once the variants are fixed",
            )
        if force is not None:
            if force not in self.profiles:
                raise RoutingError(f"unknown variant '{force}'", fix=f"variants: {list(self.profiles)}")
            if force not in self.down:
                return Decision(force, self.policy_name, "forced", self._predict(force, f) * 1e3)
            return self.fallback(force, f)
        p = self.policy
        if isinstance(p, RulesPolicy):
            for rule in p.rules:
                if rule.matches(f):
                    if rule.variant in self.down:
                        return self.fallback(rule.variant, f)
                    return Decision(
                        rule.variant,
                        "rules",
                        "rule",
                        self._predict(rule.variant, f) * 1e3,
                        rule=rule.describe(),
                    )
            if p.default in self.down:
                return self.fallback(p.default, f)
            return Decision(p.default, "rules", "default", self._predict(p.default, f) * 1e3)
        return self._budgeted(f, p)

    def _budgeted(self, f: RequestFeatures, p: BudgetedPolicy | LoadAwarePolicy) -> Decision:
        budget = f.budget_ms if f.budget_ms is not None else p.default_budget_ms
        allowed = (budget - f.elapsed_ms) * (1 - p.headroom)
        passed: list[tuple[str, float]] = []
        fastest, fastest_ms = "", float("inf")
        outstanding = self._outstanding_s() if isinstance(p, LoadAwarePolicy) else None  # once per decision
        for name in self.by_quality:
            if name in self.down:
                continue
            ms = self._predict(name, f, outstanding) * 1e3
            if ms <= allowed:
                return Decision(
                    name,
                    self.policy_name,
                    "fits",
                    ms,
                    allowed,
                    passed_over=tuple(passed),
                    unavailable=tuple(self.down),
                )
            passed.append((name, ms))
            if ms < fastest_ms:
                fastest, fastest_ms = name, ms
        return Decision(
            fastest, self.policy_name, "none-fit", fastest_ms, allowed, unavailable=tuple(self.down)
        )

    def _predict(self, name: str, f: RequestFeatures, outstanding: float | None = None) -> float:
        curve = self.profiles[name].latency
        if not isinstance(self.policy, LoadAwarePolicy):
            return curve(f.candidates, 1)
        now = time.monotonic()
        wait = self._outstanding_s() if outstanding is None else outstanding
        # the variant's own call scales with its own observed ratio; the work queued ahead is every
        # variant's, so the machine-wide ratio scales it (else under overload the shared queue term,
        # times each variant's ratio, decides which variant looks fastest)
        own = curve(f.candidates, 1) * self.load.correction(name, self.policy.stale_s, now)
        machine = self.load.global_ratio if self.load.global_ratio is not None else 1.0
        return own + wait * machine

    def _outstanding_s(self) -> float:
        """Predicted seconds of the work queued or running on every variant: they share one device,
        so a request waits for all of it, whichever variant it goes to."""
        assert isinstance(self.policy, LoadAwarePolicy)
        total = 0.0
        for name, (q_req, q_cand) in self.load.queued.items():
            r_req, r_cand = self.load.running[name]
            curve = self.profiles[name].latency
            if q_req > 0:
                total += curve(q_cand, q_req)
            if r_req > 0:
                total += curve(r_cand, r_req)
        return total

    def fallback(self, wanted: str, f: RequestFeatures) -> Decision:
        """The next variant after ``wanted`` in quality order that is in rotation (else the best one up)."""
        order = self.by_quality
        after = order[order.index(wanted) + 1 :] + order[: order.index(wanted)][::-1]
        for name in after:
            if name not in self.down:
                return Decision(
                    name, self.policy_name, "fallback", self._predict(name, f) * 1e3, fallback_from=wanted
                )
        raise RoutingError(f"variant '{wanted}' is out of rotation and no other variant is up")

    def describe(self) -> dict[str, Any]:
        """The policy and the variants in rotation, as JSON (for /healthz, reports and the CLI)."""
        return {
            "policy": self.policy.to_dict(),
            "quality_order": self.by_quality,
            "down": dict(self.down),
            "features": self.features.to_dict(),
        }
