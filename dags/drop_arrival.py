"""drop_arrival: a complete new data drop -> one ``retrain`` run for it, exactly once.

Event-driven: the ``mlpipe_drops`` asset has an AssetWatcher (``DropArrivalTrigger``, run by the
triggerer) that polls the object store and emits one asset event per complete, unclaimed drop.
Drops without ``_SUCCESS`` are ignored until they are complete.

1. ``new_drops``: the drop ids of the triggering events (several drops can arrive together and
   share this run) and any other complete, unclaimed drop, minus those whose ``retrain`` run
   exists already;
2. ``trigger_retrain`` (one mapped instance per drop): ``retrain`` with ``conf={"drop_id": ...,
   "model": ...}`` (the model the drop was made for, from its ``drop.json``; else retrain's default,
   ``MLPIPE_MODEL_NAME``) and the run id ``drop__<drop_id>``; an existing run is skipped, never duplicated;
3. ``claim``: marks each drop whose run exists (``triggers/drop_arrival/<id>.json``) so the
   watcher stops announcing it, also after a triggerer restart.

``retrain`` runs one at a time (``max_active_runs=1``): a drop arriving while a run is in
progress gets its own run, queued behind it.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import dag, task

from mlpipe_assets import DROPS
from mlpipe_triggers import RETRAIN_TRIGGER_KWARGS


@dag(
    dag_id="drop_arrival",
    schedule=[DROPS],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["mlpipe", "trigger"],
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": timedelta(seconds=5)},
)
def drop_arrival():
    @task(inlets=[DROPS])
    def new_drops(triggering_asset_events=None, ti=None) -> list[dict]:
        """The drops of the triggering events plus every other complete, unclaimed drop, minus those whose
        retrain run exists. (Airflow can consume an event in a run created a moment before the event was
        stored, leaving it with no run of its own: picking up every pending drop here closes that gap.)"""
        import logging

        from mlpipe_triggers import RETRAIN_DAG, drop_ids_from_events, pending_drops, retrain_run_id
        from tasks.steps import drops
        from tasks.adapters.storage import open_store

        log = logging.getLogger("mlpipe.drop_arrival")
        events = [ev for evs in (triggering_asset_events or {}).values() for ev in evs]
        announced = drop_ids_from_events(events)
        store = open_store()
        pending = [d for d in pending_drops(store) if d not in announced]
        if pending:
            log.info("complete, unclaimed drops without an event in this run, taken too: %s", pending)
        plan = []
        for drop_id in announced + pending:
            if not drops.is_complete(store, drop_id):
                log.warning("drop %s has no _SUCCESS marker: ignored until it is complete", drop_id)
                continue
            run_id = retrain_run_id(drop_id)
            if ti.get_dr_count(dag_id=RETRAIN_DAG, run_ids=[run_id]):
                log.info("drop %s: retrain run %s exists already (a repeated event): not triggering again",
                         drop_id, run_id)
                continue
            conf = {"drop_id": drop_id}
            model = drops.drop_model(store, drop_id)
            if model:
                conf["model"] = model
            log.info("drop %s: triggering retrain run %s (model %s)", drop_id, run_id, model or "default")
            plan.append({"trigger_run_id": run_id, "conf": conf})
        if not plan:
            log.info("no drop needs a new retrain run (events: %d)", len(events))
        return plan

    plan = new_drops()
    triggered = TriggerDagRunOperator.partial(task_id="trigger_retrain", **RETRAIN_TRIGGER_KWARGS).expand_kwargs(plan)

    @task(trigger_rule="all_done", inlets=[DROPS])
    def claim(plan: list[dict] | None, triggering_asset_events=None, dag_run=None, ti=None) -> list[str]:
        """Claim every drop of this run whose retrain run exists (triggered now or before)."""
        import logging

        from mlpipe_triggers import RETRAIN_DAG, drop_ids_from_events, retrain_run_id
        from mlpipe_triggers import claim as write_claim
        from tasks.steps import drops
        from tasks.adapters.storage import open_store

        log = logging.getLogger("mlpipe.drop_arrival")
        store = open_store()
        planned = [item["conf"]["drop_id"] for item in plan or []]
        events = [ev for evs in (triggering_asset_events or {}).values() for ev in evs]
        done, missing = [], []
        for drop_id in dict.fromkeys(drop_ids_from_events(events) + planned):
            if not drops.is_complete(store, drop_id):
                continue  # never announced by the watcher; nothing to claim
            if ti.get_dr_count(dag_id=RETRAIN_DAG, run_ids=[retrain_run_id(drop_id)]):
                write_claim(store, drop_id, by_run=dag_run.run_id)
                done.append(drop_id)
            elif drop_id in planned:
                missing.append(drop_id)
        if missing:
            raise RuntimeError(f"no retrain run was created for drops {missing}: they stay unclaimed and the "
                               "watcher announces them again; see the trigger_retrain task logs")
        log.info("claimed drops: %s", done or "none")
        return done

    claimed = claim(plan)
    triggered >> claimed


drop_arrival()
