"""Request sharing on the zoo (models written from scratch in practitioners' idioms, tests/zoo).

For every model: user-only work exists (its user fields are declared request-level), so the rewrite
fires; the FLOPs it moves to the request level are real; outputs match the eager model on random
multi-request batches, single-candidate requests included; the shared program survives a bundle.
The per-idiom rules (field splits, blocks, blockers) are tested on tiny models in test_field_split.py.
"""

from __future__ import annotations

import pytest
import torch

import codesign
from codesign.analysis import node_value, symbolic_dim
from codesign.hardware.target import get_target
from codesign.ir.program import Program
from codesign.numerics import Tolerance, compare_outputs
from codesign.passes import DeadCodeElimination, RequestSharing, RequestSharingConfig
from codesign.passes.manager import PassManager, PassRecord
from tests.zoo import ZOO, captured, names

HOST = get_target("host")
# the same ops on fewer rows, some sums re-associated (user part + candidate part): fp32 rounding only
SHARED = Tolerance(rtol=1e-5, atol=1e-5)
COUNTS = ([1], [1, 1, 1], [3, 1, 7], [1, 12, 1, 2], [40, 1])
FORCED = RequestSharing(RequestSharingConfig(require_predicted_gain=False))

# The share of FLOPs (at 1024 candidates / 16 requests) each model's user side can move at least:
# measured on this pass and written down, so a rule that stops firing on an idiom fails here.
MIN_MOVED = {
    "fm": 0.25,
    "wide_deep": 0.25,
    "deepfm": 0.2,
    "dcn_v1": 0.15,
    "dcn_v2": 0.05,
    "cin": 0.02,
    "autoint": 0.05,
    "autoint_mha": 0.06,  # user fields' embeddings, Q/K/V and residual of the first layer
    "din": 0.1,
    "dlrm_lists": 0.03,
    "dlrm_reference": 0.03,
    "mmoe": 0.3,
    "nfm": 0.04,
    "pnn": 0.15,
}

_shared: dict[str, tuple[Program, PassRecord]] = {}


def _share(name: str) -> tuple[Program, PassRecord]:
    if name not in _shared:
        out, report = PassManager([FORCED, DeadCodeElimination()], HOST).run(captured(name))
        _shared[name] = (out, report.passes[0])
    return _shared[name]


def test_every_zoo_model_has_a_floor() -> None:
    assert set(MIN_MOVED) == set(names())


SLOW = {"autoint_mha"}  # capturing it takes ~10 s (see test_zoo.FAST_NAMES)


@pytest.mark.slow
def test_multihead_attention_projects_user_fields_once_per_request() -> None:
    # nn.MultiheadAttention transposes [batch, fields, d] to [fields, batch, d] inside (batch_first or
    # not); the region is rewritten rows first, so the first layer's Q/K/V of the user fields run on
    # one row per request
    out, record = _share("autoint_mha")
    assert record.stats["regions_made_rows_first"] >= 1
    rows = symbolic_dim(node_value(out.placeholders()["dense"]).shape[0])
    on_requests = [
        n
        for n in out.graph.nodes
        if n.target is torch.ops.aten.linear.default
        and str(n.args[1].target) == "layers.0.attn.in_proj_weight"
        and symbolic_dim(node_value(n).shape[0]) != rows
    ]
    assert len(on_requests) == 1, [n.name for n in on_requests]


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(MIN_MOVED)]
)
def test_sharing_fires_and_keeps_outputs(name: str) -> None:
    out, record = _share(name)
    assert record.modified and out.takes_request_offsets, record.skip
    moved = record.stats["flops_moved_to_request_level"] / record.stats["flops_before"]
    assert moved >= MIN_MOVED[name], (name, moved)
    assert record.stats["measured_matmul_flops_after"] <= record.stats["measured_matmul_flops_before"]
    workload = ZOO[name]()
    for i, counts in enumerate(COUNTS):
        batch = workload.make_batch(counts, 100 + i)
        with torch.no_grad():
            ok, max_abs, max_rel = compare_outputs(out.run(batch), workload.model(**batch.inputs), SHARED)
        assert ok, (name, counts, max_abs, max_rel)


@pytest.mark.parametrize(
    "name",
    [
        "dlrm_lists",
        pytest.param("deepfm", marks=pytest.mark.slow),
        pytest.param("cin", marks=pytest.mark.slow),
    ],
)
def test_shared_zoo_bundle_round_trips(name: str, tmp_path: object) -> None:
    out, _ = _share(name)
    variant = codesign.compile(out, passes=[], backend="eager")
    loaded = codesign.load(variant.save(tmp_path / name, verify="in_process"))  # type: ignore[operator]
    workload = ZOO[name]()
    batch = workload.make_batch([2, 1, 5], 7)
    ok, max_abs, _ = compare_outputs(loaded.score(batch), workload.model(**batch.inputs), SHARED)
    assert ok and loaded.takes_request_offsets, max_abs
