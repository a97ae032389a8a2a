"""The consumer loop in-process, against fakes of its backend, Kafka ends and vector sink (tests/unit/serving/fakes.py).

What is checked is the commit discipline: an offset is committed only once both sinks hold every frame
below it (``World.check_commit`` runs inside each commit), per partition in order, never past a batch
held by a failed backend call or a failing sink; dead letters are acknowledged before their offsets
are committed; backoff waits are jittered within their bounds.
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from tasks.serving.consumer import Backoff, InferenceBackend
from tasks.serving.consumer.backoff import bounds
from tests.unit.serving.fakes import FakeBackend, World, consumer, everything, loop_config as config, run


def assert_commits_in_order(world: World) -> dict[tuple[str, int], int]:
    """Per partition, committed offsets never go back; returns the last one of each."""
    last: dict[tuple[str, int], int] = {}
    for offsets, _asynchronous in world.commits():
        for tp, off in offsets.items():
            assert off >= last.get(tp, 0), f"commit of {tp} went back from {last[tp]} to {off}"
            last[tp] = off
    return last


def test_backend_protocol_is_what_the_triton_backend_offers():
    from tasks.serving.consumer import TritonBackend

    assert isinstance(FakeBackend(), InferenceBackend)
    for name in ("infer", "ready", "version", "model_version"):
        assert hasattr(TritonBackend, name)


def test_offsets_are_committed_only_after_both_sinks_confirmed():
    poison = {(0, 3): "undecodable", (1, 0): "missing_id", (2, 11): "invalid_id", (2, 12): "oversize"}
    world = World.with_frames(partitions=3, per_partition=20, poison=poison)
    stats = run(consumer(world, FakeBackend(), config()))
    assert world.violations == []
    assert len(world.commits()) >= 3
    last = assert_commits_in_order(world)
    assert last == {(world.topic, p): 20 for p in range(3)}  # everything committed in the end
    assert world.done() == everything(world)
    assert stats["predicted"] == 60 - len(poison) and stats["dead_letter"] == len(poison)
    assert len(world.vectors.points) == 60 - len(poison)
    # the final commit is synchronous and repeats the last offsets
    assert world.commits()[-1] == (last, False)
    assert world.frames.closed and world.producer.closed


def test_dead_letters_are_acknowledged_before_their_offsets_are_committed():
    poison = {(0, o): "undecodable" for o in range(0, 24, 3)}
    world = World.with_frames(partitions=1, per_partition=24, poison=poison)
    world.producer.fail_waits = 2  # the first batch's messages (dead letters among them) fail twice
    run(consumer(world, FakeBackend(), config()))
    assert world.violations == []
    dlq = world.kafka.dlq_topic
    for (p, o), reason in poison.items():
        acked_at = next(i for i, (kind, msgs) in enumerate(world.events) if kind == "ack"
                        and any(m[0] == dlq and dict(m[3])["source_offset"] == str(o).encode() for m in msgs))
        committed_at = next(i for i, (kind, data) in enumerate(world.events)
                            if kind == "commit" and data[0].get((world.topic, p), 0) > o)
        assert acked_at < committed_at, (o, reason)
    reasons = [dict(m[3])["reason"] for m in world.producer.acked if m[0] == dlq]
    assert reasons == [b"undecodable"] * len(poison)


def test_failing_sinks_hold_the_commits_and_pause_fetching():
    world = World.with_frames(partitions=2, per_partition=16)
    world.producer.fail_waits = 3
    world.vectors.fail_upserts = 3
    c = consumer(world, FakeBackend(), config())
    stats = run(c)
    assert world.violations == []
    assert_commits_in_order(world)
    assert world.done() == everything(world) and stats["predicted"] == 32
    kinds = [k for k, _ in world.events]
    assert kinds.count("pause") >= 1 and kinds.count("resume") == kinds.count("pause")
    text = c.metrics.render().decode()
    assert 'mlpipe_consumer_write_errors_total{sink="kafka"} 3.0' in text
    assert 'mlpipe_consumer_write_errors_total{sink="qdrant"} 3.0' in text


def test_nothing_is_committed_past_a_batch_held_by_a_failed_backend_call():
    world = World.with_frames(partitions=1, per_partition=40)
    world.frames_options = {"leak_when_paused": 5}  # fetched before the pause took effect
    held_frame = (0, 12)
    failures = {"left": 4}

    def fail(sources):
        if held_frame in sources and failures["left"] > 0:
            failures["left"] -= 1
            return True
        return False

    backend = FakeBackend(fail)
    stats = run(consumer(world, backend, config()))
    assert world.violations == []
    assert_commits_in_order(world)
    # until the held batch (frames 8..15) was answered, no commit reached its frames; the batch before it was
    # committed by then (at the latest when fetching paused)
    resumed = next(i for i, (kind, _) in enumerate(world.events) if kind == "resume")
    before = [data[0][(world.topic, 0)] for kind, data in world.events[:resumed] if kind == "commit"]
    assert before and max(before) == 8
    # the first failure is of a call sent before the previous batch was answered (stale: retried at once),
    # the other three count as Triton errors, each followed by a backoff
    assert [ok for sources, ok in backend.calls if held_frame in sources] == [False] * 4 + [True]
    assert stats["triton_errors"] == 3
    # the leaked frames were rewound and read again: nothing lost, everything committed at the end
    assert [data for kind, data in world.events if kind == "rewind"] == [{(world.topic, 0): 24}]
    assert stats["rewinds"] == 1
    assert world.done() == everything(world)
    assert world.frames.committed == {(world.topic, 0): 40}


def test_stop_while_the_backend_is_down_gives_up_the_held_batch_within_the_drain_budget(caplog):
    world = World.with_frames(partitions=1, per_partition=24)
    backend = FakeBackend(lambda sources: any(o >= 8 for _, o in sources))  # down after the first batch
    c = consumer(world, backend, config(drain_timeout_s=0.3, exit_when_idle_s=None))
    threading.Timer(0.2, c.stop).start()
    t0 = time.monotonic()
    stats = c.run()
    assert time.monotonic() - t0 < 0.2 + 0.3 + 1.5
    assert world.violations == []
    assert world.frames.committed == {(world.topic, 0): 8}  # only the batch before the held one
    assert world.commits()[-1] == ({(world.topic, 0): 8}, False)
    assert stats["predicted"] == 8 and stats["triton_errors"] >= 1
    assert "is not committed and will be redelivered" in caplog.text


def test_revoked_partitions_get_their_confirmed_offsets_committed_synchronously():
    world = World.with_frames(partitions=2, per_partition=24)
    world.frames_options = {"revoke_at": {5: [(world.topic, 0)]}}  # with batches in hand, some confirmed
    run(consumer(world, FakeBackend(), config(commit_interval_ms=60_000)))  # only forced commits
    assert world.violations == []
    assert_commits_in_order(world)
    revoked_at = next(i for i, (kind, _) in enumerate(world.events) if kind == "revoke")
    after = [data for kind, data in world.events[revoked_at:] if kind == "commit"]
    sync_on_revoke = after[0]
    assert sync_on_revoke[1] is False and set(sync_on_revoke[0]) == {(world.topic, 0)}
    assert all((world.topic, 0) not in offsets for offsets, _ in after[1:])  # gone to another member
    assert world.frames.committed[(world.topic, 1)] == 24


def test_backoff_waits_are_jittered_within_their_bounds():
    for seed in range(20):
        b = Backoff(0.2, 5.0, jitter=0.5, rng=random.Random(seed))
        waits = [b.next() for _ in range(10)]
        for n, w in enumerate(waits):
            lo, hi = bounds(0.2, 5.0, 0.5, n)
            assert lo <= w <= hi <= 5.0
        assert b.attempts == 10
    plain = Backoff(0.2, 5.0, jitter=0.0)
    assert [round(plain.next(), 6) for _ in range(7)] == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]  # the old schedule
    assert len({round(Backoff(1, 1, 0.5, random.Random(s)).next(), 9) for s in range(10)}) == 10
    with pytest.raises(ValueError):
        Backoff(0.1, 1.0, jitter=1.5)


def test_the_loop_waits_out_backend_failures_with_seeded_jittered_backoff():
    world = World.with_frames(partitions=1, per_partition=8)
    failures = {"left": 6}

    def fail(_sources):
        failures["left"] -= 1
        return failures["left"] >= 0

    cfg = config(backoff_initial_s=0.004, backoff_max_s=0.02, backoff_jitter=0.5)
    c = consumer(world, FakeBackend(fail), cfg, rng=random.Random(1234))
    waits: list[float] = []
    idle_poll = c._idle_poll
    c._idle_poll = lambda seconds: (waits.append(seconds), idle_poll(seconds))[1]
    stats = run(c)
    assert stats["triton_errors"] == 6 and stats["predicted"] == 8
    expected = Backoff(0.004, 0.02, 0.5, random.Random(1234))
    assert waits == [expected.next() for _ in range(6)]  # same seed, same waits
    for n, w in enumerate(waits):
        lo, hi = bounds(0.004, 0.02, 0.5, n)
        assert lo <= w <= hi
    assert world.violations == [] and world.done() == everything(world)
