"""Conformance: every registered pass, on every example model, keeps the contract every pass is held to.

For each pass (``pass_names()``, never a hand-kept list) and example, ``PassManager([name], target)`` runs
on the tiny program with the pass's default config, on the host and, where the pass cannot serve the
host, also on the first target that it can (a multi-device host, an FP8 GPU planned for on this CPU):

- the output scores like the *eager original model* within the pass's stated tolerance, on fresh
  multi-request batches from 1 to 1024 candidates;
- the input program is left as it was (graph code and every parameter);
- the record is complete: its stats are a dict, and every record that modified nothing carries a typed
  skip (a ``SkipKind`` and a message), one that modified has none;
- the pass is idempotent: run again on its own output it modifies nothing, or leaves the same graph.

Gated passes (``require_predicted_gain``) keep a rewrite exactly when the cost model predicts a gain; that is
checked on datasheet targets and a fixed CPU spec, so the outcome does not depend on this machine.
Pass-specific behaviour lives in the per-pass test files.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from codesign.numerics import compare_outputs
from codesign.passes import pass_by_name, pass_names
from codesign.passes.manager import PassManager, PassRecord, SkipKind, SkipReason
from tests.conftest import (
    EXAMPLES,
    FIXED_CPU,
    pass_available,
    resolve_target,
    run_pass,
    tiny_program,
    tiny_workload,
)

# candidates per request of each check batch: one candidate, jagged requests, and 1024 over four requests
CHECK_COUNTS = ([1], [3, 1, 40], [256, 256, 256, 256])
CHECK_SEED = 4242  # not a seed the manager's own checks use
# where a pass is unavailable on the host, the first of these on which it is available is used too
FALLBACK_TARGETS = (("host", 2), ("h100", 1), ("h100", 2))
# passes on tiny examples that cost tens of seconds each (per-layer FP8 calibration of 26-35 layers):
# they run in `make test-slow`; the cheap examples keep the pass in the fast suite
HEAVY = {("selective_fp8", "dlrm"), ("selective_fp8", "dcnv2")}


def _targets(name: str) -> list[tuple[str, int]]:
    if pass_available(name, "host"):
        return [("host", 1)]
    fallback = next((t for t in FALLBACK_TARGETS if pass_available(name, *t)), None)
    return [("host", 1)] + ([fallback] if fallback is not None else [])


def _cases() -> Iterator[Any]:
    for name in pass_names():
        for target, devices in _targets(name):
            for example in EXAMPLES:
                heavy = (name, example) in HEAVY and target != "host"
                yield pytest.param(
                    name,
                    example,
                    target,
                    devices,
                    id=f"{name}-{example}-{target}x{devices}",
                    marks=[pytest.mark.slow] if heavy else [],
                )


def _state(program: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in program.graph_module.state_dict().items()}


def _check_record(record: PassRecord, name: str) -> None:
    assert record.name == name
    assert record.uuid == pass_by_name(name)().uuid()
    assert isinstance(record.stats, dict)
    assert record.seconds >= 0
    # modified <=> no skip; a skip is typed and says what happened
    assert (record.skip is None) == record.modified, record
    assert record.modified or (
        isinstance(record.skip, SkipReason)
        and isinstance(record.skip.kind, SkipKind)
        and bool(record.skip.message.strip())
    ), record.skip
    as_dict = record.to_dict()
    json.dumps(as_dict)  # records go into bundle manifests and reports
    assert as_dict["skip"] == (None if record.skip is None else record.skip.to_dict())


@pytest.mark.parametrize(("name", "example", "target", "devices"), list(_cases()))
def test_pass_conforms(name: str, example: str, target: str, devices: int) -> None:
    program = tiny_program(example)
    # the graph itself, not only its generated code (which changes only on recompile)
    code, graph, params = program.graph_module.code, str(program.graph), _state(program)
    metadata = copy.deepcopy(program.metadata)
    out, record = run_pass(name, example, target, devices)
    _check_record(record, name)
    assert (record.ops_before, record.ops_after) == (program.op_count(), out.op_count())
    out.verify()

    # numerics: against the eager model the program was captured from, not against the pass's input
    p = pass_by_name(name)()
    w = tiny_workload(example)
    for i, counts in enumerate(CHECK_COUNTS):
        batch = w.make_batch(counts, CHECK_SEED + i)
        with torch.no_grad():
            ok, max_abs, max_rel = compare_outputs(out.run(batch), w.model(**batch.inputs), p.tolerance)
        assert ok, f"{counts}: max abs {max_abs:.3g}, max rel {max_rel:.3g} beyond {p.tolerance}"

    # the input program is untouched (the manager rewrites copies)
    assert program.graph_module.code == code and str(program.graph) == graph
    assert program.metadata == metadata  # e.g. a sharding plan belongs to the output only
    now = _state(program)
    assert now.keys() == params.keys() and all(torch.equal(now[k], params[k]) for k in params)

    # idempotent: nothing left to rewrite, or the same graph again
    again, report = PassManager([name], resolve_target(target, devices)).run(out)
    (second,) = report.passes
    _check_record(second, name)
    assert not second.modified or (
        again.graph_module.code == out.graph_module.code and again.op_count() == out.op_count()
    ), second


# ---- the cost-model gate --------------------------------------------------------------------------

GATED = [n for n in pass_names() if pass_by_name(n)().gated]
# deterministic targets (datasheet numbers, a fixed CPU): the decisions below never depend on this machine
GATE_TARGETS = (FIXED_CPU.name, "h100")


def test_there_are_gated_passes() -> None:
    assert {"request_sharing", "group_embedding_bags", "fuse_parallel_linears"} <= set(GATED)


@pytest.mark.parametrize("name", GATED)
def test_gated_pass_keeps_its_rewrite_exactly_when_a_gain_is_predicted(name: str) -> None:
    records: list[tuple[str, str, PassRecord, bool]] = []
    for target in GATE_TARGETS:
        for example in EXAMPLES:
            if (name, example) in HEAVY or not pass_available(name, target):
                continue  # the heavy FP8 runs are checked by test_pass_conforms in make test-slow
            out, record = run_pass(name, example, target)
            unchanged = out.graph_module.code == tiny_program(example).graph_module.code
            records.append((target, example, record, unchanged))
    rewritten = [r for r in records if r[2].predicted_latency_before_s is not None]
    assert rewritten, f"{name} rewrote no example on {GATE_TARGETS}: the gate was never asked"
    for target, example, rec, unchanged in rewritten:
        before, after = rec.predicted_latency_before_s, rec.predicted_latency_after_s
        assert after is not None and before > 0 and after > 0, (target, example)
        gain = after < before
        assert rec.modified == gain, (target, example, before, after)
        assert (rec.skip is None) == gain, (target, example, rec.skip)
        assert gain or (rec.skip is not None and rec.skip.kind is SkipKind.NO_PREDICTED_GAIN)
        assert unchanged != gain, (target, example)  # a discarded rewrite leaves the input program
    # a pass that rewrote nothing made no prediction and was not judged by the gate
    for target, example, rec, _ in records:
        assert rec.predicted_latency_before_s is not None or (
            rec.predicted_latency_after_s is None
            and rec.skip is not None
            and rec.skip.kind is not SkipKind.NO_PREDICTED_GAIN
        ), (target, example)
