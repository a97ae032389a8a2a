"""The pipeline's Airflow Assets: how the DAGs feed each other (UI: Assets, and each DAG's graph).

============================  =====================================  ==================================
asset                          produced by                            consumed by
============================  =====================================  ==================================
``mlpipe_drops``               the outside world (a drop's _SUCCESS)   ``drop_arrival`` (AssetWatcher), ``retrain``
``mlpipe_model_versions``      ``retrain.register``                   (lineage: the registry of record)
``mlpipe_deployments``         ``retrain.deploy``, ``rollback``        ``monitor`` (a new model is watched)
``mlpipe_drift``               ``monitor.request_retrain``            ``scheduled_retrain`` (with its cron)
============================  =====================================  ==================================

``DROPS`` carries its watcher (``DropArrivalTrigger``) wherever it is used, so every DAG file
that mentions it serializes the same watcher (Airflow keeps one trigger per asset and would
otherwise add and drop it as files are parsed). The URIs use the ``x-mlpipe`` scheme: they
name things in the object store and the serving stack, not a path Airflow should open.

Parse-time settings come from environment variables only (never ``Variable.get()``):
``MLPIPE_DROP_POLL_SECONDS`` (default 5) and ``MLPIPE_DROP_REDELIVER_SECONDS`` (default 300).
"""

from __future__ import annotations

from airflow.sdk import Asset, AssetWatcher

from mlpipe_triggers import DropArrivalTrigger

DROPS_URI = "x-mlpipe://store/drops"
MODEL_VERSIONS_URI = "x-mlpipe://registry/models"
DEPLOYMENTS_URI = "x-mlpipe://serving/triton"
DRIFT_URI = "x-mlpipe://monitoring/drift"


def drop_trigger() -> DropArrivalTrigger:
    from tasks.config import load_settings

    af = load_settings().airflow  # MLPIPE_DROP_POLL_SECONDS, MLPIPE_DROP_REDELIVER_SECONDS
    return DropArrivalTrigger(poll_interval=af.drop_poll_seconds, redeliver_after=af.drop_redeliver_seconds)


DROPS = Asset(
    name="mlpipe_drops", uri=DROPS_URI, group="data",
    extra={"description": "complete data drops (drops/<id>/ with _SUCCESS) in the object store"},
    watchers=[AssetWatcher(name="drop_arrival_watcher", trigger=drop_trigger())],
)
MODEL_VERSIONS = Asset(
    name="mlpipe_model_versions", uri=MODEL_VERSIONS_URI, group="model",
    extra={"description": "registered model versions (models/<model>/<version>/)"},
)
DEPLOYMENTS = Asset(
    name="mlpipe_deployments", uri=DEPLOYMENTS_URI, group="serving",
    extra={"description": "the version Triton serves (deploys and rollbacks)"},
)
DRIFT = Asset(
    name="mlpipe_drift", uri=DRIFT_URI, group="monitoring",
    extra={"description": "drift past the threshold: a retrain request from the monitor"},
)

ALL = (DROPS, MODEL_VERSIONS, DEPLOYMENTS, DRIFT)
