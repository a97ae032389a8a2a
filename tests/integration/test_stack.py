"""``make up`` / ``make down`` (tasks.local.stack) for real: every service on free loopback ports in a temporary
MLPIPE_HOME, health-checked, PIDs and logs in one folder, new DAG files noticed within seconds, a second
``up`` that says so, a dead service restarted, a clean ``down`` (children included) and a restart.

The stack is ``mlpipe_stack`` (tests/stack_fixtures.py), shared with the trigger, REST API and UI tests.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.adapters.airflow import AirflowClient
from tasks.local import stack
from tasks.local.procs import port_open
from tests.support.stack import DAG_IDS, TEST_ENV

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration]


# --------------------------------------------------------------------------- make up / status / down


def _run(args: list[str], home: Path, timeout: float = 240, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **TEST_ENV, "MLPIPE_HOME": str(home), "MLPIPE_STORE_URL": f"file://{home / 'store'}",
            **(env or {})}
    return subprocess.run([sys.executable, "-m", "tasks.cli", "stack", *args], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=timeout)


def _pids(home: Path) -> dict[str, int]:
    return {name: info["pid"] for name, info in stack.read_state(home)["services"].items()}


def test_stack_is_up_healthy_logged_and_prints_the_login(mlpipe_stack):
    home = mlpipe_stack.home
    st = stack.status(home)
    assert set(st["services"]) == set(stack.SERVICES)
    assert all(s["alive"] and s["healthy"] for s in st["services"].values()), st["services"]
    # The UI URL and the generated login are printed, and the login works against the REST API.
    out = _run(["status"], home, timeout=60).stdout
    password = stack.admin_password(home)
    assert password and f"admin / {password}" in out and st["urls"]["airflow_ui"] in out
    client = AirflowClient(st["urls"]["airflow_ui"], "admin", password)
    assert client.get("/api/v2/monitor/health")["triggerer"]["status"] == "healthy"
    client.close()
    # One folder of logs, one of PID files; the PIDs are the recorded processes.
    logs = home / "stack" / "logs"
    for name in stack.SERVICES:
        assert (logs / f"{name}.log").stat().st_size > 0, name
        assert int((home / "stack" / "pids" / f"{name}.pid").read_text()) == st["services"][name]["pid"]
    assert (logs / "tritonserver.log").exists() and (logs / "tansu.log").exists()
    # The pipeline steps Airflow starts find this stack's services.
    env = stack.stack_env(stack.StackSpec(home=home, ports=st["ports"]))
    assert env["MLPIPE_KAFKA_BOOTSTRAP"] == st["urls"]["kafka_bootstrap"]
    assert env["MLPIPE_TRITON_URL"] == st["urls"]["triton_http"]
    assert env["AIRFLOW__CORE__PARALLELISM"] == "2"


def test_shared_airflow_stack_parses_every_dag(airflow_stack):
    dags = airflow_stack.client.wait_dags(DAG_IDS)
    assert not airflow_stack.client.get("/api/v2/importErrors")["import_errors"]
    assert dags["drop_arrival"]["timetable_summary"] == "Asset"
    assert dags["retrain"]["is_paused"] is True


def test_assets_show_how_the_dags_feed_each_other(airflow_stack):
    """Drops, model versions, deployments and drift are Airflow Assets with their producers and consumers,
    so the UI's asset graph shows the closed loop."""
    assets = {a["name"]: a for a in airflow_stack.client.get("/api/v2/assets", limit=100)["assets"]}

    def tasks(asset: str, kind: str) -> set[str]:
        return {f"{t['dag_id']}.{t['task_id']}" for t in assets[asset][kind]}

    def scheduled(asset: str) -> set[str]:
        return {d["dag_id"] for d in assets[asset]["scheduled_dags"]}

    assert [w["name"] for w in assets["mlpipe_drops"]["watchers"]] == ["drop_arrival_watcher"]
    assert scheduled("mlpipe_drops") == {"drop_arrival"}
    assert "retrain.validate" in tasks("mlpipe_drops", "consuming_tasks")
    assert tasks("mlpipe_model_versions", "producing_tasks") == {"retrain.register"}
    assert tasks("mlpipe_deployments", "producing_tasks") == {"retrain.deploy", "rollback.rollback"}
    assert tasks("mlpipe_deployments", "consuming_tasks") == {"monitor.analyze"}
    assert tasks("mlpipe_drift", "producing_tasks") == {"monitor.request_retrain"}
    assert scheduled("mlpipe_drift") == {"scheduled_retrain"}


def test_a_new_dag_file_is_noticed_within_seconds(airflow_stack):
    """A DAG file added to dags/ while the stack runs shows up in the UI/API without a restart (the
    dag-processor rescans every few seconds, not Airflow's default 300 s)."""
    import uuid

    dag_id = f"zz_stacktest_{uuid.uuid4().hex[:8]}"
    path = ROOT / "dags" / f"{dag_id}.py"
    path.write_text("import pendulum\nfrom airflow.sdk import dag\n\n\n"
                    f"@dag(dag_id={dag_id!r}, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz='UTC'))\n"
                    "def d():\n    pass\n\n\nd()\n")
    try:
        found = airflow_stack.client.wait_dags([dag_id], timeout=60)
        assert found[dag_id]["fileloc"].endswith(path.name)
    finally:
        path.unlink(missing_ok=True)


def test_second_up_says_already_running(mlpipe_stack):
    before = _pids(mlpipe_stack.home)
    again = _run(["up"], mlpipe_stack.home, timeout=60)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already running" in again.stdout and "Traceback" not in again.stderr
    assert _pids(mlpipe_stack.home) == before


def test_a_dead_service_is_noticed_and_up_starts_only_it(mlpipe_stack):
    home = mlpipe_stack.home
    before = _pids(home)
    os.kill(before["gateway"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while stack.pid_alive(before["gateway"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stack.status(home, check_health=False)["services"]["gateway"]["alive"] is False
    repaired = _run(["up"], home, timeout=120)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "starting the services that are down: gateway" in repaired.stdout
    after = _pids(home)
    assert after["gateway"] != before["gateway"]
    assert {k: v for k, v in after.items() if k != "gateway"} == {k: v for k, v in before.items() if k != "gateway"}
    assert json.loads(_run(["status", "--json"], home, timeout=60).stdout)["all_alive"] is True


def test_down_stops_everything_then_up_restarts(mlpipe_stack):
    """``down`` stops every recorded process and its children (tritonserver, tansu, Airflow workers) and
    frees the ports; ``up`` brings the same home back (same DB, store, secrets, login)."""
    home = mlpipe_stack.home
    st = stack.status(home, check_health=False)
    recorded = _pids(home)
    children = [p for pid in recorded.values() for p, _ in stack.descendants(pid)]
    assert children  # tritonserver, tansu, ...
    stopped = _run(["down"], home, timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    everything = list(recorded.values()) + children
    deadline = time.monotonic() + 10
    while any(stack.pid_alive(p) for p in everything) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in everything if stack.pid_alive(p)]
    assert not [n for n, port in st["ports"].items() if port_open(port)]
    assert stack.read_state(home) is None and not list((home / "stack" / "pids").iterdir())
    assert "not running" in _run(["status"], home, timeout=60).stdout
    assert "not running" in _run(["down"], home, timeout=60).stdout

    # Restart on the same ports (so the other tests' clients keep working).
    ports = {var: str(st["ports"][name]) for name, (var, _default) in stack.PORTS.items()}
    restarted = _run(["up"], home, env=ports)
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert f"admin / {stack.admin_password(home)}" in restarted.stdout
    assert stack.status(home)["all_alive"]
    assert mlpipe_stack.client.get("/api/v2/dags/retrain")["is_paused"] is True  # same DB, same token secret


def test_port_taken_by_another_program_is_named(tmp_path):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    try:
        spec = stack.StackSpec.from_env(home=tmp_path / "var", services="broker", free_ports=True)
        spec.ports["kafka"] = port
        with pytest.raises(stack.StackError, match=rf"port {port} \(broker\).*MLPIPE_KAFKA_PORT"):
            stack.up(spec, out=lambda _m: None)
        assert stack.read_state(tmp_path / "var") is None  # nothing was started
    finally:
        blocker.close()


def test_cli_usage_errors(tmp_path):
    assert "make up" in _run(["--help"], tmp_path, timeout=60).stdout
    bad = _run(["up", "--services", "nope"], tmp_path, timeout=60)
    assert bad.returncode == 1 and bad.stderr.startswith("error: unknown service 'nope'")
    assert "Traceback" not in bad.stderr
    down = _run(["down"], tmp_path, timeout=60)
    assert down.returncode == 0 and "not running" in down.stdout


def test_services_groups_and_pid_checks():
    assert stack.parse_services("scheduler") == stack.AIRFLOW_SERVICES  # Airflow's four come together
    assert stack.parse_services("serving") == ("broker", "triton", "consumer", "gateway")
    me = os.getpid()
    assert stack.pid_alive(me) and stack.pid_alive(me, stack.start_ticks(me))
    assert not stack.pid_alive(me, (stack.start_ticks(me) or 0) + 1)  # a reused PID is not ours
    assert not stack.pid_alive(None)
