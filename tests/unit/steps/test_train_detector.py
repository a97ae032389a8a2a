"""tasks.steps.train_detector: the detector's trainer behind the trainer contract.

Synthetic scenes (bright rectangles on noise, boxes known) stand in for the pipeline's scene drops, so these
run without MNIST: a tiny run through ``run_trainer`` (the spec's entry point, ``check_run``), the contract's
outputs under ``runs/<run_id>/``, and a short training that finds the rectangles.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tasks.contracts import layout
from tasks.contracts.spec import find_spec
from tasks.model import detector
from tasks.steps import train as train_lib
from tasks.steps import train_detector

ROOT = Path(__file__).resolve().parents[3]
SPEC = find_spec("scenes-detector", ROOT / "models")
DIGITS = find_spec("digits", ROOT / "models")


def synth_scenes(n: int, seed: int = 0, max_objects: int = 3):
    """``(images [n, H, W, 3] uint8, boxes, classes)``: 1..max_objects bright, non-overlapping rectangles of
    14..34 x 18..38 pixels on a noisy background of a random tint."""
    rng = np.random.default_rng(seed)
    h, w = SPEC.input.height, SPEC.input.width
    images = np.empty((n, h, w, 3), np.uint8)
    boxes, classes = [], []
    for i in range(n):
        img = rng.normal(90, 25, (h, w, 3)) + rng.normal(0, 20, 3)
        want = int(rng.integers(1, max_objects + 1))
        found: list[np.ndarray] = []
        for _ in range(50):
            if len(found) == want:
                break
            bw, bh = int(rng.integers(14, 34)), int(rng.integers(18, 38))
            x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            b = np.array([x0, y0, x0 + bw, y0 + bh], np.float32)
            if any(min(b[2], o[2]) - max(b[0], o[0]) > -2 and min(b[3], o[3]) - max(b[1], o[1]) > -2 for o in found):
                continue
            found.append(b)
            img[y0:y0 + bh, x0:x0 + bw] = rng.uniform(190, 255, 3)
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
        boxes.append(np.asarray(found, np.float32).reshape(-1, 4))
        classes.append(np.zeros(len(found), np.int64))
    return images, boxes, classes


def test_run_trainer_calls_the_entry_point_and_check_run_accepts_it(store, monkeypatch, tmp_path):
    train_set, golden = synth_scenes(64, seed=1), synth_scenes(16, seed=2)
    calls = []

    def fake_load(st, drop_ids, spec):
        calls.append((list(drop_ids), spec.name))
        return train_set, golden

    monkeypatch.setattr(train_detector, "load_data", fake_load)
    assert train_lib.load_entry_point(SPEC) is train_detector.train
    result = train_lib.run_trainer(store, ["d1"], spec=SPEC, run_id="det-run", epochs=1, seed=0, batch_size=32,
                                   device="cpu", track=False)
    assert calls == [(["d1"], SPEC.name)]
    assert result["run_id"] == "det-run" and result["drop_ids"] == ["d1"]
    prefix = layout.run_prefix("det-run")
    for name in (*train_lib.RUN_FILES, layout.RUN_RESULT):
        assert store.exists(prefix + name), name
    train_lib.check_run(store, result, SPEC, "det-run")  # the contract, checked again explicitly
    m = json.loads(store.get_bytes(prefix + layout.METRICS))
    for key in ("golden_precision", "golden_recall", "golden_f1", "val_precision", "val_recall",
                "onnx_parity_max_abs_diff", "train_seconds", "epochs_run"):
        assert key in m, key
    assert m["epochs_run"] == 1 and m["golden_n"] == 16 and m["n_train"] + m["n_val"] == 64
    assert 0 <= m["onnx_parity_max_abs_diff"] <= SPEC.qc.max_parity_diff
    assert m["iou_threshold"] == SPEC.qc.iou_threshold
    history = json.loads(store.get_bytes(prefix + "history.json"))
    assert [h["epoch"] for h in history] == [1]
    assert store.get_bytes(prefix + "curves.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert store.get_json(prefix + layout.RUN_RESULT)["onnx_key"] == prefix + "model.onnx"
    # model.pt is the detector the ONNX model was exported from
    reloaded = detector.load_detector(store.get_file(prefix + "model.pt", tmp_path / "model.pt"), SPEC)
    onnx_path = store.get_file(prefix + "model.onnx", tmp_path / "model.onnx")
    assert detector.check_detector_parity(reloaded, onnx_path, SPEC, batch_sizes=(2,)) <= SPEC.qc.max_parity_diff


def test_a_broken_export_is_rejected_by_check_run(store, monkeypatch):
    from tasks.model.networks import OnnxContractError

    train_set, golden = synth_scenes(16, seed=3), synth_scenes(4, seed=4)
    monkeypatch.setattr(train_detector, "load_data", lambda st, d, s: (train_set, golden))
    real_export = detector.export_detector_onnx
    wrong = SPEC.model_copy(update={"onnx": SPEC.onnx.model_copy(update={"box_size": "sizes"})})
    # the trainer's own contract check is skipped, so check_run is what refuses the run
    monkeypatch.setattr(detector, "export_detector_onnx", lambda m, p, s: real_export(m, p, wrong))
    monkeypatch.setattr("tasks.model.networks.check_onnx_contract", lambda *a, **k: None)
    monkeypatch.setattr(detector, "check_detector_parity", lambda *a, **k: 0.0)
    result = train_detector.train(store, ["d1"], spec=SPEC, run_id="det-bad", epochs=1, batch_size=16,
                                  device="cpu", track=False)
    monkeypatch.undo()
    with pytest.raises(OnnxContractError, match="output 'box_size'"):
        train_lib.check_run(store, result, SPEC, "det-bad")


def test_training_finds_the_objects(monkeypatch):
    monkeypatch.setenv("MLPIPE_TORCH_THREADS", "2")
    images, boxes, classes = synth_scenes(256, seed=5)
    g_images, g_boxes, _ = synth_scenes(40, seed=6)
    model, history, fit = train_detector.train_scenes(images, boxes, classes, SPEC, epochs=4, seed=0,
                                                      batch_size=32, lr=4e-3, device="cpu")
    assert fit["epochs_run"] == len(history) <= 4 and fit["n_train"] + fit["n_val"] == 256
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    gold = train_detector.evaluate_scenes(model, g_images, g_boxes, SPEC)
    assert gold["precision"] >= 0.9 and gold["recall"] >= 0.9, gold


def test_bad_inputs_are_train_errors():
    images, boxes, classes = synth_scenes(12, seed=7)
    with pytest.raises(train_lib.TrainError, match="frames of shape"):
        train_detector.train_scenes(images[:, :50], boxes, classes, SPEC, epochs=1)
    with pytest.raises(train_lib.TrainError, match="12 frames but 11 box lists"):
        train_detector.train_scenes(images, boxes[:11], classes, SPEC, epochs=1)
    bad = [b.copy() for b in boxes]
    bad[0][0] = [30, 30, 10, 40]
    with pytest.raises(train_lib.TrainError, match="scene 0: boxes must be"):
        train_detector.train_scenes(images, bad, classes, SPEC, epochs=1)
    with pytest.raises(train_lib.TrainError, match="epochs must be >= 1"):
        train_detector.train_scenes(images, boxes, classes, SPEC, epochs=0)


def test_a_classifier_spec_is_refused(store):
    with pytest.raises(train_lib.TrainError, match="tasks.steps.train:train"):
        train_detector.train(store, ["d1"], spec=DIGITS, epochs=1, track=False)
