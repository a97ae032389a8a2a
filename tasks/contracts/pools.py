"""Airflow pools the DAGs use, by name; whoever sets up Airflow creates them.

The local Airflow home gets them from ``tasks.local.airflow.ensure_db`` (``airflow pools
set``); a production Airflow from its deployment (``airflow pools import`` of the same
names and slots, see ``docker/k8s/configmap.yaml``). A task in a pool that does not exist is
never scheduled by the scheduler (``airflow dags test`` does not check pools).
"""

from __future__ import annotations

#: deploy and rollback, across every DAG: one at a time (they change what Triton serves).
SERVING_POOL = "mlpipe_serving"

#: pool -> (slots, description)
POOLS: dict[str, tuple[int, str]] = {
    SERVING_POOL: (1, "mlpipe: one deploy or rollback at a time, across DAGs"),
}
