"""retrain_pipeline: a scene drop -> per member (detector, classifier): train -> register -> compile -> member QC
-> one pipeline version -> pipeline QC -> deploy (the members swapped as one step).

Wiring only: the steps live in ``tasks/`` (``tasks.steps.pipeline`` for compose, the pipeline QC and the deploy)
and run through ``mlpipe_steps.step`` like the single-model ``retrain``. The ``pipeline`` param names the
pipeline project (``models/<pipeline>/pipeline.yaml``); ``members`` says which roles are retrained: a role left
out skips its train/register/compile/QC and keeps the version the serving pipeline pins. A member that fails
its own QC gate skips everything after it (the serving pipeline keeps its members) and the ``outcome`` task
fails saying which member was rejected and why; so does a failed pipeline QC. The member model names are
read when the run starts (``members``), never at parse time.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, task

from mlpipe_assets import DEPLOYMENTS, DROPS, MODEL_VERSIONS
from mlpipe_steps import SERVING_POOL, pipeline_outcome, qc_gate, step, train_step

ROLES = ("detector", "classifier")
PIPELINE = "{{ params.pipeline }}"
DROP = "{{ ti.xcom_pull(task_ids='validate')['drop_id'] }}"


def member(role: str) -> str:
    return "{{ ti.xcom_pull(task_ids='members')['" + role + "'] }}"


def version_of(role: str) -> str:
    return "{{ ti.xcom_pull(task_ids='register_" + role + "')['version'] }}"


def composed_version(role: str) -> str:
    # the new version of a retrained member; empty (keep the serving pipeline's) for the others
    return ("{{ (ti.xcom_pull(task_ids='register_" + role + "') or {}).get('version', '') if '" + role
            + "' in params.members else '' }}")


@dag(
    dag_id="retrain_pipeline",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["mlpipe", "training", "pipeline"],
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": timedelta(seconds=10), "retry_exponential_backoff": True},
    params={
        "pipeline": Param("scenes", type="string", pattern=r"^[a-z][a-z0-9_-]{0,62}$", title="Pipeline",
                          description="The pipeline project (models/<pipeline>/pipeline.yaml)."),
        "members": Param(list(ROLES), type="array", items={"type": "string", "enum": list(ROLES)}, minItems=1,
                         uniqueItems=True, title="Members to retrain",
                         description="Which roles are retrained; the others keep the serving pipeline's versions."),
        "drop_id": Param("latest", type="string", minLength=1, maxLength=128, pattern=r"^[A-Za-z0-9._-]+$",
                         title="Drop id", description="The scene drop to train on ('latest': the newest complete)."),
        "epochs": Param(8, type="integer", minimum=1, maximum=100, title="Epochs"),
        "seed": Param(0, type="integer", minimum=0, title="Seed"),
    },
)
def retrain_pipeline():
    members = step("members", "pipeline", ["members", "--pipeline", PIPELINE], retries=0)
    validate = step("validate", "validate", ["--model", PIPELINE, "--drop-id", "{{ params.drop_id }}"], inlets=[DROPS])
    compose = step("compose", "pipeline", ["compose", "--pipeline", PIPELINE, "--reason", "retrain_pipeline run "
                   "{{ run_id }}"] + [a for role in ROLES for a in (f"--{role}", composed_version(role))],
                   outlets=[MODEL_VERSIONS], trigger_rule="none_failed")
    gates, member_verdicts = [], []
    for role in ROLES:
        @task.short_circuit(task_id=f"retrain_{role}", ignore_downstream_trigger_rules=False)
        def selected(role: str, params: dict | None = None) -> bool:
            return role in (params or {}).get("members", [])

        chosen = selected(role)
        train = train_step(f"train_{role}", model=member(role), drop_ids=DROP, epochs="{{ params.epochs }}",
                           seed="{{ params.seed }}", deferrable=True, execution_timeout=timedelta(hours=2))
        register = step(f"register_{role}", "registry",
                        ["--model", member(role), "register", "--run-id",
                         "{{ ti.xcom_pull(task_ids='train_" + role + "')['run_id'] }}", "--drop-id",
                         "{{ ti.xcom_pull(task_ids='train_" + role + "')['drop_ids'] | join(',') }}"],
                        outlets=[MODEL_VERSIONS])
        compile_ = step(f"compile_{role}", "compile", ["--model", member(role), "--version", version_of(role)],
                        gpu=True, image_env="MLPIPE_COMPILER_IMAGE", deferrable=True)
        qc = step(f"qc_{role}", "qc", ["--model", member(role), "--version", version_of(role), "--no-fail"])
        # a failed member gate skips compose (its direct downstream); pipeline QC and deploy follow as skipped,
        # the outcome (all_done) still runs and says which member was rejected
        gate = qc_gate(f"qc_gate_{role}")(qc.output)
        [members, validate] >> chosen >> train >> register >> compile_ >> qc
        gates.append(gate)
        member_verdicts.append(qc.output)
    pipeline_qc = step("pipeline_qc", "pipeline", ["qc", "--pipeline", PIPELINE, "--version",
                                                    "{{ ti.xcom_pull(task_ids='compose')['version'] }}", "--no-fail"])
    pipeline_gate = qc_gate("pipeline_qc_gate")(pipeline_qc.output)
    deploy = step("deploy", "pipeline", ["deploy", "--pipeline", PIPELINE, "--version",
                                         "{{ ti.xcom_pull(task_ids='compose')['version'] }}"],
                  retries=3, pool=SERVING_POOL, outlets=[DEPLOYMENTS])
    outcome = pipeline_outcome()(pipeline_qc.output, deploy.output, member_verdicts)
    gates >> compose >> pipeline_qc
    pipeline_gate >> deploy >> outcome


retrain_pipeline()
