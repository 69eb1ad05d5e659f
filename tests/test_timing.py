from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import pytest

from codesign.hardware.timing import median_latency, robust_interleaved, robust_latency


def test_median_latency_reports_the_median_after_warmup() -> None:
    calls: list[float] = []
    sleeps = iter([0.05, 0.0, 0.002, 0.0])  # warm-up is slow, then fast, slow, fast

    def fn() -> None:
        calls.append(1)
        time.sleep(next(sleeps))

    t = median_latency(fn, repeats=3, warmup=1)
    assert len(calls) == 4
    assert t < 0.01  # the slow warm-up call is not counted; the median ignores one outlier
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        median_latency(fn, repeats=0)


def _blocky(
    slow_calls: set[int], slow_s: float = 0.02, fast_s: float = 0.001
) -> tuple[Callable[[], None], list[int]]:
    """A function whose calls numbered in ``slow_calls`` (0-based, warm-up included) sleep longer."""
    calls: list[int] = []

    def fn() -> None:
        time.sleep(slow_s if len(calls) in slow_calls else fast_s)
        calls.append(1)

    return fn, calls


def test_robust_latency_sets_a_slow_block_aside_and_says_so() -> None:
    # warm-up is call 0; blocks of 3 calls: calls 4-6 (block 2) are all slow, a burst of load
    fn, calls = _blocky({4, 5, 6})
    t = robust_latency(fn, repeats=3, warmup=1, blocks=3)
    assert t.seconds < 0.005  # the burst is not the figure
    assert t.first_spread > 5  # the first three blocks disagreed ...
    assert t.remeasured >= 1 and t.blocks == 3 + t.remeasured  # ... so a block was added
    assert t.spread <= 0.25 + 1e-9 or t.remeasured == 6
    assert len(calls) == 1 + 3 * t.blocks
    quiet, _ = _blocky(set(), fast_s=0.005)  # 5 ms sleeps: scheduler jitter stays far below the 25% limit
    steady = robust_latency(quiet, repeats=3, warmup=1)
    assert steady.remeasured == 0 and steady.blocks == 3
    # median_latency alone takes the burst: 3 of 5 calls slow
    burst, _ = _blocky({1, 2, 3})
    assert median_latency(burst, repeats=5, warmup=1) > 0.015


def test_robust_interleaved_re_measures_every_function_while_one_disagrees() -> None:
    slow, _ = _blocky({1})  # first timed round of 'a' is slow
    quiet, quiet_calls = _blocky(set())
    timed = robust_interleaved({"a": slow, "b": quiet}, rounds=3)
    assert timed["a"].seconds < 0.005 and timed["a"].remeasured >= 1
    assert timed["b"].remeasured == timed["a"].remeasured  # interleaved: both got the extra blocks
    assert len(quiet_calls) == timed["b"].blocks


def test_an_injected_slow_run_does_not_reach_the_curve_or_the_router() -> None:
    """A burst of load during one curve point (the routed bundle that stored L(256) = 88 ms between
    0.67 ms and 5.1 ms) is re-measured, and the router still picks the best variant at 256."""
    import dataclasses

    import codesign
    from codesign.build.profiling import profile_variant
    from codesign.serving.deployment import Bundle
    from codesign.serving.router import BudgetedPolicy, RequestFeatures
    from tests.conftest import tiny_workload

    best = codesign.compile(tiny_workload("din"), backend="eager", target="host", passes=[])
    slow_left = [4]  # the first calls at 256 candidates: the warm-up and the first blocks

    def bursty(**inputs: object) -> object:
        if inputs["cand_item"].shape[0] == 256 and slow_left[0] > 0:  # type: ignore[attr-defined]
            slow_left[0] -= 1
            time.sleep(0.15)
        return best.runner(**inputs)

    injected = dataclasses.replace(best, runner=bursty)
    profile = profile_variant(injected, candidates=(64, 256, 1024), requests=(1,), repeats=3)
    curve = profile.latency
    assert slow_left == [0]  # the slow calls did happen
    assert curve(256) <= curve(1024) * 1.1, curve.to_dict()
    assert curve(256) < 0.1
    worse = profile_variant(
        best, name="worse", quality_loss_pct=1.0, candidates=(64, 256, 1024), requests=(1,)
    )
    bundle = Bundle.build(
        {"best": injected, "worse": best},
        profiles={"best": profile, "worse": worse},
        policy=BudgetedPolicy(default_budget_ms=max(60.0, 30 * curve(1024) * 1e3)),
    )
    decision = bundle.router().decide(RequestFeatures(candidates=256))
    assert decision.variant == "best", decision.explain()


def test_a_curve_that_stays_out_of_order_is_re_measured_then_lowered() -> None:
    import codesign
    from codesign.build.profiling import measured_curve
    from codesign.hardware.timing import Timing
    from tests.conftest import tiny_workload

    variant = codesign.compile(tiny_workload("din"), backend="eager", target="host", passes=[])
    asked: list[list[tuple[int, int]]] = []

    def stubborn(fns: Mapping[tuple[int, int], object], rounds: int) -> dict[tuple[int, int], Timing]:
        """A clock on which 64 candidates always looks slower than 256."""
        asked.append(sorted(fns))
        figures = {16: 1e-3, 64: 9e-3, 256: 2e-3}
        return {p: Timing(figures[p[1]], 0.0, 0.0, 3, 0) for p in fns}

    curve = measured_curve(variant, (16, 64, 256), (1,), timer=stubborn)
    assert asked[0] == [(1, 16), (1, 64), (1, 256)]
    assert asked[1:] == [[(1, 64), (1, 256)]] * 2  # re-measured with its neighbour, twice
    assert curve.remeasured == ((1, 64), (1, 256)) and curve.adjusted == ((1, 64),)
    assert curve.seconds == ((1e-3, 2e-3, 2e-3),)
