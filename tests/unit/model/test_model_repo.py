"""Static tests of the model-repository generator (no server): rendering, parsing, wiring, versions."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import text_format

from tasks.model import repo as mr
from tasks.model.repo import ModelRepoError
from tests.support.triton import build_tiny_onnx

ROOT = Path(__file__).resolve().parents[3]
MODEL = "digits"


def _configs(repo: Path) -> dict[str, str]:
    return {p.parent.name: p.read_text() for p in repo.glob("*/config.pbtxt")}


@pytest.mark.parametrize("flavour", mr.FLAVOURS)
def test_both_flavours_render_and_every_config_parses(tmp_path, flavour, tiny_onnx):
    repo = mr.render_repo(flavour, tmp_path / "repo", MODEL)
    texts = _configs(repo)
    assert set(texts) == {"digits", "digits_classifier", "preprocess", "postprocess"}
    for name, text in texts.items():
        cfg = mr.validate_config_text(text)
        assert cfg["name"] == name
        assert cfg["max_batch_size"] == mr.MAX_BATCH == 256
        # the text is protobuf text format: it round-trips through Triton's ModelConfig message
        msg = mr.parse_config(text)
        assert text.split("\n", 1)[1] == text_format.MessageToString(msg, use_short_repeated_primitives=True)
        if name != "digits":
            assert "dynamic_batching" in cfg  # on; the delay may be 0 (queued requests still merge)
    for name in ("preprocess", "postprocess"):
        assert (repo / name / "1" / "model.py").read_text() == (mr.PYTHON_SOURCES / name / "model.py").read_text()
    assert (repo / "digits" / "1").is_dir()
    mr.write_classifier_version(repo, MODEL, 1, tiny_onnx, flavour=flavour)
    mr.set_serving_version(repo, MODEL, 1)
    assert set(mr.validate_repo(repo)) == set(texts)


def test_ensemble_wiring_follows_the_contract(tmp_path):
    repo = mr.render_repo("local", tmp_path / "repo", MODEL)
    ens = mr.validate_config_text((repo / "digits" / "config.pbtxt").read_text())
    assert ens["platform"] == "ensemble"
    assert [(t["name"], t["data_type"], t["dims"]) for t in ens["input"]] == [("IMAGE", "TYPE_UINT8", [28, 28])]
    assert [(t["name"], t["data_type"], t["dims"]) for t in ens["output"]] == [
        ("LABEL", "TYPE_INT64", [1]), ("SCORE", "TYPE_FP32", [1]), ("TOPK_LABELS", "TYPE_INT64", [3]),
        ("TOPK_SCORES", "TYPE_FP32", [3]), ("EMBEDDING", "TYPE_FP32", [64])]
    steps = ens["ensemble_scheduling"]["step"]
    assert [s["model_name"] for s in steps] == ["preprocess", "digits_classifier", "postprocess"]
    assert all(s["model_version"] == -1 for s in steps)
    clf = mr.validate_config_text((repo / "digits_classifier" / "config.pbtxt").read_text())
    assert [t["name"] for t in clf["input"]] == ["input"] and clf["input"][0]["dims"] == [1, 28, 28]
    assert [(t["name"], t["dims"]) for t in clf["output"]] == [("logits", [10]), ("embedding", [64])]
    assert clf["backend"] == "python"  # local flavour: the bundled Triton has only the Python backend
    assert clf["version_policy"] == {"latest": {"num_versions": 1}}  # before the first pin


def test_production_flavour_uses_onnxruntime_then_tensorrt(tmp_path, tiny_onnx):
    repo = mr.render_repo("production", tmp_path / "repo", MODEL)
    mr.write_classifier_version(repo, MODEL, 1, tiny_onnx, flavour="production")
    mr.set_serving_version(repo, MODEL, 1)
    cfg = mr.validate_repo(repo)["digits_classifier"]
    assert cfg["platform"] == "onnxruntime_onnx" and cfg["default_model_filename"] == "model.onnx"
    assert cfg["instance_group"][0]["kind"] == "KIND_GPU"
    assert not (repo / "digits_classifier" / "1" / "model.py").exists()

    plan = tmp_path / "model.plan"
    plan.write_bytes(b"serialized TensorRT engine")
    mr.write_classifier_version(repo, MODEL, 2, tiny_onnx, plan_path=plan, flavour="production")
    mr.set_serving_version(repo, MODEL, 2)
    cfg = mr.validate_repo(repo)["digits_classifier"]
    assert cfg["platform"] == "tensorrt_plan" and cfg["default_model_filename"] == "model.plan"
    assert cfg["version_policy"] == {"specific": {"versions": [2]}}

    mr.set_serving_version(repo, MODEL, 1)  # rollback to an ONNX-only version switches the platform back
    assert mr.validate_repo(repo)["digits_classifier"]["platform"] == "onnxruntime_onnx"
    assert mr.serving_version(repo, MODEL) == 1


def test_atomic_version_write_leaves_only_numbered_folders(tmp_path, tiny_onnx, monkeypatch):
    repo = mr.render_repo("local", tmp_path / "repo", MODEL)
    clf_dir = repo / "digits_classifier"
    path = mr.write_classifier_version(repo, MODEL, 3, tiny_onnx)
    assert path == clf_dir / "3"
    assert sorted(p.name for p in path.iterdir()) == ["mlpipe-version.json", "model.onnx", "model.py"]
    assert json.loads((path / "mlpipe-version.json").read_text())["onnx_sha256"]
    assert [p.name for p in clf_dir.iterdir() if p.is_dir()] == ["3"]

    # same files again: a no-op; different files under the same number: refused
    assert mr.write_classifier_version(repo, MODEL, 3, tiny_onnx) == path
    other = build_tiny_onnx(tmp_path / "other.onnx", seed=1)
    with pytest.raises(ModelRepoError, match="versions are immutable"):
        mr.write_classifier_version(repo, MODEL, 3, other)

    # a failure half-way through leaves neither a version nor a staging folder
    real_copy = shutil.copyfile

    def copy_then_fail(src, dst, *a, **kw):
        if str(dst).endswith("model.py"):
            raise OSError("disk full (simulated)")
        return real_copy(src, dst, *a, **kw)

    monkeypatch.setattr(mr.shutil, "copyfile", copy_then_fail)
    with pytest.raises(OSError, match="disk full"):
        mr.write_classifier_version(repo, MODEL, 4, other)
    monkeypatch.undo()
    names = sorted(p.name for p in clf_dir.iterdir() if p.is_dir())
    assert names == ["3"]
    assert all(re.fullmatch(r"[1-9][0-9]*", n) for n in names)
    assert mr.list_versions(repo, MODEL) == [3]

    # a leftover staging folder from a crash is ignored by list_versions and cleaned by clean_staging
    (clf_dir / ".tmp-9-dead").mkdir()
    assert mr.list_versions(repo, MODEL) == [3]
    assert mr.clean_staging(repo) == [clf_dir / ".tmp-9-dead"]


def test_write_version_checks_inputs(tmp_path, tiny_onnx):
    repo = mr.render_repo("local", tmp_path / "repo", MODEL)
    with pytest.raises(ModelRepoError, match="does not exist"):
        mr.write_classifier_version(repo, MODEL, 1, tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(ModelRepoError, match="not a readable ONNX model"):
        mr.write_classifier_version(repo, MODEL, 1, bad)
    with pytest.raises(ModelRepoError, match="version must be an integer >= 1"):
        mr.write_classifier_version(repo, MODEL, 0, tiny_onnx)
    with pytest.raises(ModelRepoError, match="'local' repository, but a 'production'"):
        mr.write_classifier_version(repo, MODEL, 1, tiny_onnx, flavour="production")
    with pytest.raises(ModelRepoError, match="no rendered model 'other'"):
        mr.write_classifier_version(repo, "other", 1, tiny_onnx)
    with pytest.raises(ModelRepoError, match="holds a 'local' repository"):
        mr.render_repo("production", repo, MODEL)
    assert mr.list_versions(repo, MODEL) == []


def test_onnx_contract_mismatch_is_named(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 28, 28])])
    path = tmp_path / "wrong.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    repo = mr.render_repo("local", tmp_path / "repo", MODEL)
    with pytest.raises(ModelRepoError, match=r"inputs \['x'\].*needs inputs \['input'\]"):
        mr.write_classifier_version(repo, MODEL, 1, path)


def test_set_serving_version_and_remove(tmp_path, tiny_onnx):
    repo = mr.render_repo("local", tmp_path / "repo", MODEL)
    with pytest.raises(ModelRepoError, match="cannot serve version 1"):
        mr.set_serving_version(repo, MODEL, 1)
    mr.write_classifier_version(repo, MODEL, 1, tiny_onnx)
    mr.write_classifier_version(repo, MODEL, 2, tiny_onnx)
    cfg_path = mr.set_serving_version(repo, MODEL, 1)
    before = cfg_path.stat().st_mtime_ns
    mr.set_serving_version(repo, MODEL, 2)
    assert cfg_path.stat().st_mtime_ns > before  # Triton sees a modified model on the next load
    assert mr.serving_version(repo, MODEL) == 2
    assert not [p for p in cfg_path.parent.iterdir() if p.name.startswith(".config")]  # no temp file left

    # re-rendering keeps the pin and does not touch unchanged files
    pre_mtime = (repo / "preprocess" / "config.pbtxt").stat().st_mtime_ns
    mr.render_repo("local", repo, MODEL)
    assert mr.serving_version(repo, MODEL) == 2
    assert (repo / "preprocess" / "config.pbtxt").stat().st_mtime_ns == pre_mtime

    with pytest.raises(ModelRepoError, match="being served"):
        mr.remove_version(repo, MODEL, 2)
    assert mr.remove_version(repo, MODEL, 1) is True
    assert mr.remove_version(repo, MODEL, 1) is False
    assert mr.list_versions(repo, MODEL) == [2]
    assert not [p for p in (repo / "digits_classifier").iterdir() if p.name.startswith(".")]


def test_validator_names_the_problems():
    spec = mr.repo_spec(MODEL)
    good = mr.render_config(spec.ensemble, spec, "local")
    with pytest.raises(ModelRepoError, match="not a valid Triton ModelConfig"):
        mr.validate_config_text(good + "\nno_such_field: 3\n")
    with pytest.raises(ModelRepoError, match="not a valid Triton ModelConfig"):
        mr.validate_config_text(good.replace("TYPE_UINT8", "TYPE_BYTE"))
    broken = good.replace('value: "pixels"', 'value: "pixelz"', 1)  # the preprocess step's output
    with pytest.raises(ModelRepoError, match="reads 'pixels', which no ensemble input or step output provides"):
        mr.validate_config_text(broken)
    with pytest.raises(ModelRepoError, match="'EMBEDDING' is not produced"):
        mr.validate_config_text(good.replace('value: "EMBEDDING"', 'value: "embedding_x"'))
    with pytest.raises(ModelRepoError, match="dims are empty"):
        mr.validate_config_text('name: "m" backend: "python" input [{ name: "a" data_type: TYPE_FP32 }] '
                                'output [{ name: "b" data_type: TYPE_FP32 dims: [1] }]')
    with pytest.raises(ModelRepoError, match="'a': data_type 'TYPE_INVALID' is not a Triton data type"):
        mr.validate_config_text('name: "m" backend: "python" input [{ name: "a" dims: 1 }] '
                                'output [{ name: "b" data_type: TYPE_FP32 dims: [1] }]')


def test_invalid_config_text_names_file_and_line(tmp_path):
    spec = mr.repo_spec(MODEL)
    good = mr.render_config(spec.postprocess, spec, "local")
    lines = good.splitlines()
    at = next(i for i, line in enumerate(lines) if "TYPE_INT64" in line)
    lines[at] = lines[at].replace("TYPE_INT64", "TYPE_X")
    with pytest.raises(ModelRepoError, match=rf"^cfg\.pbtxt:{at + 1}:\d+: not a valid Triton ModelConfig: .*TYPE_X"):
        mr.parse_config_text("\n".join(lines), source="cfg.pbtxt")
    with pytest.raises(ModelRepoError, match=r"^config\.pbtxt:3:\d+: not a valid Triton ModelConfig: .*no_such_field"):
        mr.validate_config_text('name: "m"\nbackend: "python"\nno_such_field: 3\n')
    with pytest.raises(ModelRepoError, match=r"^config\.pbtxt:1:\d+: not a valid Triton ModelConfig"):
        mr.parse_config_text('name: "m" input { name: "a"')  # unclosed message
    assert mr.parse_config(good) == mr.build_config(spec.postprocess, spec, "local")

    # in a repository, the error names the file that is broken
    repo = mr.render_repo("local", tmp_path / "repo", MODEL)
    path = repo / "postprocess" / "config.pbtxt"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ModelRepoError, match=rf"^{re.escape(str(path))}:{at + 1}:\d+: not a valid Triton ModelConfig"):
        mr.validate_repo(repo)
    path.write_text(good)
    pre = repo / "preprocess" / "config.pbtxt"
    pre.write_text('name: "preprocess" backend: "python" input { name: "x" }')
    with pytest.raises(ModelRepoError, match=rf"^invalid {re.escape(str(pre))}:\n  - preprocess: no outputs"):
        mr.validate_repo(repo)


def test_repo_validation_catches_dtype_mismatch_between_steps(tmp_path, tiny_onnx):
    repo = mr.render_repo("local", tmp_path / "repo", MODEL)
    mr.write_classifier_version(repo, MODEL, 1, tiny_onnx)
    mr.set_serving_version(repo, MODEL, 1)
    post = repo / "postprocess" / "config.pbtxt"
    post.write_text(post.read_text().replace('name: "LOGITS"\n  data_type: TYPE_FP32', 'name: "LOGITS"\n  data_type: TYPE_FP16'))
    with pytest.raises(ModelRepoError, match=r"digits_classifier\.logits gives 'logits' as TYPE_FP32 \[10\], "
                                             r"but postprocess\.LOGITS expects TYPE_FP16"):
        mr.validate_repo(repo)
    shutil.rmtree(repo / "digits_classifier" / "1")
    with pytest.raises(ModelRepoError, match="serves version 1, but digits_classifier/1/ does not exist"):
        mr.validate_repo(repo)


def test_checked_in_templates_are_current(tmp_path):
    written = mr.export_templates(tmp_path / "templates")
    for path in written:
        rel = path.relative_to(tmp_path / "templates")
        checked_in = mr.TEMPLATES_DIR / rel
        assert checked_in.is_file(), f"{checked_in} missing: run mlpipe model-repo templates"
        assert checked_in.read_text() == path.read_text(), \
            f"{checked_in} is stale: mlpipe model-repo templates"
        mr.validate_config_text(path.read_text())


def test_python_model_sources_compile():
    for src in mr.PYTHON_SOURCES.glob("*/model.py"):
        compile(src.read_text(), str(src), "exec")


def test_cli_render_add_list_and_errors(tmp_path, tiny_onnx, capsys):
    repo = tmp_path / "repo"
    assert mr.main(["render", "--out", str(repo)]) == 0
    assert mr.main(["--result-json", str(tmp_path / "r.json"), "add-version", "--repo", str(repo),
                    "--version", "1", "--onnx", str(tiny_onnx), "--serve"]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["serving_version"] == 1
    capsys.readouterr()
    assert mr.main(["list", "--repo", str(repo)]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["versions"] == [1] and listed["serving_version"] == 1 and listed["flavour"] == "local"
    assert mr.main(["validate", str(repo)]) == 0
    capsys.readouterr()
    assert mr.main(["set-version", "--repo", str(repo), "--version", "7"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot serve version 7") and "Traceback" not in err


def test_cli_help_runs():
    out = subprocess.run([sys.executable, "-m", "tasks.cli", "model-repo", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "render" in out.stdout and "add-version" in out.stdout
