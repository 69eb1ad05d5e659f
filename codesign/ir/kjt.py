"""TorchRec ``KeyedJaggedTensor`` inputs, captured through the lengths form codesign already knows.

A TorchRec model takes its sparse features as one ``KeyedJaggedTensor`` (``forward(features, dense)``).
Capture replaces each KJT input by a dict of its keys, each ``{"values": [n_values], "lengths": [N]}``
(the ``jagged_lengths`` form), and wraps the model in ``KJTAdapter``, which rebuilds the KJT from those
tensors inside the exported graph. Everything downstream (passes, backends, bundles, the wire format,
batch surgery) then sees plain tensors, and a bundle loads without torchrec. A spec names a key as
``"features.user_hist"``: in ``request_inputs`` it marks that key's bags request-level.

torchrec is optional: nothing here imports it unless a batch holds a KJT (found by its type's name).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from codesign.errors import SpecError

__all__ = ["KJTAdapter", "adapt_for_kjt", "adapter", "expand_kjts", "is_kjt", "kjt_keys"]


def is_kjt(value: Any) -> bool:
    """A TorchRec KeyedJaggedTensor (checked by type, so torchrec need not be imported here)."""
    cls = type(value)
    return cls.__name__ == "KeyedJaggedTensor" and cls.__module__.startswith("torchrec")


def kjt_keys(inputs: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """Top-level KJT inputs and their keys, in order."""
    return {name: tuple(v.keys()) for name, v in inputs.items() if is_kjt(v)}


def _expanded(name: str, kjt: Any) -> dict[str, dict[str, torch.Tensor]]:
    if kjt.weights_or_none() is not None:
        raise SpecError(
            f"input {name!r} is a weighted KeyedJaggedTensor; codesign takes unweighted ones",
            fix="pass the per-id weights as their own jagged input",
        )
    out = {}
    names = list(kjt.keys())
    for key in names:
        jt = kjt[key]
        out[key] = {"values": jt.values(), "lengths": jt.lengths()}
    return out


def expand_kjts(inputs: Mapping[str, Any], keys: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """The inputs with every top-level KJT replaced by ``{key: {"values", "lengths"}}``.

    ``keys`` (the capture's) checks that a KJT has the keys, in the order, the program was captured with.
    """
    out = dict(inputs)
    for name, value in inputs.items():
        if not is_kjt(value):
            continue
        if keys is not None and name in keys and tuple(value.keys()) != tuple(keys[name]):
            raise SpecError(
                f"input {name!r} has keys {list(value.keys())}; the program was captured with {list(keys[name])}",
                fix="build the KeyedJaggedTensor with the capture's keys, in that order",
            )
        out[name] = _expanded(name, value)
    return out


class KJTAdapter(torch.nn.Module):
    """The user's model, taking each KJT input as per-key values and lengths and rebuilding it inside.

    Built by ``adapter(model, keys, names)``: its ``forward`` has the model's keyword inputs as named
    parameters (torch.export matches ``dynamic_shapes`` to the signature's names).
    """

    def __init__(self, model: torch.nn.Module, keys: Mapping[str, Sequence[str]]) -> None:
        super().__init__()
        self.model = model
        self.kjt_inputs = {name: tuple(k) for name, k in keys.items()}

    def run(self, inputs: Mapping[str, Any]) -> Any:
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        call = dict(inputs)
        for name, keys in self.kjt_inputs.items():
            per_key = inputs[name]
            call[name] = KeyedJaggedTensor(
                keys=list(keys),
                values=torch.cat([per_key[k]["values"] for k in keys]),
                lengths=torch.cat([per_key[k]["lengths"] for k in keys]),
            )
        return self.model(**call)


def adapter(model: torch.nn.Module, keys: Mapping[str, Sequence[str]], names: Sequence[str]) -> KJTAdapter:
    """A KJTAdapter whose ``forward`` takes exactly ``names`` (the batch's top-level inputs)."""
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    signature = inspect.Signature(params)

    def forward(self: KJTAdapter, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        return self.run({k: v for k, v in bound.arguments.items() if k != "self"})

    forward.__signature__ = signature  # type: ignore[attr-defined]  # what inspect.signature reads
    cls = type("KJTAdapter", (KJTAdapter,), {"forward": forward, "__module__": __name__})
    return cls(model, keys)  # type: ignore[no-any-return]  # a KJTAdapter subclass


def _spec_for(spec: Any, keys: Mapping[str, Sequence[str]]) -> Any:
    """The spec over the expanded inputs: each key's values tied to its lengths; ``name.key`` request
    inputs become that key's values."""
    import dataclasses

    known = {f"{name}.{k}" for name, ks in keys.items() for k in ks}
    request = []
    for path in spec.request_inputs:
        top = path.split(".", 1)[0]
        if top in keys:
            if path not in known:
                raise SpecError(
                    f"RequestSpec names {path!r}, but KeyedJaggedTensor input {top!r} has keys {list(keys[top])}",
                    fix=f"name a key as '{top}.<key>'",
                )
            request.append(f"{path}.values")
        else:
            request.append(path)
    lengths = dict(spec.jagged_lengths)
    lengths.update({f"{name}.{k}.values": f"{name}.{k}.lengths" for name, ks in keys.items() for k in ks})
    return dataclasses.replace(spec, request_inputs=tuple(request), jagged_lengths=lengths)


def adapt_for_kjt(
    model: torch.nn.Module,
    example: Any,
    spec: Any,
    make_batch: Callable[[Sequence[int], int], Any] | None,
) -> tuple[torch.nn.Module, Any, Any, Callable[[Sequence[int], int], Any] | None]:
    """(model, example, spec, make_batch) over expanded inputs when the example holds KJTs, else as given."""
    keys = kjt_keys(example.inputs)
    if not keys:
        return model, example, spec, make_batch
    from codesign.ir.request import RequestBatch

    def expand(batch: Any) -> Any:
        return RequestBatch(expand_kjts(batch.inputs, keys), batch.offsets)

    wrapped = None if make_batch is None else (lambda counts, seed: expand(make_batch(counts, seed)))
    model = adapter(model, keys, list(example.inputs)).eval()
    return model, expand(example), _spec_for(spec, keys), wrapped
