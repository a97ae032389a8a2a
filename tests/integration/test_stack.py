"""``make up`` / ``make down`` (tasks.local.stack) for real: every service on free loopback ports in a temporary
MLPIPE_HOME, health-checked, PIDs and logs in one folder, new DAG files noticed within seconds, a second
``up`` that says so, a clean ``down`` (children included, within 10 s during a task) and a restart.

Self-healing: each service is its own process group; the supervisor restarts a kill -9'd service (Triton's
leftover shared memory removed), a DAG run survives a kill -9 of the scheduler's group, and ``up`` after a
crash (supervisor gone too) stops the orphans that hold the scheduler's health port and starts it again.
Timings are printed (``pytest -s``).

The stack is ``mlpipe_stack`` (tests/stack_fixtures.py), shared with the trigger, REST API and UI tests.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
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


def _until(check, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout:.0f}s")


def _shm(home: Path) -> set[str]:
    prefix = stack.shm_prefix(home)
    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(prefix)}


SLOW_DAG = """import time
from datetime import timedelta

import pendulum
from airflow.sdk import dag, task


@dag(dag_id={dag_id!r}, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False,
     params={{"seconds": 8}}, default_args={{"retries": 2, "retry_delay": timedelta(seconds=1)}})
def d():
    @task
    def slow(**context):
        time.sleep(float(context["params"]["seconds"]))

    @task
    def after():
        return "ok"

    slow() >> after()


d()
"""


@pytest.fixture(scope="module")
def slow_dag(airflow_stack):
    """A two-task DAG (``slow`` sleeps ``seconds``, then ``after``; 2 retries) in dags/ for this module."""
    dag_id = f"zz_stacktest_slow_{uuid.uuid4().hex[:8]}"
    path = ROOT / "dags" / f"{dag_id}.py"
    path.write_text(SLOW_DAG.format(dag_id=dag_id))
    try:
        airflow_stack.client.wait_dags([dag_id], timeout=90)
        yield dag_id
    finally:
        path.unlink(missing_ok=True)


def _start_slow_run(client: AirflowClient, dag_id: str, seconds: float) -> str:
    resp = client.trigger(dag_id, conf={"seconds": seconds})
    assert resp.status_code == 200, resp.text
    run_id = resp.json()["dag_run_id"]
    _until(lambda: client.task_instances(dag_id, run_id).get("slow") == "running", 90, "slow running", 0.5)
    return run_id


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
    # Each service leads its own process group (and session); what it forks stays in it, Airflow's task
    # runners included (own groups, same session), the tritonserver and tansu too.
    state = stack.read_state(home)
    for name, info in state["services"].items():
        assert os.getpgid(info["pid"]) == os.getsid(info["pid"]) == info["pid"] == info["pgid"], name
    names = {name: {" ".join(p.cmdline()[:1]) for p in stack.session_members(i["pid"], i["create_time"])}
             for name, i in state["services"].items()}
    assert any(c.endswith("/tritonserver") for c in names["triton"]), names["triton"]
    assert any(c.endswith("/tansu") for c in names["broker"]), names["broker"]
    # The supervisor runs, recorded and shown; Triton's Python-backend stubs use this stack's shm prefix.
    assert st["supervisor"]["alive"] and "supervisor     running" in out
    assert _shm(home), f"no /dev/shm region with prefix {stack.shm_prefix(home)}"
    # The pipeline steps Airflow starts find this stack's services.
    env = stack.stack_env(stack.StackSpec(home=home, ports=st["ports"]))
    assert env["MLPIPE_KAFKA_BOOTSTRAP"] == st["urls"]["kafka_bootstrap"]
    assert env["MLPIPE_TRITON_URL"] == st["urls"]["triton_http"]
    assert env["AIRFLOW__CORE__PARALLELISM"] == "2"
    # short orphan detection: a run interrupted by a scheduler crash goes on soon after the restart
    assert env["AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL"] == "5"
    assert int(env["AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT"]) <= 60


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
    assert {"retrain.validate", "retrain_pipeline.validate"} <= tasks("mlpipe_drops", "consuming_tasks")
    # a pipeline's member versions and its pipeline versions (compose) are registry versions too
    assert tasks("mlpipe_model_versions", "producing_tasks") == {
        "retrain.register", "retrain_pipeline.register_detector", "retrain_pipeline.register_classifier",
        "retrain_pipeline.compose"}
    assert tasks("mlpipe_deployments", "producing_tasks") == {"retrain.deploy", "rollback.rollback", "rollout.rollout",
                                                              "retrain_pipeline.deploy"}
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


def test_a_killed_service_is_restarted_by_the_supervisor(mlpipe_stack):
    """kill -9 of the gateway, and of Triton's whole group (its stubs' shared memory left behind): the
    supervisor logs why, removes the leftovers and restarts them; the other services are untouched."""
    home = mlpipe_stack.home
    before = _pids(home)
    old_shm = _shm(home)
    assert old_shm
    os.kill(before["gateway"], signal.SIGKILL)
    os.killpg(before["triton"], signal.SIGKILL)
    t0 = time.monotonic()
    _until(lambda: all(_pids(home)[n] != before[n] for n in ("gateway", "triton")), 30, "the restarts")
    restarted = time.monotonic() - t0
    st = stack.settled_status(home, timeout=120)
    healthy = time.monotonic() - t0
    print(f"\n[timing] gateway+triton kill -9: restarted after {restarted:.1f}s, healthy after {healthy:.1f}s")
    assert st["all_alive"] and all(i["healthy"] for i in st["services"].values()), st["services"]
    for name in ("gateway", "triton"):
        assert st["services"][name]["restarts"] >= 1 and st["services"][name]["last_exit"] == "killed by SIGKILL"
    after = _pids(home)
    assert {k: v for k, v in after.items() if k not in ("gateway", "triton")} == \
        {k: v for k, v in before.items() if k not in ("gateway", "triton")}
    log = (home / "stack" / "logs" / "supervisor.log").read_text()
    assert f"gateway (pid {before['gateway']}) died: killed by SIGKILL" in log
    assert f"triton (pid {before['triton']}) died: killed by SIGKILL" in log and "    | " in log  # the log's tail
    assert not (old_shm & _shm(home))  # the killed stubs' regions are gone; the new server has its own
    assert mlpipe_stack.client.get("/api/v2/monitor/health")["scheduler"]["status"] == "healthy"
    shown = _run(["status"], home, timeout=60).stdout
    assert "restarts 1 (last: killed by SIGKILL)" in shown


def test_a_dag_run_survives_a_scheduler_crash(mlpipe_stack, slow_dag):
    """kill -9 of the scheduler's whole process group mid-task (its LocalExecutor workers and the task runner
    die with it): the supervisor restarts the scheduler, which resets the orphaned task instance once the
    dead scheduler's heartbeat is older than the (short, local) threshold; the run ends in success."""
    home, client = mlpipe_stack.home, mlpipe_stack.client
    run_id = _start_slow_run(client, slow_dag, seconds=6)
    old = stack.read_state(home)["services"]["scheduler"]
    group = [p.pid for p in stack.session_members(old["pid"], old["create_time"])]
    os.killpg(old["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    _until(lambda: stack.read_state(home)["services"]["scheduler"]["pid"] != old["pid"], 30, "the restart", 0.1)
    restarted = time.monotonic() - t0
    assert not [p for p in group if stack.pid_alive(p)]
    run = client.wait_run(slow_dag, run_id, timeout=240)
    done = time.monotonic() - t0
    print(f"\n[timing] scheduler group kill -9: restarted after {restarted:.1f}s, run {run['state']} "
          f"{done:.1f}s after the kill (the 6 s task ran again)")
    assert run["state"] == "success", (run, client.task_instances(slow_dag, run_id))
    assert client.task_instances(slow_dag, run_id) == {"slow": "success", "after": "success"}
    assert restarted < 15
    info = stack.read_state(home)["services"]["scheduler"]
    assert info["restarts"] >= 1 and info["last_exit"] == "killed by SIGKILL"


def test_up_after_a_crash_cleans_up_what_is_left_and_restarts(mlpipe_stack):
    """The operator's case: the supervisor is gone and the scheduler is killed with kill -9 (leader only): its
    forked children keep the health port. ``status`` says so, ``up`` stops the orphans (ours by the recorded
    process group), starts the scheduler and a new supervisor."""
    home = mlpipe_stack.home
    state = stack.read_state(home)
    sched = state["services"]["scheduler"]
    os.kill(state["supervisor"]["pid"], signal.SIGKILL)
    _until(lambda: not stack.supervisor_alive(stack.read_state(home)), 10, "the supervisor's end")
    orphans = [p.pid for p in stack.session_members(sched["pid"], sched["create_time"]) if p.pid != sched["pid"]]
    assert orphans
    os.kill(sched["pid"], signal.SIGKILL)
    _until(lambda: not stack.pid_alive(sched["pid"]), 10, "the scheduler's end")
    health_port = state["ports"]["scheduler_health"]
    assert port_open(health_port) and any(stack.pid_alive(p) for p in orphans)  # the orphans hold it
    shown = _run(["status"], home, timeout=60).stdout
    assert "scheduler      DOWN" in shown and "supervisor     DOWN" in shown
    t0 = time.monotonic()
    repaired = _run(["up"], home, timeout=180)
    took = time.monotonic() - t0
    print(f"\n[timing] up after the scheduler's kill -9 (supervisor gone): {took:.1f}s")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "scheduler: cleaned up the processes left by its crash" in repaired.stdout
    assert "starting the services that are down: scheduler" in repaired.stdout
    assert "in use by another program" not in repaired.stdout + repaired.stderr
    assert not [p for p in orphans if stack.pid_alive(p)]
    st = stack.status(home)
    assert st["all_alive"] and st["supervisor"]["alive"] and st["services"]["scheduler"]["healthy"]
    after = {k: v for k, v in _pids(home).items() if k != "scheduler"}
    assert after == {k: v["pid"] for k, v in state["services"].items() if k != "scheduler"}  # only it restarted
    holder = _until(lambda: stack.port_holder(health_port), 30, "the new scheduler's health port")
    assert os.getsid(holder.pid) == st["services"]["scheduler"]["pid"]


def test_down_stops_everything_then_up_restarts(mlpipe_stack, slow_dag):
    """``down`` during a running task stops the supervisor and every recorded process group (tritonserver,
    tansu, Airflow workers and the task) within 10 s and frees the ports (and Triton's shared memory);
    ``up`` brings the same home back (same DB, store, secrets, login)."""
    home = mlpipe_stack.home
    run_id = _start_slow_run(mlpipe_stack.client, slow_dag, seconds=300)
    st = stack.status(home, check_health=False)
    recorded = _pids(home)
    children = [p for pid in recorded.values() for p, _ in stack.descendants(pid)]
    assert children  # tritonserver, tansu, ...
    state = stack.read_state(home)
    group = [p.pid for i in state["services"].values() for p in stack.session_members(i["pid"], i["create_time"])]
    supervisor = state["supervisor"]["pid"]
    t0 = time.monotonic()
    stopped = _run(["down"], home, timeout=120)
    took = time.monotonic() - t0
    print(f"\n[timing] make down during a running task: {took:.1f}s\n{stopped.stdout}")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert took < 10
    assert not stack.pid_alive(supervisor) and not _shm(home)
    everything = list(recorded.values()) + children + group
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
    # the interrupted run goes on after the restart (its task is reset and runs again): stop waiting for it
    mlpipe_stack.client.request("PATCH", f"/api/v2/dags/{slow_dag}/dagRuns/{run_id}", json={"state": "failed"})


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
    assert stack.pid_alive(me) and stack.pid_alive(me, stack.start_time(me))
    assert not stack.pid_alive(me, (stack.start_time(me) or 0) + 10)  # a reused PID is not ours
    assert not stack.pid_alive(None)
