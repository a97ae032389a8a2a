"""A compiled artefact that passes its check against model.onnx in ONNX Runtime but that Triton cannot load fails
QC's loads check for that artefact only: QC tries the next file (the other compiled artefact, then model.onnx), the
version passes on what Triton serves, and deploy serves that, with the reason in the report.

Real trained model, real compile, a real throw-away Triton per try. The runner (``MLPIPE_QC_TRITON_RUNNER``, QC's
plug-in point) is the bundled ``LocalTriton`` that first makes the classifier file unloadable when it is one of the
files named in ``MLPIPE_TEST_UNLOADABLE_SHA256``: what Triton gets from a quantised model it cannot load.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tasks.contracts import layout
from tasks.contracts.files import sha256_file
from tasks.local.triton import LocalTriton
from tasks.steps import compile as cmp
from tasks.steps import deploy as dep
from tasks.steps import registry
from tasks.steps.qc import run_qc
from tests.unit.steps.test_compile_cpu import _register_with_drop, cpu_env  # noqa: F401 - fixture

MODEL = "digits"


class UnloadableTriton(LocalTriton):
    """``LocalTriton`` whose classifier file is garbage when its sha256 is in ``MLPIPE_TEST_UNLOADABLE_SHA256``."""

    def __init__(self, model_repository: Path, log_dir: Path, **kw) -> None:
        super().__init__(model_repository, log_dir, **kw)
        unloadable = set(filter(None, os.environ.get("MLPIPE_TEST_UNLOADABLE_SHA256", "").split(",")))
        for path in Path(model_repository).glob("*/*/model.onnx"):
            if sha256_file(path) in unloadable:
                path.write_bytes(b"\x08\x07 not an ONNX model Triton can load")


@pytest.mark.integration
def test_compiled_files_triton_cannot_load_are_passed_over_and_model_onnx_is_served(cpu_env, store, good_model,  # noqa: F811
                                                                                    tmp_path, monkeypatch):
    monkeypatch.setenv("MLPIPE_QC_TRITON_CHECK", "1")
    monkeypatch.setenv("MLPIPE_QC_LATENCY_REQUESTS", "20")
    monkeypatch.setenv("MLPIPE_QC_P95_LATENCY_MS", "1000")
    monkeypatch.setenv("MLPIPE_QC_TRITON_RUNNER", f"{__name__}:UnloadableTriton")
    v = _register_with_drop(store, good_model)
    cpu = cmp.compile_version(store, MODEL, v)["cpu"]
    shas = {n: cpu["artifacts"][n]["sha256"] for n in layout.CPU_COMPILED}

    # neither compiled file loads (INT8 is tried first, then the optimised model): the version still passes, on
    # model.onnx, and deploy serves model.onnx
    monkeypatch.setenv("MLPIPE_TEST_UNLOADABLE_SHA256", ",".join(shas.values()))
    report = run_qc(store, MODEL, v)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["verdict"] == "passed", report["reasons"]
    assert checks["compiled_int8"]["status"] == checks["compiled_opt"]["status"] == "passed"  # in ONNX Runtime...
    assert checks["loads_int8"]["status"] == checks["loads_opt"]["status"] == "failed"  # ...but not in Triton
    for name, artefact in (("loads_int8", layout.MODEL_INT8_ONNX), ("loads_opt", layout.MODEL_OPT_ONNX)):
        assert f"{artefact} passed its check against model.onnx but Triton cannot serve it" in checks[name]["detail"]
        assert "did not load" in checks[name]["detail"] and checks[name]["gates"] == "artifact"
    assert {f.split(":")[0] for f in report["artifact_failures"]} == {"loads_int8", "loads_opt"}
    assert checks["triton_serves"]["status"] == "passed" and "serving model.onnx" in checks["triton_serves"]["detail"]
    serving = report["serving"]
    assert serving["artifact"] == layout.MODEL_ONNX
    assert "model.int8.onnx passed its check" in serving["reason"] and "model.opt.onnx passed its check" in \
        serving["reason"] and "Triton cannot serve it" in serving["reason"]
    onnx = store.get_file(layout.version_file_key(MODEL, v, layout.MODEL_ONNX), tmp_path / "model.onnx")
    path, served = dep._served_artifact(store, MODEL, v, tmp_path, "local", onnx, None)
    assert path == onnx and served["artifact"] == layout.MODEL_ONNX and served["reason"] == serving["reason"]
    assert registry.get_version(store, MODEL, v)["stage"] == "candidate"  # not rejected
