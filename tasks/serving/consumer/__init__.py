"""The streaming consumer (Triton sidecar): frames in, predictions out. ``mlpipe stream --help``.

Reads ``frames``, runs each micro-batch through Triton, writes one JSON prediction per frame to
``predictions`` (key = frame id) and the selected ones to Qdrant (point id = frame id); poison
frames go to ``frames.dlq``. Offsets are committed only after both sinks confirmed a batch, in
order, never past a held batch: at-least-once with idempotent sinks. Triton or a sink down ->
fetching pauses and the batch is retried with jittered exponential backoff; SIGTERM -> drain within
``--drain-timeout``, commit, leave the group, exit 0 within 10 s.

No poison pill: every message read ends in a prediction or a dead letter. Messages written never exceed
``MLPIPE_MAX_MESSAGE_BYTES`` (oversize originals go to the object store under ``dlq/<topic>/<partition>/
<offset>/``, the dead letter points at them); a permanent Triton error is bisected to the frame at
fault (``inference_failed``); requests follow the served model's ``max_batch_size`` (read from Triton).
Every bound that is hit is counted in ``mlpipe_consumer_bounds_hit_total{bound}`` and logged.

Broker incarnations: the consumer watches the broker's cluster id and topic ids. When they change (an
in-memory broker such as local Tansu restarted empty, a topic deleted and re-created, another cluster
behind the address) it drops every offset of the old log, never commits them to the new one, re-creates
the topics, re-positions on the group's offsets of the new log (or its start) and goes on; /readyz is
503 meanwhile. On a real Kafka cluster the log survives a broker restart or failover: the ids do not
change, nothing is dropped, the member re-joins and resumes from its committed offsets (at most the
uncommitted tail is redelivered, which the idempotent sinks absorb).

The model spec (``--model``, default ``MLPIPE_MODEL_NAME``) is resolved at start (a missing or invalid one
stops the consumer, exit 2): the host makes only the cheap checks of each frame (size, content type,
magic bytes); the encoded frames go to Triton, whose preprocess model decodes them and reports the ones
it cannot use (``FRAME_ERROR``), which become dead letters with that reason. Predictions carry the class id
and its name. A pipeline (``--model`` naming ``models/<name>/pipeline.yaml``) is served by its one Triton model:
frames checked against its detector's spec, predictions with the boxes, the count and the read-out
(``pipeline``), one Qdrant point per frame; safe rollout is off for it.

Modules: ``policy`` (which predictions Qdrant indexes), ``records`` (pure: frames -> the cheap checks,
results -> prediction / dead-letter messages and Qdrant points), ``offsets`` (what may be
committed), ``backoff``, ``telemetry`` (metrics, /healthz /readyz /metrics), ``backend`` (the
inference interface and Triton), ``bisect`` (finding the frames Triton rejects), ``loop``
(``StreamConsumer``), ``config`` (``StreamConfig``), ``cli`` (``main``), ``pipeline`` (serving a pipeline: its specs and its
predictions with the boxes, the count and the read-out).
"""

from tasks.serving.consumer.backend import InferenceBackend, InferenceRejected, InferenceUnavailable, TritonBackend
from tasks.serving.consumer.backoff import Backoff
from tasks.serving.consumer.cli import _check_kafka_overrides, _parser, main
from tasks.serving.consumer.config import DEFAULT_GROUP, StreamConfig
from tasks.serving.consumer.loop import FrameSource, ResultSink, StreamConsumer, VectorSink
from tasks.serving.consumer.offsets import OffsetTracker
from tasks.serving.consumer.policy import DEFAULT_QDRANT_POLICY, QdrantPolicy
from tasks.serving.consumer.telemetry import HealthServer, Metrics

__all__ = [
    "DEFAULT_GROUP", "DEFAULT_QDRANT_POLICY", "Backoff", "FrameSource", "HealthServer", "InferenceBackend",
    "InferenceRejected", "InferenceUnavailable", "Metrics", "OffsetTracker", "QdrantPolicy", "ResultSink", "StreamConfig",
    "StreamConsumer", "TritonBackend", "VectorSink", "_check_kafka_overrides", "_parser", "main",
]
