"""tasks/contracts/spec.py and ``mlpipe spec``: the model spec, its rules and their messages, the shipped
digits and shapes specs, finding a spec by model name, the CLI's exit codes."""

from __future__ import annotations

import copy
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from tasks.contracts.errors import EXIT_BAD_INPUT, BadInput
from tasks.contracts.spec import (TRAINER_PLACEHOLDERS, ModelSpec, SpecError, json_schema, load_spec, parse_spec,
                                  spec_path)

ROOT = Path(__file__).resolve().parents[3]
DIGITS = spec_path("digits", ROOT)


@pytest.fixture(scope="module")
def digits() -> ModelSpec:
    return load_spec(DIGITS)


def digits_data() -> dict[str, Any]:
    return yaml.safe_load(DIGITS.read_text(encoding="utf-8"))


def problems_of(data: Any) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(yaml.safe_dump(data, sort_keys=False), "bad.yaml")
    return info.value.problems


def without_lines(problems: list[str]) -> list[str]:
    return [re.sub(r" \(line \d+\)$", "", p) for p in problems]


# --------------------------------------------------------------------------- the shipped digits spec


def test_the_digits_spec_is_valid(digits):
    assert digits.name == "digits" and digits.task == "classification"
    assert digits.class_names == [str(i) for i in range(10)]
    assert [c.id for c in digits.classes] == list(range(10))
    assert (digits.input.height, digits.input.width, digits.input.channels) == (28, 28, 1)
    assert (digits.input.layout, digits.input.dtype) == ("NCHW", "uint8")
    assert digits.frames.encodings == ["png", "raw"] and digits.frames.raw_bytes == 784
    summary = digits.summary()
    assert "\n" not in summary and summary.startswith("digits: classification of 10 classes")


def test_the_digits_spec_keeps_the_numbers_of_the_original_model(digits):
    """The digits results must not change: the spec holds what the code used to hard-code."""
    assert (digits.num_classes, digits.embedding_dim) == (10, 64)
    assert digits.frames.raw_bytes == 784 == digits.input.pixels and digits.frames.max_frame_bytes == 65536
    assert (digits.onnx.input, digits.onnx.logits, digits.onnx.embedding) == ("input", "logits", "embedding")
    assert (digits.qc.min_accuracy, digits.qc.min_class_recall, digits.qc.max_parity_diff) == (0.95, 0.90, 1e-4)
    assert (digits.golden_set.source, digits.golden_set.per_class, digits.golden_set.seed) == ("mnist", 100, 20240917)
    assert (digits.image_shape, digits.input_shape, digits.pil_mode, digits.image_encoding) == (
        (28, 28), (1, 28, 28), "L", "png")


def test_the_shapes_spec_is_another_shape():
    shapes = load_spec(spec_path("shapes", ROOT))
    assert shapes.class_names == ["circle", "square", "triangle", "cross", "diamond"]
    assert (shapes.image_shape, shapes.input_shape, shapes.pil_mode) == ((48, 48, 3), (3, 48, 48), "RGB")
    assert shapes.image_encoding == "jpeg" and shapes.preprocessing.resize == "stretch"
    assert shapes.class_name(2) == "triangle" and shapes.class_name(99) == "99"


def test_find_spec_by_name_reloads_a_changed_file_and_names_what_is_wrong(tmp_path):
    from tasks.contracts.spec import find_spec, known_models

    assert {"digits", "shapes"} <= set(known_models(ROOT / "models"))
    with pytest.raises(SpecError) as info:
        find_spec("nope", ROOT / "models")
    assert "no model spec for 'nope'" in str(info.value) and "digits" in str(info.value)
    assert isinstance(info.value, BadInput)
    (tmp_path / "tiny").mkdir()
    data = digits_data()
    data["name"] = "tiny"
    target = tmp_path / "tiny" / "spec.yaml"
    target.write_text(yaml.safe_dump(data, sort_keys=False))
    assert find_spec("tiny", tmp_path).embedding_dim == 64
    data["embedding_dim"] = 16
    target.write_text(yaml.safe_dump(data, sort_keys=False) + "\n# changed\n")
    assert find_spec("tiny", tmp_path).embedding_dim == 16
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "spec.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(SpecError, match=r"name: must be the model project's folder name 'other' \(got 'tiny'\)"):
        find_spec("other", tmp_path)


def test_settings_pick_the_spec_by_model_name(tmp_path, monkeypatch):
    from tasks.config import load_settings

    monkeypatch.setenv("MLPIPE_MODEL_NAME", "shapes")
    assert load_settings().model_spec().name == "shapes"
    assert load_settings().model_spec("digits").name == "digits"
    monkeypatch.setenv("MLPIPE_MODELS_DIR", str(tmp_path))
    with pytest.raises(SpecError, match="MLPIPE_MODELS_DIR"):
        load_settings().model_spec()


def test_the_digits_normalisation_is_what_to_input_does(digits):
    import numpy as np

    from tasks.model.networks import to_input

    pixels = (np.arange(28 * 28) % 256).astype(np.uint8).reshape(1, 28, 28)
    norm = digits.preprocessing.normalisation
    expected = (pixels.astype(np.float64) * norm.scale - norm.mean[0]) / norm.std[0]
    np.testing.assert_allclose(to_input(pixels, digits)[:, 0], expected, rtol=0, atol=1e-7)


def test_a_colour_normalisation_with_mean_and_std_is_applied_per_channel(digits):
    import numpy as np

    from tasks.model.networks import to_input

    data = yaml.safe_load(spec_path("shapes", ROOT).read_text())
    data["preprocessing"]["normalisation"].update(mean=[0.5, 0.25, 0.0], std=[0.5, 0.25, 2.0])
    spec = parse_spec(yaml.safe_dump(data))
    img = np.zeros((1, 48, 48, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 255, 0, 102
    x = to_input(img, spec)
    assert x.shape == (1, 3, 48, 48)
    np.testing.assert_allclose(x[0, :, 0, 0], [1.0, -1.0, 0.2], atol=1e-6)


def test_the_digits_trainer_is_the_real_one(digits):
    from tasks.config import load_settings

    module, _, function = digits.trainer.entry_point.partition(":")
    assert callable(getattr(importlib.import_module(module), function))
    dockerfile = (ROOT / "docker" / "trainer.Dockerfile").read_text(encoding="utf-8")
    entrypoint = re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.M)
    assert entrypoint and json.loads(entrypoint.group(1)) == digits.trainer.command
    assert digits.trainer.image == load_settings().k8s.trainer_image  # MLPIPE_TRAINER_IMAGE's default
    assert "{drop_ids}" in digits.trainer.args


def test_the_spec_is_frozen_and_the_yaml_loader_is_pinned(digits):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="frozen"):
        digits.name = "other"  # type: ignore[misc]
    pins = (ROOT / "requirements.txt").read_text(encoding="utf-8")
    assert f"PyYAML=={yaml.__version__}" in pins


# --------------------------------------------------------------------------- every rule names field and rule


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(data: dict[str, Any]) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        node: Any = data
        for p in parents:
            node = node[p]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return mutate


_DELETE = object()

BAD_SPECS = [
    ("class id gap", _set("classes.3.id", 4),
     "classes[3].id: class ids must be 0..n-1 without gaps (got 4 after 2)"),
    ("first class id", _set("classes.0.id", 1),
     "classes[0].id: class ids must be 0..n-1 without gaps (got 1 first, expected 0)"),
    ("duplicate class name", _set("classes.5.name", "2"),
     "classes[5].name: class names must be unique ('2' is also classes[2].name)"),
    ("class name not a string", _set("classes.1.name", 1), "classes[1].name: must be a string (got 1)"),
    ("one class", _set("classes", [{"id": 0, "name": "0"}]), "classes: a classifier needs at least 2 classes (got 1)"),
    ("channels", _set("input.channels", 2), "input.channels: must be 1 or 3 (got 2)"),
    ("layout", _set("input.layout", "CHW"), "input.layout: must be 'NCHW' or 'NHWC' (got 'CHW')"),
    ("height as a string", _set("input.height", "28"), "input.height: must be an integer (got '28')"),
    ("dtype", _set("input.dtype", "float32"), "input.dtype: must be 'uint8' (got 'float32')"),
    ("task", _set("task", "segmentation"), "task: must be 'classification' or 'detection' (got 'segmentation')"),
    ("detection without its section", _set("task", "detection"),
     "detection: required for task detection (stride, max_objects, score_threshold)"),
    ("detection without box sizes", _set("task", "detection"),
     "onnx.box_size: required for task detection: the box size output's name"),
    ("detection without its QC", _set("task", "detection"), "qc.min_precision: required for task detection"),
    ("classifier with a detection section",
     _set("detection", {"stride": 4, "max_objects": 4, "score_threshold": 0.3}), "detection: only for task detection"),
    ("classifier without accuracy", _set("qc.min_accuracy", _DELETE), "qc.min_accuracy: required for task classification"),
    ("entry point", _set("trainer.entry_point", "train"),
     "trainer.entry_point: must look like module:function (got 'train')"),
    ("unknown placeholder", _set("trainer.args", ["--drop-id", "{drop_ids}", "--seed", "{sed}"]),
     "trainer.args[3]: unknown placeholder {sed} (known: " + ", ".join(f"{{{k}}}" for k in TRAINER_PLACEHOLDERS)
     + ")"),
    ("no drops in", _set("trainer.args", ["--epochs", "3"]),
     "trainer.args: must pass the drops in: no argument uses {drop_ids}"),
    ("extra top-level key", _set("colour", "blue"), "colour: unknown key (allowed here: name, task, description, "
                                                    "classes, input, frames, preprocessing, embedding_dim, onnx, "
                                                    "trainer, qc, golden_set, drift, detection)"),
    ("extra nested key", _set("qc.min_acc", 0.9), "qc.min_acc: unknown key (allowed here: min_accuracy, "
                                                  "min_class_recall, min_precision, min_recall, "
                                                  "iou_threshold, max_regression, max_parity_diff, "
                                                  "max_trt_parity_diff)"),
    ("missing section", _set("qc", _DELETE), "qc: required key is missing"),
    ("raw without its size", _set("frames.raw_bytes", _DELETE),
     "frames.raw_bytes: the raw encoding needs a fixed frame size: set raw_bytes (height * width * channels)"),
    ("raw size wrong", _set("frames.raw_bytes", 780),
     "frames.raw_bytes: must be input height * width * channels = 28*28*1 = 784 (got 780)"),
    ("raw with a variable size", _set("input.height", None),
     "frames.encodings: the raw encoding needs a fixed input size (input.height and input.width set)"),
    ("raw size above the frame limit", _set("frames.max_frame_bytes", 700),
     "frames.raw_bytes: must be at most max_frame_bytes (700) (got 784)"),
    ("encoding", _set("frames.encodings", ["png", "gif"]),
     "frames.encodings[1]: must be 'png', 'jpeg' or 'raw' (got 'gif')"),
    ("repeated encoding", _set("frames.encodings", ["png", "raw", "png"]),
     "frames.encodings[2]: each encoding is listed once ('png' is repeated)"),
    ("frame limit", _set("frames.max_frame_bytes", 0), "frames.max_frame_bytes: must be > 0 (got 0)"),
    ("resize", _set("preprocessing.resize", "crop"),
     "preprocessing.resize: must be 'none', 'stretch' or 'letterbox' (got 'crop')"),
    ("std zero", _set("preprocessing.normalisation.std", [0.0]),
     "preprocessing.normalisation.std[0]: must be > 0 (got 0.0)"),
    ("mean per channel", _set("preprocessing.normalisation.mean", [0.5, 0.5, 0.5]),
     "preprocessing.normalisation.std: needs one value per mean value (3) (got 1)"),
    ("min accuracy", _set("qc.min_accuracy", 1.5), "qc.min_accuracy: must be <= 1 (got 1.5)"),
    ("class recall", _set("qc.min_class_recall", -0.1), "qc.min_class_recall: must be >= 0 (got -0.1)"),
    ("parity tolerance", _set("qc.max_parity_diff", 0), "qc.max_parity_diff: must be > 0 (got 0)"),
    ("regression", _set("qc.max_regression", 2), "qc.max_regression: must be <= 1 (got 2)"),
    ("drift js", _set("drift.class_js", 1.2), "drift.class_js: must be <= 1 (got 1.2)"),
    ("drift psi", _set("drift.class_psi", -1), "drift.class_psi: must be >= 0 (got -1)"),
    ("drift samples", _set("drift.min_samples", 5), "drift.min_samples: must be >= 10 (got 5)"),
    ("golden per class", _set("golden_set.per_class", 0), "golden_set.per_class: must be > 0 (got 0)"),
    ("onnx names", _set("onnx.embedding", "logits"),
     "onnx.embedding: tensor names must be distinct ('logits' is also onnx.logits)"),
    ("embedding size", _set("embedding_dim", 0), "embedding_dim: must be > 0 (got 0)"),
    ("model name", _set("name", "Digits v2"), "name: must be lower case letters, digits, '-' or '_', starting "
                                              "with a letter, at most 63 (got 'Digits v2')"),
]


@pytest.mark.parametrize("mutate, expected", [pytest.param(m, e, id=i) for i, m, e in BAD_SPECS])
def test_each_rule_names_the_field_and_the_rule(mutate, expected):
    data = digits_data()
    mutate(data)
    problems = problems_of(data)
    assert expected in without_lines(problems), problems
    assert all(re.search(r" \(line \d+\)$", p) for p in problems), problems


def test_cross_section_rules():
    data = digits_data()
    data["input"].update(height=None, width=None)
    data["frames"] = {"encodings": ["png"], "max_frame_bytes": 65536}
    data["preprocessing"]["resize"] = "letterbox"
    data["preprocessing"]["normalisation"].update(mean=[0.5] * 3, std=[0.25] * 3)
    assert without_lines(problems_of(data)) == [
        "preprocessing.resize: letterbox needs a fixed input size (input.height and input.width set)",
        "preprocessing.normalisation.mean: needs one value per input channel (1) (got 3)",
        "preprocessing.normalisation.std: needs one value per input channel (1) (got 3)",
    ]
    data["input"]["channels"] = 3
    data["preprocessing"]["resize"] = "none"
    spec = parse_spec(yaml.safe_dump(data))  # an RGB model of any size, png only: valid
    assert spec.input.pixels is None and spec.input.channels == 3


def test_every_error_is_reported_at_once_with_its_line():
    data = digits_data()
    data["classes"][3]["id"] = 4
    data["input"]["channels"] = 2
    data["trainer"]["entry_point"] = "train"
    text = yaml.safe_dump(data, sort_keys=False)
    with pytest.raises(SpecError) as info:
        parse_spec(text, "bad.yaml")
    problems = info.value.problems
    assert len(problems) == 3, problems
    lines = text.splitlines()
    for problem, needle in zip(problems, ("id: 4", "channels: 2", "entry_point: train")):
        line = int(re.search(r"\(line (\d+)\)$", problem).group(1))
        assert needle in lines[line - 1], (problem, lines[line - 1])
    assert isinstance(info.value, BadInput) and "3 errors" in str(info.value)


def test_cross_section_rules_are_reported_with_the_other_errors():
    data = digits_data()
    data["frames"]["raw_bytes"] = 780
    data["qc"]["min_accuracy"] = 3
    assert without_lines(problems_of(data)) == [
        "qc.min_accuracy: must be <= 1 (got 3)",
        "frames.raw_bytes: must be input height * width * channels = 28*28*1 = 784 (got 780)",
    ]
    data["qc"]["min_accuracy"] = 0.9
    assert without_lines(problems_of(data)) == [  # alone: once, not twice
        "frames.raw_bytes: must be input height * width * channels = 28*28*1 = 784 (got 780)"]


@pytest.mark.parametrize("text, expected", [
    ("name: digits\nclasses: [\n  - {id: 0}\n", r"^YAML syntax error at line 3, column 3: "),
    ("name: digits\n  task: x\n", r"^YAML syntax error at line 2, column \d+: mapping values are not allowed"),
    ("name: digits\nname: other\n", r"^YAML error at line 2, column 1: duplicate key 'name' \(first at line 1\)$"),
    ("", r"^\(top level\): must be a mapping of spec keys \(got an empty document\)$"),
    ("- a\n- b\n", r"^\(top level\): must be a mapping of spec keys \(got a list\)$"),
])
def test_yaml_errors_name_the_line(text, expected):
    with pytest.raises(SpecError) as info:
        parse_spec(text, "bad.yaml")
    assert len(info.value.problems) == 1 and re.search(expected, info.value.problems[0]), info.value.problems


def test_a_missing_file_is_bad_input(tmp_path):
    with pytest.raises(SpecError, match="cannot read the file"):
        load_spec(tmp_path / "nope.yaml")


def test_the_schema_is_generated_from_the_model():
    schema = json_schema()
    assert schema["additionalProperties"] is False and schema["$id"].endswith("model-spec.schema.json")
    assert set(schema["required"]) >= {"name", "task", "classes", "input", "frames", "preprocessing",
                                       "embedding_dim", "onnx", "trainer", "qc", "golden_set", "drift"}
    assert all(d.get("additionalProperties") is False for d in schema["$defs"].values())


# --------------------------------------------------------------------------- the CLI


def test_cli_check_valid_prints_a_summary(capsys):
    from tasks.tools import spec as cli

    assert cli.main(["check", str(DIGITS)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{DIGITS}: ok" and out[1].startswith("digits: classification of 10 classes") and len(out) == 2


def test_cli_check_invalid_exits_2_with_one_line_per_error(tmp_path, capsys):
    from tasks.tools import spec as cli

    data = digits_data()
    data["input"]["channels"] = 2
    data["trainer"]["entry_point"] = "train"
    bad = tmp_path / "spec.yaml"
    bad.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    assert cli.main(["check", str(DIGITS), str(bad)]) == EXIT_BAD_INPUT
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{DIGITS}: ok"
    assert [re.sub(r" \(line \d+\)$", "", ln) for ln in out[2:]] == [
        f"{bad}: input.channels: must be 1 or 3 (got 2)",
        f"{bad}: trainer.entry_point: must look like module:function (got 'train')",
    ]


def test_cli_schema_prints_the_schema(tmp_path, capsys):
    from tasks.tools import spec as cli

    assert cli.main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out) == json_schema()
    target = tmp_path / "schema.json"
    assert cli.main(["schema", "--write", str(target)]) == 0
    assert json.loads(target.read_text(encoding="utf-8")) == json_schema()


def test_mlpipe_spec_end_to_end(tmp_path):
    """Through ``mlpipe`` (``python -m tasks.cli``): the exit codes and the ``error:`` line."""
    from tasks.cli import COMMANDS

    assert COMMANDS["spec"][0] == "tasks.tools.spec"
    bad = tmp_path / "spec.yaml"
    bad.write_text("name: digits\nclasses: [\n", encoding="utf-8")
    run = [sys.executable, "-m", "tasks.cli", "spec", "check"]
    ok = subprocess.run([*run, str(DIGITS)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    failed = subprocess.run([*run, str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert failed.returncode == EXIT_BAD_INPUT
    assert failed.stdout.startswith(f"{bad}: YAML syntax error at line ")
    assert f"error: invalid model spec: {bad} (1 error, listed above)" in failed.stderr


def test_bad_spec_cases_do_not_share_state():
    data = digits_data()
    before = copy.deepcopy(data)
    problems_of({**data, "colour": 1})
    assert data == before
