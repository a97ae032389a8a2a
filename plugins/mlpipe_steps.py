"""Airflow adapter: run a pipeline step locally or as a Kubernetes pod.

Every step is ``mlpipe <command> <arguments> --result-json <path>`` (``python -m tasks.cli <command>``).
``step()`` returns

* a ``LocalStepOperator`` (the default, ``MLPIPE_EXECUTION=local``): the CLI as a
  subprocess of the Airflow worker, its output streamed into the task log; or
* a ``KubernetesPodOperator`` (``MLPIPE_EXECUTION=kubernetes``): the same CLI with
  the same arguments as the container command, ``nvidia.com/gpu: 1``, a node
  selector and tolerations for GPU steps; the result file is the pod's XCom
  sidecar file ``/airflow/xcom/return.json``.

Exit codes of the step CLIs: 0 ok, 1 the input or the model is not acceptable
(validation failed, QC gate failed), 2 bad usage / unknown id. Both are final:
no retry. Anything else (a crash, OOM kill, a service that is down) is treated
as transient and retried by Airflow.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import Any, Sequence

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:  # so `import tasks` works in the worker
    sys.path.insert(0, str(PROJECT_ROOT))

FINAL_EXIT_CODES = {1: "rejected", 2: "bad input"}
POD_XCOM_PATH = "/airflow/xcom/return.json"
# Settings passed to pods (never credentials: those come from a Kubernetes Secret).
POD_ENV_PASSTHROUGH = (
    "MLPIPE_STORE_URL", "MLPIPE_S3_ENDPOINT", "MLPIPE_S3_SECURE", "MLPIPE_S3_REGION", "MLPIPE_MODEL_NAME",
    "MLPIPE_CLEARML_PROJECT", "CLEARML_API_HOST", "CLEARML_WEB_HOST", "CLEARML_FILES_HOST",
    "MLPIPE_TRITON_URL", "MLPIPE_MODEL_REPO", "MLPIPE_KEEP_VERSIONS",
) + tuple(f"MLPIPE_QC_{n}" for n in ("MIN_ACCURACY", "MIN_CLASS_RECALL", "MAX_REGRESSION", "MAX_PARITY_DIFF",
                                    "MAX_TRT_PARITY_DIFF", "P95_LATENCY_MS", "LATENCY_REQUESTS", "TRITON_CHECK"))


def execution_mode() -> str:
    return os.environ.get("MLPIPE_EXECUTION", "local").strip().lower() or "local"


class LocalStepOperator(BaseOperator):
    """Run ``mlpipe <command>`` as a subprocess; push its result JSON to XCom."""

    template_fields: Sequence[str] = ("arguments",)
    ui_color = "#e8f4ea"

    def __init__(self, *, command: str, arguments: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.command = command
        self.arguments = list(arguments)
        self._proc: subprocess.Popen[str] | None = None

    def execute(self, context: Any) -> Any:
        with tempfile.TemporaryDirectory(prefix=f"mlpipe-{self.command}-") as tmp:
            result_path = Path(tmp) / "result.json"
            cmd = [sys.executable, "-m", "tasks.cli", self.command, *map(str, self.arguments),
                   "--result-json", str(result_path)]
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
            env.setdefault("PYTHONUNBUFFERED", "1")
            self.log.info("step %s: %s", self.command, shlex.join(cmd))
            tail: deque[str] = deque(maxlen=20)
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                          cwd=PROJECT_ROOT, env=env, start_new_session=True)
            assert self._proc.stdout is not None
            for line in self._proc.stdout:
                line = line.rstrip("\n")
                tail.append(line)
                self.log.info("%s", line)
            rc = self._proc.wait()
            if rc != 0:
                errors = [ln for ln in tail if ln.startswith("error:") or "failed" in ln.lower()]
                reason = (errors[-1] if errors else (tail[-1] if tail else "no output")).strip()
                if rc in FINAL_EXIT_CODES:
                    raise AirflowFailException(f"step {self.command} {FINAL_EXIT_CODES[rc]} (exit {rc}): {reason}")
                raise AirflowException(f"step {self.command} failed (exit {rc}, will retry if retries remain): {reason}")
            if result_path.exists():
                return json.loads(result_path.read_text())
            return None

    def on_kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)


def _parse_toleration(spec: str) -> dict[str, str]:
    """``key=value:Effect`` or ``key:Effect`` -> a Kubernetes toleration."""
    key_val, _, effect = spec.partition(":")
    key, eq, value = key_val.partition("=")
    tol = {"key": key, "operator": "Equal" if eq else "Exists", "effect": effect or "NoSchedule"}
    if eq:
        tol["value"] = value
    return tol


def pod_operator(task_id: str, command: str, arguments: Sequence[str], *, gpu: bool, image: str,
                 **kwargs: Any) -> BaseOperator:
    from kubernetes.client import models as k8s
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    namespace = os.environ.get("MLPIPE_K8S_NAMESPACE", "mlpipe")
    resources = k8s.V1ResourceRequirements(
        requests={"cpu": "2", "memory": "4Gi"},
        limits={"memory": "8Gi", **({"nvidia.com/gpu": "1"} if gpu else {})},
    )
    node_selector = None
    tolerations = None
    if gpu:
        sel = os.environ.get("MLPIPE_GPU_NODE_SELECTOR", "nvidia.com/gpu.present=true")
        k, _, v = sel.partition("=")
        node_selector = {k: v}
        tolerations = [k8s.V1Toleration(**_parse_toleration(
            os.environ.get("MLPIPE_GPU_TOLERATION", "nvidia.com/gpu:NoSchedule")))]
    env_vars = {name: os.environ[name] for name in POD_ENV_PASSTHROUGH if os.environ.get(name)}
    return KubernetesPodOperator(
        task_id=task_id,
        name=f"mlpipe-{task_id}",
        namespace=namespace,
        image=image,
        cmds=["python", "-m", "tasks.cli", command],
        arguments=[*arguments, "--result-json", POD_XCOM_PATH],
        env_vars=env_vars,
        env_from=[k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name="mlpipe-credentials", optional=True))],
        container_resources=resources,
        node_selector=node_selector,
        tolerations=tolerations,
        labels={"app.kubernetes.io/part-of": "mlpipe", "mlpipe/step": command},
        do_xcom_push=True,
        get_logs=True,
        on_finish_action="delete_succeeded_pod",
        **kwargs,
    )


IMAGES = {  # env var naming the image -> default
    "MLPIPE_TASKS_IMAGE": "ghcr.io/mlpipe/tasks:0.1.0",
    "MLPIPE_TRAINER_IMAGE": "ghcr.io/mlpipe/trainer:0.1.0",
    "MLPIPE_COMPILER_IMAGE": "ghcr.io/mlpipe/trt-compiler:0.1.0",
}


def step(task_id: str, command: str, arguments: Sequence[str], *, gpu: bool = False,
         image_env: str | None = None, **kwargs: Any) -> BaseOperator:
    """The operator for one pipeline step, chosen by ``MLPIPE_EXECUTION`` (local | kubernetes).

    ``image_env`` names the environment variable holding the pod image (default: the trainer
    image for GPU steps, the tasks image otherwise)."""
    mode = execution_mode()
    if mode == "kubernetes":
        image_env = image_env or ("MLPIPE_TRAINER_IMAGE" if gpu else "MLPIPE_TASKS_IMAGE")
        image = os.environ.get(image_env) or IMAGES[image_env]
        return pod_operator(task_id, command, arguments, gpu=gpu, image=image, **kwargs)
    if mode != "local":
        raise ValueError(f"MLPIPE_EXECUTION must be 'local' or 'kubernetes', got {mode!r}")
    return LocalStepOperator(task_id=task_id, command=command, arguments=arguments, **kwargs)


def qc_gate(task_id: str = "qc_gate"):
    """A short-circuit task: a QC verdict other than ``passed`` skips everything downstream
    (deploy shows as *skipped* in the graph, not silently successful) and logs why."""
    from airflow.sdk import task

    @task.short_circuit(task_id=task_id)
    def _gate(verdict: dict | None) -> bool:
        import logging

        log = logging.getLogger("mlpipe.qc_gate")
        if not verdict:
            log.error("no QC verdict was produced: not deploying")
            return False
        if verdict.get("verdict") == "passed":
            log.info("QC passed for v%s: deploying", verdict.get("version"))
            return True
        log.warning("QC gate FAILED for v%s: deploy skipped, the champion keeps serving. Reasons:",
                    verdict.get("version"))
        for reason in verdict.get("reasons", []):
            log.warning("  - %s", reason)
        log.warning("report: %s", verdict.get("report_uri"))
        return False

    return _gate
