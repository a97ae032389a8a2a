"""One tracing set-up for every process: OpenTelemetry spans, exported over OTLP/HTTP or kept locally.

Same layer as ``tasks/logs.py`` (imports only contracts and logs), so adapters, steps, serving and
the Airflow plugins all use it. Nothing happens until a process calls ``setup_tracing(service)``
(the gateway, the consumer, the Airflow step operator do); before that every helper here is a no-op
that costs a function call, so library code and unit tests pay nothing.

Where spans go (``setup_tracing``):

* ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) set: OTLP/HTTP
  (protobuf) to that collector, batched (``BatchSpanProcessor``; the SDK's own ``OTEL_BSP_*`` and
  ``OTEL_EXPORTER_OTLP_HEADERS`` variables apply);
* else the local span store: JSON lines appended to ``<log dir>/spans.jsonl`` (the log folder of
  ``tasks.logs``: ``MLPIPE_LOG_DIR``, default ``$MLPIPE_HOME/logs``), batched, rotated by size
  (``MLPIPE_SPAN_STORE_MAX_BYTES``, default 20 MiB, into ``spans.jsonl.1`` ... ``.<MLPIPE_LOG_FILE_BACKUPS>``)
  under an ``flock``, so every process of a stack shares one bounded store that ``mlpipe trace`` reads;
* ``MLPIPE_TRACING=off`` (or ``MLPIPE_LOG_DIR=off`` without an OTLP endpoint): no spans at all.

Sampling (``setup_tracing``): parent-based; a new trace is kept with probability ``MLPIPE_TRACE_SAMPLE``
(default 1.0), and a consumer batch is kept whenever one of its frames was sampled (it links only the
sampled frames), so every sampled frame finds its batch. A frame whose incoming ``traceparent`` is
sampled stays sampled.

**Span store format (read by ``mlpipe trace`` and ``mlpipe audit``; keep it stable)**: one JSON object
per line: ``trace_id`` (32 hex), ``span_id`` (16 hex), ``parent_span_id`` (16 hex or null), ``name``,
``kind`` (``server``, ``client``, ``producer``, ``consumer``, ``internal``), ``service``, ``start``,
``end`` (UTC ISO 8601 with microseconds, ``+00:00``), ``start_ns``, ``end_ns`` (epoch ns),
``duration_ms``, ``status`` (``unset``, ``ok``, ``error``), ``status_message``, ``attributes`` (a flat
object), ``links`` (``[{"trace_id", "span_id"}]``), ``events`` (``[{"name", "time", "attributes"}]``).

The spans of one frame (``mlpipe trace FRAME_ID``):

* gateway: the request span (FastAPI instrumentation, ``server``) and its child ``frames publish``
  (``producer``, attribute ``mlpipe.frame_id``), whose context is the frame's ``traceparent`` header;
* consumer: one ``consumer batch`` span per micro-batch (``consumer``, its own trace) with a link to
  each sampled frame's trace and the attributes ``mlpipe.frame_ids`` (the frame ids, comma-separated),
  ``mlpipe.model_version``, ``mlpipe.lineage``; its children ``triton infer`` (``client``, whose context
  travels to Triton as gRPC ``traceparent`` metadata), ``kafka produce`` and ``qdrant upsert`` (the
  sinks, timed from the batch's own clock readings, so the hot loop makes no extra calls for them);
* pipeline steps: ``step <command>`` (the Airflow operator, attributes ``airflow.dag_id``,
  ``airflow.run_id``, ``airflow.task_id``, ``airflow.try_number``); the step subprocess gets its
  ``TRACEPARENT`` so its log lines carry the same trace id.

Cost in the consumer: per micro-batch one span, three child spans and one link per sampled frame (its
header parsed directly, no propagator; an unsampled frame's header is not parsed); the export runs in
the SDK's batch thread. Measured on 2 shared cores, 250-frame batches, export included: 13.6 us of CPU
per frame with every frame sampled, 3.1 us with 5 % sampled; a consumer before/after on one
10,000-frame stream showed no throughput drop beyond the noise (README, "Traces, logs and lineage").
Secrets: no header, body or query string is recorded; the gateway's URL attributes are redacted
(``redact_url``), and ``tasks.logs.redact`` masks the registered secret values in every stored span.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from tasks import logs

if TYPE_CHECKING:  # pragma: no cover
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.trace import Span, SpanContext

logger = logging.getLogger(__name__)

ENABLE_ENV = "MLPIPE_TRACING"
SAMPLE_ENV = "MLPIPE_TRACE_SAMPLE"
STORE_MAX_ENV = "MLPIPE_SPAN_STORE_MAX_BYTES"
DEFAULT_STORE_MAX_BYTES = 20 * 1024 * 1024
SPAN_FILE = "spans.jsonl"
TRACER_NAME = "mlpipe"
#: links per span kept (a micro-batch links every frame; the SDK's default is 128)
MAX_LINKS = 4096
_OTLP_ENVS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_SECRET_QUERY = ("token", "access_token", "api_key", "apikey", "key", "password", "secret", "signature", "sig",
                 "x-amz-signature", "x-amz-credential", "awsaccesskeyid", "auth")

_lock = threading.Lock()
_state: dict[str, Any] = {"provider": None, "tracer": None, "service": None}


# --------------------------------------------------------------------------- set-up


def span_store_path() -> Path | None:
    """``<log dir>/spans.jsonl``, or None when the log folder is off."""
    folder = logs.log_dir()
    return None if folder is None else folder / SPAN_FILE


def otlp_endpoint() -> str | None:
    for name in _OTLP_ENVS:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def _sample_ratio() -> float:
    value = os.environ.get(SAMPLE_ENV, "").strip()
    try:
        ratio = float(value) if value else 1.0
    except ValueError:
        raise ValueError(f"{SAMPLE_ENV} must be a number between 0 and 1, got {value!r}") from None
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"{SAMPLE_ENV} must be between 0 and 1, got {ratio}")
    return ratio


def tracing_wanted() -> bool:
    return os.environ.get(ENABLE_ENV, "").strip().lower() not in ("0", "off", "false", "no")


def setup_tracing(service: str | None = None, *, exporter: Any = None, force: bool = False,
                  batch: bool = True) -> bool:
    """Start tracing for this process as ``service`` (default ``tasks.logs.service_name()``); True when on.

    Idempotent (a second call keeps the first set-up) unless ``force`` (tests: a fresh provider, the old one
    flushed and shut down). ``exporter``: any ``SpanExporter`` instead of the configured one; ``batch=False``
    exports each span when it ends (tests)."""
    with _lock:
        if _state["provider"] is not None and not force:
            return True
        _shutdown_locked()
        if not tracing_wanted() and exporter is None:
            return False
        if exporter is None:
            endpoint = otlp_endpoint()
            if endpoint:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

                # reads OTEL_EXPORTER_OTLP_* itself (endpoint, headers); a collector that is down delays a
                # process's exit (the last flush) by at most the timeout: 3 s unless OTEL_EXPORTER_OTLP_*TIMEOUT says
                timeout_set = any(os.environ.get(v) for v in ("OTEL_EXPORTER_OTLP_TIMEOUT",
                                                              "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"))
                exporter = OTLPSpanExporter() if timeout_set else OTLPSpanExporter(timeout=3.0)
            else:
                path = span_store_path()
                if path is None:
                    return False
                exporter = SpanStoreExporter(path)
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import SpanLimits, TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased

        name = service or logs.service_name()
        provider = TracerProvider(
            sampler=ParentBased(_linked_or_ratio(_sample_ratio())),
            resource=Resource.create({"service.name": name, "process.pid": os.getpid()}),
            span_limits=SpanLimits(max_links=MAX_LINKS), shutdown_on_exit=True)
        provider.add_span_processor(BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter))
        _state.update(provider=provider, tracer=provider.get_tracer(TRACER_NAME), service=name)
        return True


def secret_values(cfg: Any) -> list[str]:
    """Every secret's value in a settings tree (``tasks.config.Settings``: ``SecretStr`` fields, any depth)."""
    from pydantic import BaseModel, SecretStr

    found: list[str] = []

    def walk(obj: Any) -> None:
        if isinstance(obj, SecretStr):
            found.append(obj.get_secret_value())
        elif isinstance(obj, BaseModel):
            for name in type(obj).model_fields:
                walk(getattr(obj, name, None))

    walk(cfg)
    return [v for v in found if v]


def setup_process(service: str, cfg: Any = None) -> bool:
    """What a long-running service calls at start: every secret of the settings ``cfg`` registered with
    ``tasks.logs.register_secret`` (no log line or stored span can then carry one), and ``setup_tracing``."""
    for value in secret_values(cfg) if cfg is not None else ():
        logs.register_secret(value)
    _state["bind"] = True  # this process is the service: its served model version goes into its log lines
    return setup_tracing(service)


def _linked_or_ratio(ratio: float) -> Any:
    """The root sampler: a span linked to a sampled trace (a consumer batch holding a sampled frame) is kept,
    any other new trace with probability ``ratio``."""
    from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult, TraceIdRatioBased

    class LinkedOrRatio(Sampler):
        def __init__(self) -> None:
            self.ratio = TraceIdRatioBased(ratio)

        def should_sample(self, parent_context: Any, trace_id: int, name: str, kind: Any = None,
                          attributes: Any = None, links: Any = None, trace_state: Any = None) -> Any:
            if links and any(link.context.trace_flags.sampled for link in links):
                return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
            return self.ratio.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

        def get_description(self) -> str:
            return f"LinkedOrRatio{{{ratio}}}"

    return LinkedOrRatio()


def _shutdown_locked() -> None:
    provider = _state["provider"]
    _state.update(provider=None, tracer=None, service=None)
    if provider is not None:
        with contextlib.suppress(Exception):
            provider.shutdown()


def shutdown() -> None:
    """Flush and stop (the spans in hand are exported)."""
    with _lock:
        _shutdown_locked()


def flush(timeout_s: float = 5.0) -> bool:
    provider = _state["provider"]
    return True if provider is None else bool(provider.force_flush(int(timeout_s * 1000)))


def enabled() -> bool:
    return _state["tracer"] is not None


def provider() -> "TracerProvider | None":
    return _state["provider"]


def tracer() -> Any:
    """This process's tracer (a no-op one before ``setup_tracing``)."""
    t = _state["tracer"]
    if t is None:
        from opentelemetry.trace import NoOpTracer

        return NoOpTracer()
    return t


@contextlib.contextmanager
def span(name: str, kind: str = "internal", attributes: Mapping[str, Any] | None = None,
         context: Any = None) -> Iterator["Span | None"]:
    """A current span around the block (None and nothing recorded while tracing is off); an exception ends it
    with status error and goes on."""
    t = _state["tracer"]
    if t is None:
        yield None
        return
    with t.start_as_current_span(name, context=context, kind=_kind(kind), attributes=_attrs(attributes)) as s:
        yield s


def _kind(kind: str) -> Any:
    from opentelemetry.trace import SpanKind

    return getattr(SpanKind, kind.upper())


def _attrs(attributes: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not attributes:
        return None
    return {k: v for k, v in attributes.items() if v is not None}


# --------------------------------------------------------------------------- W3C trace context


def format_traceparent(ctx: "SpanContext") -> str:
    """W3C level 1 ``traceparent`` (flags ``01`` sampled / ``00``; the SDK's level-2 "random" bit is left out:
    every reader of the frames header, the contract's ``-01`` included, knows level 1)."""
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags) & 0x01:02x}"


def parse_traceparent(value: bytes | str | None) -> "SpanContext | None":
    """A remote ``SpanContext`` from a W3C ``traceparent`` (bytes from a Kafka header or text), else None.

    Called once per frame by the consumer: no decode, no split, the ids parsed straight from the bytes."""
    if not value or len(value) < 55:
        return None
    if isinstance(value, str):
        value = value.strip().encode("ascii", "replace")
        if len(value) < 55:
            return None
    if value[2:3] != b"-" or value[35:36] != b"-" or value[52:53] != b"-" or value[:2] == b"ff" \
            or (len(value) > 55 and value[55:56] != b"-"):
        return None
    try:
        trace_id, span_id, flags = int(value[3:35], 16), int(value[36:52], 16), int(value[53:55], 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    return _span_context(trace_id, span_id, flags)


def _span_context(trace_id: int, span_id: int, flags: int) -> "SpanContext":
    global _SpanContext, _TraceFlags, _SAMPLED, _NOT_SAMPLED
    if _SpanContext is None:
        from opentelemetry.trace import SpanContext, TraceFlags

        _SpanContext, _TraceFlags = SpanContext, TraceFlags
        _SAMPLED, _NOT_SAMPLED = TraceFlags(1), TraceFlags(0)
    return _SpanContext(trace_id, span_id, True, _SAMPLED if flags & 1 else _NOT_SAMPLED)


_SpanContext: Any = None
_TraceFlags: Any = None
_SAMPLED: Any = None
_NOT_SAMPLED: Any = None


def context_from_traceparent(value: bytes | str | None) -> Any:
    """An OpenTelemetry ``Context`` whose parent is ``value``'s span (None when it is not a valid traceparent)."""
    ctx = parse_traceparent(value)
    if ctx is None:
        return None
    from opentelemetry.trace import NonRecordingSpan, set_span_in_context

    return set_span_in_context(NonRecordingSpan(ctx))


def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the current span, or None (no span, or tracing off)."""
    if _state["tracer"] is None:
        return None
    from opentelemetry.trace import get_current_span

    ctx = get_current_span().get_span_context()
    return format_traceparent(ctx) if ctx.is_valid else None


def trace_headers() -> dict[str, str] | None:
    """Request metadata for a call out (gRPC / HTTP to Triton): ``{"traceparent": ...}`` of the current span, or
    None (nothing to send)."""
    tp = current_traceparent()
    return {"traceparent": tp} if tp else None


def redact_url(text: str) -> str:
    """``text`` (a URL or query string) with the values of credential-like query parameters replaced by
    ``REDACTED``."""
    if "=" not in text:
        return text
    base, sep, query = text.partition("?")
    if not sep:
        base, query = "", text
    parts = []
    for item in query.split("&"):
        name, eq, _value = item.partition("=")
        low = name.lower()
        parts.append(f"{name}=REDACTED" if eq and any(s in low for s in _SECRET_QUERY) else item)
    return base + (sep or "") + "&".join(parts)


# --------------------------------------------------------------------------- the gateway


def instrument_fastapi(app: Any) -> bool:
    """FastAPI instrumentation on ``app`` (request spans continuing an incoming ``traceparent``), when tracing
    is on; health, readiness and metrics are not traced, URL attributes are redacted."""
    p = _state["provider"]
    if p is None:
        return False
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    def hook(span: Any, scope: dict[str, Any]) -> None:
        if span is None or not span.is_recording():
            return
        query = scope.get("query_string") or b""
        if query:
            clean = redact_url(query.decode("latin-1"))
            span.set_attribute("url.query", clean)
            path = scope.get("path", "")
            span.set_attribute("http.target", f"{path}?{clean}")

    FastAPIInstrumentor.instrument_app(app, tracer_provider=p, excluded_urls="healthz,readyz,metrics",
                                       server_request_hook=hook, exclude_spans=["receive", "send"])
    return True


class Publish:
    """The producer span of one frame (gateway): ``traceparent`` goes into the frame's header, ``end()`` after
    the broker's answer."""

    __slots__ = ("span", "traceparent")

    def __init__(self, span: Any, traceparent: str | None) -> None:
        self.span = span
        self.traceparent = traceparent

    def end(self, error: str | None = None) -> None:
        if self.span is None:
            return
        if error:
            from opentelemetry.trace import Status, StatusCode

            self.span.set_status(Status(StatusCode.ERROR, error[:200]))
        self.span.end()


def start_publish(topic: str, frame_id: str, device_id: str | None = None) -> Publish:
    """A ``frames publish`` span (child of the current request span); ``Publish.traceparent`` None while tracing
    is off (the caller then makes its own)."""
    t = _state["tracer"]
    if t is None:
        return Publish(None, None)
    s = t.start_span("frames publish", kind=_kind("producer"), attributes=_attrs({
        "messaging.system": "kafka", "messaging.destination.name": topic, "messaging.operation.type": "send",
        "mlpipe.frame_id": frame_id, "mlpipe.device_id": device_id}))
    ctx = s.get_span_context()
    return Publish(s, format_traceparent(ctx) if ctx.is_valid else None)


# --------------------------------------------------------------------------- the consumer


class BatchTrace:
    """The spans of one consumer micro-batch (see the module doc). Made by ``start_batch``; the loop calls
    ``run`` around the Triton call (in the pool thread) and ``finish`` once the batch is committed."""

    __slots__ = ("span", "ctx", "frame_count", "model")

    def __init__(self, span: Any, ctx: Any, frame_count: int, model: str = "") -> None:
        self.span = span
        self.ctx = ctx
        self.frame_count = frame_count
        self.model = model

    def run(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` wrapped so it runs inside a ``triton infer`` span of this batch (its context is what the Triton
        adapter sends as gRPC metadata)."""
        if self.span is None:
            return fn
        t, ctx = _state["tracer"], self.ctx

        def traced(*args: Any, **kwargs: Any) -> Any:
            from opentelemetry import context as otel_context

            token = otel_context.attach(ctx)
            try:
                with t.start_as_current_span("triton infer", kind=_kind("client"),
                                             attributes={"rpc.system": "grpc", "mlpipe.frames": self.frame_count}):
                    return fn(*args, **kwargs)
            finally:
                otel_context.detach(token)

        return traced

    def finish(self, *, version: str = "", predicted: int = 0, dead_letters: int = 0, produced_at: float = 0.0,
               kafka_s: float = 0.0, qdrant_s: float = 0.0, points: int = 0, written_at: float | None = None) -> None:
        """End the batch span with its sink spans: ``kafka produce`` from ``produced_at`` (epoch s) for
        ``kafka_s`` (the acks wait), then ``qdrant upsert`` for ``qdrant_s`` ending at ``written_at``.

        In a service process (``setup_process``) it also binds the served ``version`` into the log context
        (``tasks.logs.bind``), traced or not; a consumer run inside another process (tests) binds nothing."""
        if version and _state.get("bind") and _state.get("bound_version") != version:
            _state["bound_version"] = version
            logs.bind(model_version=version)
        s = self.span
        if s is None:
            return
        from tasks.contracts.messages import lineage_id

        lineage = lineage_id(self.model, version)
        written = written_at if written_at is not None else time.time()
        t = _state["tracer"]
        if t is not None:
            ns = 1_000_000_000
            q_start = written - qdrant_s
            k_start = min(produced_at or (q_start - kafka_s), q_start)
            k = t.start_span("kafka produce", context=self.ctx, kind=_kind("producer"), start_time=int(k_start * ns),
                             attributes={"messaging.system": "kafka", "mlpipe.messages": predicted + dead_letters})
            k.end(end_time=int(q_start * ns))
            if points:
                q = t.start_span("qdrant upsert", context=self.ctx, kind=_kind("client"),
                                 start_time=int(q_start * ns), attributes={"mlpipe.points": points})
                q.end(end_time=int(written * ns))
        s.set_attributes(_attrs({"mlpipe.model_version": version or None, "mlpipe.lineage": lineage,
                                 "mlpipe.predicted": predicted, "mlpipe.dead_letters": dead_letters}) or {})
        s.end()
        self.span = None


#: the last hex digit of a sampled traceparent's flags (bit 0 set): as a byte of a Kafka header, or as text
_SAMPLED_FLAG = frozenset(b"13579bdfBDF") | frozenset("13579bdfBDF")
#: the batch trace of a batch nobody traces (tracing off, or not sampled): every method a no-op
NO_BATCH = BatchTrace(None, None, 0)


def start_batch(records: Sequence[Any], frame_ids: Sequence[str] = (), *, model: str = "",
                started_at: float | None = None) -> BatchTrace:
    """The ``consumer batch`` span of a polled micro-batch (``records``: objects with ``headers``, name -> bytes),
    linked to each frame's trace; a no-op ``BatchTrace`` while tracing is off."""
    t = _state["tracer"]
    if t is None:
        return NO_BATCH
    from opentelemetry.trace import Link, set_span_in_context

    from tasks.contracts.messages import H_TRACEPARENT

    links = []
    for rec in records:
        tp = rec.headers.get(H_TRACEPARENT)
        if not tp or len(tp) < 55 or tp[54] not in _SAMPLED_FLAG:  # not sampled: no link, nothing parsed
            continue
        ctx = parse_traceparent(tp)
        if ctx is not None:
            links.append(Link(ctx))
    start = int((started_at if started_at is not None else time.time()) * 1_000_000_000)
    s = t.start_span("consumer batch", kind=_kind("consumer"), links=links, start_time=start, attributes=_attrs({
        "messaging.system": "kafka", "messaging.operation.type": "process",
        "messaging.batch.message_count": len(records), "mlpipe.model": model or None,
        "mlpipe.frame_ids": ",".join(frame_ids) or None}))  # one string: a list attribute costs ~6 us a frame
    if not s.is_recording():
        return NO_BATCH
    return BatchTrace(s, set_span_in_context(s), len(frame_ids), model)


# --------------------------------------------------------------------------- pipeline steps


#: exceptions that end a task's execute() without failing it (a deferrable pod operator's hand-over)
_NOT_FAILURES = ("TaskDeferred",)


@contextlib.contextmanager
def step_span(command: str, attributes: Mapping[str, Any] | None = None) -> Iterator[dict[str, str]]:
    """A ``step <command>`` span around a step run; yields the environment to add to the step's process
    (``TRACEPARENT``; empty while tracing is off). A failure of the block marks the span as an error; a deferral
    (``TaskDeferred``) does not (attribute ``mlpipe.deferred``)."""
    t = _state["tracer"]
    if t is None:
        yield {}
        return
    from opentelemetry import context as otel_context
    from opentelemetry.trace import Status, StatusCode, set_span_in_context

    s = t.start_span(f"step {command}", kind=_kind("internal"),
                     attributes=_attrs({"mlpipe.step": command, **(attributes or {})}))
    token = otel_context.attach(set_span_in_context(s))
    try:
        tp = current_traceparent()
        yield {"TRACEPARENT": tp} if tp else {}
    except BaseException as exc:
        if type(exc).__name__ in _NOT_FAILURES:
            s.set_attribute("mlpipe.deferred", True)
        else:
            s.record_exception(exc)
            s.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:300]))
        raise
    finally:
        otel_context.detach(token)
        s.end()


# --------------------------------------------------------------------------- the local span store


_KINDS = {0: "internal", 1: "server", 2: "client", 3: "producer", 4: "consumer"}
_STATUS = {0: "unset", 1: "ok", 2: "error"}


def _iso(ns: int | None) -> str | None:
    if ns is None:
        return None
    return dt.datetime.fromtimestamp(ns / 1e9, dt.timezone.utc).isoformat(timespec="microseconds")


def _value(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def span_record(s: "ReadableSpan") -> dict[str, Any]:
    """One span as a line of the span store (the module doc's format)."""
    ctx = s.context
    parent = s.parent
    start, end = s.start_time, s.end_time
    service = s.resource.attributes.get("service.name") if s.resource is not None else None
    return {
        "trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}",
        "parent_span_id": f"{parent.span_id:016x}" if parent is not None else None,
        "name": s.name, "kind": _KINDS.get(getattr(s.kind, "value", 0), "internal"), "service": service,
        "start": _iso(start), "end": _iso(end), "start_ns": start, "end_ns": end,
        "duration_ms": round((end - start) / 1e6, 3) if start is not None and end is not None else None,
        "status": _STATUS.get(getattr(s.status.status_code, "value", 0), "unset"),
        "status_message": s.status.description,
        "attributes": {k: _value(v) for k, v in (s.attributes or {}).items()},
        "links": [{"trace_id": f"{ln.context.trace_id:032x}", "span_id": f"{ln.context.span_id:016x}"}
                  for ln in s.links],
        "events": [{"name": e.name, "time": _iso(e.timestamp),
                    "attributes": {k: _value(v) for k, v in (e.attributes or {}).items()}} for e in s.events],
    }


class SpanStoreExporter:
    """A ``SpanExporter`` appending the span store's JSON lines (``append_rotating``: one locked write per
    export batch)."""

    def __init__(self, path: Path, max_bytes: int | None = None, backups: int | None = None) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes if max_bytes is not None else logs._int_env(STORE_MAX_ENV, DEFAULT_STORE_MAX_BYTES)
        self.backups = backups if backups is not None else logs.rotation()[1]

    def export(self, spans: Sequence["ReadableSpan"]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        try:
            data = "".join(logs.redact(json.dumps(span_record(s), default=str, ensure_ascii=False)) + "\n"
                           for s in spans).encode("utf-8", "replace")
            logs.append_rotating(self.path, data, self.max_bytes, self.backups)
        except OSError as exc:
            logger.warning("could not write %d span(s) to %s: %s", len(spans), self.path, exc)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def store_files(path: Path | None = None) -> list[Path]:
    """The span store's files, oldest first (``spans.jsonl.N`` ... ``spans.jsonl``)."""
    path = path or span_store_path()
    if path is None:
        return []
    rotated = sorted((p for p in path.parent.glob(path.name + ".*") if p.suffix[1:].isdigit()),
                     key=lambda p: -int(p.suffix[1:]))
    return [*rotated, *([path] if path.exists() else [])]


def read_spans(path: Path | None = None) -> Iterator[dict[str, Any]]:
    """Every span in the store, oldest file first (lines that are not JSON objects are skipped)."""
    for f in store_files(path):
        try:
            with f.open(encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(rec, dict) and "trace_id" in rec:
                        yield rec
        except FileNotFoundError:  # rotated away while reading
            continue
