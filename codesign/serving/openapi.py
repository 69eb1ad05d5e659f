"""The OpenAPI 3.1 description of a server, with the request body of ``/v1/score`` derived from the
bundle's wire format: every user and candidate field with its type and shape, so that generated
clients and schema-driven fuzzers (schemathesis) see the exact request this model takes."""

from __future__ import annotations

from typing import Any

from codesign.serving.wire import CONTEXT_KEYS, RequestSchema, WireField
from codesign.version import __version__

__all__ = ["openapi_document"]

_ERROR = {
    "type": "object",
    "properties": {"error": {"type": "string"}, "fix": {"type": "string"}},
    "required": ["error"],
}


def _value(f: WireField, shape: tuple[int, ...]) -> dict[str, Any]:
    item: dict[str, Any] = {"type": "integer" if f.integral else "number"}
    if f.integral:
        item["minimum"] = 0
    for d in reversed(shape):
        item = {"type": "array", "items": item, "minItems": d, "maxItems": d}
    return item


def _field(f: WireField) -> dict[str, Any]:
    if f.jagged:
        bag = {"type": "array", "items": {"type": "integer", "minimum": 0}}
        return bag if f.section == "user" else {"type": "array", "items": bag, "minItems": 1}
    if f.section == "user":
        return _value(f, f.row_shape)
    return {"type": "array", "items": _value(f, f.row_shape), "minItems": 1}


def _section(schema: RequestSchema, section: str) -> dict[str, Any]:
    fields = [f for f in schema.fields if f.section == section]
    return {
        "type": "object",
        "properties": {f.key: _field(f) for f in fields},
        "required": [f.key for f in fields],
        "additionalProperties": False,
    }


def _json(schema: dict[str, Any], what: str) -> dict[str, Any]:
    return {"description": what, "content": {"application/json": {"schema": schema}}}


def openapi_document(schema: RequestSchema, model: str) -> dict[str, Any]:
    """The OpenAPI document served at ``GET /openapi.json``."""
    score_request = {
        "type": "object",
        "properties": {
            "user": _section(schema, "user"),
            "candidates": _section(schema, "candidates"),
            "context": {
                "type": "object",
                "properties": {
                    "budget_ms": {"type": "number", "exclusiveMinimum": 0},
                    "tier": {"type": "string"},
                    "value": {"type": "number", "minimum": 0},
                    "history_length": {"type": "integer", "minimum": 0},
                    "variant": {"type": "string"},
                    "request_id": {},
                },
                "additionalProperties": False,
            },
        },
        "required": ["user", "candidates"],
        "additionalProperties": False,
    }
    score_reply = {
        "type": "object",
        "properties": {
            "scores": {"type": "array"},
            "variant": {"type": "string"},
            "decision": {"type": "object"},
            "latency_ms": {"type": "number"},
            "batch_requests": {"type": "integer"},
        },
        "required": ["scores", "variant"],
    }
    errors = {
        "400": _json(_ERROR, "the request does not match the model's wire format"),
        "401": _json(_ERROR, "missing or wrong bearer token (when the server requires one)"),
        "413": _json(_ERROR, "the request is over a size limit"),
        "429": _json(_ERROR, "queue full or client over its rate limit: retry after Retry-After"),
        "503": _json(_ERROR, "no variant in rotation, or shutting down"),
        "504": _json(_ERROR, "not scored within the request's budget or the server's timeout"),
    }

    def get(what: str) -> dict[str, Any]:
        return {"get": {"summary": what, "responses": {"200": {"description": what}}}}

    return {
        "openapi": "3.1.0",
        "info": {"title": f"codesign serving: {model}", "version": __version__},
        "paths": {
            "/v1/score": {
                "post": {
                    "summary": "score one request: a user and its candidates",
                    "requestBody": {"required": True, **_json(score_request, "one request")},
                    "responses": {"200": _json(score_reply, "one score per candidate"), **errors},
                }
            },
            "/v1/score/batch": {
                "post": {
                    "summary": "score several requests in one call (each answered with its own status)",
                    "requestBody": {
                        "required": True,
                        **_json(
                            {
                                "type": "object",
                                "properties": {
                                    "requests": {"type": "array", "items": score_request, "minItems": 1}
                                },
                                "required": ["requests"],
                                "additionalProperties": False,
                            },
                            "requests",
                        ),
                    },
                    "responses": {
                        "200": _json({"type": "object"}, "one result per request, in order"),
                        **errors,
                    },
                }
            },
            "/v1/schema": get("the request wire format of this bundle"),
            "/healthz": get("readiness and each variant's state (503 when not ready)"),
            "/metrics": get("Prometheus metrics"),
            "/v2": get("Open Inference Protocol server metadata"),
            "/v2/health/live": get("liveness"),
            "/v2/health/ready": get("readiness (503 when not ready)"),
            f"/v2/models/{model}": get("model metadata: inputs and outputs"),
            f"/v2/models/{model}/ready": get("model readiness"),
            f"/v2/models/{model}/infer": {
                "post": {
                    "summary": "Open Inference Protocol inference (JSON or binary tensor data)",
                    "responses": {"200": {"description": "the output tensors"}, **errors},
                }
            },
        },
        "x-codesign-context-keys": list(CONTEXT_KEYS),
    }
