"""The drift monitor for a model that is not digits: class count and names, embedding size, frame decoding
and drift thresholds come from its spec.

The spec ``tricolour`` (3 named classes, 16x16 RGB, JPEG frames, 8-d embedding, ``drift.min_samples``
30) lives in a temporary ``MLPIPE_MODELS_DIR``; its champion is a real CNN trained on colour images
(``tests/support/spec_models.py``). The live window is read through a fake of the monitor's own
topic reader (``monitor._tail``): prediction messages and JPEG frames as the consumer and the producers
leave them on Kafka.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tasks.adapters.kafka import KafkaConfig, Record
from tasks.config import load_settings
from tasks.contracts.errors import EXIT_BAD_INPUT
from tasks.model.frames import content_type_of, encode_frame
from tasks.steps import drops, monitor, registry
from tests.support.models import register_files
from tests.support import spec_models as sm

MODEL = "tricolour"
KAFKA = KafkaConfig(bootstrap="127.0.0.1:1", topic_prefix="t.")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return sm.train_tiny(sm.load(MODEL, **sm.TRICOLOUR), tmp_path_factory.mktemp("tricolour"))


@pytest.fixture
def spec(mlpipe_env, tmp_path, monkeypatch):
    """The tricolour spec in MLPIPE_MODELS_DIR; its golden set (the reference's fallback) is balanced."""
    sm.write_spec(tmp_path / "models", MODEL, **sm.TRICOLOUR)
    sm.use_specs(monkeypatch, tmp_path / "models")
    spec = load_settings().model_spec(MODEL)
    labels = np.repeat(np.arange(spec.num_classes), 40)
    golden = sm.colour_images(spec, labels, seed=1), labels

    def golden_set(asked=None):
        assert asked is not None and asked.name == MODEL, "the monitor must ask for the golden set of its spec"
        return golden

    monkeypatch.setattr(drops, "golden_set", golden_set)
    return spec


@pytest.fixture
def champion(spec, store, tiny):
    v = register_files(store, MODEL, {"model.onnx": tiny[0], "model.pt": tiny[1]})
    registry.set_stage(store, MODEL, v, "production", "test champion", mirror=False)
    return v


def _stream(spec, version: int, labels, onnx, broken: int = 0) -> dict[str, list[Record]]:
    """The records of a live window: a prediction per frame (the champion's answer) and the frames, JPEG
    encoded as producers send them; the first ``broken`` frames are not decodable."""
    from tasks.model.networks import onnx_session, run_onnx, to_input

    images = sm.colour_images(spec, np.asarray(labels), seed=5)
    logits, _ = run_onnx(onnx_session(onnx), to_input(images, spec), spec)
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    preds, frames = [], []
    for i, img in enumerate(images):
        fid = f"f{i:04d}"
        body = {"frame_id": fid, "label": int(prob[i].argmax()), "score": float(prob[i].max()),
                "model_version": str(version), "processed_at": f"2026-12-01T00:00:{i // 100:02d}.{i % 100:02d}"}
        preds.append(Record("t.predictions", 0, i, fid.encode(), json.dumps(body).encode(), {}, []))
        value = b"\xff\xd8\xff not a jpeg" if i < broken else encode_frame(img, spec)
        headers = {"frame_id": fid.encode(), "content-type": content_type_of(spec.image_encoding).encode()}
        frames.append(Record("t.frames", 0, i, fid.encode(), value, headers, list(headers.items())))
    return {KAFKA.predictions_topic: preds, KAFKA.frames_topic: frames}


@pytest.fixture
def live(monkeypatch):
    """Sets the live window: ``live(records)`` makes ``monitor._tail`` return them per topic."""
    def set_stream(records: dict[str, list[Record]]) -> None:
        monkeypatch.setattr(monitor, "_tail", lambda kafka, topic, window, timeout: records[topic])
    return set_stream


def test_thresholds_come_from_the_spec_and_a_flag_wins(spec):
    th = monitor.Thresholds.for_spec(spec)
    assert json.loads(json.dumps(th.__dict__)) == spec.drift.model_dump()
    assert monitor.Thresholds.for_spec(spec, class_psi=0.9, min_samples=None).class_psi == 0.9
    with pytest.raises(monitor.MonitorError, match="min_samples must be at least 10"):
        monitor.Thresholds.for_spec(spec, min_samples=3)


def test_a_skewed_stream_drifts_by_class_name_with_the_spec_thresholds(spec, store, champion, tiny, live):
    labels = [2] * 80 + [0] * 5 + [1] * 5  # nearly all crosses (blue)
    live(_stream(spec, champion, labels, tiny[0], broken=3))

    report = monitor.run_monitor(store, MODEL, source="kafka", kafka=KAFKA)

    checks = {c["name"]: c for c in report["checks"]}
    assert report["thresholds"] == spec.drift.model_dump()  # min_samples 30, class_psi 0.3, ...
    assert report["classes"] == ["circle", "square", "cross"]
    assert report["reference"]["source"] == "golden set"  # the lineage drop has no images
    assert report["status"] == "drift" and checks["class_psi"]["drift"] and checks["class_psi"]["threshold"] == 0.3
    assert checks["class_psi"]["detail"].split("largest moves: ")[1].startswith("class cross 33.3% -> 8")
    dist = report["class_distribution"]
    assert list(dist["reference"]) == list(dist["live"]) == ["circle", "square", "cross"]
    assert dist["live"]["cross"] > 0.85
    assert report["samples"] == 90
    # the undecodable frames are left out of the embeddings, said so
    assert any("3 frame(s) of the window are no longer on the frames topic" in n for n in report["live"]["notes"])
    assert checks["embedding_cosine"]["status"] in {"ok", "drift"}
    ref = monitor.Reference.from_bytes(store.get_bytes(monitor.reference_key(MODEL, champion)))
    assert ref.embeddings.shape == (120, spec.embedding_dim)


def test_a_balanced_stream_does_not_drift(spec, store, champion, tiny, live):
    live(_stream(spec, champion, list(np.arange(90) % 3), tiny[0]))

    report = monitor.run_monitor(store, MODEL, source="kafka", kafka=KAFKA)

    checks = {c["name"]: c for c in report["checks"]}
    assert not checks["class_psi"]["drift"] and not checks["class_js"]["drift"], checks
    assert checks["embedding_mmd"]["status"] != "skipped" and report["live"]["notes"] == []


def test_the_cli_reads_the_spec_and_its_flags_win(spec, store, champion, tiny, live, tmp_path, capsys):
    live(_stream(spec, champion, list(np.arange(60) % 3), tiny[0]))
    out = tmp_path / "r.json"
    assert monitor.main(["--model", MODEL, "--bootstrap", KAFKA.bootstrap, "--topic-prefix", KAFKA.topic_prefix,
                         "--result-json", str(out)]) == 0
    assert json.loads(out.read_text())["samples"] == 60  # 60 >= the spec's min_samples 30: a verdict
    assert monitor.main(["--model", MODEL, "--min-samples", "5000"]) == EXIT_BAD_INPUT
    assert "window 2000 is smaller than min_samples 5000" in capsys.readouterr().err


def test_a_champion_that_breaks_the_spec_cannot_be_monitored(spec, store, champion, tmp_path):
    four = sm.load(MODEL, **{**sm.TRICOLOUR, "classes": [{"id": i, "name": f"c{i}"} for i in range(4)]})
    store.put_bytes(f"models/{MODEL}/{champion}/model.onnx",
                    sm.contract_onnx(tmp_path / "four.onnx", four).read_bytes())
    with pytest.raises(monitor.MonitorError, match=r"output 'logits' has shape \['N', 4\], expected \['N', 3\]"):
        monitor.ChampionModel(store, spec, champion)


def test_compare_counts_and_names_the_spec_classes():
    spec = sm.load(MODEL, **sm.TRICOLOUR)
    th = monitor.Thresholds.for_spec(spec)
    n = th.min_samples
    emb = np.random.default_rng(0).normal(size=(n, spec.embedding_dim)).astype(np.float32)
    ref = monitor.Reference(MODEL, 1, "test", np.arange(n) % 3, np.full(n, 0.9, np.float32), emb, np.arange(n) % 3)
    live = monitor.LiveWindow("test", np.array([1] * (n - 1) + [7]), np.full(n, 0.9, np.float32), emb, {"1": n},
                              None, None)
    result = monitor.compare(ref, live, th, spec)  # label 7 is no class of the spec: not counted
    assert result["class_distribution"]["live"] == {"circle": 0.0, "square": 1.0, "cross": 0.0}
    assert result["class_distribution"]["reference"] == {"circle": 0.3333, "square": 0.3333, "cross": 0.3333}
    psi = next(c for c in result["checks"] if c["name"] == "class_psi")
    assert psi["drift"] and "class square 33.3% -> 100.0%" in psi["detail"]
