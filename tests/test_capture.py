from __future__ import annotations

import pytest
import torch

import codesign
from codesign import RequestBatch, RequestSpec, offsets_from_counts
from codesign.errors import CaptureError, SpecError
from codesign.numerics import Tolerance, compare_outputs
from tests.conftest import tiny_program, tiny_workload

EXACT = Tolerance(rtol=1e-5, atol=1e-6)


def test_every_example_captures_with_dynamic_candidates(example_name: str) -> None:
    w = tiny_workload(example_name)
    program = tiny_program(example_name)
    program.verify()
    for counts in ([1], [2, 1, 30], [64] * 3):
        batch = w.make_batch(counts, 42)
        with torch.no_grad():
            ok, err, _ = compare_outputs(program.run(batch), w.model(**batch.inputs), EXACT)
        assert ok, (counts, err)


class _Branchy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tower = _Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tower(x)


class _Gate(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent Python control flow
            return x * 2
        return x


class _FixedBatch(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).reshape(6, 2, 2).sum(-1)  # hard-codes 6 candidates


def _batch(n: int = 6) -> RequestBatch:
    return RequestBatch({"x": torch.randn(n, 4)}, offsets_from_counts([n]))


def test_data_dependent_branch_names_module_line_and_fix() -> None:
    with pytest.raises(CaptureError) as info:
        codesign.capture(_Branchy(), _batch(), RequestSpec())
    msg = str(info.value)
    assert "module 'tower' (_Gate)" in msg
    assert "if x.sum() > 0" in msg
    assert "torch.where" in (info.value.fix or "")


def test_hard_coded_batch_size_is_explained() -> None:
    with pytest.raises(CaptureError) as info:
        codesign.capture(_FixedBatch(), _batch(), RequestSpec())
    assert "fixes the candidate count" in str(info.value)
    assert "reshape(6, 2, 2)" in str(info.value)
    assert "x.shape[0]" in (info.value.fix or "")


def test_single_candidate_example_and_wrong_types_are_clear_errors() -> None:
    with pytest.raises(SpecError, match="at least 2 candidate rows"):
        codesign.capture(_FixedBatch(), _batch(1), RequestSpec())
    with pytest.raises(SpecError, match="RequestBatch"):
        codesign.capture(_FixedBatch(), {"x": torch.randn(3, 4)}, RequestSpec())  # type: ignore[arg-type]
    with pytest.raises(CaptureError, match=r"nn.Module"):
        codesign.capture(lambda x: x, _batch(), RequestSpec())  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="'nope'"):
        codesign.capture(_FixedBatch(), _batch(), RequestSpec(request_inputs=("nope",)))


def test_model_ref_from_file(tmp_path: pytest.TempPathFactory, repo_root: object) -> None:
    path = tmp_path / "mymodel.py"  # type: ignore[operator]
    path.write_text(
        "import torch\nfrom codesign import Workload, RequestBatch, RequestSpec, offsets_from_counts\n"
        "def make():\n"
        "    m = torch.nn.Linear(3, 1)\n"
        "    def batch(counts, seed):\n"
        "        g = torch.Generator().manual_seed(seed)\n"
        "        return RequestBatch({'input': torch.randn(sum(counts), 3, generator=g)}, offsets_from_counts(counts))\n"
        "    return Workload('lin', m, RequestSpec(), batch)\n"
        "def wrong():\n    return 3\n"
    )
    w = codesign.load_model_ref(f"{path}:make")
    assert codesign.capture(w).op_count() > 0
    from codesign.errors import ModelRefError

    with pytest.raises(ModelRefError, match=r"not a codesign.Workload"):
        codesign.load_model_ref(f"{path}:wrong")
    with pytest.raises(ModelRefError, match="no callable 'missing'"):
        codesign.load_model_ref(f"{path}:missing")
    with pytest.raises(ModelRefError, match="examples"):
        codesign.load_model_ref("no_such_example")


def test_a_model_file_imports_the_modules_beside_it(tmp_path: pytest.TempPathFactory) -> None:
    folder = tmp_path / "project"  # type: ignore[operator]
    folder.mkdir()
    (folder / "towers_beside_model.py").write_text(
        "import torch\nclass Tower(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.l = torch.nn.Linear(3, 1)\n"
        "    def forward(self, input):\n        return self.l(input)\n"
    )
    (folder / "model.py").write_text(
        "import torch\nfrom towers_beside_model import Tower\n"
        "from codesign import Workload, RequestBatch, RequestSpec, offsets_from_counts\n"
        "def make():\n"
        "    from towers_beside_model import Tower as Late  # imported when the factory runs, too\n"
        "    def batch(counts, seed):\n"
        "        g = torch.Generator().manual_seed(seed)\n"
        "        return RequestBatch({'input': torch.randn(sum(counts), 3, generator=g)}, offsets_from_counts(counts))\n"
        "    return Workload('tower', Late(), RequestSpec(), batch)\n"
    )
    w = codesign.load_model_ref(f"{folder}/model.py:make")
    assert type(w.model).__name__ == "Tower"


class _TensordotCross(torch.nn.Module):
    """DCN v1's cross layer as reference code writes it: x0 * (x . w) + b + x with torch.tensordot."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4) * 0.1)
        self.b = torch.nn.Parameter(torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xw = torch.tensordot(x, self.w, dims=([-1], [0]))
        return (x * xw.unsqueeze(-1) + self.b + x).sum(-1)


def test_tensordot_model_that_captures_also_compiles_for_one_candidate() -> None:
    # torch.tensordot's kernel adds a `candidates != 1` guard when the backends re-export the graph with
    # size-oblivious shapes; capture decomposes it, so compile(passes=[]) no longer fails with a raw
    # "Constraints violated ... != 1" from torch.export
    model = _TensordotCross().eval()
    program = codesign.capture(model, _batch(), RequestSpec())
    assert program.metadata["decomposed_at_capture"] == ["aten.tensordot.default"]
    variant = codesign.compile(program, passes=[], backend="eager")
    for n in (1, 2, 7):
        batch = _batch(n)
        with torch.no_grad():
            ok, err, _ = compare_outputs(variant.score(batch), model(**batch.inputs), EXACT)
        assert ok, (n, err)


class _FieldAttention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.attn(x, x, x, need_weights=False)
        return out.sum((1, 2))


def test_multihead_attention_over_fields_captures_with_size_oblivious_shapes() -> None:
    # nn.MultiheadAttention(batch_first=True) runs its in-projection Linear on a transposed [fields, batch,
    # d] tensor; the Linear kernel's contiguity test guards `batch != 1` under a size-oblivious re-export.
    # Capture copies that input to contiguous layout first, so the program re-exports like any other
    # (request sharing can then run on it) and compiles for one candidate
    model = _FieldAttention().eval()
    batch = RequestBatch({"x": torch.randn(6, 3, 8)}, offsets_from_counts([6]))
    program = codesign.capture(model, batch, RequestSpec())
    assert "linear" in program.metadata["materialized_at_capture"]
    assert "size_oblivious_export" not in program.metadata
    program.export(size_oblivious_only=True)
    variant = codesign.compile(program, passes=[], backend="eager")
    for n in (1, 7):
        x = torch.randn(n, 3, 8)
        got = variant.score(RequestBatch({"x": x}, offsets_from_counts([n])))
        torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)


class _Contract(torch.nn.Module):
    """A small scorer whose last step breaks (or keeps) the output contract, by ``mode``."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.proj = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        s = self.proj(x)
        if self.mode == "filter":  # drops the candidates it does not like
            return s[s[:, 0] > 0]
        if self.mode == "mean":  # one number for the whole batch
            return s.mean()
        if self.mode == "softmax_over_batch":  # normalizes across every request in the batch
            return torch.softmax(s[:, 0], dim=0)
        if self.mode == "pairwise":  # [N, N]: the row shape depends on the batch
            return s @ s.T
        if self.mode == "nan":
            return torch.log(s[:, 0] - 1e3)
        if self.mode == "good":
            return torch.sigmoid(s[:, 0]), s
        raise AssertionError(self.mode)


def _random_batch(n: int = 6) -> RequestBatch:
    return RequestBatch({"x": torch.randn(n, 4)}, offsets_from_counts([2, n - 2]))


@pytest.mark.parametrize(
    ("mode", "match"),
    [
        ("filter", r"output 0 has shape \[\d+, 2\] for a batch of \d+ candidates"),
        ("mean", "output 0 has a scalar"),
        ("softmax_over_batch", "output 0 of a request changes when another request is scored"),
        ("pairwise", r"output 0 is float32 \[n_candidates, \d+\] at \d+ candidates but"),
        ("nan", "output 0 is NaN or infinite at candidate row 0"),
    ],
)
def test_capture_refuses_models_that_break_the_output_contract(mode: str, match: str) -> None:
    """Each of these captured and compiled before, then failed or scored wrongly in the server."""
    torch.manual_seed(0)
    with pytest.raises(CaptureError, match=match) as info:
        codesign.capture(_Contract(mode), _random_batch(), RequestSpec())
    assert info.value.fix


def test_capture_records_the_output_schema() -> None:
    torch.manual_seed(0)
    program = codesign.capture(_Contract("good"), _random_batch(), RequestSpec())
    assert program.metadata["outputs"] == [
        {"dtype": "float32", "shape": ["n_candidates"]},
        {"dtype": "float32", "shape": ["n_candidates", 2]},
    ]
