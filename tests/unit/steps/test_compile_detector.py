"""compile for a detector version (``task: detection``): ONNX Runtime's optimised graph and, calibrated on the
frames of the version's scene drops, an INT8 model, both checked against the detector's ONNX contract; without
readable scene drops INT8 is skipped with the reason in compile.json. TensorRT is the classifier's code (skipped
here, with the reason, where there is no TensorRT or GPU)."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.contracts import layout
from tasks.model import detector
from tasks.model.networks import onnx_session
from tasks.steps import compile as cmp
from tasks.steps import registry
from tests.support.models import register_files

MODEL = "scenes-detector"


@pytest.fixture
def det_env(mlpipe_env, monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith(("MLPIPE_QC_", "MLPIPE_COMPILE_")):
            monkeypatch.delenv(key)
    return mlpipe_env


@pytest.fixture
def version(det_env, store, tmp_path):
    import torch

    spec = det_env.model_spec(MODEL)
    torch.manual_seed(0)
    model = detector.build_detector(spec).eval()
    onnx_path = detector.export_detector_onnx(model, tmp_path / "model.onnx", spec)
    detector.save_detector(model, tmp_path / "model.pt")
    v = register_files(store, MODEL, {"model.onnx": onnx_path, "model.pt": tmp_path / "model.pt"},
                       drop_id="scene-drop")
    return spec, v


def _frames(n: int, spec, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *spec.image_shape), dtype=np.uint8)


def test_detector_version_compiles_opt_and_int8_from_scene_frames(store, version, monkeypatch):
    spec, v = version
    asked = []

    def frames(st, drop_ids, sp):
        asked.append((list(drop_ids), sp.name))
        return _frames(80, sp)

    monkeypatch.setattr(cmp, "scene_images", frames)
    result = cmp.compile_version(store, MODEL, v, force_skip_reason="no TensorRT in this test")
    assert result["status"] == "skipped" and result["reason"] == "no TensorRT in this test"
    assert asked == [(["scene-drop"], MODEL)]
    cpu = result["cpu"]
    assert cpu["status"] == "compiled", cpu
    for name in (layout.MODEL_OPT_ONNX, layout.MODEL_INT8_ONNX):
        art = cpu["artifacts"][name]
        assert art["status"] == "compiled", art
        path = store.get_file(layout.version_file_key(MODEL, v, name), store.root / f"got-{name}")
        detector.check_detector_contract(path, spec)
    assert cpu["artifacts"][layout.MODEL_INT8_ONNX]["calibration"]["count"] == 80
    # the optimised graph computes what model.onnx does
    x = detector.to_detector_input(_frames(4, spec, seed=9), spec)
    src = store.get_file(layout.version_file_key(MODEL, v, layout.MODEL_ONNX), store.root / "src.onnx")
    opt = store.get_file(layout.version_file_key(MODEL, v, layout.MODEL_OPT_ONNX), store.root / "opt.onnx")
    a, b = detector.run_onnx(onnx_session(src), x, spec), detector.run_onnx(onnx_session(opt), x, spec)
    for role in a:
        np.testing.assert_allclose(a[role], b[role], atol=1e-3, rtol=1e-4)
    manifest = registry.get_version(store, MODEL, v)
    assert manifest["compile"]["cpu"]["artifacts"][layout.MODEL_INT8_ONNX]["status"] == "compiled"
    assert store.exists(layout.version_file_key(MODEL, v, layout.COMPILE_JSON))


def test_without_scene_drops_int8_is_skipped_with_the_reason(store, version, monkeypatch):
    _, v = version

    def unavailable(st, drop_ids, sp):
        raise cmp.CalibrationUnavailable(f"training drops {list(drop_ids)} cannot be read as scenes")

    monkeypatch.setattr(cmp, "scene_images", unavailable)
    result = cmp.compile_version(store, MODEL, v, force_skip_reason="no TensorRT in this test")
    arts = result["cpu"]["artifacts"]
    assert arts[layout.MODEL_OPT_ONNX]["status"] == "compiled"
    assert arts[layout.MODEL_INT8_ONNX]["status"] == "skipped"
    assert "cannot be read as scenes" in arts[layout.MODEL_INT8_ONNX]["reason"]
    assert result["cpu"]["status"] == "partial" and "model.int8.onnx" in result["cpu"]["reason"]
    recorded = store.get_json(layout.version_file_key(MODEL, v, layout.COMPILE_JSON))
    assert recorded["cpu"]["artifacts"][layout.MODEL_INT8_ONNX]["status"] == "skipped"


def test_scene_images_names_a_missing_scene_drop(store, det_env):
    spec = det_env.model_spec(MODEL)
    with pytest.raises(cmp.CalibrationUnavailable, match=r"no-such-drop.*cannot be read as scenes of pipeline .scenes."):
        cmp.scene_images(store, ["no-such-drop"], spec)
