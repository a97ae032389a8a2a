"""compile on CPU refuses a calibration set that is too small or of the wrong shape, with the reason: no INT8
model is built, the optimised one still is, and QC serves that one saying why (real trained model, real drop)."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.contracts import layout
from tasks.steps import compile as cmp
from tasks.steps.qc import run_qc
from tests.unit.steps.test_compile_cpu import _register_with_drop, _spec, cpu_env  # noqa: F401 - fixture

MODEL = "digits"


def test_check_calibration_names_the_problem():
    spec = _spec()
    ok = np.zeros((40, *spec.input_shape), np.float32)
    cmp.check_calibration(ok, spec, minimum=32)
    with pytest.raises(cmp.CalibrationRefused, match=r"has 31 image\(s\), at least 32 are needed"):
        cmp.check_calibration(ok[:31], spec, minimum=32)
    with pytest.raises(cmp.CalibrationRefused, match=r"shape \[40, 1, 8, 8\].*\[N, 1, 28, 28\]"):
        cmp.check_calibration(np.zeros((40, 1, 8, 8), np.float32), spec, minimum=32)
    with pytest.raises(cmp.CalibrationRefused, match=r"shape \[40, 784\]"):
        cmp.check_calibration(np.zeros((40, 784), np.float32), spec, minimum=32)
    with pytest.raises(cmp.CalibrationRefused, match="uint8, the contract input is float32"):
        cmp.check_calibration(ok.astype(np.uint8), spec, minimum=32)
    bad = ok.copy()
    bad[3, 0, 0, 0] = np.nan
    with pytest.raises(cmp.CalibrationRefused, match="NaN or infinite"):
        cmp.check_calibration(bad, spec, minimum=32)


def test_too_few_calibration_images_are_refused_and_the_optimised_model_is_served(cpu_env, store, good_model,  # noqa: F811
                                                                                  monkeypatch):
    monkeypatch.setenv("MLPIPE_COMPILE_CALIBRATION_SAMPLES", "8")  # the real drop, sampled to 8 images
    v = _register_with_drop(store, good_model)
    cpu = cmp.compile_version(store, MODEL, v)["cpu"]
    int8 = cpu["artifacts"][layout.MODEL_INT8_ONNX]
    assert int8["status"] == "refused", int8
    assert "has 8 image(s), at least 32 are needed" in int8["reason"]
    assert "MLPIPE_COMPILE_CALIBRATION_SAMPLES" in int8["reason"]
    assert cpu["status"] == "partial" and cpu["artifacts"][layout.MODEL_OPT_ONNX]["status"] == "compiled"
    assert not store.exists(layout.version_file_key(MODEL, v, layout.MODEL_INT8_ONNX))

    report = run_qc(store, MODEL, v)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["compiled_int8"]["status"] == "skipped" and "at least 32" in checks["compiled_int8"]["detail"]
    assert report["verdict"] == "passed" and report["serving"]["artifact"] == layout.MODEL_OPT_ONNX


def test_a_calibration_set_of_the_wrong_shape_is_refused(cpu_env, store, good_model, monkeypatch):  # noqa: F811
    def small_images(store, manifest, spec, *, samples, seed):  # 8x8 digits for a 28x28 model
        return np.random.default_rng(seed).random((64, 1, 8, 8), dtype=np.float32), {"count": 64, "seed": seed}

    monkeypatch.setattr(cmp, "calibration_inputs", small_images)
    v = _register_with_drop(store, good_model)
    int8 = cmp.compile_version(store, MODEL, v)["cpu"]["artifacts"][layout.MODEL_INT8_ONNX]
    assert int8["status"] == "refused"
    assert "shape [64, 1, 8, 8]" in int8["reason"] and "[N, 1, 28, 28]" in int8["reason"]
    assert not store.exists(layout.version_file_key(MODEL, v, layout.MODEL_INT8_ONNX))
