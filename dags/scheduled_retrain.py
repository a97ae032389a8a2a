"""scheduled_retrain: on a cron schedule (or a drift alarm), retrain on every validated drop since the champion.

1. ``plan``: the complete drops newer than the newest drop the champion was trained on whose
   validation passed. None: the run ends here, saying so in the log ("no new validated data
   since the champion vN ..."), and ``trigger_retrain`` shows as *skipped*. Drops not validated
   yet are left to ``drop_arrival``; drops that failed validation are never trained on.
2. ``trigger_retrain``: one ``retrain`` run with ``drop_id`` = the newest of them and
   ``extra_drop_ids`` = the others (one model trained on all of them). Its run id is derived from
   the set of drops, so the same set is never retrained twice; ``model`` = ``MLPIPE_MODEL_NAME`` (the model
   whose champion is compared).

Schedule: ``MLPIPE_RETRAIN_CRON`` (cron, UTC; default ``0 3 * * *``; ``off`` for none), read when
the DAG file is parsed, **or** an event of the ``mlpipe_drift`` asset (the monitor's retrain
request), whichever comes first. A manual run from the UI takes ``epochs`` and ``seed``.
"""

from __future__ import annotations

import pendulum
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, task

from mlpipe_assets import DRIFT
from mlpipe_triggers import RETRAIN_TRIGGER_KWARGS, cron_from_env

DEFAULT_CRON = "0 3 * * *"


def retrain_schedule():
    cron = cron_from_env("MLPIPE_RETRAIN_CRON", DEFAULT_CRON, "'0 3 * * *' for 03:00 UTC daily")
    if cron is None:
        return [DRIFT]
    return AssetOrTimeSchedule(timetable=CronTriggerTimetable(cron, timezone="UTC"), assets=[DRIFT])


@dag(
    dag_id="scheduled_retrain",
    schedule=retrain_schedule(),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["mlpipe", "trigger", "training"],
    doc_md=__doc__,
    params={
        "epochs": Param(8, type="integer", minimum=1, maximum=100, title="Epochs",
                        description="Maximum training epochs for the retrain run."),
        "seed": Param(0, type="integer", minimum=0, title="Seed", description="Random seed for the retrain run."),
    },
)
def scheduled_retrain():
    @task
    def plan(params=None, triggering_asset_events=None) -> dict:
        import logging

        from airflow.sdk.exceptions import AirflowSkipException

        from mlpipe_triggers import describe_plan, retrain_plan
        from tasks.config import load_settings
        from tasks.adapters.storage import open_store

        log = logging.getLogger("mlpipe.scheduled_retrain")
        for events in (triggering_asset_events or {}).values():
            for ev in events:
                log.warning("retrain requested by the drift monitor: %s", (ev.extra or {}).get("summary") or ev.extra)
        cfg = load_settings()
        result = retrain_plan(open_store(cfg), cfg.model_name)
        message = describe_plan(result)
        if not result["drops"]:
            log.info("%s; ending early", message)
            raise AirflowSkipException(message)
        result["conf"].update({"epochs": params["epochs"], "seed": params["seed"], "model": cfg.model_name})
        log.info("%s; triggering retrain run %s", message, result["run_id"])
        return result

    planned = plan()
    trigger = TriggerDagRunOperator(
        task_id="trigger_retrain",
        trigger_run_id="{{ ti.xcom_pull(task_ids='plan')['run_id'] }}",
        conf="{{ ti.xcom_pull(task_ids='plan')['conf'] | tojson }}",
        **RETRAIN_TRIGGER_KWARGS,
    )
    planned >> trigger


scheduled_retrain()
