"""retrain: a data drop -> validate -> train (GPU pod or local) -> register -> compile -> qc -> deploy.

Wiring only: the steps live in ``tasks/`` and run through ``mlpipe_steps.step``
(a local subprocess by default, a Kubernetes pod when MLPIPE_EXECUTION=kubernetes).
A failed validation stops the run at ``validate``; a failed QC gate rejects the
version and skips ``deploy`` (the champion keeps serving), and the final ``outcome`` task
fails saying "REJECTED: ..." so the run is visibly not a deploy. A step that exits "bad input" or
"rejected" (``tasks.contracts.errors``) is not retried; an outage is. On Kubernetes the
``train`` and ``compile`` pods are deferrable (awaited in the triggerer); ``deploy`` runs in
the ``mlpipe_serving`` pool with ``rollback``: one at a time across DAGs.

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
from mlpipe_steps import SERVING_POOL, qc_gate, run_outcome, step

VALIDATED_DROP = "{{ ti.xcom_pull(task_ids='validate')['drop_id'] }}"
VERSION = "{{ ti.xcom_pull(task_ids='register')['version'] }}"
# train: one more argument, the extra drops as ``--drop-id=a,b`` when there are any, else a harmless repeat
# of ``--seed`` (the argument list is fixed when the DAG is parsed; only its values are templated).
TRAIN_EXTRA = ("{{ ('--drop-id=' ~ (params.extra_drop_ids | join(','))) if params.extra_drop_ids "
               "else ('--seed=' ~ params.seed) }}")
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
    validate = step("validate", "validate", ["--drop-id", "{{ params.drop_id }}"], inlets=[DROPS])
    train = step("train", "train",
                 ["--drop-id", VALIDATED_DROP, "--epochs", "{{ params.epochs }}", "--seed", "{{ params.seed }}",
                  TRAIN_EXTRA],
                 gpu=True, deferrable=True, execution_timeout=timedelta(hours=2))
    register = step("register", "registry",
                    ["register", "--run-id", "{{ ti.xcom_pull(task_ids='train')['run_id'] }}",
                     "--drop-id", TRAINED_DROPS], outlets=[MODEL_VERSIONS])
    compile_ = step("compile", "compile", ["--version", VERSION], gpu=True, image_env="MLPIPE_COMPILER_IMAGE",
                    deferrable=True)
    qc = step("qc", "qc", ["--version", VERSION, "--no-fail"])
    gate = qc_gate()(qc.output)
    deploy = step("deploy", "deploy", ["deploy", "--version", VERSION], retries=3, pool=SERVING_POOL,
                  outlets=[DEPLOYMENTS])
    outcome = run_outcome()(qc.output, deploy.output)
    validate >> train >> register >> compile_ >> qc
    gate >> deploy >> outcome


retrain()
