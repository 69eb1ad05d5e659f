"""Router: latency curves, the three policies, explanations, rotation and fallback (no models needed)."""

from __future__ import annotations

import json
import time

import pytest

from codesign.build.profiling import LatencyCurve, VariantProfile
from codesign.errors import ConfigError, RoutingError
from codesign.serving.router import (
    BudgetedPolicy,
    LoadAwarePolicy,
    LoadTracker,
    RequestFeatures,
    Router,
    Rule,
    RulesPolicy,
    policy_from_dict,
)

MS = 1e-3


def curve(ms_at_16: float, ms_at_1024: float, source: str = "given") -> LatencyCurve:
    """A straight-line curve through two candidate counts, the same for every request count."""
    row = (ms_at_16 * MS, ms_at_1024 * MS)
    return LatencyCurve((16, 1024), (1,), (row,), source)


def profiles() -> list[VariantProfile]:
    return [
        VariantProfile("full", curve(4, 40), 0.0, "reference", 10_000),
        VariantProfile("short", curve(2, 12), 0.3, "given", 5_000),
        VariantProfile("tiny", curve(1, 5), 1.2, "given", 2_000),
    ]


def test_latency_curve_interpolates_extends_and_floors() -> None:
    c = LatencyCurve((16, 64), (1, 4), ((1.0, 2.0), (3.0, 6.0)), "given")
    assert c(16, 1) == 1.0 and c(64, 4) == 6.0
    assert c(40, 1) == pytest.approx(1.5)  # linear between candidate points
    assert c(64, 2) == pytest.approx(2.0 + (6.0 - 2.0) / 3)  # linear between request rows
    assert c(112, 1) == pytest.approx(3.0)  # beyond the grid: the last slope continues
    assert c(1, 1) == 1.0  # below the grid: never cheaper than the smallest point
    assert c(64, 100) == 6.0  # more requests than measured: the last row
    assert LatencyCurve.from_dict(json.loads(json.dumps(c.to_dict()))) == c


@pytest.mark.parametrize(
    ("candidates", "requests", "seconds", "match"),
    [
        ((64, 16), (1,), ((1.0, 2.0),), "increasing"),
        ((16,), (1,), ((1.0, 2.0),), "rows"),
        ((16,), (1,), ((float("nan"),),), "finite"),
        ((), (1,), ((),), "at least one"),
    ],
)
def test_latency_curve_refuses_bad_grids(candidates, requests, seconds, match) -> None:
    with pytest.raises(ConfigError, match=match):
        LatencyCurve(candidates, requests, seconds, "given")


def test_rules_first_match_wins_and_missing_features_never_match() -> None:
    policy = RulesPolicy(
        (
            Rule("full", {"tier": ("==", "premium")}, name="premium"),
            Rule("tiny", {"history_length": ("<", 8), "candidates": (">=", 500)}, name="cold-large"),
            Rule("short", {"history_length": ("<", 32)}),
        ),
        default="full",
    )
    r = Router(profiles(), policy)
    d = r.decide(RequestFeatures(candidates=600, history_length=4, tier="premium"))
    assert (d.variant, d.kind) == ("full", "rule") and "premium" in d.explain()
    d = r.decide(RequestFeatures(candidates=600, history_length=4))
    assert d.variant == "tiny" and "cold-large (history_length < 8 and candidates >= 500)" in d.explain()
    assert r.decide(RequestFeatures(candidates=10, history_length=20)).variant == "short"
    d = r.decide(RequestFeatures(candidates=10))  # no history_length: the history rules cannot match
    assert (d.variant, d.kind) == ("full", "default") and "no rule matched" in d.explain()


def test_rules_validate_features_ops_and_variant_names() -> None:
    with pytest.raises(ConfigError, match="unknown feature 'age'"):
        Rule("x", {"age": ("<", 3)})
    with pytest.raises(ConfigError, match="op one of"):
        Rule("x", {"candidates": ("~", 3)})
    with pytest.raises(ConfigError, match="needs a list"):
        Rule("x", {"tier": ("in", "gold")})
    with pytest.raises(RoutingError, match="'medium', which the bundle does not hold"):
        Router(profiles(), RulesPolicy((Rule("medium", {}),), default="full"))


def test_policies_round_trip_through_json() -> None:
    for policy in (
        RulesPolicy(
            (Rule("short", {"tier": ("in", ("free", "basic"))}, name="cheap tiers"),), default="full"
        ),
        BudgetedPolicy(default_budget_ms=30.0, headroom=0.1),
        LoadAwarePolicy(default_budget_ms=80.0, stale_s=1.0),
    ):
        assert policy_from_dict(json.loads(policy.to_json())) == policy
    with pytest.raises(ConfigError, match="headroom"):
        BudgetedPolicy(headroom=1.5)


def test_budgeted_picks_best_quality_that_fits_the_remaining_budget() -> None:
    r = Router(profiles(), BudgetedPolicy(default_budget_ms=100.0, headroom=0.2))
    assert r.decide(RequestFeatures(candidates=64)).variant == "full"  # 100 ms default budget
    d = r.decide(RequestFeatures(candidates=1024, budget_ms=20.0))  # full needs 40 ms > 16 allowed
    assert (d.variant, d.kind) == ("short", "fits")
    assert d.allowed_ms == pytest.approx(16.0) and d.passed_over[0][0] == "full"
    assert "passed over 'full' (40.00 ms predicted)" in d.explain()
    # time already spent counts against the budget
    assert r.decide(RequestFeatures(candidates=1024, budget_ms=20.0, elapsed_ms=8.0)).variant == "tiny"
    d = r.decide(RequestFeatures(candidates=1024, budget_ms=2.0))
    assert (d.variant, d.kind) == ("tiny", "none-fit") and "no variant fits" in d.explain()


def test_load_aware_moves_to_cheaper_variants_as_work_queues() -> None:
    load = LoadTracker(["full", "short", "tiny"])
    r = Router(profiles(), LoadAwarePolicy(default_budget_ms=50.0, headroom=0.0), load)
    f = RequestFeatures(candidates=256)
    assert r.decide(f).variant == "full"  # idle: ~13 ms fits 50 ms
    for _ in range(4):
        load.enqueue("full", 256)  # 4 requests of 256 ahead (40 ms): full would end at ~53 ms
    d = r.decide(f)
    assert d.variant == "short" and d.passed_over[0][0] == "full"
    load.start("full", 4, 1024)  # running work counts as well as queued work
    assert r.decide(f).variant == "short"
    for _ in range(2):
        load.enqueue("tiny", 1024)  # work on another variant shares the device: it counts too
    d = r.decide(f)
    assert (d.variant, d.kind) == ("tiny", "none-fit")
    load.start("tiny", 2, 2048)
    load.finish("tiny", 2, 2048)
    load.finish("full", 4, 1024)
    assert r.decide(f).variant == "full"
    # the machine runs 5x slower than profiled (observed / predicted): predictions scale with it
    load.observe("tiny", predicted_s=0.002, observed_s=0.010)
    tight = RequestFeatures(candidates=256, budget_ms=15.0)
    assert r.decide(tight).variant == "tiny"  # full and short are stale: the machine-wide ratio applies
    assert load.correction("tiny", 2.0, time.monotonic()) == pytest.approx(5.0)


def test_out_of_rotation_variants_fall_back_to_the_next_best() -> None:
    r = Router(profiles(), RulesPolicy((Rule("short", {"tier": ("==", "free")}),), default="full"))
    r.mark_down("short", "RuntimeError: boom")
    d = r.decide(RequestFeatures(candidates=10, tier="free"))
    assert (d.variant, d.kind, d.fallback_from) == ("tiny", "fallback", "short")
    assert "fell back from 'short'" in d.explain()
    r.mark_down("tiny", "load failed")
    assert r.decide(RequestFeatures(candidates=10, tier="free")).variant == "full"  # better quality is next
    assert r.decide(RequestFeatures(candidates=10), force="tiny").variant == "full"
    b = Router(profiles(), BudgetedPolicy())
    b.mark_down("full", "x")
    d = b.decide(RequestFeatures(candidates=64))
    assert d.variant == "short" and "out of rotation: full" in d.explain()
    r.mark_down("full", "x")
    with pytest.raises(RoutingError, match="no variant is in rotation"):
        r.decide(RequestFeatures(candidates=10))


def test_forcing_an_unknown_variant_is_a_routing_error() -> None:
    r = Router(profiles(), BudgetedPolicy())
    with pytest.raises(RoutingError, match="unknown variant 'medium'"):
        r.decide(RequestFeatures(candidates=1), force="medium")
    d = r.decide(RequestFeatures(candidates=1), force="tiny")
    assert (d.variant, d.kind) == ("tiny", "forced")
