"""Telemetry: the consumer's Prometheus metrics and its HTTP endpoints.

``/metrics`` (Prometheus, own registry per consumer), ``/healthz`` (200 while the main loop is
alive), ``/readyz`` (200 while the member holds partitions, is not paused, gets the broker's
acknowledgements, the broker's log is the one it joined, and Triton is ready); 503 with a JSON detail
otherwise. Loopback by default (``--http-host``/``--http-port``).
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

logger = logging.getLogger(__name__)


class Metrics:
    """Prometheus metrics of one consumer (own registry, so several can live in one process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.frames = Counter("mlpipe_consumer_frames_total", "Frames handled, by outcome", ["outcome"],
                              registry=r)
        self.dead_letters = Counter("mlpipe_consumer_dead_letters_total", "Frames sent to the DLQ, by reason",
                                    ["reason"], registry=r)
        self.batch_size = Histogram("mlpipe_consumer_batch_size", "Frames per micro-batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=r)
        self.e2e_latency = Histogram(
            "mlpipe_consumer_e2e_latency_seconds",
            "captured_at header -> both sinks written (prediction acknowledged by Kafka, Qdrant upserted)",
            buckets=(0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.triton_latency = Histogram("mlpipe_consumer_triton_seconds", "Triton call time per micro-batch",
                                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
                                        registry=r)
        self.lag = Gauge("mlpipe_consumer_lag_messages", "Consumer lag (high watermark - committed offset)",
                         ["topic", "partition"], registry=r)
        self.lag_total = Gauge("mlpipe_consumer_lag_total_messages", "Consumer lag summed over the assignment",
                               registry=r)
        self.triton_errors = Counter("mlpipe_consumer_triton_errors_total", "Failed Triton calls", registry=r)
        self.write_errors = Counter("mlpipe_consumer_write_errors_total", "Failed sink writes or commits",
                                    ["sink"], registry=r)
        self.qdrant_points = Counter("mlpipe_consumer_qdrant_points_total", "Points upserted to Qdrant",
                                     registry=r)
        self.paused = Gauge("mlpipe_consumer_paused", "1 while fetching is paused (Triton unavailable)",
                            registry=r)
        self.commits = Counter("mlpipe_consumer_commits_total", "Offset commits", registry=r)
        self.bounds_hit = Counter(
            "mlpipe_consumer_bounds_hit_total",
            "A limit that stopped a frame from waiting longer or a message from growing past the broker's limit, "
            "by bound (each also logged with its reason)", ["bound"], registry=r)
        self.broker_resets = Counter("mlpipe_consumer_broker_resets_total",
                                     "The broker lost its log (restart of an in-memory broker, topic re-created, "
                                     "cluster id changed): offsets dropped, group re-joined", ["reason"], registry=r)
        self.commits_withheld = Counter("mlpipe_consumer_commits_withheld_total",
                                        "Commits not sent because the broker's incarnation was not verified",
                                        registry=r)
        self.inference_rejected = Counter("mlpipe_consumer_inference_rejected_total",
                                          "Triton calls that failed permanently (bisected to find the frames)",
                                          registry=r)
        self.originals_stored = Counter("mlpipe_consumer_dlq_originals_stored_total",
                                        "Dead-lettered originals too large for frames.dlq, stored in the object store",
                                        registry=r)
        self.model_max_batch = Gauge("mlpipe_consumer_model_max_batch",
                                     "Frames per Triton request (the served model's max_batch_size)", registry=r)
        self.acks_failing = Gauge("mlpipe_consumer_acks_failing", "1 while the broker does not acknowledge writes",
                                  registry=r)
        # per version (safe rollout, tasks/serving/consumer/rollout.py): which version answered, how fast, and
        # how a candidate compares with the champion on the same live frames
        self.version_frames = Counter("mlpipe_consumer_version_frames_total",
                                      "Frames answered, by model version and arm (champion, candidate, shadow)",
                                      ["version", "arm"], registry=r)
        self.version_latency = Histogram("mlpipe_consumer_version_triton_seconds",
                                         "Triton call time by model version and arm",
                                         ["version", "arm"],
                                         buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
                                         registry=r)
        self.version_errors = Counter("mlpipe_consumer_version_errors_total",
                                      "Frames whose Triton call failed, by version and arm (a candidate's fall back "
                                      "to the champion)", ["version", "arm"], registry=r)
        self.shadow_agreement = Counter("mlpipe_consumer_shadow_agreement_total",
                                        "Shadow answers compared with the champion's, by candidate version and outcome",
                                        ["version", "outcome"], registry=r)
        self.rollout_share = Gauge("mlpipe_consumer_rollout_candidate_share",
                                   "Percent of frames the rollout candidate answers (0 when none; shadow: 0)",
                                   registry=r)
        self.rollout_mode = Gauge("mlpipe_consumer_rollout_mode", "1 for the rollout mode the consumer follows",
                                  ["mode"], registry=r)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class HealthServer:
    """``/metrics``, ``/healthz``, ``/readyz`` on a small threaded HTTP server."""

    def __init__(self, host: str, port: int, metrics: Metrics, live: Callable[[], tuple[bool, dict]],
                 ready: Callable[[], tuple[bool, dict]]) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    from prometheus_client import CONTENT_TYPE_LATEST

                    self._send(200, outer.metrics.render(), CONTENT_TYPE_LATEST)
                elif path in {"/healthz", "/readyz"}:
                    ok, detail = (outer.live if path == "/healthz" else outer.ready)()
                    body = json.dumps({"status": "ok" if ok else "unavailable", **detail}).encode()
                    self._send(200 if ok else 503, body, "application/json")
                else:
                    self._send(404, b'{"detail": "not found: use /metrics, /healthz or /readyz"}',
                               "application/json")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: Any) -> None:
                logger.debug("http: " + fmt, *args)

        self.metrics, self.live, self.ready = metrics, live, ready
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.host = host
        self._thread = threading.Thread(target=self.server.serve_forever, name="health-http", daemon=True)

    def start(self) -> "HealthServer":
        self._thread.start()
        logger.info("metrics and health on http://%s:%d (/metrics /healthz /readyz)", self.host, self.port)
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
