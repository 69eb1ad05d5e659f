"""The Open Inference Protocol (KServe v2) over a bundle's wire format, with Triton's binary tensor extension.

The server speaks it beside ``/v1/score`` so that standard clients (``tritonclient.http``, KServe)
score a codesign bundle without a codesign client. One request is one user and its candidates, as
on ``/v1/score``; its tensors map to the wire fields (``GET /v2/models/{name}`` lists them):

- a candidate field ``k`` is an input ``k`` of shape ``[n_candidates, *row]``;
- a user field ``k`` is an input ``k`` of shape ``[1, *row]`` (or ``row``: the leading 1 may be left out);
- an id bag per candidate is two inputs, ``k`` (all ids, flat) and ``k.lengths`` (one count per
  candidate); a user id bag is one input ``k`` of its ids;
- request ``parameters`` carry the context (``budget_ms``, ``tier``, ``variant`` ...) and ``id``
  the request id; the reply's ``parameters`` say which variant scored it and how long it took.

The outputs are the model's output tensors, ``scores`` (or ``scores_0``, ``scores_1`` ... for
several heads), one row per candidate. Inputs may come as JSON ``data`` or as binary data after the
JSON header (``Inference-Header-Content-Length``); outputs come as binary when the request asks for
it (``binary_data_output``, or ``binary_data`` on a requested output), as tritonclient does by default.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from codesign.errors import RequestError, RequestTooLargeError
from codesign.serving.wire import CONTEXT_KEYS, RequestSchema

__all__ = ["HEADER_LENGTH", "InferRequest", "OutputInfo", "encode_infer", "model_metadata", "parse_infer"]

HEADER_LENGTH = "inference-header-content-length"
LENGTHS = ".lengths"

_DATATYPES = {
    torch.float32: "FP32",
    torch.float64: "FP64",
    torch.float16: "FP16",
    torch.bfloat16: "BF16",
    torch.int64: "INT64",
    torch.int32: "INT32",
    torch.int16: "INT16",
    torch.int8: "INT8",
    torch.uint8: "UINT8",
    torch.bool: "BOOL",
}
_NUMPY = {
    "FP32": np.float32,
    "FP64": np.float64,
    "FP16": np.float16,
    "INT64": np.int64,
    "INT32": np.int32,
    "INT16": np.int16,
    "INT8": np.int8,
    "UINT64": np.uint64,
    "UINT32": np.uint32,
    "UINT16": np.uint16,
    "UINT8": np.uint8,
    "BOOL": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class OutputInfo:
    """One output tensor of the model: its v2 name, datatype and per-candidate shape."""

    name: str
    dtype: torch.dtype
    row_shape: tuple[int, ...]

    @classmethod
    def from_reference(cls, outputs: Sequence[torch.Tensor]) -> tuple[OutputInfo, ...]:
        names = ["scores"] if len(outputs) == 1 else [f"scores_{i}" for i in range(len(outputs))]
        return tuple(cls(n, o.dtype, tuple(o.shape[1:])) for n, o in zip(names, outputs, strict=True))


def datatype(dtype: torch.dtype) -> str:
    return _DATATYPES.get(dtype, "FP32")


def model_metadata(
    schema: RequestSchema, name: str, outputs: Sequence[OutputInfo], platform: str
) -> dict[str, Any]:
    """``GET /v2/models/{name}``: every input tensor (shape -1 where the candidate count goes) and output."""
    inputs: list[dict[str, Any]] = []
    for f in schema.fields:
        dt = datatype(f.dtype)
        if f.jagged:
            inputs.append({"name": f.key, "datatype": dt, "shape": [-1]})
            if f.section == "candidates":
                inputs.append({"name": f.key + LENGTHS, "datatype": "INT64", "shape": [-1]})
        elif f.section == "user":
            inputs.append({"name": f.key, "datatype": dt, "shape": [1, *f.row_shape]})
        else:
            inputs.append({"name": f.key, "datatype": dt, "shape": [-1, *f.row_shape]})
    return {
        "name": name,
        "versions": ["1"],
        "platform": platform,
        "inputs": inputs,
        "outputs": [
            {"name": o.name, "datatype": datatype(o.dtype), "shape": [-1, *o.row_shape]} for o in outputs
        ],
        "parameters": {"context": list(CONTEXT_KEYS), "max_candidates": schema.max_candidates},
    }


@dataclasses.dataclass(frozen=True)
class InferRequest:
    """A v2 infer request as the wire body ``/v1/score`` takes, plus how to answer it."""

    body: dict[str, Any]
    id: str | None
    outputs: tuple[str, ...]  # requested output names (empty: all)
    binary: frozenset[str]  # outputs to send as binary data


def parse_infer(
    raw: bytes, header_length: str | None, schema: RequestSchema, outputs: Sequence[OutputInfo]
) -> InferRequest:
    """Check a v2 infer request (JSON, or JSON header + binary tensors) and build its wire body."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            n = -1
        if not 0 <= n <= len(raw):
            raise RequestError(
                f"Inference-Header-Content-Length {header_length!r} is not a length within the {len(raw)}-byte body"
            )
        head, blob = raw[:n], raw[n:]
    else:
        head, blob = raw, b""
    try:
        req = json.loads(head)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RequestError(f"the infer request header is not valid JSON ({type(exc).__name__})") from exc
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list):
        raise RequestError(
            "an infer request is a JSON object with an 'inputs' list", fix="see GET /v2/models/{name}"
        )
    rid = req.get("id")
    if rid is not None and not isinstance(rid, str):
        raise RequestError(f"'id' must be a string, got {type(rid).__name__}")
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError("'parameters' must be a JSON object")
    context = {k: v for k, v in params.items() if k in CONTEXT_KEYS}
    unknown = set(params) - set(CONTEXT_KEYS) - {"binary_data_output"}
    if unknown:
        raise RequestError(
            f"unknown request parameters {sorted(unknown)}", fix=f"parameters: {list(CONTEXT_KEYS)}"
        )
    if rid is not None:
        context.setdefault("request_id", rid)
    tensors = _tensors(req["inputs"], blob)
    body = _wire_body(tensors, schema)
    body["context"] = context
    names = {o.name for o in outputs}
    wanted: list[str] = []
    binary = set(names) if params.get("binary_data_output") is True else set()
    requested = req.get("outputs") or []
    if not isinstance(requested, list):
        raise RequestError("'outputs' must be a list of {\"name\": ...} objects")
    for out in requested:
        if not isinstance(out, dict) or not isinstance(out.get("name"), str) or out["name"] not in names:
            raise RequestError(
                f"requested output {out.get('name') if isinstance(out, dict) else out!r} is not an output",
                fix=f"outputs: {sorted(names)}",
            )
        wanted.append(out["name"])
        out_params = out.get("parameters") or {}
        if not isinstance(out_params, dict):
            raise RequestError(f"output '{out['name']}': 'parameters' must be an object")
        if out_params.get("binary_data") is True:
            binary.add(out["name"])
        elif out["name"] in binary and out_params.get("binary_data") is False:
            binary.discard(out["name"])
    return InferRequest(body, rid, tuple(wanted), frozenset(binary))


def _tensors(inputs: list[Any], blob: bytes) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    offset = 0
    for i, spec in enumerate(inputs):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise RequestError(f"input {i} is not an object with a 'name'")
        name, dt, shape = spec["name"], spec.get("datatype"), spec.get("shape")
        where = f"input '{name}'"
        if name in out:
            raise RequestError(f"{where} is given twice")
        if not isinstance(dt, str) or dt not in _NUMPY:
            raise RequestError(f"{where} has datatype {dt!r}", fix=f"use one of {sorted(_NUMPY)}")
        if not (
            isinstance(shape, list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise RequestError(f"{where} needs 'shape', a list of non-negative integers, got {shape!r}")
        count = math.prod(shape)
        npdt = np.dtype(_NUMPY[dt]).newbyteorder("<")
        in_params = spec.get("parameters") or {}
        if not isinstance(in_params, dict):
            raise RequestError(f"{where}: 'parameters' must be an object")
        size = in_params.get("binary_data_size")
        if size is not None:
            if (
                not isinstance(size, int)
                or isinstance(size, bool)
                or size != count * npdt.itemsize
                or offset + size > len(blob)
            ):
                raise RequestError(
                    f"{where}: binary_data_size {size!r} does not match its shape {shape} of {dt} "
                    f"({count * npdt.itemsize} bytes) within the {len(blob) - offset} bytes left"
                )
            arr = np.frombuffer(blob, dtype=npdt, count=count, offset=offset).reshape(shape)
            offset += size
        else:
            if "data" not in spec:
                raise RequestError(f"{where} has neither 'data' nor binary data")
            try:
                arr = np.asarray(spec["data"], dtype=npdt)
            except (TypeError, ValueError, OverflowError) as exc:
                raise RequestError(
                    f"{where}: 'data' is not an array of {dt} ({exc})".replace("\n", " ")
                ) from exc
            if arr.size != count:
                raise RequestError(
                    f"{where}: 'data' holds {arr.size} values, its shape {shape} needs {count}"
                )
            arr = arr.reshape(shape)
        out[name] = arr
    if offset != len(blob):
        raise RequestError(f"{len(blob) - offset} bytes of binary data follow the inputs unclaimed")
    return out


def _wire_body(tensors: Mapping[str, np.ndarray], schema: RequestSchema) -> dict[str, Any]:
    body: dict[str, Any] = {"user": {}, "candidates": {}}
    expected: set[str] = set()
    for f in schema.fields:
        where = f"input '{f.key}'"
        expected.add(f.key)
        if f.key not in tensors:
            raise RequestError(f"{where} is missing", fix="GET /v2/models/{name} lists the inputs")
        arr = tensors[f.key]
        if f.jagged:
            if arr.ndim != 1:
                raise RequestError(
                    f"{where} is an id bag: send its ids flat, shape [-1], got {list(arr.shape)}"
                )
            if f.section == "user":
                body["user"][f.key] = arr.tolist()
                continue
            expected.add(f.key + LENGTHS)
            lengths = tensors.get(f.key + LENGTHS)
            if lengths is None or lengths.ndim != 1 or lengths.dtype.kind not in "iu":
                raise RequestError(
                    f"input '{f.key}{LENGTHS}' (one integer count per candidate) is missing or not 1-D integers"
                )
            if (lengths < 0).any() or int(lengths.sum()) != arr.size:
                raise RequestError(
                    f"input '{f.key}{LENGTHS}' must be >= 0 and add up to the {arr.size} ids of {where}"
                )
            if len(lengths) > schema.max_candidates:
                raise RequestTooLargeError(
                    f"{where} has {len(lengths)} candidates, over {schema.max_candidates}"
                )
            body["candidates"][f.key] = [a.tolist() for a in np.split(arr, np.cumsum(lengths)[:-1])]
        elif f.section == "user":
            row = f.row_shape
            if tuple(arr.shape) == (1, *row):
                arr = arr.reshape(row)
            elif tuple(arr.shape) != row:
                raise RequestError(f"{where} has shape {list(arr.shape)}, expected {[1, *row]}")
            body["user"][f.key] = arr
        else:
            body["candidates"][f.key] = arr
    extra = set(tensors) - expected
    if extra:
        raise RequestError(f"unknown inputs {sorted(extra)}", fix="GET /v2/models/{name} lists the inputs")
    return body


def encode_infer(
    request: InferRequest,
    tensors: Sequence[torch.Tensor],
    outputs: Sequence[OutputInfo],
    *,
    model: str,
    parameters: Mapping[str, Any],
) -> tuple[bytes, int | None]:
    """The reply body, and the JSON header's length when binary outputs follow it (else None)."""
    chosen = [o for o in outputs if not request.outputs or o.name in request.outputs]
    blobs: list[bytes] = []
    described = []
    for info in chosen:
        t = tensors[[o.name for o in outputs].index(info.name)].detach().cpu().contiguous()
        entry: dict[str, Any] = {"name": info.name, "datatype": datatype(t.dtype), "shape": list(t.shape)}
        if info.name in request.binary:
            arr = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
            data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            blobs.append(data)
        else:
            values = t.reshape(-1).double().tolist() if t.is_floating_point() else t.reshape(-1).tolist()
            entry["data"] = [v if not isinstance(v, float) or math.isfinite(v) else None for v in values]
        described.append(entry)
    head: dict[str, Any] = {
        "model_name": model,
        "model_version": "1",
        "outputs": described,
        "parameters": dict(parameters),
    }
    if request.id is not None:
        head["id"] = request.id
    header = json.dumps(head, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)
