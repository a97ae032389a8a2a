"""The streaming consumer (Triton sidecar): frames in, predictions out. ``mlpipe stream --help``.

Reads ``frames``, runs each micro-batch through Triton, writes one JSON prediction per frame to
``predictions`` (key = frame id) and the selected ones to Qdrant (point id = frame id); poison
frames go to ``frames.dlq``. Offsets are committed only after both sinks confirmed a batch, in
order, never past a held batch: at-least-once with idempotent sinks. Triton or a sink down ->
fetching pauses and the batch is retried with jittered exponential backoff; SIGTERM -> drain within
``--drain-timeout``, commit, leave the group, exit 0 within 10 s.

Modules: ``policy`` (which predictions Qdrant indexes), ``records`` (pure: frames -> decoded
images, results -> prediction / dead-letter messages and Qdrant points), ``offsets`` (what may be
committed), ``backoff``, ``telemetry`` (metrics, /healthz /readyz /metrics), ``backend`` (the
inference interface and Triton), ``loop`` (``StreamConsumer``), ``config`` (``StreamConfig``),
``cli`` (``main``).
"""

from tasks.serving.consumer.backend import InferenceBackend, InferenceUnavailable, TritonBackend
from tasks.serving.consumer.backoff import Backoff
from tasks.serving.consumer.cli import _check_kafka_overrides, _parser, main
from tasks.serving.consumer.config import DEFAULT_GROUP, StreamConfig
from tasks.serving.consumer.loop import FrameSource, ResultSink, StreamConsumer, VectorSink
from tasks.serving.consumer.offsets import OffsetTracker
from tasks.serving.consumer.policy import DEFAULT_QDRANT_POLICY, QdrantPolicy
from tasks.serving.consumer.telemetry import HealthServer, Metrics

__all__ = [
    "DEFAULT_GROUP", "DEFAULT_QDRANT_POLICY", "Backoff", "FrameSource", "HealthServer", "InferenceBackend",
    "InferenceUnavailable", "Metrics", "OffsetTracker", "QdrantPolicy", "ResultSink", "StreamConfig",
    "StreamConsumer", "TritonBackend", "VectorSink", "_check_kafka_overrides", "_parser", "main",
]
