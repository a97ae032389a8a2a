"""The gateway's request metrics (``/metrics`` of ``tasks.serving.gateway``), as one ASGI middleware.

Why a raw ASGI middleware and not a FastAPI dependency: it sees every answer, also those given before
any route runs (``RequestGuard``'s 431/400, a 404 for an unknown path, an exception turned into a 500),
it counts the bytes actually read and written (a streamed body that stops at the frame limit counts
what was read, not its ``Content-Length``), and it never touches the request's content.

Series (one registry per app, the one ``/metrics`` renders):

* ``mlpipe_gateway_requests_total{route, method, code}``: answers by route template (``/v1/frames/{frame_id}``,
  never the frame id itself: bounded label values; ``unmatched`` for a path no route took) and status class
  (``2xx`` .. ``5xx``);
* ``mlpipe_gateway_request_duration_seconds{route, method}``: first byte in -> last byte out;
* ``mlpipe_gateway_request_bytes_total{route}``, ``mlpipe_gateway_response_bytes_total{route}``: body bytes;
* ``mlpipe_gateway_auth_failures_total{reason}``: 401 answers, ``missing_token`` (no usable
  ``Authorization`` header) or ``invalid_token`` (a wrong one). The token never becomes a label;
* ``mlpipe_gateway_requests_in_flight``.

Refusals by reason stay in ``mlpipe_gateway_rejected_total{reason}`` (``tasks.serving.gateway_limits``).
"""

from __future__ import annotations

import time
from typing import Any

#: seconds; the gateway's own work is a few ms, a POST waits for Kafka's acknowledgement (up to the
#: produce timeout)
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
UNMATCHED = "unmatched"


class GatewayMetrics:
    """The request series, registered in ``registry`` (the app's own ``CollectorRegistry``)."""

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.requests = Counter("mlpipe_gateway_requests", "Answered requests by route template, method and "
                                "status class", ["route", "method", "code"], registry=registry)
        self.duration = Histogram("mlpipe_gateway_request_duration_seconds", "Request time, first byte in to "
                                  "last byte out, by route template and method", ["route", "method"],
                                  buckets=DURATION_BUCKETS, registry=registry)
        self.request_bytes = Counter("mlpipe_gateway_request_bytes", "Request body bytes read, by route template",
                                     ["route"], registry=registry)
        self.response_bytes = Counter("mlpipe_gateway_response_bytes", "Response body bytes sent, by route "
                                      "template", ["route"], registry=registry)
        self.auth_failures = Counter("mlpipe_gateway_auth_failures", "401 answers: missing_token or "
                                     "invalid_token", ["reason"], registry=registry)
        self.in_flight = Gauge("mlpipe_gateway_requests_in_flight", "Requests being answered", registry=registry)


def route_of(scope: dict[str, Any]) -> str:
    """The matched route's path template (set on the scope by the router), else ``unmatched``."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) and path else UNMATCHED


def _auth_reason(scope: dict[str, Any]) -> str:
    for name, value in scope.get("headers") or ():
        if name.lower() == b"authorization":
            scheme, _, cred = value.decode("latin-1").partition(" ")
            return "invalid_token" if scheme.lower() == "bearer" and cred.strip() else "missing_token"
    return "missing_token"


class RequestMetrics:
    """ASGI middleware recording ``GatewayMetrics`` for every HTTP request (see the module docstring)."""

    def __init__(self, app: Any, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        m = self.metrics
        t0 = time.perf_counter()
        read = 0
        sent = 0
        status = 0

        async def counting_receive() -> dict[str, Any]:
            nonlocal read
            message = await receive()
            if message.get("type") == "http.request":
                read += len(message.get("body") or b"")
            return message

        async def counting_send(message: dict[str, Any]) -> None:
            nonlocal sent, status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body":
                sent += len(message.get("body") or b"")
            await send(message)

        m.in_flight.inc()
        try:
            await self.app(scope, counting_receive, counting_send)
        except BaseException:
            status = status or 500  # ServerErrorMiddleware (outside this one) answers 500
            raise
        finally:
            m.in_flight.dec()
            route, method = route_of(scope), scope.get("method", "GET")
            code = f"{status // 100}xx" if status else "none"  # none: the client left before an answer
            m.requests.labels(route, method, code).inc()
            m.duration.labels(route, method).observe(time.perf_counter() - t0)
            m.request_bytes.labels(route).inc(read)
            m.response_bytes.labels(route).inc(sent)
            if status == 401:
                m.auth_failures.labels(_auth_reason(scope)).inc()
