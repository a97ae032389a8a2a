"""Every trigger path of ``retrain``: data arrival (AssetWatcher + ``drop_arrival``), its exactly-once
bookkeeping across scheduler and triggerer restarts, and the scheduled retrain.

The first tests run the trigger and the bookkeeping directly on a local object store; the others use the
real Airflow processes (``airflow_stack``: api-server, scheduler, dag-processor, triggerer) with the
watcher polling every second. ``retrain`` is paused there, so a run the triggers create stays queued:
the tests check "a ``retrain`` run with ``conf.drop_id = X`` exists, exactly once" through the REST API
and do not pay for training (one test unpauses it to have a run really in progress).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from tasks.steps import drops
from tasks.adapters.airflow import AirflowClient
from tasks.local import stack
from tasks.adapters.storage import LocalStore
from tests.support.stack import TEST_ENV

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "plugins"))

import mlpipe_triggers as mt  # noqa: E402

SMALL = 20  # rows of a drop whose content nothing reads


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def write_success(store, drop_id: str, rows: int = SMALL) -> None:
    """What a producer writes last: the drop becomes complete."""
    store.put_json(drops.success_key(drop_id), {"drop_id": drop_id, "rows": rows,
                                                "created_at": dt.datetime.now(dt.timezone.utc).isoformat()})


def fake_validation(store, drop_id: str, success: bool = True) -> None:
    store.put_json(f"drops/{drop_id}/validation/result.json", {"drop_id": drop_id, "success": success,
                                                              "failures": [] if success else [{"x": 1}]})


def fake_champion(store, drop_ids: list[str], version: int = 1, model: str = "digits") -> None:
    """A production version in the registry of record whose lineage names ``drop_ids``."""
    store.put_json(f"models/{model}/{version}/version.json", {
        "model": model, "version": version, "stage": "production", "created_at": "2026-01-01T00:00:00+00:00",
        "lineage": {"drops": [{"drop_id": d} for d in drop_ids]}})


# --------------------------------------------------------------------------- the bookkeeping and the trigger


def test_pending_drops_claims_and_event_parsing(tmp_path):
    store = LocalStore(tmp_path / "store")
    drops.make_drop(store, "new", size=SMALL, seed=1)
    drops.make_drop(store, "half", size=SMALL, seed=2, complete=False)
    drops.make_drop(store, "validated", size=SMALL, seed=3)
    fake_validation(store, "validated")
    drops.make_drop(store, "taken", size=SMALL, seed=4)
    assert mt.pending_drops(store) == ["new", "taken"]
    first = mt.claim(store, "taken", by_run="r1")
    assert mt.claim(store, "taken", by_run="r2") == first  # idempotent: the first claim stays
    assert first["retrain_run_id"] == "drop__taken" == mt.retrain_run_id("taken")
    assert mt.pending_drops(store) == ["new"]
    assert set(mt.claims(store)) == {"taken"}

    class Ev:
        def __init__(self, extra):
            self.extra = extra

    events = [Ev({"from_trigger": True, "payload": {"drop_id": "a"}}), Ev({"drop_id": "b"}),
              Ev({"payload": {"drop_id": "a"}}), Ev({}), {"extra": {"drop_id": "c"}}]
    assert mt.drop_ids_from_events(events) == ["a", "b", "c"]


async def _collect(trigger: mt.DropArrivalTrigger, seconds: float) -> list[str]:
    out: list[str] = []

    async def consume() -> None:
        async for event in trigger.run():
            out.append(event.payload["drop_id"])

    task = asyncio.ensure_future(consume())
    await asyncio.sleep(seconds)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    return out


def test_trigger_emits_once_per_complete_drop_and_redelivers_unclaimed(tmp_path):
    store = LocalStore(tmp_path / "store")
    drops.make_drop(store, "d1", size=SMALL, seed=1)
    drops.make_drop(store, "d2", size=SMALL, seed=2, complete=False)
    trigger = mt.DropArrivalTrigger(poll_interval=0.05, redeliver_after=3600, store_url=store.url)
    classpath, kwargs = trigger.serialize()
    assert classpath == "mlpipe_triggers.DropArrivalTrigger" and mt.DropArrivalTrigger(**kwargs).serialize() == (
        classpath, kwargs)

    async def scenario() -> tuple[list[str], list[str], list[str]]:
        events: list[str] = []

        async def consume() -> None:
            async for event in trigger.run():
                events.append(event.payload["drop_id"])

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.5)
        before = list(events)  # d1 once; d2 is incomplete
        write_success(store, "d2")
        await asyncio.sleep(0.5)
        after_complete = list(events)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        return before, after_complete, events

    before, after_complete, _ = asyncio.run(scenario())
    assert before == ["d1"]
    assert after_complete == ["d1", "d2"]

    # A restarted trigger (new instance, nothing in memory) re-emits what is not claimed yet, only that.
    mt.claim(store, "d1")
    assert asyncio.run(_collect(mt.DropArrivalTrigger(poll_interval=0.05, store_url=store.url), 0.5)) == ["d2"]
    # An event lost with a crashed triggerer: still unclaimed after redeliver_after -> emitted again.
    again = asyncio.run(_collect(mt.DropArrivalTrigger(poll_interval=0.05, redeliver_after=0.3,
                                                       store_url=store.url), 1.0))
    assert again.count("d2") >= 2 and "d1" not in again


def test_retrain_plan_takes_validated_drops_since_the_champion(tmp_path):
    store = LocalStore(tmp_path / "store")
    for drop_id in ("old", "trained", "v1", "pending", "bad", "v2"):
        drops.make_drop(store, drop_id, size=SMALL, seed=len(drop_id))
        time.sleep(0.002)  # distinct created_at, in this order
    for drop_id in ("old", "trained", "v1", "v2"):
        fake_validation(store, drop_id)
    fake_validation(store, "bad", success=False)

    plan = mt.retrain_plan(store, "digits")  # no champion: every validated drop
    assert plan["champion"] is None and plan["drops"] == ["old", "trained", "v1", "v2"]

    fake_champion(store, ["trained"], version=3)
    plan = mt.retrain_plan(store, "digits")
    assert plan["champion"] == 3 and plan["drops"] == ["v1", "v2"]
    assert plan["not_validated"] == ["pending"] and plan["failed_validation"] == ["bad"]
    assert plan["conf"] == {"drop_id": "v2", "extra_drop_ids": ["v1"]}
    assert plan["run_id"] == mt.retrain_plan(store, "digits")["run_id"]  # same set, same run id
    assert plan["run_id"].startswith("scheduled__v2__2_")
    text = mt.describe_plan(plan)
    assert "2 validated drop(s) since the champion v3" in text and "pending" in text and "bad" in text

    fake_champion(store, ["v2"], version=4)  # the champion saw the newest drop: nothing new
    plan = mt.retrain_plan(store, "digits")
    assert plan["drops"] == [] and "run_id" not in plan
    assert mt.describe_plan(plan).startswith("no new validated data since the champion v4")


def _parse(dag_file: str, envs: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Import one DAG file as the dag-processor does, once per set of parse-time env vars (one subprocess)."""
    import json
    import subprocess

    from tasks.local.airflow import airflow_env

    code = (
        "import json, os, sys\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        "for env in json.loads(sys.argv[1]):\n"
        "    os.environ.update(env)\n"
        f"    bag = DagBag({str(ROOT / 'dags' / dag_file)!r})\n"
        "    print(json.dumps({'errors': {k: v[-400:] for k, v in bag.import_errors.items()},\n"
        "                      'dags': {d.dag_id: {'kind': type(d.timetable).__name__,\n"
        "                                          'cron': getattr(getattr(d.timetable, 'timetable', d.timetable),\n"
        "                                                          'expression', None)}\n"
        "                               for d in bag.dags.values()}}))\n"
    )
    home = Path(tempfile.mkdtemp(prefix="mlpipe-parse-"))
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(envs)], env=airflow_env(dict(os.environ), home=home),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_retrain_schedule_is_configurable():
    weekly, off, bad = _parse("scheduled_retrain.py", [{"MLPIPE_RETRAIN_CRON": "15 4 * * 1"},
                                                       {"MLPIPE_RETRAIN_CRON": "off"},
                                                       {"MLPIPE_RETRAIN_CRON": "every tuesday"}])
    assert not weekly["errors"]
    assert weekly["dags"]["scheduled_retrain"] == {"kind": "AssetOrTimeSchedule", "cron": "15 4 * * 1"}
    assert off["dags"]["scheduled_retrain"] == {"kind": "AssetTriggeredTimetable", "cron": None}  # drift only
    assert "MLPIPE_RETRAIN_CRON='every tuesday' is not a cron expression" in next(iter(bad["errors"].values()))


def test_monitor_schedule_is_configurable():
    every5, off, bad = _parse("monitor.py", [{"MLPIPE_MONITOR_CRON": "*/5 * * * *"},
                                             {"MLPIPE_MONITOR_CRON": "off"},
                                             {"MLPIPE_MONITOR_CRON": "often"}])
    assert not every5["errors"] and every5["dags"]["monitor"] == {"kind": "CronTriggerTimetable", "cron": "*/5 * * * *"}
    assert off["dags"]["monitor"] == {"kind": "NullTimetable", "cron": None}  # manual runs only
    assert "MLPIPE_MONITOR_CRON='often' is not a cron expression" in next(iter(bad["errors"].values()))


def test_retrain_trains_and_registers_on_the_extra_drops():
    """``retrain`` with ``extra_drop_ids`` (what ``scheduled_retrain`` passes): the templated arguments, rendered
    as Airflow renders them and parsed by the step CLIs, train on every drop and register exactly those."""
    import json
    import subprocess

    from tasks.steps import registry
    from tasks.steps import train
    from tasks.local.airflow import airflow_env

    code = (
        "import json, sys\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"dag = DagBag({str(ROOT / 'dags' / 'retrain.py')!r}).dags['retrain']\n"
        "class TI:\n"
        "    def xcom_pull(self, task_ids):\n"
        "        return {'validate': {'drop_id': 'd3'},\n"
        "                'train': {'run_id': 'run-1', 'drop_ids': ['d3', 'd1', 'd2']}}[task_ids]\n"
        "for extra in ([], ['d1', 'd2'], None):\n"
        "    params = {**{k: dag.params[k] for k in dag.params}, 'drop_id': 'd3', 'extra_drop_ids': extra}\n"
        "    out = {}\n"
        "    for task_id in ('train', 'register'):\n"
        "        op = dag.get_task(task_id)\n"
        "        out[task_id] = op.render_template(op.arguments, {'params': params, 'ti': TI()},\n"
        "                                          dag.get_template_env())\n"
        "    print(json.dumps(out))\n"
    )
    home = Path(tempfile.mkdtemp(prefix="mlpipe-render-"))
    env = {**airflow_env(dict(os.environ), home=home), "MLPIPE_EXECUTION": "local"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    alone, extra, null = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]

    def trained_on(argv: list[str]) -> tuple[list[str], int]:
        args = train.build_parser().parse_args(argv)
        return train.split_drop_ids(args.drop_ids), args.seed

    assert trained_on(alone["train"]) == trained_on(null["train"]) == (["d3"], 0)
    assert trained_on(extra["train"]) == (["d3", "d1", "d2"], 0)
    args = registry.build_parser().parse_args(extra["register"])
    assert (args.run_id, registry.split_drop_ids(args.drop_id)) == ("run-1", ["d3", "d1", "d2"])


# --------------------------------------------------------------------------- through the real Airflow processes


def retrain_run(client: AirflowClient, drop_id: str) -> dict[str, Any] | None:
    resp = client.request("GET", f"/api/v2/dags/retrain/dagRuns/{mt.retrain_run_id(drop_id)}")
    return resp.json() if resp.status_code == 200 else None


def retrain_runs_for(client: AirflowClient, drop_id: str) -> list[dict[str, Any]]:
    """Every retrain run (any run id) whose conf names ``drop_id``."""
    return [r for r in client.dag_runs("retrain") if (r.get("conf") or {}).get("drop_id") == drop_id]


def drop_events(client: AirflowClient, drop_id: str) -> list[dict[str, Any]]:
    asset = next(a for a in client.get("/api/v2/assets", limit=100)["assets"] if a["name"] == "mlpipe_drops")
    events = client.get("/api/v2/assets/events", asset_id=asset["id"], limit=100)["asset_events"]
    return [e for e in events if mt.drop_ids_from_events([e]) == [drop_id]]


def task_log(client: AirflowClient, dag_id: str, run_id: str, task_id: str, try_number: int = 1) -> str:
    from urllib.parse import quote

    resp = client.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/"
                                 f"{task_id}/logs/{try_number}", params={"full_content": "true"},
                          headers={"Accept": "application/json"})
    assert resp.status_code == 200, resp.text[:300]
    return str(resp.json().get("content"))


def restart(handle, names: tuple[str, ...]) -> None:
    """Start the named Airflow processes again (the others keep running)."""
    spec = stack.StackSpec(home=handle.home, services=names, ports=dict(handle.spec.ports),
                           extra_env=dict(TEST_ENV), timeout=120)
    stack.up(spec, env=handle.env, out=lambda _m: None)


def test_complete_drops_trigger_one_retrain_each_incomplete_never(airflow_stack):
    af = airflow_stack
    store, client = af.store, af.client
    drops.make_drop(store, "never-done", size=SMALL, seed=11, complete=False)
    drops.make_drop(store, "arrive-1", size=SMALL, seed=12)
    run = wait_for(lambda: retrain_run(client, "arrive-1"), 90, "the retrain run of arrive-1")
    assert run["conf"]["drop_id"] == "arrive-1" and run["state"] == "queued"  # retrain is paused
    wait_for(lambda: mt.is_claimed(store, "arrive-1"), 60, "the claim of arrive-1")

    # Two drops completing together: one run each (they may share one drop_arrival run).
    for d in ("pair-a", "pair-b"):
        drops.make_drop(store, d, size=SMALL, seed=len(d) + 20, complete=False)
    write_success(store, "pair-a")
    write_success(store, "pair-b")
    for d in ("pair-a", "pair-b"):
        wait_for(lambda d=d: retrain_run(client, d), 90, f"the retrain run of {d}")
    wait_for(lambda: mt.is_claimed(store, "pair-a") and mt.is_claimed(store, "pair-b"), 60, "both claims")
    time.sleep(3)  # a few more polls of the watcher
    for d in ("arrive-1", "pair-a", "pair-b"):
        assert len(retrain_runs_for(client, d)) == 1, d
        assert len(drop_events(client, d)) == 1, d  # claimed: announced once
    # The incomplete drop: no event, no run, no claim, however long it stays incomplete.
    assert not drop_events(client, "never-done")
    assert retrain_run(client, "never-done") is None and not mt.is_claimed(store, "never-done")
    runs = client.dag_runs("drop_arrival")
    assert runs and all(r["state"] == "success" for r in runs if r["state"] in ("success", "failed"))


def test_repeated_and_incomplete_events_do_not_start_runs(airflow_stack):
    """An asset event posted again for a drop that has its run (a duplicate), and one for a drop that is
    still incomplete: ``drop_arrival`` runs and succeeds, no retrain run is added."""
    af = airflow_stack
    store, client = af.store, af.client
    drops.make_drop(store, "dup", size=SMALL, seed=31)
    wait_for(lambda: retrain_run(client, "dup") and mt.is_claimed(store, "dup"), 90, "the first run of dup")
    drops.make_drop(store, "still-half", size=SMALL, seed=32, complete=False)
    asset = next(a for a in client.get("/api/v2/assets")["assets"] if a["name"] == "mlpipe_drops")
    before = {r["dag_run_id"] for r in client.dag_runs("drop_arrival")}
    for drop_id in ("dup", "still-half"):
        resp = client.request("POST", "/api/v2/assets/events", json={"asset_id": asset["id"],
                                                                    "extra": {"drop_id": drop_id}})
        assert resp.status_code == 200, resp.text
    new_runs = wait_for(lambda: [r for r in client.dag_runs("drop_arrival")
                                 if r["dag_run_id"] not in before and r["state"] in ("success", "failed")],
                        90, "drop_arrival runs for the posted events")
    assert all(r["state"] == "success" for r in new_runs)
    time.sleep(2)
    assert len(retrain_runs_for(client, "dup")) == 1
    assert not retrain_runs_for(client, "still-half") and not mt.is_claimed(store, "still-half")


def test_restarts_between_arrival_and_run_give_exactly_one_run(airflow_stack):
    """Scheduler down when the drop arrives; the triggerer restarted after announcing it (so the drop is
    announced twice); then the scheduler comes back: one retrain run, one claim."""
    af = airflow_stack
    store, client = af.store, af.client
    stack.down(af.home, services=["scheduler"], out=lambda _m: None)
    try:
        drops.make_drop(store, "restart-1", size=SMALL, seed=41)
        wait_for(lambda: drop_events(client, "restart-1"), 60, "the asset event of restart-1")
        time.sleep(2)
        assert retrain_run(client, "restart-1") is None  # no scheduler: nothing ran yet
        assert not mt.is_claimed(store, "restart-1")

        stack.down(af.home, services=["triggerer"], out=lambda _m: None)
        restart(af, ("triggerer",))
        wait_for(lambda: len(drop_events(client, "restart-1")) >= 2, 90,
                 "the restarted triggerer announcing the unclaimed drop again")
    finally:
        restart(af, ("scheduler",))
    wait_for(lambda: mt.is_claimed(store, "restart-1"), 120, "the claim of restart-1 after the restarts")
    time.sleep(3)
    runs = retrain_runs_for(client, "restart-1")
    assert [r["dag_run_id"] for r in runs] == ["drop__restart-1"]
    finished = [r for r in client.dag_runs("drop_arrival") if r["state"] not in ("success", "failed")]
    wait_for(lambda: not [r for r in client.dag_runs("drop_arrival") if r["state"] not in ("success", "failed")],
             90, f"drop_arrival runs to finish ({finished})")
    assert len(retrain_runs_for(client, "restart-1")) == 1
    assert len(drop_events(client, "restart-1")) == 2  # claimed now: no further announcements


def test_drop_arriving_while_a_retrain_runs_gets_its_own_run(airflow_stack):
    af = airflow_stack
    store, client = af.store, af.client
    for run in client.dag_runs("retrain"):  # earlier tests' runs (tiny drops) would go first: fail them
        if run["state"] in ("queued", "running"):
            client.request("PATCH", f"/api/v2/dags/retrain/dagRuns/{run['dag_run_id']}", json={"state": "failed"})
    client.set_paused("retrain", False)
    try:
        drops.make_drop(store, "busy-a", size=200, seed=51)  # a valid drop: its run really works
        wait_for(lambda: (retrain_run(client, "busy-a") or {}).get("state") == "running", 120,
                 "the retrain run of busy-a to be running")
        drops.make_drop(store, "busy-b", size=SMALL, seed=52)
        run_b = wait_for(lambda: retrain_run(client, "busy-b"), 90, "the retrain run of busy-b")
        run_a = retrain_run(client, "busy-a")
        assert run_a["state"] == "running", "busy-a finished before busy-b arrived: make its run longer"
        assert run_b["state"] == "queued"  # max_active_runs=1: it waits for busy-a, it is not lost
        assert run_b["conf"] == {"drop_id": "busy-b", "model": "digits"}  # the model its drop.json names
    finally:
        client.set_paused("retrain", True)
        for d in ("busy-a", "busy-b"):
            if retrain_run(client, d):
                client.request("PATCH", f"/api/v2/dags/retrain/dagRuns/{mt.retrain_run_id(d)}",
                               json={"state": "failed"})
    assert len(retrain_runs_for(client, "busy-a")) == 1 and len(retrain_runs_for(client, "busy-b")) == 1


def test_scheduled_retrain_ends_early_without_new_data_then_trains_on_all_new(airflow_stack):
    af = airflow_stack
    store, client = af.store, af.client
    newest = drops.list_drops(store)[-1] if drops.list_drops(store) else None
    if newest is None:
        drops.make_drop(store, "sched-base", size=SMALL, seed=60)
        newest = "sched-base"
    fake_champion(store, [newest], version=7)

    resp = client.trigger("scheduled_retrain", {"epochs": 1})
    assert resp.status_code == 200, resp.text
    run = client.wait_run("scheduled_retrain", resp.json()["dag_run_id"], timeout=120)
    assert run["state"] == "success"
    assert client.task_instances("scheduled_retrain", run["dag_run_id"]) == {"plan": "skipped",
                                                                             "trigger_retrain": "skipped"}
    assert "no new validated data since the champion v7" in task_log(client, "scheduled_retrain",
                                                                      run["dag_run_id"], "plan")

    for i, drop_id in enumerate(("sched-1", "sched-2")):
        drops.make_drop(store, drop_id, size=SMALL, seed=61 + i, complete=False)
        fake_validation(store, drop_id)  # validated before it is complete: the watcher leaves it alone
        write_success(store, drop_id)
        time.sleep(0.01)
    for attempt in range(2):  # the same set twice: one retrain run
        resp = client.trigger("scheduled_retrain", {"epochs": 1, "seed": 5})
        run = client.wait_run("scheduled_retrain", resp.json()["dag_run_id"], timeout=120)
        assert run["state"] == "success"
        states = client.task_instances("scheduled_retrain", run["dag_run_id"])
        assert states["trigger_retrain"] == ("success" if attempt == 0 else "skipped"), states
    runs = [r for r in client.dag_runs("retrain") if r["dag_run_id"].startswith("scheduled__")]
    assert len(runs) == 1
    assert runs[0]["conf"] == {"drop_id": "sched-2", "extra_drop_ids": ["sched-1"], "epochs": 1, "seed": 5,
                               "model": "digits"}
    assert not retrain_run(client, "sched-1") and not retrain_run(client, "sched-2")  # not drop-triggered


def test_drift_event_starts_the_scheduled_retrain(airflow_stack):
    """The closed loop's last hop: an ``mlpipe_drift`` asset event (what the monitor's ``request_retrain``
    emits) starts ``scheduled_retrain`` through the scheduler, which plans on the validated drops."""
    client = airflow_stack.client
    asset = next(a for a in client.get("/api/v2/assets", limit=100)["assets"] if a["name"] == "mlpipe_drift")
    before = {r["dag_run_id"] for r in client.dag_runs("scheduled_retrain")}
    resp = client.request("POST", "/api/v2/assets/events",
                          json={"asset_id": asset["id"], "extra": {"summary": "drift test: class_psi 0.9"}})
    assert resp.status_code == 200, resp.text
    run = wait_for(lambda: next((r for r in client.dag_runs("scheduled_retrain") if r["dag_run_id"] not in before
                                 and r["state"] in ("success", "failed")), None),
                   120, "a scheduled_retrain run started by the drift event")
    assert run["run_type"] == "asset_triggered" and run["state"] == "success"
    log = task_log(client, "scheduled_retrain", run["dag_run_id"], "plan")
    assert "retrain requested by the drift monitor: drift test: class_psi 0.9" in log
