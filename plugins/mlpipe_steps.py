"""Airflow adapter: run a pipeline step locally or as a Kubernetes pod.

Every step is ``mlpipe <command> <arguments> --result-json <path>`` (``python -m tasks.cli <command>``).
``step()`` returns

* a ``LocalStepOperator`` (the default, ``MLPIPE_EXECUTION=local``): the CLI as a
  subprocess of the Airflow worker, its output streamed into the task log; or
* a ``KubernetesPodOperator`` (``MLPIPE_EXECUTION=kubernetes``): the same CLI with
  the same arguments as the container command, ``nvidia.com/gpu: 1``, a node
  selector and tolerations for GPU steps; the result file is the pod's XCom
  sidecar file ``/airflow/xcom/return.json``.

Exit codes of the step CLIs (``tasks.contracts.errors``): 0 ok; the codes in
``FINAL_EXIT_CODES`` (``EXIT_BAD_INPUT`` 2, ``EXIT_REJECTED`` 3) are final: the task fails
with ``AirflowFailException``, no retry, on both paths (the pod's base container exit code
is read the same way). Anything else (``EXIT_TRANSIENT`` 75, 1 for a crash, a kill, OOM) is
retried by Airflow.

Training (``train_step``): the model's own trainer, from its spec (``models/<name>/spec.yaml``,
``trainer``; the trainer contract is in ``tasks/steps/train.py``). Locally ``mlpipe train --model NAME``
calls ``trainer.entry_point``; in a pod the image, command and arguments are ``trainer.image``,
``trainer.command`` and ``trainer.args`` with ``{drop_ids}``, ``{run_id}``, ``{seed}``, ``{epochs}`` filled
in plus ``--result-json /airflow/xcom/return.json``, resolved when the task runs for the model the DAG
run is for (its ``model`` param), so the DAG file reads no spec when it is parsed.

Pods: settings from the ``mlpipe-config`` ConfigMap (``docker/k8s/configmap.yaml``) and
credentials from the ``mlpipe-credentials`` Secret, both ``envFrom``; the variables of
``POD_ENV_PASSTHROUGH`` set in the Airflow worker's environment override them. A step
built with ``deferrable=True`` waits for its pod in the triggerer (no worker slot held);
the local subprocess ignores it.
"""

from __future__ import annotations

import functools
import json
import logging
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

from tasks.contracts.errors import FINAL_EXIT_CODES  # noqa: E402 - after the sys.path line above
from tasks.contracts.pools import SERVING_POOL  # noqa: E402,F401 - for the DAGs: `pool=SERVING_POOL`

POD_CONFIG_MAP = "mlpipe-config"
POD_SECRET = "mlpipe-credentials"
POD_XCOM_PATH = "/airflow/xcom/return.json"
# Settings passed to pods (never credentials: those come from a Kubernetes Secret).
POD_ENV_PASSTHROUGH = (
    "MLPIPE_STORE_URL", "MLPIPE_S3_ENDPOINT", "MLPIPE_S3_SECURE", "MLPIPE_S3_REGION", "MLPIPE_MODEL_NAME",
    "MLPIPE_CLEARML_PROJECT", "CLEARML_API_HOST", "CLEARML_WEB_HOST", "CLEARML_FILES_HOST",
    "MLPIPE_TRITON_URL", "MLPIPE_MODEL_REPO", "MLPIPE_KEEP_VERSIONS",
    "OTEL_EXPORTER_OTLP_ENDPOINT",  # the step pods' spans go to the collector the Airflow side exports to
) + tuple(f"MLPIPE_QC_{n}" for n in ("MIN_ACCURACY", "MIN_CLASS_RECALL", "MAX_REGRESSION", "MAX_PARITY_DIFF",
                                    "MAX_TRT_PARITY_DIFF", "P95_LATENCY_MS", "LATENCY_REQUESTS", "TRITON_CHECK"))


def execution_mode() -> str:
    from tasks.config import load_settings

    return load_settings().execution  # MLPIPE_EXECUTION; a bad value raises naming it


def _airflow_attributes(context: Any) -> dict[str, Any]:
    """The Airflow ids of a task run, as span attributes (missing ones left out)."""
    ti = context.get("ti") if hasattr(context, "get") else None
    run = context.get("dag_run") if hasattr(context, "get") else None
    return {k: v for k, v in {
        "airflow.dag_id": getattr(ti, "dag_id", None) or getattr(run, "dag_id", None),
        "airflow.run_id": getattr(run, "run_id", None) or getattr(ti, "run_id", None),
        "airflow.task_id": getattr(ti, "task_id", None),
        "airflow.try_number": getattr(ti, "try_number", None)}.items() if v is not None}


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
        """The step run inside a ``step <command>`` span (``tasks.tracing``); the subprocess gets its
        ``TRACEPARENT``, so the step's log lines carry the span's trace id."""
        from tasks import tracing

        tracing.setup_tracing("airflow")
        try:
            with tracing.step_span(self.command, _airflow_attributes(context)) as trace_env:
                return self._execute(context, trace_env)
        finally:
            tracing.flush(2.0)  # the task process may end before the batch exporter's next round

    def _execute(self, context: Any, trace_env: dict[str, str]) -> Any:
        with tempfile.TemporaryDirectory(prefix=f"mlpipe-{self.command}-") as tmp:
            result_path = Path(tmp) / "result.json"
            cmd = [sys.executable, "-m", "tasks.cli", self.command, *map(str, self.arguments),
                   "--result-json", str(result_path)]
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
            env.setdefault("PYTHONUNBUFFERED", "1")
            env["MLPIPE_LOG_FORMAT"] = "json"  # parsed below: each record at its level, Airflow's time only
            env.update(trace_env)
            self.log.info("step %s: %s", self.command, shlex.join(cmd))
            tail: deque[str] = deque(maxlen=20)
            error: str | None = None
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                          cwd=PROJECT_ROOT, env=env, start_new_session=True)
            assert self._proc.stdout is not None
            for line in self._proc.stdout:
                line = line.rstrip("\n")
                tail.append(line)
                message = self._relog(line)
                if message is not None and message.startswith("error:"):
                    error = message
            rc = self._proc.wait()
            if rc != 0:
                fallback = [ln for ln in tail if ln.startswith("error:") or "failed" in ln.lower()]
                reason = (error or (fallback[-1] if fallback else (tail[-1] if tail else "no output"))).strip()
                if rc in FINAL_EXIT_CODES:
                    raise AirflowFailException(f"step {self.command} {FINAL_EXIT_CODES[rc]} (exit {rc}): {reason}")
                raise AirflowException(f"step {self.command} failed (exit {rc}, will retry if retries remain): {reason}")
            if result_path.exists():
                return json.loads(result_path.read_text())
            return None

    def _relog(self, line: str) -> str | None:
        """Log one output line of the step: a JSON log record (``tasks.logs``) at its own level as
        ``logger: message``, anything else (the printed result) as it is. Returns an ERROR record's
        message, else None."""
        record = None
        if line.startswith("{") and line.endswith("}"):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
        if not (isinstance(record, dict) and {"level", "logger", "message"} <= record.keys()):
            self.log.info("%s", line)
            return None
        level = logging.getLevelName(str(record["level"]))
        level = level if isinstance(level, int) else logging.INFO
        context = " ".join(f"{k}={record[k]}" for k in ("trace_id", "span_id", "run_id", "model_version")
                           if record.get(k) is not None)
        text = f"{record['logger']}: {record['message']}" + (f" [{context}]" if context else "")
        if record.get("exc_info"):
            text += "\n" + str(record["exc_info"])
        self.log.log(level, "%s", text)
        return str(record["message"]) if level >= logging.ERROR else None

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


def base_container_exit_code(pod: Any, container: str = "base") -> int | None:
    """The exit code of ``container`` in a ``V1Pod`` when it has terminated, else None."""
    statuses = (pod.status.container_statuses if pod is not None and pod.status else None) or []
    status = next((s for s in statuses if s.name == container), None)
    terminated = status.state.terminated if status is not None and status.state else None
    return None if terminated is None else terminated.exit_code


@functools.lru_cache(maxsize=1)
def pod_operator_class() -> type:
    """``StepPodOperator``: a ``KubernetesPodOperator`` whose failed pod fails the task for good
    (``AirflowFailException``, no retry) when its base container exited with a final code.

    The hook is ``cleanup(pod, remote_pod)``, which both the synchronous and the deferrable path
    call once the pod is done, and which raises ``AirflowException`` for a failed pod."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.providers.cncf.kubernetes.utils.container import get_container_termination_message
    from airflow.sdk.exceptions import AirflowSkipException

    class StepPodOperator(KubernetesPodOperator):
        """``trainer_model`` (templated): run that model's trainer (``trainer_pod``), its placeholders from
        ``trainer_values`` (templated: ``drop_ids``, ``seed``, ``epochs``)."""

        template_fields: Sequence[str] = (*KubernetesPodOperator.template_fields, "trainer_model", "trainer_values")

        def __init__(self, *, step_command: str = "", trainer_model: str | None = None,
                     trainer_values: dict[str, str] | None = None, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.step_command = step_command
            self.trainer_model = trainer_model
            self.trainer_values = trainer_values or {}

        def execute(self, context: Any) -> Any:
            if self.trainer_model:
                self.image, self.cmds, self.arguments = trainer_pod(self.trainer_model, self.trainer_values)
                self.log.info("model %s: trainer image %s, command %s", self.trainer_model, self.image,
                              shlex.join([*self.cmds, *self.arguments]))
            from tasks import tracing

            tracing.setup_tracing("airflow")
            try:  # a step span; the pod gets its TRACEPARENT (its log lines carry the span's trace id)
                with tracing.step_span(self.step_command or self.task_id, _airflow_attributes(context)) as trace_env:
                    if trace_env:
                        from kubernetes.client import models as k8s

                        self.env_vars = [*(self.env_vars or []), *(k8s.V1EnvVar(name=k, value=v)
                                                                   for k, v in trace_env.items())]
                    return super().execute(context)
            finally:
                tracing.flush(2.0)

        def cleanup(self, pod: Any, remote_pod: Any, *args: Any, **kwargs: Any) -> None:
            try:
                super().cleanup(pod, remote_pod, *args, **kwargs)
            except (AirflowFailException, AirflowSkipException):
                raise
            except AirflowException as exc:
                rc = base_container_exit_code(remote_pod, self.base_container_name)
                if rc in FINAL_EXIT_CODES:
                    name = getattr(getattr(remote_pod, "metadata", None), "name", None)
                    reason = get_container_termination_message(remote_pod, self.base_container_name)
                    raise AirflowFailException(
                        f"step {self.step_command or self.task_id} {FINAL_EXIT_CODES[rc]} (exit {rc}, pod {name}): "
                        + (reason.strip() if isinstance(reason, str) and reason.strip()
                           else "not retried; the reason is the 'error:' line of the pod log above")) from exc
                raise

    StepPodOperator.__module__ = __name__
    StepPodOperator.__qualname__ = "StepPodOperator"
    globals()["StepPodOperator"] = StepPodOperator
    return StepPodOperator


def trainer_pod(model: str, values: dict[str, str]) -> tuple[str, list[str], list[str]]:
    """(image, command, arguments) of the training pod of ``model``: its spec's ``trainer.image``,
    ``trainer.command`` and ``trainer.args`` with the placeholders filled in (``drop_ids`` comma-separated,
    ``seed``, ``epochs`` from ``values``; ``run_id`` the run id ``mlpipe train`` derives from them), then
    ``--result-json`` the pod's XCom file. A bad spec raises its ``SpecError`` (bad input: not retried)."""
    from tasks.config import load_settings
    from tasks.steps.train import default_run_id, split_drop_ids

    spec = load_settings().model_spec(model)
    drop_ids = split_drop_ids([values["drop_ids"]])
    seed, epochs = int(values["seed"]), int(values["epochs"])
    filled = {"drop_ids": ",".join(drop_ids), "seed": str(seed), "epochs": str(epochs),
              "run_id": default_run_id(drop_ids, seed=seed, epochs=epochs, model=model)}
    args = [arg.format(**filled) for arg in spec.trainer.args]
    return spec.trainer.image, list(spec.trainer.command), [*args, "--result-json", POD_XCOM_PATH]


def pod_operator(task_id: str, command: str, arguments: Sequence[str], *, gpu: bool, image: str,
                 deferrable: bool = False, **kwargs: Any) -> BaseOperator:
    from kubernetes.client import models as k8s

    from tasks.config import load_settings

    kcfg = load_settings().k8s  # MLPIPE_K8S_NAMESPACE, MLPIPE_GPU_NODE_SELECTOR, MLPIPE_GPU_TOLERATION
    namespace = kcfg.namespace
    resources = k8s.V1ResourceRequirements(
        requests={"cpu": "2", "memory": "4Gi"},
        limits={"memory": "8Gi", **({"nvidia.com/gpu": "1"} if gpu else {})},
    )
    node_selector = None
    tolerations = None
    if gpu:
        sel = kcfg.gpu_node_selector
        k, _, v = sel.partition("=")
        node_selector = {k: v}
        tolerations = [k8s.V1Toleration(**_parse_toleration(kcfg.gpu_toleration))]
    env_vars = {name: os.environ[name] for name in POD_ENV_PASSTHROUGH if os.environ.get(name)}
    return pod_operator_class()(
        task_id=task_id,
        step_command=command,
        name=f"mlpipe-{task_id}",
        namespace=namespace,
        image=image,
        cmds=["python", "-m", "tasks.cli", command],
        arguments=[*arguments, "--result-json", POD_XCOM_PATH],
        env_vars=env_vars,
        env_from=[k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=POD_SECRET, optional=True)),
                  k8s.V1EnvFromSource(config_map_ref=k8s.V1ConfigMapEnvSource(name=POD_CONFIG_MAP, optional=True))],
        container_resources=resources,
        node_selector=node_selector,
        tolerations=tolerations,
        labels={"app.kubernetes.io/part-of": "mlpipe", "mlpipe/step": command},
        do_xcom_push=True,
        get_logs=True,
        on_finish_action="delete_succeeded_pod",
        deferrable=deferrable,
        **kwargs,
    )


def step(task_id: str, command: str, arguments: Sequence[str], *, gpu: bool = False,
         image_env: str | None = None, deferrable: bool = False, **kwargs: Any) -> BaseOperator:
    """The operator for one pipeline step, chosen by ``MLPIPE_EXECUTION`` (local | kubernetes).

    ``image_env`` names the environment variable holding the pod image (default: the trainer
    image for GPU steps, the tasks image otherwise). ``deferrable``: the pod is awaited in the
    triggerer (Kubernetes only). ``pool`` and the other ``BaseOperator`` arguments go to both."""
    mode = execution_mode()
    if mode == "kubernetes":
        image_env = image_env or ("MLPIPE_TRAINER_IMAGE" if gpu else "MLPIPE_TASKS_IMAGE")
        from tasks.config import load_settings

        image = load_settings().k8s.image(image_env)  # MLPIPE_*_IMAGE, defaults in tasks/config.py
        return pod_operator(task_id, command, arguments, gpu=gpu, image=image, deferrable=deferrable, **kwargs)
    if mode != "local":
        raise ValueError(f"MLPIPE_EXECUTION must be 'local' or 'kubernetes', got {mode!r}")
    return LocalStepOperator(task_id=task_id, command=command, arguments=arguments, **kwargs)


def train_step(task_id: str, *, model: str, drop_ids: str, seed: str, epochs: str, deferrable: bool = False,
               **kwargs: Any) -> BaseOperator:
    """The training step of ``model`` (templated, e.g. ``{{ params.model }}``) on ``drop_ids`` (templated, one
    comma-separated list), by ``MLPIPE_EXECUTION``: locally ``mlpipe train --model ...`` (the spec's
    ``trainer.entry_point``); on Kubernetes a GPU pod of the spec's ``trainer`` (``trainer_pod``, resolved when
    the task runs), deferrable when asked. The other ``BaseOperator`` arguments go to both."""
    mode = execution_mode()
    arguments = ["--model", model, "--drop-id", drop_ids, "--epochs", epochs, "--seed", seed]
    if mode == "kubernetes":
        from tasks.config import load_settings

        # Until the task runs (a dry-run render, the UI) the pod shows the built-in trainer: the
        # MLPIPE_TRAINER_IMAGE image running `mlpipe train` with these arguments; execute() replaces image,
        # command and arguments with the run's model's spec.trainer (trainer_pod).
        image = load_settings().k8s.image("MLPIPE_TRAINER_IMAGE")
        return pod_operator(task_id, "train", arguments, gpu=True, image=image, deferrable=deferrable,
                            trainer_model=model, trainer_values={"drop_ids": drop_ids, "seed": seed, "epochs": epochs},
                            **kwargs)
    if mode != "local":
        raise ValueError(f"MLPIPE_EXECUTION must be 'local' or 'kubernetes', got {mode!r}")
    return LocalStepOperator(task_id=task_id, command="train", arguments=arguments, **kwargs)


def qc_gate(task_id: str = "qc_gate"):
    """A short-circuit task: a QC verdict other than ``passed`` skips everything downstream
    (deploy shows as *skipped* in the graph, not silently successful) and logs why."""
    from airflow.sdk import task

    # only the direct downstream (deploy) is skipped: the run's ``outcome`` task still runs (all_done)
    @task.short_circuit(task_id=task_id, ignore_downstream_trigger_rules=False)
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


def describe_outcome(verdict: dict | None, deployed: dict | None) -> tuple[bool, str]:
    """(deployed?, one line for the run's log) from QC's verdict and deploy's result."""
    version = (verdict or {}).get("version")
    if verdict and verdict.get("verdict") == "passed" and deployed:
        return True, f"DEPLOYED: v{version} passed QC and is serving (deploy result {deployed})"
    if verdict and verdict.get("verdict") == "failed":
        reasons = "; ".join(verdict.get("reasons") or []) or "no reason recorded"
        return False, (f"REJECTED: v{version} failed the QC gate ({reasons}); deploy was skipped and the "
                       f"champion keeps serving. Report: {verdict.get('report_uri')}")
    if verdict and verdict.get("verdict") == "passed":
        return False, f"NOT DEPLOYED: v{version} passed QC but deploy did not succeed (see the deploy task's log)"
    return False, "NOT DEPLOYED: the run ended before the QC gate (see the failed task's log)"


def run_outcome(task_id: str = "outcome"):
    """The run's last task: green only when a version was deployed; a rejection or any other way of not
    deploying fails it (no retry) with one line saying what happened, so a rejected run is visibly not a
    deploy in the grid, not just a skipped box."""
    from airflow.sdk import task

    @task(task_id=task_id, trigger_rule="all_done", retries=0)
    def _outcome(verdict: dict | None, deployed: dict | None = None) -> dict:
        import logging

        ok, line = describe_outcome(verdict, deployed)
        if not ok:
            logging.getLogger("mlpipe.outcome").error("%s", line)
            raise AirflowFailException(line)
        logging.getLogger("mlpipe.outcome").info("%s", line)
        return {"outcome": "deployed", "version": (verdict or {}).get("version")}

    return _outcome



def describe_pipeline_outcome(verdict: dict | None, deployed: dict | None,
                              member_verdicts: Sequence[dict | None] = ()) -> tuple[bool, str]:
    """(deployed?, one line) of a ``retrain_pipeline`` run: a member rejected by its own gate, the pipeline
    rejected by its QC, deployed, or ended early."""
    for mv in member_verdicts or ():
        if mv and mv.get("verdict") == "failed":
            reasons = "; ".join(mv.get("reasons") or []) or "no reason recorded"
            return False, (f"REJECTED: member {mv.get('model')} v{mv.get('version')} failed its QC gate ({reasons}); "
                           f"no pipeline version was made and the serving pipeline keeps its members. Report: "
                           f"{mv.get('report_uri')}")
    ok, line = describe_outcome(verdict, deployed)
    return ok, line.replace(" v", " pipeline v", 1) if verdict else line


def pipeline_outcome(task_id: str = "outcome"):
    """The last task of ``retrain_pipeline``: green only when a pipeline version was deployed (see
    ``run_outcome``); a member or pipeline rejection fails it with one line saying which and why."""
    from airflow.sdk import task

    @task(task_id=task_id, trigger_rule="all_done", retries=0)
    def _outcome(verdict: dict | None, deployed: dict | None = None,
                 member_verdicts: list | None = None) -> dict:
        import logging

        ok, line = describe_pipeline_outcome(verdict, deployed, member_verdicts or [])
        if not ok:
            logging.getLogger("mlpipe.outcome").error("%s", line)
            raise AirflowFailException(line)
        logging.getLogger("mlpipe.outcome").info("%s", line)
        return {"outcome": "deployed", "version": (verdict or {}).get("version")}

    return _outcome
