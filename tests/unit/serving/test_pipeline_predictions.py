"""A pipeline served by the consumer: frames checked against the detector's spec, one Triton model answering
``PIPELINE_OUTPUTS``, predictions with the boxes, the count and the read-out, FRAME_ERROR rows as dead letters,
and one Qdrant point per frame (a real local-mode Qdrant through ``VectorStore``)."""

from __future__ import annotations

import datetime as dt
import json
import threading
import uuid
from typing import Mapping, Sequence

import numpy as np
import pytest

from tasks.adapters.qdrant import QdrantSettings, VectorStore
from tasks.config import load_settings
from tasks.contracts.serving import FRAME_ERROR, MAX_BATCH, PIPELINE_OUTPUTS
from tasks.model import frame_codec
from tasks.model.frames import codec_params
from tasks.serving.consumer import QdrantPolicy, StreamConsumer
from tasks.serving.consumer.backend import TritonBackend
from tasks.serving.consumer.pipeline import PipelineServing, pipeline_prediction_records, pipeline_serving
from tasks.serving.consumer.records import check_frames
from tests.unit.serving.fakes import World, consumer, frame, loop_config, run, source_of

TOPIC = "frames"
PROCESSED = dt.datetime(2026, 1, 2, 3, 4, 6, tzinfo=dt.timezone.utc)


@pytest.fixture(scope="module")
def served() -> PipelineServing:
    got = pipeline_serving("scenes", load_settings().models_dir)
    assert got is not None
    return got


def slots(served: PipelineServing) -> int:
    det = served.frames.detection
    assert det is not None
    return int(det.max_objects)


def pipeline_outputs(served: PipelineServing, counts: Sequence[int], errors: Mapping[int, bytes] | None = None,
                     ) -> dict[str, np.ndarray]:
    """A pipeline answer in the contract's shapes: frame j has ``counts[j]`` boxes (box b at x = 10 + 20 b, label
    (j + b) % classes, label score 0.9 - 0.1 b), the other slots padding (label -1, zeros)."""
    n, k, d = len(counts), slots(served), served.embedding_dim
    names = served.classes.class_names
    boxes = np.zeros((n, k, 4), np.float32)
    box_scores = np.zeros((n, k), np.float32)
    labels = np.full((n, k), -1, np.int64)
    label_scores = np.zeros((n, k), np.float32)
    readout = np.empty((n, 1), dtype=object)
    for j, c in enumerate(counts):
        for b in range(c):
            boxes[j, b] = (10 + 20 * b, 5, 26 + 20 * b, 25.5)
            box_scores[j, b] = 0.8 - 0.05 * b
            labels[j, b] = (j + b) % len(names)
            label_scores[j, b] = 0.9 - 0.1 * b
        readout[j, 0] = "".join(names[(j + b) % len(names)] for b in range(c)).encode()
    errs = np.array([[(errors or {}).get(j, b"")] for j in range(n)], dtype=object).reshape(n, 1)
    out = {"BOXES": boxes, "BOX_SCORES": box_scores, "BOX_LABELS": labels, "LABEL_SCORES": label_scores,
           "COUNT": np.asarray(counts, np.int32).reshape(n, 1), "READOUT": readout,
           "EMBEDDING": (np.arange(n * d, dtype=np.float32).reshape(n, d) + 1.0), FRAME_ERROR: errs}
    assert set(out) == set(PIPELINE_OUTPUTS)
    return out


def scene_frame(served: PipelineServing, offset: int, **kw):
    return frame(TOPIC, 0, offset, encoding="jpeg", spec=served.frames, **kw)


def build(served: PipelineServing, records, counts, *, policy=None, version="4"):
    d = check_frames(records, served.frames)
    out = pipeline_outputs(served, counts)
    return d, pipeline_prediction_records(records, d.good, d.frame_ids, out, topic="predictions", model="scenes",
                                          version=version, infer_s=0.0125, processed=PROCESSED, policy=policy,
                                          classes=served.classes)


# --------------------------------------------------------------------------- the pipeline and its specs


def test_a_pipeline_is_found_by_name_with_the_detector_for_frames_and_the_classifier_for_names(served):
    assert served.frames.name == served.spec.members.detector and served.frames.task == "detection"
    assert served.classes.name == served.spec.members.classifier and served.classes.task == "classification"
    assert served.embedding_dim == served.frames.embedding_dim
    assert pipeline_serving("digits", load_settings().models_dir) is None  # a single model


def test_frames_are_checked_against_the_detector_spec(served):
    records = [scene_frame(served, 0), frame(TOPIC, 0, 1, encoding="raw", spec=served.frames),
               frame(TOPIC, 0, 2, kind="oversize", spec=served.frames)]
    d = check_frames(records, served.frames)
    assert d.good == [0]  # JPEG of the detector's size; raw is not one of its encodings; oversize
    assert [r.reason for _, r in d.rejected] == ["unsupported_content_type", "oversize"]


# --------------------------------------------------------------------------- predictions


def test_a_prediction_carries_the_boxes_the_count_and_the_readout(served):
    records = [scene_frame(served, o, key=b"cam-%d" % o, traceparent=b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01")
               for o in range(3)]
    k = slots(served)
    d, built = build(served, records, [2, k, 1])
    assert len(built.messages) == 3 and not built.points  # no policy: nothing indexed
    names = served.classes.class_names
    preds = [json.loads(m[1]) for m in built.messages]
    assert list(preds[0]) == ["frame_id", "device_id", "readout", "count", "boxes", "score", "model_name",
                              "model_version", "lineage", "latency_ms", "inference_ms", "processed_at",
                              "captured_at", "traceparent"]
    p = preds[0]
    assert p["frame_id"] == d.frame_ids[0] and p["device_id"] == "cam-0"
    assert p["count"] == 2 and len(p["boxes"]) == 2  # the padding slots are not boxes
    assert p["boxes"][0] == {"box": [10.0, 5.0, 26.0, 25.5], "score": 0.8, "label": 0, "label_name": names[0],
                             "label_score": 0.9}
    assert p["boxes"][1]["box"] == [30.0, 5.0, 46.0, 25.5] and p["boxes"][1]["label_name"] == names[1]
    assert p["readout"] == names[0] + names[1]
    assert p["score"] == pytest.approx(0.8)  # the least sure box
    assert p["model_name"] == "scenes" and p["model_version"] == "4" and p["lineage"] == "scenes/4"
    assert p["inference_ms"] == 12.5 and p["latency_ms"] == 322.0  # captured 03:04:05.678, processed 03:04:06
    assert p["traceparent"].startswith("00-aaaa")
    assert "label" not in p and "class" not in p and "topk" not in p  # a frame has no single class
    assert preds[1]["count"] == k and [b["label"] for b in preds[1]["boxes"]] == [(1 + b) % len(names)
                                                                                for b in range(k)]
    # key = frame id, the single model's headers
    _topic, _value, key, headers = built.messages[2]
    assert key == d.frame_ids[2].encode()
    assert dict(headers)["content-type"] == b"application/json" and "traceparent" in dict(headers)


def test_a_frame_without_boxes_is_an_empty_readout_not_an_error(served):
    records = [scene_frame(served, 0)]
    _, built = build(served, records, [0], policy=QdrantPolicy.parse("low_confidence:0.7"))
    p = json.loads(built.messages[0][1])
    assert p["count"] == 0 and p["boxes"] == [] and p["readout"] == "" and p["score"] is None
    assert [pt.payload["indexed_because"] for pt in built.points] == ["low_confidence"]  # worth a look


def test_the_policy_reads_the_least_sure_box(served):
    records = [scene_frame(served, o) for o in range(2)]
    _, built = build(served, records, [1, 3], policy=QdrantPolicy.parse("low_confidence:0.75"))
    # frame 0: one box at 0.9 (sure); frame 1: boxes at 0.9, 0.8, 0.7 -> 0.7 < 0.75
    assert [pt.frame_id for pt in built.points] == [json.loads(built.messages[1][1])["frame_id"]]


def test_an_unknown_version_gives_no_lineage(served):
    _, built = build(served, [scene_frame(served, 0)], [1], version="")
    p = json.loads(built.messages[0][1])
    assert p["model_version"] == "" and p["lineage"] is None


# --------------------------------------------------------------------------- Qdrant: a real local-mode store


def test_qdrant_holds_one_point_per_frame_with_the_frame_embedding_and_the_readout(served, tmp_path):
    records = [scene_frame(served, o) for o in range(5)]
    counts = [0, 1, 2, 3, 4]
    d, built = build(served, records, counts, policy=QdrantPolicy.parse("all"))
    out = pipeline_outputs(served, counts)
    vs = VectorStore(QdrantSettings(path=str(tmp_path / "qdrant")))
    try:
        vs.ensure_collection(served.embedding_dim)
        assert vs.upsert_predictions(built.points) == 5
        assert vs.upsert_predictions(built.points) == 5  # redelivered: the same points again
        assert vs.count() == 5  # one per frame, not per box
        got = {p["id"]: p for p in vs.get(d.frame_ids, with_vectors=True)}
        for j, fid in enumerate(d.frame_ids):
            point = got[fid]
            assert point["payload"]["readout"] == out["READOUT"][j, 0].decode()
            assert point["payload"]["count"] == counts[j] and len(point["payload"]["boxes"]) == counts[j]
            assert point["payload"]["indexed_because"] == "all" and "traceparent" not in point["payload"]
            v = np.asarray(point["vector"], np.float64)
            e = out["EMBEDDING"][j].astype(np.float64)
            assert len(v) == served.embedding_dim
            assert np.allclose(v / np.linalg.norm(v), e / np.linalg.norm(e), atol=1e-5)  # cosine: normalised
    finally:
        vs.close()


# --------------------------------------------------------------------------- the loop


class FakePipelineBackend:
    """An ``InferenceBackend`` of the pipeline model: decodes each frame with the detector's codec (like the
    pipeline's first step); a frame it cannot use gets ``FRAME_ERROR``; frame at offset o has o % (K + 1)
    boxes."""

    def __init__(self, served: PipelineServing, served_version: str = "2") -> None:
        self.served = served
        self.params = codec_params(served.frames)
        self.served_version = served_version
        self._version = ""
        self.calls = 0
        self._lock = threading.Lock()

    def infer(self, frames: Sequence[bytes]) -> dict[str, np.ndarray]:
        counts, errors = [], {}
        for j, value in enumerate(frames):
            try:
                _p, offset = source_of(frame_codec.decode(value, self.params))
                counts.append(offset % (slots(self.served) + 1))
            except frame_codec.FrameError as exc:
                counts.append(0)
                errors[j] = str(exc).encode()
        with self._lock:
            self.calls += 1
        return pipeline_outputs(self.served, counts, errors)

    def ready(self) -> bool:
        return True

    @property
    def version(self) -> str:
        return self._version

    def model_version(self, max_age_s: float = 10.0) -> str:
        self._version = self.served_version
        return self._version


def test_the_consumer_serves_the_pipeline_frame_errors_go_to_the_dlq_and_nothing_is_lost(served):
    world = World.with_frames(2, 12, poison={(0, 3): "corrupt_png", (1, 5): "wrong_shape_png", (1, 7): "oversize"},
                              encoding="jpeg", spec=served.frames)
    c = consumer(world, FakePipelineBackend(served), loop_config(model="scenes"), spec=served.frames)
    assert c.pipeline is not None and c.pipeline.name == "scenes"  # found by the model's name
    stats = run(c)
    assert not world.violations
    assert world.done() == {(p, o) for p in range(2) for o in range(12)}  # lost 0
    assert stats["predicted"] == 21 and stats["dead_letter"] == 3
    dlq = {(int(dict(h)["source_partition"]), int(dict(h)["source_offset"])): dict(h)["reason"].decode()
           for t, _v, _k, h in world.producer.acked if t == world.kafka.dlq_topic}
    assert dlq == {(0, 3): "undecodable", (1, 5): "wrong_shape", (1, 7): "oversize"}  # FRAME_ERROR: as today
    preds = [json.loads(v) for t, v, _k, _h in world.producer.acked if t == world.kafka.predictions_topic]
    by_id = {rec.headers["frame_id"].decode(): rec.offset for recs in world.log.values() for rec in recs}
    k = slots(served)
    for p in preds:
        assert p["model_name"] == "scenes" and p["model_version"] == "2" and p["lineage"] == "scenes/2"
        assert p["count"] == by_id[p["frame_id"]] % (k + 1) == len(p["boxes"])
    assert set(world.vectors.points) == {p["frame_id"] for p in preds}  # policy all: one point per frame
    assert all(len(pt.embedding) == served.embedding_dim for pt in world.vectors.points.values())


def test_a_pipeline_found_without_a_spec_gives_the_detector_frames_and_turns_rollout_off(served, caplog):
    class Router:  # a RolloutRouter stand-in: must be dropped, never asked
        active = True
        metrics = build_shadow = None

    world = World.with_frames(1, 1, encoding="jpeg", spec=served.frames)
    with caplog.at_level("INFO"):
        c = StreamConsumer(world.kafka, loop_config(model="scenes"), backend=FakePipelineBackend(served),
                           consumer_factory=world.consumer_factory, producer_factory=world.producer_factory,
                           rollout=Router())  # type: ignore[arg-type]
    assert c.spec.name == served.frames.name and c.pipeline is not None
    assert c.rollout is None and "safe rollout is off" in caplog.text
    single = StreamConsumer(world.kafka, loop_config(model="digits"), backend=FakePipelineBackend(served),
                            consumer_factory=world.consumer_factory, producer_factory=world.producer_factory)
    assert single.pipeline is None and single.spec.name == "digits"


def test_the_triton_backend_asks_the_pipeline_model_for_its_outputs_and_versions():
    calls: list = []

    class Client:
        max_batch_size = 256

        def infer_frames(self, model, frames, version="", outputs=None):
            calls.append(("infer", model, tuple(outputs) if outputs else None))
            return {"COUNT": np.zeros((len(frames), 1), np.int32)}

        def ready_versions(self, model):
            calls.append(("versions", model))
            return [3, 5]

        def model_config(self, model):
            return {"max_batch_size": 64}

        def close(self):
            pass

    b = TritonBackend("127.0.0.1:1", "scenes", outputs=PIPELINE_OUTPUTS, version_model="scenes")
    b._client = b._health_client = Client()  # type: ignore[assignment]
    b.infer([b"x"])
    assert b.model_version(max_age_s=0.0) == "5"
    assert ("infer", "scenes", PIPELINE_OUTPUTS) in calls and ("versions", "scenes") in calls
    single = TritonBackend("127.0.0.1:1", "digits")
    single._client = single._health_client = Client()  # type: ignore[assignment]
    calls.clear()
    single.infer([b"x"])
    single.model_version(max_age_s=0.0)
    assert calls[0] == ("infer", "digits", None) and calls[-1] == ("versions", "digits_classifier")
    b.close()
    single.close()


def test_frame_ids_are_uuids_in_the_points(served):
    _, built = build(served, [scene_frame(served, 0, frame_id=str(uuid.uuid4()).upper())], [1],
                     policy=QdrantPolicy.parse("all"))
    assert built.points[0].frame_id == str(uuid.UUID(built.points[0].frame_id))


def test_the_cli_serves_a_pipeline_by_name_without_rollout(mlpipe_env, monkeypatch, caplog):
    from tasks.serving.consumer import cli

    made: dict = {}

    class Backend:
        def __init__(self, url, model, **kw):
            made["backend"] = (model, kw)

        def close(self):
            pass

    class Consumer:
        abandoned = False
        latencies: list = []

        def __init__(self, kafka, cfg, **kw):
            made["consumer"] = (cfg.model, kw)

        def run(self):
            return {}

        def stop(self):
            pass

    monkeypatch.setattr(cli, "TritonBackend", Backend)
    monkeypatch.setattr(cli, "StreamConsumer", Consumer)
    with caplog.at_level("INFO"):
        assert cli.main(["--model", "scenes", "--qdrant-policy", "none", "--http-port", "-1",
                         "--rollout-poll", "1"]) == 0
    model, kw = made["backend"]
    assert model == "scenes" and kw["outputs"] == PIPELINE_OUTPUTS and kw["version_model"] == "scenes"
    model, kw = made["consumer"]
    assert model == "scenes" and kw["rollout"] is None and kw["pipeline"].name == "scenes"
    assert kw["spec"].name == kw["pipeline"].frames.name  # frames are the detector's
    assert "safe rollout is off" in caplog.text
    assert cli.main(["--model", "digits", "--qdrant-policy", "none", "--http-port", "-1", "--rollout-poll", "0"]) == 0
    assert made["backend"] == ("digits", {"timeout_s": 10.0, "max_model_batch": MAX_BATCH, "concurrency": 8})
    assert made["consumer"][1]["pipeline"] is None and made["consumer"][1]["spec"].name == "digits"
