"""The pipeline spec (tasks/contracts/pipeline.py) and the detection task of the model spec: the shipped
files are valid, each rule names its field, and the rules between a pipeline and its members hold."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tasks.config import PROJECT_ROOT
from tasks.contracts.pipeline import (find_pipeline, is_pipeline, member_specs, parse_pipeline, pipeline_of)
from tasks.contracts.spec import SpecError, find_spec, parse_spec
from tasks.tools.spec import main as spec_main

MODELS = PROJECT_ROOT / "models"


def _pipeline_data() -> dict:
    return yaml.safe_load((MODELS / "scenes" / "pipeline.yaml").read_text())


def _problems(data: dict) -> list[str]:
    with pytest.raises(SpecError) as err:
        parse_pipeline(yaml.safe_dump(data), "p.yaml")
    return [p.split(" (line")[0] for p in err.value.problems]


def test_the_shipped_pipeline_and_its_members_are_valid():
    spec = find_pipeline("scenes", MODELS)
    members = member_specs(spec, MODELS)
    assert members["detector"].task == "detection" and members["classifier"].task == "classification"
    assert members["detector"].detection.max_objects >= spec.data.objects[1]
    assert is_pipeline("scenes", MODELS) and not is_pipeline("digits", MODELS)
    assert pipeline_of("scenes-detector", MODELS).name == "scenes"
    assert pipeline_of("digits", MODELS) is None


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["data"].update(objects=[3, 1]), "data.objects: must be [min, max] with 0 <= min <= max (got [3, 1])"),
    (lambda d: d["data"].update(scale=[0.5, 1.5]), "data.scale: must be [min, max] with 0 < min <= max <= 1"),
    (lambda d: d["members"].update(classifier="scenes-detector"), "members.classifier: must be another model"),
    (lambda d: d.update(colour="red"), "colour: unknown key"),
    (lambda d: d["qc"].pop("min_readout_accuracy"), "qc.min_readout_accuracy: required key is missing"),
])
def test_each_pipeline_rule_names_its_field(mutate, expected):
    data = _pipeline_data()
    mutate(data)
    assert any(p.startswith(expected) for p in _problems(data)), _problems(data)


def test_members_must_fit_the_pipeline(tmp_path: Path):
    for name in ("scenes", "scenes-detector", "scenes-digits"):
        shutil.copytree(MODELS / name, tmp_path / name)
    data = _pipeline_data()
    data["crop"]["height"] = 32
    data["data"]["objects"] = [1, 9]
    data["members"]["detector"] = "scenes-digits"
    data["members"]["classifier"] = "scenes-detector"
    (tmp_path / "scenes" / "pipeline.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError) as err:
        find_pipeline("scenes", tmp_path)
    text = str(err.value)
    assert "members.detector: 'scenes-digits' must be a detection model" in text
    assert "members.classifier: 'scenes-detector' must be a classification model" in text
    assert "crop: must be the classifier's input size" in text


def test_detection_spec_rules():
    data = yaml.safe_load((MODELS / "scenes-detector" / "spec.yaml").read_text())
    data["detection"]["peak_window"] = 2
    with pytest.raises(SpecError, match=r"detection.peak_window: must be odd \(got 2\)"):
        parse_spec(yaml.safe_dump(data))
    data["detection"]["peak_window"] = 3
    data["detection"]["stride"] = 5
    with pytest.raises(SpecError, match=r"detection.stride: must divide input.height \(96\) \(got 5\)"):
        parse_spec(yaml.safe_dump(data))
    assert "precision >= 0.9" in find_spec("scenes-detector", MODELS).summary()


def test_spec_check_takes_a_pipeline_file(capsys):
    assert spec_main(["check", str(MODELS / "scenes" / "pipeline.yaml")]) == 0
    assert "scenes: pipeline detector scenes-detector" in capsys.readouterr().out


def test_a_pipeline_name_where_a_model_is_expected_says_what_to_do(monkeypatch):
    from tasks.config import load_settings

    monkeypatch.setenv("MLPIPE_MODELS_DIR", str(MODELS))
    with pytest.raises(SpecError, match=r"'scenes' is a pipeline .* members are detector scenes-detector, "
                                        r"classifier scenes-digits; .*retrain_pipeline DAG"):
        load_settings().model_spec("scenes")
    assert load_settings().frame_spec("scenes").name == "scenes-detector"
    assert load_settings().frame_spec("digits").name == "digits"
