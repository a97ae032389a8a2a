"""rollback: serve an earlier registered version (manual trigger) and record it in the registry.

Updates the ``mlpipe_deployments`` asset (the ``monitor`` DAG watches what is served).
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag

from mlpipe_assets import DEPLOYMENTS
from mlpipe_steps import SERVING_POOL, step
from tasks.config import load_settings


@dag(
    dag_id="rollback",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["mlpipe", "serving"],
    doc_md=__doc__,
    params={
        "model": Param(load_settings().model_name, type="string", pattern=r"^[a-z][a-z0-9_-]{0,62}$", title="Model",
                       description="The model project (models/<model>/spec.yaml) to roll back."),
        "version": Param(1, type="integer", minimum=1, title="Version",
                         description="Registered model version to serve (must exist and not be rejected)."),
        "reason": Param("manual rollback", type="string", maxLength=200, title="Reason",
                        description="Why: recorded in the registry event log."),
    },
)
def rollback():
    step("rollback", "deploy", ["--model", "{{ params.model }}", "rollback", "--version", "{{ params.version }}", "--reason", "{{ params.reason }}"], retries=1,
         pool=SERVING_POOL, outlets=[DEPLOYMENTS])


rollback()
