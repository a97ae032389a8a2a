"""The local stack shared by the stack, trigger, REST API and UI tests (``make up`` on free ports).

``mlpipe_stack`` / ``airflow_stack`` are session fixtures, made visible to every test module by
tests/conftest.py, which also moves the tests that use them to the end of the run: the stack is started
once, when the first of them runs, and stopped by PID when the session ends, so in a serial run its
processes (Airflow's four, Triton, the broker, the consumer, the gateway) never run beside the other tests.
Under pytest-xdist (``make test``) these tests form one ``xdist_group`` (tests/support/parallel.py): one
worker starts the stack once and runs them in this order while the other worker runs the rest.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from tasks.adapters.airflow import AirflowClient
from tasks.local import stack
from tasks.adapters.storage import LocalStore

STACK_FIXTURES = ("mlpipe_stack", "airflow_stack")
DAG_IDS = ("retrain", "rollback", "drop_arrival", "scheduled_retrain", "monitor")
TEST_ENV = {
    "MLPIPE_DROP_POLL_SECONDS": "1",  # the watcher polls the store every second
    "MLPIPE_RETRAIN_CRON": "off",  # runs only when a test asks for them (or a drift event)
    "MLPIPE_MONITOR_CRON": "off",
    "MLPIPE_EXECUTION": "local",
}


@dataclass
class AirflowStack:
    home: Path
    spec: stack.StackSpec
    client: AirflowClient
    store: LocalStore
    env: dict[str, str]

    @property
    def url(self) -> str:
        return self.spec.airflow_url

    @property
    def password(self) -> str:
        return stack.admin_password(self.home) or ""


@pytest.fixture(scope="session")
def mlpipe_stack(tmp_path_factory) -> AirflowStack:
    """The whole local stack (``make up``: broker, Triton, the four Airflow processes, consumer, gateway) on
    free ports in a temporary home, every DAG parsed.

    ``retrain`` starts paused: runs the triggers create stay queued (a test unpauses it when it needs a
    run in progress).
    """
    home = tmp_path_factory.mktemp("mlpipe-stack")
    env = {**os.environ, **TEST_ENV, "MLPIPE_HOME": str(home), "MLPIPE_STORE_URL": f"file://{home / 'store'}"}
    for var in ("MLPIPE_KAFKA_BOOTSTRAP", "MLPIPE_TRITON_URL", "MLPIPE_QDRANT_URL", "MLPIPE_MODEL_REPO"):
        env.pop(var, None)
    spec = stack.StackSpec.from_env(home=home, services="all", free_ports=True, extra_env=TEST_ENV, timeout=180)
    client = None
    try:
        stack.up(spec, env=env, out=lambda _msg: None)
        client = stack.airflow_client(home)
        client.wait_dags(DAG_IDS, timeout=120)
        client.set_paused("retrain", True)
        yield AirflowStack(home, spec, client, LocalStore(home / "store"), env)
    finally:
        if client is not None:
            client.close()
        stack.down(home, grace=5, out=lambda _msg: None)


@pytest.fixture(scope="session")
def airflow_stack(mlpipe_stack) -> AirflowStack:
    """The Airflow side of ``mlpipe_stack`` (the name the trigger, API and UI tests use)."""
    return mlpipe_stack


def stack_tests_last(items: list[pytest.Item]) -> None:
    """Reorder in place: the tests using the shared stack after all others, each group in its own order."""
    uses = [any(name in getattr(item, "fixturenames", ()) for name in STACK_FIXTURES) for item in items]
    items[:] = [i for i, u in zip(items, uses) if not u] + [i for i, u in zip(items, uses) if u]
