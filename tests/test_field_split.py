"""Field splitting (codesign.passes.field_split) and the reasons request sharing gives, on tiny models
written for each idiom: a flat feature tensor picked by index lists, a ``[B, F*d] -> [B, F, d]`` view
into pairwise dots, an outer product into ``conv1d`` (CIN), heads stacked along dim 0 (a blocker)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

import codesign
from codesign import RequestBatch, RequestSpec, offsets_from_counts
from codesign.hardware.target import get_target
from codesign.ir.program import Program
from codesign.numerics import Tolerance, compare_outputs
from codesign.passes import RequestSharing, RequestSharingConfig
from codesign.passes.manager import PassManager, PassRecord, SkipKind

HOST = get_target("host")
SHARED = Tolerance(rtol=1e-5, atol=1e-5)
FORCED = RequestSharing(RequestSharingConfig(require_predicted_gain=False))
USER, ITEM, DIM, VOCAB = 3, 2, 8, 50


def _share(program: Program) -> tuple[Program, PassRecord]:
    out, report = PassManager([FORCED], HOST).run(program)
    return out, report.passes[0]


def _check(out: Program, model: nn.Module, make: object) -> None:
    for i, counts in enumerate(([1], [4, 1, 6], [1, 1])):
        batch = make(counts, 10 + i)  # type: ignore[operator]
        with torch.no_grad():
            ok, max_abs, _ = compare_outputs(out.run(batch), model(**batch.inputs), SHARED)
        assert ok, (counts, max_abs)


def _flat_batch(counts: Sequence[int], seed: int) -> RequestBatch:
    """One float tensor: USER user ids, ITEM item ids, then one user dense and one item dense column."""
    g = torch.Generator().manual_seed(seed)
    c = torch.tensor(list(counts))
    user = torch.cat(
        [torch.randint(0, VOCAB, (len(c), USER), generator=g).float(), torch.randn(len(c), 1, generator=g)], 1
    )
    user = user.repeat_interleave(c, 0)
    n = int(c.sum())
    item = torch.cat(
        [torch.randint(0, VOCAB, (n, ITEM), generator=g).float(), torch.randn(n, 1, generator=g)], 1
    )
    x = torch.cat([user[:, :USER], item[:, :ITEM], user[:, USER:], item[:, ITEM:]], 1)
    return RequestBatch({"x": x}, offsets_from_counts(counts))


FLAT_SPEC = RequestSpec(request_columns={"x": ((0, USER), (USER + ITEM, USER + ITEM + 1))})


class FlatFM(nn.Module):
    """DeepFM-style: ids picked by an index list and cast to long, one table with per-field offsets."""

    def __init__(self) -> None:
        super().__init__()
        self.sparse_idx = list(range(USER + ITEM))
        self.dense_idx = [USER + ITEM, USER + ITEM + 1]
        self.offsets = torch.arange(USER + ITEM) * VOCAB
        self.table = nn.Embedding(VOCAB * (USER + ITEM), DIM)
        self.dnn = nn.Sequential(nn.Linear((USER + ITEM) * DIM + 2, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x[:, self.sparse_idx].long() + self.offsets
        e = self.table(ids)  # [B, F, d]
        fm = 0.5 * (e.sum(1) ** 2 - (e**2).sum(1)).sum(1, keepdim=True)
        deep = self.dnn(torch.cat([e.view(x.shape[0], -1), x[:, self.dense_idx]], -1))
        return torch.sigmoid(fm + deep).squeeze(-1)


def test_flat_tensor_fields_are_split_through_lookups_sums_and_the_first_linear() -> None:
    model = FlatFM().eval()
    program = codesign.capture(model, _flat_batch([2, 3], 0), FLAT_SPEC, make_batch=_flat_batch)
    out, record = _share(program)
    stats = record.stats
    assert record.modified, record.skip
    assert stats["reductions_split"] >= 2  # the FM's sum over fields and sum of squares
    assert stats["linears_split"] == 1  # the DNN's first layer: W_u x_u + W_c x_c
    assert stats["flops_moved_to_request_level"] > 0.2 * stats["flops_before"]
    _check(out, model, _flat_batch)


class ViewDots(nn.Module):
    """DLRM-style: embeddings concatenated flat, viewed as [B, F, d], pairwise dots by bmm + tril."""

    def __init__(self) -> None:
        super().__init__()
        self.user = nn.ModuleList(nn.Embedding(VOCAB, DIM) for _ in range(USER))
        self.item = nn.ModuleList(nn.Embedding(VOCAB, DIM) for _ in range(ITEM))
        rows, cols = torch.tril_indices(USER + ITEM, USER + ITEM, offset=-1)
        self.register_buffer("rows", rows)
        self.register_buffer("cols", cols)
        self.top = nn.Linear(len(rows), 1)

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        embs = [t(user[:, i]) for i, t in enumerate(self.user)] + [
            t(item[:, i]) for i, t in enumerate(self.item)
        ]
        flat = torch.cat(embs, 1)
        t = flat.view(flat.shape[0], -1, DIM)
        z = torch.bmm(t, t.transpose(1, 2))[:, self.rows, self.cols]
        return self.top(z).squeeze(-1)


def _two_batch(counts: Sequence[int], seed: int) -> RequestBatch:
    g = torch.Generator().manual_seed(seed)
    c = torch.tensor(list(counts))
    user = torch.randint(0, VOCAB, (len(c), USER), generator=g).repeat_interleave(c, 0)
    item = torch.randint(0, VOCAB, (int(c.sum()), ITEM), generator=g)
    return RequestBatch({"user": user, "item": item}, offsets_from_counts(counts))


def test_flat_concat_viewed_as_fields_splits_the_gram_matrix() -> None:
    model = ViewDots().eval()
    spec = RequestSpec(request_inputs=("user",))
    program = codesign.capture(model, _two_batch([2, 3], 0), spec, make_batch=_two_batch)
    out, record = _share(program)
    assert record.modified and record.stats["pairwise_interactions_split"] == 1, record.stats
    _check(out, model, _two_batch)


class OuterConv(nn.Module):
    """CIN-style: field outer products by einsum, reshaped to [B, F*F, d], mixed by conv1d."""

    def __init__(self) -> None:
        super().__init__()
        f = USER + ITEM
        self.tables = nn.ModuleList(nn.Embedding(VOCAB, DIM) for _ in range(f))
        self.conv = nn.Conv1d(f * f, 4, kernel_size=1)
        self.out = nn.Linear(4, 1)

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        ids = torch.cat([user, item], 1)
        x0 = torch.stack([t(ids[:, i]) for i, t in enumerate(self.tables)], 1)
        z = torch.einsum("bhd,bmd->bhmd", x0, x0).reshape(x0.shape[0], -1, DIM)
        return self.out(torch.relu(self.conv(z)).sum(2)).squeeze(-1)


def test_outer_product_keeps_the_user_block_apart_into_conv1d() -> None:
    model = OuterConv().eval()
    spec = RequestSpec(request_inputs=("user",))
    program = codesign.capture(model, _two_batch([2, 3], 0), spec, make_batch=_two_batch)
    out, record = _share(program)
    stats = record.stats
    assert record.modified and stats["outer_products_split"] == 1, stats
    assert stats["linears_split"] >= 1  # the conv1d over the user x user block is a product of its own
    # the user x user block is (3/5)^2 of the conv's input channels
    assert stats["flops_moved_to_request_level"] > 0.2 * stats["flops_before"]
    _check(out, model, _two_batch)


class HeadsFirst(nn.Module):
    """User projections stacked along dim 0 ([heads, B, d]): dim 0 is no longer the candidate rows."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 32), nn.Linear(8, 32)
        self.mix = nn.Linear(32, 32)
        self.out = nn.Linear(32, 1)

    def forward(self, user: torch.Tensor, ad: torch.Tensor) -> torch.Tensor:
        heads = torch.stack([self.a(user), self.b(user)])
        return self.out(self.mix(torch.relu(heads.sum(0))) * ad).squeeze(-1)


def _dense_batch(counts: Sequence[int], seed: int) -> RequestBatch:
    g = torch.Generator().manual_seed(seed)
    c = torch.tensor(list(counts))
    user = torch.randn(len(c), 8, generator=g).repeat_interleave(c, 0)
    return RequestBatch(
        {"user": user, "ad": torch.randn(int(c.sum()), 32, generator=g)}, offsets_from_counts(counts)
    )


def test_reasons_name_the_blocking_node_its_share_and_the_fix() -> None:
    model = HeadsFirst().eval()
    program = codesign.capture(
        model, _dense_batch([2, 3], 0), RequestSpec(request_inputs=("user",)), make_batch=_dense_batch
    )
    out, record = _share(program)
    (first, *_) = record.stats["blocked"]
    assert first["node"] == "stack" and first["op"] == "stack.default", first
    assert "dim 0" in first["why"] and "dim 1" in first["fix"]
    # the stack, its sum and the mix layer stay per candidate because of the stack alone
    assert first["flops_share"] > 0.3, first
    _check(out, model, _dense_batch)


class OnlyHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 32)

    def forward(self, user: torch.Tensor, ad: torch.Tensor) -> torch.Tensor:
        return (torch.stack([user, user]).sum(0).relu() @ self.a.weight.t() * ad).sum(-1)


def test_nothing_shared_names_the_first_blocker() -> None:
    model = OnlyHeads().eval()
    program = codesign.capture(
        model, _dense_batch([2, 3], 0), RequestSpec(request_inputs=("user",)), make_batch=_dense_batch
    )
    _, record = _share(program)
    assert not record.modified and record.skip is not None and record.skip.kind is SkipKind.NOT_APPLICABLE
    assert "stack" in record.skip.message and "%" in record.skip.message, record.skip
    assert "dim 1" in record.skip.fix


def test_measured_gate_keeps_only_what_times_faster() -> None:
    """On the host the gate times both programs: the user-sequence model wins by a wide margin."""
    from tests.conftest import tiny_program

    _, report = PassManager([RequestSharing()], HOST).run(tiny_program("useq"))
    record = report.passes[0]
    assert record.modified, record.skip
    timings = record.stats["measured_s"]
    assert set(timings) == {"1x1024", "16x64"}
    assert all(t["shared"] < t["original"] for t in timings.values()), timings
    assert record.measured_latency_after_s is not None and record.predicted_latency_after_s is None


class ProfileBags(nn.Module):
    """User profile ids [B, F] through a 2-D ``nn.EmbeddingBag`` (fixed-size bags), padding id 0."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.profile = nn.EmbeddingBag(VOCAB, DIM, mode=mode, padding_idx=0)
        self.item = nn.Embedding(VOCAB, DIM)
        self.top = nn.Linear(2 * DIM, 1)

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        return self.top(torch.cat([self.profile(user), self.item(item).sum(1)], -1)).squeeze(-1)


def test_fixed_size_bags_of_user_ids_are_looked_up_once_per_request() -> None:
    for mode in ("sum", "mean"):
        model = ProfileBags(mode).eval()
        spec = RequestSpec(request_inputs=("user",))
        program = codesign.capture(model, _two_batch([2, 3], 0), spec, make_batch=_two_batch)
        out, record = _share(program)
        assert record.stats["fixed_bags_as_lookups"] == 1, record.stats
        # the lookup reads one row of ids per request: no embedding_bag over N candidates remains
        assert "embedding_bag" not in out.graph_module.code
        _check(out, model, _two_batch)
        zeros = _two_batch([3, 2], 5)  # padding ids inside the bags, one bag all padding
        zeros.inputs["user"][:3] = 0  # request 0 (3 candidates): an all-padding bag
        zeros.inputs["user"][3:, 0] = 0  # request 1: one padding id
        with torch.no_grad():
            ok, max_abs, _ = compare_outputs(out.run(zeros), model(**zeros.inputs), SHARED)
        assert ok, (mode, max_abs)
