"""compile: the TensorRT path is real; here (no TensorRT, no GPU) it records a skip with the reason.
Names and shapes (TensorRT profile, trtexec shapes, ONNX Runtime artefacts) come from the model spec."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tasks.config import load_settings
from tasks.contracts import layout
from tasks.contracts.errors import EXIT_BAD_INPUT
from tasks.model.networks import to_input
from tasks.steps import compile as trt_compile
from tasks.steps import registry
from tests.support.factories import fake_run
from tests.support import spec_models as sm

REASON = trt_compile.tensorrt_unavailable_reason()


@pytest.fixture(scope="module")
def digits_onnx(tmp_path_factory) -> bytes:
    """An (untrained) classifier of the digits spec: what register accepts."""
    path = tmp_path_factory.mktemp("digits-onnx") / "model.onnx"
    return sm.contract_onnx(path, load_settings().model_spec("digits")).read_bytes()


def test_skip_is_recorded_with_reason(store, digits_onnx):
    if REASON is None:
        pytest.skip("TensorRT and a GPU are present: the skip path does not apply")
    fake_run(store, onnx=digits_onnx)
    registry.register(store, "digits", "r1", ["d1"], mirror=False)
    result = trt_compile.compile_version(store, "digits", 1)
    assert result["status"] == "skipped"
    assert result["reason"] == REASON and ("TensorRT" in REASON or "GPU" in REASON)
    assert store.get_json("models/digits/1/compile.json")["status"] == "skipped"
    assert not store.exists("models/digits/1/model.plan")
    assert registry.get_version(store, "digits", 1)["compile"]["reason"] == REASON


def test_cli_unknown_version_is_a_clear_error(mlpipe_env):
    proc = subprocess.run([sys.executable, "-m", "tasks.cli", "compile", "--version", "99"], capture_output=True, text=True)
    assert proc.returncode == EXIT_BAD_INPUT
    assert "error: model 'digits' has no version 99" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_writes_result_json(store, tmp_path, digits_onnx):
    fake_run(store, onnx=digits_onnx)
    registry.register(store, "digits", "r1", ["d1"], mirror=False)
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "tasks.cli", "compile", "--version", "1", "--result-json", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["status"] in {"skipped", "compiled"}


@pytest.mark.gpu
def test_builds_fp16_engine_on_gpu(store, tmp_path):
    if REASON is not None:
        pytest.skip(f"TensorRT engine build needs TensorRT and a GPU: {REASON}")
    onnx_path = sm.contract_onnx(tmp_path / "model.onnx", load_settings().model_spec("digits"))
    fake_run(store, onnx=onnx_path.read_bytes())
    registry.register(store, "digits", "r1", ["d1"], mirror=False)
    result = trt_compile.compile_version(store, "digits", 1, max_batch=32)
    assert result["status"] == "compiled"
    assert result["profile"] == {"min": 1, "opt": 16, "max": 32}
    assert store.exists("models/digits/1/model.plan")


# ------------------------------------------------------------------------------- a spec that is not digits

#: tricolour with its own tensor names: nothing may assume "input" / "logits" / "embedding"
NAMED = {**sm.TRICOLOUR, "onnx": {"input": "pixels", "logits": "scores", "embedding": "features"}}


def test_trtexec_gets_the_spec_input_name_and_shape(tmp_path, monkeypatch):
    spec = sm.load("tricolour", **NAMED)
    seen = {}

    def fake_subprocess_run(cmd, **kw):
        seen["cmd"] = cmd
        (tmp_path / "model.plan").write_bytes(b"plan")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(trt_compile.subprocess, "run", fake_subprocess_run)
    info = trt_compile.build_engine_trtexec(tmp_path / "model.onnx", tmp_path / "model.plan", spec, max_batch=8,
                                            fp16=False)
    assert info["profile"] == {"min": 1, "opt": 4, "max": 8}
    assert {"--minShapes=pixels:1x3x16x16", "--optShapes=pixels:4x3x16x16", "--maxShapes=pixels:8x3x16x16"} <= set(
        seen["cmd"])


def test_a_variable_input_size_has_no_tensorrt_profile():
    spec = sm.load("anysize", **{**sm.TRICOLOUR, "input": {**sm.TRICOLOUR["input"], "height": None, "width": None},
                                 "preprocessing": {**sm.TRICOLOUR["preprocessing"], "resize": "none"}})
    with pytest.raises(trt_compile.CompileError, match="variable input size.*fixed input.height and input.width"):
        trt_compile.build_engine_trtexec(None, None, spec, max_batch=8, fp16=False)


def test_cpu_artefacts_of_a_spec_with_its_own_tensor_names(mlpipe_env, store, tmp_path, monkeypatch):
    """opt and INT8 models of a 3-class RGB spec whose tensors are not named like digits'; the INT8
    calibration is the spec's input (``to_input(images, spec)``) and both outputs keep the spec's shapes."""
    import onnxruntime as ort

    sm.write_spec(tmp_path / "models", "tricolour", **NAMED)
    sm.use_specs(monkeypatch, tmp_path / "models")
    spec = load_settings().model_spec("tricolour")
    fake_run(store, onnx=sm.contract_onnx(tmp_path / "model.onnx", spec).read_bytes())
    registry.register(store, "tricolour", "r1", ["d1"], mirror=False)
    asked = []

    def calibration(store_, manifest, spec_, *, samples, seed):
        asked.append(spec_.name)
        labels = np.arange(64) % spec_.num_classes
        return to_input(sm.colour_images(spec_, labels), spec_), {"drops": ["d1"], "count": 64, "seed": seed}

    monkeypatch.setattr(trt_compile, "calibration_inputs", calibration)
    cpu = trt_compile.compile_version(store, "tricolour", 1, force_skip_reason="no GPU in this test")["cpu"]

    assert cpu["status"] == "compiled", cpu
    assert asked == ["tricolour"]
    for name in (layout.MODEL_OPT_ONNX, layout.MODEL_INT8_ONNX):
        path = store.get_file(layout.compiled_model_key("tricolour", 1, name), tmp_path / name)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in sess.get_inputs()] == ["pixels"]
        scores, features = sess.run(["scores", "features"], {"pixels": np.zeros((2, 3, 16, 16), np.float32)})
        assert scores.shape == (2, 3) and features.shape == (2, 8)
