"""Great Expectations validation of drops (tasks/validate.py): pass, every fault, outputs, CLI, S3."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.steps import drops
from tasks.steps import validate
from tasks.adapters.storage import LocalStore

ROOT = Path(__file__).resolve().parents[3]
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
}


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
    assert stored["thresholds"] == validate.DEFAULT_THRESHOLDS
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
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: drop 'nope' not found")
    assert "Traceback" not in p.stderr

    # the failing path in-process (same main(), no second interpreter start-up)
    drops.make_drop(store, "bad", size=ROWS, seed=2, faults=["bad_label"])
    caplog.clear()
    assert validate.main(["--drop-id", "bad", "--min-rows", "50"]) == 1
    printed = capsys.readouterr().out
    line = "validation failed: expect_column_values_to_be_in_set(label): 10 of 200 rows"
    logged = [r.getMessage() for r in caplog.records if r.name == "tasks.steps.validate" and r.levelname == "ERROR"]
    assert sum(line in m for m in logged) == 1, logged  # one log line per failed expectation, once
    assert line not in printed  # not printed a second time (the task log would show it twice)
    assert f"report: {store.uri('drops/bad/validation/data_docs/index.html')}" in printed
    drops.make_drop(store, "unfinished", size=ROWS, seed=3, complete=False)
    assert validate.main(["--drop-id", "unfinished"]) == 2
    assert "error: drop 'unfinished' is incomplete" in capsys.readouterr().err
    assert validate.main(["--drop-id", "ok", "--min-class-share", "0.5", "--max-class-share", "0.1"]) == 2


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
