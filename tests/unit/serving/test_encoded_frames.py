"""The consumer sends encoded frames to Triton and keeps only the cheap checks (tests/unit/serving/fakes.py).

The fake backend decodes with ``tasks.model.frame_codec`` like Triton's preprocess model and answers
``FRAME_ERROR`` for the frames it cannot use: those become dead letters with the server's reason, the other
frames of the batch predictions; nothing is lost, nothing is sent twice, every offset is committed only once
both sinks hold the frames below it.
"""

from __future__ import annotations

import json

import pytest

from tasks.contracts.spec import SpecError
from tests.unit.serving.fakes import (
    SERVER_SIDE,
    FakeBackend,
    World,
    consumer,
    everything,
    loop_config,
    run,
    spec_of,
)


def config(**kw):
    return loop_config(**{"broker_check_s": 0.0, **kw})


def dead_letters(world: World) -> dict[tuple[int, int], dict[str, bytes]]:
    out = {}
    for topic, value, _key, headers in world.producer.acked:
        if topic == world.kafka.dlq_topic:
            h = dict(headers)
            out[(int(h["source_partition"]), int(h["source_offset"]))] = {**h, "__value__": value}
    return out


def predictions(world: World) -> list[dict]:
    return [json.loads(v) for t, v, _, _ in world.producer.acked if t == world.kafka.predictions_topic]


MIXED = {(0, 2): "corrupt_png", (0, 5): "jpeg", (1, 1): "raw_wrong_size", (1, 6): "wrong_shape_png",
         (0, 9): "undecodable", (1, 10): "missing_id"}
EXPECTED = {"corrupt_png": b"undecodable", "jpeg": b"unsupported_content_type", "raw_wrong_size": b"wrong_shape",
            "wrong_shape_png": b"wrong_shape", "undecodable": b"undecodable", "missing_id": b"missing_frame_id"}


def test_a_mixed_batch_sends_each_frame_where_it_belongs():
    world = World.with_frames(partitions=2, per_partition=12, poison=MIXED, encoding="png")
    backend = FakeBackend()
    c = consumer(world, backend, config())
    stats = run(c)
    assert world.violations == [] and world.done() == everything(world)
    dl = dead_letters(world)
    assert {at: d["reason"] for at, d in dl.items()} == {at: EXPECTED[kind] for at, kind in MIXED.items()}
    assert dl[(1, 6)]["reason_detail"] == b"image is 32x28, expected 28x28"  # the server's own words
    assert dl[(0, 2)]["__value__"] == world.log[0][2].value  # the original bytes
    # only the frames the cheap checks passed went to Triton, each exactly once (no bisection, no retry)
    sent = [s for sources, ok in backend.calls for s in sources]
    assert sorted(s for s in sent if s is not None) == sorted(at for at in everything(world) if at not in MIXED)
    assert sent.count(None) == sum(kind in SERVER_SIDE for kind in MIXED.values())
    # every other frame is one prediction, with its class name; nothing is sent twice
    preds = predictions(world)
    fids = [p["frame_id"] for p in preds]
    assert len(fids) == len(set(fids)) == 24 - len(MIXED)
    assert all(p["class"] == str(p["label"]) for p in preds)
    assert set(world.vectors.points) == set(fids)
    assert stats["predicted"] == 24 - len(MIXED) and stats["dead_letter"] == len(MIXED)
    assert world.frames.committed == {(world.topic, 0): 12, (world.topic, 1): 12}
    text = c.metrics.render().decode()
    assert 'mlpipe_consumer_dead_letters_total{reason="wrong_shape"} 2.0' in text
    assert 'mlpipe_consumer_inference_rejected_total 0.0' in text


def test_frame_errors_in_a_bisected_batch_are_dead_letters_too():
    """A batch Triton rejects (a permanent error for one frame) and that also holds a frame its preprocess model
    cannot use: both end in the dead-letter topic, each with its own reason."""
    world = World.with_frames(partitions=1, per_partition=8, poison={(0, 6): "wrong_shape_png"}, encoding="png")
    backend = FakeBackend(reject=lambda sources: (0, 3) in sources)
    run(consumer(world, backend, config()))
    assert world.violations == [] and world.done() == everything(world)
    assert {at: d["reason"] for at, d in dead_letters(world).items()} == {(0, 3): b"inference_failed",
                                                                          (0, 6): b"wrong_shape"}
    assert len(predictions(world)) == 6 and world.frames.committed == {(world.topic, 0): 8}


def test_a_shapes_consumer_takes_jpeg_frames_and_names_its_classes():
    shapes = spec_of("shapes")
    poison = {(0, 3): "raw_wrong_size", (0, 4): "corrupt_png"}
    world = World.with_frames(partitions=1, per_partition=10, poison=poison, encoding="jpeg", spec=shapes)
    backend = FakeBackend(spec=shapes)
    stats = run(consumer(world, backend, config(model="shapes")))
    assert world.violations == [] and world.done() == everything(world)
    assert {at: d["reason"] for at, d in dead_letters(world).items()} == {
        (0, 3): b"unsupported_content_type",  # shapes takes no raw frames
        (0, 4): b"undecodable"}
    sent = sorted(s for sources, _ in backend.calls for s in sources if s is not None)
    assert sent == [(0, o) for o in range(10) if (0, o) not in poison]  # JPEG frames read back by the server
    preds = predictions(world)
    assert {p["class"] for p in preds} <= set(shapes.class_names) and len(preds) == 8
    assert all(p["model_name"] == "shapes" and len(p["topk"]) == 3 for p in preds)
    assert stats["predicted"] == 8


def test_a_missing_spec_stops_the_consumer_at_start(tmp_path, monkeypatch):
    world = World.with_frames(partitions=1, per_partition=1)
    with pytest.raises(SpecError, match="no model spec for 'nope'"):
        consumer(world, FakeBackend(), config(model="nope"))
    monkeypatch.setenv("MLPIPE_MODELS_DIR", str(tmp_path))
    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / "spec.yaml").write_text("name: digits\n")
    with pytest.raises(SpecError, match="invalid model spec"):
        consumer(world, FakeBackend(), config())


def test_the_cli_exits_2_with_the_spec_error():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "tasks.serving.consumer", "--model", "no-such-model",
                          "--http-port", "-1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: ") and "no model spec for 'no-such-model'" in out.stderr
    assert "digits" in out.stderr and "Traceback" not in out.stderr  # the known models are named
