"""The gateway's request limits (used by ``tasks.serving.gateway``; described in its docstring).

* ``RateLimiter``: a token bucket (rate per second + burst) and a fixed-window quota per key (a bearer
  token's fingerprint), with an injectable clock. A refused request consumes nothing.
* ``h11_protocol(...)``: uvicorn's h11 protocol with the header limits and deadlines uvicorn lacks:
  request line + headers over ``max_header_bytes`` answer 431 (h11 stops buffering at the limit; the
  httptools protocol has no such bound, so the gateway never runs on it), a request whose headers do
  not arrive within ``header_timeout_s`` of its first byte (or of the connection) answers 408, and a
  connection closed with request data still unread is half-closed and drained (discarded, bounded in
  bytes and time) so the client reads the answer instead of a reset.
* ``RequestGuard``: an ASGI middleware answering 431 for too many (or too large) headers and 400 for a
  credential in the query string, before any route, auth or body read.
* ``RedactQueryFilter``: a logging filter that removes credentials from logged URLs (uvicorn's access
  log prints the query string).
* ``Rejections``: counters of refused requests by reason, with a rate-limited warning log.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

logger = logging.getLogger("tasks.serving.gateway")

#: query parameters that carry a credential: refused with 400 and redacted from logs
SECRET_PARAMS = frozenset({"token", "access_token", "api_key", "apikey", "auth", "authorization", "bearer",
                           "password", "secret", "key", "jwt", "id_token", "refresh_token"})
LINGER_S = 2.0  # how long a closed connection with unread request data is drained
LINGER_BYTES = 8 << 20  # at most this much is read (and discarded) while draining


# --------------------------------------------------------------------------- rate limits


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused: ``limit`` is ``rate`` or ``quota``; ``retry_after`` whole seconds."""

    limit: str
    retry_after: int
    message: str


class _Account:
    __slots__ = ("stamp", "tokens", "used", "window_start")

    def __init__(self, burst: float, now: float) -> None:
        self.tokens = burst
        self.stamp = now
        self.window_start = now
        self.used = 0


class RateLimiter:
    """Per-key token bucket (``rate_per_s``, ``burst``; rate 0 = none) and quota (``quota`` requests per
    ``window_s``, a fixed window starting at the key's first counted request; 0 = none).

    ``check(key, quota=True)`` admits a request (consuming one bucket token and, with ``quota``, one unit of
    the quota) or returns the ``Refusal`` (consuming nothing). At most ``max_keys`` keys are tracked (the
    least recently used is forgotten). Thread-safe."""

    def __init__(self, rate_per_s: float, burst: int, quota: int = 0, window_s: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 10_000) -> None:
        if rate_per_s < 0 or burst < 1 or quota < 0 or window_s <= 0:
            raise ValueError("rate_per_s >= 0, burst >= 1, quota >= 0 and window_s > 0 are required")
        self.rate, self.burst, self.quota, self.window_s = float(rate_per_s), int(burst), int(quota), window_s
        self.clock = clock
        self.max_keys = max_keys
        self._accounts: OrderedDict[str, _Account] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0 or self.quota > 0

    def check(self, key: str, quota: bool = True) -> Refusal | None:
        if not self.enabled:
            return None
        now = self.clock()
        with self._lock:
            acct = self._accounts.get(key)
            if acct is None:
                acct = self._accounts[key] = _Account(self.burst, now)
                while len(self._accounts) > self.max_keys:
                    self._accounts.popitem(last=False)
            else:
                self._accounts.move_to_end(key)
            if self.rate > 0:
                acct.tokens = min(self.burst, acct.tokens + max(0.0, now - acct.stamp) * self.rate)
                acct.stamp = now
                if acct.tokens < 1.0:
                    wait = max(1, math.ceil((1.0 - acct.tokens) / self.rate))
                    return Refusal("rate", wait, f"rate limit: {self.rate:g} requests/s per token (burst "
                                                 f"{self.burst}); retry after {wait}s")
            if quota and self.quota > 0:
                if now - acct.window_start >= self.window_s:
                    acct.window_start, acct.used = now, 0
                if acct.used >= self.quota:
                    wait = max(1, math.ceil(acct.window_start + self.window_s - now))
                    return Refusal("quota", wait, f"quota: {self.quota} frames per {self.window_s:g}s per "
                                                  f"token; the window resets in {wait}s")
                acct.used += 1
            if self.rate > 0:
                acct.tokens -= 1.0
        return None


def token_id(token: str) -> str:
    """A short fingerprint naming a token in logs (never the token)."""
    return hashlib.sha256(token.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- counting rejections


class Rejections:
    """Counts refused requests by reason (``snapshot()``, the Prometheus counter when given), and logs a
    warning for the first refusal of a reason and then at most every ``log_every_s`` with the count since."""

    def __init__(self, counter: Any = None, log_every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.counter = counter
        self.log_every_s = log_every_s
        self.clock = clock
        self._counts: dict[str, int] = {}
        self._logged: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def __call__(self, reason: str, detail: str = "") -> None:
        now = self.clock()
        with self._lock:
            total = self._counts[reason] = self._counts.get(reason, 0) + 1
            last, at_count = self._logged.get(reason, (-math.inf, 0))
            log = now - last >= self.log_every_s
            if log:
                self._logged[reason] = (now, total)
        if self.counter is not None:
            self.counter.labels(reason=reason).inc()
        if log:
            logger.warning("request refused (%s)%s; %d refused for this reason so far (%d since the last "
                           "such line)", reason, f": {detail}" if detail else "", total, total - at_count)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


# --------------------------------------------------------------------------- query-string credentials


def secret_params(query: bytes | str) -> list[str]:
    """The credential-looking parameter names in a query string (decoded, lower case)."""
    text = query.decode("latin-1") if isinstance(query, bytes) else query
    if not text:
        return []
    try:
        pairs = parse_qsl(text, keep_blank_values=True)
    except ValueError:
        pairs = []
    names = {k.strip().lower() for k, _ in pairs}
    return sorted(n for n in names if n in SECRET_PARAMS or n.replace("-", "_") in SECRET_PARAMS)


_SECRET_RE = re.compile(r"(?i)([?&;](?:" + "|".join(sorted(map(re.escape, SECRET_PARAMS))) + r")=)[^&;\s\"]*")
_QUERY_RE = re.compile(r"\?([^\s\"]*)")


def redact_url(text: str) -> str:
    """``text`` with every credential in a URL query removed (the whole query when one is found)."""
    if "?" not in text:
        return text

    def whole(m: re.Match[str]) -> str:
        return "?[REDACTED]" if secret_params(m.group(1)) else m.group(0)

    return _QUERY_RE.sub(whole, _SECRET_RE.sub(r"\1[REDACTED]", text))


class RedactQueryFilter(logging.Filter):
    """Removes credentials from URLs in a record's message and arguments (for ``uvicorn.access``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "?" in record.msg:
            record.msg = redact_url(record.msg)
        if isinstance(record.args, tuple) and any(isinstance(a, str) and "?" in a for a in record.args):
            record.args = tuple(redact_url(a) if isinstance(a, str) else a for a in record.args)
        return True


class QuietInvalidRequests(logging.Filter):
    """Drops uvicorn's one warning per malformed request (a flood would flood the log): the gateway's
    protocol counts those and logs them at a bounded rate (``Rejections``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "Invalid HTTP request received."


def install_log_redaction(names: tuple[str, ...] = ("uvicorn.access", "uvicorn.error", "uvicorn")) -> None:
    """Adds one ``RedactQueryFilter`` to each of these loggers, and ``QuietInvalidRequests`` to
    ``uvicorn.error`` (idempotent)."""
    for name in names:
        lg = logging.getLogger(name)
        if not any(isinstance(f, RedactQueryFilter) for f in lg.filters):
            lg.addFilter(RedactQueryFilter())
    err = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, QuietInvalidRequests) for f in err.filters):
        err.addFilter(QuietInvalidRequests())


# --------------------------------------------------------------------------- ASGI guard


def json_error(status: int, reason: str, message: str, headers: dict[str, str] | None = None
               ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    body = json.dumps({"detail": {"reason": reason, "message": message}}).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return status, hdrs, body


class RequestGuard:
    """ASGI middleware: 431 for more than ``max_headers`` header fields or more than ``max_header_bytes`` of
    them (a second line of defence: the h11 protocol already refuses those before buffering them), 400 for
    a credential in the query string. Runs before routing, auth and the body."""

    def __init__(self, app: Any, max_headers: int, max_header_bytes: int, rejections: Rejections) -> None:
        self.app = app
        self.max_headers = max_headers
        self.max_header_bytes = max_header_bytes
        self.rejections = rejections

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers") or []
        refusal = None
        if len(headers) > self.max_headers:
            self.rejections("too_many_headers", f"{len(headers)} header fields")
            refusal = json_error(431, "too_many_headers", f"{len(headers)} header fields; at most "
                                                          f"{self.max_headers} are accepted",
                                 {"connection": "close"})
        elif sum(len(k) + len(v) + 4 for k, v in headers) > self.max_header_bytes:
            self.rejections("headers_too_large")
            refusal = json_error(431, "headers_too_large", f"request headers exceed {self.max_header_bytes} "
                                                           "bytes", {"connection": "close"})
        else:
            names = secret_params(scope.get("query_string") or b"")
            if names:
                self.rejections("credentials_in_query", ", ".join(names))
                refusal = json_error(400, "credentials_in_query",
                                     f"credentials must not be sent in the URL (query parameter "
                                     f"{', '.join(names)}): send 'Authorization: Bearer <token>' instead; "
                                     f"a token that was sent in a URL should be considered exposed")
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, hdrs, body = refusal
        await send({"type": "http.response.start", "status": status, "headers": hdrs})
        await send({"type": "http.response.body", "body": body, "more_body": False})


# --------------------------------------------------------------------------- the HTTP protocol


_PHRASES = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


def _raw_response(status: int, reason: str, message: str) -> bytes:
    _, hdrs, body = json_error(status, reason, message, {"connection": "close"})
    head = b"HTTP/1.1 %d %s\r\n" % (status, _PHRASES.get(status, b"Error"))
    head += b"".join(k + b": " + v + b"\r\n" for k, v in hdrs)
    return head + b"\r\n" + body


class _DrainingTransport:
    """Wraps the connection's transport: ``close()`` with request data still unread half-closes the
    connection and lets the protocol drain (discard) what the client still sends, then closes."""

    def __init__(self, transport: asyncio.Transport, proto: Any) -> None:
        self._t = transport
        self._p = proto
        self._closing = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)

    def is_closing(self) -> bool:
        return self._closing or self._t.is_closing()

    def write(self, data: bytes) -> None:
        if not self.is_closing():
            self._t.write(data)

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._t.is_closing() or not self._p._unread_request():
            self._t.close()
            return
        try:
            self._t.write_eof()
        except (NotImplementedError, RuntimeError, OSError, AttributeError):
            self._t.close()
            return
        self._p._start_draining()

    def abort(self) -> None:
        self._closing = True
        self._t.abort()

    def really_close(self) -> None:
        self._closing = True
        if not self._t.is_closing():
            self._t.close()


def h11_protocol(max_header_bytes: int, header_timeout_s: float, rejections: Rejections) -> type:
    """uvicorn's ``H11Protocol`` with the gateway's header limit, header deadline and draining close (pass
    it as ``uvicorn.Config(http=...)`` together with ``h11_max_incomplete_event_size=max_header_bytes``)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GatewayH11Protocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._deadline: asyncio.TimerHandle | None = None
            self._drain_timer: asyncio.TimerHandle | None = None
            self._draining = False
            self._drained = 0

        # -- connection life
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(_DrainingTransport(transport, self))  # type: ignore[arg-type]
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._drain_timer is not None:
                self._drain_timer.cancel()
                self._drain_timer = None
            super().connection_lost(exc)

        def eof_received(self) -> bool | None:
            if self._draining:
                self.transport.really_close()  # type: ignore[attr-defined]
            return None

        def data_received(self, data: bytes) -> None:
            if self._draining:
                self._drained += len(data)
                if self._drained > LINGER_BYTES:
                    self.transport.really_close()  # type: ignore[attr-defined]
                return
            super().data_received(data)
            if self.transport.is_closing():
                self._disarm()
                return
            them, us = self.conn.their_state, self.conn.our_state
            if (them is h11.IDLE and self._buffered()) or (us is h11.DONE and them is h11.SEND_BODY):
                self._arm()  # waiting for headers, or for the rest of a body nobody reads: bounded
            else:
                self._disarm()  # the app is running (it bounds its own body read) or the connection is idle
                if them is h11.IDLE and us is h11.IDLE and self.timeout_keep_alive_task is None:
                    # idle again after a body that arrived once its answer was sent: uvicorn cancelled its
                    # keep-alive timer when that data came and would not arm it again
                    self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                        self.timeout_keep_alive_handler)

        # -- limits
        def _buffered(self) -> int:
            return len(self.conn.trailing_data[0])

        def send_400_response(self, msg: str) -> None:
            self._disarm()
            if self._buffered() > max_header_bytes:
                rejections("headers_too_large", f"more than {max_header_bytes} bytes of request line and headers")
                out = _raw_response(431, "headers_too_large", f"the request line and headers exceed "
                                                              f"{max_header_bytes} bytes")
            else:
                rejections("bad_request", msg)
                out = _raw_response(400, "bad_request", msg)
            self.transport.write(out)
            self.transport.close()

        def _arm(self) -> None:
            if self._deadline is None:
                self._deadline = self.loop.call_later(header_timeout_s, self._deadline_passed)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _deadline_passed(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            them, us = self.conn.their_state, self.conn.our_state
            if them is h11.IDLE and us is h11.IDLE and self._buffered():
                rejections("request_timeout", f"headers not complete within {header_timeout_s:g}s")
                self.transport.write(_raw_response(408, "request_timeout", f"the request headers did not arrive "
                                                                           f"within {header_timeout_s:g}s"))
            elif us is h11.DONE and them is h11.SEND_BODY:
                rejections("request_timeout", f"unread body still arriving after {header_timeout_s:g}s")
            self.transport.close()

        # -- draining close
        def _unread_request(self) -> bool:
            them = self.conn.their_state
            return them is h11.SEND_BODY or them is h11.ERROR or (them is h11.IDLE and self._buffered() > 0)

        def _start_draining(self) -> None:
            self._disarm()
            self._unset_keepalive_if_required()
            self._draining = True
            self._drain_timer = self.loop.call_later(LINGER_S, self.transport.really_close)  # type: ignore
            try:
                self.transport.resume_reading()
            except (RuntimeError, AttributeError):  # pragma: no cover - already reading
                pass

    return GatewayH11Protocol


__all__ = [
    "LINGER_BYTES",
    "LINGER_S",
    "SECRET_PARAMS",
    "QuietInvalidRequests",
    "RateLimiter",
    "RedactQueryFilter",
    "Refusal",
    "Rejections",
    "RequestGuard",
    "h11_protocol",
    "install_log_redaction",
    "redact_url",
    "secret_params",
    "token_id",
]
