"""compile: the TensorRT path is real; here (no TensorRT, no GPU) it records a skip with the reason."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tasks.contracts.errors import EXIT_BAD_INPUT
from tasks.steps import compile as trt_compile
from tasks.steps import registry
from tests.support.factories import fake_run

REASON = trt_compile.tensorrt_unavailable_reason()


def test_skip_is_recorded_with_reason(store):
    if REASON is None:
        pytest.skip("TensorRT and a GPU are present: the skip path does not apply")
    fake_run(store)
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


def test_cli_writes_result_json(store, tmp_path):
    fake_run(store)
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
    import torch

    from tasks.model.networks import build_model, export_onnx

    onnx_path = tmp_path / "model.onnx"
    torch.manual_seed(0)
    export_onnx(build_model().eval(), onnx_path)
    fake_run(store, onnx=onnx_path.read_bytes())
    registry.register(store, "digits", "r1", ["d1"], mirror=False)
    result = trt_compile.compile_version(store, "digits", 1, max_batch=32)
    assert result["status"] == "compiled"
    assert result["profile"] == {"min": 1, "opt": 16, "max": 32}
    assert store.exists("models/digits/1/model.plan")
