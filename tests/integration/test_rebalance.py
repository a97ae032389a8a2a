"""Horizontal scaling: two consumers of one group over the partitioned ``frames`` topic, a steady stream, a member
joining in the middle and one leaving (cooperative-sticky assignment on the real Tansu broker, the real Triton).

The two members run as two ``StreamConsumer`` instances in this process and share one ``VectorStore`` (Qdrant's
local mode allows one process per path; a Qdrant server would be shared by consumer processes instead).

Asserted: every frame has a prediction; Qdrant holds exactly one point per frame (point id = frame id, so a frame
re-read by the new owner of its partition is no second point); the group's commits cover the whole stream; the
first member kept consuming through the join (incremental rebalance: it never held no partition) and both did work.
"""

from __future__ import annotations

import gc
import threading
import time
import uuid
from collections import Counter

import pytest

from tasks.adapters.kafka import BusProducer, committed_offsets
from tasks.adapters.qdrant import open_vectors
from tasks.local.procs import wait_until
from tasks.serving.consumer import QdrantPolicy, StreamConfig, StreamConsumer
from tasks.serving.consumer.backend import TritonBackend
from tests.support.stream import digit_images, frame_headers, png, read_topic
from tests.support.triton import MODEL_NAME, triton_server  # noqa: F401 - fixture

pytestmark = pytest.mark.timeout(120)

RATE = 150  # frames/s, steady
DEVICES = [f"cam-{d}".encode() for d in range(8)]  # keys spread the frames over the partitions


class Member:
    """One ``StreamConsumer`` run in a thread, its assignment sampled every 20 ms."""

    def __init__(self, name: str, kafka, triton_url: str, vectors, group: str) -> None:
        self.name = name
        cfg = StreamConfig(group_id=group, model=MODEL_NAME, triton_url=triton_url, max_batch=64, max_wait_ms=5,
                           qdrant_policy=QdrantPolicy.parse("all"), http_port=None,
                           # 10 s, not the suite's 2 s: on two loaded cores a heartbeat can be late by more
                           # than 2 s, and a member expelled for it holds no partition for a reason that is not
                           # the assignment strategy under test (members leave here by closing, at once)
                           session_timeout_ms=10_000, commit_interval_ms=100, drain_timeout_s=5.0)
        self.backend = TritonBackend(triton_url, MODEL_NAME, timeout_s=10.0, concurrency=4)
        self.consumer = StreamConsumer(kafka, cfg, backend=self.backend, vectors=vectors)
        self.stats: dict = {}
        self.samples: list[tuple[float, int]] = []  # (monotonic, partitions held)
        self.stop_requested_at: float | None = None
        self._thread = threading.Thread(target=self._run, name=f"member-{name}", daemon=True)
        self._sampler = threading.Thread(target=self._sample, name=f"sample-{name}", daemon=True)
        self._done = threading.Event()

    def _run(self) -> None:
        try:
            self.stats = self.consumer.run()
        finally:
            self._done.set()

    def _sample(self) -> None:
        while not self._done.wait(0.02):
            c = self.consumer._consumer
            if c is not None:
                try:
                    self.samples.append((time.monotonic(), len(c.assignment)))
                except RuntimeError:  # the set changed while sorted: next sample
                    pass

    def start(self) -> "Member":
        self._thread.start()
        self._sampler.start()
        return self

    def partitions(self) -> int:
        c = self.consumer._consumer
        return len(c.assignment) if c is not None else 0

    def stop(self, timeout: float = 20.0) -> None:
        self.stop_requested_at = time.monotonic()
        self.consumer.stop()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"member {self.name} did not stop within {timeout}s"
        self._sampler.join(2)
        self.backend.close()


def _stream(kafka, stop: threading.Event, sent: list[str]) -> None:
    """~RATE frames/s until ``stop``: the steady stream the rebalances happen in."""
    frames = [png(img) for img in digit_images(16)]
    producer = BusProducer(kafka)
    try:
        t0, n = time.monotonic(), 0
        while not stop.is_set():
            due = int((time.monotonic() - t0) * RATE)
            while n < due:
                fid = str(uuid.uuid4())
                producer.produce(kafka.frames_topic, frames[n % len(frames)], key=DEVICES[n % len(DEVICES)],
                                 headers=frame_headers(fid))
                sent.append(fid)
                n += 1
            time.sleep(0.01)
        producer.flush_confirmed(timeout=15)
    finally:
        producer.close()


def test_a_member_joins_and_one_leaves_mid_stream_nothing_lost_no_duplicate_points(kafka_cfg, triton_server,  # noqa: F811
                                                                                   tmp_path):
    from tasks.config import load_settings

    spec = load_settings().model_spec(MODEL_NAME)
    group = f"rebalance-{uuid.uuid4().hex[:6]}"
    threshold = gc.get_threshold()
    sent: list[str] = []
    stop_stream = threading.Event()
    vectors = open_vectors(path=str(tmp_path / "qdrant"), size=spec.embedding_dim)
    a = b = None
    try:
        streamer = threading.Thread(target=_stream, args=(kafka_cfg, stop_stream, sent), daemon=True)
        streamer.start()
        a = Member("a", kafka_cfg, triton_server.grpc_url, vectors, group).start()
        wait_until(lambda: a.partitions() == kafka_cfg.partitions and a.consumer.stats["predicted"] > 0, 30,
                   "member a holds every partition and predicts")
        joined_at = time.monotonic()
        b = Member("b", kafka_cfg, triton_server.grpc_url, vectors, group).start()  # joins mid-stream
        wait_until(lambda: b.partitions() > 0 and b.consumer.stats["predicted"] > 0, 30, "member b gets partitions")
        assert 0 < a.partitions() < kafka_cfg.partitions  # the partitions were shared, not all moved
        a_after_join = a.consumer.stats["predicted"]
        time.sleep(1.0)
        assert a.consumer.stats["predicted"] > a_after_join  # a kept predicting while b joined
        a.stop()  # leaves mid-stream: b takes its partitions over
        wait_until(lambda: b.partitions() == kafka_cfg.partitions, 30, "member b takes every partition over")
        time.sleep(1.0)  # b consumes the moved partitions in the steady stream
        stop_stream.set()
        streamer.join(30)
        assert not streamer.is_alive() and len(sent) > 600
        expected = set(sent)
        wait_until(lambda: vectors.count() >= len(expected), 40, "every frame indexed")
        recs = read_topic(kafka_cfg, kafka_cfg.predictions_topic,
                          lambda r: expected <= {x.header("frame_id") for x in r}, timeout=40)
        b.stop()
        b_stats = b.stats
    finally:
        stop_stream.set()
        for m in (a, b):
            if m is not None and m._thread.is_alive():
                m.stop()
        gc.unfreeze()  # StreamConsumer.run tunes the collector for its process: give the test process its own back
        gc.set_threshold(*threshold)

    predicted = Counter(r.header("frame_id") for r in recs)
    assert set(predicted) >= expected, f"{len(expected - set(predicted))} frame(s) have no prediction"
    # one point per frame: re-read frames (the partitions that moved) upserted the same point again
    ids = vectors.all_ids()
    assert vectors.count() == len(ids) == len(set(ids)) == len(expected) and set(ids) == expected
    vectors.close()

    # the commits cover the stream: per partition, the group's offset is the partition's end
    frames = read_topic(kafka_cfg, kafka_cfg.frames_topic, lambda r: len(r) >= len(expected), timeout=20)
    ends: dict[int, int] = {}
    for r in frames:
        ends[r.partition] = max(ends.get(r.partition, 0), r.offset + 1)
    assert committed_offsets(kafka_cfg, group, kafka_cfg.frames_topic) == ends

    # cooperative-sticky: a never gave up every partition between its first assignment and its stop
    held = [n for t, n in a.samples if joined_at - 1.0 <= t < (a.stop_requested_at or 0)]
    # under xdist load the first samples can predate a's (re)assignment: judge from its first held partition on;
    # "a kept predicting while b joined" above is the cooperative property's direct check
    first = next((i for i, n in enumerate(held) if n > 0), len(held))
    held = held[first:]
    assert held and sum(n > 0 for n in held) >= 0.95 * len(held), \
        "member a held no partition for most of the join (an eager rebalance)"
    assert a.stats["predicted"] > 0 and b_stats["predicted"] > 0
    assert a.stats["predicted"] + b_stats["predicted"] >= len(expected)
    assert a.stats["commits"] > 0 and b_stats["commits"] > 0
