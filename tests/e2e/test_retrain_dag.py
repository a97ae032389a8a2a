"""The retrain DAG run for real with ``airflow dags test``: an injected fault stops the run at ``validate``
with the fault named in the task log; bad drop ids are clear errors.

``make test`` runs the DAG for three faults of different kinds (a Great Expectations column check, a
decode check, the cross-drop check); every fault's own detection is tests/unit/steps/test_validate.py's.
``make test-long`` (``MLPIPE_TEST_LONG=1``) runs the DAG for every fault (about two more minutes)."""

from __future__ import annotations

import os
import re
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tasks.contracts.errors import EXIT_BAD_INPUT, EXIT_REJECTED
from tasks.steps import drops
from tasks.steps import validate
from tasks.local.airflow import dags_test
from tasks.adapters.storage import LocalStore
from tests.support.airflow import airflow_home_from
from tests.unit.steps.test_validate import LOG_WORDS

pytestmark = [pytest.mark.e2e]
ROWS = 200
DOWNSTREAM = ["train", "register", "compile", "qc", "qc_gate", "deploy"]
LONG = os.environ.get("MLPIPE_TEST_LONG") == "1"
SHORT_FAULTS = ("bad_label", "corrupt_image", "seen_before")
FAULTS = list(LOG_WORDS) if LONG else list(SHORT_FAULTS)


def task_states(home: Path, output: str, dag_id: str = "retrain") -> dict[str, str | None]:
    run_id = re.search(r"run_id=(manual__[^,\s]+)", output).group(1)
    db = sqlite3.connect(home / "airflow" / "airflow.db")
    try:
        rows = db.execute("SELECT task_id, state FROM task_instance WHERE dag_id=? AND run_id=?",
                          (dag_id, run_id)).fetchall()
    finally:
        db.close()
    return dict(rows)


@pytest.fixture(scope="module")
def fault_runs(tmp_path_factory, airflow_template):
    """One store with a validated clean drop and one drop per fault; the DAG run for each fault,
    two at a time, each with its own Airflow DB copied from the session's migrated template."""
    root = tmp_path_factory.mktemp("dagfaults")
    store_dir = root / "store"
    store = LocalStore(store_dir)
    drops.make_drop(store, "base", size=ROWS, seed=1)
    assert validate.validate_drop(store, "base").success
    cases = {f: f"f-{f}" for f in FAULTS}
    for i, (fault, drop_id) in enumerate(cases.items()):
        extra = {"seen_from": "base"} if fault == "seen_before" else {}
        drops.make_drop(store, drop_id, size=ROWS, seed=200 + i, faults=[fault], **extra)
    drops.make_drop(store, "half-written", size=ROWS, seed=300, complete=False)
    cases["unknown_drop"] = "no-such-drop"
    cases["incomplete_drop"] = "half-written"

    def run(item):
        name, drop_id = item
        home = airflow_home_from(airflow_template, root / name)
        env = {**os.environ, "MLPIPE_HOME": str(home), "MLPIPE_STORE_URL": f"file://{store_dir}"}
        proc = dags_test("retrain", {"drop_id": drop_id, "epochs": 1}, env=env, timeout=300)
        return name, (proc, task_states(home, proc.stdout + proc.stderr), home)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run, cases.items()))


@pytest.mark.parametrize("fault", list(LOG_WORDS))
def test_fault_stops_run_at_validate(fault_runs, fault):
    if fault not in fault_runs:
        pytest.skip(f"the DAG run for {fault!r} is in `make test-long` (MLPIPE_TEST_LONG=1); its detection is "
                    "tested in tests/unit/steps/test_validate.py")
    proc, states, _ = fault_runs[fault]
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, "the DAG run must fail"
    assert states["validate"] == "failed"
    for task in DOWNSTREAM:
        assert states.get(task) in {"upstream_failed", None}, f"{task} ran: {states}"
    lines = [ln for ln in out.splitlines() if "validation failed: " in ln]
    assert any(all(w in ln for w in LOG_WORDS[fault]) for ln in lines), \
        f"no log line naming {fault} with {LOG_WORDS[fault]}: {lines}"
    assert f"step validate rejected (exit {EXIT_REJECTED})" in out  # final: not retried


def test_unknown_drop_is_a_clear_error(fault_runs):
    proc, states, _ = fault_runs["unknown_drop"]
    out = proc.stdout + proc.stderr
    assert states["validate"] == "failed" and states["train"] == "upstream_failed"
    assert f"step validate bad input (exit {EXIT_BAD_INPUT}): error: drop 'no-such-drop'" in out


def test_incomplete_drop_is_never_read(fault_runs):
    proc, states, _ = fault_runs["incomplete_drop"]
    out = proc.stdout + proc.stderr
    assert states["validate"] == "failed" and states["train"] == "upstream_failed"
    assert re.search(r"error: drop 'half-written' .*_SUCCESS", out), out[-3000:]
