"""Retries through Airflow, for real: ``airflow dags test`` of a one-task DAG whose step is the
``LocalStepOperator`` running the real CLI against a real S3 endpoint (moto's server).

* An object-store outage in the middle of a step (the endpoint stopped while the step writes,
  started again on the same port) fails that attempt with ``EXIT_TRANSIENT``; Airflow retries
  it and the run succeeds.
* A rejection (``validate`` of a drop with bad labels: ``EXIT_REJECTED``) fails the task at
  once, whatever the retries left.

moto keeps its data in memory, so the step that meets the outage is one that writes its own
input: ``drops make``, which starts again from nothing after the restart.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tasks.config import S3Settings
from tasks.contracts.errors import EXIT_REJECTED, EXIT_TRANSIENT
from tasks.adapters.storage import S3Store, StoreError
from tasks.local.airflow import airflow_bin, airflow_env
from tasks.local.procs import ManagedProcess, free_port, port_open, wait_until
from tasks.steps import drops
from tests.support.airflow import airflow_home_from

BUCKET = "retry-probe"
DAG_ID = "mlpipe_retry_probe"
DAG = '''
from datetime import timedelta

import pendulum
from airflow.sdk import dag

from mlpipe_steps import step


@dag(dag_id="{dag_id}", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False,
     default_args={{"retries": {retries}, "retry_delay": timedelta(seconds={delay})}})
def probe():
    step("{task_id}", "{command}", {arguments!r})


probe()
'''


class S3Server:
    """moto's S3 server on one fixed loopback port, stopped and started by the test (by PID)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.log = workdir / "moto.log"
        self.proc: ManagedProcess | None = None
        self.settings = S3Settings(endpoint=f"127.0.0.1:{self.port}", access_key="testing", secret_key="testing")

    def start(self) -> None:
        self.proc = ManagedProcess(
            "moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)], self.log,
            env={**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_EC2_METADATA_DISABLED": "true"}).start()
        wait_until(lambda: port_open(self.port), 30, "moto S3 server", alive=self.proc.alive)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            wait_until(lambda: not port_open(self.port), 10, "moto S3 server to stop")

    def env(self) -> dict[str, str]:
        return {"MLPIPE_STORE_URL": f"s3://{BUCKET}", "MLPIPE_S3_ENDPOINT": self.settings.endpoint,
                "MLPIPE_S3_ACCESS_KEY": "testing", "MLPIPE_S3_SECRET_KEY": "testing"}


@pytest.fixture
def s3_server(tmp_path):
    server = S3Server(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class ProbeRun:
    """A one-task DAG in its own dags folder and Airflow home, run with ``airflow dags test``."""

    def __init__(self, tmp_path: Path, template: Path, s3: S3Server, task_id: str, command: str,
                 arguments: list[str], *, retries: int, delay: float) -> None:
        self.home = tmp_path / "home"
        airflow_home_from(template, self.home)  # the session's migrated DB (tests/support/airflow.py)
        dags = tmp_path / "dags"
        dags.mkdir()
        (dags / "probe.py").write_text(DAG.format(dag_id=DAG_ID, retries=retries, delay=delay, task_id=task_id,
                                                  command=command, arguments=arguments))
        self.task_id = task_id
        self.env = airflow_env({**os.environ, **s3.env(), "MLPIPE_HOME": str(self.home), "MLPIPE_EXECUTION": "local",
                                "MLPIPE_LOG_FORMAT": "text"})
        self.env["AIRFLOW__CORE__DAGS_FOLDER"] = str(dags)

    def run(self, timeout: float = 150) -> subprocess.CompletedProcess[str]:
        return subprocess.run([airflow_bin(), "dags", "test", DAG_ID], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def task(self) -> tuple[str | None, int]:
        """(state, try_number) of the task instance, from the run's metadata DB."""
        try:
            db = sqlite3.connect(self.home / "airflow" / "airflow.db", timeout=5)
            try:
                row = db.execute("SELECT state, try_number FROM task_instance WHERE dag_id=? AND task_id=?",
                                 (DAG_ID, self.task_id)).fetchone()
            finally:
                db.close()
        except sqlite3.OperationalError:  # the DB is being created or locked for a moment
            return None, 0
        return (row[0], int(row[1] or 0)) if row else (None, 0)


def _objects(store: S3Store, prefix: str) -> int:
    try:
        return len(store.list(prefix))
    except StoreError:  # no bucket yet, or the endpoint is down
        return 0


def test_an_object_store_outage_mid_step_is_retried_and_the_run_succeeds(tmp_path, s3_server, airflow_template):
    run = ProbeRun(tmp_path, airflow_template, s3_server, "make", "drops",
                   ["make", "--drop-id", "d1", "--size", "300", "--source", "digits", "--seed", "5"],
                   retries=3, delay=2)
    probe = S3Store(BUCKET, s3_server.settings, create_bucket=False)
    timeline: list[tuple[str, object]] = []
    problems: list[BaseException] = []

    def outage() -> None:
        try:
            # the step is writing the drop: stop the endpoint under it
            wait_until(lambda: _objects(probe, "drops/d1/") > 0, 120, "the step to start writing", interval=0.05)
            s3_server.stop()
            timeline.append(("stopped with objects written", True))
            # Airflow saw the attempt fail and waits to retry it: start the endpoint again (empty)
            wait_until(lambda: run.task() == ("up_for_retry", 1), 90, "the first attempt to fail", interval=0.2)
            timeline.append(("first attempt", run.task()))
            s3_server.start()
            timeline.append(("started", True))
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            problems.append(exc)

    watcher = threading.Thread(target=outage, daemon=True)
    watcher.start()
    t0 = time.monotonic()
    proc = run.run()
    watcher.join(timeout=30)
    out = proc.stdout + proc.stderr
    assert not problems, f"{problems}: {timeline}\n{out[-4000:]}"
    assert [step for step, _ in timeline] == ["stopped with objects written", "first attempt", "started"]
    assert proc.returncode == 0, out[-4000:]
    state, tries = run.task()
    assert state == "success" and tries >= 2, (state, tries, out[-3000:])
    assert f"step drops failed (exit {EXIT_TRANSIENT}, will retry if retries remain)" in out, out[-4000:]
    assert "): error: S3 error on " in out or "): error: cannot reach S3 endpoint" in out  # the reason, quoted
    assert "AirflowFailException" not in out
    # the retry made the whole drop on the restarted (empty) endpoint
    store = S3Store(BUCKET, s3_server.settings, create_bucket=False)
    assert drops.is_complete(store, "d1")
    assert len(drops.read_manifest(store, "d1")) == 300
    assert time.monotonic() - t0 < 120


def test_a_rejection_is_not_retried(tmp_path, s3_server, airflow_template):
    store = S3Store(BUCKET, s3_server.settings)
    drops.make_drop(store, "bad", size=200, seed=7, source="digits", faults=["bad_label"])
    run = ProbeRun(tmp_path, airflow_template, s3_server, "validate", "validate", ["--drop-id", "bad"],
                   retries=2, delay=1)
    proc = run.run()
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, "the DAG run must fail"
    state, tries = run.task()
    assert (state, tries) == ("failed", 1), (state, tries, out[-3000:])  # retries=2 left unused
    assert f"step validate rejected (exit {EXIT_REJECTED}): error: drop bad failed validation" in out, out[-4000:]
    assert "will retry" not in out
    assert store.get_json("drops/bad/validation/result.json")["success"] is False
