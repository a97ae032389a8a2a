"""The pipeline in the Triton model repository (tasks/model/pipeline_repo.py): configs, versions, members.json,
pins and member policies. No server: tests/integration/test_pipeline_triton.py serves it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.config import load_settings
from tasks.contracts.pipeline import find_pipeline, member_specs
from tasks.contracts.serving import MAX_BATCH, PIPELINE_MEMBERS_FILE, PIPELINE_OUTPUTS
from tasks.model import pipeline_repo as pr
from tasks.model import repo as mr
from tests.support.pipeline_models import detector_onnx

SETTINGS = load_settings()
PIPE = find_pipeline("scenes", SETTINGS.models_dir)
SPECS = member_specs(PIPE, SETTINGS.models_dir)
DET, CLS = SPECS["detector"], SPECS["classifier"]
NAMES = pr.member_model_names(PIPE)


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    import torch

    from tasks.model.networks import build_model, export_onnx

    work = tmp_path_factory.mktemp("pipeline-onnx")
    torch.manual_seed(0)
    cls = export_onnx(build_model(CLS), work / "cls.onnx", CLS)
    return {"detector": detector_onnx(work / "det1.onnx", DET), "detector2": detector_onnx(work / "det2.onnx", DET, 20.0),
            "classifier": cls}


def _cfg(repo: Path, name: str) -> dict:
    return mr.parse_config_text((repo / name / "config.pbtxt").read_text())


def _filled(tmp_path: Path, onnx_files: dict, flavour: str = "local") -> Path:
    repo = tmp_path / "repo"
    pr.render_pipeline(flavour, repo, PIPE, SETTINGS.models_dir)
    pr.write_member_version(repo, DET, 1, onnx_files["detector"], pipeline=PIPE.name)
    pr.write_member_version(repo, DET, 2, onnx_files["detector2"])
    pr.write_member_version(repo, CLS, 1, onnx_files["classifier"])
    pr.write_pipeline_version(repo, PIPE, SETTINGS.models_dir, 1, {"detector": 1, "classifier": 1})
    pr.write_pipeline_version(repo, PIPE, SETTINGS.models_dir, 2, {"detector": 2, "classifier": 1})
    return repo


def test_render_gives_valid_configs_of_the_pipeline_and_both_members(tmp_path):
    repo = tmp_path / "repo"
    paths = pr.render_pipeline("local", repo, PIPE, SETTINGS.models_dir)
    assert NAMES == {"detector": "scenes-detector_detector", "classifier": "scenes-digits_classifier"}
    assert sorted(p.parent.name for p in paths) == sorted([PIPE.name, *NAMES.values()])
    for p in paths:
        mr.validate_config_text(p.read_text(), source=p)
    assert set(mr.validate_repo(repo)) == {PIPE.name, *NAMES.values()}
    k, det = DET.detection.max_objects, DET.detection
    pipe = _cfg(repo, PIPE.name)
    assert pipe["backend"] == "python" and pipe["max_batch_size"] == MAX_BATCH
    assert [i["name"] for i in pipe["input"]] == ["FRAME"] and pipe["input"][0]["data_type"] == "TYPE_STRING"
    outs = {o["name"]: (o["data_type"], o["dims"]) for o in pipe["output"]}
    assert tuple(outs) == PIPELINE_OUTPUTS
    assert outs["BOXES"] == ("TYPE_FP32", [k, 4]) and outs["BOX_LABELS"] == ("TYPE_INT64", [k])
    assert outs["COUNT"] == ("TYPE_INT32", [1]) and outs["READOUT"] == ("TYPE_STRING", [1])
    assert outs["EMBEDDING"] == ("TYPE_FP32", [DET.embedding_dim])
    d = _cfg(repo, NAMES["detector"])
    h, w = DET.input.height // det.stride, DET.input.width // det.stride
    assert {o["name"]: o["dims"] for o in d["output"]} == {
        DET.onnx.logits: [DET.num_classes, h, w], DET.onnx.box_size: [2, h, w], DET.onnx.embedding: [DET.embedding_dim]}
    assert d["input"][0]["dims"] == list(DET.input_shape) and d["backend"] == "python"
    # the classifier member is the classifier repo.py renders for that spec (tensors, dims)
    c = _cfg(repo, NAMES["classifier"])
    own = mr.parse_config_text(mr.render_config(mr.repo_spec(CLS).classifier, mr.repo_spec(CLS), "local"))
    assert (c["input"], c["output"], c["backend"]) == (own["input"], own["output"], own["backend"])
    for cfg in (pipe, d, c):  # nothing pinned yet
        assert cfg["version_policy"] == {"latest": {"num_versions": 1}}
    assert json.loads((repo / mr.MARKER).read_text())["pipelines"] == [PIPE.name]


def test_render_is_idempotent_and_keeps_pins(tmp_path, onnx_files):
    repo = _filled(tmp_path, onnx_files)
    pr.set_pipeline_serving(repo, PIPE, 2, keep_members={"detector": {1}})
    mtimes = {p: p.stat().st_mtime_ns for p in repo.glob("*/config.pbtxt")}
    pr.render_pipeline("local", repo, PIPE, SETTINGS.models_dir)
    assert {p: p.stat().st_mtime_ns for p in repo.glob("*/config.pbtxt")} == mtimes
    assert pr.serving_pipeline_version(repo, PIPE.name) == 2
    assert pr.member_policies(repo, PIPE) == {"detector": [1, 2], "classifier": [1]}
    with pytest.raises(mr.ModelRepoError, match="'local' repository"):
        pr.render_pipeline("production", repo, PIPE, SETTINGS.models_dir)
    with pytest.raises(mr.ModelRepoError, match="max_batch_size 256"):
        pr.render_pipeline("local", repo, PIPE, SETTINGS.models_dir, max_batch_size=8)


def test_member_versions_are_atomic_immutable_and_checked(tmp_path, onnx_files):
    repo = _filled(tmp_path, onnx_files)
    vdir = repo / NAMES["detector"] / "1"
    assert sorted(p.name for p in vdir.iterdir()) == ["mlpipe-version.json", "model.onnx", "model.py"]
    meta = json.loads((vdir / "mlpipe-version.json").read_text())
    assert meta["role"] == "detector" and meta["model"] == DET.name and meta["pipeline"] == PIPE.name
    assert sorted(p.name for p in (repo / NAMES["classifier"] / "1").iterdir()) == [
        "mlpipe-version.json", "model.onnx", "model.py"]
    assert not list((repo / NAMES["detector"]).glob(".tmp-*"))
    # the same files again: a no-op; other files under the number: refused
    assert pr.write_member_version(repo, DET, 1, onnx_files["detector"]) == vdir
    with pytest.raises(mr.ModelRepoError, match="versions are immutable"):
        pr.write_member_version(repo, DET, 1, onnx_files["detector2"])
    # a classifier file as the detector breaks the detector's ONNX contract
    from tasks.model.networks import OnnxContractError

    with pytest.raises(OnnxContractError):
        pr.write_member_version(repo, DET, 3, onnx_files["classifier"])
    assert not (repo / NAMES["detector"] / "3").exists()
    with pytest.raises(mr.ModelRepoError, match="run render_pipeline first"):
        pr.write_member_version(tmp_path / "nothing", DET, 1, onnx_files["detector"])


def test_pipeline_version_folder_and_members_json(tmp_path, onnx_files):
    repo = _filled(tmp_path, onnx_files)
    vdir = repo / PIPE.name / "1"
    assert sorted(p.name for p in vdir.iterdir()) == sorted(
        ["model.py", "frame_codec.py", "scene_codec.py", PIPELINE_MEMBERS_FILE, "mlpipe-version.json"])
    assert (vdir / "scene_codec.py").read_bytes() == pr.SCENE_CODEC.read_bytes()
    doc = json.loads((vdir / PIPELINE_MEMBERS_FILE).read_text())
    assert doc["pipeline"] == PIPE.name and doc["version"] == 1
    assert {r: (m["model"], m["version"], m["name"]) for r, m in doc["members"].items()} == {
        "detector": (NAMES["detector"], 1, DET.name), "classifier": (NAMES["classifier"], 1, CLS.name)}
    assert doc["members"]["detector"]["box_size"] == DET.onnx.box_size
    assert doc["detection"]["max_objects"] == DET.detection.max_objects
    assert doc["detection"]["score_threshold"] == DET.detection.score_threshold
    assert doc["crop"] == {"height": PIPE.crop.height, "width": PIPE.crop.width, "channels": PIPE.crop.channels,
                           "padding": PIPE.crop.padding, "square": PIPE.crop.square}
    assert doc["class_names"] == CLS.class_names
    assert doc["frame_codec"]["height"] == DET.input.height and doc["crop_codec"]["channels"] == CLS.input.channels
    assert pr.pipeline_members(repo, PIPE.name, 2) == {"detector": 2, "classifier": 1}
    assert pr.list_pipeline_versions(repo, PIPE.name) == [1, 2]
    # same members again: no-op; other members under the number: refused; a member version not written: refused
    assert pr.write_pipeline_version(repo, PIPE, SETTINGS.models_dir, 1, {"detector": 1, "classifier": 1}) == vdir
    with pytest.raises(mr.ModelRepoError, match="versions are immutable"):
        pr.write_pipeline_version(repo, PIPE, SETTINGS.models_dir, 1, {"detector": 2, "classifier": 1})
    with pytest.raises(mr.ModelRepoError, match="classifier scenes-digits_classifier version 7 is not in"):
        pr.write_pipeline_version(repo, PIPE, SETTINGS.models_dir, 3, {"detector": 1, "classifier": 7})
    with pytest.raises(mr.ModelRepoError, match="exactly detector, classifier"):
        pr.write_pipeline_version(repo, PIPE, SETTINGS.models_dir, 3, {"detector": 1})
    assert pr.list_pipeline_versions(repo, PIPE.name) == [1, 2]


def test_set_pipeline_serving_pins_and_sets_member_policies(tmp_path, onnx_files):
    repo = _filled(tmp_path, onnx_files)
    assert pr.serving_pipeline_version(repo, PIPE.name) is None
    pr.set_pipeline_serving(repo, PIPE, 1)
    assert pr.serving_pipeline_version(repo, PIPE.name) == 1
    assert pr.member_policies(repo, PIPE) == {"detector": [1], "classifier": [1]}
    # the switch: members old + new, pipeline pinned to the new one
    written = pr.set_pipeline_serving(repo, PIPE, 2, keep_members={"detector": {1}, "classifier": {1}})
    assert set(written) == {"pipeline", "detector", "classifier"}
    assert pr.serving_pipeline_version(repo, PIPE.name) == 2
    assert pr.member_policies(repo, PIPE) == {"detector": [1, 2], "classifier": [1]}
    assert _cfg(repo, PIPE.name)["version_policy"] == {"specific": {"versions": [2]}}
    mr.validate_repo(repo)
    # retire the old members: an unchanged config keeps its mtime (Triton does not reload it)
    clf_cfg = repo / NAMES["classifier"] / "config.pbtxt"
    before = clf_cfg.stat().st_mtime_ns
    pr.set_pipeline_serving(repo, PIPE, 2)
    assert pr.member_policies(repo, PIPE) == {"detector": [2], "classifier": [1]}
    assert clf_cfg.stat().st_mtime_ns == before
    with pytest.raises(mr.ModelRepoError, match="lacks versions \\[5\\]"):
        pr.set_pipeline_serving(repo, PIPE, 2, keep_members={"detector": {5}})
    with pytest.raises(mr.ModelRepoError, match="no version 9"):
        pr.set_pipeline_serving(repo, PIPE, 9)
    with pytest.raises(mr.ModelRepoError, match="unknown roles"):
        pr.set_pipeline_serving(repo, PIPE, 2, keep_members={"postprocess": {1}})
    assert pr.serving_pipeline_version(repo, PIPE.name) == 2 and pr.member_policies(repo, PIPE)["detector"] == [2]


def test_production_flavour_members_use_onnxruntime_or_tensorrt(tmp_path, onnx_files):
    repo = tmp_path / "repo"
    pr.render_pipeline("production", repo, PIPE, SETTINGS.models_dir)
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"plan")
    pr.write_member_version(repo, DET, 1, onnx_files["detector"], plan_path=plan)
    pr.write_member_version(repo, DET, 2, onnx_files["detector2"])
    pr.write_member_version(repo, CLS, 1, onnx_files["classifier"], plan_path=plan)
    assert not (repo / NAMES["detector"] / "1" / "model.py").exists()
    pr.write_pipeline_version(repo, PIPE, SETTINGS.models_dir, 1, {"detector": 1, "classifier": 1})
    pr.write_pipeline_version(repo, PIPE, SETTINGS.models_dir, 2, {"detector": 2, "classifier": 1})
    pr.set_pipeline_serving(repo, PIPE, 1)
    d, c, p = _cfg(repo, NAMES["detector"]), _cfg(repo, NAMES["classifier"]), _cfg(repo, PIPE.name)
    assert (d["platform"], d["default_model_filename"]) == ("tensorrt_plan", "model.plan")
    assert c["platform"] == "tensorrt_plan" and d["instance_group"][0]["kind"] == "KIND_GPU"
    assert p["backend"] == "python" and p["instance_group"][0]["kind"] == "KIND_CPU"
    # version 2 has no plan: a policy listing both serves ONNX Runtime
    pr.set_pipeline_serving(repo, PIPE, 2, keep_members={"detector": {1}})
    d = _cfg(repo, NAMES["detector"])
    assert (d["platform"], d["default_model_filename"]) == ("onnxruntime_onnx", "model.onnx")
    mr.validate_repo(repo)
