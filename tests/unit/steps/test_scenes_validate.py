"""Validation of a pipeline's scene drops (tasks/steps/validate.py, scene suite): a good drop passes; each scene
fault is rejected by its own expectation, the failure naming the bad rows (image ids) and the reason; the result
is accepted by train/register for each member of the pipeline."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from tasks.contracts.errors import EXIT_REJECTED
from tasks.contracts.pipeline import find_pipeline, member_specs
from tasks.steps import drops, scenes, validate

ROOT = Path(__file__).resolve().parents[3]
PIPELINE = find_pipeline("scenes", ROOT / "models")
MEMBERS = member_specs(PIPELINE, ROOT / "models")
DET, CLS = MEMBERS["detector"], MEMBERS["classifier"]
H, W = DET.input.height, DET.input.width
N = 40
MIN_ROWS = 10

# fault -> (the rule column that must fail, words of the reason, which rows are bad by the manifest)
FAULTS = {
    "box_outside": ("boxes_inside_frame", f"outside the {W}x{H} frame",
                    lambda b, c, n: bool(np.any(b[:, 2] > W) or np.any(b[:, 3] > H) or np.any(b[:, :2] < 0))),
    "negative_size": ("boxes_positive_size", "negative or zero size",
                      lambda b, c, n: bool(np.any(b[:, 2] <= b[:, 0]) or np.any(b[:, 3] <= b[:, 1]))),
    "unknown_class": ("classes_known", "unknown class",
                      lambda b, c, n: bool(np.any((c < 0) | (c >= CLS.num_classes)))),
    "too_many_objects": ("objects_in_bounds", f"outside [{DET.detection.min_objects}, {DET.detection.max_objects}]",
                         lambda b, c, n: n > DET.detection.max_objects),
}


def _validate(store, drop_id):
    return validate.validate_drop(store, drop_id, spec=DET, pipeline=PIPELINE, min_rows=MIN_ROWS)


def _bad_ids(store, drop_id, check) -> list[str]:
    df = drops.read_manifest(store, drop_id)
    return [str(r.image_id) for r in df.itertuples()
            if check(np.asarray(json.loads(r.boxes), np.float32).reshape(-1, 4),
                     np.asarray(json.loads(r.classes), np.int64), int(r.objects))]


@pytest.fixture(scope="module")
def scene_store(tmp_path_factory):
    from tasks.adapters.storage import LocalStore

    store = LocalStore(tmp_path_factory.mktemp("scene-validate") / "store")
    scenes.make_scene_drop(store, "good", PIPELINE, size=N, seed=1)
    for i, fault in enumerate(FAULTS):
        scenes.make_scene_drop(store, f"f-{fault}", PIPELINE, size=N, seed=20 + i, faults=[fault])
    for i, fault in enumerate(("corrupt_image", "duplicate_ids", "missing_column")):
        scenes.make_scene_drop(store, f"f-{fault}", PIPELINE, size=N, seed=30 + i, faults=[fault])
    return store


def test_good_scene_drop_passes_and_serves_its_members(scene_store):
    res = _validate(scene_store, "good")
    assert res.success, [f["summary"] for f in res.failures]
    assert res.model == PIPELINE.name
    checked = {c["column"] for c in res.statistics["checks"]}
    assert set(scenes.ROW_RULES) <= checked  # every scene rule ran as an expectation
    assert {"boxes", "classes", "objects"} <= checked
    stored = scene_store.get_json("drops/good/validation/result.json")
    assert stored["success"] and stored["model"] == PIPELINE.name
    for member in (DET.name, CLS.name):  # a passing validation for the pipeline serves each member
        assert drops.verify_validated(scene_store, "good", model=member)["model"] == PIPELINE.name
    with pytest.raises(drops.DropNotValidated, match="validated for model 'scenes'"):
        drops.verify_validated(scene_store, "good", model="digits")


@pytest.mark.parametrize("fault", list(FAULTS))
def test_scene_fault_is_rejected_naming_rows_and_reason(scene_store, fault, caplog):
    column, reason, check = FAULTS[fault]
    bad = _bad_ids(scene_store, f"f-{fault}", check)
    assert bad, "the fault touched no row"
    with caplog.at_level(logging.ERROR, logger="tasks.steps.validate"):
        res = _validate(scene_store, f"f-{fault}")
    assert not res.success
    by_column = {f["column"]: f for f in res.failures}
    assert column in by_column, [f["summary"] for f in res.failures]
    f = by_column[column]
    assert f["unexpected_count"] == len(bad)
    assert set(f["sample_image_ids"]) <= set(bad) and f["sample_image_ids"]
    for text in f["sample"]:  # "<image_id>: <reason>"
        assert text.split(":", 1)[0] in bad
    assert any(reason in s for s in f["sample"]), f["sample"]
    line = next(r.getMessage() for r in caplog.records if f"({column})" in r.getMessage())
    assert bad[0] in line or any(i in line for i in bad)
    assert reason in line
    # only scene rules fail (no generic check is tripped by a scene fault)
    assert {x["column"] for x in res.failures} <= set(scenes.ROW_RULES), [x["summary"] for x in res.failures]
    with pytest.raises(drops.DropNotValidated, match="failed validation"):
        drops.verify_validated(scene_store, f"f-{fault}", model=CLS.name)


@pytest.mark.parametrize("fault, expectation, column", [
    ("corrupt_image", "expect_column_values_to_be_in_set", "decodes"),
    ("duplicate_ids", "expect_column_values_to_be_unique", "image_id"),
    ("missing_column", "expect_column_to_exist", "sha256"),
])
def test_generic_faults_of_scene_drops_are_rejected(scene_store, fault, expectation, column):
    res = _validate(scene_store, f"f-{fault}")
    assert not res.success
    f = next(x for x in res.failures if x["expectation"] == expectation and x["column"] == column)
    if fault != "missing_column":
        assert f["unexpected_count"] >= 1 and f["sample_image_ids"]


def test_bad_boxes_text_is_rejected_by_row(scene_store):
    """A manifest delivered by a producer with unparsable boxes and a wrong objects count."""
    import io


    from tasks.contracts import layout

    scenes.make_scene_drop(scene_store, "hand", PIPELINE, size=N, seed=3)
    df = drops.read_manifest(scene_store, "hand")
    df.loc[2, "boxes"] = "[[1, 2, 3]"
    df.loc[5, "objects"] = int(df.loc[5, "objects"]) + 1
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    scene_store.put_bytes(layout.manifest_key("hand"), buf.getvalue())
    res = _validate(scene_store, "hand")
    by_column = {f["column"]: f for f in res.failures}
    assert by_column["boxes_parse"]["sample_image_ids"] == [str(df.loc[2, "image_id"])]
    assert by_column["counts_agree"]["sample_image_ids"] == [str(df.loc[5, "image_id"])]


def test_cli_validates_by_pipeline_and_by_member_name(scene_store, monkeypatch, capsys):
    monkeypatch.setenv("MLPIPE_STORE_URL", scene_store.url)
    monkeypatch.setenv("MLPIPE_MODELS_DIR", str(ROOT / "models"))
    for model in (PIPELINE.name, DET.name):
        assert validate.main(["--model", model, "--drop-id", "good", "--min-rows", str(MIN_ROWS)]) == 0, model
        assert json.loads(capsys.readouterr().out)["success"] is True
    assert validate.main(["--model", PIPELINE.name, "--drop-id", "f-box_outside", "--min-rows",
                          str(MIN_ROWS)]) == EXIT_REJECTED
