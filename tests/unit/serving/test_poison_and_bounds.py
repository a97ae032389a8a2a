"""No poison pill, no endless hold, no offsets of a lost log: the consumer loop against the fakes (fakes.py).

* sizes: a dead letter or a prediction never exceeds the producer's ``message.max.bytes`` (the fake producer
  refuses larger ones like librdkafka); an oversize original is stored, the dead letter points at it;
* Triton's permanent errors: a rejected batch is bisected to the frame at fault (``inference_failed``), a model
  that rejects every frame holds the batch for ``reject_hold_s`` at most; a too-large request is split;
* messages the broker refuses for good are replaced, never retried as they are;
* a broker that lost its log: nothing confirmed before is committed to the new one, the loop re-joins;
* readiness: false with no partitions, paused, or without acknowledgements.
"""

from __future__ import annotations

import json
import threading
import time


from tasks.adapters.kafka import Incarnation, Record
from tasks.contracts.layout import dlq_original_prefix
from tasks.contracts.messages import DEFAULT_MAX_MESSAGE_BYTES, R_INFERENCE_FAILED, R_OVERSIZE_HEADERS
from tasks.serving.consumer import StreamConfig
from tasks.serving.consumer.backend import InferenceRejected, is_permanent
from tasks.serving.consumer.bisect import bisect_infer
from tasks.serving.consumer.records import check_frames, dead_letter_records, message_size
from tests.unit.serving.fakes import (FakeBackend, FakeStore, World, consumer, everything, frame, loop_config, outputs,
                                      run, spec_of)

MB2 = 2_000_000




def config(**kw) -> StreamConfig:
    return loop_config(**{"broker_check_s": 0.0, **kw})  # the broker-incarnation tests turn it on


def dead_letters(world: World) -> dict[tuple[int, int], dict[str, bytes]]:
    out = {}
    for topic, value, key, headers in world.producer.acked:
        if topic == world.kafka.dlq_topic:
            h = dict(headers)
            out[(int(h["source_partition"]), int(h["source_offset"]))] = {**h, "__value__": value, "__key__": key}
    return out


def big(rec: Record, *, value: bytes | None = None, header: tuple[str, bytes] | None = None,
        key: bytes | None = None) -> Record:
    raw = list(rec.raw_headers) + ([header] if header else [])
    headers: dict[str, bytes] = {}
    for k, v in raw:
        headers.setdefault(k, v)
    return Record(topic=rec.topic, partition=rec.partition, offset=rec.offset, key=key if key is not None else rec.key,
                  value=value if value is not None else rec.value, headers=headers, raw_headers=raw)


# --------------------------------------------------------------------------- pure: the size bounds


def test_dead_letters_stay_below_the_message_limit_and_say_what_they_dropped():
    topic = "unit-frames"
    huge_value = big(frame(topic, 0, 3), value=b"\x89PNG" + b"\x00" * MB2)
    huge_header = big(frame(topic, 1, 4), header=("junk", b"j" * MB2))
    huge_key = big(frame(topic, 2, 5), key=b"k" * 5000)
    records = [huge_value, huge_header, huge_key]
    from tasks.contracts.messages import FrameRejected

    rejected = [(i, FrameRejected("oversize", "too big")) for i in range(3)]
    stored = {0: dlq_original_prefix(topic, 0, 3), 1: dlq_original_prefix(topic, 1, 4)}
    msgs = dead_letter_records(records, rejected, dlq_topic="unit-frames.dlq", processed_iso="2026-01-01T00:00:00Z",
                               max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES, stored=stored)
    assert all(message_size(m) <= DEFAULT_MAX_MESSAGE_BYTES for m in msgs)
    (_, v0, k0, h0), (_, v1, _, h1), (_, _, k2, h2) = msgs
    h0, h1, h2 = dict(h0), dict(h1), dict(h2)
    assert v0 == b"" and h0["original"] == b"dlq/unit-frames/0/3/" and h0["original_bytes"] == str(MB2 + 4).encode()
    assert k0 == b"device-1" and h0["frame_id"] == huge_value.headers["frame_id"]  # small parts kept
    assert v1 == huge_header.value and "junk" not in h1 and h1["headers_dropped"] == f"junk:{MB2}".encode()
    assert h1["original"] == b"dlq/unit-frames/1/4/"
    assert k2 is None and h2["headers_dropped"] == b"<key>:5000"
    # a lower limit: the value no longer fits either
    small = dead_letter_records([huge_header], [(0, FrameRejected("oversize", "x"))], dlq_topic="d",
                                processed_iso="t", max_message_bytes=4096)
    assert message_size(small[0]) <= 4096 and small[0][1] == b""


def test_frames_with_oversize_headers_or_key_are_rejected_before_decoding():
    topic = "unit-frames"
    recs = [frame(topic, 0, 0), big(frame(topic, 0, 1), header=("junk", b"j" * 20_000)),
            big(frame(topic, 0, 2), key=b"d" * 2000), frame(topic, 0, 3)]
    d = check_frames(recs, spec_of())
    assert d.good == [0, 3]
    assert [(i, r.reason) for i, r in d.rejected] == [(1, R_OVERSIZE_HEADERS), (2, R_OVERSIZE_HEADERS)]


# --------------------------------------------------------------------------- pure: bisection


def test_bisect_finds_the_frames_at_fault_in_few_calls():
    frames = [frame("t", 0, o).value for o in range(16)]
    bad = {3, 12}
    calls = []

    def infer(batch):
        calls.append(len(batch))
        if any(frames[j] in batch for j in bad):
            raise InferenceRejected("INVALID_ARGUMENT")
        return outputs(len(batch))

    found = bisect_infer(infer, frames, "first")
    assert [j for j, _ in found.failed] == [3, 12]
    assert found.ok == [j for j in range(16) if j not in bad]
    assert len(found.outputs["LABEL"]) == 14 and found.calls == len(calls) <= 2 * 16 - 2


def test_only_non_unavailability_triton_errors_are_permanent():
    from tritonclient.utils import InferenceServerException

    from tasks.adapters.triton import TritonError

    def wrapped(status: str, unreachable: bool = False) -> TritonError:
        err = TritonError("x", unreachable=unreachable)
        err.__cause__ = InferenceServerException("msg", status=status)
        return err

    assert is_permanent(wrapped("StatusCode.INVALID_ARGUMENT"))
    assert is_permanent(wrapped("StatusCode.INTERNAL"))
    for status in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.NOT_FOUND"):
        assert not is_permanent(wrapped(status)), status
    assert not is_permanent(wrapped("StatusCode.INVALID_ARGUMENT", unreachable=True))
    assert not is_permanent(ConnectionError("refused"))


# --------------------------------------------------------------------------- the loop


def test_oversize_value_and_header_are_dead_lettered_with_the_original_stored():
    world = World.with_frames(partitions=1, per_partition=12)
    log = world.log[0]
    log[4] = big(log[4], value=b"\x89PNG" + b"\x01" * MB2)
    log[7] = big(log[7], header=("junk", b"j" * MB2))
    store = FakeStore(fail_puts=1)  # the first put fails: retried
    c = consumer(world, FakeBackend(), config(), store=store)
    stats = run(c)
    assert world.violations == [] and world.done() == everything(world)
    assert world.producer.refused == []  # nothing produced was above the limit
    assert all(message_size(m) <= DEFAULT_MAX_MESSAGE_BYTES for m in world.producer.acked)
    dl = dead_letters(world)
    assert set(dl) == {(0, 4), (0, 7)}
    assert dl[(0, 4)]["reason"] == b"oversize" and dl[(0, 4)]["__value__"] == b""
    prefix = dlq_original_prefix(world.topic, 0, 4)
    assert dl[(0, 4)]["original"] == prefix.encode() and store.objects[prefix + "value"] == log[4].value
    assert json.loads(store.objects[prefix + "record.json"])["offset"] == 4
    assert dl[(0, 7)]["reason"] == R_OVERSIZE_HEADERS.encode() and dl[(0, 7)]["headers_dropped"] == f"junk:{MB2}".encode()
    assert dl[(0, 7)]["__value__"] == log[7].value  # the value fits: it stays on the dead letter
    assert stats["predicted"] == 10 and stats["dead_letter"] == 2
    assert world.frames.committed == {(world.topic, 0): 12}


def test_a_store_that_keeps_failing_is_a_bound_not_a_hold():
    world = World.with_frames(partitions=1, per_partition=6)
    world.log[0][2] = big(world.log[0][2], value=b"\x89PNG" + b"\x01" * MB2)
    c = consumer(world, FakeBackend(), config(store_attempts=2), store=FakeStore(fail_puts=100))
    run(c)
    assert world.done() == everything(world) and world.frames.committed == {(world.topic, 0): 6}
    dl = dead_letters(world)[(0, 2)]
    assert dl["__value__"] == b"" and "original" not in dl and dl["original_bytes"] == str(MB2 + 4).encode()
    assert 'mlpipe_consumer_bounds_hit_total{bound="store_original"} 1.0' in c.metrics.render().decode()


def test_a_permanently_rejected_batch_is_bisected_to_the_frame_at_fault():
    world = World.with_frames(partitions=2, per_partition=16)
    poison = {(0, 5), (1, 9)}
    backend = FakeBackend(reject=lambda sources: any(s in poison for s in sources))
    c = consumer(world, backend, config())
    stats = run(c)
    assert world.violations == [] and world.done() == everything(world)
    dl = dead_letters(world)
    assert set(dl) == poison and {d["reason"] for d in dl.values()} == {R_INFERENCE_FAILED.encode()}
    assert stats["predicted"] == 30 and stats["triton_errors"] == 0
    assert world.frames.committed == {(world.topic, 0): 16, (world.topic, 1): 16}
    # each poison frame was tried alone, and no call was repeated as it was
    alone = [sources for sources, ok in backend.calls if len(sources) == 1 and not ok]
    assert sorted(s[0] for s in alone) == sorted(poison)
    assert 'mlpipe_consumer_inference_rejected_total 2.0' in c.metrics.render().decode()


def test_a_model_smaller_than_the_micro_batch_is_split_not_retried_forever():
    world = World.with_frames(partitions=1, per_partition=32)
    backend = FakeBackend(max_batch=3)
    stats = run(consumer(world, backend, config()))
    assert world.done() == everything(world) and stats["predicted"] == 32 and stats["dead_letter"] == 0
    assert all(len(sources) <= 3 for sources, ok in backend.calls if ok)


def test_a_model_that_rejects_every_frame_holds_the_batch_for_a_bounded_time():
    world = World.with_frames(partitions=1, per_partition=3)
    backend = FakeBackend(reject=lambda sources: True)
    c = consumer(world, backend, config(reject_hold_s=0.2, max_batch=3))
    t0 = time.monotonic()
    stats = run(c)
    assert time.monotonic() - t0 < 3.0
    assert set(dead_letters(world)) == everything(world) and stats["dead_letter"] == 3
    assert stats["triton_errors"] >= 1  # held (paused, backoff) before the bound
    assert 'mlpipe_consumer_bounds_hit_total{bound="inference_rejected"} 1.0' in c.metrics.render().decode()
    assert world.frames.committed == {(world.topic, 0): 3}


def test_a_prediction_the_broker_refuses_becomes_a_dead_letter_and_then_is_dropped_at_worst():
    world = World.with_frames(partitions=1, per_partition=8)
    victim = world.log[0][3].headers["frame_id"]
    world.producer.refuse = lambda m: m[0] == world.kafka.predictions_topic and m[2] == victim
    c = consumer(world, FakeBackend(), config())
    run(c)
    dl = dead_letters(world)
    assert set(dl) == {(0, 3)} and dl[(0, 3)]["reason"] == b"undeliverable"
    assert victim not in world.vectors.points  # its point was not written without its prediction
    assert world.frames.committed == {(world.topic, 0): 8}
    # a broker that refuses everything about one frame: replaced twice, then dropped; the stream goes on
    world2 = World.with_frames(partitions=1, per_partition=8)
    victim2 = world2.log[0][5].headers["frame_id"]
    world2.producer.refuse = lambda m: m[2] == victim2 or dict(m[3]).get("source_offset") == b"5"
    c2 = consumer(world2, FakeBackend(), config())
    stats = run(c2)
    assert stats["dropped"] == 1 and world2.frames.committed == {(world2.topic, 0): 8}
    assert 'mlpipe_consumer_bounds_hit_total{bound="undeliverable"} 1.0' in c2.metrics.render().decode()


def test_a_broker_that_lost_its_log_gets_no_offset_of_the_old_one():
    world = World.with_frames(partitions=2, per_partition=20)
    new_log = {0: [frame(world.topic, 0, o) for o in range(10)], 1: []}  # nothing new on partition 1
    c = consumer(world, FakeBackend(), config(broker_check_s=0.01, exit_when_idle_s=0.5), watch_factory=world.watch_factory)
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(run(c, limit_s=8.0)))
    t.start()
    deadline = time.monotonic() + 5
    while world.frames is None or world.frames.committed != {(world.topic, 0): 20, (world.topic, 1): 20}:
        assert time.monotonic() < deadline, world.events[-5:]
        time.sleep(0.005)
    first = world.frames
    world.reincarnate(new_log)
    t.join(10)
    assert not t.is_alive()
    assert result["broker_resets"] == 1 and world.consumers == [first]
    reborn = [i for i, (kind, _) in enumerate(world.events) if kind == "reincarnate"][0]
    assert [data for kind, data in world.events[reborn:] if kind == "reposition"] == [
        {(world.topic, 0): 0, (world.topic, 1): 0}]  # read the new log from its start
    after = [data[0] for kind, data in world.events[reborn:] if kind == "commit"]
    assert after and all(off <= len(new_log[p]) for offsets in after for (_, p), off in offsets.items()), after
    assert {tp: o for (gen, tp), o in first.committed_in.items() if gen == 1} == {(world.topic, 0): 10}
    assert result["predicted"] == 50
    assert 'mlpipe_consumer_broker_resets_total{reason="topic_recreated"} 1.0' in c.metrics.render().decode()


def test_offsets_going_back_mean_a_new_log():
    world = World.with_frames(partitions=1, per_partition=10)
    c = consumer(world, FakeBackend(), config())
    c._check_positions([frame(world.topic, 0, 7)])
    assert c._reset_reason is None
    c._check_positions([frame(world.topic, 0, 8), frame(world.topic, 0, 9)])
    assert c._reset_reason is None
    c._check_positions([frame(world.topic, 0, 0)])
    assert c._reset_reason and "went back" in c._reset_reason


def test_incarnation_changes():
    base = Incarnation("c1", (("f", "id1"), ("p", None)))
    assert Incarnation("c1", (("f", "id1"), ("p", "x"))).changed_from(base) is None  # a missing topic appeared
    assert "re-created" in Incarnation("c1", (("f", "id2"), ("p", None))).changed_from(base)
    assert "gone" in Incarnation("c1", (("f", None), ("p", None))).changed_from(base)
    assert "cluster id" in Incarnation("c2", (("f", "id1"), ("p", None))).changed_from(base)
    assert Incarnation("c1", (("f", ""), ("p", None))).changed_from(base) is None  # no topic ids: no verdict


def test_readiness_needs_partitions_no_pause_and_acknowledgements():
    world = World.with_frames(partitions=1, per_partition=1)
    c = consumer(world, FakeBackend(), config())
    c._triton_ready = True
    assert c.ready()[0] is False  # no consumer yet
    c._open()
    frames = world.frames
    assert c.ready()[0] is False and c.ready()[1]["partitions"] == 0  # not assigned yet
    frames.poll_batch(1, 0)
    assert c.ready()[0] is True
    frames.pause()
    assert c.ready()[0] is False and c.ready()[1]["paused"]
    frames.resume()
    c._set_acks_failing(True)
    assert c.ready()[0] is False and c.ready()[1]["acks_ok"] is False
    c._set_acks_failing(False)
    c._broker_state = "changed"
    assert c.ready()[0] is False


def test_an_outage_longer_than_the_hold_bound_dead_letters_the_held_batch_only():
    world = World.with_frames(partitions=1, per_partition=12)
    backend = FakeBackend(lambda sources: any(o >= 4 for _, o in sources))  # down after the first batch
    c = consumer(world, backend, config(max_batch=4, inflight=1, max_hold_s=0.15), )
    stats = run(c, limit_s=8.0)
    dl = dead_letters(world)
    assert set(dl) == {(0, o) for o in range(4, 12)} and {d["reason"] for d in dl.values()} == {b"inference_unavailable"}
    assert stats["predicted"] == 4 and world.frames.committed == {(world.topic, 0): 12}
    assert 'mlpipe_consumer_bounds_hit_total{bound="triton_hold"} 2.0' in c.metrics.render().decode()
    # without the bound (0) the held frames wait: nothing past them is committed
    world2 = World.with_frames(partitions=1, per_partition=8)
    c2 = consumer(world2, FakeBackend(lambda sources: any(o >= 4 for _, o in sources)),
                  config(max_batch=4, inflight=1, max_hold_s=0.0, exit_when_idle_s=None))
    run(c2, limit_s=0.6)
    assert world2.frames.committed == {(world2.topic, 0): 4} and dead_letters(world2) == {}


def test_a_qdrant_that_keeps_failing_is_given_up_after_the_hold_bound():
    world = World.with_frames(partitions=1, per_partition=8)
    world.vectors.fail_upserts = 10_000
    c = consumer(world, FakeBackend(), config(max_hold_s=0.1))
    stats = run(c)
    assert stats["predicted"] == 8 and world.frames.committed == {(world.topic, 0): 8}
    assert len([m for m in world.producer.acked if m[0] == world.kafka.predictions_topic]) == 8
    assert 'mlpipe_consumer_bounds_hit_total{bound="qdrant_hold"}' in c.metrics.render().decode()


def test_the_version_label_follows_a_deploy_at_the_next_answer():
    world = World.with_frames(partitions=1, per_partition=24)

    class Deploying(FakeBackend):
        def infer(self, frames):
            out = super().infer(frames)
            if len(self.calls) == 2:
                self.served = "8"  # deployed while the second batch was answered
            return out

    c = consumer(world, Deploying(), config(max_batch=8, inflight=1, version_max_age_s=0.0))
    run(c)
    versions = [json.loads(v)["model_version"] for t, v, _, _ in world.producer.acked
                if t == world.kafka.predictions_topic]
    # read after each answer, not the health thread's value of up to 2 s ago
    assert versions == ["7"] * 8 + ["8"] * 16


def test_the_version_label_is_cached_at_most_version_max_age_s():
    """The consumer's default reads the served version at most every 0.25 s (one lookup per answer is a gRPC
    call per micro-batch); TritonBackend.model_version asks Triton again only once the age has passed."""
    from tasks.serving.consumer.backend import TritonBackend

    assert StreamConfig().version_max_age_s == 0.25

    class Index:  # a fake of the client's one call used here
        def __init__(self):
            self.calls, self.versions = 0, [7]

        def ready_versions(self, name):
            self.calls += 1
            return list(self.versions)

    backend = TritonBackend("127.0.0.1:1", "digits")  # never connects: only the version lookup is used
    backend.refresh_config = lambda: backend.chunk  # no config read in this test
    index = Index()
    backend._health_client = index
    try:
        assert backend.model_version(max_age_s=0.25) == "7" and index.calls == 1
        index.versions = [8]  # a deploy
        assert backend.model_version(max_age_s=0.25) == "7" and index.calls == 1  # cached
        time.sleep(0.3)
        assert backend.model_version(max_age_s=0.25) == "8" and index.calls == 2
        assert backend.model_version(max_age_s=0.0) == "8" and index.calls == 3  # 0: every answer
    finally:
        backend._health_client = type("Closed", (), {"close": lambda self: None})()
        backend.close()

