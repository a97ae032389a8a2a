"""The shortened form of `make demo MODEL=scenes`: the retrain_pipeline DAG through `airflow dags test` on a small
scene drop, to a deployed pipeline on a real local Triton (both members trained by their own trainers, each gated
on its own, one pipeline version gated end to end and deployed), one live call with boxes and the read-out, then
the regression scenario (``make test-long``, or ``MLPIPE_TEST_LONG=1``: a second DAG run of about a minute that
`make demo-regression MODEL=scenes` also covers): a detector trained on a handful of scenes for one epoch is
blocked by its member gate, no pipeline version is made of it, and the serving pipeline keeps its members.

The data is small for the suite's time, so the thresholds are a copy of the shipped specs' with lower bars (the
shipped ones are met by `make demo MODEL=scenes`: docs/BENCH.md has no part in it, README says the figures)."""

from __future__ import annotations

import os
import shutil

import pytest
import yaml

from tasks.adapters.storage import LocalStore
from tasks.config import PROJECT_ROOT, load_settings
from tasks.contracts.pipeline import find_pipeline
from tasks.local.airflow import dags_test
from tasks.local.triton import LocalTriton
from tasks.model import pipeline_repo as pr
from tasks.steps import registry
from tasks.steps.scenes import make_scene_drop
from tests.e2e.test_retrain_dag import task_states
from tests.support.airflow import airflow_home_from

pytestmark = [pytest.mark.e2e, pytest.mark.integration]
ROLES = ("detector", "classifier")
MEMBER_TASKS = [f"{t}_{r}" for r in ROLES for t in ("retrain", "train", "register", "compile", "qc", "qc_gate")]


def _edit(path, **sections):
    data = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        data[section].update(values)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    models = tmp_path_factory.mktemp("pipeline-dag") / "models"
    for name in ("scenes", "scenes-detector", "scenes-digits"):
        shutil.copytree(PROJECT_ROOT / "models" / name, models / name)
    _edit(models / "scenes-detector" / "spec.yaml", qc={"min_precision": 0.6, "min_recall": 0.6})
    _edit(models / "scenes-digits" / "spec.yaml", qc={"min_accuracy": 0.6, "min_class_recall": 0.3})
    _edit(models / "scenes" / "pipeline.yaml", qc={"min_readout_accuracy": 0.3, "min_class_recall": 0.2,
                                                   "max_latency_p95_ms": 5000, "smoke_margin": 0.2})
    return models


@pytest.fixture(scope="module")
def deployed(project, tmp_path_factory, airflow_template):
    """The first DAG run (both members retrained), to a deployed pipeline v1 on a real local Triton."""
    home = airflow_home_from(airflow_template, tmp_path_factory.mktemp("pipeline-dag-home") / "home")
    env = {"MLPIPE_HOME": str(home), "MLPIPE_STORE_URL": f"file://{home / 'store'}",
           "MLPIPE_MODEL_REPO": str(home / "model_repo"), "MLPIPE_MODEL_NAME": "scenes",
           "MLPIPE_MODELS_DIR": str(project), "MLPIPE_EXECUTION": "local", "MLPIPE_QC_LATENCY_REQUESTS": "20"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        cfg = load_settings()
        spec = find_pipeline("scenes", cfg.models_dir)
        store = LocalStore(home / "store")
        make_scene_drop(store, "scenes-1", spec, size=600, seed=1)
        repo = home / "model_repo"
        pr.render_pipeline("local", repo, spec, cfg.models_dir)
        with LocalTriton(repo, home / "logs" / "triton") as triton:
            run_env = {**os.environ, **env, "MLPIPE_TRITON_URL": triton.http_url}
            run = dags_test("retrain_pipeline", {"pipeline": "scenes", "drop_id": "scenes-1", "epochs": 6, "seed": 0,
                                                 "members": list(ROLES)}, env=run_env, timeout=1500)
            out = run.stdout + run.stderr
            (home / "dag_run.log").write_text(out)
            yield {"home": home, "env": run_env, "store": store, "repo": repo, "spec": spec, "triton": triton,
                   "run": run, "out": out}


def test_retrain_pipeline_dag_deploys_a_pipeline(deployed):
    home, store, repo, triton, run, out = (deployed[k] for k in ("home", "store", "repo", "triton", "run", "out"))
    assert run.returncode == 0, f"the run failed; its log: {home / 'dag_run.log'}\n" + out[-3000:]
    states = task_states(home, out, "retrain_pipeline")
    for t in ["members", "validate", *MEMBER_TASKS, "compose", "pipeline_qc", "pipeline_qc_gate", "deploy",
              "outcome"]:
        assert states[t] == "success", (t, states)
    v1 = registry.get_version(store, "scenes", 1)
    assert v1["kind"] == "pipeline" and v1["stage"] == "production" and v1["qc"]["verdict"] == "passed"
    members = {r: m["version"] for r, m in v1["members"].items()}
    assert members == {"detector": 1, "classifier": 1}
    assert registry.get_version(store, "scenes-detector", 1)["stage"] == "production"
    assert pr.serving_pipeline_version(repo, "scenes") == 1
    det_qc = store.get_json("models/scenes-detector/1/qc_report.json")
    assert det_qc["metrics"]["precision"] >= 0.6 and det_qc["metrics"]["recall"] >= 0.6
    assert v1["qc"]["figures"]["readout_accuracy"] >= 0.3

    from tasks.tools.demo_pipeline import live_call

    live = live_call(triton.http_url, "scenes")
    assert live["frame_error"] is None and len(live["boxes"]) == len(live["labels"]) >= 1
    assert live["readout"] == "".join(live["labels"][i] for i in sorted(
        range(len(live["boxes"])), key=lambda i: live["boxes"][i][0] + live["boxes"][i][2]))


@pytest.mark.skipif(os.environ.get("MLPIPE_TEST_LONG") != "1",
                    reason="a second DAG run (about a minute): `make test-long` runs it (MLPIPE_TEST_LONG=1); "
                           "`make demo-regression MODEL=scenes` covers the same scenario")
def test_a_worse_detector_is_blocked_and_the_serving_pipeline_keeps_its_members(deployed):
    home, store, repo = deployed["home"], deployed["store"], deployed["repo"]
    assert deployed["run"].returncode == 0, "the first run failed: see test_retrain_pipeline_dag_deploys_a_pipeline"
    members = pr.pipeline_members(repo, "scenes", 1)
    # a detector from 100 scenes and one epoch; its member gate blocks it
    make_scene_drop(store, "scenes-small", deployed["spec"], size=100, seed=2)
    bad = dags_test("retrain_pipeline", {"pipeline": "scenes", "drop_id": "scenes-small", "epochs": 1, "seed": 0,
                                         "members": ["detector"]}, env=deployed["env"], timeout=900)
    bad_out = bad.stdout + bad.stderr
    (home / "dag_run_bad.log").write_text(bad_out)
    states = task_states(home, bad_out, "retrain_pipeline")
    assert states["qc_detector"] == "success" and states["qc_gate_detector"] == "success", states
    assert states["train_classifier"] == "skipped", "the classifier was not asked to retrain"
    for t in ("compose", "pipeline_qc", "deploy"):
        assert states[t] == "skipped", (t, states)
    assert states["outcome"] == "failed"
    assert "REJECTED: member scenes-detector v2 failed its QC gate" in bad_out
    assert registry.get_version(store, "scenes-detector", 2)["stage"] == "rejected"
    assert registry.list_versions(store, "scenes") == [1], "no pipeline version of a rejected member"
    assert pr.serving_pipeline_version(repo, "scenes") == 1
    assert pr.pipeline_members(repo, "scenes", 1) == members
