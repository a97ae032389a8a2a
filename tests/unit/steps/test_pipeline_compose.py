"""Pipeline versions in the registry (tasks/steps/pipeline.py compose): a set of member versions, each of which
passed its own QC, recorded with lineage; the same set is the same version; a role left out keeps the serving
pipeline's member."""

from __future__ import annotations

import pytest

from tasks.contracts import layout
from tasks.steps import pipeline as pipeline_step
from tasks.steps import registry


def _member(store, model: str, version: int, verdict: str = "passed", stage: str = "candidate",
            drops: tuple[str, ...] = ("d1",)) -> None:
    store.put_json(layout.version_manifest_key(model, version), {
        "model": model, "version": version, "stage": stage, "run_id": f"run-{model}-{version}",
        "lineage": {"drops": [{"drop_id": d} for d in drops]}, "qc": {"verdict": verdict, "report": "r.html"},
        "history": []})


def test_compose_records_the_member_set_with_lineage_and_is_idempotent(store):
    _member(store, "scenes-detector", 1)
    _member(store, "scenes-digits", 3, drops=("d1", "d2"))
    first = pipeline_step.compose(store, "scenes", {"detector": 1, "classifier": 3})
    assert first["kind"] == "pipeline" and first["stage"] == "candidate" and first["version"] == 1
    assert {r: m["version"] for r, m in first["members"].items()} == {"detector": 1, "classifier": 3}
    assert {d["drop_id"] for d in first["lineage"]["drops"]} == {"d1", "d2"}
    assert store.exists(layout.version_file_key("scenes", 1, layout.LINEAGE))
    again = pipeline_step.compose(store, "scenes", {"detector": 1, "classifier": 3})
    assert again["version"] == 1, "the same member set composed twice is the same version"
    events = [e for e in registry.events(store, "scenes") if e["event"] == "register"]
    assert len(events) == 1 and events[0]["members"] == {"detector": 1, "classifier": 3}


def test_a_member_that_failed_its_own_gate_cannot_be_composed(store):
    _member(store, "scenes-detector", 1, verdict="failed", stage="rejected")
    _member(store, "scenes-digits", 1)
    with pytest.raises(pipeline_step.PipelineError, match=r"scenes-detector v1 has not passed its own QC gate"):
        pipeline_step.compose(store, "scenes", {"detector": 1, "classifier": 1})
    assert registry.list_versions(store, "scenes") == []


def test_a_role_left_out_keeps_the_serving_pipelines_member(store):
    _member(store, "scenes-detector", 1)
    _member(store, "scenes-detector", 2)
    _member(store, "scenes-digits", 5)
    served = pipeline_step.compose(store, "scenes", {"detector": 1, "classifier": 5})
    registry.set_stage(store, "scenes", served["version"], "production", "test: serving", mirror=False)
    nxt = pipeline_step.compose(store, "scenes", {"detector": 2})
    assert nxt["version"] == 2
    assert {r: m["version"] for r, m in nxt["members"].items()} == {"detector": 2, "classifier": 5}
    assert nxt["lineage"]["parent_champion"] == 1


def test_unknown_roles_and_members_without_versions_are_refused(store):
    with pytest.raises(pipeline_step.PipelineError, match="unknown pipeline role"):
        pipeline_step.compose(store, "scenes", {"tracker": 1})
    with pytest.raises(pipeline_step.PipelineError, match="no version of member scenes-detector"):
        pipeline_step.compose(store, "scenes", {})


def test_the_cli_names_the_members(capsys):
    assert pipeline_step.main(["members", "--pipeline", "scenes"]) == 0
    assert '"detector": "scenes-detector"' in capsys.readouterr().out


def test_a_production_deploy_puts_each_members_tensorrt_plan_into_the_repository(store, tmp_path):
    import torch

    from tasks.config import load_settings
    from tasks.contracts.pipeline import find_pipeline, member_specs
    from tasks.model import pipeline_repo as pr
    from tasks.model import repo as mr
    from tasks.model.networks import build_model, export_onnx
    from tests.support.pipeline_models import detector_onnx

    cfg = load_settings()
    spec = find_pipeline("scenes", cfg.models_dir)
    specs = member_specs(spec, cfg.models_dir)
    torch.manual_seed(0)
    onnx = {"detector": detector_onnx(tmp_path / "det.onnx", specs["detector"]),
            "classifier": export_onnx(build_model(specs["classifier"]), tmp_path / "cls.onnx", specs["classifier"])}
    for role, path in onnx.items():
        model = spec.member_names[role]
        store.put_file(layout.version_file_key(model, 1, layout.MODEL_ONNX), path)
        if role == "detector":  # only the detector was compiled by TensorRT (a GPU build)
            store.put_bytes(layout.version_prefix(model, 1) + layout.MODEL_PLAN, b"engine bytes")
    repo = tmp_path / "repo"
    members = pipeline_step.write_version(store, repo, spec, {"version": 1, "members": {
        "detector": {"version": 1}, "classifier": {"version": 1}}}, tmp_path / "work", flavour="production")
    assert members == {"detector": 1, "classifier": 1}
    names = pr.member_model_names(spec)
    assert (repo / names["detector"] / "1" / layout.MODEL_PLAN).read_bytes() == b"engine bytes"
    assert not (repo / names["classifier"] / "1" / layout.MODEL_PLAN).exists()
    pr.set_pipeline_serving(repo, spec, 1)  # what the deploy does next: the members' platforms follow their files
    det = mr.parse_config_text((repo / names["detector"] / "config.pbtxt").read_text())
    cls = mr.parse_config_text((repo / names["classifier"] / "config.pbtxt").read_text())
    assert det["platform"] == "tensorrt_plan" and cls["platform"] == "onnxruntime_onnx"
