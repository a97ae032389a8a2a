"""The retrain DAG's wiring and the local/Kubernetes step factory, rendered offline.

The Kubernetes path cannot run here (no cluster): the pod is rendered with
``build_pod_request_obj(dry_run=True)`` and checked field by field.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_AF_HOME = Path(tempfile.mkdtemp(prefix="mlpipe-af-"))
from tasks.local.airflow import airflow_env  # noqa: E402

for _k, _v in airflow_env(home=_AF_HOME).items():
    if _k.startswith("AIRFLOW") or _k == "PYTHONPATH":
        os.environ.setdefault(_k, _v)
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(ROOT / "dags"))


@pytest.fixture
def retrain_local(monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("MLPIPE_EXECUTION", "local")
    bag = DagBag(str(ROOT / "dags"))
    assert not bag.import_errors, bag.import_errors
    return bag.dags["retrain"]


@pytest.fixture
def retrain_k8s(monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("MLPIPE_EXECUTION", "kubernetes")
    monkeypatch.setenv("MLPIPE_TRAINER_IMAGE", "registry.example/mlpipe/trainer:1.2.3")
    monkeypatch.setenv("MLPIPE_STORE_URL", "s3://mlpipe-prod")
    monkeypatch.setenv("MLPIPE_S3_ENDPOINT", "minio.mlpipe.svc:9000")
    monkeypatch.setenv("MLPIPE_S3_SECRET_KEY", "must-not-leak")
    bag = DagBag(str(ROOT / "dags"))
    assert not bag.import_errors, bag.import_errors
    return bag.dags["retrain"]


def test_retrain_order_and_params(retrain_local):
    dag = retrain_local
    chain = ["validate", "train", "register", "compile", "qc", "qc_gate", "deploy"]
    for up, down in zip(chain, chain[1:]):
        assert down in dag.get_task(up).downstream_task_ids, f"{up} -> {down}"
    order = ["validate", "train", "register"]
    assert set(dag.params.keys()) >= {"drop_id", "epochs", "seed"}
    assert dag.get_task("train").retries >= 1
    from mlpipe_steps import LocalStepOperator

    assert all(isinstance(dag.get_task(t), LocalStepOperator) for t in order)
    assert dag.get_task("train").command == "train"


def test_train_pod_renders_with_gpu(retrain_k8s):
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import ApiClient

    op = retrain_k8s.get_task("train")
    assert isinstance(op, KubernetesPodOperator)
    pod = ApiClient().sanitize_for_serialization(op.build_pod_request_obj(dry_run=True))
    spec = pod["spec"]
    base = next(c for c in spec["containers"] if c["name"] == "base")
    assert base["image"] == "registry.example/mlpipe/trainer:1.2.3"
    assert base["command"] == ["python", "-m", "tasks.cli", "train"]
    assert base["args"][:2] == ["--drop-id", "{{ ti.xcom_pull(task_ids='validate')['drop_id'] }}"]
    assert base["args"][-2:] == ["--result-json", "/airflow/xcom/return.json"]
    assert base["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    env = {e["name"]: e.get("value") for e in base.get("env", [])}
    assert env["MLPIPE_STORE_URL"] == "s3://mlpipe-prod"
    assert "MLPIPE_S3_SECRET_KEY" not in env  # credentials come from the Secret, never inline
    assert base["envFrom"][0]["secretRef"]["name"] == "mlpipe-credentials"
    # The XCom sidecar reads the result file the CLI writes.
    assert any(c["name"] == "airflow-xcom-sidecar" for c in spec["containers"])


def test_non_gpu_steps_have_no_gpu(retrain_k8s):
    from kubernetes.client import ApiClient

    op = retrain_k8s.get_task("validate")
    pod = ApiClient().sanitize_for_serialization(op.build_pod_request_obj(dry_run=True))
    base = next(c for c in pod["spec"]["containers"] if c["name"] == "base")
    assert base["command"] == ["python", "-m", "tasks.cli", "validate"]
    assert "nvidia.com/gpu" not in base["resources"].get("limits", {})
    assert "nodeSelector" not in pod["spec"] or not pod["spec"]["nodeSelector"]


def test_qc_gate_short_circuits_deploy(retrain_local):
    from airflow.providers.standard.operators.python import ShortCircuitOperator

    gate = retrain_local.get_task("qc_gate")
    assert isinstance(gate, ShortCircuitOperator)
    assert gate.python_callable({"verdict": "passed", "version": 2}) is True
    assert gate.python_callable({"verdict": "failed", "version": 2, "reasons": ["accuracy: 0.5"]}) is False
    assert gate.python_callable(None) is False
    assert "--no-fail" in retrain_local.get_task("qc").arguments


def test_compile_is_a_gpu_pod_and_rollback_dag_renders(retrain_k8s, monkeypatch):
    from kubernetes.client import ApiClient

    op = retrain_k8s.get_task("compile")
    pod = ApiClient().sanitize_for_serialization(op.build_pod_request_obj(dry_run=True))
    base = next(c for c in pod["spec"]["containers"] if c["name"] == "base")
    assert base["command"] == ["python", "-m", "tasks.cli", "compile"]
    assert base["image"] == "ghcr.io/mlpipe/trt-compiler:0.1.0"
    assert base["resources"]["limits"]["nvidia.com/gpu"] == "1"

    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("MLPIPE_EXECUTION", "local")
    rollback = DagBag(str(ROOT / "dags")).dags["rollback"]
    task = rollback.get_task("rollback")
    assert task.command == "deploy"
    assert task.arguments[:3] == ["rollback", "--version", "{{ params.version }}"]
    assert rollback.params["version"] == 1


def test_same_cli_arguments_in_both_modes(retrain_local, retrain_k8s):
    for task_id in ("validate", "train", "register", "compile", "qc", "deploy"):
        local = retrain_local.get_task(task_id)
        pod = retrain_k8s.get_task(task_id)
        assert pod.cmds == ["python", "-m", "tasks.cli", local.command]
        assert pod.arguments[:-2] == local.arguments


def test_unknown_execution_mode_is_refused(monkeypatch):
    monkeypatch.setenv("MLPIPE_EXECUTION", "docker")
    from mlpipe_steps import step

    with pytest.raises(ValueError, match="MLPIPE_EXECUTION"):
        step("x", "validate", [])
