"""Serving runtime and HTTP server: parse -> route -> batch per variant -> score -> respond.

``Runtime`` is the in-process part: it checks a JSON request against the bundle's wire format
(``codesign.serving.wire``), asks the router for a variant, and queues the request on that variant's
worker. The worker batches concurrent requests for its variant into one multi-request batch
(request offsets kept, so request-centric variants do user work once per request) up to
``BatchingConfig`` bounds, scores it, and splits the scores back per request. A variant that
raises is taken out of rotation, and its requests (queued or in the failed batch) are re-routed.

``Server`` puts the runtime behind HTTP/JSON (stdlib ``http.server``, one thread per connection)::

    POST /v1/score   {"user": {...}, "candidates": {...}, "context": {...}} -> scores + variant + why
    GET  /v1/schema  the request format of this bundle
    GET  /healthz    200 while a variant is in rotation, else 503
    GET  /metrics    Prometheus text: requests, latency per variant, routing, errors, queues

It binds to 127.0.0.1 unless told otherwise and has no authentication: put it behind your
serving mesh before exposing it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import queue
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

from codesign.build.variant import Variant
from codesign.config import Config, register_config
from codesign.errors import CodesignError, ConfigError, RequestError, RoutingError
from codesign.ir.request import RequestBatch, concat_batches
from codesign.numerics import output_tensors
from codesign.serving.deployment import Bundle, load_bundle
from codesign.serving.metrics import Metrics
from codesign.serving.router import Decision, LoadTracker, Policy, RequestFeatures, Router
from codesign.serving.wire import scores_per_candidate

__all__ = ["BatchingConfig", "Runtime", "Server", "serve"]

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 << 20
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@register_config
@dataclasses.dataclass(frozen=True)
class BatchingConfig(Config):
    """Dynamic batching bounds per variant.

    A worker takes the first queued request, then waits up to ``max_delay_ms`` for more, up to
    ``max_requests`` requests and ``max_candidates`` candidate rows per batch. ``max_delay_ms=0``
    batches only what is already queued (no added latency when idle).
    """

    max_requests: int = 16
    max_candidates: int = 8192
    max_delay_ms: float = 1.0
    timeout_s: float = 30.0  # a request not answered by then gets 504
    warmup_calls: int = 2  # reference-request calls per variant before serving

    def __post_init__(self) -> None:
        if self.max_requests < 1 or self.max_candidates < 1:
            raise ConfigError(
                f"batching bounds must be >= 1, got {self.max_requests} requests, {self.max_candidates} rows"
            )
        if not (0 <= self.max_delay_ms < 1000 and self.timeout_s > 0):
            raise ConfigError(
                f"max_delay_ms must be in [0, 1000) and timeout_s > 0, got {self.max_delay_ms}, {self.timeout_s}"
            )


@dataclasses.dataclass
class _Job:
    batch: RequestBatch
    features: RequestFeatures
    decision: Decision
    arrived: float
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    scores: list[Any] | None = None
    error: CodesignError | None = None
    batch_requests: int = 0

    @property
    def candidates(self) -> int:
        return self.batch.num_candidates


class Runtime:
    """Routes, batches and scores requests for one bundle; safe to call from many threads.

    >>> rt = Runtime(codesign.load_bundle("out/bundle")); rt.score_json(body)["scores"]
    """

    def __init__(
        self, bundle: Bundle, *, policy: Policy | None = None, batching: BatchingConfig | None = None
    ) -> None:
        self.bundle = bundle
        self.batching = batching or BatchingConfig()
        names = list(bundle.profiles)
        self.load = LoadTracker(names)
        if policy is not None:
            bundle = dataclasses.replace(bundle, policy=policy)
        self.router: Router = bundle.router(self.load)
        self.schema = bundle.schema()
        self.metrics = _declare_metrics(self)
        for name, why in bundle.failed.items():
            self.metrics.inc("codesign_variant_failures_total", variant=name, stage="load")
            log.error("variant '%s' is out of rotation: %s", name, why)
        for name, variant in bundle.variants.items():
            self._warm_up(name, variant)
        self._queues: dict[str, queue.Queue[_Job | None]] = {n: queue.Queue() for n in bundle.variants}
        self._threads = [
            threading.Thread(target=self._worker, args=(n,), name=f"codesign-{n}", daemon=True)
            for n in bundle.variants
        ]
        self._closed = False
        for t in self._threads:
            t.start()

    def _warm_up(self, name: str, variant: Variant) -> None:
        """Score the reference requests twice: first calls pay one-off costs that would skew the
        load-aware latency ratio, and a variant that cannot score them leaves rotation now."""
        try:
            for _ in range(self.batching.warmup_calls):
                variant.score(variant.reference_inputs)
        except Exception as exc:
            why = f"failed its warm-up call: {type(exc).__name__}: {exc}"
            log.error("variant '%s' %s; out of rotation", name, why)
            self.router.mark_down(name, why)
            self.metrics.inc("codesign_variant_failures_total", variant=name, stage="warmup")

    # ---- requests ------------------------------------------------------------------------------
    def score_json(self, body: Any, received: float | None = None) -> dict[str, Any]:
        """Score one JSON request; raises RequestError (bad input), RoutingError (no variant) or TimeoutError.

        ``received``: ``time.perf_counter()`` when the request arrived (before its body was read
        and decoded); that time counts against the request's budget and its reported latency.
        """
        t0 = received if received is not None else time.perf_counter()
        try:
            batch, context = self.schema.parse(body)
            features = self._features(batch, context, t0)
            force = context.get("variant")
            if force is not None and (not isinstance(force, str) or force not in self.router.profiles):
                raise RequestError(
                    f"context.variant names unknown variant {force!r}",
                    fix=f"variants: {list(self.router.profiles)}",
                )
            decision = self.router.decide(features, force=force)
        except RequestError:
            self.metrics.inc("codesign_errors_total", kind="bad_request")
            raise
        except RoutingError:
            self.metrics.inc("codesign_errors_total", kind="no_variant")
            raise
        job = _Job(batch, features, decision, t0)
        self._submit(job)
        if not job.done.wait(self.batching.timeout_s):
            self.metrics.inc("codesign_errors_total", kind="timeout")
            raise TimeoutError(f"request not scored within {self.batching.timeout_s} s")
        variant = job.decision.variant
        seconds = time.perf_counter() - t0
        if job.error is not None:
            self.metrics.inc("codesign_requests_total", variant=variant, status="error")
            raise job.error
        self.metrics.inc("codesign_requests_total", variant=variant, status="ok")
        self.metrics.observe("codesign_request_latency_seconds", seconds, variant=variant)
        budget = features.budget_ms
        if budget is not None and seconds * 1e3 > budget:
            self.metrics.inc("codesign_deadline_misses_total", variant=variant)
        out: dict[str, Any] = {
            "scores": job.scores,
            "variant": variant,
            "decision": job.decision.to_dict(),
            "latency_ms": round(seconds * 1e3, 3),
            "batch_requests": job.batch_requests,
        }
        if "request_id" in context:
            out["request_id"] = context["request_id"]
        return out

    def _features(self, batch: RequestBatch, context: Mapping[str, Any], t0: float) -> RequestFeatures:
        def number(key: str, integral: bool = False) -> Any:
            v = context.get(key)
            if v is None:
                return None
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise RequestError(f"context.{key} must be a non-negative number, got {v!r}")
            if integral and not float(v).is_integer():
                raise RequestError(f"context.{key} must be an integer, got {v!r}")
            return int(v) if integral else float(v)

        budget = number("budget_ms")
        if budget is not None and budget <= 0:
            raise RequestError(f"context.budget_ms must be > 0, got {budget}")
        tier = context.get("tier")
        if tier is not None and not isinstance(tier, str):
            raise RequestError(f"context.tier must be a string, got {tier!r}")
        history = number("history_length", integral=True)
        if history is None and self.router.features.history_input:
            history = _history_length(
                batch,
                self.router.features.history_input,
                self.router.features.padding_id,
                self.schema.spec.jagged,
            )
        return RequestFeatures(
            candidates=batch.num_candidates,
            history_length=history,
            tier=tier,
            value=number("value"),
            budget_ms=budget,
            elapsed_ms=(time.perf_counter() - t0) * 1e3,
        )

    def _submit(self, job: _Job) -> None:
        name = job.decision.variant
        self.metrics.inc(
            "codesign_routing_decisions_total",
            policy=job.decision.policy,
            variant=name,
            kind=job.decision.kind,
        )
        self.load.enqueue(name, job.candidates)
        self._queues[name].put(job)

    # ---- workers -------------------------------------------------------------------------------
    def _worker(self, name: str) -> None:
        q = self._queues[name]
        variant = self.bundle.variants[name]
        carry: _Job | None = None
        while True:
            first = carry if carry is not None else q.get()
            carry = None
            if first is None:
                return
            jobs, rows = [first], first.candidates
            deadline = time.perf_counter() + self.batching.max_delay_ms / 1e3
            while len(jobs) < self.batching.max_requests:
                wait = deadline - time.perf_counter()
                try:
                    nxt = q.get(timeout=wait) if wait > 0 else q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    q.put(None)
                    break
                if rows + nxt.candidates > self.batching.max_candidates:
                    carry = nxt
                    break
                jobs.append(nxt)
                rows += nxt.candidates
            self.load.start(name, len(jobs), rows)
            try:
                if name in self.router.down:
                    self._reroute(name, jobs)
                else:
                    self._run(name, variant, jobs, rows)
            finally:
                self.load.finish(name, len(jobs), rows)

    def _run(self, name: str, variant: Variant, jobs: list[_Job], rows: int) -> None:
        t0 = time.perf_counter()
        try:
            batch = concat_batches([j.batch for j in jobs], variant.spec)
            with torch.no_grad():
                outputs = output_tensors(variant.score(batch))
            bad = [tuple(o.shape) for o in outputs if o.dim() == 0 or o.shape[0] != rows]
            if bad:
                raise RuntimeError(f"outputs {bad} do not have one row per candidate ({rows})")
        except Exception as exc:  # a failing variant leaves rotation; its requests go elsewhere
            why = f"{type(exc).__name__}: {exc}"
            log.exception("variant '%s' failed on a batch of %d requests; out of rotation", name, len(jobs))
            self.router.mark_down(name, why)
            self.metrics.inc("codesign_variant_failures_total", variant=name, stage="run")
            self._reroute(name, jobs)
            return
        seconds = time.perf_counter() - t0
        self.load.observe(name, self.router.profiles[name].latency(rows, len(jobs)), seconds)
        self.metrics.observe("codesign_batch_requests", len(jobs), variant=name)
        start = 0
        for job in jobs:
            stop = start + job.candidates
            job.scores = scores_per_candidate(outputs, start, stop)
            job.batch_requests = len(jobs)
            start = stop
            job.done.set()

    def _reroute(self, failed: str, jobs: list[_Job]) -> None:
        for job in jobs:
            try:
                job.decision = self.router.fallback(failed, job.features)
            except RoutingError as exc:
                self.metrics.inc("codesign_errors_total", kind="no_variant")
                job.error = exc
                job.done.set()
                continue
            self._submit(job)

    # ---- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the workers (requests already queued are scored first)."""
        if self._closed:
            return
        self._closed = True
        for q in self._queues.values():
            q.put(None)
        for t in self._threads:
            t.join(timeout=10)

    def health(self) -> dict[str, Any]:
        up = self.router.available
        return {
            "status": "ok" if up else "unavailable",
            "variants": {
                n: ("up" if n not in self.router.down else f"down: {self.router.down[n]}")
                for n in self.router.profiles
            },
            "policy": self.router.policy_name,
        }


def _history_length(batch: RequestBatch, path: str, padding_id: int, jagged: Mapping[str, str]) -> int:
    leaves = batch.leaves()
    if path not in leaves:
        raise ConfigError(f"router feature history_input names '{path}', which is not a model input")
    t = leaves[path]
    if path in jagged:
        off = leaves[jagged[path]]
        end = int(off[1]) if off.numel() > 1 else t.numel()
        return end - int(off[0])
    return int((t[0] != padding_id).sum())


def _declare_metrics(rt: Runtime) -> Metrics:
    m = Metrics()
    m.declare("codesign_requests_total", "counter", "Scoring requests answered, by variant and status.")
    m.declare(
        "codesign_request_latency_seconds",
        "histogram",
        "End-to-end request latency in the server, by variant.",
    )
    m.declare("codesign_routing_decisions_total", "counter", "Routing decisions by policy, variant and kind.")
    m.declare("codesign_errors_total", "counter", "Requests refused or failed, by kind.")
    m.declare(
        "codesign_variant_failures_total",
        "counter",
        "Variant failures (load or run) that took it out of rotation.",
    )
    m.declare("codesign_deadline_misses_total", "counter", "Requests answered after their context.budget_ms.")
    m.declare(
        "codesign_batch_requests", "histogram", "Requests per executed batch, by variant.", BATCH_BUCKETS
    )
    m.gauge_function(
        "codesign_variant_up",
        "1 while a variant is in rotation.",
        lambda: {(("variant", n),): float(n not in rt.router.down) for n in rt.router.profiles},
    )
    m.gauge_function(
        "codesign_queue_depth",
        "Requests waiting per variant.",
        lambda: {(("variant", n),): float(s["queued_requests"]) for n, s in rt.load.snapshot().items()},
    )
    return m


# ---- HTTP -----------------------------------------------------------------------------------------
class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    runtime: Runtime


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode())

    def _error(self, status: int, message: str, fix: str | None = None) -> None:
        self._json(status, {"error": message, **({"fix": fix} if fix else {})})

    def do_GET(self) -> None:
        rt = self.server.runtime
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            health = rt.health()
            self._json(200 if health["status"] == "ok" else 503, health)
        elif path == "/metrics":
            self._send(200, rt.metrics.render().encode(), "text/plain; version=0.0.4; charset=utf-8")
        elif path == "/v1/schema":
            self._json(200, rt.schema.describe())
        else:
            self._error(
                404,
                f"no such endpoint: GET {path}",
                "endpoints: POST /v1/score, GET /v1/schema, /healthz, /metrics",
            )

    def do_POST(self) -> None:
        rt = self.server.runtime
        path = self.path.split("?", 1)[0]
        if path != "/v1/score":
            self._drain()
            self._error(404, f"no such endpoint: POST {path}", "score with POST /v1/score")
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            rt.metrics.inc("codesign_errors_total", kind="bad_request")
            self.close_connection = True
            self._error(411, "the request needs a Content-Length header")
            return
        if length > MAX_BODY_BYTES or length < 0:
            rt.metrics.inc("codesign_errors_total", kind="bad_request")
            self.close_connection = True
            self._error(413, f"request body of {length} bytes is over the {MAX_BODY_BYTES} byte limit")
            return
        received = time.perf_counter()
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            rt.metrics.inc("codesign_errors_total", kind="bad_request")
            self._error(
                400, f"request body is not valid JSON: {exc}", 'send {"user": {...}, "candidates": {...}}'
            )
            return
        try:
            self._json(200, rt.score_json(body, received))
        except RequestError as exc:
            self._error(400, exc.message, exc.fix)
        except RoutingError as exc:
            self._error(503, exc.message, exc.fix)
        except TimeoutError as exc:
            self._error(504, str(exc))
        except CodesignError as exc:
            log.error("request failed: %s", exc.message)
            self._error(500, exc.message, exc.fix)
        except Exception as exc:  # the server keeps serving; the error is logged with its traceback
            log.exception("unexpected error while scoring")
            rt.metrics.inc("codesign_errors_total", kind="internal")
            self._error(500, f"internal error: {type(exc).__name__}: {exc}")

    def _drain(self) -> None:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = 0
        if 0 < length <= MAX_BODY_BYTES:
            self.rfile.read(length)


class Server:
    """The runtime behind HTTP on ``host:port`` (port 0 picks a free one); a context manager.

    >>> with Server(Runtime(bundle), port=0) as srv: requests.post(srv.url + "/v1/score", json=body)
    """

    def __init__(self, runtime: Runtime, host: str = "127.0.0.1", port: int = 8000) -> None:
        if host not in ("127.0.0.1", "localhost", "::1"):
            log.warning(
                "binding to %s: the server has no authentication; expose it only behind a trusted proxy", host
            )
        try:
            self._http = _HTTPServer((host, port), _Handler)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {host}:{port}: {exc.strerror}", fix="pick another --port"
            ) from exc
        self._http.runtime = runtime
        self.runtime = runtime
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._http.server_address[:2]
        name = host.decode() if isinstance(host, bytes) else str(host)
        return f"http://{name if ':' not in name else f'[{name}]'}:{port}"

    def start(self) -> Server:
        self._thread = threading.Thread(target=self._http.serve_forever, name="codesign-http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._http.serve_forever()

    def shutdown(self) -> None:
        if self._thread is not None:
            self._http.shutdown()
            self._thread.join(timeout=10)
        self._http.server_close()
        self.runtime.close()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def serve(
    bundle: str | Path | Bundle,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    policy: Policy | None = None,
    batching: BatchingConfig | None = None,
) -> Server:
    """Load ``bundle`` (a path or a Bundle) and return a started Server; call ``shutdown()`` to stop."""
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    return Server(Runtime(b, policy=policy, batching=batching), host, port).start()
