"""In-process fakes of the consumer's collaborators (no broker, no Triton, no Qdrant).

``World`` is one fake deployment: a ``frames`` log per partition (``FakeFrames`` is the group
member reading it), a ``FakeProducer`` for ``predictions`` / ``frames.dlq``, a ``FakeVectors`` and a
``FakeBackend`` (which decodes the frames with ``tasks.model.frame_codec``, like Triton's preprocess model,
and answers ``FRAME_ERROR`` for those it cannot use). Every fake appends to ``World.events`` in call
order, and ``World.done`` tells which frames both sinks hold, so a test can check each commit against what
was confirmed at that moment.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from tasks.adapters.kafka import CommitResult, DeliveryError, Incarnation, KafkaConfig, Record
from tasks.config import load_settings
from tasks.contracts.serving import FRAME_ERROR
from tasks.contracts.spec import ModelSpec
from tasks.model import frame_codec
from tasks.model.frames import codec_params, content_type_of, encode_frame
from tasks.serving.consumer import InferenceBackend, InferenceUnavailable, QdrantPolicy, StreamConfig, StreamConsumer
from tasks.serving.consumer.backend import InferenceRejected
from tasks.serving.consumer.records import message_size

RAW = "application/x-raw-uint8"
CAPTURED = dt.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=dt.timezone.utc)
#: 8x8 blocks (aligned with JPEG's) whose grey level 16 * nibble + 8 carries a frame's partition and offset
_BLOCKS = ((0, 0), (0, 8), (0, 16), (8, 0))


def spec_of(name: str = "digits") -> ModelSpec:
    return load_settings().model_spec(name)


def pixels(partition: int, offset: int, spec: ModelSpec | None = None) -> np.ndarray:
    """An image of ``spec`` (default digits) whose blocks say where it came from (``source_of`` reads them back,
    also after JPEG)."""
    spec = spec or spec_of()
    img = np.full(spec.image_shape, 7, np.uint8)
    for (r, c), nibble in zip(_BLOCKS, (partition, offset & 15, (offset >> 4) & 15, (offset >> 8) & 15)):
        img[r:r + 8, c:c + 8] = 16 * nibble + 8
    return img


def source_of(image: np.ndarray) -> tuple[int, int]:
    n = [int(image[r:r + 8, c:c + 8].mean()) // 16 for r, c in _BLOCKS]
    return n[0], n[1] + 16 * n[2] + 256 * n[3]


#: frames the cheap checks pass but Triton's preprocess model rejects (``frame`` kinds)
SERVER_SIDE = ("corrupt_png", "wrong_shape_png")


def frame(topic: str, partition: int, offset: int, *, kind: str = "good", frame_id: str | None = None,
          key: bytes | None = b"device-1", traceparent: bytes | None = None,
          captured_at: str | None = "2026-01-02T03:04:05.678Z", timestamp_ms: int | None = None,
          encoding: str = "raw", spec: ModelSpec | None = None) -> Record:
    """A ``frames`` record of ``spec`` (default digits), ``kind``: good (``encoding`` raw | png | jpeg) |
    missing_id | invalid_id | undecodable (no image signature) | oversize | jpeg (a JPEG with its content type) |
    raw_wrong_size | corrupt_png (PNG signature, broken body) | wrong_shape_png (a PNG 4 pixels too wide)."""
    spec = spec or spec_of()
    raw: list[tuple[str, bytes]] = []
    if kind != "missing_id":
        raw.append(("frame_id", b"not-a-uuid" if kind == "invalid_id" else (frame_id or str(uuid.uuid4())).encode()))
    image = pixels(partition, offset, spec)
    if kind == "undecodable":
        ctype, value = "image/png", b"definitely not a picture"
    elif kind == "oversize":
        ctype, value = "image/png", b"\x89PNG\r\n\x1a\n" + b"x" * spec.frames.max_frame_bytes
    elif kind == "jpeg":
        ctype, value = "image/jpeg", frame_codec.encode(image, "jpeg")
    elif kind == "raw_wrong_size":
        ctype, value = RAW, image.tobytes()[:-16]
    elif kind == "corrupt_png":
        good = frame_codec.encode(image, "png")
        ctype, value = "image/png", good[:40] + bytes(len(good) - 52) + good[-12:]
    elif kind == "wrong_shape_png":
        ctype, value = "image/png", frame_codec.encode(np.pad(image, [(0, 0), (0, 4)] + [(0, 0)] * (image.ndim - 2)),
                                                       "png")
    else:
        ctype, value = content_type_of(encoding), encode_frame(image, spec, encoding)
    raw.append(("content-type", ctype.encode()))
    if captured_at is not None:
        raw.append(("captured_at", captured_at.encode()))
    if traceparent is not None:
        raw.append(("traceparent", traceparent))
    headers: dict[str, bytes] = {}
    for k, v in raw:
        headers.setdefault(k, v)
    return Record(topic=topic, partition=partition, offset=offset, key=key, value=value, headers=headers,
                  raw_headers=raw, timestamp_ms=timestamp_ms)


def outputs(n: int, *, scores: Sequence[float] | None = None, embedding: bool = True, classes: int = 10,
            errors: Mapping[int, bytes] | None = None) -> dict[str, np.ndarray]:
    """Ensemble outputs for ``n`` frames of a model of ``classes`` classes, shaped as Triton returns them;
    ``errors``: row -> its ``FRAME_ERROR`` text (the other rows: ``b""``)."""
    score = np.asarray(scores if scores is not None else [0.95] * n, np.float32).reshape(n, 1)
    ids = np.arange(n, dtype=np.int64)
    out = {
        "LABEL": (ids % classes).reshape(n, 1),
        "SCORE": score,
        "TOPK_LABELS": np.stack([ids % classes, (ids + 1) % classes, (ids + 2) % classes], axis=1),
        "TOPK_SCORES": np.concatenate([score, np.full((n, 2), 0.0123456789, np.float32)], axis=1),
        FRAME_ERROR: np.array([[(errors or {}).get(j, b"")] for j in range(n)], dtype=object).reshape(n, 1),
    }
    if embedding:
        out["EMBEDDING"] = np.arange(n * 4, dtype=np.float32).reshape(n, 4)
    return out


# --------------------------------------------------------------------------- the fakes


class FakeBackend:
    """An ``InferenceBackend`` over encoded frames of ``spec`` (default digits), decoded with ``frame_codec`` like
    Triton's preprocess model: a frame it cannot use gets ``FRAME_ERROR`` ``b"<reason>: <detail>"`` (its source
    is None in ``calls``). ``fail(sources)`` -> True makes that call raise ``InferenceUnavailable``;
    ``reject(sources)`` -> True makes it raise ``InferenceRejected`` (a permanent error), and so does a call
    of more than ``max_batch`` frames (like Triton's "batch-size must be <= N")."""

    def __init__(self, fail: Callable[[list[tuple[int, int]]], bool] | None = None, delay_s: float = 0.0, *,
                 reject: Callable[[list[tuple[int, int]]], bool] | None = None, max_batch: int | None = None,
                 spec: ModelSpec | None = None) -> None:
        self.fail = fail
        self.reject = reject
        self.max_batch = max_batch
        self.delay_s = delay_s
        self.spec = spec or spec_of()
        self.params = codec_params(self.spec)
        self.calls: list[tuple[list[tuple[int, int] | None], bool]] = []  # (frames of the call, succeeded)
        self._lock = threading.Lock()
        self._version = ""

    def infer(self, frames: Sequence[bytes]) -> dict[str, np.ndarray]:
        sources: list[tuple[int, int] | None] = []
        errors: dict[int, bytes] = {}
        for j, value in enumerate(frames):
            try:
                sources.append(source_of(frame_codec.decode(value, self.params)))
            except frame_codec.FrameError as exc:
                sources.append(None)
                errors[j] = str(exc).encode()
        if self.delay_s:
            time.sleep(self.delay_s)
        failed = self.fail is not None and self.fail(sources)
        too_big = self.max_batch is not None and len(frames) > self.max_batch
        rejected = not failed and (too_big or (self.reject is not None and self.reject(sources)))
        with self._lock:
            self.calls.append((sources, not failed and not rejected))
        if failed:
            raise InferenceUnavailable("fake Triton is down")
        if rejected:
            raise InferenceRejected(f"[StatusCode.INVALID_ARGUMENT] batch-size must be <= {self.max_batch}"
                                    if too_big else "[StatusCode.INVALID_ARGUMENT] fake Triton rejects this input")
        return outputs(len(frames), classes=self.spec.num_classes, errors=errors)

    def ready(self) -> bool:
        return True

    @property
    def version(self) -> str:
        return self._version

    served = "7"  # the classifier version Triton serves (a test may deploy another)

    def model_version(self, max_age_s: float = 10.0) -> str:
        self._version = self.served
        return self._version


@dataclass
class FakeTicket:
    messages: list
    pending: int
    failed: list = field(default_factory=list)
    rejected: list = field(default_factory=list)  # (message, error): refused for good


class FakeProducer:
    """A ``ResultSink``: ``wait`` acknowledges the ticket's messages, or fails ``fail_waits`` times first.

    Like librdkafka, a message above ``max_message_bytes`` is refused for good (``ticket.rejected``,
    MSG_SIZE_TOO_LARGE), and so is any message ``refuse(message)`` picks (a broker with a lower limit)."""

    def __init__(self, world: "World", fail_waits: int = 0, max_message_bytes: int = 1_000_000,
                 refuse: Callable[[tuple], bool] | None = None) -> None:
        self.world = world
        self.fail_waits = fail_waits
        self.max_message_bytes = max_message_bytes
        self.refuse = refuse
        self.acked: list[tuple] = []
        self.refused: list[tuple] = []
        self.closed = False

    def produce_batch(self, messages: Sequence[tuple]) -> FakeTicket:
        self.world.event("produce", list(messages))
        ticket = FakeTicket([], 0)
        for m in messages:
            if message_size(m) > self.max_message_bytes:
                self.refused.append(m)
                ticket.rejected.append((m, "KafkaError{code=MSG_SIZE_TOO_LARGE}"))
            else:
                ticket.messages.append(m)
        ticket.pending = len(ticket.messages)
        return ticket

    def wait(self, ticket: FakeTicket, timeout: float = 30.0, give_up: Callable[[], bool] | None = None) -> None:
        if self.fail_waits > 0:
            self.fail_waits -= 1
            ticket.pending, ticket.failed = 0, list(ticket.messages)
            raise DeliveryError(f"{len(ticket.messages)} message(s) not delivered: fake broker down")
        ticket.pending = 0
        ok = []
        for m in ticket.messages:
            if self.refuse is not None and self.refuse(m):
                self.refused.append(m)
                ticket.rejected.append((m, "Broker: Message size too large"))
            else:
                ok.append(m)
        self.acked.extend(ok)
        self.world.event("ack", ok)

    def close(self, timeout: float = 5.0) -> None:
        self.closed = True


class FakeVectors:
    """A ``VectorSink`` that fails ``fail_upserts`` times first."""

    def __init__(self, world: "World", fail_upserts: int = 0) -> None:
        self.world = world
        self.fail_upserts = fail_upserts
        self.points: dict[str, Any] = {}

    def upsert_predictions(self, points: Iterable[Any]) -> int:
        points = list(points)
        if self.fail_upserts > 0:
            self.fail_upserts -= 1
            raise RuntimeError("fake Qdrant is down")
        for p in points:
            self.points[p.frame_id] = p
        self.world.event("upsert", [p.frame_id for p in points])
        return len(points)


class FakeFrames:
    """A ``FrameSource`` over ``World.log``, assigned every partition on the first poll.

    ``leak_when_paused``: records handed out by the first poll after ``pause()`` (librdkafka returns what it
    had fetched before the pause took effect). ``revoke_at``: ``{poll number: [partitions]}`` revoked then
    (moved to another member for good). ``commit`` keeps only assigned partitions, like ``BatchConsumer``.
    """

    def __init__(self, world: "World", on_assign: Callable | None, on_revoke: Callable | None, *,
                 leak_when_paused: int = 0, revoke_at: Mapping[int, list[tuple[str, int]]] | None = None) -> None:
        self.world = world
        self.on_assign, self.on_revoke = on_assign, on_revoke
        self.leak_when_paused = leak_when_paused
        self.revoke_at = dict(revoke_at or {})
        self.positions = {(world.topic, p): 0 for p in world.log}
        self._assignment: set[tuple[str, int]] = set()
        self._paused = False
        self._leaked = False
        self.assigned_once = False
        self.in_group = False
        self.polls = 0
        self.committed: dict[tuple[str, int], int] = {}
        self.committed_in: dict[tuple[int, tuple[str, int]], int] = {}  # (log generation, partition) -> offset
        self.closed = False

    @property
    def assignment(self) -> list[tuple[str, int]]:
        return sorted(self._assignment)

    @property
    def paused(self) -> bool:
        return self._paused

    def _take(self, n: int) -> list[Record]:
        out: list[Record] = []
        for tp in sorted(self._assignment):
            log = self.world.log[tp[1]]
            while len(out) < n and self.positions[tp] < len(log):
                out.append(log[self.positions[tp]])
                self.positions[tp] += 1
        return out

    def poll_batch(self, max_messages: int, timeout: float) -> list[Record]:
        self.polls += 1
        if not self.assigned_once:
            self._assignment = set(self.positions)
            self.assigned_once = self.in_group = True
            if self.on_assign:
                self.on_assign(sorted(self._assignment))
        if self.polls in self.revoke_at:
            gone = self.revoke_at.pop(self.polls)
            self.world.event("revoke", gone)
            if self.on_revoke:
                self.on_revoke(gone)
            self._assignment -= set(gone)
        if self._paused:
            if self.leak_when_paused and not self._leaked:
                self._leaked = True
                got = self._take(self.leak_when_paused)
                self.world.event("leaked", [(r.partition, r.offset) for r in got])
                return got
            time.sleep(min(timeout, 0.002))
            return []
        got = self._take(max_messages)
        if got:
            self.world.event("poll", [(r.partition, r.offset) for r in got])
        else:
            time.sleep(min(timeout, 0.002))
        return got

    def pause(self) -> None:
        self._paused = True
        self.world.event("pause", None)

    def resume(self) -> None:
        self._paused = False
        self.world.event("resume", None)

    def rewind(self, offsets: Mapping[tuple[str, int], int]) -> None:
        self.world.event("rewind", dict(offsets))
        for tp, off in offsets.items():
            if tp in self._assignment:
                self.positions[tp] = off

    def reposition(self) -> dict[tuple[str, int], int]:
        """The log was replaced: read on from the committed offsets of the current log (none: the start)."""
        gen = self.world.generation
        out = {tp: self.committed_in.get((gen, tp), 0) for tp in self._assignment}
        self.positions.update(out)
        self.world.event("reposition", dict(out))
        return out

    def commit(self, offsets: Mapping[tuple[str, int], int], asynchronous: bool = False) -> CommitResult:
        kept = {tp: o for tp, o in offsets.items() if tp in self._assignment}
        for tp, o in kept.items():
            self.committed_in[(self.world.generation, tp)] = o
        if kept:
            self.world.check_commit(kept)
            self.committed.update(kept)
            self.world.event("commit", (kept, asynchronous))
        return CommitResult(ok=True, retriable=False)

    def lag(self) -> dict[tuple[str, int], int]:
        return {}

    def close(self) -> None:
        self.closed = True
        self.world.event("close", None)


class FakeStore:
    """An ``OriginalStore`` in memory; fails ``fail_puts`` times first."""

    def __init__(self, fail_puts: int = 0) -> None:
        self.objects: dict[str, bytes] = {}
        self.fail_puts = fail_puts

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        if self.fail_puts > 0:
            self.fail_puts -= 1
            raise OSError("fake store down")
        self.objects[key] = bytes(data)


class FakeWatch:
    """A ``BrokerWatch`` over ``World``: the topic id changes with ``World.reincarnate``."""

    def __init__(self, world: "World") -> None:
        self.world = world

    def incarnation(self, timeout: float = 2.0) -> Incarnation:
        return Incarnation(cluster_id="fake-cluster", topic_ids=((self.world.topic, f"id-{self.world.generation}"),))


class World:
    """One fake deployment: ``partitions`` logs of ``frames`` records and the fakes around them."""

    def __init__(self, log: Mapping[int, list[Record]], kafka: KafkaConfig | None = None) -> None:
        self.kafka = kafka or KafkaConfig(topic_prefix="unit-")
        self.topic = self.kafka.frames_topic
        self.log = {p: list(recs) for p, recs in log.items()}
        self.events: list[tuple[str, Any]] = []
        self.producer = FakeProducer(self)
        self.vectors: FakeVectors | None = FakeVectors(self)
        self.frames: FakeFrames | None = None
        self.frames_options: dict[str, Any] = {}
        self.violations: list[str] = []
        self.generation = 0  # the broker's incarnation (``reincarnate``)
        self.consumers: list[FakeFrames] = []
        self._lock = threading.Lock()

    def reincarnate(self, log: Mapping[int, list[Record]]) -> None:
        """The broker lost its log and came back with ``log`` (fresh offsets, fresh topic id)."""
        with self._lock:
            self.log = {p: list(recs) for p, recs in log.items()}
            self.generation += 1
            self.events.append(("reincarnate", self.generation))

    def watch_factory(self, kafka: KafkaConfig, topics: list[str]) -> FakeWatch:
        return FakeWatch(self)

    @classmethod
    def with_frames(cls, partitions: int, per_partition: int, poison: Mapping[tuple[int, int], str] | None = None,
                    *, encoding: str = "raw", spec: ModelSpec | None = None) -> "World":
        """``partitions`` logs of good frames (``encoding``) of ``spec``, but ``poison``: (partition, offset) ->
        a ``frame`` kind."""
        kafka = KafkaConfig(topic_prefix="unit-")
        poison = dict(poison or {})
        return cls({p: [frame(kafka.frames_topic, p, o, kind=poison.get((p, o), "good"), encoding=encoding, spec=spec)
                        for o in range(per_partition)] for p in range(partitions)}, kafka)

    def event(self, kind: str, data: Any) -> None:
        with self._lock:
            self.events.append((kind, data))

    # the factories StreamConsumer takes
    def consumer_factory(self, kafka: KafkaConfig, group_id: str, topics: list[str], *, on_assign: Callable,
                         on_revoke: Callable, stats_interval_ms: int, **overrides: Any) -> FakeFrames:
        assert topics == [self.topic]
        self.frames = FakeFrames(self, on_assign, on_revoke, **self.frames_options)
        self.consumers.append(self.frames)
        return self.frames

    def producer_factory(self, kafka: KafkaConfig) -> FakeProducer:
        return self.producer

    # what both sinks hold
    def done(self) -> set[tuple[int, int]]:
        """(partition, offset) of every frame whose prediction (and point) or dead letter both sinks hold."""
        fid_at = {rec.headers["frame_id"].decode(): (rec.partition, rec.offset)
                  for recs in self.log.values() for rec in recs if "frame_id" in rec.headers}
        upserted = set(self.vectors.points) if self.vectors is not None else None
        out: set[tuple[int, int]] = set()
        for topic, _value, key, headers in self.producer.acked:
            if topic == self.kafka.dlq_topic:
                h = dict(headers)
                out.add((int(h["source_partition"]), int(h["source_offset"])))
            elif topic == self.kafka.predictions_topic:
                fid = key.decode()
                if fid in fid_at and (upserted is None or fid in upserted):  # (not a frame of an earlier log)
                    out.add(fid_at[fid])
        return out

    def check_commit(self, offsets: Mapping[tuple[str, int], int]) -> None:
        """Every frame below a committed offset must be in both sinks at the moment of the commit."""
        done = self.done()
        for (_topic, p), off in offsets.items():
            missing = [o for o in range(off) if (p, o) not in done]
            if missing:
                self.violations.append(f"commit of partition {p} at {off} before frames {missing[:5]} were in "
                                       "both sinks")

    def commits(self) -> list[tuple[dict[tuple[str, int], int], bool]]:
        return [data for kind, data in self.events if kind == "commit"]


# --------------------------------------------------------------------------- driving the loop


def loop_config(**kw) -> StreamConfig:
    """A StreamConfig for the loop against the fakes: small batches, fast backoff, no HTTP server."""
    base = dict(max_batch=8, max_wait_ms=2, inflight=2, http_port=None, create_topics=False, exit_when_idle_s=0.05,
                backoff_initial_s=0.005, backoff_max_s=0.02, drain_timeout_s=2.0, commit_interval_ms=0,
                qdrant_policy=QdrantPolicy.parse("all"))
    base.update(kw)
    return StreamConfig(**base)


def consumer(world: World, backend: InferenceBackend, cfg: StreamConfig, **kw) -> StreamConsumer:
    return StreamConsumer(world.kafka, cfg, backend=backend, vectors=world.vectors,
                          consumer_factory=world.consumer_factory, producer_factory=world.producer_factory, **kw)


def run(c: StreamConsumer, limit_s: float = 5.0) -> dict:
    """``c.run()``, stopped after ``limit_s`` should it not exit by itself (a hung test fails, it does not hang)."""
    timer = threading.Timer(limit_s, c.stop)
    timer.start()
    try:
        return c.run()
    finally:
        timer.cancel()


def everything(world: World) -> set[tuple[int, int]]:
    return {(p, o) for p, recs in world.log.items() for o in range(len(recs))}
