"""The whole retrain DAG through ``airflow dags test`` against a real local Triton:
a run that deploys, then a run whose QC gate fails: the version is rejected, ``deploy``
is *skipped* in the graph, and the champion keeps serving."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tasks.config import load_settings
from tasks.model.frames import encode_frame
from tasks.steps import drops
from tasks.model import repo as model_repo
from tasks.steps import registry
from tasks.local.airflow import dags_test
from tasks.adapters.storage import LocalStore
from tasks.adapters.triton import TritonClient
from tasks.local.triton import LocalTriton
from tests.e2e.test_retrain_dag import task_states
from tests.support.airflow import airflow_home_from

pytestmark = [pytest.mark.e2e, pytest.mark.integration]
ALL_TASKS = ["validate", "train", "register", "compile", "qc", "qc_gate", "deploy", "outcome"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, airflow_template):
    home = airflow_home_from(airflow_template, tmp_path_factory.mktemp("e2e"))
    repo = model_repo.render_repo("local", home / "model_repo", load_settings().model_spec("digits"))
    with LocalTriton(repo, home / "logs" / "triton") as triton:
        env = {**os.environ, "MLPIPE_HOME": str(home), "MLPIPE_STORE_URL": f"file://{home / 'store'}",
               "MLPIPE_MODEL_REPO": str(repo), "MLPIPE_TRITON_URL": triton.http_url,
               "MLPIPE_QC_LATENCY_REQUESTS": "50", "MLPIPE_EXECUTION": "local"}
        yield home, LocalStore(home / "store"), triton, env


def test_retrain_deploys_then_gate_blocks_a_worse_model(stack):
    home, store, triton, env = stack
    # Run 1: a small drop, thresholds lowered so that a 3-epoch model surely passes the gate (the deploy smoke test still wants 90%).
    drops.make_drop(store, "d1", size=2000, seed=1)
    run1 = dags_test("retrain", {"drop_id": "d1", "epochs": 3, "seed": 0},
                     env={**env, "MLPIPE_QC_MIN_ACCURACY": "0.5", "MLPIPE_QC_MIN_CLASS_RECALL": "0.2"})
    out1 = run1.stdout + run1.stderr
    assert run1.returncode == 0, out1[-4000:]
    states = task_states(home, out1)
    assert all(states[t] == "success" for t in ALL_TASKS), states
    v1 = registry.get_version(store, "digits", 1)
    assert v1["stage"] == "production" and v1["qc"]["verdict"] == "passed"
    assert v1["lineage"]["drops"][0]["drop_id"] == "d1" and v1["lineage"]["drops"][0]["validation"]["success"]
    assert v1["compile"]["status"] in {"skipped", "compiled"}
    for name in ("model.onnx", "model.pt", "metrics.json", "lineage.json", "qc_report.json", "qc_report.html"):
        assert store.exists(f"models/digits/1/{name}"), name
    assert model_repo.serving_version(home / "model_repo", "digits") == 1
    spec = load_settings().model_spec("digits")
    images, labels = drops.golden_set(spec)
    out = TritonClient(triton.grpc_url).infer_frames("digits", [encode_frame(img, spec) for img in images[:100]])
    assert not any(np.asarray(out["FRAME_ERROR"]).reshape(-1))
    assert np.mean(np.asarray(out["LABEL"]).reshape(-1) == labels[:100]) > 0.5

    # Run 2: the gate demands the impossible: the new version is rejected and deploy is skipped.
    drops.make_drop(store, "d2", size=600, seed=2)
    run2 = dags_test("retrain", {"drop_id": "d2", "epochs": 1, "seed": 0},
                     env={**env, "MLPIPE_QC_MIN_ACCURACY": "0.999"})
    out2 = run2.stdout + run2.stderr
    states = task_states(home, out2)
    assert states["qc"] == "success" and states["qc_gate"] == "success", states
    assert states["deploy"] == "skipped", states
    assert "QC gate FAILED for v2" in out2 and "accuracy" in out2
    # ... and the run is visibly not a deploy: its last task fails saying so (no retry)
    assert states["outcome"] == "failed" and run2.returncode != 0, states
    assert "REJECTED: v2 failed the QC gate (accuracy: " in out2 and "champion keeps serving" in out2
    v2 = registry.get_version(store, "digits", 2)
    assert v2["stage"] == "rejected" and v2["qc"]["verdict"] == "failed"
    assert v2["lineage"]["parent_champion"] == 1
    assert registry.champion(store, "digits")["version"] == 1
    assert model_repo.serving_version(home / "model_repo", "digits") == 1
    assert TritonClient(triton.grpc_url).ready_versions("digits_classifier") == [1]

    # The rollback DAG refuses a version QC rejected: the run fails naming why, the serving version is unchanged.
    run3 = dags_test("rollback", {"version": 2, "reason": "e2e: try the rejected one"}, env=env)
    out3 = run3.stdout + run3.stderr
    assert run3.returncode != 0
    assert task_states(home, out3, "rollback")["rollback"] == "failed"
    assert "v2 was rejected by QC" in out3, out3[-3000:]
    assert model_repo.serving_version(home / "model_repo", "digits") == 1
    assert registry.champion(store, "digits")["version"] == 1
    assert TritonClient(triton.grpc_url).ready_versions("digits_classifier") == [1]
