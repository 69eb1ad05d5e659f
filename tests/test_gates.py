"""Gated pass decisions checked against measurement (``verify_gates``, ``codesign compile --verify-gates``)."""

from __future__ import annotations

import pytest

import codesign
from codesign.errors import PassError
from codesign.hardware.target import get_target
from codesign.passes import RequestSharing, RequestSharingConfig, default_passes
from codesign.passes.manager import GateCheck, PassManager, SkipKind
from codesign.passes.measured_gate import GATE_LAYOUTS, KEEP_BELOW
from tests.conftest import tiny_program, tiny_workload

HOST = get_target("host")


def _check(kept: bool, measured: float) -> GateCheck:
    return GateCheck(
        kept=kept, decided_by="cost model", predicted_ratio=0.9, measured_ratio=measured, measured_s={}
    )


def test_a_decision_is_wrong_only_when_measurement_contradicts_it_by_over_ten_percent() -> None:
    assert _check(kept=True, measured=1.15).wrong  # kept, runs 15 % slower
    assert not _check(kept=True, measured=1.05).wrong  # kept, within noise
    assert _check(kept=False, measured=0.85).wrong  # discarded, would have run 15 % faster
    assert not _check(kept=False, measured=0.95).wrong
    assert _check(kept=True, measured=1.15).to_dict()["wrong"] is True


def test_verify_gates_measures_every_gated_decision() -> None:
    # dcnv2 tiny has two gated decisions: grouping its 26 bags (here left to the cost model) and request
    # sharing (which times its own rewrite on this machine)
    manager = PassManager(default_passes(), HOST, verify_gates=True, gate_by_measurement=False)
    _, report = manager.run(tiny_program("dcnv2"))
    checks = {r.name: r for r in report.passes if r.gate_check is not None}
    assert {"request_sharing", "group_embedding_bags"} <= set(checks)
    assert checks["group_embedding_bags"].gate_check["decided_by"] == "cost model"  # type: ignore[index]
    assert checks["request_sharing"].gate_check["decided_by"] == "measurement"  # type: ignore[index]
    for record in checks.values():
        check = record.gate_check
        assert check is not None and check["kept"] == record.modified, record.name
        if check["decided_by"] == "cost model":  # the record says what the prediction decided
            assert check["kept"] == (check["predicted_ratio"] < 1.0), record.name
        assert set(check["measured_s"]) == {name for name, _ in GATE_LAYOUTS}
        assert check["measured_ratio"] > 0 and all(v["before"] > 0 for v in check["measured_s"].values())
    # passes without a gate are not checked
    assert all(r.gate_check is None for r in report.passes if r.name in ("cse", "dce"))


def test_gates_on_this_machine_decide_by_timing() -> None:
    # target host is this machine: the grouping rewrite is timed against its input, not predicted
    _, report = PassManager(default_passes(), HOST).run(tiny_program("dcnv2"))
    grouping = next(r for r in report.passes if r.name == "group_embedding_bags")
    before, after = grouping.measured_latency_before_s, grouping.measured_latency_after_s
    assert before is not None and after is not None and grouping.predicted_latency_before_s is None
    if grouping.modified:
        assert after < before * KEEP_BELOW
    else:
        assert grouping.skip is not None and grouping.skip.kind is SkipKind.NO_MEASURED_GAIN, grouping.skip


def test_verify_gates_needs_the_target_here() -> None:
    with pytest.raises(PassError, match="not this machine"):
        PassManager(default_passes(), get_target("h100"), verify_gates=True)


def test_a_program_too_narrow_for_the_gate_batch_is_gated_on_the_cost_model() -> None:
    # captured for at most 100 candidates: the 1x1024 gate batch would fail the program's own guard
    program = codesign.capture(tiny_workload("dcnv2"), max_candidates=100)
    _, report = PassManager(default_passes(), HOST).run(program)
    gated = [r for r in report.passes if r.name in ("request_sharing", "group_embedding_bags")]
    assert gated and all(r.measured_latency_before_s is None for r in gated)
    assert all(r.skip is None or r.skip.kind is not SkipKind.NO_MEASURED_GAIN for r in gated)


def test_a_pass_that_opts_out_of_timing_is_gated_on_the_cost_model() -> None:
    predicted = RequestSharing(RequestSharingConfig(gate_by_measurement=False, split_fields=False))
    _, report = PassManager([predicted], HOST).run(tiny_program("useq"))
    record = report.passes[0]
    assert record.measured_latency_before_s is None and record.predicted_latency_before_s is not None
