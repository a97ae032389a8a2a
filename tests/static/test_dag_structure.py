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
    chain = ["validate", "train", "register", "compile", "qc", "qc_gate", "deploy", "outcome"]
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
    # the rendered DAG shows the default; at run time the pod's image, command and args come from the model
    # spec's trainer section (tests/unit/steps/test_trainer_pod.py)
    assert base["args"][:4] == ["--model", "{{ params.model }}", "--drop-id",
                                "{{ ([ti.xcom_pull(task_ids='validate')['drop_id']] + (params.extra_drop_ids or []))"
                                " | join(',') }}"]
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
    assert task.arguments[:5] == ["--model", "{{ params.model }}", "rollback", "--version", "{{ params.version }}"]
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


# ------------------------------------------------------------------ the pod path: deferral, pool, ConfigMap

def _render(op) -> dict:
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(op.build_pod_request_obj(dry_run=True))


def test_long_gpu_pods_are_deferrable_and_the_rest_are_not(retrain_k8s):
    for task_id in ("train", "compile"):
        assert retrain_k8s.get_task(task_id).deferrable is True, task_id
    for task_id in ("validate", "register", "qc", "deploy"):
        assert retrain_k8s.get_task(task_id).deferrable is False, task_id


def test_deploy_and_rollback_share_the_serving_pool(retrain_k8s, retrain_local, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    from tasks.contracts.pools import POOLS, SERVING_POOL

    assert POOLS[SERVING_POOL][0] == 1  # one at a time
    assert retrain_k8s.get_task("deploy").pool == SERVING_POOL
    assert retrain_local.get_task("deploy").pool == SERVING_POOL
    for mode in ("kubernetes", "local"):
        monkeypatch.setenv("MLPIPE_EXECUTION", mode)
        assert DagBag(str(ROOT / "dags")).dags["rollback"].get_task("rollback").pool == SERVING_POOL, mode
    others = {t.pool for t in retrain_k8s.tasks if t.task_id != "deploy"}
    assert SERVING_POOL not in others  # only the serving tasks are serialized


def test_pods_take_settings_from_the_config_map_and_credentials_from_the_secret(retrain_k8s):
    import yaml

    from mlpipe_steps import POD_CONFIG_MAP, POD_ENV_PASSTHROUGH

    for task_id in ("validate", "train", "compile", "deploy"):
        base = next(c for c in _render(retrain_k8s.get_task(task_id))["spec"]["containers"] if c["name"] == "base")
        refs = {(k, v["name"]) for src in base["envFrom"] for k, v in src.items() if k.endswith("Ref")}
        assert refs == {("secretRef", "mlpipe-credentials"), ("configMapRef", POD_CONFIG_MAP)}, task_id
    manifest = yaml.safe_load((ROOT / "docker" / "k8s" / "configmap.yaml").read_text())
    assert manifest["kind"] == "ConfigMap" and manifest["metadata"]["name"] == POD_CONFIG_MAP
    data = manifest["data"]
    # the pod settings the Airflow side reads, and the step settings the pods read
    assert {"MLPIPE_K8S_NAMESPACE", "MLPIPE_TASKS_IMAGE", "MLPIPE_TRAINER_IMAGE", "MLPIPE_COMPILER_IMAGE",
            "MLPIPE_GPU_NODE_SELECTOR", "MLPIPE_GPU_TOLERATION", "MLPIPE_STORE_URL", "MLPIPE_LOG_FORMAT"} <= set(data)
    assert data["MLPIPE_LOG_FORMAT"] == "json" and data["MLPIPE_EXECUTION"] == "kubernetes"
    assert all(isinstance(v, str) for v in data.values())  # a ConfigMap holds strings only
    assert not [k for k in data if any(w in k for w in ("SECRET", "PASSWORD", "TOKEN", "ACCESS_KEY"))]
    assert set(data) - {"MLPIPE_EXECUTION", "MLPIPE_LOG_FORMAT", "MLPIPE_LOG_LEVEL", "MLPIPE_K8S_NAMESPACE",
                        "MLPIPE_TASKS_IMAGE", "MLPIPE_TRAINER_IMAGE", "MLPIPE_COMPILER_IMAGE",
                        "MLPIPE_GPU_NODE_SELECTOR", "MLPIPE_GPU_TOLERATION"} <= set(POD_ENV_PASSTHROUGH)


# ------------------------------------------------------------------ the pod path: final exit codes are not retried

class _PodApi:
    """Stands in for the cluster's CoreV1Api in ``cleanup`` (reads give the finished pod back)."""

    def __init__(self, pod):
        self.pod, self.patched = pod, []

    def read_namespaced_pod(self, name, namespace, **_):
        return self.pod

    def patch_namespaced_pod(self, name, namespace, body, **_):
        self.patched.append(body)


def _finished_pod(exit_code: int, message: str | None = None):
    from kubernetes.client import models as k8s

    terminated = k8s.V1ContainerState(terminated=k8s.V1ContainerStateTerminated(exit_code=exit_code, reason="Error",
                                                                                message=message))
    return k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name="mlpipe-validate-abc", namespace="mlpipe"),
        spec=k8s.V1PodSpec(containers=[k8s.V1Container(name="base", image="x"),
                                       k8s.V1Container(name="airflow-xcom-sidecar", image="y")]),
        status=k8s.V1PodStatus(phase="Failed", container_statuses=[
            k8s.V1ContainerStatus(name="base", image="x", image_id="", ready=False, restart_count=0,
                                  state=terminated)]))


@pytest.mark.parametrize("code", [0, 1, 75, 137])
def test_base_container_exit_code_reads_the_terminated_state(code):
    from mlpipe_steps import base_container_exit_code

    assert base_container_exit_code(_finished_pod(code)) == code
    assert base_container_exit_code(_finished_pod(code), "other") is None


def _cleanup(monkeypatch, exit_code: int, message: str | None = None):
    monkeypatch.setenv("MLPIPE_EXECUTION", "kubernetes")
    monkeypatch.setenv("MLPIPE_STORE_URL", "file:///tmp/mlpipe-store")
    from mlpipe_steps import pod_operator_class, step

    op = step("validate", "validate", ["--drop-id", "d1"])
    assert isinstance(op, pod_operator_class())
    pod = _finished_pod(exit_code, message)
    op.__dict__["client"] = api = _PodApi(pod)  # no cluster: the pod is the one the API would return
    op.cleanup(pod, pod)
    return api


@pytest.mark.parametrize("name", ["EXIT_REJECTED", "EXIT_BAD_INPUT"])
def test_pod_with_a_final_exit_code_fails_without_retry(monkeypatch, name):
    from airflow.sdk.exceptions import AirflowFailException

    from tasks.contracts import errors

    code = getattr(errors, name)
    with pytest.raises(AirflowFailException, match=rf"step validate {errors.FINAL_EXIT_CODES[code]} \(exit {code}"):
        _cleanup(monkeypatch, code)
    # the pod's termination message (the CLI writes its error line there) is quoted
    with pytest.raises(AirflowFailException, match=r"\): error: drop d1 failed validation$"):
        _cleanup(monkeypatch, code, "error: drop d1 failed validation\n")


@pytest.mark.parametrize("code", [1, 75, 137])
def test_pod_with_any_other_failure_is_retried(monkeypatch, code):
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    from tasks.contracts.errors import FINAL_EXIT_CODES

    assert code not in FINAL_EXIT_CODES
    with pytest.raises(AirflowException, match="returned a failure") as exc:
        _cleanup(monkeypatch, code)
    assert not isinstance(exc.value, AirflowFailException)  # retried while retries remain


def test_both_operator_paths_read_the_contract_table():
    import mlpipe_steps

    from tasks.contracts import errors

    assert mlpipe_steps.FINAL_EXIT_CODES is errors.FINAL_EXIT_CODES
    assert set(errors.FINAL_EXIT_CODES) == {errors.EXIT_BAD_INPUT, errors.EXIT_REJECTED}


# ------------------------------------------------------------------ the local path: the same table

def _local_execute(monkeypatch, tmp_path, arguments, **env):
    from mlpipe_steps import LocalStepOperator

    monkeypatch.setenv("MLPIPE_HOME", str(tmp_path))
    monkeypatch.setenv("MLPIPE_STORE_URL", f"file://{tmp_path / 'store'}")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    op = LocalStepOperator(task_id="probe", command="drops", arguments=arguments)
    return op.execute({})


def test_local_step_bad_input_is_final_and_quotes_the_error_line(monkeypatch, tmp_path):
    from airflow.sdk.exceptions import AirflowFailException

    from tasks.contracts.errors import EXIT_BAD_INPUT

    with pytest.raises(AirflowFailException,
                       match=rf"step drops bad input \(exit {EXIT_BAD_INPUT}\): error: drop 'nope' not found"):
        _local_execute(monkeypatch, tmp_path, ["show", "nope"])


def test_local_step_outage_is_retried(monkeypatch, tmp_path):
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    from tasks.contracts.errors import EXIT_TRANSIENT
    from tasks.local.procs import free_port

    with pytest.raises(AirflowException, match=rf"step drops failed \(exit {EXIT_TRANSIENT}, will retry") as exc:
        _local_execute(monkeypatch, tmp_path, ["list"], MLPIPE_STORE_URL="s3://nowhere",
                       MLPIPE_S3_ENDPOINT=f"127.0.0.1:{free_port()}", MLPIPE_S3_ACCESS_KEY="k", MLPIPE_S3_SECRET_KEY="s")
    assert not isinstance(exc.value, AirflowFailException)
    assert "error: cannot reach S3 endpoint" in str(exc.value)


def test_local_step_success_returns_the_result(monkeypatch, tmp_path):
    assert _local_execute(monkeypatch, tmp_path, ["list"]) == {"drops": []}
