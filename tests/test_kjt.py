"""TorchRec KeyedJaggedTensor inputs: a model written for TorchRec (an EmbeddingBagCollection over a KJT)
captures, compiles, scores KJT batches, serves on the wire and loads as a bundle without torchrec."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import codesign
from codesign import RequestBatch, RequestSpec, Workload, offsets_from_counts
from codesign.errors import InputNameError, SpecError
from codesign.ir.request import concat_batches
from codesign.serving.wire import RequestSchema

jagged_tensor = pytest.importorskip("torchrec.sparse.jagged_tensor")  # installed by `make setup`
KeyedJaggedTensor = jagged_tensor.KeyedJaggedTensor
KEYS = ["user_hist", "item_tags"]


class Ranker(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from torchrec.modules.embedding_configs import EmbeddingBagConfig
        from torchrec.modules.embedding_modules import EmbeddingBagCollection

        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name="hist", embedding_dim=8, num_embeddings=100, feature_names=["user_hist"]
                ),
                EmbeddingBagConfig(
                    name="tags", embedding_dim=8, num_embeddings=30, feature_names=["item_tags"]
                ),
            ],
            device=torch.device("cpu"),
        )
        self.dense = torch.nn.Linear(4, 8)
        self.head = torch.nn.Linear(24, 1)

    def forward(self, features: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        pooled = self.ebc(features).values()  # [N, 16]: both keys' bags, pooled
        return self.head(torch.cat([pooled, self.dense(dense)], 1)).squeeze(1)


def _batch(counts: list[int], seed: int) -> RequestBatch:
    g = torch.Generator().manual_seed(seed)
    n = sum(counts)
    hist, hist_lengths = [], []
    for c in counts:  # the user's history: one bag per request, on each of its candidates
        bag = torch.randint(0, 100, (int(torch.randint(1, 5, (), generator=g)),), generator=g)
        hist += [bag] * c
        hist_lengths += [bag.numel()] * c
    tag_lengths = torch.randint(0, 3, (n,), generator=g)
    tags = torch.randint(0, 30, (int(tag_lengths.sum()),), generator=g)
    kjt = KeyedJaggedTensor(
        keys=KEYS,
        values=torch.cat([torch.cat(hist), tags]),
        lengths=torch.cat([torch.tensor(hist_lengths), tag_lengths]),
    )
    return RequestBatch(
        {"features": kjt, "dense": torch.randn(n, 4, generator=g)}, offsets_from_counts(counts)
    )


@pytest.fixture(scope="module")
def workload() -> Workload:
    torch.manual_seed(0)
    return Workload(
        "torchrec_ranker", Ranker().eval(), RequestSpec(request_inputs=("features.user_hist",)), _batch
    )


def _eager(workload: Workload, batch: RequestBatch) -> torch.Tensor:
    with torch.no_grad():
        return workload.model(**batch.inputs)


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])  # 10 s
def test_a_kjt_model_captures_compiles_and_scores_kjt_batches(workload: Workload, backend: str) -> None:
    program = codesign.capture(workload)
    assert program.spec.request_inputs == ("features.user_hist.values",)
    assert program.spec.jagged_lengths["features.item_tags.values"] == "features.item_tags.lengths"
    variant = codesign.compile(program, backend=backend, micro_batch=4)
    for counts in ([1], [3, 5, 1], [2] * 6):
        batch = _batch(counts, 31)
        torch.testing.assert_close(variant.score(batch), _eager(workload, batch), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            variant.score(dict(batch.inputs), counts=counts), _eager(workload, batch), rtol=1e-4, atol=1e-5
        )


def test_the_bundle_loads_and_serves_without_torchrec(workload: Workload, tmp_path: Path) -> None:
    variant = codesign.compile(workload, backend="eager")
    folder = variant.save(tmp_path / "kjt", verify="none")
    script = (
        "import sys, codesign\n"
        f"v = codesign.load({str(folder)!r})\n"  # scores the reference batch against its stored outputs
        "assert not any(m.startswith('torchrec') for m in sys.modules), 'torchrec was imported'\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
    schema = RequestSchema.from_reference(variant.spec, variant.reference_inputs, variant.id_bounds)
    batch = _batch([2, 3], 32)
    flat = codesign.ir.schema.as_request_batch(batch, spec=variant.spec, template=variant.reference_inputs)
    parsed = [schema.parse(json.loads(json.dumps(schema.encode(flat, r))))[0] for r in range(2)]
    torch.testing.assert_close(
        variant.score(concat_batches(parsed, variant.spec)), _eager(workload, batch), rtol=1e-5, atol=1e-6
    )


def test_kjts_with_other_keys_or_weights_are_refused(workload: Workload) -> None:
    variant = codesign.compile(workload, backend="eager", passes=[])
    batch = _batch([2, 2], 33)
    kjt = batch.inputs["features"]
    swapped = KeyedJaggedTensor(keys=KEYS[::-1], values=kjt.values(), lengths=kjt.lengths())
    with pytest.raises(
        InputNameError, match="has keys \\['item_tags', 'user_hist'\\]; the program was captured with"
    ):
        variant.score(dict(batch.inputs, features=swapped), counts=[2, 2])
    weighted = KeyedJaggedTensor(
        keys=KEYS, values=kjt.values(), lengths=kjt.lengths(), weights=torch.ones(kjt.values().numel())
    )
    with pytest.raises(SpecError, match="weighted KeyedJaggedTensor"):
        codesign.capture(
            workload.model, RequestBatch(dict(batch.inputs, features=weighted), batch.offsets), workload.spec
        )
    with pytest.raises(SpecError, match="has keys \\['user_hist', 'item_tags'\\]"):
        codesign.capture(workload.model, batch, RequestSpec(request_inputs=("features.nope",)))
