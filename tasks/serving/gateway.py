"""The ingest gateway: HTTP in, frames on Kafka; predictions looked up by frame id.

``mlpipe gateway --help`` runs it with uvicorn on 127.0.0.1.

* ``POST /v1/frames``: the image as the raw request body, in an encoding the model spec accepts
  (``--model``, default ``MLPIPE_MODEL_NAME``: its ``frames.encodings``, e.g. ``Content-Type: image/png``
  or ``application/x-raw-uint8`` for digits, ``image/jpeg`` or ``image/png`` for shapes), or as
  ``multipart/form-data`` with a ``file`` part; ``X-Device-Id`` names the
  device (the Kafka key), ``X-Captured-At`` (ISO 8601) the capture time
  (default: now), ``traceparent`` an incoming W3C trace to continue. The frame
  gets the consumer's cheap checks (``tasks.model.frames.check_frame``: not empty, the size limit, a
  content type and magic bytes the spec accepts, the raw size), is produced to ``frames`` with the
  headers ``frame_id``, ``content-type`` (the encoding found), ``captured_at``, ``traceparent``, and
  the answer (202 ``{"frame_id"}``) is sent only after the broker acknowledged the write. Decoding is
  Triton's: a frame whose image cannot be used (a broken body, another size where the spec resizes
  nothing) is accepted here and ends ``failed`` with its reason on GET.
* ``GET /v1/frames/{frame_id}``: 200 with the prediction once it exists, 202
  ``{"status": "pending"}`` while a frame accepted here is not processed yet,
  200 ``{"status": "failed", "reason"}`` if the consumer dead-lettered it,
  404 for unknown ids.
* ``POST /v1/rollout/{model}/kill``: the safe-rollout kill switch, for an alert webhook (any JSON body, e.g.
  Alertmanager's; ``?reason=``): runs ``mlpipe rollout kill`` (the one implementation), so every consumer
  sends all frames to the champion within its poll interval (about 1 s); 200 with what was stopped, 503
  when the kill switch could not run (retry).

Where predictions come from: every gateway process follows ``predictions``
and ``frames.dlq`` with its own assign-only reader (no consumer group, so each
replica sees every partition; it starts from the last ``--cache-size``
messages) into a bounded in-memory LRU cache. This needs nothing besides
Kafka, works with any number of replicas and any Qdrant policy (Qdrant holds
only a sample of predictions by default, and local-mode Qdrant is locked by
the consumer). Trade-off: a prediction older than the cache window is
reported as unknown, and "pending" is known only by the replica that accepted
the frame (another replica answers 404 until the prediction arrives).

Auth: ``Authorization: Bearer <MLPIPE_GATEWAY_TOKEN>`` on ``/v1/*`` (401
without it or with a wrong one; compared in constant time, never logged).
Unauthenticated: ``/healthz``, ``/readyz``, ``/metrics``, ``/openapi.json``, ``/docs``.

Limits (``MLPIPE_GATEWAY_*``, see the README's table; the code is ``tasks.serving.gateway_limits``):

* Headers: the request line + headers may be ``MLPIPE_GATEWAY_MAX_HEADER_BYTES`` (16 KiB) at most and
  hold ``MLPIPE_GATEWAY_MAX_HEADERS`` (100) fields, else 431. uvicorn runs the h11 protocol (httptools
  bounds no header size), which stops buffering at the limit; the refused connection is half-closed and
  drained (bounded) so the client reads the 431.
* Body: the spec's ``frames.max_frame_bytes``, or ``MLPIPE_MAX_FRAME_BYTES`` when set (the consumer's limit
  too; it must fit ``MLPIPE_MAX_MESSAGE_BYTES``, the producer's) -> 413 from ``Content-Length`` or as soon
  as the streamed body passes it.
* Rate: a token bucket per bearer token (``MLPIPE_GATEWAY_RATE_PER_S``, ``MLPIPE_GATEWAY_RATE_BURST``)
  on every authenticated ``/v1/*`` request, and ``MLPIPE_GATEWAY_QUOTA`` frames per
  ``MLPIPE_GATEWAY_QUOTA_WINDOW_S`` per token: 429 with ``Retry-After`` (whole seconds) and
  ``{"detail": {"reason", "limit", "retry_after", "message"}}``. Auth comes first: a 401 consumes nothing.
* Time: headers within ``MLPIPE_GATEWAY_HEADER_TIMEOUT_S`` of a request's first byte (408), the body
  within ``MLPIPE_GATEWAY_BODY_TIMEOUT_S`` (408), idle keep-alive ``MLPIPE_GATEWAY_KEEP_ALIVE_S``, Kafka's
  acknowledgement within ``MLPIPE_GATEWAY_PRODUCE_TIMEOUT_S`` (503 with ``Retry-After``).
* Credentials in the URL (``?token=``, ``?access_token=``, ...) answer 400 and are redacted from every
  log line (uvicorn's access log prints query strings).

Every refusal is counted in ``mlpipe_gateway_rejected_total{reason}`` (``/metrics``, also in ``/readyz``)
and logged as a warning (the first, then at most one line per reason every 10 s with the count).
``/metrics`` also has every answer by route template and status class, latency, body bytes and auth
failures (``tasks.serving.gateway_metrics``).
"""



import argparse
import asyncio
import datetime as dt
import hmac
import json
import logging
import re
import sys
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from fastapi import FastAPI

    from tasks.adapters.kafka import KafkaConfig
    from tasks.contracts.spec import ModelSpec

logger = logging.getLogger(__name__)

DEVICE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$")
MULTIPART_SLACK = 16 * 1024  # multipart envelope allowed on top of the frame size limit
FRAME_MESSAGE_SLACK = 4096  # Kafka key, headers and record overhead on top of a frame


def _metrics() -> tuple[Any, Any]:
    """A registry of this app's own (so several apps in one process do not collide) and its counter."""
    from prometheus_client import CollectorRegistry, Counter

    registry = CollectorRegistry()
    counter = Counter("mlpipe_gateway_rejected", "requests the gateway refused, by reason", ["reason"],
                      registry=registry)
    return registry, counter


@dataclass(frozen=True)
class GatewaySettings:
    token: str | None = None  # None only together with auth_disabled=True
    auth_disabled: bool = False
    model: str = "digits"  # the model project whose spec says which frames are accepted
    max_frame_bytes: int | None = None  # None: the spec's frames.max_frame_bytes
    cache_size: int = 100_000
    produce_timeout_s: float = 10.0
    create_topics: bool = True
    follow_predictions: bool = True
    max_header_bytes: int = 16 * 1024
    max_headers: int = 100
    rate_per_s: float = 1000.0  # 0: no rate limit
    rate_burst: int = 2000
    quota: int = 0  # frames per token per quota window; 0: no quota
    quota_window_s: float = 3600.0
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    keep_alive_s: float = 5.0

    def __repr__(self) -> str:  # never show the token
        return (f"GatewaySettings(auth={'off' if self.auth_disabled else 'bearer'}, model={self.model}, "
                f"max_frame_bytes={self.max_frame_bytes or 'spec'}, cache_size={self.cache_size}, "
                f"max_header_bytes={self.max_header_bytes}, "
                f"rate={self.rate_per_s:g}/s burst={self.rate_burst}, quota={self.quota or 'none'}"
                f"{f'/{self.quota_window_s:g}s' if self.quota else ''})")

    @classmethod
    def from_env(cls, **overrides: Any) -> "GatewaySettings":
        """From ``load_settings().gateway``; non-None ``overrides`` (CLI flags) win."""
        from tasks.config import load_settings

        settings = load_settings()
        gw = settings.gateway
        values: dict[str, Any] = dict(
            token=gw.token.get_secret_value() if gw.token is not None else None,
            model=settings.model_name,
            max_frame_bytes=gw.max_frame_bytes,
            cache_size=gw.cache_size,
            **{name: getattr(gw, name) for name in (
                "max_header_bytes", "max_headers", "rate_per_s", "rate_burst", "quota", "quota_window_s",
                "header_timeout_s", "body_timeout_s", "keep_alive_s", "produce_timeout_s")},
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        s = cls(**values)
        if not s.auth_disabled and not s.token:
            raise ValueError("MLPIPE_GATEWAY_TOKEN is not set: set it to the bearer token clients must send "
                             "(or pass --no-auth for a local demo)")
        return s


class _LRU:
    """A small thread-safe LRU map."""

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self._d: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.size:
                self._d.popitem(last=False)

    def get(self, key: str) -> Any:
        with self._lock:
            return self._d.get(key)

    def __len__(self) -> int:
        return len(self._d)


class _Results:
    """Follows ``predictions`` and ``frames.dlq`` into bounded caches (a daemon thread)."""

    def __init__(self, kafka: "KafkaConfig", size: int) -> None:
        self.kafka = kafka
        self.predictions = _LRU(size)
        self.failed = _LRU(max(1000, size // 10))
        self.accepted = _LRU(size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="predictions-follower", daemon=True)
        self.following = False
        self.window = size

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        import json

        from tasks.adapters.kafka import TailFollower
        from tasks.contracts.messages import H_FRAME_ID, H_REASON

        follower = None
        try:
            while follower is None and not self._stop.is_set():
                try:
                    follower = TailFollower(self.kafka, [self.kafka.predictions_topic, self.kafka.dlq_topic],
                                            window=self.window)
                except Exception as exc:  # noqa: BLE001
                    logger.warning("cannot create the predictions reader: %s", exc)
                    self._stop.wait(2)
            if follower is None:
                return
            last_refresh = 0.0
            complete = False
            while not self._stop.is_set():
                now = time.monotonic()
                if now - last_refresh > (5.0 if complete else 0.5):
                    complete = follower.refresh(timeout=2.0)
                    self.following = complete
                    last_refresh = now
                for rec in follower.poll_batch(500, 0.2):
                    if rec.topic == self.kafka.predictions_topic:
                        try:
                            pred = json.loads(rec.value or b"")
                            self.predictions.put(str(pred["frame_id"]), pred)
                        except (ValueError, KeyError, TypeError):
                            logger.debug("ignoring malformed prediction at offset %d", rec.offset)
                    else:
                        fid = rec.header(H_FRAME_ID)
                        if fid:
                            self.failed.put(fid.strip().lower(), {
                                "reason": rec.header(H_REASON) or "unknown",
                                "detail": rec.header("reason_detail") or ""})
        finally:
            if follower is not None:
                follower.close()


def _error(status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content={"detail": {"reason": reason, "message": message}},
                        headers=headers)


def create_app(kafka: "KafkaConfig", settings: GatewaySettings, spec: "ModelSpec | None" = None) -> "FastAPI":
    """The FastAPI application (producer and predictions reader start with the app's lifespan).

    ``spec``: the model's (default ``load_settings().model_spec(settings.model)``; ``SpecError``, a bad input,
    when it is missing or invalid)."""
    from fastapi import Depends, FastAPI, Header, Path, Request
    from fastapi.responses import JSONResponse
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from pydantic import BaseModel, Field

    from tasks.adapters.kafka import BusProducer, ensure_topics, new_traceparent
    from tasks.contracts.messages import (
        H_CAPTURED_AT,
        H_CONTENT_TYPE,
        H_FRAME_ID,
        H_TRACEPARENT,
        OCTET_STREAM,
        R_OVERSIZE,
        R_UNSUPPORTED,
        FrameRejected,
        media_type,
    )
    from tasks.model.frames import accepted_content_types, check_frame, content_type_of
    from tasks import tracing
    from tasks.serving.gateway_limits import RateLimiter, Refusal, Rejections, RequestGuard, token_id

    if spec is None:
        from tasks.config import load_settings

        spec = load_settings().frame_spec(settings.model)  # a pipeline's frames are its detector's
    limit = settings.max_frame_bytes or spec.frames.max_frame_bytes
    if limit + FRAME_MESSAGE_SLACK > kafka.max_message_bytes:
        most = kafka.max_message_bytes - FRAME_MESSAGE_SLACK
        raise ValueError(f"the frame limit {limit} (MLPIPE_MAX_FRAME_BYTES, else model {spec.name!r}'s "
                         f"frames.max_frame_bytes) must be at most MLPIPE_MAX_MESSAGE_BYTES - {FRAME_MESSAGE_SLACK} "
                         f"({most}): a frame the gateway accepts must fit in one Kafka message")
    content_types = accepted_content_types(spec)
    state: dict[str, Any] = {}
    registry, rejected_counter = _metrics()
    rejections = Rejections(rejected_counter)
    limiter = RateLimiter(settings.rate_per_s, settings.rate_burst, settings.quota, settings.quota_window_s)
    token_key = token_id(settings.token) if settings.token else "anonymous"

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.create_topics:
            try:
                await asyncio.to_thread(ensure_topics, kafka, None, None, None, 10.0)
            except Exception as exc:  # noqa: BLE001 - the gateway still starts; produces answer 503
                logger.warning("could not ensure topics at start-up: %s", exc)
        producer = BusProducer(kafka, **{"linger.ms": 1, "message.timeout.ms": int(settings.produce_timeout_s * 1000)})
        stop = threading.Event()

        def pump() -> None:
            while not stop.is_set():
                producer.poll(0.05)

        poller = threading.Thread(target=pump, name="producer-poll", daemon=True)
        poller.start()
        results = _Results(kafka, settings.cache_size)
        if settings.follow_predictions:
            results.start()
        state.update(producer=producer, results=results, delivered=0, failed=0)
        logger.info("gateway up: frames -> %s, %r", kafka.frames_topic, settings)
        try:
            yield
        finally:
            stop.set()
            poller.join(timeout=2)
            producer.close(timeout=5)
            if settings.follow_predictions:
                results.stop()
            tracing.flush(2.0)  # uvicorn ends a SIGTERM-ed process by re-raising the signal: no atexit after this

    app = FastAPI(
        title="mlpipe ingest gateway",
        version="1.0",
        description=f"Accepts frames of model {spec.name!r} ({', '.join(content_types)}; at most {limit} bytes), "
                    "queues them on Kafka for the streaming consumer, and returns predictions by frame id. "
                    f"The model: {spec.summary()}",
        lifespan=lifespan,
    )
    app.state.rejections = rejections
    tracing.instrument_fastapi(app)  # request spans, when this process set tracing up (main)
    app.state.limiter = limiter
    app.add_middleware(RequestGuard, max_headers=settings.max_headers, max_header_bytes=settings.max_header_bytes,
                       rejections=rejections)
    # outermost: every answer is counted, RequestGuard's refusals included (tasks.serving.gateway_metrics)
    from tasks.serving.gateway_metrics import GatewayMetrics, RequestMetrics

    app.add_middleware(RequestMetrics, metrics=GatewayMetrics(registry))
    bearer = HTTPBearer(auto_error=False, description="MLPIPE_GATEWAY_TOKEN")

    class AuthError(Exception):
        pass

    class Limited(Exception):
        def __init__(self, refusal: Refusal) -> None:
            super().__init__(refusal.message)
            self.refusal = refusal

    @app.exception_handler(AuthError)
    async def _auth_error(request: Request, exc: AuthError) -> JSONResponse:
        return _error(401, "unauthorized", str(exc), {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(Limited)
    async def _limited(request: Request, exc: Limited) -> JSONResponse:
        r = exc.refusal
        reason = "rate_limited" if r.limit == "rate" else "quota_exceeded"
        return JSONResponse(status_code=429, headers={"Retry-After": str(r.retry_after)}, content={
            "detail": {"reason": reason, "limit": r.limit, "retry_after": r.retry_after, "message": r.message}})

    async def require_token(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        """Authentication first (a 401 consumes no rate or quota), then the token's rate limit and quota."""
        if settings.auth_disabled:
            key = f"client:{request.client.host if request.client else '?'}"
        else:
            if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
                rejections("unauthorized", "no bearer token")
                raise AuthError("missing bearer token: send 'Authorization: Bearer <token>'")
            assert settings.token is not None
            if not hmac.compare_digest(creds.credentials.encode(), settings.token.encode()):
                rejections("unauthorized", "wrong bearer token")
                raise AuthError("invalid bearer token")
            key = token_key
        refusal = limiter.check(key, quota=request.method == "POST")
        if refusal is not None:
            rejections("rate_limited" if refusal.limit == "rate" else "quota_exceeded", f"token {key}")
            raise Limited(refusal)

    class Accepted(BaseModel):
        frame_id: str = Field(description="UUID of the frame; poll GET /v1/frames/{frame_id}")

    class Pending(BaseModel):
        frame_id: str
        status: str = "pending"

    class ErrorDetail(BaseModel):
        reason: str
        message: str

    class ErrorBody(BaseModel):
        detail: ErrorDetail

    errors: dict[int | str, dict[str, Any]] = {
        400: {"model": ErrorBody, "description": "a credential in the query string (use the Authorization header)"},
        401: {"model": ErrorBody, "description": "missing or wrong bearer token"},
        408: {"model": ErrorBody, "description": "the request body did not arrive in time"},
        413: {"model": ErrorBody, "description": f"frame larger than the limit ({limit} bytes)"},
        415: {"model": ErrorBody, "description": "a content type or an image format the model does not accept "
                                                 f"(send {', '.join(content_types)})"},
        422: {"model": ErrorBody, "description": "empty, not an image of an accepted format (no PNG/JPEG signature), "
                                                 "or a raw frame of another size than the model's"},
        429: {"description": "the token's rate limit or quota is exhausted (see Retry-After)"},
        431: {"model": ErrorBody, "description": "request headers too large or too many"},
        503: {"model": ErrorBody, "description": "the message bus did not acknowledge the frame; retry"},
    }

    async def _read_body(request: Request, limit: int) -> bytes | None:
        """The body, streamed; None as soon as it passes ``limit`` (the rest is never read)."""
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def _body(request: Request, limit: int) -> Any:
        """The body, or the 413 / 408 answer (closing the connection: the rest of the body stays unread)."""
        try:
            async with asyncio.timeout(settings.body_timeout_s):
                body = await _read_body(request, limit)
        except TimeoutError:
            rejections("request_timeout", f"body not complete within {settings.body_timeout_s:g}s")
            return _error(408, "request_timeout", f"the request body did not arrive within "
                                                  f"{settings.body_timeout_s:g}s", {"Connection": "close"})
        if body is None:
            rejections("body_too_large", f"more than {limit} bytes streamed")
            return _error(413, R_OVERSIZE, f"request body is larger than the frame limit of model {spec.name!r} "
                                           f"({limit} bytes)", {"Connection": "close"})
        return body

    @app.post("/v1/frames", status_code=202, response_model=Accepted, dependencies=[Depends(require_token)],
              responses=errors, summary="Submit one frame for inference",
              openapi_extra={"requestBody": {"required": True, "content": {
                  **{t: {"schema": {"type": "string", "format": "binary"}} for t in content_types},
                  "multipart/form-data": {"schema": {"type": "object", "properties": {
                      "file": {"type": "string", "format": "binary"}}, "required": ["file"]}}}}})
    async def post_frame(
        request: Request,
        x_device_id: str = Header(default="anonymous", description="device id (the Kafka key)"),
        x_captured_at: str | None = Header(default=None, description="ISO 8601 capture time (default: now)"),
        traceparent: str | None = Header(default=None, description="W3C trace context to continue"),
    ) -> Any:
        ctype = request.headers.get("content-type", "")
        mtype = media_type(ctype)
        declared = request.headers.get("content-length")
        slack = MULTIPART_SLACK if mtype == "multipart/form-data" else 0
        if declared and declared.isdigit() and int(declared) > limit + slack:
            rejections("body_too_large", f"Content-Length {declared}")
            return _error(413, R_OVERSIZE, f"request body is {declared} bytes, the frame limit of model "
                                           f"{spec.name!r} is {limit}", {"Connection": "close"})
        if not DEVICE_RE.match(x_device_id):
            return _error(422, "invalid_device_id", "X-Device-Id must be 1-128 characters of letters, digits "
                                                    "and . _ : @ / -, starting with a letter or digit")
        captured = dt.datetime.now(dt.timezone.utc)
        if x_captured_at:
            try:
                captured = dt.datetime.fromisoformat(x_captured_at.strip().replace("Z", "+00:00"))
            except ValueError:
                return _error(422, "invalid_captured_at", "X-Captured-At must be an ISO 8601 timestamp")
            if captured.tzinfo is None:
                captured = captured.replace(tzinfo=dt.timezone.utc)
        if mtype == "multipart/form-data":
            body = await _body(request, limit + slack)
            if not isinstance(body, bytes):
                return body
            from starlette.datastructures import UploadFile
            from starlette.requests import Request as StarletteRequest

            async def receive() -> dict[str, Any]:
                return {"type": "http.request", "body": body, "more_body": False}

            try:
                form = await StarletteRequest(request.scope, receive).form()
            except Exception as exc:  # noqa: BLE001 - malformed multipart
                return _error(422, "undecodable", f"malformed multipart body: {exc}")
            part = form.get("file")
            if not isinstance(part, UploadFile):
                return _error(422, "missing_file", "multipart body needs a 'file' part holding the image")
            payload = await part.read()
            mtype = media_type(part.content_type) or OCTET_STREAM
        else:
            payload = await _body(request, limit)
            if not isinstance(payload, bytes):
                return payload
        try:  # the consumer's cheap checks: decoding is Triton's
            encoding = check_frame(payload, mtype or None, spec, limit)
        except FrameRejected as exc:
            status = {R_OVERSIZE: 413, R_UNSUPPORTED: 415}.get(exc.reason, 422)
            return _error(status, exc.reason, exc.detail)
        frame_ctype = content_type_of(encoding)
        frame_id = str(uuid.uuid4())
        publish = tracing.start_publish(kafka.frames_topic, frame_id, x_device_id)  # the frame's traceparent
        headers = [
            (H_FRAME_ID, frame_id.encode()),
            (H_CONTENT_TYPE, frame_ctype.encode()),
            (H_CAPTURED_AT, captured.astimezone(dt.timezone.utc).isoformat(timespec="microseconds")
             .replace("+00:00", "Z").encode()),
            (H_TRACEPARENT, (publish.traceparent or new_traceparent(traceparent)).encode()),
        ]
        loop = asyncio.get_running_loop()
        done: asyncio.Future[str | None] = loop.create_future()

        def delivered(err: str | None) -> None:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(err))

        producer = state["producer"]
        try:
            producer.produce(kafka.frames_topic, payload, key=x_device_id.encode(), headers=headers,
                             on_delivery=delivered)
            err = await asyncio.wait_for(done, timeout=settings.produce_timeout_s + 1)
        except (asyncio.TimeoutError, Exception) as exc:  # noqa: BLE001
            err = f"{type(exc).__name__}: {exc}" if not isinstance(exc, asyncio.TimeoutError) else "timed out"
        publish.end(err)
        if err is not None:
            state["failed"] += 1
            rejections("bus_unavailable", err)
            logger.warning("frame %s not acknowledged by Kafka: %s", frame_id, err)
            return _error(503, "bus_unavailable", f"the message bus did not acknowledge the frame ({err}); "
                                                  "retry later", {"Retry-After": "1"})
        state["delivered"] += 1
        state["results"].accepted.put(frame_id, time.time())
        return JSONResponse(status_code=202, content={"frame_id": frame_id},
                            headers={"Location": f"/v1/frames/{frame_id}"})

    @app.get("/v1/frames/{frame_id}", dependencies=[Depends(require_token)],
             responses={202: {"model": Pending, "description": "accepted, not processed yet"},
                        404: {"model": ErrorBody, "description": "unknown frame id"},
                        401: errors[401]},
             summary="The prediction for a frame")
    async def get_frame(frame_id: str = Path(description="frame id returned by POST /v1/frames")) -> Any:
        try:
            fid = str(uuid.UUID(frame_id))
        except ValueError:
            return _error(404, "unknown_frame", f"{frame_id!r} is not a frame id (UUID)")
        results: _Results = state["results"]
        pred = results.predictions.get(fid)
        if pred is not None:
            return {"status": "done", **pred}
        failed = results.failed.get(fid)
        if failed is not None:
            return {"frame_id": fid, "status": "failed", **failed}
        if results.accepted.get(fid) is not None:
            return JSONResponse(status_code=202, content={"frame_id": fid, "status": "pending"})
        return _error(404, "unknown_frame", f"no frame {fid} is known here (never accepted, or older than the "
                                            f"prediction cache of {settings.cache_size})")

    @app.post("/v1/rollout/{model}/kill", dependencies=[Depends(require_token)],
              responses={401: errors[401], 503: {"model": ErrorBody, "description": "the kill switch failed"}},
              summary="The rollout kill switch (for an alert webhook): every frame back on the champion now")
    async def rollout_kill(request: Request, model: str = Path(description="the model project"),
                           reason: str = "") -> Any:
        """Runs ``mlpipe rollout kill`` (the one implementation: it writes the ``off`` rollout state and records a
        registry event; every consumer follows within its poll interval, about 1 s). Any JSON body is accepted
        (e.g. Alertmanager's): its ``reason``, else its first alert's name, is recorded when ``?reason=`` is
        not given."""
        if not reason:
            try:
                body = await request.json()
            except Exception:  # noqa: BLE001 - no body, or not JSON: no reason from it
                body = None
            if isinstance(body, dict):
                alerts = body.get("alerts") or []
                first = alerts[0].get("labels", {}).get("alertname") if alerts and isinstance(alerts[0], dict) \
                    else None
                reason = str(body.get("reason") or first or "")
        argv = [sys.executable, "-m", "tasks.cli", "rollout", "kill", "--model", model, "--by", "gateway",
                "--reason", (reason or "alert webhook")[:500], "--log-level", "WARNING"]
        try:
            proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), timeout=15.0)
        except Exception as exc:  # noqa: BLE001 - say what failed; the caller (an alert) retries
            return _error(503, "kill_failed", f"the kill switch of {model!r} could not run: {exc}",
                          {"Retry-After": "1"})
        if proc.returncode != 0:
            last = (err.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
            return _error(503, "kill_failed", f"the kill switch of {model!r} failed ({last})", {"Retry-After": "1"})
        result = json.loads(out)
        return {"model": model, "was": result["was"], "state": result["state"]["mode"],
                "champion": result["state"]["champion"]}

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: the predictions reader follows its topics")
    async def readyz() -> Any:
        results = state.get("results")
        ok = results is not None and (results.following or not settings.follow_predictions)
        body = {"status": "ok" if ok else "unavailable", "following": bool(results and results.following),
                "delivered": state.get("delivered", 0), "failed": state.get("failed", 0),
                "rejected": rejections.snapshot()}
        return JSONResponse(status_code=200 if ok else 503, content=body)

    @app.get("/metrics", summary="Prometheus metrics (requests by route and status class, latency, bytes, auth "
             "failures, refused requests by reason)", include_in_schema=True)
    async def metrics() -> Any:
        from fastapi.responses import Response
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mlpipe gateway",
        description="Ingest gateway (FastAPI/uvicorn): POST /v1/frames -> Kafka 'frames'; GET /v1/frames/{id}. "
                    "Kafka from MLPIPE_KAFKA_*, bearer token from MLPIPE_GATEWAY_TOKEN.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    from tasks.config import load_settings

    try:
        cfg = load_settings()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    parser.add_argument("--host", default=cfg.gateway.host, help="listen address (MLPIPE_GATEWAY_HOST)")
    parser.add_argument("--port", type=int, default=cfg.gateway.port, help="listen port (MLPIPE_GATEWAY_PORT)")
    parser.add_argument("--bootstrap", default=None, help="overrides MLPIPE_KAFKA_BOOTSTRAP")
    parser.add_argument("--topic-prefix", default=None, help="overrides MLPIPE_KAFKA_TOPIC_PREFIX")
    parser.add_argument("--model", default=None, help="the model project whose spec says which frames are accepted "
                        "(default MLPIPE_MODEL_NAME or digits)")
    parser.add_argument("--max-frame-bytes", type=int, default=None,
                        help="default MLPIPE_MAX_FRAME_BYTES when set, else the model spec's frames.max_frame_bytes")
    parser.add_argument("--cache-size", type=int, default=None, help="predictions kept for GET (default 100000)")
    parser.add_argument("--no-auth", action="store_true", help="no bearer token (local demo only)")
    parser.add_argument("--log-level", default=cfg.log_level, help="(MLPIPE_LOG_LEVEL)")
    args = parser.parse_args(argv)
    from tasks.logs import setup_logging

    setup_logging(args.log_level)
    from tasks.tracing import setup_process

    setup_process("gateway", cfg)  # spans (tasks.tracing); the settings' secrets never in a log line
    logging.getLogger("tasks.adapters.kafka.librdkafka").setLevel(logging.WARNING)
    from tasks.adapters.kafka import KafkaConfig

    try:
        kafka = KafkaConfig.from_env(bootstrap=args.bootstrap, topic_prefix=args.topic_prefix)
        settings = GatewaySettings.from_env(auth_disabled=args.no_auth or None, model=args.model,
                                            max_frame_bytes=args.max_frame_bytes, cache_size=args.cache_size)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    from tasks.serving.gateway_limits import h11_protocol, install_log_redaction

    try:
        app = create_app(kafka, settings)
    except ValueError as exc:  # SpecError included: the model's spec is missing or invalid
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # h11, not httptools: h11 bounds the buffered request line + headers (httptools has no limit)
    protocol = h11_protocol(settings.max_header_bytes, settings.header_timeout_s, app.state.rejections)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                            timeout_graceful_shutdown=5, http=protocol,
                            h11_max_incomplete_event_size=settings.max_header_bytes,
                            timeout_keep_alive=settings.keep_alive_s)  # type: ignore[arg-type]
    install_log_redaction()  # after uvicorn configured its loggers: no credential from a URL is logged
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
