"""tasks/steps/pipeline.py against the real local Triton: the pipeline QC in a throw-away server, a deploy that
swaps one member as one step (the pipeline never answers with a half-switched set: every answer of the stream
during the deploy comes from one version's members), a deploy whose smoke test fails and is restored, and a
rollback by pipeline version.

The members are small real ONNX files (no training): a deterministic detector (tests/support/pipeline_models)
and untrained classifiers, so the read-out is wrong on purpose: the pipeline spec is a copy whose read-out
thresholds this test sets (0 to let versions through, 1 to make the smoke test fail)."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

from tasks.adapters.storage import LocalStore
from tasks.config import PROJECT_ROOT
from tasks.contracts import layout
from tasks.contracts.pipeline import find_pipeline, member_specs
from tasks.local.triton import LocalTriton
from tasks.model import pipeline_repo as pr
from tasks.steps import pipeline as pipeline_step
from tasks.steps import registry, scenes
from tests.support.pipeline_models import detector_onnx

pytestmark = pytest.mark.integration


def _set_qc(models: Path, **qc) -> None:
    path = models / "scenes" / "pipeline.yaml"
    data = yaml.safe_load(path.read_text())
    data["qc"].update(qc)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _member(store, spec, version: int, onnx: Path) -> None:
    """A member version in the registry that passed its own QC (what train/register/qc leave)."""
    store.put_file(layout.version_file_key(spec.name, version, layout.MODEL_ONNX), onnx)
    store.put_json(layout.version_manifest_key(spec.name, version), {
        "model": spec.name, "version": version, "stage": "candidate", "run_id": f"run-{spec.name}-{version}",
        "lineage": {"drops": [{"drop_id": "d1"}]}, "qc": {"verdict": "passed", "report": "qc.html"}, "history": []})


@pytest.fixture
def env(tmp_path, monkeypatch):
    models = tmp_path / "models"
    for name in ("scenes", "scenes-detector", "scenes-digits"):
        shutil.copytree(PROJECT_ROOT / "models" / name, models / name)
    home = tmp_path / "home"
    for k, v in {"MLPIPE_HOME": str(home), "MLPIPE_STORE_URL": f"file://{home / 'store'}",
                 "MLPIPE_MODEL_REPO": str(home / "model_repo"), "MLPIPE_MODELS_DIR": str(models),
                 "MLPIPE_MODEL_NAME": "scenes", "MLPIPE_EXECUTION": "local", "MLPIPE_LOG_DIR": str(home / "logs")}.items():
        monkeypatch.setenv(k, v)
    _set_qc(models, min_readout_accuracy=0.0, min_class_recall=0.0, max_regression=1.0, smoke_margin=0.0,
            max_latency_p95_ms=60000)
    return models, home, LocalStore(home / "store")


def test_pipeline_qc_deploy_member_swap_restore_and_rollback(env, tmp_path):
    import torch

    from tasks.model.networks import build_model, export_onnx

    models, home, store = env
    spec = find_pipeline("scenes", models)
    det, cls = member_specs(spec, models)["detector"], member_specs(spec, models)["classifier"]
    _member(store, det, 1, detector_onnx(tmp_path / "det1.onnx", det, 16.0))
    for v in (1, 2):
        torch.manual_seed(v)
        _member(store, cls, v, export_onnx(build_model(cls), tmp_path / f"cls{v}.onnx", cls))

    # compose + QC in a throw-away Triton: passes the (test) thresholds, rejects nothing
    v1 = pipeline_step.compose(store, "scenes", {"detector": 1, "classifier": 1})
    report = pipeline_step.run_qc(store, "scenes", v1["version"], work_dir=tmp_path / "qc")
    checks = {c["name"]: c for c in report["checks"]}
    assert report["verdict"] == "passed", report["reasons"]
    assert checks["triton_serves"]["passed"] and checks["latency_p95"]["value"] > 0
    assert report["figures"]["frames"] > 100 and 0.0 <= report["figures"]["readout_accuracy"] <= 1.0
    assert store.exists(layout.version_file_key("scenes", v1["version"], layout.QC_REPORT_HTML))
    assert report["drift_reference"].endswith(".npz")  # the monitor's reference of this version

    v2 = pipeline_step.compose(store, "scenes", {"classifier": 2})  # the detector is kept: v1's
    assert {r: m["version"] for r, m in v2["members"].items()} == {"detector": 1, "classifier": 2}
    registry.update_version(store, "scenes", 2, lambda m: {**m, "qc": {"verdict": "passed"}})

    pr.render_pipeline("local", home / "model_repo", spec, models)
    with LocalTriton(home / "model_repo", home / "logs" / "triton") as triton:
        from tasks.steps.deploy import ServingTarget

        target = ServingTarget(repo_dir=home / "model_repo", triton_url=triton.http_url)
        first = pipeline_step.deploy(store, "scenes", 1, target)
        assert first["previous_version"] is None and first["members"] == {"detector": 1, "classifier": 1}
        assert registry.get_version(store, "scenes", 1)["stage"] == "production"
        assert registry.get_version(store, "scenes-digits", 1)["stage"] == "production"

        # a stream of calls while v2 (another classifier) replaces v1: each answer is one version's
        frames = pipeline_step._scene_frames(spec, scenes.golden_scenes(spec), 8)
        with triton.client("http") as client:
            expect = {1: [a["labels"].tolist() for a in pipeline_step.answers(
                client.infer_frames("scenes", frames, outputs=pipeline_step.PIPELINE_OUTPUTS), cls.class_names)]}
        seen, stop, errors = [], threading.Event(), []

        def stream() -> None:
            with triton.client("http") as c:
                while not stop.is_set():
                    try:
                        out = c.infer_frames("scenes", frames, outputs=pipeline_step.PIPELINE_OUTPUTS)
                        seen.append([a["labels"].tolist() for a in pipeline_step.answers(out, cls.class_names)])
                    except Exception as exc:  # noqa: BLE001 - a failed call is what the test must not see
                        errors.append(exc)

        worker = threading.Thread(target=stream)
        worker.start()
        try:
            second = pipeline_step.deploy(store, "scenes", 2, target)
        finally:
            stop.set()
            worker.join(30)
        assert second["previous_version"] == 1 and second["members"]["classifier"] == 2
        with triton.client("http") as client:
            expect[2] = [a["labels"].tolist() for a in pipeline_step.answers(
                client.infer_frames("scenes", frames, outputs=pipeline_step.PIPELINE_OUTPUTS), cls.class_names)]
            assert client.ready_versions(pr.member_model_name("classifier", cls.name)) == [2]
        assert not errors, errors[:3]
        assert expect[1] != expect[2], "two classifiers that answer alike cannot show the swap"
        assert seen and all(s in (expect[1], expect[2]) for s in seen), "an answer mixed two versions' members"
        assert registry.get_version(store, "scenes", 1)["stage"] == "archived"
        assert pr.serving_pipeline_version(home / "model_repo", "scenes") == 2

        # a deploy whose smoke test fails (an impossible floor) is restored: v2 keeps serving
        _set_qc(models, min_readout_accuracy=1.0, smoke_margin=0.0)
        registry.update_version(store, "scenes", 1, lambda m: {**m, "stage": "candidate"})
        with pytest.raises(pipeline_step.PipelineDeployError, match=r"smoke test failed.*restored pipeline v2"):
            pipeline_step.deploy(store, "scenes", 1, target)
        assert pr.serving_pipeline_version(home / "model_repo", "scenes") == 2
        with triton.client("http") as client:
            again = [a["labels"].tolist() for a in pipeline_step.answers(
                client.infer_frames("scenes", frames, outputs=pipeline_step.PIPELINE_OUTPUTS), cls.class_names)]
            assert again == expect[2]
        assert any(e["event"] == "deploy_failed" for e in registry.events(store, "scenes"))

        # rollback by pipeline version: v1's members serve again
        _set_qc(models, min_readout_accuracy=0.0)
        back = pipeline_step.rollback(store, "scenes", 1, target, reason="test")
        assert back["members"] == {"detector": 1, "classifier": 1}
        with triton.client("http") as client:
            assert [a["labels"].tolist() for a in pipeline_step.answers(
                client.infer_frames("scenes", frames, outputs=pipeline_step.PIPELINE_OUTPUTS),
                cls.class_names)] == expect[1]
        assert registry.champion(store, "scenes")["version"] == 1
        status = pipeline_step.status(store, "scenes", target)
        assert status["repository_pins"] == 1 and status["champion"]["members"]["classifier"] == 1
    assert np.isfinite(report["checks"][-1]["value"])
