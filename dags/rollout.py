"""rollout: a QC-passed version proves itself on live traffic (shadow, then canary shares), then is promoted,
or is rolled back by itself when its live evidence does not hold (``mlpipe rollout run``).

Manual trigger (or from a retrain run): the task steps the canary up, records every step and decision as a
registry event with its evidence, and writes a report (``rollouts/<model>/<id>/report.html``). A rolled-back
or killed rollout fails the run with the reason (``EXIT_REJECTED``: final, never retried). The ``rollout_kill``
DAG, ``mlpipe rollout kill`` and the gateway's ``POST /v1/rollout/<model>/kill`` stop it at once.

Updates the ``mlpipe_deployments`` asset when it ends (the ``monitor`` DAG watches what is served).
"""

from __future__ import annotations

import datetime as dt

import pendulum
from airflow.sdk import Param, dag

from mlpipe_assets import DEPLOYMENTS
from mlpipe_steps import SERVING_POOL, step
from tasks.config import load_settings


@dag(
    dag_id="rollout",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["mlpipe", "serving", "rollout"],
    doc_md=__doc__,
    params={
        "model": Param(load_settings().model_name, type="string", pattern=r"^[a-z][a-z0-9_-]{0,62}$", title="Model",
                       description="The model project (models/<model>/spec.yaml)."),
        "version": Param(1, type="integer", minimum=1, title="Version",
                         description="A QC-passed version that is not the production one."),
        "steps": Param(load_settings().rollout.steps, type="string", pattern=r"^[a-z0-9.,% ]{1,100}$",
                       title="Steps", description="shadow, then canary shares in percent; the last must be 100."),
        "window_s": Param(load_settings().rollout.window_s, type="number", exclusiveMinimum=0, title="Window (s)",
                          description="Seconds of live traffic each step watches at least."),
    },
)
def rollout():
    step("rollout", "rollout", ["run", "--model", "{{ params.model }}", "--version", "{{ params.version }}",
                                "--steps", "{{ params.steps }}", "--window", "{{ params.window_s }}"],
         retries=0, pool=SERVING_POOL, outlets=[DEPLOYMENTS], execution_timeout=dt.timedelta(hours=2))


rollout()
