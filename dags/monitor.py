"""monitor: live predictions vs the champion's training reference; drift past a threshold requests a retrain.

1. ``analyze``: ``python -m tasks.steps.monitor`` (a local process, or a pod with MLPIPE_EXECUTION=kubernetes):
   class distribution (PSI, Jensen-Shannon), confidence (mean drop, KS) and embedding drift (mean
   cosine distance, MMD) of the newest ``window`` predictions from Kafka ``predictions`` or Qdrant
   against the champion run over its training data. Writes ``monitoring/<ts>/report.html`` (with plots)
   and ``report.json`` to the object store.
2. ``drifted``: short-circuit: no drift (or too few predictions, or no champion deployed yet) ends the
   run here, ``request_retrain`` shows as *skipped* and no asset event is emitted.
3. ``request_retrain``: emits an event of the ``mlpipe_drift`` asset (extra: the summary, the report URI
   and the check values); ``scheduled_retrain`` is scheduled on it and retrains on the validated drops
   since the champion.

Schedule: ``MLPIPE_MONITOR_CRON`` (cron, UTC; default every 30 minutes; ``off`` for manual runs only).
"""

from __future__ import annotations

import pendulum
from airflow.sdk import CronTriggerTimetable, Param, dag, task

from mlpipe_assets import DEPLOYMENTS, DRIFT
from mlpipe_steps import step
from mlpipe_triggers import cron_from_env
from tasks.config import load_settings

DEFAULT_CRON = "*/30 * * * *"


def monitor_schedule():
    cron = cron_from_env("MLPIPE_MONITOR_CRON", DEFAULT_CRON, "'*/30 * * * *'")
    return None if cron is None else CronTriggerTimetable(cron, timezone="UTC")


@dag(
    dag_id="monitor",
    schedule=monitor_schedule(),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["mlpipe", "monitoring"],
    doc_md=__doc__,
    params={
        "model": Param(load_settings().model_name, type="string", pattern=r"^[a-z][a-z0-9_-]{0,62}$", title="Model",
                       description="The model project (models/<model>/spec.yaml) whose champion is monitored."),
        "source": Param("kafka", type="string", enum=["kafka", "qdrant"], title="Source",
                        description="kafka: the 'predictions' topic (and the frames for embeddings); "
                                    "qdrant: the prediction collection with its embeddings."),
        "window": Param(2000, type="integer", minimum=10, maximum=100000, title="Window",
                        description="How many of the newest live predictions to compare."),
        "min_samples": Param(200, type="integer", minimum=10, maximum=100000, title="Minimum samples",
                             description="Fewer live predictions than this give no verdict (no retrain)."),
        "max_class_psi": Param(0.25, type="number", minimum=0, title="Max class PSI",
                               description="Drift when the PSI of the predicted class distribution exceeds this."),
        "max_embedding_cosine": Param(0.05, type="number", minimum=0, maximum=2, title="Max embedding cosine distance",
                                      description="Drift when the mean embeddings are further apart than this."),
    },
)
def monitor():
    analyze = step("analyze", "monitor",
                   ["--model", "{{ params.model }}", "--source", "{{ params.source }}", "--window", "{{ params.window }}",
                    "--min-samples", "{{ params.min_samples }}", "--max-class-psi", "{{ params.max_class_psi }}",
                    "--max-embedding-cosine", "{{ params.max_embedding_cosine }}", "--no-champion-ok"],
                   retries=2, inlets=[DEPLOYMENTS])

    @task.short_circuit
    def drifted(result: dict | None) -> bool:
        import logging

        log = logging.getLogger("mlpipe.monitor")
        if not result:
            log.error("the monitor produced no result: no retrain requested")
            return False
        log.info("%s (report %s)", result.get("summary"), result.get("report_uri"))
        for name, check in (result.get("checks") or {}).items():
            log.info("  %-17s %-8s value %s threshold %s", name, check.get("status"), check.get("value"),
                     check.get("threshold"))
        return bool(result.get("drift"))

    @task(outlets=[DRIFT])
    def request_retrain(result: dict, outlet_events=None) -> str:
        import logging

        outlet_events[DRIFT].extra = {
            "summary": result.get("summary"), "report_uri": result.get("report_uri"),
            "model": result.get("model"), "champion": result.get("champion"),
            "checks": {k: v.get("value") for k, v in (result.get("checks") or {}).items()},
        }
        logging.getLogger("mlpipe.monitor").warning("drift: requesting a retrain (%s)", result.get("summary"))
        return str(result.get("report_uri"))

    gate = drifted(analyze.output)
    gate >> request_retrain(analyze.output)


monitor()
