"""The detector's member gate (tasks/steps/qc_detection.py through `mlpipe qc --model scenes-detector`): box
precision and recall at IoU 0.5 on the pipeline's golden scenes, no regression against the champion, parity
with the trainer's PyTorch model; a failing candidate is rejected with the reasons, a broken model.onnx is a
failed `loads` check, never a crash. The detectors are real: one trained here on pool scenes, the same network
with its heatmap bias pushed below any threshold (it finds nothing), and a file that is not ONNX."""

from __future__ import annotations

import pytest

from tasks.contracts import layout
from tasks.contracts.pipeline import find_pipeline
from tasks.config import load_settings
from tasks.steps import qc as qc_step
from tasks.steps import registry, scenes
from tasks.steps.qc_detection import DetectionThresholds, box_metrics


def _version(store, model: str, version: int, onnx_bytes: bytes, pt: bytes | None = None) -> None:
    store.put_bytes(layout.version_file_key(model, version, layout.MODEL_ONNX), onnx_bytes)
    if pt is not None:
        store.put_bytes(layout.version_file_key(model, version, layout.MODEL_PT), pt)
    store.put_json(layout.version_manifest_key(model, version), {
        "model": model, "version": version, "stage": "candidate", "run_id": f"r{version}", "metrics": {},
        "lineage": {"drops": []}, "history": []})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A detector trained for 8 epochs on 400 pool scenes (never golden ones): (onnx bytes, pt bytes)."""
    from tasks.model.detector import export_detector_onnx
    from tasks.model.networks import save_torch
    from tasks.steps.train_detector import train_scenes

    cfg = load_settings()
    spec = cfg.model_spec("scenes-detector")
    pool = scenes.pool_scenes(find_pipeline("scenes", cfg.models_dir), 400, seed=5)
    model, _, _ = train_scenes(pool.images, pool.boxes, pool.classes, spec, epochs=8, seed=0)
    work = tmp_path_factory.mktemp("det")
    onnx = export_detector_onnx(model, work / "model.onnx", spec)
    pt = save_torch(model, work / "model.pt")
    return onnx.read_bytes(), pt.read_bytes()


def test_a_trained_detector_passes_and_a_blind_one_is_rejected_naming_recall(store, trained, tmp_path):
    spec = load_settings().model_spec("scenes-detector")
    th = DetectionThresholds.for_spec(spec, min_precision=0.8, min_recall=0.8)
    _version(store, spec.name, 1, *trained)
    good = qc_step.run_qc(store, spec.name, 1, th, work_dir=tmp_path)
    checks = {c["name"]: c for c in good["checks"]}
    assert good["verdict"] == "passed", good["reasons"]
    assert good["metrics"]["precision"] >= 0.8 and good["metrics"]["recall"] >= 0.8
    assert good["golden_set"]["scenes"] == len(scenes.golden_scenes(find_pipeline("scenes", load_settings().models_dir)))
    assert checks["parity_onnx_torch"]["passed"] is True
    html = store.get_bytes(layout.version_file_key(spec.name, 1, layout.QC_REPORT_HTML)).decode()
    assert "QC of detector scenes-detector v1: passed" in html and "data:image/png;base64," in html
    registry.set_stage(store, spec.name, 1, "production", "test: champion", mirror=False)

    import onnx
    from onnx import numpy_helper

    blind = onnx.load_from_string(trained[0])  # the same network, its heatmap bias pushed far below any threshold
    last_conv = [n for n in blind.graph.node if n.op_type == "Conv" and spec.onnx.logits in n.output]
    assert last_conv, "the heatmap comes from a conv whose bias can be moved"
    bias_name = last_conv[0].input[2]
    for init in blind.graph.initializer:
        if init.name == bias_name:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) - 50.0, bias_name))
    _version(store, spec.name, 2, blind.SerializeToString())
    bad = qc_step.run_qc(store, spec.name, 2, th, work_dir=tmp_path)
    assert bad["verdict"] == "failed" and bad["metrics"]["recall"] == 0.0
    assert bad["metrics"]["precision"] == 0.0, "no box at all on scenes full of digits is not precise"
    assert any(r.startswith("recall: golden-scene box recall 0.0000") for r in bad["reasons"])
    assert any(r.startswith("no_regression: champion v1 recall") for r in bad["reasons"])
    assert registry.get_version(store, spec.name, 2)["stage"] == "rejected"


def test_a_broken_model_file_fails_loads_not_the_step(store, tmp_path):
    spec = load_settings().model_spec("scenes-detector")
    _version(store, spec.name, 1, b"\x08\x07not an onnx file")
    report = qc_step.run_qc(store, spec.name, 1, work_dir=tmp_path)
    assert report["verdict"] == "failed" and report["reasons"][0].startswith("loads:")
    assert registry.get_version(store, spec.name, 1)["stage"] == "rejected"


def test_box_metrics_on_hand_made_boxes():
    import numpy as np

    truth = [np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32), np.zeros((0, 4), np.float32)]
    found = [(np.array([[1, 1, 10, 10], [50, 50, 60, 60]], np.float32), np.array([0.9, 0.8]), None),
             (np.zeros((0, 4), np.float32), np.zeros(0), None)]
    m = box_metrics(found, truth, 0.5)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 1) and m["precision"] == 0.5 and m["recall"] == 0.5
    assert m["frames"] == 2 and m["count_accuracy"] == 1.0
