"""HTTP front of the serving runtime: a ``Runtime`` behind uvicorn (h11) and Starlette.

Endpoints::

    POST /v1/score             {"user": {...}, "candidates": {...}, "context": {...}} -> scores + variant + why
    POST /v1/score/batch       {"requests": [...]} -> one result (with its own status) per request
    GET  /v1/schema            the request format of this bundle
    GET  /openapi.json         OpenAPI 3.1, with this bundle's request body
    GET  /healthz              readiness and each variant's state (503 when not ready)
    GET  /metrics              Prometheus text: requests, latency per variant, routing, errors, queues
    GET  /v2, /v2/health/live, /v2/health/ready, /v2/models/{name}[/ready]
    POST /v2/models/{name}/infer   the Open Inference Protocol (codesign.serving.kserve)

HTTP parsing, keep-alive, backlog, connection limits and TCP_NODELAY (asyncio sets it on every
connection) come from uvicorn and h11; on top of them a connection must send its request headers
within ``header_timeout_s`` and its body within ``body_timeout_s`` (slow clients cannot hold
connections open), and bodies are read with a size cap before any decoding. ``Guard``
(``codesign.serving.guard``) adds bearer-token auth, rate limits and the access log. SIGTERM and
SIGINT stop accepting, turn readiness false, answer every admitted request within
``drain_timeout_s``, and return normally (``codesign serve`` exits 0).

It binds to 127.0.0.1 unless told otherwise; without ``auth_tokens`` anyone who can reach it may
score: put it behind your serving mesh or give it tokens before exposing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import math
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from codesign.errors import (
    ConfigError,
    DeadlineError,
    OverloadError,
    RequestError,
    RequestTooLargeError,
    RoutingError,
    WeightsError,
)
from codesign.serving.deployment import Bundle, load_bundle
from codesign.serving.guard import Guard, RateLimiter, bearer_token, json_body, log_once
from codesign.serving.kserve import HEADER_LENGTH, OutputInfo, encode_infer, model_metadata, parse_infer
from codesign.serving.openapi import openapi_document
from codesign.serving.router import Policy
from codesign.serving.runtime import BatchingConfig, Runtime, Ticket, WeightsBusyError
from codesign.version import __version__

__all__ = ["MAX_BODY_BYTES", "Server", "ServerConfig", "make_app", "serve"]

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 << 20
MAX_BATCH_REQUESTS = 256
# replies with more scores than this are encoded on a worker thread: json.dumps of 100k scores takes
# tens of milliseconds, during which the event loop would answer no other connection
BIG_REPLY_SCORES = 4096


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """How the HTTP front listens, limits and protects.

    ``max_connections``: beyond it uvicorn answers 503 at once. ``rate_limit_rps`` (0: off) and
    ``rate_limit_burst`` bound each client (its token, else its address). ``auth_tokens``: bearer
    tokens any of which is accepted (empty: no auth; health probes never need one).
    ``admin_tokens``: bearer tokens of the weight-update endpoints (``/v2/admin/weights``), which are
    off while it is empty; an admin token is also accepted where ``auth_tokens`` are.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    backlog: int = 2048
    max_connections: int = 1024
    keep_alive_s: int = 5
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_body_bytes: int = MAX_BODY_BYTES
    max_batch_requests: int = MAX_BATCH_REQUESTS
    drain_timeout_s: float = 30.0
    auth_tokens: tuple[str, ...] = dataclasses.field(default=(), repr=False)
    admin_tokens: tuple[str, ...] = dataclasses.field(default=(), repr=False)
    trusted_keys: tuple[str, ...] = ()  # a bundle sent as a weight update loads as at start: these keys
    allow_unsigned_native: bool = False  # and this setting
    rate_limit_rps: float = 0.0
    rate_limit_burst: int = 0  # 0: twice the rate (at least 1)
    model_name: str = "codesign"

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        positive = {
            "backlog": self.backlog,
            "max_connections": self.max_connections,
            "keep_alive_s": self.keep_alive_s,
            "header_timeout_s": self.header_timeout_s,
            "body_timeout_s": self.body_timeout_s,
            "max_body_bytes": self.max_body_bytes,
            "max_batch_requests": self.max_batch_requests,
            "drain_timeout_s": self.drain_timeout_s,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ConfigError(f"{name} must be > 0, got {value}")
        if self.rate_limit_rps < 0 or self.rate_limit_burst < 0:
            raise ConfigError("rate_limit_rps and rate_limit_burst must be >= 0")
        if any(not t or any(c.isspace() for c in t) for t in (*self.auth_tokens, *self.admin_tokens)):
            raise ConfigError("auth tokens must be non-empty and hold no whitespace")
        if not self.model_name or "/" in self.model_name:
            raise ConfigError(f"model_name must be a non-empty name without '/', got {self.model_name!r}")

    def limiter(self) -> RateLimiter | None:
        if self.rate_limit_rps <= 0:
            return None
        burst = self.rate_limit_burst or max(1, math.ceil(2 * self.rate_limit_rps))
        return RateLimiter(self.rate_limit_rps, burst)


class _HTTPError(Exception):
    def __init__(
        self, status: int, message: str, fix: str | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.fix, self.headers = status, message, fix, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": self.message, **({"fix": self.fix} if self.fix else {})}


def _status_of(exc: BaseException, runtime: Runtime) -> _HTTPError:
    """The HTTP answer to an error of the runtime; exception text of unexpected errors stays in the log."""
    if isinstance(exc, _HTTPError):
        return exc
    if isinstance(exc, RequestTooLargeError):
        return _HTTPError(413, exc.message, exc.fix)
    if isinstance(exc, RequestError):
        return _HTTPError(400, exc.message, exc.fix)
    if isinstance(exc, OverloadError):
        retry = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
        return _HTTPError(503 if runtime.draining or not runtime.ready else 429, exc.message, exc.fix, retry)
    if isinstance(exc, RoutingError):
        return _HTTPError(503, exc.message, exc.fix, {"Retry-After": "1"})
    if isinstance(exc, DeadlineError):
        return _HTTPError(504, exc.message, exc.fix)
    if isinstance(exc, WeightsBusyError):
        return _HTTPError(409, exc.message, exc.fix)
    if isinstance(exc, WeightsError):
        return _HTTPError(422, exc.message, exc.fix)
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return _HTTPError(
            504, f"request not scored within the server's {runtime.batching.timeout_s} s timeout"
        )
    event = log_once("request failed", exc)
    return _HTTPError(500, "internal error", f"the server log has the details under event {event}")


def make_app(runtime: Runtime, config: ServerConfig | None = None) -> Any:
    """The ASGI application (Starlette routes inside ``Guard``) serving ``runtime``."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    cfg = config or ServerConfig()
    outputs = OutputInfo.from_reference(_reference_outputs(runtime))
    model = cfg.model_name

    def respond(status: int, obj: Any, headers: dict[str, str] | None = None) -> Response:
        return Response(json_body(obj), status, headers, media_type="application/json")

    async def respond_scored(obj: Any, scores: int) -> Response:
        """A 200 with scores; a large one is encoded on a worker thread, not on the event loop."""
        if scores <= BIG_REPLY_SCORES:
            return respond(200, obj)
        return Response(await asyncio.to_thread(json_body, obj), 200, media_type="application/json")

    def failed(exc: BaseException) -> Response:
        err = _status_of(exc, runtime)
        return respond(err.status, err.body(), err.headers)

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cfg.max_body_bytes:
            raise _HTTPError(
                413, f"request body of {declared} bytes is over the {cfg.max_body_bytes} byte limit"
            )
        chunks, size = [], 0

        async def collect() -> None:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > cfg.max_body_bytes:
                    raise _HTTPError(413, f"request body is over the {cfg.max_body_bytes} byte limit")
                chunks.append(chunk)

        try:
            await asyncio.wait_for(collect(), cfg.body_timeout_s)
        except (TimeoutError, asyncio.TimeoutError):  # one class from Python 3.11 on
            raise _HTTPError(408, f"request body not received within {cfg.body_timeout_s} s") from None
        return b"".join(chunks)

    async def decode(raw: bytes) -> Any:
        def parse() -> Any:
            try:
                return json.loads(raw)
            except (UnicodeDecodeError, ValueError, RecursionError) as exc:
                detail = str(exc) if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
                raise _HTTPError(
                    400,
                    f"request body is not valid JSON: {detail}",
                    'send {"user": {...}, "candidates": {...}}',
                ) from None

        return await asyncio.to_thread(parse)

    async def run(body: Any, received: float) -> Ticket:
        """Admit one request and wait for its answer without holding a thread."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def settle() -> None:
            if not done.done():
                done.set_result(None)

        def wake() -> None:
            loop.call_soon_threadsafe(settle)

        ticket = await asyncio.to_thread(runtime.admit, body, received, wake)
        try:
            await asyncio.wait_for(asyncio.shield(done), runtime.batching.timeout_s)
        except (TimeoutError, asyncio.TimeoutError):  # one class from Python 3.11 on
            runtime.abandon(ticket)
            raise
        return ticket

    async def score(request: Request) -> Response:
        received = time.perf_counter()
        try:
            body = await decode(await read_body(request))
            ticket = await run(body, received)
            return await respond_scored(runtime.answer(ticket), ticket.job.candidates)
        except Exception as exc:
            return failed(exc)

    async def score_batch(request: Request) -> Response:
        received = time.perf_counter()
        try:
            body = await decode(await read_body(request))
            if (
                not isinstance(body, dict)
                or set(body) != {"requests"}
                or not isinstance(body["requests"], list)
            ):
                raise _HTTPError(
                    400, 'a batch is {"requests": [request, ...]}', "each request as POST /v1/score takes"
                )
            items = body["requests"]
            if not 1 <= len(items) <= cfg.max_batch_requests:
                raise _HTTPError(
                    413 if items else 400,
                    f"a batch holds 1 to {cfg.max_batch_requests} requests, got {len(items)}",
                    "split the batch",
                )
        except Exception as exc:
            return failed(exc)

        async def one(item: Any) -> dict[str, Any]:
            try:
                return {"status": 200, **runtime.answer(await run(item, received))}
            except Exception as exc:
                err = _status_of(exc, runtime)
                return {"status": err.status, **err.body()}

        results = await asyncio.gather(*(one(item) for item in items))
        return await respond_scored({"results": results}, sum(len(r.get("scores", ())) for r in results))

    async def infer(request: Request) -> Response:
        received = time.perf_counter()
        name = request.path_params["name"]
        if name != model:
            return respond(404, {"error": f"unknown model '{name}'", "fix": f"this server serves '{model}'"})
        try:
            raw = await read_body(request)
            parsed = await asyncio.to_thread(
                parse_infer, raw, request.headers.get(HEADER_LENGTH), runtime.schema, outputs
            )
            ticket = await run(parsed.body, received)
            reply = runtime.answer(ticket)
            assert ticket.job.tensors is not None
            params = {k: reply[k] for k in ("variant", "latency_ms", "batch_requests", "weights_version")}
            encode = functools.partial(
                encode_infer, parsed, ticket.job.tensors, outputs, model=model, parameters=params
            )
            big = ticket.job.candidates > BIG_REPLY_SCORES
            data, header = await asyncio.to_thread(encode) if big else encode()
        except Exception as exc:
            return failed(exc)
        if header is None:
            return Response(data, 200, media_type="application/json")
        return Response(
            data, 200, {"Inference-Header-Content-Length": str(header)}, "application/octet-stream"
        )

    def health(request: Request) -> Response:
        h = runtime.health()
        return respond(200 if runtime.ready else 503, h)

    def live(request: Request) -> Response:
        return respond(200, {"live": True})

    def ready(request: Request) -> Response:
        return respond(200 if runtime.ready else 503, {"ready": runtime.ready})

    def model_ready(request: Request) -> Response:
        if request.path_params["name"] != model:
            return respond(404, {"error": f"unknown model '{request.path_params['name']}'"})
        return respond(200 if runtime.ready else 503, {"name": model, "ready": runtime.ready})

    def metadata(request: Request) -> Response:
        if request.path_params["name"] != model:
            return respond(
                404, {"error": f"unknown model '{request.path_params['name']}'", "fix": f"models: {model}"}
            )
        return respond(200, model_metadata(runtime.schema, model, outputs, "codesign"))

    def server_metadata(request: Request) -> Response:
        return respond(
            200, {"name": "codesign", "version": __version__, "extensions": ["binary_tensor_data"]}
        )

    def metrics(request: Request) -> Response:
        return Response(runtime.metrics.render(), 200, media_type="text/plain; version=0.0.4; charset=utf-8")

    def described(request: Request) -> Response:
        return respond(200, runtime.schema.describe())

    def openapi(request: Request) -> Response:
        return JSONResponse(openapi_document(runtime.schema, model))

    admins = [t.encode() for t in cfg.admin_tokens]

    def admin(request: Request) -> None:
        """Only an admin token may change weights; the endpoints are off without one configured."""
        if not admins:
            raise _HTTPError(
                403,
                "weight updates are off on this server",
                "start it with admin tokens (codesign serve --admin-token-file FILE)",
            )
        if bearer_token(request.headers.get("authorization", "").encode("latin-1"), admins) < 0:
            raise _HTTPError(
                401, "weight updates need an admin bearer token", "send 'Authorization: Bearer <admin token>'"
            )

    def weights(request: Request) -> Response:
        try:
            admin(request)
        except Exception as exc:
            return failed(exc)
        return respond(200, runtime.weights())

    async def update_weights(request: Request) -> Response:
        try:
            admin(request)
            body = await decode(await read_body(request))
            keys = {"delta", "sha256"} if isinstance(body, dict) and "delta" in body else {"bundle"}
            if (
                not isinstance(body, dict)
                or set(body) != keys
                or not all(isinstance(body[k], str) for k in keys)
            ):
                raise _HTTPError(
                    400,
                    'an update is {"delta": PATH, "sha256": HEX} or {"bundle": DIR}',
                    "paths are on the server's file system",
                )
            # built and checked on a worker thread while the current version serves
            version = await asyncio.to_thread(
                runtime.update_weights,
                delta=body.get("delta"),
                sha256=body.get("sha256"),
                bundle=body.get("bundle"),
                trusted_keys=cfg.trusted_keys,
                allow_unsigned_native=cfg.allow_unsigned_native,
            )
        except Exception as exc:
            return failed(exc)
        return respond(200, version)

    async def rollback(request: Request) -> Response:
        try:
            admin(request)
            version = await asyncio.to_thread(runtime.rollback)
        except Exception as exc:
            return failed(exc)
        return respond(200, version)

    async def not_found(request: Request, exc: Exception) -> Response:
        return respond(
            404,
            {
                "error": f"no such endpoint: {request.method} {request.url.path}",
                "fix": "GET /openapi.json lists the endpoints",
            },
        )

    async def not_allowed(request: Request, exc: Exception) -> Response:
        return respond(405, {"error": f"{request.method} is not allowed on {request.url.path}"})

    routes = [
        Route("/v1/score", score, methods=["POST"]),
        Route("/v1/score/batch", score_batch, methods=["POST"]),
        Route("/v1/schema", described, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/healthz", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2/models/{name}", metadata, methods=["GET"]),
        Route("/v2/models/{name}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{name}/infer", infer, methods=["POST"]),
        Route("/v2/admin/weights", weights, methods=["GET"]),
        Route("/v2/admin/weights", update_weights, methods=["POST"]),
        Route("/v2/admin/weights/rollback", rollback, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_allowed})
    tokens = (*cfg.auth_tokens, *cfg.admin_tokens) if cfg.auth_tokens else ()
    return Guard(app, tokens=tokens, limiter=cfg.limiter())


def _reference_outputs(runtime: Runtime) -> list[Any]:
    from codesign.numerics import output_tensors

    first = next(iter(runtime.bundle.variants.values()))
    return output_tensors(first.reference_outputs)


def _protocol(header_timeout_s: float) -> type:
    """uvicorn's h11 protocol with a deadline on each request's headers (from connection or keep-alive)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _timed_cycle: Any = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._timed_cycle = self.cycle
            self._header_timer = self.loop.call_later(header_timeout_s, self._too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _too_slow(self) -> None:
            self._header_timer = None
            if self.cycle is self._timed_cycle and not self.transport.is_closing():
                log.info(
                    "closing a connection from %s: no complete request headers in %s s",
                    self.client,
                    header_timeout_s,
                )
                self.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not self._timed_cycle:  # a request's headers arrived
                self._disarm()
                self._timed_cycle = self.cycle

        def on_response_complete(self) -> None:
            import h11

            before = self.cycle
            super().on_response_complete()  # may start a pipelined request whose headers are here already
            idle = self.cycle is before and self.conn.their_state is h11.IDLE
            if idle and not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return TimedH11Protocol


def _bind(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port}: {exc.strerror}", fix="pick another --port"
        ) from exc
    # listening from here on: a client that connects before uvicorn's loop runs waits in the backlog
    # instead of being refused (the CLI prints the address before it starts serving)
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


class Server:
    """The runtime behind HTTP on ``config.host:config.port`` (port 0 picks a free one); a context manager.

    ``start()`` serves from a background thread (tests, notebooks); ``serve_forever()`` serves in
    the calling (main) thread and handles SIGTERM/SIGINT as a graceful drain.

    >>> with Server(Runtime(bundle), port=0) as srv: requests.post(srv.url + "/v1/score", json=body)
    """

    def __init__(
        self,
        runtime: Runtime,
        host: str | None = None,
        port: int | None = None,
        *,
        config: ServerConfig | None = None,
    ) -> None:
        try:
            import uvicorn
        except ImportError as exc:  # pragma: no cover - the serve extra is part of the default set-up
            raise ConfigError(
                "serving over HTTP needs uvicorn and starlette", fix="pip install 'codesign[serve]'"
            ) from exc
        cfg = config or ServerConfig()
        cfg = dataclasses.replace(
            cfg, host=host if host is not None else cfg.host, port=port if port is not None else cfg.port
        )
        if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.auth_tokens:
            log.warning("binding to %s without auth tokens: anyone who reaches it may score", cfg.host)
        self.config = cfg
        self.runtime = runtime
        self._sock = _bind(cfg.host, cfg.port, cfg.backlog)
        uv_config = uvicorn.Config(
            make_app(runtime, cfg),
            http=_protocol(cfg.header_timeout_s),
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            backlog=cfg.backlog,
            limit_concurrency=cfg.max_connections,
            timeout_keep_alive=cfg.keep_alive_s,
            timeout_graceful_shutdown=math.ceil(cfg.drain_timeout_s),
        )
        self._drain_began: float | None = None  # monotonic time of the signal or shutdown() call
        self._uv = _draining_server(uv_config, runtime, self._begin_drain)
        self._thread: threading.Thread | None = None

    def _begin_drain(self) -> None:
        self.runtime.draining = True
        if self._drain_began is None:
            self._drain_began = time.monotonic()

    def _drain_left_s(self) -> float:
        """What is left of the drain timeout: uvicorn's wait for open connections and the runtime's
        wait for admitted requests share one budget, so shutdown takes at most ``drain_timeout_s``."""
        if self._drain_began is None:
            return self.config.drain_timeout_s
        return max(0.0, self.config.drain_timeout_s - (time.monotonic() - self._drain_began))

    @property
    def url(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"http://{host if ':' not in host else f'[{host}]'}:{port}"

    def start(self) -> Server:
        """Serve from a daemon thread; returns once the server accepts connections."""
        self._thread = threading.Thread(
            target=self._uv.run, kwargs={"sockets": [self._sock]}, name="codesign-http", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._uv.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._uv.started:
            raise ConfigError(f"the HTTP server did not start on {self.url}")
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until SIGTERM/SIGINT; then drain and stop the runtime."""
        try:
            self._uv.run(sockets=[self._sock])
        finally:
            self._finish()

    def stop_soon(self) -> None:
        """Ask a server running ``serve_forever`` to drain and stop (from any thread): what SIGTERM does."""
        self._begin_drain()
        self._uv.should_exit = True

    def shutdown(self) -> None:
        """Stop accepting, answer what was admitted (within the drain timeout), stop the runtime."""
        self._begin_drain()
        self._uv.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=self.config.drain_timeout_s + 10)
        self._finish()

    def _finish(self) -> None:
        drained = self.runtime.drain(self._drain_left_s())
        if not drained:
            log.error(
                "%d requests were still in flight after the %s s drain timeout",
                self.runtime.inflight,
                self.config.drain_timeout_s,
            )
        self.runtime.close(timeout_s=max(1.0, self._drain_left_s()) if drained else 0.0)
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _draining_server(config: Any, runtime: Runtime, begin_drain: Callable[[], None]) -> Any:
    """uvicorn's server, turning readiness false at the first signal and not re-raising the signal
    after its graceful shutdown (uvicorn does, which would end a drained server with SIGTERM's status
    instead of 0)."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not runtime.draining:
                log.warning(
                    "signal %s: draining (readiness false; admitted requests are answered)",
                    signal.Signals(sig).name,
                )
            begin_drain()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in original.items():
                    signal.signal(s, handler)

    return DrainingServer(config)


def serve(
    bundle: str | Path | Bundle,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    policy: Policy | None = None,
    batching: BatchingConfig | None = None,
    config: ServerConfig | None = None,
) -> Server:
    """Load ``bundle`` (a path or a Bundle) and return a started Server; call ``shutdown()`` to stop."""
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    return Server(Runtime(b, policy=policy, batching=batching), host, port, config=config).start()
