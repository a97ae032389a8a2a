"""Static tests of the model-repository generator (no server): rendering from the model spec (digits and
shapes), parsing, wiring, the DALI variant, versions."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import text_format

from tasks.config import load_settings
from tasks.contracts.serving import ENSEMBLE_OUTPUTS, FRAME_ERROR, FRAME_INPUT
from tasks.model import frames, repo as mr
from tasks.model.networks import OnnxContractError
from tasks.model.repo import ModelRepoError
from tests.support.triton import build_tiny_onnx

ROOT = Path(__file__).resolve().parents[3]
MODEL = "digits"
SPEC = load_settings().model_spec(MODEL)
SHAPES = load_settings().model_spec("shapes")


def _configs(repo: Path) -> dict[str, str]:
    return {p.parent.name: p.read_text() for p in repo.glob("*/config.pbtxt")}


@pytest.mark.parametrize("flavour", mr.FLAVOURS)
def test_both_flavours_render_and_every_config_parses(tmp_path, flavour, tiny_onnx):
    repo = mr.render_repo(flavour, tmp_path / "repo", SPEC)
    texts = _configs(repo)
    assert set(texts) == {"digits", "digits_classifier", "digits_preprocess", "digits_postprocess"}
    for name, text in texts.items():
        cfg = mr.validate_config_text(text)
        assert cfg["name"] == name
        assert cfg["max_batch_size"] == mr.MAX_BATCH == 256
        # the text is protobuf text format: it round-trips through Triton's ModelConfig message
        msg = mr.parse_config(text)
        assert text.split("\n", 1)[1] == text_format.MessageToString(msg, use_short_repeated_primitives=True)
        if name != "digits":
            assert "dynamic_batching" in cfg  # on; the delay may be 0 (queued requests still merge)
    for role in ("preprocess", "postprocess"):
        assert (repo / f"digits_{role}" / "1" / "model.py").read_text() == \
            (mr.PYTHON_SOURCES / role / "model.py").read_text()
    # the one decoder: the host's frame_codec.py, next to the preprocess model (and only there)
    assert (repo / "digits_preprocess" / "1" / "frame_codec.py").read_bytes() == mr.FRAME_CODEC.read_bytes()
    assert not (repo / "digits_postprocess" / "1" / "frame_codec.py").exists()
    assert (repo / "digits" / "1").is_dir()
    mr.write_classifier_version(repo, SPEC, 1, tiny_onnx, flavour=flavour)
    mr.set_serving_version(repo, SPEC, 1)
    assert set(mr.validate_repo(repo)) == set(texts)


def _tensors(cfg: dict, key: str) -> list[tuple[str, str, list[int]]]:
    return [(t["name"], t["data_type"], t["dims"]) for t in cfg[key]]


@pytest.mark.parametrize("spec", [SPEC, SHAPES], ids=["digits", "shapes"])
def test_every_name_and_dim_comes_from_the_spec(tmp_path, spec):
    repo = mr.render_repo("local", tmp_path / "repo", spec)
    cfgs = mr.validate_repo(repo)
    name, pixels = spec.name, list(spec.input_shape)
    k = min(3, spec.num_classes)
    ens = cfgs[name]
    assert ens["platform"] == "ensemble"
    assert _tensors(ens, "input") == [(FRAME_INPUT, "TYPE_STRING", [1])]
    assert _tensors(ens, "output") == [
        ("LABEL", "TYPE_INT64", [1]), ("SCORE", "TYPE_FP32", [1]), ("TOPK_LABELS", "TYPE_INT64", [k]),
        ("TOPK_SCORES", "TYPE_FP32", [k]), ("EMBEDDING", "TYPE_FP32", [spec.embedding_dim]),
        (FRAME_ERROR, "TYPE_STRING", [1])]
    assert tuple(t[0] for t in _tensors(ens, "output")) == ENSEMBLE_OUTPUTS
    steps = ens["ensemble_scheduling"]["step"]
    assert [s["model_name"] for s in steps] == [f"{name}_preprocess", f"{name}_classifier", f"{name}_postprocess"]
    assert all(s["model_version"] == -1 for s in steps)
    assert steps[0]["output_map"][FRAME_ERROR] == FRAME_ERROR  # straight from the preprocess step

    pre = cfgs[f"{name}_preprocess"]
    assert _tensors(pre, "input") == [(FRAME_INPUT, "TYPE_STRING", [1])]
    assert _tensors(pre, "output") == [("PIXELS", "TYPE_FP32", pixels), (FRAME_ERROR, "TYPE_STRING", [1])]
    assert json.loads(pre["parameters"]["codec"]["string_value"]) == frames.codec_params(spec)

    clf = cfgs[f"{name}_classifier"]
    assert _tensors(clf, "input") == [(spec.onnx.input, "TYPE_FP32", pixels)]
    assert _tensors(clf, "output") == [(spec.onnx.logits, "TYPE_FP32", [spec.num_classes]),
                                       (spec.onnx.embedding, "TYPE_FP32", [spec.embedding_dim])]
    assert clf["backend"] == "python"  # local flavour: the bundled Triton has only the Python backend
    assert clf["version_policy"] == {"latest": {"num_versions": 1}}  # before the first pin
    post = cfgs[f"{name}_postprocess"]
    assert _tensors(post, "input") == [("LOGITS", "TYPE_FP32", [spec.num_classes])]


def test_two_models_of_different_shapes_share_one_repository(tmp_path):
    repo = mr.render_repo("local", tmp_path / "repo", SPEC)
    mr.render_repo("local", repo, SHAPES)
    cfgs = mr.validate_repo(repo)
    assert set(cfgs) == set(mr.model_names("digits")) | set(mr.model_names("shapes"))
    assert cfgs["digits_preprocess"]["output"][0]["dims"] == [1, 28, 28]
    assert cfgs["shapes_preprocess"]["output"][0]["dims"] == [3, 48, 48]
    assert json.loads((repo / mr.MARKER).read_text())["models"] == ["digits", "shapes"]


def test_names_that_collide_with_step_models_and_variable_sizes_are_refused():
    with pytest.raises(ModelRepoError, match="not ending in _preprocess"):
        mr.repo_spec(SPEC.model_copy(update={"name": "x_preprocess"}))
    variable = SPEC.model_copy(update={"input": SPEC.input.model_copy(update={"height": None})})
    with pytest.raises(ModelRepoError, match="needs a fixed input size"):
        mr.repo_spec(variable)
    with pytest.raises(ModelRepoError, match="top_k must be at least 1"):
        mr.repo_spec(SPEC, top_k=0)
    two = SPEC.model_copy(update={"classes": SPEC.classes[:2]})
    assert mr.repo_spec(two).postprocess.outputs[2].dims == (2,)  # top-k = min(3, classes)


def test_production_flavour_uses_onnxruntime_then_tensorrt(tmp_path, tiny_onnx):
    repo = mr.render_repo("production", tmp_path / "repo", SPEC)
    mr.write_classifier_version(repo, SPEC, 1, tiny_onnx, flavour="production")
    mr.set_serving_version(repo, SPEC, 1)
    cfg = mr.validate_repo(repo)["digits_classifier"]
    assert cfg["platform"] == "onnxruntime_onnx" and cfg["default_model_filename"] == "model.onnx"
    assert cfg["instance_group"][0]["kind"] == "KIND_GPU"
    assert not (repo / "digits_classifier" / "1" / "model.py").exists()

    plan = tmp_path / "model.plan"
    plan.write_bytes(b"serialized TensorRT engine")
    mr.write_classifier_version(repo, SPEC, 2, tiny_onnx, plan_path=plan, flavour="production")
    mr.set_serving_version(repo, SPEC, 2)
    cfg = mr.validate_repo(repo)["digits_classifier"]
    assert cfg["platform"] == "tensorrt_plan" and cfg["default_model_filename"] == "model.plan"
    assert cfg["version_policy"] == {"specific": {"versions": [2]}}

    mr.set_serving_version(repo, SPEC, 1)  # rollback to an ONNX-only version switches the platform back
    assert mr.validate_repo(repo)["digits_classifier"]["platform"] == "onnxruntime_onnx"
    assert mr.serving_version(repo, MODEL) == 1


def test_atomic_version_write_leaves_only_numbered_folders(tmp_path, tiny_onnx, monkeypatch):
    repo = mr.render_repo("local", tmp_path / "repo", SPEC)
    clf_dir = repo / "digits_classifier"
    path = mr.write_classifier_version(repo, SPEC, 3, tiny_onnx)
    assert path == clf_dir / "3"
    assert sorted(p.name for p in path.iterdir()) == ["mlpipe-version.json", "model.onnx", "model.py"]
    assert json.loads((path / "mlpipe-version.json").read_text())["onnx_sha256"]
    assert [p.name for p in clf_dir.iterdir() if p.is_dir()] == ["3"]

    # same files again: a no-op; different files under the same number: refused
    assert mr.write_classifier_version(repo, SPEC, 3, tiny_onnx) == path
    other = build_tiny_onnx(tmp_path / "other.onnx", seed=1)
    with pytest.raises(ModelRepoError, match="versions are immutable"):
        mr.write_classifier_version(repo, SPEC, 3, other)

    # a failure half-way through leaves neither a version nor a staging folder
    real_copy = shutil.copyfile

    def copy_then_fail(src, dst, *a, **kw):
        if str(dst).endswith("model.py"):
            raise OSError("disk full (simulated)")
        return real_copy(src, dst, *a, **kw)

    monkeypatch.setattr(mr.shutil, "copyfile", copy_then_fail)
    with pytest.raises(OSError, match="disk full"):
        mr.write_classifier_version(repo, SPEC, 4, other)
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
    repo = mr.render_repo("local", tmp_path / "repo", SPEC)
    with pytest.raises(ModelRepoError, match="does not exist"):
        mr.write_classifier_version(repo, SPEC, 1, tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(OnnxContractError, match="not a loadable ONNX model"):
        mr.write_classifier_version(repo, SPEC, 1, bad)
    with pytest.raises(ModelRepoError, match="version must be an integer >= 1"):
        mr.write_classifier_version(repo, SPEC, 0, tiny_onnx)
    with pytest.raises(ModelRepoError, match="'local' repository, but a 'production'"):
        mr.write_classifier_version(repo, SPEC, 1, tiny_onnx, flavour="production")
    with pytest.raises(ModelRepoError, match="no rendered model 'shapes'.*--model shapes"):
        mr.write_classifier_version(repo, SHAPES, 1, tiny_onnx)
    with pytest.raises(ModelRepoError, match="holds a 'local' repository"):
        mr.render_repo("production", repo, SPEC)
    assert mr.list_versions(repo, MODEL) == []


def test_onnx_contract_mismatch_is_named(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 28, 28])])
    path = tmp_path / "wrong.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    repo = mr.render_repo("local", tmp_path / "repo", SPEC)
    with pytest.raises(OnnxContractError, match=r"input 'input' float32 \['N', 1, 28, 28\] is missing"):
        mr.write_classifier_version(repo, SPEC, 1, path)
    # a digits-shaped model is not a shapes model: the message names the tensor and the spec's shape
    mr.render_repo("local", repo, SHAPES)
    with pytest.raises(OnnxContractError, match=r"input 'input' has shape .*expected \['N', 3, 48, 48\]"):
        mr.write_classifier_version(repo, SHAPES, 1, build_tiny_onnx(tmp_path / "digits.onnx"))
    assert mr.list_versions(repo, "shapes") == []


def test_set_serving_version_and_remove(tmp_path, tiny_onnx):
    repo = mr.render_repo("local", tmp_path / "repo", SPEC)
    with pytest.raises(ModelRepoError, match="cannot serve version 1"):
        mr.set_serving_version(repo, SPEC, 1)
    mr.write_classifier_version(repo, SPEC, 1, tiny_onnx)
    mr.write_classifier_version(repo, SPEC, 2, tiny_onnx)
    cfg_path = mr.set_serving_version(repo, SPEC, 1)
    before = cfg_path.stat().st_mtime_ns
    mr.set_serving_version(repo, SPEC, 2)
    assert cfg_path.stat().st_mtime_ns > before  # Triton sees a modified model on the next load
    assert mr.serving_version(repo, MODEL) == 2
    assert not [p for p in cfg_path.parent.iterdir() if p.name.startswith(".config")]  # no temp file left

    # re-rendering keeps the pin and does not touch unchanged files
    pre_mtime = (repo / "digits_preprocess" / "config.pbtxt").stat().st_mtime_ns
    clf_mtime = cfg_path.stat().st_mtime_ns
    mr.render_repo("local", repo, SPEC)
    assert mr.serving_version(repo, MODEL) == 2
    assert (repo / "digits_preprocess" / "config.pbtxt").stat().st_mtime_ns == pre_mtime
    assert cfg_path.stat().st_mtime_ns == clf_mtime  # the pin is kept without a rewrite (no reload)

    with pytest.raises(ModelRepoError, match="being served"):
        mr.remove_version(repo, MODEL, 2)
    assert mr.remove_version(repo, MODEL, 1) is True
    assert mr.remove_version(repo, MODEL, 1) is False
    assert mr.list_versions(repo, MODEL) == [2]
    assert not [p for p in (repo / "digits_classifier").iterdir() if p.name.startswith(".")]


def test_validator_names_the_problems():
    spec = mr.repo_spec(SPEC)
    good = mr.render_config(spec.ensemble, spec, "local")
    with pytest.raises(ModelRepoError, match="not a valid Triton ModelConfig"):
        mr.validate_config_text(good + "\nno_such_field: 3\n")
    with pytest.raises(ModelRepoError, match="not a valid Triton ModelConfig"):
        mr.validate_config_text(good.replace("TYPE_STRING", "TYPE_BYTE"))
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
    spec = mr.repo_spec(SPEC)
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
    repo = mr.render_repo("local", tmp_path / "repo", SPEC)
    path = repo / "digits_postprocess" / "config.pbtxt"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ModelRepoError, match=rf"^{re.escape(str(path))}:{at + 1}:\d+: not a valid Triton ModelConfig"):
        mr.validate_repo(repo)
    path.write_text(good)
    pre = repo / "digits_preprocess" / "config.pbtxt"
    pre.write_text('name: "digits_preprocess" backend: "python" input { name: "x" }')
    with pytest.raises(ModelRepoError, match=rf"^invalid {re.escape(str(pre))}:\n  - digits_preprocess: no outputs"):
        mr.validate_repo(repo)


def test_repo_validation_catches_dtype_mismatch_between_steps(tmp_path, tiny_onnx):
    repo = mr.render_repo("local", tmp_path / "repo", SPEC)
    mr.write_classifier_version(repo, SPEC, 1, tiny_onnx)
    mr.set_serving_version(repo, SPEC, 1)
    post = repo / "digits_postprocess" / "config.pbtxt"
    post.write_text(post.read_text().replace('name: "LOGITS"\n  data_type: TYPE_FP32', 'name: "LOGITS"\n  data_type: TYPE_FP16'))
    with pytest.raises(ModelRepoError, match=r"digits_classifier\.logits gives 'logits' as TYPE_FP32 \[10\], "
                                             r"but digits_postprocess\.LOGITS expects TYPE_FP16"):
        mr.validate_repo(repo)
    shutil.rmtree(repo / "digits_classifier" / "1")
    with pytest.raises(ModelRepoError, match="serves version 1, but digits_classifier/1/ does not exist"):
        mr.validate_repo(repo)


@pytest.mark.parametrize("spec", [SPEC, SHAPES], ids=["digits", "shapes"])
def test_checked_in_templates_are_current(tmp_path, spec):
    written = mr.export_templates(spec, tmp_path / "templates")
    for path in written:
        rel = path.relative_to(tmp_path / "templates")
        checked_in = mr.TEMPLATES_DIR / rel
        fix = f"run mlpipe model-repo templates --model {spec.name}"
        assert checked_in.is_file(), f"{checked_in} missing: {fix}"
        assert checked_in.read_text() == path.read_text(), f"{checked_in} is stale: {fix}"
        if path.suffix == ".pbtxt":
            mr.validate_config_text(path.read_text())


def _dali_calls(source: str) -> dict[str, dict[str, object]]:
    """``fn.<op>`` calls of a DALI pipeline source -> their keyword arguments (literals and module constants)."""
    tree = ast.parse(source)
    consts: dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            target, value = node.targets[0], ast.literal_eval(node.value)
            names = [e.id for e in target.elts] if isinstance(target, ast.Tuple) else [target.id]
            values = list(value) if isinstance(target, ast.Tuple) else [value]
            consts.update(zip(names, values))

    def val(node: ast.AST) -> object:
        if isinstance(node, ast.Name):
            return consts[node.id]
        if isinstance(node, ast.Attribute):
            return ast.unparse(node)
        if isinstance(node, ast.List):
            return [val(e) for e in node.elts]
        return ast.literal_eval(node)

    calls = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func).startswith("fn."):
            calls[ast.unparse(node.func)] = {k.arg: val(k.value) for k in node.keywords}
    return calls


@pytest.mark.parametrize("spec", [SPEC, SHAPES], ids=["digits", "shapes"])
def test_dali_preprocess_variant_is_rendered_from_the_spec(tmp_path, spec):
    """DALI cannot run here: the variant is checked statically (config parses, pipeline compiles, numbers match)."""
    written = mr.render_dali_preprocess(spec, tmp_path / "dali")
    name = spec.name
    assert sorted(p.relative_to(tmp_path / "dali").as_posix() for p in written) == [
        f"{name}/config.pbtxt", f"{name}_preprocess/1/dali.py", f"{name}_preprocess/config.pbtxt"]
    pre = mr.validate_config_text((tmp_path / "dali" / f"{name}_preprocess" / "config.pbtxt").read_text())
    assert pre["backend"] == "dali" and pre["instance_group"][0]["kind"] == "KIND_GPU"
    assert pre["input"] == [{"name": FRAME_INPUT, "data_type": "TYPE_UINT8", "dims": [-1], "allow_ragged_batch": True}]
    assert _tensors(pre, "output") == [("PIXELS", "TYPE_FP32", list(spec.input_shape))]
    ens = mr.validate_config_text((tmp_path / "dali" / name / "config.pbtxt").read_text())
    assert _tensors(ens, "input") == [(FRAME_INPUT, "TYPE_UINT8", [-1])]
    assert [t[0] for t in _tensors(ens, "output")] == [o for o in ENSEMBLE_OUTPUTS if o != FRAME_ERROR]

    source = (tmp_path / "dali" / f"{name}_preprocess" / "1" / "dali.py").read_text()
    compile(source, "dali.py", "exec")
    calls = _dali_calls(source)
    assert calls["fn.external_source"]["name"] == FRAME_INPUT
    assert calls["fn.decoders.image"]["device"] == "mixed"
    assert calls["fn.decoders.image"]["output_type"] == ("types.GRAY" if spec.input.channels == 1 else "types.RGB")
    norm, h, w = spec.preprocessing.normalisation, spec.input.height, spec.input.width
    cmn = calls["fn.crop_mirror_normalize"]
    assert cmn["output_layout"] == ("CHW" if spec.input.layout == "NCHW" else "HWC")
    # DALI computes (pixel - mean) / std: the spec's (pixel * scale - mean) / std in pixel units
    assert cmn["mean"] == pytest.approx([m / norm.scale for m in norm.mean])
    assert cmn["std"] == pytest.approx([s / norm.scale for s in norm.std])
    if spec.preprocessing.resize == "stretch":
        assert (calls["fn.resize"]["resize_y"], calls["fn.resize"]["resize_x"]) == (h, w)
        assert "crop" not in cmn
    else:
        assert "fn.resize" not in calls and cmn["crop"] == [h, w]


def test_python_model_sources_compile():
    sources = list(mr.PYTHON_SOURCES.glob("*/model.py"))
    assert sorted(p.parent.name for p in sources) == ["classifier_ort", "pipeline", "postprocess", "preprocess"]
    for src in sources:
        compile(src.read_text(), str(src), "exec")


def test_cli_render_add_list_and_errors(tmp_path, tiny_onnx, capsys):
    repo = tmp_path / "repo"
    assert mr.main(["render", "--out", str(repo), "--model", "shapes"]) == 0
    assert json.loads(capsys.readouterr().out)["model_name"] == "shapes" and (repo / "shapes_preprocess").is_dir()
    assert mr.main(["render", "--out", str(repo)]) == 0  # MLPIPE_MODEL_NAME's default: digits
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
    assert mr.main(["render", "--out", str(repo), "--model", "nope"]) == 2
    assert "no model spec for 'nope'" in capsys.readouterr().err
    # a classifier of another shape is rejected (exit 3), naming the tensor
    assert mr.main(["add-version", "--repo", str(repo), "--model", "shapes", "--version", "1",
                    "--onnx", str(tiny_onnx)]) == 3
    assert "expected ['N', 3, 48, 48]" in capsys.readouterr().err


def test_cli_help_runs():
    out = subprocess.run([sys.executable, "-m", "tasks.cli", "model-repo", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "render" in out.stdout and "add-version" in out.stdout
