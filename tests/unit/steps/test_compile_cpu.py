"""compile on CPU: ONNX Runtime's optimised graph and an INT8 QDQ model, gated by QC, served by deploy.

Real trained model (``good_model``), real calibration images (a drop made by ``make_drop`` and named
in the version's lineage), real ONNX Runtime; the deploy test drives a real local Triton.
"""

from __future__ import annotations

import numpy as np
import pytest

from tasks.config import load_settings
from tasks.contracts import layout
from tasks.steps import compile as cmp
from tasks.steps import deploy as dep
from tasks.steps import drops, registry
from tasks.steps.qc import run_qc
from tests.support.models import MODEL_FILES, register_files
from tests.support import spec_models as sm

MODEL = "digits"
CALIB_DROP = "calib-drop"
ARTEFACTS = (layout.MODEL_OPT_ONNX, layout.MODEL_INT8_ONNX)


@pytest.fixture
def cpu_env(mlpipe_env, monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith(("MLPIPE_QC_", "MLPIPE_COMPILE_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("MLPIPE_QC_TRITON_CHECK", "0")
    return mlpipe_env


def _calib_drop(model: str) -> str:
    """The calibration drop of ``model`` (a drop is made for one model)."""
    return CALIB_DROP if model == MODEL else f"{model}-{CALIB_DROP}"


def _register_with_drop(store, trained, model: str = MODEL) -> int:
    """``trained`` registered with a real, validated 400-image drop of ``model`` as its lineage (the
    calibration source)."""
    drop_id = _calib_drop(model)
    if not store.exists(layout.success_key(drop_id)):
        drops.make_drop(store, drop_id, size=400, seed=21, spec=load_settings().model_spec(model))
        drops.bind_validation(store, drop_id, {"success": True, "failures": [], "report_uri": None,
                                               "note": "test fixture"}, drops.content_digest(store, drop_id))
    return register_files(store, model, {f: trained.dir / f for f in MODEL_FILES}, drop_id=drop_id)


def _spec():
    return load_settings().model_spec(MODEL)


def _golden():
    from tasks.model.networks import to_input

    images, labels = drops.golden_set(_spec())
    return images, labels, to_input(images, _spec())


def _labels(path, x) -> np.ndarray:
    from tasks.model.networks import onnx_session, run_onnx

    return run_onnx(onnx_session(path), x, _spec())[0].argmax(1)


def _zero_calibration(store, manifest, spec, *, samples, seed):
    """Garbage INT8 calibration: 64 all-zero inputs of the spec."""
    return np.zeros((64, *spec.input_shape), np.float32), {"drops": [], "count": 64, "seed": seed, "garbage": True}


def _perturbed(src, dst, scale: float = 3.0, seed: int = 0) -> None:
    """A copy of the ONNX model ``src`` with noise (``scale`` x each weight's std) on every weight tensor."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(src))
    rng = np.random.default_rng(seed)
    for init in m.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32 and w.size > 16:
            init.CopyFrom(numpy_helper.from_array((w + rng.normal(0, scale * w.std(), w.shape)).astype(np.float32),
                                                  init.name))
    onnx.save(m, str(dst))


def _broken_compile(store, version, monkeypatch, model: str = MODEL):
    """compile with garbage INT8 calibration (all-zero images) and a perturbed 'optimised' model."""
    def perturbed_opt(onnx_path, out_path, *, level="extended"):
        _perturbed(onnx_path, out_path)
        return {"opt_level": level, "perturbed": True}

    monkeypatch.setattr(cmp, "calibration_inputs", _zero_calibration)
    monkeypatch.setattr(cmp, "optimize_onnx", perturbed_opt)
    result = cmp.compile_version(store, model, version)
    assert result["cpu"]["status"] == "compiled"  # they build and load: only QC can tell they are wrong
    return result


def test_compile_builds_both_artefacts_and_records_them(cpu_env, store, good_model, tmp_path):
    import onnxruntime as ort

    v = _register_with_drop(store, good_model)
    result = cmp.compile_version(store, MODEL, v)

    reason = cmp.tensorrt_unavailable_reason()
    if reason is not None:  # the TensorRT part is unchanged: skipped here with the reason
        assert result["status"] == "skipped" and result["reason"] == reason
    cpu = result["cpu"]
    assert cpu["status"] == "compiled", cpu
    opt, int8 = cpu["artifacts"][layout.MODEL_OPT_ONNX], cpu["artifacts"][layout.MODEL_INT8_ONNX]
    assert opt["status"] == int8["status"] == "compiled"
    assert opt["opt_level"] == "extended"
    assert int8["format"] == "QDQ" and int8["per_channel"] is True
    assert int8["calibration"]["count"] == 300 and int8["calibration"]["drops"] == [CALIB_DROP]
    assert int8["calibration"]["seed"] == 0 and int8["calibration"]["pool"] == 400
    src_bytes = good_model.onnx.stat().st_size
    assert cpu["source_bytes"] == src_bytes
    assert int8["bytes"] < 0.5 * src_bytes  # INT8 weights: about a quarter of the FP32 file
    assert all(a["seconds"] >= 0 and a["bytes"] > 0 for a in (opt, int8))

    _, _, x = _golden()
    ref = _labels(good_model.onnx, x)
    for name in ARTEFACTS:
        path = store.get_file(layout.compiled_model_key(MODEL, v, name), tmp_path / name)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # plain onnxruntime loads it
        assert [i.name for i in sess.get_inputs()] == [_spec().onnx.input]
        assert [o.name for o in sess.get_outputs()] == [_spec().onnx.logits, _spec().onnx.embedding]
        agreement = float(np.mean(_labels(path, x) == ref))
        assert agreement >= (1.0 if name == layout.MODEL_OPT_ONNX else 0.99), (name, agreement)

    # recorded through the registry: the files on the manifest, an artifact event each, the report
    manifest = registry.get_version(store, MODEL, v)
    assert set(ARTEFACTS) | {layout.COMPILE_JSON} <= set(manifest["files"])
    assert manifest["compile"]["cpu"]["status"] == "compiled"
    assert manifest["compile"]["cpu"]["artifacts"][layout.MODEL_INT8_ONNX]["sha256"] == int8["sha256"]
    recorded = [e for e in registry.events(store, MODEL) if e["event"] == "artifact" and e["version"] == v]
    assert set(ARTEFACTS) | {layout.COMPILE_JSON} <= {e["name"] for e in recorded}
    assert store.get_json(layout.version_file_key(MODEL, v, layout.COMPILE_JSON))["cpu"] == cpu


def test_without_readable_drops_int8_is_skipped_with_the_reason(cpu_env, store, good_model):
    from tests.support.models import register_model

    v = register_model(store, good_model, MODEL)  # its lineage drop has a manifest but no images
    cpu = cmp.compile_version(store, MODEL, v)["cpu"]
    assert cpu["status"] == "partial"
    assert cpu["artifacts"][layout.MODEL_OPT_ONNX]["status"] == "compiled"
    int8 = cpu["artifacts"][layout.MODEL_INT8_ONNX]
    assert int8["status"] == "skipped" and "cannot be read for calibration" in int8["reason"]
    assert not store.exists(layout.version_file_key(MODEL, v, layout.MODEL_INT8_ONNX))


@pytest.mark.integration
def test_qc_passes_compiled_artefacts_and_chooses_int8(cpu_env, store, good_model, monkeypatch):
    """With the Triton infra check on: the throw-away Triton serves the artefact QC chose."""
    monkeypatch.setenv("MLPIPE_QC_TRITON_CHECK", "1")
    monkeypatch.setenv("MLPIPE_QC_LATENCY_REQUESTS", "30")
    monkeypatch.setenv("MLPIPE_QC_P95_LATENCY_MS", "1000")
    v = _register_with_drop(store, good_model)
    cmp.compile_version(store, MODEL, v)

    report = run_qc(store, MODEL, v)

    assert report["verdict"] == "passed", report["reasons"]
    checks = {c["name"]: c for c in report["checks"]}
    for name in ("compiled_int8", "compiled_opt"):
        assert checks[name]["status"] == "passed", checks[name]
        assert checks[name]["value"] >= 0.99 and checks[name]["accuracy_drop"] <= 0.005
        assert checks[name]["recall_drop"] <= 0.02
    assert checks["compiled_opt"]["value"] == 1.0
    assert checks["triton_serves"]["status"] == "passed" and "serving model.int8.onnx" in checks["triton_serves"]["detail"]
    serving = report["serving"]
    assert serving["artifact"] == layout.MODEL_INT8_ONNX
    assert "model.int8.onnx passed its check against model.onnx" in serving["reason"]
    assert serving["sha256"] == checks["compiled_int8"]["sha256"]
    assert registry.get_version(store, MODEL, v)["qc"]["serving"]["artifact"] == layout.MODEL_INT8_ONNX
    html = store.get_bytes(layout.version_file_key(MODEL, v, layout.QC_REPORT_HTML)).decode()
    assert "Served artefact:</b> model.int8.onnx" in html


def test_broken_artefacts_fail_their_checks_and_deploy_serves_onnx(cpu_env, store, good_model, tmp_path,
                                                                   monkeypatch):
    v = _register_with_drop(store, good_model)
    _broken_compile(store, v, monkeypatch)

    report = run_qc(store, MODEL, v)

    checks = {c["name"]: c for c in report["checks"]}
    assert checks["compiled_int8"]["status"] == "failed" and checks["compiled_int8"]["value"] < 0.5
    assert checks["compiled_opt"]["status"] == "failed"
    assert "label agreement" in checks["compiled_int8"]["detail"]
    # the version itself is fine: a bad compiled file is not served, the version is not rejected
    assert report["verdict"] == "passed" and report["reasons"] == []
    assert len(report["artifact_failures"]) == 2
    assert registry.get_version(store, MODEL, v)["stage"] == "candidate"
    serving = report["serving"]
    assert serving["artifact"] == layout.MODEL_ONNX
    assert serving["reason"].startswith("no compiled artefact passed QC")
    assert "model.int8.onnx failed its check" in serving["reason"]
    assert "model.opt.onnx failed its check" in serving["reason"]

    # deploy's choice (local flavour): model.onnx, with QC's reason
    onnx = store.get_file(layout.version_file_key(MODEL, v, layout.MODEL_ONNX), tmp_path / "model.onnx")
    path, served = dep._served_artifact(store, MODEL, v, tmp_path, "local", onnx, None)
    assert path == onnx and served["artifact"] == layout.MODEL_ONNX
    assert served["reason"] == serving["reason"]
    # the production flavour keeps its own choice (no plan here: model.onnx)
    assert dep._served_artifact(store, MODEL, v, tmp_path, "production", onnx, None)[1]["artifact"] == "model.onnx"


def test_only_the_int8_is_broken_then_the_optimised_model_is_served(cpu_env, store, good_model, monkeypatch):
    v = _register_with_drop(store, good_model)
    monkeypatch.setattr(cmp, "calibration_inputs", _zero_calibration)
    cmp.compile_version(store, MODEL, v)
    report = run_qc(store, MODEL, v)
    assert report["verdict"] == "passed"
    assert report["serving"]["artifact"] == layout.MODEL_OPT_ONNX
    assert report["serving"]["reason"].startswith("model.int8.onnx failed its check")


def test_a_compiled_file_changed_after_qc_is_not_served(cpu_env, store, good_model, tmp_path):
    v = _register_with_drop(store, good_model)
    cmp.compile_version(store, MODEL, v)
    run_qc(store, MODEL, v)
    registry.record_artifact(store, MODEL, v, layout.MODEL_INT8_ONNX, good_model.onnx.read_bytes())
    onnx = store.get_file(layout.version_file_key(MODEL, v, layout.MODEL_ONNX), tmp_path / "model.onnx")
    path, served = dep._served_artifact(store, MODEL, v, tmp_path, "local", onnx, None)
    assert path == onnx and served["artifact"] == layout.MODEL_ONNX
    assert "not the one QC checked" in served["reason"]


# ------------------------------------------------------------------------------------ a real Triton


@pytest.fixture(scope="module")
def cpu_triton(tmp_path_factory):
    from tasks.local.triton import LocalTriton

    work = tmp_path_factory.mktemp("compile-cpu-triton")
    (work / "repo").mkdir()
    triton = LocalTriton(work / "repo", work / "logs", backend_dir=work / "backends")
    triton.start(timeout=90)
    try:
        yield triton
    finally:
        triton.stop()


@pytest.mark.integration
def test_deploy_serves_the_int8_artefact_and_falls_back_to_onnx(cpu_env, store, good_model, cpu_triton, tmp_path,
                                                                monkeypatch):
    from tasks.adapters.triton import TritonClient
    from tasks.contracts.files import sha256_file
    from tasks.model import repo as model_repo
    from tasks.model.frames import encode_frame

    target = dep.ServingTarget(cpu_triton.model_repository, cpu_triton.http_url, "http", keep_versions=3)
    model = "cpu_int8"  # a model of its own (the digits spec under another name) in the shared Triton
    sm.write_spec(tmp_path / "models", model, base="digits")
    sm.use_specs(monkeypatch, tmp_path / "models", "digits")
    v = _register_with_drop(store, good_model, model)
    cmp.compile_version(store, model, v)
    assert run_qc(store, model, v)["serving"]["artifact"] == layout.MODEL_INT8_ONNX

    result = dep.deploy(store, model, v, target)

    assert result["deployed_version"] == v
    int8 = store.get_file(layout.compiled_model_key(model, v, layout.MODEL_INT8_ONNX), tmp_path / "int8.onnx")
    served_file = target.repo_dir / model_repo.classifier_name(model) / str(v) / "model.onnx"
    assert sha256_file(served_file) == sha256_file(int8)  # the INT8 model is the classifier version's file
    manifest = registry.get_version(store, model, v)
    assert manifest["serving"]["artifact"] == layout.MODEL_INT8_ONNX and manifest["serving"]["action"] == "deploy"
    assert manifest["stage"] == "production"
    assert [e["artifact"] for e in registry.events(store, model) if e["event"] == "serving"] == ["model.int8.onnx"]

    images, labels, x = _golden()
    frames = [encode_frame(img, _spec()) for img in images[:256]]
    client = TritonClient(cpu_triton.grpc_url, protocol="grpc")
    try:
        out = client.infer_frames(model, frames)
        got = np.asarray(out["LABEL"]).reshape(-1)
        assert np.mean(got == _labels(int8, x[:256])) >= 0.99  # the ensemble answers as the INT8 model does
        assert np.mean(got == labels[:256]) >= 0.95
        assert np.asarray(out["EMBEDDING"]).shape == (256, _spec().embedding_dim)

        # a second version whose compiled files are broken: QC keeps them out, deploy serves model.onnx
        v2 = _register_with_drop(store, good_model, model)
        _broken_compile(store, v2, monkeypatch, model)
        assert run_qc(store, model, v2)["serving"]["artifact"] == layout.MODEL_ONNX
        dep.deploy(store, model, v2, target)
        served_file = target.repo_dir / model_repo.classifier_name(model) / str(v2) / "model.onnx"
        assert sha256_file(served_file) == sha256_file(good_model.onnx)
        serving = registry.get_version(store, model, v2)["serving"]
        assert serving["artifact"] == layout.MODEL_ONNX
        assert serving["reason"].startswith("no compiled artefact passed QC")
        got = np.asarray(client.infer_frames(model, frames)["LABEL"]).reshape(-1)
        assert np.mean(got == _labels(good_model.onnx, x[:256])) == 1.0
    finally:
        for name in (model, model_repo.classifier_name(model)):
            try:
                client.unload_model(name)
            except Exception:  # noqa: BLE001 - best effort
                pass
        client.close()
