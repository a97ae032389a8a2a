"""The demo's streaming stage: gateway -> Kafka -> consumer sidecar -> Triton -> Kafka + Qdrant.

Starts the broker (Tansu), the consumer (``mlpipe stream``) and the gateway
(``mlpipe gateway``) on free loopback ports next to an already running Triton,
sends real held-out images of the model (its golden set, encoded as the model spec says: PNG digits,
JPEG shapes) through the gateway's HTTP API as devices would, drops a few poison frames straight onto
Kafka (some fail the consumer's cheap checks, two carry a valid signature and a broken body, so Triton's
preprocess model rejects them), waits for every prediction and reports what happened.
Every process it starts is stopped by PID at the end.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from tasks.local.procs import ManagedProcess, free_port, http_ok, wait_until
from tasks.tools.bench import percentile


def run_stream(home: Path, triton_grpc: str, frames: int = 3000, poison: int = 5,
               timeout: float = 180.0, during: Callable[[Any], Any] | None = None,
               during_max_s: float = 400.0, samples: tuple[list[bytes], list[Any]] | None = None,
               answer_key: str = "label") -> dict[str, Any]:
    """Stream ``frames`` frames (and the poison). With ``during(kafka_config)`` (e.g. a rollout), it runs in a
    thread once the consumer is ready while frames keep flowing, for at most ``during_max_s``; its result is
    ``during`` in the returned summary (an exception: ``{"error": ...}``); every frame sent meanwhile counts.

    ``samples``: ``(encoded frames, their truths)`` to send (default the model's golden set and its labels);
    ``answer_key``: the prediction field compared with the truth (``readout`` for a pipeline)."""
    import httpx
    import numpy as np

    from tasks.adapters.kafka import BusProducer, KafkaConfig, TailFollower, ensure_topics

    from tasks.config import load_settings
    from tasks.local.broker import LocalBroker
    from tasks.model.frame_codec import JPEG_MAGIC, PNG_MAGIC
    from tasks.model.frames import content_type_of, encode_frame
    from tasks.steps.drops import golden_set

    spec = load_settings().frame_spec()  # a pipeline's frames are its detector's

    logs = home / "logs"
    token = secrets.token_urlsafe(24)  # never printed
    with LocalBroker(logs / "broker") as broker:
        cfg = KafkaConfig.from_env(bootstrap=broker.bootstrap, topic_prefix="demo.")
        ensure_topics(cfg)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLPIPE_KAFKA_BOOTSTRAP": broker.bootstrap,
               "MLPIPE_KAFKA_TOPIC_PREFIX": "demo.", "MLPIPE_GATEWAY_TOKEN": token}
        c_port, g_port = free_port(), free_port()
        stats = logs / "consumer-stats.json"
        consumer = ManagedProcess("consumer", [
            sys.executable, "-m", "tasks.cli", "stream", "--triton-url", triton_grpc, "--http-port", str(c_port),
            "--qdrant-path", str(home / "qdrant"), "--session-timeout-ms", "6000", "--stats-json", str(stats)],
            logs / "consumer.log", env=env).start()
        gateway = ManagedProcess("gateway", [sys.executable, "-m", "tasks.cli", "gateway", "--port", str(g_port)],
                                 logs / "gateway.log", env=env).start()
        try:
            wait_until(lambda: http_ok(f"http://127.0.0.1:{c_port}/readyz"), 90, "consumer /readyz",
                       alive=consumer.alive)
            wait_until(lambda: http_ok(f"http://127.0.0.1:{g_port}/healthz"), 60, "gateway /healthz",
                       alive=gateway.alive)
            print(f"broker {broker.bootstrap}, consumer pid {consumer.pid} (metrics "
                  f"http://127.0.0.1:{c_port}/metrics), gateway pid {gateway.pid} (http://127.0.0.1:{g_port}/docs)",
                  flush=True)
            if samples is None:
                images, labels = golden_set(spec)
                bodies = [encode_frame(images[i], spec) for i in range(len(labels))]
            else:
                bodies, labels = list(samples[0]), list(samples[1])
            idx = np.arange(frames) % len(labels)
            ctype = content_type_of(spec.image_encoding)
            truth: dict[str, Any] = {}
            rejected = 0
            url = f"http://127.0.0.1:{g_port}/v1/frames"
            headers = {"Authorization": f"Bearer {token}", "Content-Type": ctype}

            def send(chunk: np.ndarray) -> tuple[dict[str, int], int]:
                got, bad = {}, 0
                with httpx.Client(timeout=10) as client:
                    for n, i in enumerate(chunk):
                        resp = client.post(url, content=bodies[i],
                                           headers={**headers, "X-Device-Id": f"camera-{n % 8}"})
                        if resp.status_code == 202:
                            got[resp.json()["frame_id"]] = labels[i]
                        else:
                            bad += 1
                return got, bad

            t0 = time.monotonic()
            with ThreadPoolExecutor(max_workers=4) as pool:
                for got, bad in pool.map(send, np.array_split(idx, 4)):
                    truth.update(got)
                    rejected += bad
                if during is not None:
                    import threading

                    outcome: dict[str, Any] = {}

                    def run_during() -> None:
                        try:
                            outcome["during"] = during(cfg)
                        except Exception as exc:  # noqa: BLE001 - reported in the summary
                            outcome["during"] = {"error": f"{type(exc).__name__}: {exc}"}

                    worker = threading.Thread(target=run_during, name="during-stream", daemon=True)
                    worker.start()
                    spin = np.arange(240) % len(labels)
                    while worker.is_alive() and time.monotonic() - t0 < during_max_s:
                        for got, bad in pool.map(send, np.array_split(spin, 4)):
                            truth.update(got)
                            rejected += bad
                    worker.join(timeout=max(1.0, during_max_s - (time.monotonic() - t0)))
            send_s = time.monotonic() - t0
            print(f"sent {len(truth)} frames through the gateway in {send_s:.1f}s "
                  f"({len(truth) / send_s:.0f}/s); {rejected} rejected", flush=True)
            producer = BusProducer(cfg)  # poison, straight onto Kafka as a broken device would
            try:
                magic = PNG_MAGIC if spec.image_encoding == "png" else JPEG_MAGIC
                for k in range(poison):
                    hdrs = [("frame_id", str(uuid.uuid4()).encode()), ("content-type", ctype.encode())]
                    value = b"\x00not-an-image" * (k + 1)  # no signature: the consumer's cheap check
                    if k == 0:
                        hdrs = [("content-type", ctype.encode())]  # missing frame_id
                    elif k in (1, 2):
                        value = magic + b"\x00broken body" * k  # decodes only in Triton: its FRAME_ERROR
                    producer.produce(cfg.frames_topic, value, key=b"broken-device", headers=hdrs)
                producer.flush_confirmed()
            finally:
                producer.close()

            preds: dict[str, dict[str, Any]] = {}
            dlq = 0
            follower = TailFollower(cfg, [cfg.predictions_topic, cfg.dlq_topic], window=0)
            try:
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline and (len(preds) < len(truth) or dlq < poison):
                    follower.refresh(timeout=1.0)
                    for rec in follower.poll_batch(2000, 0.5):
                        if rec.topic == cfg.dlq_topic:
                            dlq += 1
                        elif rec.value:
                            p = json.loads(rec.value)
                            preds.setdefault(p["frame_id"], p)
            finally:
                follower.close()
            total_s = time.monotonic() - t0
        finally:
            gateway.stop()
            consumer.stop()
    lat = [p["latency_ms"] for p in preds.values() if p.get("latency_ms") is not None]
    right = [preds[f].get(answer_key) == truth[f] for f in truth if f in preds]
    from tasks.adapters.qdrant import open_vectors

    vectors = open_vectors(create=False, path=str(home / "qdrant"))
    try:
        qdrant_points = vectors.count()
    finally:
        vectors.close()
    versions = sorted({str(p.get("model_version")) for p in preds.values()})
    return {
        "frames": len(truth),
        "gateway_rejected": rejected,
        "throughput_fps": round(len(preds) / total_s, 1) if preds else 0.0,
        "p50_ms": percentile(lat, 50, 2),
        "p95_ms": percentile(lat, 95, 2),
        "accuracy": round(float(np.mean(right)), 4) if right else None,
        "lost": len([f for f in truth if f not in preds]),
        "dlq": dlq,
        "poison_sent": poison,
        "qdrant_points": qdrant_points,
        "model_versions": versions,
        "seconds": round(total_s, 1),
        **({"during": outcome.get("during")} if during is not None else {}),
    }
