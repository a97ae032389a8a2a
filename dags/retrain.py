"""retrain: a data drop -> validate -> train (GPU pod or local) -> register -> compile -> qc -> deploy.

Wiring only: the steps live in ``tasks/`` and run through ``mlpipe_steps.step``
(a local subprocess by default, a Kubernetes pod when MLPIPE_EXECUTION=kubernetes).
A failed validation stops the run at ``validate``; a failed QC gate rejects the
version and skips ``deploy`` (the champion keeps serving), and the final ``outcome`` task
fails saying "REJECTED: ..." so the run is visibly not a deploy. A step that exits "bad input" or
"rejected" (``tasks.contracts.errors``) is not retried; an outage is. On Kubernetes the
``train`` and ``compile`` pods are deferrable (awaited in the triggerer); ``deploy`` runs in
the ``mlpipe_serving`` pool with ``rollback``: one at a time across DAGs.

Every step runs for one model (the ``model`` param, default ``MLPIPE_MODEL_NAME``: its spec is
``models/<model>/spec.yaml``): each gets ``--model``, and ``train`` runs that model's trainer
(``mlpipe_steps.train_step``: the spec's ``trainer``, locally or as a pod).

Started by ``drop_arrival`` (one run per complete drop, run id ``drop__<drop_id>``), by
``scheduled_retrain`` (``drop_id`` = the newest validated drop since the champion,
``extra_drop_ids`` = the others, trained on together) or by hand with the form's params.
Assets: reads ``mlpipe_drops``; ``register`` updates ``mlpipe_model_versions`` and ``deploy``
``mlpipe_deployments``.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag

from mlpipe_assets import DEPLOYMENTS, DROPS, MODEL_VERSIONS
from mlpipe_steps import SERVING_POOL, qc_gate, run_outcome, step, train_step
from tasks.config import load_settings

MODEL = "{{ params.model }}"
VERSION = "{{ ti.xcom_pull(task_ids='register')['version'] }}"
# train: the validated drop, then the extra drops, as one comma-separated list ({drop_ids} of the trainer)
TRAIN_DROPS = ("{{ ([ti.xcom_pull(task_ids='validate')['drop_id']] + (params.extra_drop_ids or [])) "
               "| join(',') }}")
# register: exactly the drops train trained on (its result), as one comma-separated list.
TRAINED_DROPS = "{{ ti.xcom_pull(task_ids='train')['drop_ids'] | join(',') }}"


@dag(
    dag_id="retrain",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["mlpipe", "training"],
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": timedelta(seconds=10), "retry_exponential_backoff": True},
    params={
        "model": Param(load_settings().model_name, type="string", pattern=r"^[a-z][a-z0-9_-]{0,62}$", title="Model",
                       description="The model project (models/<model>/spec.yaml): its spec drives every step "
                                   "and its trainer trains."),
        "drop_id": Param("latest", type="string", minLength=1, maxLength=128, pattern=r"^[A-Za-z0-9._-]+$",
                         title="Drop id",
                         description="The data drop to train on (drops/<drop_id>/ in the object store); "
                                     "'latest' takes the newest complete drop."),
        "epochs": Param(8, type="integer", minimum=1, maximum=100, title="Epochs",
                        description="Maximum training epochs (early stopping may end sooner)."),
        "seed": Param(0, type="integer", minimum=0, title="Seed", description="Random seed for split, init and order."),
        "extra_drop_ids": Param([], type=["array", "null"], items={"type": "string", "pattern": r"^[A-Za-z0-9._-]+$"},
                                maxItems=100, uniqueItems=True, title="Extra drops",
                                description="More drops, already validated, to train on together with drop_id "
                                            "(one per line; the scheduled retrain passes every validated drop "
                                            "since the champion). Empty: train on drop_id alone."),
    },
)
def retrain():
    validate = step("validate", "validate", ["--model", MODEL, "--drop-id", "{{ params.drop_id }}"], inlets=[DROPS])
    train = train_step("train", model=MODEL, drop_ids=TRAIN_DROPS, epochs="{{ params.epochs }}",
                       seed="{{ params.seed }}", deferrable=True, execution_timeout=timedelta(hours=2))
    register = step("register", "registry",
                    ["--model", MODEL, "register", "--run-id", "{{ ti.xcom_pull(task_ids='train')['run_id'] }}",
                     "--drop-id", TRAINED_DROPS], outlets=[MODEL_VERSIONS])
    compile_ = step("compile", "compile", ["--model", MODEL, "--version", VERSION], gpu=True,
                    image_env="MLPIPE_COMPILER_IMAGE", deferrable=True)
    qc = step("qc", "qc", ["--model", MODEL, "--version", VERSION, "--no-fail"])
    gate = qc_gate()(qc.output)
    deploy = step("deploy", "deploy", ["--model", MODEL, "deploy", "--version", VERSION], retries=3,
                  pool=SERVING_POOL, outlets=[DEPLOYMENTS])
    outcome = run_outcome()(qc.output, deploy.output)
    validate >> train >> register >> compile_ >> qc
    gate >> deploy >> outcome


retrain()
