"""Great Expectations validation of drops (tasks/steps/validate.py): pass, every fault, outputs, CLI, S3, and the
expectations rendered from the model spec (a drop of another model, shape, channels, class or encoding is
rejected naming it)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.contracts.errors import EXIT_BAD_INPUT, EXIT_REJECTED
from tasks.contracts.spec import find_spec
from tasks.model.frames import encode_frame
from tasks.steps import drops
from tasks.steps import validate
from tasks.adapters.storage import LocalStore

ROOT = Path(__file__).resolve().parents[3]
DIGITS = find_spec("digits", ROOT / "models")
SHAPES = find_spec("shapes", ROOT / "models")
ROWS = 200

# fault -> (expectation, column) that must name it, and the expected unexpected-row count
FAULTS = {
    "bad_label": ("expect_column_values_to_be_in_set", "label", 10),
    "wrong_shape": ("expect_column_values_to_be_in_set", "decoded_shape_ok", 10),
    "duplicate_ids": ("expect_column_values_to_be_unique", "image_id", 20),  # 10 copies + their 10 originals
    "corrupt_image": ("expect_column_values_to_be_in_set", "decodes", 10),
    "missing_column": ("expect_column_to_exist", "sha256", None),
    "empty": ("expect_table_row_count_to_be_between", None, None),
    "skewed": ("expect_column_values_to_be_between", "class_share", None),
    "seen_before": ("expect_column_values_to_be_in_set", "seen_before", 20),
    "future_timestamps": ("expect_column_values_to_be_in_set", "captured_at_future", 10),
    "ancient_timestamps": ("expect_column_values_to_be_in_set", "captured_at_too_old", 10),
    "blank_images": ("expect_column_values_to_be_between", "pixel_std", 10),
    "wrong_format": ("expect_column_values_to_be_in_set", "format_ok", 10),
}
# words the log line must carry so a reader knows the fault
LOG_WORDS = {
    "bad_label": ["(label)", "10 of 200 rows", "labels must be in 0..9"],
    "wrong_shape": ["(decoded_shape_ok)", "10 of 200 rows", "wrong image shape", "32x32"],
    "duplicate_ids": ["expect_column_values_to_be_unique(image_id)", "20 of 200 rows", "duplicate image ids"],
    "corrupt_image": ["(decodes)", "10 of 200 rows", "image decode failed"],
    "missing_column": ["expect_column_to_exist(sha256)", "'sha256' missing"],
    "empty": ["expect_table_row_count_to_be_between", "observed 0 rows", "row count"],
    "skewed": ["(class_share)", "class balance", "classes 0 (60.0%), 1 (1.0%)"],
    "seen_before": ["(seen_before)", "20 of 200 rows", "sha256 overlap with earlier drops", "['base']"],
    "future_timestamps": ["(captured_at_future)", "10 of 200 rows", "captured_at in the future", "5 min"],
    "ancient_timestamps": ["(captured_at_too_old)", "10 of 200 rows", "before 2000-01-01", "1970-01-01"],
    "blank_images": ["(pixel_std)", "10 of 200 rows", "blank images", "[0.0]"],
    "wrong_format": ["(format_ok)", "10 of 200 rows", "wrong image format", "['JPEG']"],
}
# faults that must fail on nothing but their own check (each is one new, independent expectation)
ONLY_FAILURE = ("future_timestamps", "ancient_timestamps", "blank_images", "wrong_format")


def _failure_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "tasks.steps.validate" and r.getMessage().startswith("validation failed:")]


@pytest.fixture(scope="module")
def fault_store(tmp_path_factory):
    """One store for the fault tests: a clean drop that passed validation, plus one drop per fault."""
    store = LocalStore(tmp_path_factory.mktemp("validate-faults") / "store")
    drops.make_drop(store, "base", size=ROWS, seed=1)
    assert validate.validate_drop(store, "base").success
    for i, fault in enumerate(FAULTS):
        kwargs = {"seen_from": "base"} if fault == "seen_before" else {}
        drops.make_drop(store, f"f-{fault}", size=ROWS, seed=100 + i, faults=[fault], **kwargs)
    return store


def test_clean_drop_passes_and_stores_outputs(store):
    drops.make_drop(store, "clean", size=ROWS, seed=1)
    res = validate.validate_drop(store, "clean")
    assert res.success and res.failures == [] and res.drop_id == "clean"
    assert res.statistics["rows"] == ROWS and res.statistics["skipped"] == []
    assert res.statistics["evaluated_expectations"] == len(validate.load_suite_spec()["expectations"])
    assert res.report_uri == store.uri("drops/clean/validation/data_docs/index.html")
    assert res.result_uri == store.uri("drops/clean/validation/result.json")
    stored = store.get_json("drops/clean/validation/result.json")
    assert stored["success"] is True and stored["drop_id"] == "clean" and stored["report_uri"] == res.report_uri
    assert stored["thresholds"] == validate.default_thresholds(DIGITS) == {
        "min_rows": 100, "max_rows": 100_000, "min_class_share": 0.03, "max_class_share": 0.3}
    assert stored["model"] == res.model == "digits"
    index = store.get_bytes("drops/clean/validation/data_docs/index.html").decode()
    assert "<html" in index.lower() and "drop_suite" in index
    site = store.list("drops/clean/validation/data_docs/")
    assert any(k.startswith("drops/clean/validation/data_docs/validations/") for k in site)
    assert any(k.endswith(".css") for k in site)

    # re-validation overwrites: same outcome, no stale pages from the first run
    again = validate.validate_drop(store, "latest")
    assert again.success and again.drop_id == "clean"
    pages = [k for k in store.list("drops/clean/validation/data_docs/validations/") if k.endswith(".html")]
    assert len(pages) == 1


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_fails_with_a_named_failure(fault_store, fault, caplog):
    caplog.set_level(logging.INFO, logger="tasks.steps.validate")
    expectation, column, count = FAULTS[fault]
    res = validate.validate_drop(fault_store, f"f-{fault}")
    assert not res.success
    named = [f for f in res.failures if f["expectation"] == expectation and f["column"] == column]
    assert named, f"no {expectation}({column}) failure for {fault}: {[f['summary'] for f in res.failures]}"
    failure = named[0]
    if count is not None:
        assert failure["unexpected_count"] == count and failure["element_count"] == ROWS
        assert failure["sample"], "a failed row check must show a sample"
    assert failure["message"]

    lines = _failure_lines(caplog)
    assert len(lines) == len(res.failures), "exactly one log line per failed expectation"
    line = next(ln for ln in lines if ln.startswith(f"validation failed: {failure['summary'].split(':')[0]}"))
    for word in LOG_WORDS[fault]:
        assert word in line, f"{word!r} not in {line!r}"

    if fault in ONLY_FAILURE:
        assert len(res.failures) == 1, [f["summary"] for f in res.failures]
    stored = fault_store.get_json(f"drops/f-{fault}/validation/result.json")
    assert stored["success"] is False and len(stored["failures"]) == len(res.failures)
    assert fault_store.exists(f"drops/f-{fault}/validation/data_docs/index.html")


def test_missing_column_still_validates_the_rest(fault_store):
    res = validate.validate_drop(fault_store, "f-missing_column")
    skipped = {s["column"] for s in res.statistics["skipped"]}
    assert skipped == {"sha256", "sha256_matches_file"}
    schema = next(f for f in res.failures if f["expectation"] == "expect_table_columns_to_match_set")
    assert schema["missing_columns"] == ["sha256"] and schema["unexpected_columns"] == []
    ran = {(c["expectation"], c["column"]) for c in res.statistics["checks"]}
    assert ("expect_column_values_to_be_in_set", "decodes") in ran and ("expect_column_values_to_be_unique",
                                                                         "image_id") in ran


def test_failed_drops_do_not_count_as_seen(fault_store):
    # f-seen_before failed validation, so its hashes (incl. the base copies) are not "earlier" for others,
    # and the base drop itself still passes when validated again.
    res = validate.validate_drop(fault_store, "base")
    assert res.success, [f["summary"] for f in res.failures]
    assert "f-seen_before" not in res.statistics["earlier_drops_compared"]


def test_thresholds_are_injected(store):
    drops.make_drop(store, "small", size=ROWS, seed=2)
    res = validate.validate_drop(store, "small", min_rows=500, max_class_share=0.05)
    failed = {(f["expectation"], f["column"]) for f in res.failures}
    assert failed == {("expect_table_row_count_to_be_between", None),
                      ("expect_column_values_to_be_between", "class_share")}
    rows = next(f for f in res.failures if f["column"] is None)
    assert "expected 500..100000" in rows["summary"]
    assert validate.validate_drop(store, "small", min_rows=50, max_rows=300).success
    with pytest.raises(ValueError, match="min_rows <= max_rows"):
        validate.validate_drop(store, "small", min_rows=10, max_rows=5)


def test_unreadable_drops_raise_drop_errors(store):
    drops.make_drop(store, "half", size=120, seed=1, complete=False)
    with pytest.raises(drops.DropIncomplete):
        validate.validate_drop(store, "half")
    with pytest.raises(drops.DropNotFound):
        validate.validate_drop(store, "nope")
    assert not store.exists("drops/half/validation/result.json")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "tasks.cli", "validate", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)


def test_cli_exit_codes(mlpipe_env, store, tmp_path, capsys, caplog):
    drops.make_drop(store, "ok", size=ROWS, seed=1)
    out = tmp_path / "result.json"
    p = _cli("--drop-id", "latest", "--result-json", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    result = json.loads(out.read_text())
    assert result["drop_id"] == "ok" and result["success"] is True and result["report_uri"].endswith("index.html")

    p = _cli("--drop-id", "nope")
    assert p.returncode == EXIT_BAD_INPUT and p.stderr.strip().splitlines()[-1].startswith("error: drop 'nope' not found")
    assert "Traceback" not in p.stderr

    # the failing path in-process (same main(), no second interpreter start-up)
    drops.make_drop(store, "bad", size=ROWS, seed=2, faults=["bad_label"])
    caplog.clear()
    assert validate.main(["--drop-id", "bad", "--min-rows", "50"]) == EXIT_REJECTED
    captured = capsys.readouterr()
    line = "validation failed: expect_column_values_to_be_in_set(label): 10 of 200 rows"
    logged = [r.getMessage() for r in caplog.records if r.name == "tasks.steps.validate" and r.levelname == "ERROR"]
    assert sum(line in m for m in logged) == 1, logged  # one log line per failed expectation, once
    assert line not in captured.out  # not printed a second time (the task log would show it twice)
    verdict = [ln for ln in captured.err.splitlines() if ln.startswith("error: ")]  # the one closing line
    assert len(verdict) == 1 and line not in verdict[0], captured.err
    assert f"report: {store.uri('drops/bad/validation/data_docs/index.html')}" in verdict[0]
    drops.make_drop(store, "unfinished", size=ROWS, seed=3, complete=False)
    assert validate.main(["--drop-id", "unfinished"]) == EXIT_BAD_INPUT
    assert "error: drop 'unfinished' is incomplete" in capsys.readouterr().err
    assert validate.main(["--drop-id", "ok", "--min-class-share", "0.5", "--max-class-share", "0.1"]) == EXIT_BAD_INPUT


@pytest.mark.integration
def test_clean_drop_on_s3(s3_store):
    drops.make_drop(s3_store, "s3clean", size=ROWS, seed=4)
    res = validate.validate_drop(s3_store, "s3clean")
    assert res.success, [f["summary"] for f in res.failures]
    assert res.report_uri == f"{s3_store.url}/drops/s3clean/validation/data_docs/index.html"
    assert s3_store.get_json("drops/s3clean/validation/result.json")["success"] is True
    assert s3_store.exists("drops/s3clean/validation/data_docs/index.html")
    X, y = drops.load_arrays(s3_store, ["s3clean"])
    assert X.shape == (ROWS, 28, 28) and len(y) == ROWS


# --------------------------------------------------------------------------- the bytes, not the claims


def test_result_is_bound_to_the_validated_content(store):
    import hashlib

    from tasks.contracts import layout

    drops.make_drop(store, "bound", size=ROWS, seed=7)
    res = validate.validate_drop(store, "bound")
    assert res.success
    stored = store.get_json(layout.validation_result_key("bound"))
    manifest_sha = hashlib.sha256(store.get_bytes(layout.manifest_key("bound"))).hexdigest()
    files = {k.rsplit("/", 1)[1]: hashlib.sha256(store.get_bytes(k)).hexdigest()
             for k in store.list(layout.images_prefix("bound"))}
    assert len(files) == ROWS
    assert stored["content"] == res.content == {
        "manifest_sha256": manifest_sha, "images_sha256": drops.images_digest(files), "image_count": ROWS}
    assert store.get_json(layout.validation_content_key("bound"))["images"] == files
    assert drops.verify_validated(store, "bound")["images_sha256"] == drops.images_digest(files)

    # one image replaced by other bytes (a valid PNG): the digest moves and verification names the image
    other = encode_frame(drops.golden_set(DIGITS)[0][0], DIGITS)
    name = sorted(files)[3]
    store.put_bytes(layout.images_prefix("bound") + name, other)
    with pytest.raises(drops.DropChanged, match=rf"drop 'bound' changed .*1 image changed \({name}\)"):
        drops.verify_validated(store, "bound")
    # validating again binds the result to the new bytes (and the manifest hash now disagrees: it fails)
    again = validate.validate_drop(store, "bound")
    assert not again.success and again.content["images_sha256"] != res.content["images_sha256"]


def test_the_format_is_read_from_the_bytes():
    import io

    from PIL import Image

    img = drops.golden_set(DIGITS)[0][0]
    png = encode_frame(img, DIGITS)
    jpeg, gif = io.BytesIO(), io.BytesIO()
    Image.fromarray(img, mode="L").save(jpeg, format="JPEG")
    Image.fromarray(img, mode="L").save(gif, format="GIF")
    assert validate.sniff_format(png) == "PNG"
    assert validate.sniff_format(jpeg.getvalue()) == "JPEG" and validate.sniff_format(gif.getvalue()) == "GIF"
    assert validate.sniff_format(b"not an image at all") == "unknown"
    info = validate._inspect_image(jpeg.getvalue(), DIGITS)
    assert info["decodes"] is True and info["format_ok"] is False and info["file_format"] == "JPEG"
    assert validate._inspect_image(png, DIGITS)["format_ok"] is True
    # a truncated PNG is still PNG by its magic: the decode check (not the format check) names it
    assert validate._inspect_image(png[: len(png) // 2], DIGITS)["format_ok"] is True
    # the accepted format is the spec's image encoding: JPEG for shapes
    colour = drops.golden_set(SHAPES)[0][0]
    assert validate._inspect_image(encode_frame(colour, SHAPES, "jpeg"), SHAPES)["format_ok"] is True
    assert validate._inspect_image(encode_frame(colour, SHAPES, "png"), SHAPES)["format_ok"] is False


def test_blank_means_no_signal():
    import numpy as np

    for value in (0, 255, 17):
        info = validate._inspect_image(encode_frame(np.full((28, 28), value, dtype=np.uint8), DIGITS), DIGITS)
        assert info["pixel_std"] == 0.0 < validate.MIN_PIXEL_STD
    one_dot = np.zeros((28, 28), dtype=np.uint8)
    one_dot[14, 14] = 255  # a single bright pixel still varies (std ~9)
    assert validate._inspect_image(encode_frame(one_dot, DIGITS), DIGITS)["pixel_std"] > validate.MIN_PIXEL_STD
    assert validate._inspect_image(encode_frame(drops.golden_set(DIGITS)[0][0], DIGITS), DIGITS)["pixel_std"] > 30


def test_timestamps_that_cannot_be_true():
    import datetime as dt

    import pandas as pd

    now = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.timezone.utc)
    values = pd.Series([
        pd.Timestamp(now),                                   # ok
        pd.Timestamp(now + dt.timedelta(minutes=4)),         # within the clock skew: ok
        pd.Timestamp(now + dt.timedelta(minutes=6)),         # future
        pd.Timestamp("2000-01-01T00:00:00Z"),                # the earliest allowed: ok
        pd.Timestamp("1999-12-31T23:59:59Z"),                # too old
        pd.Timestamp("1970-01-01T00:00:00Z"),                # the epoch: too old
        pd.Timestamp("2026-06-01T11:00:00"),                 # naive: read as UTC, ok
        "yesterday",                                         # not a timestamp: the type check names it
    ], dtype=object)
    future, too_old = validate._captured_at_checks(values, now)
    assert future == [False, False, True, False, False, False, False, None]
    assert too_old == [False, False, False, False, True, True, False, None]


# --------------------------------------------------------------------------- rendered from the model spec


@pytest.fixture(scope="module")
def spec_store(tmp_path_factory):
    """A clean shapes drop and shapes drops with one spec mismatch each."""
    store = LocalStore(tmp_path_factory.mktemp("validate-spec") / "store")
    drops.make_drop(store, "shapes-ok", size=ROWS, seed=1, spec=SHAPES)
    for i, fault in enumerate(("wrong_shape", "wrong_format", "bad_label")):
        drops.make_drop(store, f"shapes-{fault}", size=ROWS, seed=10 + i, spec=SHAPES, faults=[fault])
    return store


def _summaries(res) -> dict[tuple[str, str | None], str]:
    return {(f["expectation"], f["column"]): f["summary"] for f in res.failures}


def test_a_drop_of_the_spec_passes_and_records_its_model(spec_store):
    res = validate.validate_drop(spec_store, "shapes-ok", spec=SHAPES)
    assert res.success, [f["summary"] for f in res.failures]
    assert res.model == "shapes" and res.thresholds["max_class_share"] == 0.6  # 3x an equal share of 5 classes
    assert spec_store.get_json("drops/shapes-ok/validation/result.json")["model"] == "shapes"
    assert drops.verify_validated(spec_store, "shapes-ok", model="shapes")["model"] == "shapes"
    with pytest.raises(drops.DropNotValidated, match="validated for model 'shapes', not 'digits'"):
        drops.verify_validated(spec_store, "shapes-ok", model="digits")


def test_a_drop_of_another_model_is_rejected_naming_the_mismatch(spec_store):
    res = validate.validate_drop(spec_store, "shapes-ok", spec=DIGITS)
    assert not res.success and res.model == "digits"
    found = _summaries(res)
    model = found[("expect_column_values_to_be_in_set", "drop_model")]
    assert "sample ['shapes']" in model and "drop made for another model" in model and "'digits'" in model
    height = found[("expect_column_values_to_be_between", "height")]
    assert "sample [48]" in height and "manifest height must be 28" in height
    # the digits model reads images/<id>.png: the shapes drop's .jpg files are not its images
    assert "image file missing" in found[("expect_column_values_to_be_in_set", "decodes")]
    validate.validate_drop(spec_store, "shapes-ok", spec=SHAPES)  # leave it validated for its own model


@pytest.mark.parametrize("fault, expectation, column, words", [
    ("wrong_shape", "expect_column_values_to_be_in_set", "decoded_shape_ok",
     ["10 of 200 rows", "['52x52x3']", "must be 48x48x3 (3-channel RGB)", "model 'shapes'"]),
    ("wrong_format", "expect_column_values_to_be_in_set", "format_ok",
     ["10 of 200 rows", "['PNG']", "the bytes must be JPEG", "frames.encodings: jpeg, png"]),
    ("bad_label", "expect_column_values_to_be_in_set", "label",
     ["10 of 200 rows", "labels must be in 0..4", "model 'shapes' (5 classes)"]),
])
def test_spec_mismatches_are_named(spec_store, fault, expectation, column, words):
    res = validate.validate_drop(spec_store, f"shapes-{fault}", spec=SHAPES)
    assert not res.success
    summary = _summaries(res)[(expectation, column)]
    for word in words:
        assert word in summary, summary


def test_channels_are_part_of_the_shape(store):
    """RGB images of the right size in a grayscale model's drop: the shape check names the channels."""
    import numpy as np

    drops.make_drop(store, "rgb", size=ROWS, seed=3, spec=DIGITS)
    df = drops.read_manifest(store, "rgb")
    for image_id in df["image_id"][:5]:
        key = drops.image_key("rgb", image_id, DIGITS)
        grey = drops.decode_image(store.get_bytes(key))
        store.put_bytes(key, encode_frame(np.repeat(grey[..., None], 3, axis=-1), SHAPES, "png"))
    res = validate.validate_drop(store, "rgb", spec=DIGITS)
    summary = _summaries(res)[("expect_column_values_to_be_in_set", "decoded_shape_ok")]
    assert "5 of 200 rows" in summary and "['28x28x3']" in summary and "must be 28x28 (1-channel 8-bit grayscale)" in summary


def test_cli_validates_for_the_named_model(mlpipe_env, store):
    drops.make_drop(store, "cli-shapes", size=ROWS, seed=5, spec=SHAPES)
    assert validate.main(["--model", "shapes", "--drop-id", "cli-shapes"]) == 0
    assert validate.main(["--model", "digits", "--drop-id", "cli-shapes"]) == EXIT_REJECTED
