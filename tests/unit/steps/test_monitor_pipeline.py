"""The drift monitor of a pipeline (``scenes``): the checks read the pipeline's outputs (per-box labels and
label scores, frame embeddings) against a reference made from pipeline outputs, with the thresholds of the
pipeline spec's ``drift`` section.

The live window is what the consumer writes: its pipeline predictions (``pipeline_prediction_records``),
read from a real local-mode Qdrant (``--source qdrant``) or from the predictions topic through a fake of
the monitor's own topic reader (``monitor._tail``), the frames then embedded by the detector member's ONNX
model (a small real ONNX file of the detector's contract, ``tests/support/pipeline_models.py``)."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import numpy as np
import pytest

from tasks.adapters.kafka import KafkaConfig, Record
from tasks.adapters.qdrant import PredictionPoint, QdrantSettings, VectorStore
from tasks.config import load_settings
from tasks.contracts import layout
from tasks.contracts.pipeline import find_pipeline
from tasks.contracts.serving import FRAME_ERROR
from tasks.serving.consumer.pipeline import PipelineServing, pipeline_prediction_records, pipeline_serving
from tasks.serving.consumer.policy import QdrantPolicy
from tasks.serving.consumer.records import check_frames
from tasks.steps import monitor
from tests.support.pipeline_models import detector_onnx
from tests.unit.serving.fakes import frame

NAME = "scenes"
KAFKA = KafkaConfig(bootstrap="127.0.0.1:1", topic_prefix="t.")
PROCESSED = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)


@pytest.fixture(scope="module")
def served() -> PipelineServing:
    got = pipeline_serving(NAME, load_settings().models_dir)
    assert got is not None
    return got


def answers(served: PipelineServing, n: int, *, label_p, seed: int, shift: float = 0.0, score: float = 0.95,
            errors: int = 0) -> dict[str, np.ndarray]:
    """A pipeline answer for ``n`` frames in the contract's shapes: 1..K boxes each, labels drawn from ``label_p``,
    label scores around ``score``, embeddings around a fixed direction (+ ``shift``); the first ``errors`` rows
    carry a FRAME_ERROR (their other outputs garbage: label 9 everywhere)."""
    rng = np.random.default_rng(seed)
    det = served.frames.detection
    assert det is not None
    k, d, classes = det.max_objects, served.embedding_dim, served.classes.num_classes
    counts = rng.integers(1, k + 1, n)
    labels = np.full((n, k), -1, np.int64)
    scores = np.zeros((n, k), np.float32)
    boxes = np.zeros((n, k, 4), np.float32)
    for j, c in enumerate(counts):
        labels[j, :c] = rng.choice(classes, c, p=label_p)
        scores[j, :c] = np.clip(rng.normal(score, 0.02, c), 0, 1)
        boxes[j, :c] = [(10 * b, 10, 10 * b + 20, 30) for b in range(c)]
    names = served.classes.class_names
    readout = np.array([["".join(names[c] for c in labels[j, :counts[j]]).encode()] for j in range(n)], dtype=object)
    base = np.linspace(1.0, 2.0, d)
    emb = (base + shift * np.roll(base, d // 2) + rng.normal(0, 0.05, (n, d))).astype(np.float32)
    err = np.array([[b"undecodable: test" if j < errors else b""] for j in range(n)], dtype=object)
    labels[:errors] = 9
    return {"BOXES": boxes, "BOX_SCORES": np.where(labels >= 0, 0.8, 0).astype(np.float32), "BOX_LABELS": labels,
            "LABEL_SCORES": scores, "COUNT": counts.astype(np.int32).reshape(n, 1), "READOUT": readout,
            "EMBEDDING": emb, FRAME_ERROR: err}


UNIFORM = np.full(10, 0.1)
SHIFTED = np.array([0.55, 0.3] + [0.15 / 8] * 8)  # mostly zeros and ones


def live_predictions(served, n, *, label_p, seed, version="1", shift=0.0, score=0.95):
    """The consumer's pipeline predictions and points for ``n`` scene frames answered as ``answers`` says."""
    records = [frame("t.frames", 0, o, encoding="jpeg", spec=served.frames) for o in range(n)]
    d = check_frames(records, served.frames)
    assert len(d.good) == n
    out = answers(served, n, label_p=label_p, seed=seed, shift=shift, score=score)
    built = pipeline_prediction_records(records, d.good, d.frame_ids, out, topic="t.predictions", model=NAME,
                                        version=version, infer_s=0.01, processed=PROCESSED,
                                        policy=QdrantPolicy.parse("all"), classes=served.classes)
    return records, built


# --------------------------------------------------------------------------- pure: reference and compare


def test_the_reference_is_the_used_box_slots_and_the_frames_without_errors(served):
    out = answers(served, 50, label_p=UNIFORM, seed=1, errors=5)
    ref = monitor.pipeline_reference(NAME, 3, out, "golden scenes")
    counts = out["COUNT"].reshape(-1)
    assert len(ref.labels) == len(ref.scores) == int(counts[5:].sum())  # padding and FRAME_ERROR rows left out
    want = np.concatenate([out["BOX_LABELS"][j, :counts[j]] for j in range(5, 50)])
    assert (ref.labels == want).all() and (ref.labels >= 0).all()
    assert ref.embeddings.shape == (45, served.embedding_dim)
    again = monitor.Reference.from_bytes(ref.to_bytes())
    assert (again.labels == ref.labels).all() and again.source == "golden scenes" and again.version == 3
    with pytest.raises(monitor.MonitorError, match="nothing to compare with"):
        empty = answers(served, 3, label_p=UNIFORM, seed=2)
        empty["COUNT"][:] = 0
        monitor.pipeline_reference(NAME, 3, {**empty, "EMBEDDING": empty["EMBEDDING"][:0]}, "golden scenes")


def _window(preds: list[dict], embeddings: np.ndarray) -> monitor.LiveWindow:
    labels, scores = monitor._labels_scores(preds, boxes=True)
    return monitor.LiveWindow("test", labels, scores, embeddings, {"1": len(preds)}, None, None, frames=len(preds))


def test_a_shifted_box_label_distribution_drifts_and_the_same_one_does_not(served):
    th = monitor.Thresholds.for_spec(find_pipeline(NAME, load_settings().models_dir))
    assert th.class_psi == find_pipeline(NAME, load_settings().models_dir).drift.class_psi
    ref = monitor.pipeline_reference(NAME, 1, answers(served, 300, label_p=UNIFORM, seed=1), "golden scenes")
    same_out = answers(served, 150, label_p=UNIFORM, seed=2)
    _, same = live_predictions(served, 150, label_p=UNIFORM, seed=2)
    same_preds = [json.loads(m[1]) for m in same.messages]
    result = monitor.compare(ref, _window(same_preds, same_out["EMBEDDING"]), th, served.classes)
    checks = {c["name"]: c for c in result["checks"]}
    assert result["status"] == "ok" and not result["drift"], checks
    assert result["samples"] == int(same_out["COUNT"].sum()) >= th.min_samples  # boxes, not frames

    _, shifted = live_predictions(served, 150, label_p=SHIFTED, seed=3)
    shifted_preds = [json.loads(m[1]) for m in shifted.messages]
    result = monitor.compare(ref, _window(shifted_preds, same_out["EMBEDDING"]), th, served.classes)
    checks = {c["name"]: c for c in result["checks"]}
    assert result["drift"] and checks["class_psi"]["drift"] and checks["class_js"]["drift"]
    assert not checks["confidence_drop"]["drift"] and not checks["embedding_cosine"]["drift"]  # only the labels moved
    assert checks["class_psi"]["detail"].split("largest moves: ")[1].startswith("class 0 9.9% -> 55.5%")


def test_few_boxes_give_no_verdict(served):
    th = monitor.Thresholds.for_spec(find_pipeline(NAME, load_settings().models_dir))
    ref = monitor.pipeline_reference(NAME, 1, answers(served, 300, label_p=UNIFORM, seed=1), "golden scenes")
    out = answers(served, 10, label_p=SHIFTED, seed=4)
    _, built = live_predictions(served, 10, label_p=SHIFTED, seed=4)
    result = monitor.compare(ref, _window([json.loads(m[1]) for m in built.messages], out["EMBEDDING"]), th,
                             served.classes)
    assert result["status"] == "insufficient_data" and not result["drift"]


# --------------------------------------------------------------------------- run_monitor end to end


@pytest.fixture
def champion(store, served):
    """Pipeline version 1 in production (the registry's manifest as ``tasks.steps.pipeline`` writes it), detector
    member v1, and its drift reference as the pipeline's QC writes it."""
    manifest = {"model": NAME, "kind": "pipeline", "version": 1, "stage": "production",
                "members": {"detector": {"model": served.frames.name, "version": 1},
                            "classifier": {"model": served.classes.name, "version": 1}},
                "lineage": {"drops": []}}
    store.put_json(layout.version_manifest_key(NAME, 1), manifest)
    uri = monitor.save_pipeline_reference(store, NAME, 1, answers(served, 300, label_p=UNIFORM, seed=1))
    assert uri == store.uri(monitor.reference_key(NAME, 1))
    return 1


def _qdrant(tmp_path, served, built) -> str:
    path = str(tmp_path / "qdrant")
    vs = VectorStore(QdrantSettings(path=path))
    try:
        vs.ensure_collection(served.embedding_dim)
        vs.upsert_predictions(built.points)
        # a single model's point in the same collection: not a pipeline prediction, left out
        vs.upsert_predictions([PredictionPoint(str(uuid.uuid4()), [1.0] * served.embedding_dim, {
            "label": 3, "score": 0.5, "model_version": "1", "indexed_because": "all",
            "processed_at": "2026-12-01T00:00:00Z"})])
    finally:
        vs.close()
    return path


@pytest.mark.parametrize("label_p, drift", [(UNIFORM, False), (SHIFTED, True)], ids=["same", "shifted"])
def test_run_monitor_reads_the_pipeline_points_from_qdrant(served, store, champion, tmp_path, label_p, drift):
    _, built = live_predictions(served, 150, label_p=label_p, seed=7)
    path = _qdrant(tmp_path, served, built)

    report = monitor.run_monitor(store, NAME, source="qdrant", qdrant_path=path)

    checks = {c["name"]: c for c in report["checks"]}
    assert report["kind"] == "pipeline" and report["champion"] == 1 and report["frames"] == 150
    assert report["classes"] == served.classes.class_names
    assert report["thresholds"] == find_pipeline(NAME, load_settings().models_dir).drift.model_dump()
    assert report["reference"]["source"] == "golden scenes"
    assert report["drift"] is drift and checks["class_psi"]["drift"] is drift
    assert checks["embedding_mmd"]["status"] != "skipped"  # the points' vectors are the frames' embeddings
    assert "boxes of 150 live frames" in report["summary"]
    assert "1 prediction(s) without boxes (not a pipeline's) left out" in report["live"]["notes"]
    assert store.get_json(layout.MONITOR_LATEST)["drift"] is drift


def test_a_pipeline_without_a_reference_names_the_step_that_makes_it(served, store, tmp_path):
    store.put_json(layout.version_manifest_key(NAME, 2), {"model": NAME, "kind": "pipeline", "version": 2,
                                                          "stage": "production", "members": {}})
    with pytest.raises(monitor.MonitorError, match=r"no drift reference .*`mlpipe pipeline qc --pipeline scenes "
                                                   r"--version 2`"):
        monitor.run_monitor(store, NAME, source="qdrant", qdrant_path=str(tmp_path / "q"))


def test_run_monitor_reads_the_predictions_and_embeds_their_frames_with_the_pinned_detector(
        served, store, champion, tmp_path, monkeypatch):
    store.put_bytes(layout.version_file_key(served.frames.name, 1, layout.MODEL_ONNX),
                    detector_onnx(tmp_path / "det.onnx", served.frames).read_bytes())
    frames, built = live_predictions(served, 150, label_p=SHIFTED, seed=8)
    preds = [Record("t.predictions", 0, i, m[2], m[1], {}, []) for i, m in enumerate(built.messages)]
    topics = {KAFKA.predictions_topic: preds, KAFKA.frames_topic: frames}
    monkeypatch.setattr(monitor, "_tail", lambda kafka, topic, window, timeout: topics[topic])

    report = monitor.run_monitor(store, NAME, source="kafka", kafka=KAFKA)

    checks = {c["name"]: c for c in report["checks"]}
    assert report["kind"] == "pipeline" and report["frames"] == 150 and report["drift"]
    assert checks["class_psi"]["drift"]
    assert checks["embedding_mmd"]["status"] != "skipped" and report["live"]["notes"] == []  # every frame embedded


def test_the_frame_embedder_gives_the_detector_embedding_of_each_frame(served, store, tmp_path):
    from tests.support.pipeline_models import scene

    store.put_bytes(layout.version_file_key(served.frames.name, 4, layout.MODEL_ONNX),
                    detector_onnx(tmp_path / "det.onnx", served.frames).read_bytes())
    embedder = monitor.FrameEmbedder(store, served.frames, 4, 9)
    try:
        dark, bright = scene(served.frames, []), scene(served.frames, [(0, 0), (5, 5)])
        _, _, emb = embedder.run(np.stack([dark, bright]))
    finally:
        embedder.close()
    assert embedder.version == 9 and emb.shape == (2, served.embedding_dim)
    assert np.allclose(emb[0], 10 / 255, atol=1e-4) and (emb[1] > emb[0]).all()  # the frames' mean brightness
    with pytest.raises(monitor.MonitorError, match="cannot read the pipeline's detector"):
        monitor.FrameEmbedder(store, served.frames, 5, 9)
