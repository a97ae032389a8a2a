"""``mlpipe stream`` / ``python -m tasks.serving.consumer``: flags and MLPIPE_* variables -> a running consumer.

Exit codes: 0 stopped (SIGTERM/SIGINT, or ``--exit-when-idle``), 1 the vector store cannot be
opened, 2 a usage error (bad flag value, ``--kafka-config`` librdkafka rejects, bad Triton URL, a model
spec that is missing or invalid: its ``SpecError`` message).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from typing import Any, Sequence

from tasks.contracts.files import atomic_write
from tasks.contracts.serving import MAX_BATCH
from tasks.serving.consumer.backend import TritonBackend
from tasks.serving.consumer.config import StreamConfig
from tasks.serving.consumer.loop import StreamConsumer
from tasks.serving.consumer.policy import QdrantPolicy

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    """The consumer's flags; their defaults come from the settings tree (``load_settings().consumer``)."""
    from tasks.config import load_settings

    s = load_settings().consumer
    p = argparse.ArgumentParser(
        prog="mlpipe stream",
        description="Streaming inference consumer: frames (Kafka) -> Triton -> predictions (Kafka) + Qdrant. "
                    "Kafka settings come from MLPIPE_KAFKA_* (see tasks.adapters.kafka.KafkaConfig), Qdrant from "
                    "MLPIPE_QDRANT_URL / MLPIPE_QDRANT_PATH.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bootstrap", default=None, help="Kafka bootstrap servers (overrides MLPIPE_KAFKA_BOOTSTRAP)")
    p.add_argument("--topic-prefix", default=None, help="topic name prefix (overrides MLPIPE_KAFKA_TOPIC_PREFIX)")
    p.add_argument("--group", default=s.group, help="consumer group id")
    p.add_argument("--triton-url", default=s.triton_url,
                   help="Triton gRPC host:port (the sidecar uses localhost:8001)")
    p.add_argument("--model", default=None, help="the model project: its spec (models/<name>/spec.yaml under "
                   "MLPIPE_MODELS_DIR) gives the frames accepted and the class names, and the Triton ensemble of "
                   "that name serves it; a pipeline (models/<name>/pipeline.yaml): its detector's spec gives the "
                   "frames, its one Triton model of that name serves it (default MLPIPE_MODEL_NAME or digits)")
    p.add_argument("--max-batch", type=int, default=s.max_batch,
                   help="most frames per micro-batch")
    p.add_argument("--max-wait-ms", type=int, default=s.max_wait_ms,
                   help="longest wait to fill a micro-batch")
    p.add_argument("--model-max-batch", type=int, default=MAX_BATCH,
                   help="most frames per Triton request; the served model's max_batch_size (read from Triton at "
                        "start and after each deploy) lowers it: larger micro-batches are split into concurrent "
                        "calls")
    p.add_argument("--inflight", type=int, default=s.inflight,
                   help="micro-batches sent to Triton at once (2: the next one waits in Triton's queue while "
                        "one is answered, so the model does not idle between batches)")
    p.add_argument("--commit-interval-ms", type=int, default=s.commit_interval_ms,
                   help="commit the offsets of finished batches at most this often (and whenever idle); a crash "
                        "redelivers at most this much, which the idempotent sinks absorb")
    p.add_argument("--max-frame-bytes", type=int, default=s.max_frame_bytes,
                   help="larger frames are dead-lettered as oversize (default MLPIPE_MAX_FRAME_BYTES when set, else "
                        "the model spec's frames.max_frame_bytes)")
    p.add_argument("--max-message-bytes", type=int, default=None,
                   help="largest Kafka message produced (producer message.max.bytes; topics created with it as "
                        "max.message.bytes); dead letters and predictions are kept below it "
                        "(default MLPIPE_MAX_MESSAGE_BYTES or 1000000)")
    p.add_argument("--reject-hold-s", type=float, default=s.reject_hold_s,
                   help="a batch whose every frame Triton rejects alone (a permanent error, not an outage) is "
                        "retried this long, then its frames are dead letters (inference_failed)")
    p.add_argument("--max-hold-s", type=float, default=s.max_hold_s,
                   help="a batch held by a Triton outage this long is dead-lettered (inference_unavailable), a "
                        "Qdrant upsert failing this long is given up (0: wait for ever)")
    p.add_argument("--broker-check-s", type=float, default=s.broker_check_s,
                   help="how often the broker's cluster id and topic ids are checked: a change (the broker lost "
                        "its log) drops the old offsets and re-joins the group (0: never)")
    p.add_argument("--qdrant-policy", default=s.qdrant_policy,
                   help="which predictions go to Qdrant: all | none | sample:F | low_confidence:T (comma = union)")
    p.add_argument("--qdrant-url", default=None, help="Qdrant server URL (overrides MLPIPE_QDRANT_URL)")
    p.add_argument("--qdrant-path", default=None, help="Qdrant local-mode folder or :memory: "
                   "(overrides MLPIPE_QDRANT_PATH; default $MLPIPE_HOME/qdrant)")
    p.add_argument("--http-host", default=s.http_host,
                   help="address of /metrics /healthz /readyz (0.0.0.0 in a pod, for the kubelet probes)")
    p.add_argument("--http-port", type=int, default=s.http_port,
                   help="port of /metrics /healthz /readyz (0: a free one, -1: no HTTP server)")
    p.add_argument("--session-timeout-ms", type=int, default=s.session_timeout_ms)
    p.add_argument("--triton-timeout", type=float, default=10.0, help="seconds before a Triton call counts as failed")
    p.add_argument("--backoff-max", type=float, default=5.0,
                   help="longest wait between retries while Triton, Kafka or Qdrant is unavailable")
    p.add_argument("--drain-timeout", type=float, default=7.0,
                   help="on SIGTERM, seconds allowed to finish the batches in hand (even while Triton or the "
                        "broker hangs); leaving the group and closing get up to ~1.5 s more, so the default exits "
                        "within 10 s")
    p.add_argument("--exit-when-idle", type=float, default=None, metavar="SECONDS",
                   help="exit after this long without frames (benchmarks, batch back-fills)")
    p.add_argument("--no-create-topics", action="store_true", help="do not create missing topics at start")
    p.add_argument("--kafka-config", action="append", default=[], metavar="KEY=VALUE",
                   help="extra librdkafka setting for the frames consumer (repeatable), e.g. fetch.min.bytes=16384")
    p.add_argument("--stats-json", default=None, help="write the final counters to this file on exit")
    p.add_argument("--latency-log", default=None, metavar="PATH",
                   help="on exit, write one entry per predicted frame to this JSON file (benchmarks): "
                        "[captured_at epoch, then seconds from it until both sinks were written, the loop "
                        "polled the frame, Triton answered, the loop took the answer]")
    p.add_argument("--rollout-poll", type=float, default=1.0, metavar="SECONDS",
                   help="how often the rollout state (rollouts/<model>/state.json in the object store) is read: "
                        "shadow, canary share and the kill switch take effect within this (default 1; 0: do not "
                        "follow rollouts, the champion answers everything)")
    p.add_argument("--log-level", default=None, help="log level (default MLPIPE_LOG_LEVEL or INFO)")
    return p


def _check_kafka_overrides(overrides: dict[str, Any]) -> None:
    """ValueError naming the setting when librdkafka does not accept one (no connection is made)."""
    from confluent_kafka import Consumer, KafkaException

    try:
        # no bootstrap servers: librdkafka parses the settings and never connects; log_level 0: silent
        Consumer({"group.id": "mlpipe-config-check", "log_level": 0, **overrides}).close()
    except (KafkaException, ValueError, TypeError) as exc:
        raise ValueError(f"--kafka-config: {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import faulthandler

    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 <pid>`: every thread's stack to stderr (a stuck consumer)
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    from tasks.logs import setup_logging

    setup_logging(args.log_level)
    logging.getLogger("tasks.adapters.kafka.librdkafka").setLevel(logging.WARNING)
    from tasks.adapters.kafka import KafkaConfig
    from tasks.config import load_settings
    from tasks.tracing import setup_process

    try:  # a span per micro-batch (tasks.tracing); the settings' secrets never in a log line
        setup_process("stream", load_settings())
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    try:
        kafka = KafkaConfig.from_env(bootstrap=args.bootstrap, topic_prefix=args.topic_prefix,
                                     max_message_bytes=args.max_message_bytes)
        policy = QdrantPolicy.parse(args.qdrant_policy)
        for name in ("max_batch", "max_wait_ms", "model_max_batch", "inflight", "max_frame_bytes", "reject_hold_s"):
            value = getattr(args, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        settings = load_settings()
        model = args.model or settings.model_name
        from tasks.serving.consumer.pipeline import pipeline_serving

        pipeline = pipeline_serving(model, settings.models_dir)  # a pipeline: its frames are its detector's
        # SpecError (a ValueError) names the missing file or each problem
        spec = pipeline.frames if pipeline is not None else settings.model_spec(model)
        kafka_overrides: dict[str, Any] = {}
        for item in args.kafka_config:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"--kafka-config {item!r}: expected KEY=VALUE")
            kafka_overrides[key.strip()] = value.strip()
        if kafka_overrides:
            _check_kafka_overrides(kafka_overrides)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logger.info("kafka: %s", kafka)  # dataclass repr hides the password and key
    cfg = StreamConfig(
        group_id=args.group, model=model, triton_url=args.triton_url, max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms, max_model_batch=args.model_max_batch, inflight=args.inflight,
        commit_interval_ms=max(0, args.commit_interval_ms), max_frame_bytes=args.max_frame_bytes,
        qdrant_policy=policy, http_host=args.http_host, http_port=None if args.http_port < 0 else args.http_port,
        session_timeout_ms=args.session_timeout_ms, triton_timeout_s=args.triton_timeout,
        drain_timeout_s=args.drain_timeout, exit_when_idle_s=args.exit_when_idle, backoff_max_s=args.backoff_max,
        create_topics=not args.no_create_topics, kafka_overrides=kafka_overrides,
        record_latency=bool(args.latency_log), max_message_bytes=kafka.max_message_bytes,
        broker_check_s=max(0.0, args.broker_check_s), reject_hold_s=args.reject_hold_s,
        max_hold_s=max(0.0, args.max_hold_s))
    max_frame_bytes = cfg.max_frame_bytes or spec.frames.max_frame_bytes
    if max_frame_bytes > kafka.max_message_bytes:
        logger.warning("the frame limit %d (--max-frame-bytes, or the spec's frames.max_frame_bytes) is above the "
                       "message limit %d: such frames cannot even be produced", max_frame_bytes,
                       kafka.max_message_bytes)
    vectors = None
    if policy.enabled:
        from tasks.adapters.qdrant import VectorStoreError, open_vectors

        try:
            vectors = open_vectors(url=args.qdrant_url, path=args.qdrant_path, size=spec.embedding_dim)
        except VectorStoreError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    try:
        chunks = -(-cfg.max_batch // cfg.max_model_batch)  # Triton calls per micro-batch
        # at least 8: a served model with a smaller max_batch_size splits a micro-batch into more calls
        extra: dict[str, Any] = {}
        if pipeline is not None:  # one Triton model of that name; its versions are the pipeline's
            from tasks.contracts.serving import PIPELINE_OUTPUTS

            extra = {"outputs": PIPELINE_OUTPUTS, "version_model": cfg.model}
        backend = TritonBackend(cfg.triton_url, cfg.model, timeout_s=cfg.triton_timeout_s,
                                max_model_batch=cfg.max_model_batch, concurrency=max(8, chunks * cfg.inflight),
                                **extra)
    except Exception as exc:  # noqa: BLE001 - a bad URL is a usage error
        print(f"error: cannot create a Triton client for {cfg.triton_url}: {exc}", file=sys.stderr)
        return 2
    router = None
    if pipeline is not None:
        logger.info("serving pipeline %s (detector %s, classifier %s) as one Triton model: safe rollout is off "
                    "(it follows single models; a pipeline changes by `mlpipe pipeline deploy` / `rollback`)", model,
                    pipeline.frames.name, pipeline.classes.name)
    elif args.rollout_poll > 0:
        from tasks.adapters.storage import open_store
        from tasks.serving.consumer.rollout import RolloutRouter

        def lane_backend(lane: str) -> TritonBackend:
            return TritonBackend(cfg.triton_url, lane, timeout_s=cfg.triton_timeout_s,
                                 max_model_batch=cfg.max_model_batch, concurrency=4)

        router = RolloutRouter(model, store_factory=lambda: open_store(settings), backend_factory=lane_backend,
                               poll_s=args.rollout_poll, version_max_age_s=cfg.version_max_age_s)
    consumer = StreamConsumer(kafka, cfg, backend=backend, vectors=vectors, spec=spec, rollout=router,
                              pipeline=pipeline)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: consumer.stop())
    try:
        if router is not None:
            router.start()
        stats = consumer.run()
        if router is not None:
            stats = {**stats, "rollout": dict(router.stats)}
    finally:
        backend.close()
        if vectors is not None:
            vectors.close()
    if args.stats_json:
        atomic_write(args.stats_json, json.dumps(stats), 0o644)
    if args.latency_log:
        atomic_write(args.latency_log, json.dumps(consumer.latencies), 0o644)
    if consumer.abandoned:  # librdkafka's handles would block the interpreter's exit on the unreachable broker
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
