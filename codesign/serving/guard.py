"""What stands in front of every endpoint: bearer-token auth, per-client rate limits, the access log,
and error bodies that carry no exception text or paths.

``Guard`` is a plain ASGI middleware around the app. Health probes (``PUBLIC_PATHS``) need no token,
so an orchestrator can probe a server that requires one; everything else does when tokens are set.
Tokens are compared in constant time. Rate limits are token buckets per client (its token when auth
is on, else its address); a client over its rate gets 429 with ``Retry-After``. The access log is one
line per request on the ``codesign.access`` logger; an unexpected exception is logged with its
traceback once per distinct kind and as one line after that, so a fault repeated by every request
cannot flood the log.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import math
import threading
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

__all__ = ["PUBLIC_PATHS", "Guard", "RateLimiter", "json_body", "log_once"]

log = logging.getLogger("codesign.serving")
access_log = logging.getLogger("codesign.access")

PUBLIC_PATHS = frozenset({"/healthz", "/v2/health/live", "/v2/health/ready"})

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def json_body(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


_seen_lock = threading.Lock()
_seen: dict[str, int] = {}


def log_once(what: str, exc: BaseException) -> str:
    """Log ``exc`` with its traceback the first time its kind (type and raising line) is seen, as one
    line after that; returns an id to put in the client's error body (the log line carries it too)."""
    tb = traceback.extract_tb(exc.__traceback__)
    where = f"{tb[-1].filename}:{tb[-1].lineno}" if tb else "?"
    key = f"{type(exc).__name__}@{where}"
    event = uuid.uuid4().hex[:12]
    with _seen_lock:
        count = _seen.get(key, 0) + 1
        _seen[key] = count
    if count == 1:
        log.error("%s [%s]: %s: %s", what, event, type(exc).__name__, exc, exc_info=exc)
    else:
        log.error(
            "%s [%s]: %s: %s (seen %d times; traceback logged the first time)",
            what,
            event,
            type(exc).__name__,
            str(exc)[:200],
            count,
        )
    return event


@dataclasses.dataclass
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """Token buckets per client key: ``rate`` requests per second, bursts of up to ``burst``."""

    def __init__(self, rate: float, burst: int, max_clients: int = 10_000) -> None:
        if not (rate > 0 and burst >= 1):
            raise ValueError(f"rate limit needs rate > 0 and burst >= 1, got {rate}, {burst}")
        self.rate, self.burst, self.max_clients = rate, burst, max_clients
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def take(self, key: str, now: float | None = None) -> float:
        """0.0 if the client may go ahead (one token taken), else seconds until it may."""
        now = time.monotonic() if now is None else now
        with self._lock:
            b = self._buckets.get(key)
            if b is None:
                if len(self._buckets) >= self.max_clients:
                    self._prune(now)
                b = self._buckets[key] = _Bucket(float(self.burst), now)
            b.tokens = min(self.burst, b.tokens + (now - b.stamp) * self.rate)
            b.stamp = now
            if b.tokens >= 1.0:
                b.tokens -= 1.0
                return 0.0
            return (1.0 - b.tokens) / self.rate

    def _prune(self, now: float) -> None:
        full = [k for k, b in self._buckets.items() if b.tokens + (now - b.stamp) * self.rate >= self.burst]
        for k in full or list(self._buckets)[: len(self._buckets) // 2]:
            del self._buckets[k]


class Guard:
    """ASGI middleware: auth, rate limit, access log, and a 500 with an event id for anything unexpected."""

    def __init__(
        self, app: ASGIApp, *, tokens: Sequence[str] = (), limiter: RateLimiter | None = None
    ) -> None:
        self.app = app
        self._tokens = [t.encode() for t in tokens]
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = {"code": 0, "bytes": 0}

        async def send_logged(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            elif message["type"] == "http.response.body":
                status["bytes"] += len(message.get("body", b""))
            await send(message)

        path = scope.get("path", "")
        client = scope.get("client") or ("-", 0)
        try:
            names = [name for name, _ in scope.get("headers", ())]
            key = self._authorize(scope, path)
            if b"transfer-encoding" in names and b"content-length" in names:
                # RFC 9112 lets Transfer-Encoding win; a proxy in front may have read Content-Length
                # instead, which is how requests are smuggled: refuse and close the connection
                await _reply(
                    send_logged,
                    400,
                    {"error": "the request has both Transfer-Encoding and Content-Length", "fix": "send one"},
                    [(b"connection", b"close")],
                )
            elif key is None:
                await _reply(
                    send_logged,
                    401,
                    {"error": "missing or wrong bearer token", "fix": "send 'Authorization: Bearer <token>'"},
                    [(b"www-authenticate", b'Bearer realm="codesign"')],
                )
            else:
                wait = (
                    self.limiter.take(key or str(client[0]))
                    if self.limiter and path not in PUBLIC_PATHS
                    else 0.0
                )
                if wait > 0:
                    await _reply(
                        send_logged,
                        429,
                        {
                            "error": "rate limit exceeded for this client",
                            "fix": f"retry after {math.ceil(wait)} s",
                        },
                        [(b"retry-after", str(max(1, math.ceil(wait))).encode())],
                    )
                else:
                    await self.app(scope, receive, send_logged)
        except Exception as exc:
            event = log_once(f"unexpected error on {scope.get('method')} {path}", exc)
            if status["code"] == 0:  # nothing sent yet: the client still gets an answer
                await _reply(
                    send_logged,
                    500,
                    {
                        "error": "internal error",
                        "event": event,
                        "fix": "the server log has the details under this event id",
                    },
                )
        finally:
            access_log.info(
                '%s "%s %s" %d %d %.2fms',
                client[0],
                scope.get("method"),
                path,
                status["code"],
                status["bytes"],
                (time.perf_counter() - t0) * 1e3,
            )

    def _authorize(self, scope: Scope, path: str) -> str | None:
        """The client's rate-limit key if it may go ahead ('' when auth is off), None if refused."""
        if not self._tokens or path in PUBLIC_PATHS:
            return ""
        header = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                header = value
                break
        matched = bearer_token(header, self._tokens)
        return f"token:{matched}" if matched >= 0 else None


def bearer_token(header: bytes, tokens: Sequence[bytes]) -> int:
    """Which of ``tokens`` an ``Authorization: Bearer <token>`` header carries (-1: none), compared in
    constant time: every token is compared, so the time does not tell which matched."""
    scheme, _, given = header.partition(b" ")
    if scheme.lower() != b"bearer" or not given:
        return -1
    given = given.strip()
    matched = -1
    for i, token in enumerate(tokens):
        if hmac.compare_digest(given, token):
            matched = i
    return matched


async def _reply(
    send: Send, status: int, body: Any, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    data = json_body(body)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})
