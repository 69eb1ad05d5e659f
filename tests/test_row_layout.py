"""Rows first (codesign.passes.row_layout) on tiny models written sequence-first, as transformer code is:
fields on dim 0, the batch on dim 1, heads merged into the batch. The rewrite must be exact, keep the
rows on dim 0 everywhere it knows the ops, and so let request sharing reach the user fields' Q/K/V."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

import codesign
from codesign import RequestBatch, RequestSpec, offsets_from_counts
from codesign.analysis import node_value, symbolic_dim
from codesign.hardware.target import get_target
from codesign.ir.program import Program
from codesign.numerics import Tolerance, compare_outputs
from codesign.passes import RequestSharing, RequestSharingConfig
from codesign.passes.manager import PassManager
from codesign.passes.row_layout import rows_first

HOST = get_target("host")
EXACT = Tolerance(rtol=1e-6, atol=1e-6)
SHARED = Tolerance(rtol=1e-5, atol=1e-5)
USER, ITEM, DIM, HEADS, VOCAB = 2, 3, 8, 2, 40
SPEC = RequestSpec(request_inputs=("user_ids",))


def _batch(counts: Sequence[int], seed: int) -> RequestBatch:
    g = torch.Generator().manual_seed(seed)
    c = torch.tensor(list(counts))
    user = torch.randint(0, VOCAB, (len(c), USER), generator=g).repeat_interleave(c, 0)
    item = torch.randint(0, VOCAB, (int(c.sum()), ITEM), generator=g)
    return RequestBatch({"user_ids": user, "item_ids": item}, offsets_from_counts(counts))


class SeqFirstAttention(nn.Module):
    """Self-attention over fields written sequence-first: ``[F, B, d]``, heads merged into the batch."""

    def __init__(self, tail: str = "mlp") -> None:
        super().__init__()
        torch.manual_seed(0)  # the same weights for every instance: captures are cached by tail
        self.user = nn.Embedding(VOCAB, DIM)
        self.item = nn.Embedding(VOCAB, DIM)
        self.q, self.k, self.v = (nn.Linear(DIM, DIM) for _ in range(3))
        self.out = nn.Linear(DIM, DIM)
        self.head = nn.Linear((USER + ITEM) * DIM, 1)
        self.tail = tail

    def forward(self, user_ids: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.user(user_ids), self.item(item_ids)], 1)  # [B, F, d]
        s = x.transpose(0, 1)  # [F, B, d]
        f, b, _ = s.shape
        dh = DIM // HEADS
        q, k, v = (p(s).reshape(f, b * HEADS, dh).transpose(0, 1) for p in (self.q, self.k, self.v))
        attn = torch.softmax(torch.bmm(q, k.transpose(1, 2)) / math.sqrt(dh), dim=-1)
        o = torch.bmm(attn, v).transpose(0, 1).reshape(f, b, DIM)  # [F, B, d]
        if self.tail == "dead_end":  # an op the rewrite does not know, and nothing after it comes back
            return torch.cumsum(o, dim=0).sum((0, 2))
        y = torch.relu(self.out(o) + s).transpose(0, 1)  # [B, F, d]
        logit = self.head(y.flatten(1)).squeeze(-1)
        if self.tail == "cumsum":  # an op the rewrite does not know, on the [F, B, d] value, beside the rest
            logit = logit + torch.cumsum(s, dim=0)[-1].sum(-1)
        return torch.sigmoid(logit)


_CAPTURED: dict[str, Program] = {}


def _capture(model: SeqFirstAttention) -> Program:
    """Captured once per tail (capture is the slow part); callers copy before rewriting."""
    if model.tail not in _CAPTURED:
        _CAPTURED[model.tail] = codesign.capture(model.eval(), _batch([2, 3], 0), SPEC, make_batch=_batch)
    return _CAPTURED[model.tail]


def _rows(program: Program) -> object:
    return symbolic_dim(node_value(program.placeholders()["item_ids"]).shape[0])


def _off_dim0(program: Program) -> list[str]:
    """Nodes whose value carries the candidate rows anywhere but alone on dim 0."""
    rows = _rows(program)
    bad = []
    for node in program.graph.nodes:
        val = node_value(node)
        if val is None or val.dim() == 0 or node.op != "call_function":
            continue
        dims = [symbolic_dim(d) for d in val.shape]
        if any(rows in getattr(d, "free_symbols", ()) or d == rows for d in dims[1:]) or (
            dims[0] != rows and getattr(dims[0], "free_symbols", set()) & getattr(rows, "free_symbols", set())
        ):
            bad.append(node.name)
    return bad


def _equal(program: Program, model: nn.Module, tol: Tolerance) -> None:
    for i, counts in enumerate(([1], [4, 1, 6], [2, 2])):
        batch = _batch(counts, 10 + i)
        with torch.no_grad():
            ok, max_abs, _ = compare_outputs(program.run(batch), model(**batch.inputs), tol)
        assert ok, (counts, max_abs)


def test_sequence_first_attention_is_rewritten_rows_first_and_exact() -> None:
    model = SeqFirstAttention()
    program = _capture(model)
    assert _off_dim0(program)  # the model as written: [F, B, d] and [B*H, F, dh]
    work = program.shallow_copy()
    assert rows_first(work, _rows(work)) >= 1
    work.recompile()
    assert _off_dim0(work) == []
    _equal(work, model, EXACT)


def test_an_op_it_does_not_know_gets_the_original_layout_back() -> None:
    model = SeqFirstAttention(tail="cumsum")  # cumsum over the fields of [F, B, d]
    work = _capture(model).shallow_copy()
    assert rows_first(work, _rows(work)) >= 1
    work.recompile()
    cumsum = next(n for n in work.graph.nodes if n.target is torch.ops.aten.cumsum.default)
    assert symbolic_dim(node_value(cumsum).shape[1]) == _rows(work)  # it still reads [F, B, d]
    _equal(work, model, EXACT)


def test_a_region_that_never_comes_back_rows_first_is_left_alone() -> None:
    program = _capture(SeqFirstAttention(tail="dead_end"))
    work = program.shallow_copy()
    assert rows_first(work, _rows(work)) == 0
    work.recompile()
    assert work.graph_module.code == program.graph_module.code


class SeqFirstOneField(nn.Module):
    """Sequence-first code with one field: [1, B, d], a size-1 dim beside the rows."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.user = nn.Embedding(VOCAB, DIM)
        self.item = nn.Embedding(VOCAB, DIM)
        self.lin = nn.Linear(DIM, DIM)

    def forward(self, user_ids: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
        x = (self.user(user_ids).sum(1) + self.item(item_ids).sum(1)).unsqueeze(1)  # [B, 1, d]
        s = x.transpose(0, 1).contiguous()  # [1, B, d]
        y = torch.relu(self.lin(s)).transpose(0, 1)  # back to [B, 1, d]: the region comes back
        return y.flatten(1).sum(-1)


def test_a_size_one_dim_beside_the_rows_still_comes_back_rows_first() -> None:
    model = SeqFirstOneField().eval()
    work = codesign.capture(model, _batch([2, 3], 0), SPEC, make_batch=_batch).shallow_copy()
    assert rows_first(work, _rows(work)) == 1
    work.recompile()
    assert _off_dim0(work) == []
    _equal(work, model, EXACT)


def test_request_sharing_computes_user_field_projections_once_per_request() -> None:
    model = SeqFirstAttention()
    forced = RequestSharing(RequestSharingConfig(require_predicted_gain=False))
    out, report = PassManager([forced], HOST).run(_capture(model))
    record = report.passes[0]
    assert record.modified and record.stats["regions_made_rows_first"] >= 1, record.skip
    rows = _rows(out)
    weights = {"q_weight", "k_weight", "v_weight"}
    on_requests = {
        str(n.args[1].target).replace(".", "_")
        for n in out.graph.nodes
        if n.target is torch.ops.aten.linear.default
        and symbolic_dim(node_value(n).shape[0]) != rows
        and getattr(n.args[1], "op", None) == "get_attr"
    }
    assert weights <= on_requests, on_requests
    _equal(out, model, SHARED)
