"""rollout_kill: the kill switch in the UI. Every frame goes back to the champion within about a second
(``mlpipe rollout kill``); a running rollout sees it, unloads its candidate and ends ``killed``."""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag

from mlpipe_steps import step
from tasks.config import load_settings


@dag(
    dag_id="rollout_kill",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["mlpipe", "serving", "rollout"],
    doc_md=__doc__,
    params={
        "model": Param(load_settings().model_name, type="string", pattern=r"^[a-z][a-z0-9_-]{0,62}$", title="Model",
                       description="The model project whose rollout to stop."),
        "reason": Param("kill switch from the Airflow UI", type="string", maxLength=200, title="Reason",
                        description="Why: recorded in the registry event."),
    },
)
def rollout_kill():
    # no pool: the kill switch must never wait behind a deploy or the rollout it stops
    step("kill", "rollout", ["kill", "--model", "{{ params.model }}", "--by", "airflow-ui",
                             "--reason", "{{ params.reason }}"], retries=2)


rollout_kill()
