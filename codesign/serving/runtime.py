"""Serving runtime: parse -> route -> batch per variant -> score, in process.

``Runtime`` checks a JSON request against the bundle's wire format (``codesign.serving.wire``),
asks the router for a variant, and queues the request on that variant's worker. The worker
batches concurrent requests for its variant into one multi-request batch (request offsets kept,
so request-centric variants do user work once per request) up to ``BatchingConfig`` bounds,
scores it, and splits the scores back per request. A variant that raises is taken out of
rotation, and its requests (queued or in the failed batch) are re-routed.

The HTTP front (``codesign.serving.http``) puts a Runtime behind HTTP/JSON. This module imports
no passes, no capture and no compiler: a loaded bundle pays for its backend when it loads.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from codesign.config import Config, register_config
from codesign.errors import CodesignError, ConfigError, RequestError, RoutingError
from codesign.ir.request import RequestBatch, RequestSpec, bag_offsets, concat_batches
from codesign.numerics import output_tensors
from codesign.serving.metrics import Metrics
from codesign.serving.router import Decision, LoadTracker, Policy, RequestFeatures, Router
from codesign.serving.wire import scores_per_candidate

if TYPE_CHECKING:
    from codesign.build.variant import Variant
    from codesign.serving.deployment import Bundle

__all__ = ["BatchingConfig", "Runtime"]

log = logging.getLogger(__name__)

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
                self.schema.spec,
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
            outputs = _score(variant, jobs, rows)
        except Exception as exc:
            self._isolate(name, variant, jobs, exc)
            return
        seconds = time.perf_counter() - t0
        self.load.observe(name, self.router.profiles[name].latency(rows, len(jobs)), seconds)
        self.metrics.observe("codesign_batch_requests", len(jobs), variant=name)
        _deliver(jobs, outputs)

    def _isolate(self, name: str, variant: Variant, jobs: list[_Job], exc: Exception) -> None:
        """A batch failed: is it the variant or a request? The variant scores its reference batch again
        (the health probe): if that fails too, the variant leaves rotation and its requests go elsewhere;
        if not, each request is scored alone and only the one(s) the model cannot score get an error,
        so one bad request never takes a variant (or the server) down."""
        try:
            healthy, _ = variant.check_reference()
        except Exception:
            healthy = False
        if not healthy:
            why = f"{type(exc).__name__}: {exc}"
            log.error(
                "variant '%s' failed on a batch of %d requests and on its reference batch; out of "
                "rotation: %s",
                name,
                len(jobs),
                why,
            )
            self.router.mark_down(name, why)
            self.metrics.inc("codesign_variant_failures_total", variant=name, stage="run")
            self._reroute(name, jobs)
            return
        for job in jobs:
            try:
                # a one-request batch already failed alone: no need to run it again
                outputs = _score(variant, [job], job.candidates) if len(jobs) > 1 else None
                if outputs is None:
                    raise exc
            except Exception as one:
                log.warning(
                    "variant '%s' cannot score a request (%d candidates): %s: %s",
                    name,
                    job.candidates,
                    type(one).__name__,
                    one,
                )
                self.metrics.inc("codesign_errors_total", kind="unscorable")
                job.error = RequestError(
                    f"variant '{name}' could not score this request: {type(one).__name__}: {str(one)[:300]}",
                    fix="check the request's values against the schema (GET /v1/schema): ids within each "
                    "table's rows, lengths and offsets consistent; the variant stays in rotation",
                )
                job.done.set()
                continue
            _deliver([job], outputs)

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


def _score(variant: Variant, jobs: list[_Job], rows: int) -> list[torch.Tensor]:
    """The output tensors of the jobs scored as one batch; raises if any has not one row per candidate."""
    batch = concat_batches([j.batch for j in jobs], variant.spec)
    with torch.no_grad():
        outputs = output_tensors(variant.score(batch, check=False))  # parse checked each request
    bad = [tuple(o.shape) for o in outputs if o.dim() == 0 or o.shape[0] != rows]
    if bad:
        raise RuntimeError(f"outputs {bad} do not have one row per candidate ({rows})")
    return outputs


def _deliver(jobs: list[_Job], outputs: list[torch.Tensor]) -> None:
    start = 0
    for job in jobs:
        stop = start + job.candidates
        job.scores = scores_per_candidate(outputs, start, stop)
        job.batch_requests = len(jobs)
        start = stop
        job.done.set()


def _history_length(batch: RequestBatch, path: str, padding_id: int, spec: RequestSpec) -> int:
    leaves = batch.leaves()
    if path not in leaves:
        raise ConfigError(f"router feature history_input names '{path}', which is not a model input")
    t = leaves[path]
    if path in spec.bags:
        off = bag_offsets(spec, leaves, path)
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
