"""HTTP front of the serving runtime: a ``Runtime`` behind HTTP/JSON (stdlib ``http.server``).

One thread per connection; the runtime does the routing and batching (``codesign.serving.runtime``)::

    POST /v1/score   {"user": {...}, "candidates": {...}, "context": {...}} -> scores + variant + why
    GET  /v1/schema  the request format of this bundle
    GET  /healthz    200 while a variant is in rotation, else 503
    GET  /metrics    Prometheus text: requests, latency per variant, routing, errors, queues

It binds to 127.0.0.1 unless told otherwise and has no authentication: put it behind your
serving mesh before exposing it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from codesign.errors import CodesignError, ConfigError, RequestError, RoutingError
from codesign.serving.deployment import Bundle, load_bundle
from codesign.serving.router import Policy
from codesign.serving.runtime import BatchingConfig, Runtime

__all__ = ["MAX_BODY_BYTES", "Server", "serve"]

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 << 20


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
