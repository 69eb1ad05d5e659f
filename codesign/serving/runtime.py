"""Serving runtime: parse -> admit -> route -> batch per variant -> score, in process.

``Runtime`` checks a JSON request against the bundle's wire format (``codesign.serving.wire``),
asks the router for a variant, and admits the request to that variant's queue while the queue is
within its bounds (else ``OverloadError``: HTTP 429 with ``Retry-After``). Each variant's worker
batches what is queued into multi-request batches (request offsets kept, so request-centric
variants do user work once per request) and splits requests larger than a batch into slices, so
that a small request never waits behind a huge one for more than about one slice: batches take
the smallest requests first, and every other batch starts with the oldest request, so large ones
progress too. A request whose ``context.budget_ms`` has run out before it is scored is shed
unscored (``DeadlineError``).

Health is measured, not assumed: at start every variant scores its stored reference batch and must
match the stored outputs within the bundle's tolerance, or it stays out of rotation. A variant that
fails a batch scores its reference batch again: if that fails, it leaves rotation and its requests
are re-routed; a down variant is probed again (half-open) after ``probe_interval_s``, doubling to
``probe_max_interval_s``, and returns to rotation when its reference batch scores right again.

Weights change while serving (``update_weights``: a delta file or a new bundle; ``rollback``): each
request is scored on the weights version current when it was admitted (a batch never mixes
versions), new requests see a new version at once, a version is in rotation only after it scores
its reference batch, and every reply names the version that scored it.

The HTTP front (``codesign.serving.http``) puts a Runtime behind HTTP. This module imports no
passes, no capture and no compiler: a loaded bundle pays for its backend when it loads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import math
import queue
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from codesign.config import Config, register_config
from codesign.errors import (
    CodesignError,
    ConfigError,
    DeadlineError,
    OverloadError,
    RankLostError,
    RequestError,
    RequestTooLargeError,
    RoutingError,
    WeightsError,
)
from codesign.ir.request import (
    RequestBatch,
    RequestSpec,
    bag_offsets,
    concat_batches,
    repeat_request_bags,
    split_candidates,
)
from codesign.numerics import output_tensors
from codesign.serving.metrics import Metrics
from codesign.serving.router import Decision, LoadTracker, Policy, RequestFeatures, Router
from codesign.serving.wire import scores_per_candidate

if TYPE_CHECKING:
    from codesign.build.variant import Variant
    from codesign.serving.deployment import Bundle
    from codesign.serving.sharded import RankGroup

__all__ = ["BatchingConfig", "Runtime", "Ticket", "WeightsBusyError", "WeightsVersion"]

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

# Why a variant is out of rotation, as health and error bodies say it: the details (exception text,
# paths) go to the log only.
LOAD_FAILED = "failed to load"
REFERENCE_FAILED = "does not score its reference batch within tolerance"
RUN_FAILED = "failed a batch and then its reference batch"


@register_config
@dataclasses.dataclass(frozen=True)
class BatchingConfig(Config):
    """Dynamic batching, admission and health-probe settings per variant.

    A worker takes what is queued, waits up to ``max_delay_ms`` for more, and scores up to
    ``max_requests`` requests and ``max_candidates`` candidate rows per batch (a larger request is
    scored in slices of ``max_candidates`` rows). ``max_delay_ms=0`` batches only what is already
    queued. A variant admits at most ``max_queued_requests`` waiting requests and
    ``max_queued_candidates`` waiting rows; beyond that requests are refused with a retry time.
    ``shed_late``: a request whose ``context.budget_ms`` has passed before it is scored is answered
    with a deadline error instead of being scored late.
    """

    max_requests: int = 16
    max_candidates: int = 8192
    max_delay_ms: float = 1.0
    timeout_s: float = 30.0  # a request not answered by then gets 504
    warmup_calls: int = 2  # reference-request calls per variant before serving (the first is checked)
    max_queued_requests: int = 512
    max_queued_candidates: int = 1 << 20
    shed_late: bool = True
    probe_interval_s: float = 1.0
    probe_max_interval_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_requests < 1 or self.max_candidates < 1:
            raise ConfigError(
                f"batching bounds must be >= 1, got {self.max_requests} requests, {self.max_candidates} rows"
            )
        if not (0 <= self.max_delay_ms < 1000 and self.timeout_s > 0):
            raise ConfigError(
                f"max_delay_ms must be in [0, 1000) and timeout_s > 0, got {self.max_delay_ms}, {self.timeout_s}"
            )
        if self.warmup_calls < 1:
            raise ConfigError(f"warmup_calls must be >= 1 (the reference check), got {self.warmup_calls}")
        if self.max_queued_requests < 1 or self.max_queued_candidates < 1:
            raise ConfigError(
                f"queue bounds must be >= 1, got {self.max_queued_requests} requests, "
                f"{self.max_queued_candidates} rows"
            )
        if not 0 < self.probe_interval_s <= self.probe_max_interval_s:
            raise ConfigError(
                f"need 0 < probe_interval_s <= probe_max_interval_s, got {self.probe_interval_s}, "
                f"{self.probe_max_interval_s}"
            )


class WeightsBusyError(WeightsError):
    """Another weight update or rollback is running (HTTP 409); nothing was changed."""


@dataclasses.dataclass(frozen=True, eq=False)
class WeightsVersion:
    """One set of weights the runtime serves: every variant as it scores at that version.

    ``number`` counts up from 1 (the bundle the server started with); ``source`` says where the
    weights came from and ``sha256`` identifies that file (a delta file, or a bundle's manifest).
    """

    number: int
    variants: Mapping[str, Variant]
    source: str
    sha256: str
    loaded_at: float  # time.time() when it went into rotation

    @property
    def id(self) -> str:
        return f"v{self.number}"

    def describe(self) -> dict[str, Any]:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at))
        return {"version": self.id, "source": self.source, "sha256": self.sha256, "loaded_at": stamp}


@dataclasses.dataclass(eq=False)
class _Job:
    """One admitted request: its batch, where it is routed, and what has been scored of it."""

    batch: RequestBatch
    features: RequestFeatures
    decision: Decision
    arrived: float
    deadline: float | None
    version: WeightsVersion
    on_done: Callable[[], None] | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    scores: list[Any] | None = None
    tensors: list[torch.Tensor] | None = None  # the model's outputs for this request's candidates
    error: CodesignError | None = None
    batch_requests: int = 0
    cancelled: bool = False
    pieces: list[RequestBatch] | None = None  # slices on the current variant, cut when first scheduled
    outputs: list[list[torch.Tensor]] = dataclasses.field(default_factory=list)  # per scored slice
    rows_waiting: int = 0  # rows not yet started on the current variant (LoadTracker bookkeeping)
    left_queue: bool = False  # its last slice has started (LoadTracker counts it running, not queued)

    @property
    def candidates(self) -> int:
        return self.batch.num_candidates

    @property
    def rows_left(self) -> int:
        if self.pieces is None:
            return self.candidates
        return sum(p.num_candidates for p in self.pieces[len(self.outputs) :])

    def finish(self) -> None:
        self.done.set()
        if self.on_done is not None:
            try:
                self.on_done()
            except Exception as exc:  # the waiter is gone (its event loop closed): nothing to wake
                log.debug("could not wake a request's waiter: %s", exc)

    def reset(self) -> None:
        self.pieces, self.outputs, self.left_queue = None, [], False


@dataclasses.dataclass(frozen=True)
class Ticket:
    """An admitted request: ``wait()`` (or ``on_done`` given to ``admit``) tells when it is answered."""

    job: _Job
    context: Mapping[str, Any]

    def wait(self, timeout: float) -> bool:
        return self.job.done.wait(timeout)


class _Probe:
    """Queue item: score the reference batch on the variant's own worker (a half-open probe)."""


_PROBE = _Probe()


class Runtime:
    """Admits, routes, batches and scores requests for one bundle; safe to call from many threads.

    >>> rt = Runtime(codesign.load_bundle("out/bundle")); rt.score_json(body)["scores"]
    """

    def __init__(
        self,
        bundle: Bundle,
        *,
        policy: Policy | None = None,
        batching: BatchingConfig | None = None,
        group: RankGroup | None = None,
    ) -> None:
        """``group``: the process group a sharded bundle's variants score through
        (``codesign.serving.sharded``); while it is not whole the server is not ready and requests
        get RankLostError (503)."""
        self.bundle = bundle
        self.group = group
        self.batching = batching or BatchingConfig()
        names = list(bundle.profiles)
        self.load = LoadTracker(names)
        if policy is not None:
            bundle = dataclasses.replace(bundle, policy=policy)
        self.router: Router = bundle.router(self.load)
        self.schema = bundle.schema()
        self.metrics = _declare_metrics(self)
        self.draining = False
        self._closed = False
        self._stop = threading.Event()
        self._inflight = 0
        self._inflight_lock = threading.Lock()
        self._probe_lock = threading.Lock()
        self._probes: dict[str, tuple[float, float]] = {}  # variant -> (next probe time, interval)
        self._probing: set[str] = set()
        self._current = WeightsVersion(
            1, dict(bundle.variants), "bundle", _manifest_sha(bundle.path), time.time()
        )
        self._previous: WeightsVersion | None = None
        self._shards = {1: 0}  # weights version -> the version of the ranks' shards it scores on
        self._updating = threading.Lock()  # one update or rollback at a time
        self._numbers = itertools.count(2)
        for name, why in bundle.failed.items():
            self.metrics.inc("codesign_variant_failures_total", variant=name, stage="load")
            log.error("variant '%s' is out of rotation: %s", name, why)
            self.router.mark_down(name, LOAD_FAILED)
        for name, variant in bundle.variants.items():
            self._warm_up(name, variant)
        # user bags arrive once per request (parse(compact_bags=True)); each variant gets them laid out
        # as it reads them: once per request where its graph reads request-first rows only, else repeated
        self._user_bags = self.schema.spec.request_bags
        self._first_row = {n: self._first_row_bags(n, v) for n, v in bundle.variants.items()}
        once = frozenset.intersection(*self._first_row.values()) if self._first_row else frozenset()
        # a bag sent once still goes once into every slice of a request cut for batching
        slice_rows = min(
            [
                self.batching.max_candidates,
                *(v.micro_batch for v in bundle.variants.values() if v.micro_batch),
            ]
        )
        self.schema = dataclasses.replace(self.schema, bags_sent_once=once, slice_rows=slice_rows)
        self._queues: dict[str, queue.Queue[_Job | _Probe | None]] = {
            n: queue.Queue() for n in bundle.variants
        }
        self._turn = {n: itertools.count() for n in bundle.variants}
        self._threads = [
            threading.Thread(target=self._worker, args=(n,), name=f"codesign-{n}", daemon=True)
            for n in bundle.variants
        ]
        self._threads.append(threading.Thread(target=self._prober, name="codesign-probe", daemon=True))
        for t in self._threads:
            t.start()

    def _warm_up(self, name: str, variant: Variant) -> None:
        """Score the reference requests (the first call compared with the stored reference outputs):
        a variant that cannot reproduce them never enters rotation, and the calls after it pay the
        one-off costs that would skew the load-aware latency ratio."""
        try:
            ok, max_abs = _warm(variant, self.batching.warmup_calls)
        except Exception as exc:
            log.error(
                "variant '%s' failed its warm-up call (%s: %s); out of rotation",
                name,
                type(exc).__name__,
                exc,
            )
            ok, max_abs = False, math.inf
        if not ok:
            log.error(
                "variant '%s' scores its reference batch with max abs error %.3g, over its tolerance; out of "
                "rotation until a probe passes",
                name,
                max_abs,
            )
            self._take_down(name, REFERENCE_FAILED, stage="warmup")

    def _first_row_bags(self, name: str, variant: Variant) -> frozenset[str]:
        """The user bags this variant gets once per request: its confirmed claim (``Variant.first_row_bags``)."""
        if name in self.router.down:
            return frozenset()
        bags = variant.first_row_bags & self._user_bags
        if bags:
            log.info("variant '%s' gets user bags %s once per request", name, sorted(bags))
        return bags

    # ---- requests ------------------------------------------------------------------------------
    def admit(
        self, body: Any, received: float | None = None, on_done: Callable[[], None] | None = None
    ) -> Ticket:
        """Check, route and queue one JSON request; ``on_done`` is called (from a worker) once answered.

        Raises RequestError (bad input), RoutingError (no variant), OverloadError (queue full or
        shutting down). ``received``: ``time.perf_counter()`` when the request arrived; that time
        counts against the request's budget and its reported latency.
        """
        t0 = received if received is not None else time.perf_counter()
        lost = self.group.problem() if self.group is not None else None
        if lost is not None:
            self.metrics.inc("codesign_errors_total", kind="rank_lost")
            raise RankLostError(lost, fix="retry later; GET /v2/health/ready says when the group is whole")
        if self._closed:  # while draining, requests already received are still admitted and answered
            self.metrics.inc("codesign_errors_total", kind="closed")
            raise OverloadError(
                "the server is shutting down", retry_after_s=1.0, fix="send the request to another replica"
            )
        try:
            batch, context = self.schema.parse(body, compact_bags=True)
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
        budget = features.budget_ms if self.batching.shed_late and "budget_ms" in context else None
        deadline = t0 + budget / 1e3 if budget is not None else None
        job = _Job(batch, features, decision, t0, deadline, self._current, on_done)
        self._check_room(decision.variant, job.candidates)
        with self._inflight_lock:
            self._inflight += 1
        self._submit(job)
        return Ticket(job, context)

    def answer(self, ticket: Ticket) -> dict[str, Any]:
        """The JSON reply of an answered ticket; raises the error it failed with."""
        job, context = ticket.job, ticket.context
        variant = job.decision.variant
        seconds = time.perf_counter() - job.arrived
        if job.error is not None:
            self.metrics.inc("codesign_requests_total", variant=variant, status="error")
            raise job.error
        self.metrics.inc("codesign_requests_total", variant=variant, status="ok")
        self.metrics.observe("codesign_request_latency_seconds", seconds, variant=variant)
        budget = job.features.budget_ms
        if budget is not None and seconds * 1e3 > budget:
            self.metrics.inc("codesign_deadline_misses_total", variant=variant)
        out: dict[str, Any] = {
            "scores": job.scores,
            "variant": variant,
            "decision": job.decision.to_dict(),
            "latency_ms": round(seconds * 1e3, 3),
            "batch_requests": job.batch_requests,
            "weights_version": job.version.id,
        }
        if "request_id" in context:
            out["request_id"] = context["request_id"]
        return out

    def abandon(self, ticket: Ticket) -> None:
        """The caller stopped waiting (timeout, client gone): the worker drops the request unscored."""
        ticket.job.cancelled = True
        self.metrics.inc("codesign_errors_total", kind="timeout")

    def score_json(self, body: Any, received: float | None = None) -> dict[str, Any]:
        """Score one JSON request and wait for it; raises as ``admit`` and ``answer``, or TimeoutError."""
        ticket = self.admit(body, received)
        if not ticket.wait(self.batching.timeout_s):
            self.abandon(ticket)
            raise TimeoutError(f"request not scored within {self.batching.timeout_s} s")
        return self.answer(ticket)

    def _features(self, batch: RequestBatch, context: Mapping[str, Any], t0: float) -> RequestFeatures:
        def number(key: str, integral: bool = False) -> Any:
            v = context.get(key)
            if v is None:
                return None
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise RequestError(f"context.{key} must be a non-negative number, got {_short(v)}")
            if integral and not float(v).is_integer():
                raise RequestError(f"context.{key} must be an integer, got {v!r}")
            return int(v) if integral else float(v)

        budget = number("budget_ms")
        if budget is not None and budget <= 0:
            raise RequestError(f"context.budget_ms must be > 0, got {budget}")
        tier = context.get("tier")
        if tier is not None and not isinstance(tier, str):
            raise RequestError(f"context.tier must be a string, got {_short(tier)}")
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

    def _check_room(self, name: str, candidates: int) -> None:
        """Refuse a request its variant's queue has no room for, with the predicted drain time."""
        b = self.batching
        if candidates > b.max_queued_candidates:  # it could never be admitted, however idle the server
            self.metrics.inc("codesign_errors_total", kind="too_large")
            raise RequestTooLargeError(
                f"the request's {candidates} candidates are over this server's queue bound of "
                f"{b.max_queued_candidates} rows",
                fix="split the candidates over several requests",
            )
        snap = self.load.snapshot()[name]
        reqs, rows = int(snap["queued_requests"]), int(snap["queued_candidates"])
        if reqs < b.max_queued_requests and rows + candidates <= b.max_queued_candidates:
            return
        drain_s = self.router.profiles[name].latency(rows, max(reqs, 1))
        self.metrics.inc("codesign_errors_total", kind="overloaded")
        raise OverloadError(
            f"variant '{name}' has {reqs} requests ({rows} candidates) queued, at its bound",
            retry_after_s=max(drain_s, 0.001),
            fix="retry after the Retry-After delay, or add replicas",
        )

    def _submit(self, job: _Job) -> None:
        name = job.decision.variant
        self.metrics.inc(
            "codesign_routing_decisions_total",
            policy=job.decision.policy,
            variant=name,
            kind=job.decision.kind,
        )
        job.reset()
        job.rows_waiting = job.candidates
        self.load.enqueue(name, job.candidates)
        self._queues[name].put(job)

    def _finish(self, job: _Job) -> None:
        with self._inflight_lock:
            self._inflight -= 1
        job.finish()

    # ---- workers -------------------------------------------------------------------------------
    def _worker(self, name: str) -> None:
        q = self._queues[name]
        pending: list[_Job] = []
        stopping = False
        while True:
            if not pending:
                if stopping:
                    return
                item = q.get()
                if item is None:
                    return
                if isinstance(item, _Probe):
                    self._probe(name, self._current.variants[name])
                    continue
                pending.append(item)
            deadline = time.perf_counter() + self.batching.max_delay_ms / 1e3
            while not stopping:
                # everything already queued joins at once (a small request must be seen while a huge one
                # is scored slice by slice); only the wait for more depends on the batch being full
                wait = 0.0 if self._full(pending) else deadline - time.perf_counter()
                try:
                    item = q.get(timeout=wait) if wait > 0 else q.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                elif isinstance(item, _Probe):
                    self._probe(name, self._current.variants[name])
                else:
                    pending.append(item)
            pending = self._drop_finished(name, pending)
            if not pending:
                continue
            if name in self.router.down:
                self._reroute(name, pending)
                pending = []
                continue
            try:
                chosen = self._plan(name, pending)
                self._run(name, chosen[0][0].version.variants[name], chosen)
            except Exception:  # a bug here must not end the worker and leave its requests hanging
                log.exception(
                    "variant '%s': internal error while batching; failing its pending requests", name
                )
                for job in pending:
                    if not job.done.is_set() and job.decision.variant == name:
                        self._forget(name, job)
                        job.error = CodesignError(
                            "internal error while scoring", fix="the server log has the details; retry"
                        )
                        self._finish(job)
            pending = [j for j in pending if not j.done.is_set() and j.decision.variant == name]

    def _full(self, pending: list[_Job]) -> bool:
        b = self.batching
        return len(pending) >= b.max_requests or sum(j.rows_left for j in pending) >= b.max_candidates

    def _drop_finished(self, name: str, pending: list[_Job]) -> list[_Job]:
        """Drop requests whose caller left, and shed those whose budget has passed."""
        now = time.perf_counter()
        keep = []
        for job in pending:
            if job.cancelled:
                self._forget(name, job)
                self._finish(job)
            elif job.deadline is not None and now > job.deadline:
                self._forget(name, job)
                self.metrics.inc("codesign_errors_total", kind="deadline")
                waited = (now - job.arrived) * 1e3
                job.error = DeadlineError(
                    f"the request's budget of {job.features.budget_ms:g} ms ran out before it was scored "
                    f"({waited:.1f} ms since it arrived); it was shed unscored",
                    fix="send a larger context.budget_ms, fewer candidates, or retry on a less loaded replica",
                )
                self._finish(job)
            else:
                keep.append(job)
        return keep

    def _forget(self, name: str, job: _Job) -> None:
        self.load.forget(name, 0 if job.left_queue else 1, job.rows_waiting)
        job.rows_waiting, job.left_queue = 0, True

    def _plan(self, name: str, pending: list[_Job]) -> list[tuple[_Job, int]]:
        """(request, slice index) pairs of the next batch: smallest remaining first; on every other
        batch the oldest request goes first, so a large request cannot starve behind small ones. A
        batch holds requests of one weights version: the first one's."""
        b = self.batching
        spec = self.schema.spec
        for job in pending:
            if job.pieces is None:
                pieces = split_candidates(job.batch, spec, b.max_candidates, self._user_bags)
                repeated = self._user_bags - self._first_row.get(name, frozenset())
                if repeated:  # this variant reads those bags on every row
                    pieces = [repeat_request_bags(p, spec, repeated) for p in pieces]
                job.pieces = pieces
        order = sorted(pending, key=lambda j: (j.rows_left, j.arrived))
        if next(self._turn[name]) % 2:
            oldest = min(pending, key=lambda j: j.arrived)
            order.remove(oldest)
            order.insert(0, oldest)
        chosen: list[tuple[_Job, int]] = []
        rows = 0
        version = order[0].version
        for job in order:
            assert job.pieces is not None
            if job.version is not version:
                continue
            index = len(job.outputs)
            size = job.pieces[index].num_candidates
            if chosen and (rows + size > b.max_candidates or len(chosen) >= b.max_requests):
                continue
            chosen.append((job, index))
            rows += size
        return chosen

    def _run(self, name: str, variant: Variant, chosen: list[tuple[_Job, int]]) -> None:
        rows = sum(_piece(j, i).num_candidates for j, i in chosen)
        leaving = sum(1 for j, i in chosen if i == len(j.pieces or ()) - 1)
        for job, i in chosen:
            job.rows_waiting -= _piece(job, i).num_candidates
            job.left_queue = job.left_queue or i == len(job.pieces or ()) - 1
        self.load.start(name, leaving, rows)
        t0 = time.perf_counter()
        try:
            try:
                outputs = _score(variant, [_piece(j, i) for j, i in chosen], rows)
            except RankLostError as exc:  # the group, not the variant or a request: no probe, no retry
                for job, _ in chosen:
                    if job.error is None and job.tensors is None:
                        self._forget(name, job)
                        self.metrics.inc("codesign_errors_total", kind="rank_lost")
                        job.error = exc
                        self._finish(job)
                return
            except Exception as exc:
                self._isolate(name, variant, chosen, exc)
                return
            seconds = time.perf_counter() - t0
            self.load.observe(name, self.router.profiles[name].latency(rows, len(chosen)), seconds)
            self.metrics.observe("codesign_batch_requests", len(chosen), variant=name)
            self._deliver(chosen, outputs)
        finally:
            self.load.finish(name, leaving, rows)

    def _deliver(self, chosen: list[tuple[_Job, int]], outputs: list[torch.Tensor]) -> None:
        start = 0
        for job, i in chosen:
            stop = start + _piece(job, i).num_candidates
            job.outputs.append([o[start:stop] for o in outputs])
            job.batch_requests = max(job.batch_requests, len(chosen))
            start = stop
            if len(job.outputs) == len(job.pieces or ()):
                parts = job.outputs
                joined = [torch.cat([p[k] for p in parts]) for k in range(len(parts[0]))]
                job.tensors = joined
                job.scores = scores_per_candidate(joined, 0, job.candidates)
                self._finish(job)

    def _isolate(self, name: str, variant: Variant, chosen: list[tuple[_Job, int]], exc: Exception) -> None:
        """A batch failed: is it the variant or a request? The variant scores its reference batch again
        (the health probe): if that fails too, the variant leaves rotation and its requests go elsewhere;
        if not, each slice is scored alone and only the request(s) the model cannot score get an error,
        so one bad request never takes a variant (or the server) down."""
        if isinstance(exc, torch.OutOfMemoryError):  # free what the failed call holds before the probe
            exc.__traceback__ = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        healthy = self._reference_ok(name, variant)
        if not healthy:
            log.error(
                "variant '%s' failed on a batch of %d requests (%s: %s) and on its reference batch; out of "
                "rotation until a probe passes",
                name,
                len(chosen),
                type(exc).__name__,
                _short(str(exc), 300),
            )
            self._take_down(name, RUN_FAILED, stage="run")
            self._reroute(name, [j for j, _ in chosen])
            return
        for job, i in chosen:
            try:
                # a one-request batch already failed alone: no need to run it again
                if len(chosen) == 1:
                    raise exc
                outputs = _score(variant, [_piece(job, i)], _piece(job, i).num_candidates)
            except Exception as one:
                log.warning(
                    "variant '%s' cannot score a request (%d candidates): %s: %s",
                    name,
                    job.candidates,
                    type(one).__name__,
                    _short(str(one), 300),
                )
                self._forget(name, job)
                if isinstance(one, torch.OutOfMemoryError):  # the request is too large, not malformed
                    self.metrics.inc("codesign_errors_total", kind="out_of_memory")
                    job.error = RequestTooLargeError(
                        f"variant '{name}' ran out of device memory scoring this request "
                        f"({job.candidates} candidates); the variant stays in rotation",
                        fix="send fewer candidates per request (split them over several requests)",
                    )
                    self._finish(job)
                    continue
                self.metrics.inc("codesign_errors_total", kind="unscorable")
                job.error = RequestError(
                    f"variant '{name}' could not score this request ({type(one).__name__})",
                    fix="check the request's values against the schema (GET /v1/schema): ids within each "
                    "table's rows, lengths and offsets consistent; the variant stays in rotation",
                )
                self._finish(job)
                continue
            self._deliver([(job, i)], outputs)

    def _reroute(self, failed: str, jobs: list[_Job]) -> None:
        for job in jobs:
            self._forget(failed, job)
            try:
                job.decision = self.router.fallback(failed, job.features)
            except RoutingError:
                self.metrics.inc("codesign_errors_total", kind="no_variant")
                job.error = RoutingError(
                    f"variant '{failed}' is out of rotation and no other variant is up",
                    fix="check the server's readiness (GET /v2/health/ready) and log",
                )
                self._finish(job)
                continue
            self._submit(job)

    # ---- health --------------------------------------------------------------------------------
    def _reference_ok(self, name: str, variant: Variant) -> bool:
        try:
            ok, max_abs = variant.check_reference()
        except Exception as exc:
            log.warning(
                "variant '%s': reference batch raised %s: %s", name, type(exc).__name__, _short(str(exc))
            )
            return False
        if not ok:
            log.warning("variant '%s': reference batch off by %.3g (over tolerance)", name, max_abs)
        return bool(ok)

    def _take_down(self, name: str, why: str, stage: str) -> None:
        self.router.mark_down(name, why)
        self.metrics.inc("codesign_variant_failures_total", variant=name, stage=stage)
        if name in self._current.variants:
            with self._probe_lock:
                interval = self.batching.probe_interval_s
                self._probes[name] = (time.monotonic() + interval, interval)

    def _probe(self, name: str, variant: Variant) -> None:
        """Half-open probe on the variant's own worker: back in rotation if the reference batch scores right."""
        ok = self._reference_ok(name, variant)
        with self._probe_lock:
            self._probing.discard(name)
            if ok:
                self._probes.pop(name, None)
            else:
                _, interval = self._probes.get(name, (0.0, self.batching.probe_interval_s))
                interval = min(2 * interval, self.batching.probe_max_interval_s)
                self._probes[name] = (time.monotonic() + interval, interval)
        self.metrics.inc("codesign_variant_probes_total", variant=name, result="pass" if ok else "fail")
        if ok:
            log.warning("variant '%s' scores its reference batch again; back in rotation", name)
            self.router.mark_up(name)

    def _prober(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            with self._probe_lock:
                due = [n for n, (t, _) in self._probes.items() if t <= now and n not in self._probing]
                self._probing.update(due)
                upcoming = [t for n, (t, _) in self._probes.items() if n not in self._probing]
            for name in due:
                self._queues[name].put(_PROBE)
            self._stop.wait(min([*(t - now for t in upcoming), 0.5]) if upcoming else 0.5)

    @property
    def ready(self) -> bool:
        """True while the server takes requests: not draining and at least one variant in rotation."""
        whole = self.group is None or self.group.problem() is None
        return not self.draining and not self._closed and bool(self.router.available) and whole

    @property
    def inflight(self) -> int:
        """Requests admitted and not yet answered."""
        return self._inflight

    def health(self) -> dict[str, Any]:
        """Readiness and each variant's state, with no exception text or paths (those are logged)."""
        status = "draining" if self.draining else ("ok" if self.ready else "unavailable")
        down = self.router.down  # one snapshot: a probe may bring a variant back meanwhile
        return {
            "status": status,
            "variants": {n: ("up" if n not in down else f"down: {down[n]}") for n in self.router.profiles},
            "policy": self.router.policy_name,
            "weights_version": self._current.id,
            **({"group": self.group.describe()} if self.group is not None else {}),
        }

    # ---- weights ---------------------------------------------------------------------------------
    @property
    def weights_version(self) -> WeightsVersion:
        """The version new requests are scored on."""
        return self._current

    def weights(self) -> dict[str, Any]:
        """The current weights version, the one ``rollback`` would restore, and whether an update runs."""
        previous = self._previous
        return {
            "current": self._current.describe(),
            "previous": previous.describe() if previous is not None else None,
            "updating": self._updating.locked(),
        }

    def update_weights(
        self,
        *,
        delta: str | Path | None = None,
        sha256: str | None = None,
        bundle: str | Path | None = None,
        trusted_keys: Sequence[str | Path] = (),
        allow_unsigned_native: bool = False,
    ) -> dict[str, Any]:
        """Serve new weights without downtime: a delta file (``delta`` + its ``sha256``: whole tensors
        and changed rows by the compiled programs' weight names, ``codesign.WeightsDelta``) applied to
        every variant, or a new ``bundle`` of the same variants and request interface (loaded as at
        start, ``trusted_keys`` / ``allow_unsigned_native`` included).

        The new version is built and checked while the current one serves: every variant must score
        its reference batch (a delta's variants as their plain program does), and a bundle's
        variants must read requests exactly as the running ones do. Only then do new requests go to
        it; requests admitted before finish on the version they were admitted on. On any failure
        nothing changes (WeightsError, or WeightsBusyError while another update runs). Returns the
        new version's record; the replaced version is kept for ``rollback``.
        """
        if self.group is not None and bundle is not None:
            raise WeightsError(
                "a sharded server (--devices K) takes weight deltas, not bundles: a new bundle's tables would "
                "have to be read again by every rank",
                fix="send a delta file (codesign.WeightsDelta), or restart the server on the new bundle",
            )
        if (delta is None) == (bundle is None):
            raise WeightsError(
                "give a delta file or a bundle (one of them)", fix="delta=PATH, sha256=HEX or bundle=DIR"
            )
        if delta is not None and not sha256:
            raise WeightsError(
                "a delta file needs its sha256", fix="pass the sha256 WeightsDelta.save returned"
            )
        if not self._updating.acquire(blocking=False):
            self.metrics.inc("codesign_weight_updates_total", result="busy")
            raise WeightsBusyError(
                "another weight update or rollback is running",
                fix="wait for it (GET /v2/admin/weights) and retry",
            )
        try:
            base = self._current
            shards: int | None = None  # a sharded server's new version of its ranks' shards
            try:
                if delta is not None and self.group is not None:
                    variants, source, sha, shards = self._from_sharded_delta(base, Path(delta), str(sha256))
                elif delta is not None:
                    variants, source, sha = self._from_delta(base, Path(delta), str(sha256))
                else:
                    assert bundle is not None
                    variants, source, sha = self._from_bundle(
                        base, Path(bundle), trusted_keys, allow_unsigned_native
                    )
                self._warm_new(variants)
            except Exception as exc:
                if self.group is not None and shards is not None:
                    self.group.release(shards)
                self.metrics.inc("codesign_weight_updates_total", result="refused")
                if isinstance(exc, WeightsError):
                    raise
                log.exception("weight update failed")
                raise WeightsError(
                    f"the update failed: {type(exc).__name__}: {_short(str(exc), 300)}",
                    fix="nothing was changed; the server log has the details",
                ) from exc
            version = WeightsVersion(next(self._numbers), variants, source, sha, time.time())
            if self.group is not None and shards is not None:
                self._shards[version.number] = shards  # every rank drops them once nothing holds this version
                weakref.finalize(version, self.group.release, shards)
            self._swap(base, version)
            self.metrics.inc("codesign_weight_updates_total", result="applied")
            log.warning("weights %s (%s) in rotation; %s kept for rollback", version.id, source, base.id)
            return version.describe()
        finally:
            self._updating.release()

    def rollback(self) -> dict[str, Any]:
        """Serve the previous weights version again (the one just replaced becomes the previous one)."""
        if not self._updating.acquire(blocking=False):
            raise WeightsBusyError(
                "a weight update or rollback is running", fix="wait for it (GET /v2/admin/weights) and retry"
            )
        try:
            previous = self._previous
            if previous is None:
                raise WeightsError(
                    "there is no previous weights version to restore", fix="roll back only after an update"
                )
            replaced = self._current
            self._swap(replaced, previous)
            self.metrics.inc("codesign_weight_updates_total", result="rolled_back")
            log.warning("weights %s back in rotation (rollback from %s)", previous.id, replaced.id)
            return previous.describe()
        finally:
            self._updating.release()

    def _swap(self, previous: WeightsVersion, current: WeightsVersion) -> None:
        """Put ``current`` in rotation (admit() reads it once per request); ``previous`` is kept for
        rollback and older versions live only as long as requests admitted on them."""
        self._previous, self._current = previous, current
        self.bundle = dataclasses.replace(self.bundle, variants=dict(current.variants))

    def _from_delta(
        self, base: WeightsVersion, path: Path, sha256: str
    ) -> tuple[dict[str, Variant], str, str]:
        from codesign.build.weights import WeightsDelta, apply_delta

        d = WeightsDelta.read(path, sha256)
        return {n: apply_delta(v, d) for n, v in base.variants.items()}, f"delta {path.name}", d.sha256

    def _from_sharded_delta(
        self, base: WeightsVersion, path: Path, sha256: str
    ) -> tuple[dict[str, Variant], str, str, int]:
        """A delta on a sharded server: every rank builds the new version of its shards (the tables'
        rows), rank 0 the dense weights of each variant; the new variants score through the group on
        the new shards. As for the eager backend, their reference outputs are their own new scores."""
        from codesign.build.weights import apply_delta

        group = self.group
        assert group is not None
        shards, rest, d = group.update(self._shards[base.number], path, sha256)
        try:
            planned = group.planned
            out: dict[str, Variant] = {}
            for name, variant in base.variants.items():
                if name not in planned:
                    out[name] = apply_delta(variant, d)
                    continue
                remainder = rest[name]
                new = (
                    apply_delta(variant, remainder) if remainder is not None else dataclasses.replace(variant)
                )
                module = new.exported.module() if remainder is not None else None
                group.attach(new, planned.index(name), shards, module)
                got = new.score(new.reference_inputs, check=False)
                new.reference_outputs = [t.detach().clone() for t in output_tensors(got)]
                out[name] = new
        except BaseException:
            group.release(shards)
            raise
        return out, f"delta {path.name}", d.sha256, shards

    def _from_bundle(
        self,
        base: WeightsVersion,
        path: Path,
        trusted_keys: Sequence[str | Path],
        allow_unsigned_native: bool,
    ) -> tuple[dict[str, Variant], str, str]:
        from codesign.serving.deployment import load_bundle, request_interface

        try:
            new = load_bundle(
                path, strict=True, trusted_keys=trusted_keys, allow_unsigned_native=allow_unsigned_native
            )
        except CodesignError as exc:
            raise WeightsError(f"the bundle {path} does not load: {exc.message}", fix=exc.fix) from exc
        if set(new.variants) != set(base.variants):
            raise WeightsError(
                f"the bundle {path} holds variants {sorted(new.variants)}, the server serves {sorted(base.variants)}",
                fix="a weight update keeps the variants; serve other variants with a new server",
            )
        for name, v in new.variants.items():
            if request_interface(v) != request_interface(base.variants[name]):
                raise WeightsError(
                    f"variant '{name}' of {path} takes other inputs than the one served",
                    fix="a weight update keeps the request interface; serve a new model with a new server",
                )
            old = base.variants[name]
            if v.id_bounds != old.id_bounds or v.micro_batch != old.micro_batch:
                raise WeightsError(
                    f"variant '{name}' of {path} has other table sizes or micro-batch than the one served "
                    "(the server checks ids against the tables it started with)",
                    fix="serve that bundle with a new server",
                )
            if _outputs(v) != _outputs(old):
                raise WeightsError(
                    f"variant '{name}' of {path} returns other outputs than the one served",
                    fix="serve that bundle with a new server",
                )
            # the bags this server sends once per request must be ones the new variant reads once per request
            if not self._first_row.get(name, frozenset()) <= v.first_row_bags:
                raise WeightsError(
                    f"variant '{name}' of {path} reads on every row user bags that the server sends once per request",
                    fix="serve that bundle with a new server",
                )
        return dict(new.variants), f"bundle {path.name}", _manifest_sha(path)

    def _warm_new(self, variants: Mapping[str, Variant]) -> None:
        """Each new variant scores its reference batch as its warm-up: one that cannot is refused."""
        for name, variant in variants.items():
            try:
                ok, max_abs = _warm(variant, self.batching.warmup_calls)
            except Exception as exc:
                raise WeightsError(
                    f"variant '{name}' fails its reference batch with the new weights: {type(exc).__name__}: "
                    f"{_short(str(exc), 300)}",
                    fix="nothing was changed; check the update",
                ) from exc
            if not ok:
                raise WeightsError(
                    f"variant '{name}' scores its reference batch with max abs error {max_abs:.3g} with the new "
                    "weights, over its tolerance",
                    fix="nothing was changed; check the update",
                )

    # ---- lifecycle -------------------------------------------------------------------------------
    def drain(self, timeout_s: float) -> bool:
        """Turn readiness false and wait up to ``timeout_s`` for the requests admitted to be answered
        (the HTTP front stops accepting connections first; what it already received is still admitted)."""
        self.draining = True
        end = time.monotonic() + timeout_s
        while self._inflight > 0 and time.monotonic() < end:
            time.sleep(0.01)
        return self._inflight == 0

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the workers (requests already queued are scored first) and the prober; joins them,
        waiting at most ``timeout_s`` in all (a worker stuck in a call is left behind, a daemon)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        for q in self._queues.values():
            q.put(None)
        end = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(timeout=max(0.0, end - time.monotonic()))


def _warm(variant: Variant, calls: int) -> tuple[bool, float]:
    """Score the reference batch against the reference outputs, then again up to ``calls`` calls in all
    (the one-off costs of the first calls); (within tolerance, max abs error)."""
    ok, max_abs = variant.check_reference()
    for _ in range(calls - 1):
        variant.score(variant.reference_inputs)
    return ok, max_abs


def _outputs(variant: Variant) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Each output's row shape and dtype (what a reply holds)."""
    return [(tuple(t.shape[1:]), t.dtype) for t in variant.reference_outputs]


def _manifest_sha(path: Path | None) -> str:
    """The sha256 of a bundle's manifest.json ("" when the bundle was built in memory)."""
    if path is None:
        return ""
    try:
        return hashlib.sha256((Path(path) / "manifest.json").read_bytes()).hexdigest()
    except OSError:
        return ""


def _piece(job: _Job, index: int) -> RequestBatch:
    assert job.pieces is not None
    return job.pieces[index]


def _score(variant: Variant, pieces: list[RequestBatch], rows: int) -> list[torch.Tensor]:
    """The output tensors of the slices scored as one batch; raises if any has not one row per candidate."""
    batch = concat_batches(pieces, variant.spec)
    with torch.no_grad():
        outputs = output_tensors(variant.score(batch, check=False))  # parse checked each request
    bad = [tuple(o.shape) for o in outputs if o.dim() == 0 or o.shape[0] != rows]
    if bad:
        raise RuntimeError(f"outputs {bad} do not have one row per candidate ({rows})")
    return outputs


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


def _short(value: Any, limit: int = 60) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) < limit else text[: limit - 3] + "..."


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
        "Variant failures (load, warm-up or run) that took it out of rotation.",
    )
    m.declare("codesign_variant_probes_total", "counter", "Half-open probes of variants out of rotation.")
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
    m.gauge_function(
        "codesign_inflight_requests",
        "Requests admitted and not yet answered.",
        lambda: {(): float(rt.inflight)},
    )
    m.gauge_function("codesign_ready", "1 while the server takes requests.", lambda: {(): float(rt.ready)})
    group = rt.group
    if group is not None:
        m.gauge_function(
            "codesign_rank_up",
            "1 while a rank of the sharded group is up.",
            lambda: {(("rank", r),): float(i["state"] == "up") for r, i in group.describe()["ranks"].items()},
        )
        m.gauge_function(
            "codesign_shard_call_seconds_total",
            "Wall time of the sharded variants' calls on rank 0 (dense part, lookups and exchange).",
            lambda: {(): group.call_seconds},
        )
        m.gauge_function(
            "codesign_shard_comm_seconds_total",
            "Of that, time in the all-to-alls that carry ids out and pooled rows back.",
            lambda: {(): group.comm_seconds()},
        )
    m.declare("codesign_weight_updates_total", "counter", "Weight updates and rollbacks, by result.")
    m.gauge_function(
        "codesign_weights_version",
        "The weights version new requests are scored on (1: the bundle the server started with).",
        lambda: {(): float(rt.weights_version.number)},
    )
    return m
