"""The local stack for daily use: ``make up`` / ``make down`` / ``make status``.

``up`` starts, on 127.0.0.1 only:

* ``broker``: Tansu, the Kafka-compatible broker (``mlpipe kafka broker``, memory storage);
* ``triton``: the bundled ``tritonserver`` (``python -m tasks.adapters.triton serve``) on the model
  repository ``$MLPIPE_HOME/triton/model_repository``, loading the deployed version if any;
* Airflow 3 as four processes on SQLite with small parallelism: ``api-server`` (UI + REST on
  :8080), ``scheduler``, ``dag-processor`` (new DAG files noticed within seconds) and
  ``triggerer`` (runs the drop-arrival watcher);
* ``consumer``: the streaming consumer (``mlpipe stream``), Triton's sidecar;
* ``gateway``: the ingest gateway (``mlpipe gateway``), bearer token generated once;
* ``exporter``: ``mlpipe metrics-exporter`` (drift and QC results from the store, the consumer group's
  lag measured from outside, CPU seconds per 1,000 frames by service from the PID files);
* ``prometheus``: Debian's ``prometheus`` (``tasks.local.prometheus``) scraping the consumer, the gateway,
  Triton's metrics port and the exporter, with the rules of ``ops/prometheus/rules``; left out, with
  the reason, when the binary is missing (``.ci/ensure-prometheus`` installs it).

Every service is health-checked before ``up`` returns; its log is
``$MLPIPE_HOME/stack/logs/<service>.log``, its PID ``$MLPIPE_HOME/stack/pids/<service>.pid``
and the whole state (ports, PIDs, process groups, URLs) ``$MLPIPE_HOME/stack/stack.json``.

Each service runs in its own session and process group (pgid == its PID, recorded), with what it
forks (Airflow's workers and task runners, tritonserver and its Python-backend stubs, tansu), and
is stopped as a group: SIGTERM, SIGKILL after a grace period, also when its leader crashed and
left the group behind (members verified by session and start time, so a reused PID is left
alone). ``up`` starts a supervisor (``mlpipe stack supervise``, recorded as ``supervisor``) that
starts the services and restarts a crashed one with backoff (1 s doubling to 30 s; marked failed
in ``status`` after 5 restarts in 10 minutes), logging why (exit code or signal, last log lines)
to ``logs/supervisor.log``. A second ``up`` while the stack runs says so (and starts only what
died); after a crash it first stops what the dead services left behind (their groups; a port held
by such an orphan; Triton's shared memory, prefix ``shm_prefix(home)``); a port taken by another
program is named with the variable that moves it. ``down`` stops the supervisor, then the
services (within about 9 s, also during a running task); ``up`` again restarts them with the
same state (metadata DB, store, model repository, secrets). The scheduler's orphan settings
(``stack_env``) are short, so a DAG run interrupted by a scheduler crash goes on after the restart.

Ports (environment variables): ``MLPIPE_AIRFLOW_PORT`` (8080), ``MLPIPE_TRITON_HTTP_PORT``
(8000), ``MLPIPE_TRITON_GRPC_PORT`` (8001), ``MLPIPE_TRITON_METRICS_PORT`` (8002),
``MLPIPE_KAFKA_PORT`` (9092), ``MLPIPE_CONSUMER_PORT`` (9108), ``MLPIPE_GATEWAY_PORT`` (8090),
``MLPIPE_SCHEDULER_HEALTH_PORT`` (8974), ``MLPIPE_EXPORTER_PORT`` (9109), ``MLPIPE_PROMETHEUS_PORT`` (9090);
``--free-ports`` picks free ones (tests).
The UI login is ``admin`` with the password Airflow's SimpleAuthManager generated
(``$MLPIPE_HOME/airflow/passwords.json``); ``up`` and ``status`` print it.

    mlpipe stack up [--services airflow,triton,...] [--free-ports]
    mlpipe stack status [--json]
    mlpipe stack down
    mlpipe stack env        # shell exports to talk to the running stack
    mlpipe stack supervise  # (started by up) restart crashed services until down

This module never imports Airflow: it runs the ``airflow`` CLI and talks to the REST API
(``AirflowClient``: JWT from ``POST /auth/token``, ``/api/v2/...``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import psutil

from tasks.adapters.airflow import AirflowClient
from tasks.config import PROJECT_ROOT, LocalSection, load_settings
from tasks.local.procs import LOOPBACK, ManagedProcess, free_port, http_ok, port_open
from tasks.contracts.files import atomic_write

logger = logging.getLogger(__name__)

AIRFLOW_SERVICES = ("api-server", "scheduler", "dag-processor", "triggerer")
OBSERVABILITY = ("exporter", "prometheus")
SERVICES = ("broker", "triton", *AIRFLOW_SERVICES, "consumer", "gateway", *OBSERVABILITY)
GROUPS = {"airflow": AIRFLOW_SERVICES, "serving": ("broker", "triton", "consumer", "gateway"),
          "observability": OBSERVABILITY, "all": SERVICES}
#: port name -> (environment variable, default), from the settings tree (``load_settings().local``)
PORTS: dict[str, tuple[str, int]] = {
    name: (str(LocalSection.model_fields[f"{name}_port"].validation_alias),
           int(LocalSection.model_fields[f"{name}_port"].default))
    for name in ("airflow", "triton_http", "triton_grpc", "triton_metrics", "kafka", "consumer", "gateway",
                 "scheduler_health", "exporter", "prometheus")
}
#: which ports a service listens on (checked before start)
SERVICE_PORTS = {
    "broker": ("kafka",), "triton": ("triton_http", "triton_grpc", "triton_metrics"),
    "api-server": ("airflow",), "scheduler": ("scheduler_health",), "consumer": ("consumer",),
    "gateway": ("gateway",), "exporter": ("exporter",), "prometheus": ("prometheus",),
}
ADMIN_USER = "admin"
STOP_GRACE_S = 4.0
#: ``down`` stops the services front to back in two waves within this many seconds (the second wave's
#: grace is what is left of it)
DOWN_BUDGET_S = 9.0
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class StackError(RuntimeError):
    """The stack could not be started or stopped; the message says what to do."""


# --------------------------------------------------------------------------- paths and state


def stack_dir(home: Path) -> Path:
    return Path(home) / "stack"


def state_path(home: Path) -> Path:
    return stack_dir(home) / "stack.json"


def read_state(home: Path) -> dict[str, Any] | None:
    try:
        return json.loads(state_path(home).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


@contextlib.contextmanager
def state_lock(home: Path):
    """Serialise read-modify-write of the state file between ``up``/``down`` and the supervisor."""
    path = stack_dir(home) / ".state.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_state(home: Path, state: Mapping[str, Any] | None) -> None:
    """Write the state file whole (or remove it when ``state`` is None)."""
    if state is None:
        state_path(home).unlink(missing_ok=True)
    else:
        atomic_write(state_path(home), json.dumps(state, indent=2), mode=0o644)


def update_state(home: Path, change: Callable[[dict[str, Any]], None]) -> dict[str, Any] | None:
    """Apply ``change`` to the state on disk under the lock; None (and nothing written) without a state."""
    with state_lock(home):
        state = read_state(home)
        if state is None:
            return None
        change(state)
        write_state(home, state)
        return state


def shm_prefix(home: Path) -> str:
    """The Python-backend shm prefix of this home's Triton (fixed, so ``up`` after a crash finds its regions)."""
    import hashlib

    return f"mlpipe_{hashlib.sha256(str(Path(home).resolve()).encode()).hexdigest()[:10]}_"


def load_secrets(home: Path) -> dict[str, str]:
    """Secrets shared by the Airflow processes and the gateway, generated once (file mode 0600)."""
    path = stack_dir(home) / "secrets.json"
    try:
        values = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        values = {}
    changed = False
    for key, make in (("jwt_secret", lambda: secrets.token_urlsafe(48)),
                      ("api_secret_key", lambda: secrets.token_urlsafe(32)),
                      ("fernet_key", _fernet_key),
                      ("gateway_token", lambda: secrets.token_urlsafe(24))):
        if not values.get(key):
            values[key] = make()
            changed = True
    if changed:
        atomic_write(path, json.dumps(values, indent=2), mode=0o600)
    return values


def _fernet_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def admin_password(home: Path, user: str = ADMIN_USER) -> str | None:
    """The UI password SimpleAuthManager generated for ``user`` (None before the api-server's first start)."""
    path = Path(home) / "airflow" / "passwords.json"
    try:
        return json.loads(path.read_text()).get(user)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# --------------------------------------------------------------------------- processes by PID

#: ``create_time()`` follows the system clock (boot time + start ticks), which NTP may move by a second
#: between the ``up`` that recorded a start and the ``down`` that checks it. A PID reused by another
#: process that started within this window of ours is not a real case.
START_TOLERANCE_S = 1.5


def _live(proc: psutil.Process) -> bool:
    """``proc`` is still the process it was created for (same start time) and is not a zombie."""
    try:
        return proc.is_running() and proc.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.Error:
        return False


def _process(pid: int | None, created: float | None = None) -> psutil.Process | None:
    """The live process ``pid`` when (``created`` given) it started at ``created``; else None."""
    if not pid:
        return None
    try:
        proc = psutil.Process(pid)
        if created is not None and abs(proc.create_time() - created) > START_TOLERANCE_S:
            return None
    except psutil.Error:
        return None
    return proc if _live(proc) else None


def start_time(pid: int) -> float | None:
    """When ``pid`` started (``psutil.Process.create_time()``, seconds since the epoch); None when gone."""
    proc = _process(pid)
    return proc.create_time() if proc else None


def pid_alive(pid: int | None, created: float | None = None) -> bool:
    """The process exists, is not a zombie and (when ``created`` is given) is the one we started."""
    return _process(pid, created) is not None


def _children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [c for c in proc.children(recursive=True) if _live(c)]
    except psutil.Error:
        return []


def descendants(pid: int) -> list[tuple[int, float]]:
    """(pid, start time) of every live descendant of ``pid``."""
    proc = _process(pid)
    return [(c.pid, c.create_time()) for c in _children(proc)] if proc else []


def _signal(procs: Iterable[psutil.Process], sig: int) -> None:
    for proc in procs:
        try:
            proc.send_signal(sig)  # psutil refuses when the PID now belongs to another process
        except psutil.Error:
            pass


def _wait(procs: Sequence[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait up to ``timeout`` for ``procs`` to end; returns those still alive (a zombie counts as ended)."""
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if _live(p)]
    while alive and time.monotonic() < deadline:
        _reap()
        gone, alive = psutil.wait_procs(alive, timeout=min(0.2, max(0.0, deadline - time.monotonic())))
        for p in gone:  # psutil reaped a child of ours: its Popen gets the exit status psutil saw
            mp = _STARTED.get(p.pid)
            if mp is not None and mp.proc is not None and mp.proc.returncode is None and p.returncode is not None:
                mp.proc.returncode = p.returncode
        alive = [p for p in alive if _live(p)]
    return alive


# Processes started by this Python process: kept so they can be reaped (no zombies in tests).
_STARTED: dict[int, ManagedProcess] = {}


def _reap() -> None:
    for pid, mp in list(_STARTED.items()):
        if mp.proc is not None and mp.proc.poll() is not None:
            _STARTED.pop(pid, None)


def session_members(sid: int | None, created: float | None = None) -> list[psutil.Process]:
    """The live processes of the session (and process group) our service ``sid`` leads or led.

    Services start with ``start_new_session``: sid == pgid == the leader's PID, inherited by everything
    they fork (Airflow's task runners move to their own process groups, but stay in the session). The
    leader may be gone (crashed) while the session lives on: Linux does not reuse a PID while it
    names a session or group, so a live process at ``sid`` started at another time than ``created``
    means our session is gone. Members started before ``created`` are not ours either.
    """
    if not sid or sid <= 1 or sid == os.getsid(0):
        return []
    if created is not None:
        try:
            if abs(psutil.Process(sid).create_time() - created) > START_TOLERANCE_S:
                return []  # the PID is another process's now
        except psutil.NoSuchProcess:
            pass  # the leader is gone; its session may not be
        except psutil.Error:
            return []
    me = os.getpid()
    members = []
    for proc in psutil.process_iter():
        try:
            if proc.pid == me or os.getsid(proc.pid) != sid:
                continue
            if created is not None and proc.create_time() < created - START_TOLERANCE_S:
                continue
        except (OSError, psutil.Error):
            continue
        if _live(proc):
            members.append(proc)
    return members


def _killpg(procs: Iterable[psutil.Process], sig: int) -> None:
    """``sig`` to the process groups of ``procs`` (verified members of our sessions), then to each of them."""
    groups = set()
    for proc in procs:
        try:
            groups.add(os.getpgid(proc.pid))
        except OSError:
            pass
    for pgid in groups:
        if pgid > 1 and pgid != os.getpgrp():
            try:
                os.killpg(pgid, sig)
            except OSError:
                pass
    _signal(procs, sig)  # members outside the session (a child that called setsid)


def _unique(procs: Iterable[psutil.Process]) -> list[psutil.Process]:
    seen: dict[int, psutil.Process] = {}
    for p in procs:
        seen.setdefault(p.pid, p)
    return list(seen.values())


def stop_pids(procs: Sequence[tuple[str, int, float | None]], grace: float = STOP_GRACE_S,
              tree: bool = True) -> dict[str, str]:
    """Stop recorded services as process groups: SIGTERM to the group, SIGKILL after ``grace``.

    ``procs``: (name, pid, start time) of each service leader. Its group is its session (see
    ``session_members``) plus the leader's descendants that left it; a leader that crashed leaves its
    group behind, which is stopped all the same. Returns name -> "stopped" | "killed" (needed the
    SIGKILL) | "orphans stopped" (leader gone, its group was not) | "not running". ``tree=False``: the
    session only (the supervisor: the services it started are in sessions of their own and stay).
    """
    result: dict[str, str] = {}
    leaders: dict[str, psutil.Process | None] = {}
    groups: dict[str, list[psutil.Process]] = {}
    for name, pid, created in procs:
        leader = _process(pid, created)
        members = session_members(pid, created) if (leader is not None or created is not None) else []
        if leader is not None:
            members += [leader, *(_children(leader) if tree else ())]
        members = _unique(members)
        if not members:
            result[name] = "not running"
            continue
        leaders[name], groups[name] = leader, members
    everyone = _unique(p for m in groups.values() for p in m)
    _killpg(everyone, signal.SIGTERM)
    alive = _wait(everyone, grace)
    # members forked since the scan (a worker the scheduler started while stopping)
    for name, pid, created in procs:
        if name in groups:
            alive = _unique(alive + session_members(pid, created))
    alive_pids = {p.pid for p in alive}
    for name, leader in leaders.items():
        if leader is None:
            result[name] = "orphans stopped"
        elif leader.pid in alive_pids:
            logger.warning("%s (pid %s) did not stop within %.0fs: SIGKILL to its group", name, leader.pid, grace)
            result[name] = "killed"
        else:
            result[name] = "stopped"
    _killpg(alive, signal.SIGKILL)
    _wait(alive, 5)  # a killed process is gone (or a zombie) when this returns
    _reap()
    for mp in list(_STARTED.values()):
        if mp.proc is not None and not pid_alive(mp.proc.pid):
            try:
                mp.proc.wait(timeout=1)
            except Exception:  # noqa: BLE001
                pass
    _reap()
    return result


def port_holder(port: int) -> psutil.Process | None:
    """The process listening on loopback ``port`` when it is one of ours (same user); else None."""
    try:
        conns = psutil.net_connections(kind="tcp")
    except psutil.Error:
        return None
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
            try:
                return psutil.Process(c.pid)
            except psutil.Error:
                return None
    return None


def _of_home(proc: psutil.Process, home: Path) -> bool:
    """``proc`` runs with ``MLPIPE_HOME`` = ``home`` (a service of this stack, or a process it forked)."""
    try:
        return proc.environ().get("MLPIPE_HOME") == str(home)
    except psutil.Error:
        return False


# --------------------------------------------------------------------------- the stack spec


@dataclass
class StackSpec:
    """What to run and where. ``from_env()`` reads ports from ``MLPIPE_*_PORT``."""

    home: Path
    services: tuple[str, ...] = SERVICES
    ports: dict[str, int] = field(default_factory=dict)
    model: str = "digits"
    admin_user: str = ADMIN_USER
    extra_env: dict[str, str] = field(default_factory=dict)
    timeout: float = 180.0

    @classmethod
    def from_env(cls, home: Path | None = None, services: Iterable[str] | None = None, free_ports: bool = False,
                 extra_env: Mapping[str, str] | None = None, timeout: float = 180.0) -> "StackSpec":
        try:
            cfg = load_settings()
        except ValueError as exc:  # names the variable, e.g. MLPIPE_KAFKA_PORT must be <= 65535
            raise StackError(str(exc)) from None
        home = Path(home or cfg.home).resolve()
        ports = {name: free_port() if free_ports else cfg.local.port(name) for name in PORTS}
        return cls(home=home, services=parse_services(services), ports=ports, model=cfg.model_name,
                   extra_env=dict(extra_env or {}), timeout=timeout)

    # addresses -----------------------------------------------------------
    @property
    def airflow_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports['airflow']}"

    @property
    def kafka_bootstrap(self) -> str:
        return f"{LOOPBACK}:{self.ports['kafka']}"

    @property
    def triton_http(self) -> str:
        return f"{LOOPBACK}:{self.ports['triton_http']}"

    @property
    def triton_grpc(self) -> str:
        return f"{LOOPBACK}:{self.ports['triton_grpc']}"

    @property
    def model_repo(self) -> Path:
        return self.home / "triton" / "model_repository"

    @property
    def log_dir(self) -> Path:
        return stack_dir(self.home) / "logs"

    @property
    def pid_dir(self) -> Path:
        return stack_dir(self.home) / "pids"

    def urls(self) -> dict[str, str]:
        p = self.ports
        return {
            "airflow_ui": self.airflow_url,
            "kafka_bootstrap": self.kafka_bootstrap,
            "triton_http": self.triton_http,
            "triton_grpc": self.triton_grpc,
            "triton_metrics": f"http://{LOOPBACK}:{p['triton_metrics']}/metrics",
            "consumer_metrics": f"http://{LOOPBACK}:{p['consumer']}/metrics",
            "gateway": f"http://{LOOPBACK}:{p['gateway']}",
            "exporter_metrics": f"http://{LOOPBACK}:{p['exporter']}/metrics",
            "prometheus": f"http://{LOOPBACK}:{p['prometheus']}",
        }


def parse_services(services: Iterable[str] | str | None, together: bool = True) -> tuple[str, ...]:
    """``"airflow,triton"`` or a list -> the services in start order; groups: airflow, serving, all.

    ``together``: one Airflow process means all four (for ``up``; ``down`` can stop one of them)."""
    if services is None:
        return SERVICES
    if isinstance(services, str):
        services = [s for s in services.split(",") if s.strip()]
    wanted: set[str] = set()
    for item in services:
        item = item.strip()
        if item in GROUPS:
            wanted |= set(GROUPS[item])
        elif item in SERVICES:
            wanted.add(item)
        else:
            raise StackError(f"unknown service {item!r}: choose from {', '.join(SERVICES)} "
                             f"or the groups {', '.join(GROUPS)}")
    if together and wanted & set(AIRFLOW_SERVICES):
        wanted |= set(AIRFLOW_SERVICES)  # the four Airflow processes only work together
    return tuple(s for s in SERVICES if s in wanted)


def stack_env(spec: StackSpec, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every service (and of the Airflow task processes they start)."""
    from tasks.local.airflow import airflow_env

    sec = load_secrets(spec.home)
    env = airflow_env(base, home=spec.home)
    p = spec.ports
    env.update({
        # where the pipeline steps find the services of this stack
        "MLPIPE_KAFKA_BOOTSTRAP": spec.kafka_bootstrap,
        "MLPIPE_TRITON_URL": spec.triton_http,
        "MLPIPE_TRITON_GRPC_URL": spec.triton_grpc,
        "MLPIPE_MODEL_REPO": str(spec.model_repo),
        "MLPIPE_QDRANT_PATH": env.get("MLPIPE_QDRANT_PATH") or str(spec.home / "qdrant"),
        "MLPIPE_GATEWAY_TOKEN": sec["gateway_token"],
        "MLPIPE_MODEL_NAME": spec.model,
        # Airflow: small, loopback, quick to notice DAG files, one shared set of secrets
        "AIRFLOW__CORE__PARALLELISM": env.get("AIRFLOW__CORE__PARALLELISM") or "2",
        "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "2",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{spec.admin_user}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__CORE__FERNET_KEY": sec["fernet_key"],
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{spec.airflow_url}/execution/",
        "AIRFLOW__API__HOST": LOOPBACK,
        "AIRFLOW__API__PORT": str(p["airflow"]),
        "AIRFLOW__API__BASE_URL": spec.airflow_url,
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__SECRET_KEY": sec["api_secret_key"],
        "AIRFLOW__API__EXPOSE_CONFIG": "False",
        "AIRFLOW__API_AUTH__JWT_SECRET": sec["jwt_secret"],
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": env.get("AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL") or "5",
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "10",
        "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "True",
        # Recovery after a scheduler crash (the supervisor restarts it within seconds): the new scheduler
        # resets the task instances the dead one had queued/running once its job heartbeat is older than
        # the threshold (checked every ORPHANED_TASKS_CHECK_INTERVAL, default 300 s); a task whose own
        # heartbeat stopped is failed (and retried) after TASK_INSTANCE_HEARTBEAT_TIMEOUT (default 300 s).
        **{f"AIRFLOW__SCHEDULER__{k}": env.get(f"AIRFLOW__SCHEDULER__{k}") or v for k, v in (
            ("ORPHANED_TASKS_CHECK_INTERVAL", "5"), ("SCHEDULER_HEALTH_CHECK_THRESHOLD", "20"),
            ("TASK_INSTANCE_HEARTBEAT_TIMEOUT", "60"), ("TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL", "5"))},
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST": LOOPBACK,
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": str(p["scheduler_health"]),
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        "PYTHONUNBUFFERED": "1",
    })
    env.update(spec.extra_env)
    return env


# --------------------------------------------------------------------------- services


@dataclass
class Service:
    name: str
    argv: list[str]
    health: Callable[[], bool]
    what: str  # shown while waiting


def _py() -> str:
    return sys.executable


def _airflow() -> str:
    from tasks.local.airflow import airflow_bin

    return airflow_bin()


def _triton_models(spec: StackSpec) -> list[str]:
    """Models Triton loads at start: pre/postprocess always; the classifier and ensemble once deployed."""
    from tasks.model import repo as model_repo

    models = [model_repo.preprocess_name(spec.model), model_repo.postprocess_name(spec.model)]
    try:
        if model_repo.serving_version(spec.model_repo, spec.model) is not None:
            models += [model_repo.classifier_name(spec.model), spec.model]
    except Exception as exc:  # noqa: BLE001 - a broken pin is reported by Triton's own log
        logger.warning("cannot read the serving version in %s: %s", spec.model_repo, exc)
    return models


def _airflow_health(spec: StackSpec) -> dict[str, str]:
    """Component -> status from the api-server's ``/api/v2/monitor/health`` (empty when it does not answer)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{spec.airflow_url}/api/v2/monitor/health", timeout=2) as resp:  # noqa: S310
            body = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError):
        return {}
    return {k: (v or {}).get("status") or "unknown" for k, v in body.items() if isinstance(v, dict)}


def _component_healthy(spec: StackSpec, component: str) -> bool:
    return _airflow_health(spec).get(component) == "healthy"


def _scrape_targets(spec: StackSpec) -> list[str]:
    """``--target JOB=HOST:PORT`` of every service of ``spec`` that Prometheus scrapes."""
    p = spec.ports
    jobs = {"consumer": p["consumer"], "gateway": p["gateway"], "triton": p["triton_metrics"],
            "exporter": p["exporter"]}
    return [f"--target={job}={LOOPBACK}:{port}" for job, port in jobs.items() if job in spec.services]


def build_services(spec: StackSpec) -> dict[str, Service]:
    from tasks.adapters.kafka import broker_ready

    p = spec.ports
    logs = spec.log_dir
    af = _airflow()
    services = {
        "broker": Service("broker", [_py(), "-m", "tasks.cli", "broker", "--port", str(p["kafka"]),
                                     "--log-dir", str(logs), "--create-topics", "--same-group"],
                          lambda: port_open(p["kafka"]) and broker_ready(spec.kafka_bootstrap, timeout=1.0),
                          f"Kafka broker on {spec.kafka_bootstrap}"),
        "triton": Service("triton", [_py(), "-m", "tasks.cli", "triton", "serve", "--model-repository", str(spec.model_repo),
                                     "--log-dir", str(logs), "--backend-dir", str(spec.home / "triton" / "backends"),
                                     "--http-port", str(p["triton_http"]), "--grpc-port", str(p["triton_grpc"]),
                                     "--metrics-port", str(p["triton_metrics"]), "--timeout", "120",
                                     "--shm-prefix", shm_prefix(spec.home), "--same-group",
                                     *[f"--load-model={m}" for m in _triton_models(spec)]],
                          lambda: http_ok(f"http://{spec.triton_http}/v2/health/live"),
                          f"Triton on {spec.triton_http}"),
        "api-server": Service("api-server", [af, "api-server", "--host", LOOPBACK, "--port", str(p["airflow"]),
                                             "--workers", "1"],
                              lambda: _airflow_health(spec).get("metadatabase") == "healthy",
                              f"Airflow api-server on {spec.airflow_url}"),
        "scheduler": Service("scheduler", [af, "scheduler", "--skip-serve-logs"],
                             lambda: _component_healthy(spec, "scheduler"), "Airflow scheduler heartbeat"),
        "dag-processor": Service("dag-processor", [af, "dag-processor"],
                                 lambda: _component_healthy(spec, "dag_processor"), "Airflow dag-processor heartbeat"),
        "triggerer": Service("triggerer", [af, "triggerer", "--skip-serve-logs"],
                             lambda: _component_healthy(spec, "triggerer"), "Airflow triggerer heartbeat"),
        "consumer": Service("consumer", [_py(), "-m", "tasks.cli", "stream", "--bootstrap", spec.kafka_bootstrap,
                                         "--triton-url", spec.triton_grpc, "--http-port", str(p["consumer"]),
                                         "--qdrant-path", str(spec.home / "qdrant"), "--session-timeout-ms", "6000"],
                            lambda: http_ok(f"http://{LOOPBACK}:{p['consumer']}/healthz"),
                            f"consumer on :{p['consumer']}"),
        "gateway": Service("gateway", [_py(), "-m", "tasks.cli", "gateway", "--host", LOOPBACK, "--port", str(p["gateway"]),
                                       "--bootstrap", spec.kafka_bootstrap],
                           lambda: http_ok(f"http://{LOOPBACK}:{p['gateway']}/healthz"),
                           f"gateway on :{p['gateway']}"),
        "exporter": Service("exporter", [_py(), "-m", "tasks.cli", "metrics-exporter", "--host", LOOPBACK,
                                         "--port", str(p["exporter"]), "--bootstrap", spec.kafka_bootstrap,
                                         "--model", spec.model, "--pid-dir", str(spec.pid_dir)],
                            lambda: http_ok(f"http://{LOOPBACK}:{p['exporter']}/healthz"),
                            f"metrics exporter on :{p['exporter']}"),
        "prometheus": Service("prometheus", [_py(), "-m", "tasks.cli", "prometheus", "serve",
                                             "--dir", str(spec.home / "prometheus"), "--port", str(p["prometheus"]),
                                             *_scrape_targets(spec)],
                              lambda: http_ok(f"http://{LOOPBACK}:{p['prometheus']}/-/ready"),
                              f"Prometheus on :{p['prometheus']}"),
    }
    return {name: services[name] for name in spec.services}


# --------------------------------------------------------------------------- status


def running_services(state: Mapping[str, Any] | None) -> dict[str, bool]:
    """Service -> alive (by the PID and start time recorded in the state)."""
    if not state:
        return {}
    return {name: pid_alive(info.get("pid"), info.get("create_time"))
            for name, info in state.get("services", {}).items()}


def status(home: Path | None = None, check_health: bool = True) -> dict[str, Any]:
    """The recorded stack and what is alive and healthy now."""
    home = Path(home or load_settings().home).resolve()
    state = read_state(home)
    if state is None:
        return {"home": str(home), "running": False, "services": {}}
    alive = running_services(state)
    spec = StackSpec(home=home, services=tuple(state.get("services", {})), ports=state["ports"],
                     model=state.get("model", "digits"))
    services: dict[str, Any] = {}
    health = {}
    if check_health:
        built = build_services(spec) if any(alive.values()) else {}
        for name, svc in built.items():
            health[name] = bool(alive.get(name)) and _safe(svc.health)
    for name, info in state.get("services", {}).items():
        services[name] = {"pid": info.get("pid"), "alive": alive.get(name, False),
                          "healthy": health.get(name) if check_health else None, "log": info.get("log"),
                          "restarts": int(info.get("restarts", 0)), "last_exit": info.get("last_exit"),
                          "failed": info.get("failed")}
    sup = state.get(SUPERVISOR) or {}
    cost = None
    if check_health and health.get("exporter"):
        from tasks.serving.exporter import read_cost

        cost = read_cost(spec.urls()["exporter_metrics"])
    rollout = _rollout_state(spec.model) if check_health else None
    return {
        "home": str(home), "running": any(alive.values()), "all_alive": bool(alive) and all(alive.values()),
        "started_at": state.get("started_at"), "urls": state.get("urls", {}), "ports": state.get("ports", {}),
        "login": {"user": state.get("admin_user", ADMIN_USER), "password": admin_password(home)},
        "services": services, "logs": str(stack_dir(home) / "logs"),
        "supervisor": {"pid": sup.get("pid"), "alive": supervisor_alive(state), "log": sup.get("log")},
        "cost": cost,  # CPU seconds per 1,000 frames by service, from the exporter (None when it is not up)
        "rollout": rollout,  # the safe-rollout state of the stack's model (tasks/steps/rollout.py)
    }


def _rollout_state(model: str) -> dict[str, Any] | None:
    """The model's rollout state and running rollout, or None when the store cannot be read."""
    try:
        from tasks.adapters.storage import open_store
        from tasks.steps.rollout import read_state, running

        store = open_store()
        holder = running(store, model)
        return {**read_state(store, model).model_dump(), "running": (holder or {}).get("what")}
    except Exception as exc:  # noqa: BLE001 - status is informative
        logger.debug("rollout state of %s: %s", model, exc)
        return None


def _safe(check: Callable[[], bool]) -> bool:
    try:
        return bool(check())
    except Exception:  # noqa: BLE001 - a failing health check is "not healthy"
        return False


# --------------------------------------------------------------------------- up / down


def up(spec: StackSpec, *, env: Mapping[str, str] | None = None, out: Callable[[str], None] = print,
       supervisor_options: Sequence[str] = ()) -> dict[str, Any]:
    """Start the services of ``spec`` that are not running and wait until all are healthy.

    Cleans up after a crash first: the process groups the dead services left behind (and a stale port
    held by such an orphan of this stack; a port held by another program is an error naming the
    variable that moves it), and Triton's leftover shared memory. The services are started by a new
    supervisor (``mlpipe stack supervise``, recorded in the state) that restarts them when they crash.

    Returns ``status()``. Raises StackError naming the service, its log and what to do when a port
    is taken by another program or a service does not become healthy (the services this call
    started are stopped again).
    """
    from tasks.local.airflow import ensure_db

    home = spec.home
    if "prometheus" in spec.services:
        from tasks.local.prometheus import available

        why = available()
        if why is not None:  # the rest of the stack still runs; the summary says what is missing
            out(f"  prometheus: left out ({why})")
            spec.services = tuple(s for s in spec.services if s != "prometheus")
    state = read_state(home)
    supervisor: SupervisorHandle | None = None
    if state and supervisor_alive(state):
        try:  # pause it: nothing is restarted behind our back while this call starts what is down
            supervisor = SupervisorHandle(home, state[SUPERVISOR]).connect()
        except StackError as exc:
            out(f"  the supervisor does not answer ({exc}); replacing it")
            stop_supervisor(home, state)
    state = read_state(home)
    alive = running_services(state)
    if state:
        _clean_up_dead(home, state, alive, out)
    if state and any(alive.values()):
        spec.ports = dict(state["ports"])  # keep talking to the running services on their ports
        spec.admin_user = state.get("admin_user", spec.admin_user)
        recorded = set(state.get("services", {}))
        wanted = set(spec.services) | {n for n, ok in alive.items() if ok}
        spec.services = tuple(s for s in SERVICES if s in wanted)
        missing = [s for s in spec.services if not alive.get(s)]
        if not missing:
            if supervisor is not None:
                supervisor.close()
            _ensure_supervised(home, env, spec, supervisor_options)
            out(f"the mlpipe stack is already running (home {home}, started {state.get('started_at')}); "
                "nothing to do. `make down` stops it.")
            return settled_status(home, spec.timeout)
        out(f"the mlpipe stack is partly running; starting the services that are down: {', '.join(missing)}"
            + (f" (recorded but dead: {', '.join(sorted(recorded & set(missing)))})"
               if recorded & set(missing) else ""))
    else:
        missing = list(spec.services)

    # A port held by someone else: say which and how to move it (never fail on it later). One held by
    # what a crashed service of this stack left behind is freed.
    taken = [(svc, port_name) for svc in missing for port_name in SERVICE_PORTS.get(svc, ())
             if port_open(spec.ports[port_name])]
    taken = [(svc, pn) for svc, pn in taken if not _free_our_port(home, state, svc, spec.ports[pn], out)]
    if taken:
        if supervisor is not None:
            supervisor.close()
        lines = [f"port {spec.ports[pn]} ({svc}) on {LOOPBACK} is in use by another program; stop it or set "
                 f"{PORTS[pn][0]} to a free port" for svc, pn in taken]
        raise StackError("; ".join(lines))

    run_env = stack_env(spec, env)
    spec.log_dir.mkdir(parents=True, exist_ok=True)
    spec.pid_dir.mkdir(parents=True, exist_ok=True)
    if "triton" in missing:
        from tasks.local.triton import remove_shm_regions
        from tasks.model import repo as model_repo

        from tasks.config import load_settings

        model_repo.render_repo("local", spec.model_repo, load_settings().model_spec(spec.model))
        remove_shm_regions(shm_prefix(home))
    if set(missing) & set(AIRFLOW_SERVICES):
        out("preparing the Airflow metadata DB (SQLite)...")
        ensure_db(run_env)

    services = build_services(spec)
    old_supervisor = (state or {}).get(SUPERVISOR) if supervisor is not None else None
    state = dict(state or {}) if any(alive.values()) else {}
    if old_supervisor:
        state[SUPERVISOR] = old_supervisor  # the live one this call talks to
    state.update({"home": str(home), "ports": spec.ports, "urls": spec.urls(), "model": spec.model,
                  "admin_user": spec.admin_user})
    state.setdefault("started_at", dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    state.setdefault("services", {})
    for name in missing:
        state["services"].pop(name, None)
    started: list[tuple[str, int, float | None]] = []
    t0 = time.monotonic()
    try:
        if supervisor is None:
            supervisor = SupervisorHandle.start(home, run_env, supervisor_options).connect()
            state[SUPERVISOR] = supervisor.record()
        write_state(home, state)
        # Dependencies first: the broker and Triton, then Airflow, the consumer and the gateway together.
        waves = [[s for s in ("broker", "triton") if s in missing],
                 [s for s in (*AIRFLOW_SERVICES, "consumer", "gateway", *OBSERVABILITY) if s in missing]]
        for wave in waves:
            for name in wave:
                svc = services[name]
                log_path = spec.log_dir / f"{name}.log"
                pid, created = supervisor.spawn(name, svc.argv, log_path)
                started.append((name, pid, created))
                # sid == pgid == pid (start_new_session): the group stopped as one, also after a crash
                state["services"][name] = {"pid": pid, "pgid": pid, "create_time": created, "argv": svc.argv,
                                           "log": str(log_path), "started_at": time.time()}
                atomic_write(spec.pid_dir / f"{name}.pid", f"{pid}\n", mode=0o644)
                write_state(home, state)
                out(f"  started {name:<14} pid {pid:<7} log {log_path}")
            _wait_healthy([services[n] for n in wave], state, spec, t0)
    except BaseException:
        if supervisor is not None:
            supervisor.close()
        if started:
            out("stopping the services started by this attempt...")
            stop_pids(started[::-1], grace=5)
            for name, _pid, _t in started:
                state["services"].pop(name, None)
                (spec.pid_dir / f"{name}.pid").unlink(missing_ok=True)
        if any(n == "triton" for n, _p, _t in started):
            from tasks.local.triton import remove_shm_regions

            remove_shm_regions(shm_prefix(home))
        if state["services"]:
            for info in state["services"].values():
                info["supervised"] = True
            write_state(home, state)  # the supervisor goes on watching what ran before
        else:
            stop_supervisor(home, state)
            state_path(home).unlink(missing_ok=True)
        raise
    supervisor.close()
    for info in state["services"].values():
        info["supervised"] = True
        info.pop("failed", None)
    write_state(home, state)
    out(f"all {len(spec.services)} services healthy after {time.monotonic() - t0:.0f}s "
        f"(supervisor pid {supervisor.pid} restarts them if they crash; log {supervisor.log})")
    return settled_status(home, spec.timeout)


def _ensure_supervised(home: Path, env: Mapping[str, str] | None, spec: StackSpec,
                       options: Sequence[str] = ()) -> None:
    """A running stack without a supervisor (it was stopped or crashed) gets a new one."""
    state = read_state(home)
    if state is None or supervisor_alive(state):
        return
    handle = SupervisorHandle.start(home, stack_env(spec, env), options)
    state[SUPERVISOR] = handle.record()
    for info in state.get("services", {}).values():
        info["supervised"] = True
    write_state(home, state)


def _clean_up_dead(home: Path, state: dict[str, Any], alive: Mapping[str, bool], out: Callable[[str], None]) -> None:
    """Stop what the dead services of ``state`` left running (their process groups) and Triton's shm."""
    dead = [(n, i.get("pid"), i.get("create_time")) for n, i in state.get("services", {}).items()
            if not alive.get(n)]
    if not dead:
        return
    result = stop_pids(dead, grace=3)
    for name, what in result.items():
        if what != "not running":
            out(f"  {name}: cleaned up the processes left by its crash (process group {state['services'][name].get('pid')})")
    if any(n == "triton" for n, _p, _t in dead):
        from tasks.local.triton import remove_shm_regions

        if remove_shm_regions(shm_prefix(home)):
            out("  triton: removed the shared memory its Python-backend stubs left behind")


def _free_our_port(home: Path, state: Mapping[str, Any] | None, service: str, port: int,
                   out: Callable[[str], None]) -> bool:
    """A port held by an orphan of this stack (a process of a recorded service's group whose leader is gone,
    or one running with this ``MLPIPE_HOME`` whose session leader is gone) is freed; True when it is free."""
    holder = port_holder(port)
    if holder is None:
        return False
    try:
        sid = os.getsid(holder.pid)
    except OSError:
        return not port_open(port)
    recorded = {i.get("pid"): i.get("create_time") for i in ((state or {}).get("services") or {}).values()}
    ours = sid in recorded and any(p.pid == holder.pid for p in session_members(sid, recorded[sid]))
    if not ours and _of_home(holder, home) and _process(sid) is None:
        ours = True  # leader gone, same home: our orphan even without a state entry
    if not ours:
        return False
    members = [p for p in session_members(sid, recorded.get(sid)) if _of_home(p, home) or sid in recorded]
    _killpg(members or [holder], signal.SIGTERM)
    left = _wait(members or [holder], 3)
    _killpg(left, signal.SIGKILL)
    _wait(left, 3)
    deadline = time.monotonic() + 5
    while port_open(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    out(f"  {service}: port {port} was held by processes a crashed {service} left behind (pid {holder.pid}, "
        f"{' '.join(_cmdline(holder))[:80]}); stopped them")
    return not port_open(port)


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def settled_status(home: Path, timeout: float = 60.0, interval: float = 1.0) -> dict[str, Any]:
    """``status()``, asked again while a live service's health check fails, up to ``timeout`` seconds: an
    api-server busy just after start (parsing, scheduling) can miss one 2 s health probe; that is not down."""
    deadline = time.monotonic() + timeout
    while True:
        st = status(home)
        sick = [n for n, i in st["services"].items() if i.get("alive") and not i.get("healthy")]
        if not sick or time.monotonic() >= deadline:
            return st
        logger.info("waiting for %s to answer its health check", ", ".join(sick))
        time.sleep(interval)


def _wait_healthy(wave: Sequence[Service], state: Mapping[str, Any], spec: StackSpec, t0: float) -> None:
    pending = {s.name: s for s in wave}
    while pending:
        for name, svc in list(pending.items()):
            info = state["services"][name]
            if not pid_alive(info["pid"], info.get("create_time")):
                _reap()
                raise StackError(f"{name} exited during start-up; see its log {info['log']}:\n"
                                 + _tail(Path(info["log"])))
            if _safe(svc.health):
                logger.info("%s healthy after %.1fs", name, time.monotonic() - t0)
                pending.pop(name)
        if not pending:
            return
        if time.monotonic() - t0 > spec.timeout:
            name, svc = next(iter(pending.items()))
            log = state["services"][name]["log"]
            raise StackError(f"{svc.what} not healthy after {spec.timeout:.0f}s; see {log}:\n{_tail(Path(log))}")
        time.sleep(0.5)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def down(home: Path | None = None, *, grace: float = STOP_GRACE_S, services: Iterable[str] | None = None,
         out: Callable[[str], None] = print) -> dict[str, str]:
    """Stop the recorded services (all, or ``services``) as process groups; returns name -> outcome.

    The supervisor goes first (nothing is restarted meanwhile; with ``services`` it stays and those are no
    longer supervised), then the gateway and the consumer, then the exporter, Prometheus, Airflow, Triton
    and the broker: within ``DOWN_BUDGET_S`` with the default grace, also during a running task."""
    home = Path(home or load_settings().home).resolve()
    t0 = time.monotonic()
    state = read_state(home)
    if not state or not (state.get("services") or state.get(SUPERVISOR)):
        out(f"the mlpipe stack is not running (no {state_path(home)})")
        return {}
    names = list(state.get("services", {})) if services is None else list(parse_services(services, together=False))
    result: dict[str, str] = {}
    if services is None or set(state.get("services", {})) <= set(names):
        result[SUPERVISOR] = stop_supervisor(home, state)
        state = read_state(home) or state  # what its last round restarted, if anything
        state.pop(SUPERVISOR, None)
    else:
        def unsupervise(st: dict[str, Any]) -> None:
            for n in names:
                if n in st.get("services", {}):
                    st["services"][n]["supervised"] = False
        paused = None
        if supervisor_alive(state):
            with contextlib.suppress(StackError):  # pause it: its round ends before we change the state
                paused = SupervisorHandle(home, state[SUPERVISOR]).connect(timeout=10)
        state = update_state(home, unsupervise) or state
        if paused is not None:
            paused.close()
    # Front to back: the gateway and the consumer first (the consumer drains and commits while the broker and
    # Triton still run), then the exporter, Prometheus, Airflow, Triton and the broker together.
    order = [s for s in ("gateway", "consumer") if s in names], \
        [s for s in (*OBSERVABILITY, *AIRFLOW_SERVICES, "triton", "broker") if s in names]
    for i, wave in enumerate(order):
        procs = [(n, state["services"][n]["pid"], state["services"][n].get("create_time"))
                 for n in wave if n in state["services"]]
        if procs:
            wave_grace = grace if i == 0 else max(1.0, min(grace, DOWN_BUDGET_S - (time.monotonic() - t0) - 1.0))
            result.update(stop_pids(procs, grace=wave_grace))
        if "triton" in wave:
            from tasks.local.triton import remove_shm_regions

            remove_shm_regions(shm_prefix(home))
    for name in result:
        out(f"  {name:<14} {result[name]}")

    def forget(st: dict[str, Any]) -> None:
        for name in result:
            st.get("services", {}).pop(name, None)
            (stack_dir(home) / "pids" / f"{name}.pid").unlink(missing_ok=True)
        if result.get(SUPERVISOR):
            st.pop(SUPERVISOR, None)
    with state_lock(home):
        st = read_state(home) or {}
        forget(st)
        write_state(home, st if st.get("services") else None)
    logger.info("down in %.1fs", time.monotonic() - t0)
    return result


# --------------------------------------------------------------------------- the supervisor

SUPERVISOR = "supervisor"


@dataclass
class Backoff:
    """When to restart a crashed service: ``initial`` seconds, doubling (``factor``) up to ``maximum``;
    no more than ``max_restarts`` restarts within ``window`` seconds (then: give up, the service is
    marked failed). A run that lasted ``stable_after`` seconds starts the delays over."""

    initial: float = 1.0
    factor: float = 2.0
    maximum: float = 30.0
    max_restarts: int = 5
    window: float = 600.0
    stable_after: float = 60.0
    restarts: list[float] = field(default_factory=list)
    step: int = 0

    def next_delay(self, now: float, ran_for: float | None = None) -> float | None:
        """The delay before the next restart of a service that just died after ``ran_for`` seconds,
        or None: too many restarts in the window, give up."""
        if ran_for is not None and ran_for >= self.stable_after:
            self.step = 0
        self.restarts = [t for t in self.restarts if now - t < self.window]
        if len(self.restarts) >= self.max_restarts:
            return None
        delay = min(self.maximum, self.initial * self.factor ** self.step)
        self.step += 1
        self.restarts.append(now)
        return delay


def exit_reason(returncode: int | None) -> str:
    """``"exit code 3"`` / ``"killed by SIGKILL"`` / unknown (a service the supervisor did not start)."""
    if returncode is None:
        return "exit status unknown (not started by this supervisor)"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


class Supervisor:
    """Restarts the crashed services of the stack recorded under ``home`` (``mlpipe stack supervise``).

    Started by ``up`` as its own process (recorded in the state as ``supervisor``), it starts the services
    ``up`` asks for on its Unix socket (``supervisor_socket``; one JSON line each way: ``{"name", "argv",
    "log"}`` -> ``{"pid", "create_time"}``; nothing is restarted while ``up`` is connected), so it is
    their parent and knows how they end. Every ``interval`` seconds, a supervised service whose leader died has the rest of its process group
    stopped, is restarted after the ``Backoff`` delay, or is marked ``failed`` in the state after too
    many restarts; each with its reason (exit code or signal, last log lines) in ``supervisor.log``.
    Ends on SIGTERM (``down`` stops it first), when the state file goes or names another supervisor.
    """

    def __init__(self, home: Path, backoff: Callable[[], Backoff] = Backoff, interval: float = 0.5,
                 log: Callable[[str], None] | None = None) -> None:
        self.home = Path(home).resolve()
        self.make_backoff = backoff
        self.interval = interval
        self.backoffs: dict[str, Backoff] = {}
        self.pending: dict[str, tuple[float, str]] = {}  # name -> (monotonic time to restart, why)
        self.children: dict[int, ManagedProcess] = {}
        self.stopping = False
        self.recorded = False  # seen in the state as the stack's supervisor
        self.born = time.monotonic()
        import threading

        self.lock = threading.Lock()  # held by a round of checks, or while `up` is connected
        self._server: Any = None
        self._log = log or (lambda msg: print(f"{dt.datetime.now(dt.timezone.utc).isoformat(timespec='milliseconds')} "
                                              f"{msg}", file=sys.stderr, flush=True))

    # -- starting ----------------------------------------------------------------------
    def spawn(self, name: str, argv: Sequence[str], log: str | Path) -> tuple[int, float | None]:
        log_path = Path(log)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as fh:
            fh.write(f"\n===== {dt.datetime.now(dt.timezone.utc).isoformat()} mlpipe stack: starting "
                     f"{name}: {' '.join(argv)}\n".encode())
        mp = ManagedProcess(name, argv, log_path, env=dict(os.environ), cwd=PROJECT_ROOT).start()
        assert mp.pid is not None
        self.children[mp.pid] = mp
        return mp.pid, start_time(mp.pid)

    def serve(self) -> None:
        """Answer ``up`` on the supervisor's socket (a thread): while one is connected, nothing is restarted."""
        import socket
        import threading

        path = supervisor_socket(self.home)
        path.unlink(missing_ok=True)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            srv.bind(str(path))  # mode 0600: only this user can ask for a process to be started
        finally:
            os.umask(old)
        srv.listen(4)
        self._server = srv
        while not self.stopping:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: Any) -> None:
        import socket
        import struct

        with conn:
            _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                  struct.calcsize("3i")))
            if uid != os.getuid():
                return
            with self.lock, conn.makefile("r") as rfile, conn.makefile("w") as wfile:
                wfile.write(json.dumps({"paused": os.getpid()}) + "\n")
                wfile.flush()
                for line in rfile:
                    if not line.strip():
                        continue
                    req = json.loads(line)
                    try:
                        self.pending.pop(req["name"], None)
                        pid, created = self.spawn(req["name"], req["argv"], req["log"])
                        reply: dict[str, Any] = {"pid": pid, "create_time": created}
                    except Exception as exc:  # noqa: BLE001 - reported to `up`
                        reply = {"error": f"{type(exc).__name__}: {exc}"}
                    wfile.write(json.dumps(reply) + "\n")
                    wfile.flush()

    def _returncode(self, pid: int | None) -> int | None:
        mp = self.children.get(pid or -1)
        if mp is None or mp.proc is None:
            return None
        try:
            return mp.proc.wait(timeout=2)
        except Exception:  # noqa: BLE001
            return None

    def _reap(self, recorded: set[Any]) -> None:
        """Reap ended children (``poll`` keeps the exit status of those still recorded, for ``_crashed``)."""
        for pid, mp in list(self.children.items()):
            if mp.proc is not None and mp.proc.poll() is not None and pid not in recorded:
                self.children.pop(pid, None)

    # -- watching ----------------------------------------------------------------------
    def check_once(self) -> bool:
        """One round; False when the supervisor should end (no state, or another supervisor recorded)."""
        state = read_state(self.home)
        recorded = ((state or {}).get(SUPERVISOR) or {}).get("pid")
        if recorded == os.getpid():
            self.recorded = True
        elif not self.recorded and time.monotonic() - self.born < 60 and not pid_alive(recorded):
            return not self.stopping  # `up` records this supervisor once it has started
        elif state is None:
            self._log("the stack state is gone: the supervisor ends")
            return False
        else:
            self._log("another supervisor is recorded in the state: this one ends")
            return False
        assert state is not None
        self._reap({info.get("pid") for info in state.get("services", {}).values()})
        now = time.monotonic()
        for name, info in state.get("services", {}).items():
            if self.stopping:
                return False
            if not info.get("supervised") or info.get("failed"):
                continue
            if pid_alive(info.get("pid"), info.get("create_time")):
                continue
            if name not in self.pending:
                self._crashed(name, info, now)
            elif now >= self.pending[name][0]:
                self._restart(name, info)
        return not self.stopping

    def _crashed(self, name: str, info: Mapping[str, Any], now: float) -> None:
        why = exit_reason(self._returncode(info.get("pid")))
        self.children.pop(info.get("pid") or -1, None)
        ran_for = time.time() - info["started_at"] if info.get("started_at") else None
        tail = _tail(Path(info["log"]), 20) if info.get("log") else "(no log)"
        self._log(f"{name} (pid {info.get('pid')}) died: {why}"
                  + (f" after {ran_for:.0f}s" if ran_for is not None else "")
                  + f"; last lines of {info.get('log')}:\n" + "\n".join(f"    | {ln}" for ln in tail.splitlines()))
        left = stop_pids([(name, info.get("pid"), info.get("create_time"))], grace=1)
        if left.get(name) == "orphans stopped":
            self._log(f"{name}: stopped the processes its group left behind (pgid {info.get('pid')})")
        if name == "triton":
            from tasks.local.triton import remove_shm_regions

            remove_shm_regions(shm_prefix(self.home))
        delay = self.backoffs.setdefault(name, self.make_backoff()).next_delay(now, ran_for)
        if delay is None:
            b = self.backoffs[name]
            failed = f"gave up after {len(b.restarts)} restarts within {b.window:.0f}s; last: {why}"
            self._log(f"{name}: {failed}")

            def mark(st: dict[str, Any]) -> None:
                svc = st.get("services", {}).get(name)
                if svc is not None and svc.get("pid") == info.get("pid"):
                    svc.update(failed=failed, last_exit=why)
            update_state(self.home, mark)
            return
        self._log(f"{name}: restarting in {delay:.0f}s")
        self.pending[name] = (now + delay, why)

    def _restart(self, name: str, info: Mapping[str, Any]) -> None:
        _, why = self.pending.pop(name)
        old_pid = info.get("pid")
        try:
            pid, created = self.spawn(name, info["argv"], info["log"])
        except Exception as exc:  # noqa: BLE001 - counted as one more crash
            self._log(f"{name}: restart failed: {exc}")
            self.pending[name] = (time.monotonic() + (self.backoffs[name].maximum), why)
            return

        recorded: list[bool] = []

        def record(st: dict[str, Any]) -> None:
            svc = st.get("services", {}).get(name)
            if svc is not None and svc.get("pid") == old_pid and svc.get("supervised"):
                atomic_write(stack_dir(self.home) / "pids" / f"{name}.pid", f"{pid}\n", mode=0o644)
                svc.update(pid=pid, create_time=created, started_at=time.time(), last_exit=why,
                           restarts=int(svc.get("restarts", 0)) + 1)
                recorded.append(True)
        update_state(self.home, record)
        if not recorded:  # stopped or replaced meanwhile: this one is not wanted
            self._log(f"{name}: no longer supervised; stopping the restarted pid {pid}")
            stop_pids([(name, pid, created)], grace=2)
            return
        self._log(f"{name}: restarted, pid {pid}")

    def run(self) -> int:
        def stop(*_: object) -> None:
            self.stopping = True
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        import threading

        threading.Thread(target=self.serve, daemon=True).start()
        self._log(f"supervising the stack in {self.home} (pid {os.getpid()})")
        try:
            while True:
                with self.lock:
                    if not self.check_once():
                        break
                time.sleep(self.interval)
        finally:
            if self._server is not None:
                self._server.close()
            state = read_state(self.home)
            if (state or {}).get(SUPERVISOR, {}).get("pid") in (None, os.getpid()):
                supervisor_socket(self.home).unlink(missing_ok=True)
        self._log("supervisor stopped")
        return 0


def supervisor_socket(home: Path) -> Path:
    """The supervisor's Unix socket (mode 0600): ``stack/supervisor.sock``, or a short path under /tmp."""
    path = stack_dir(Path(home).resolve()) / "supervisor.sock"
    if len(str(path)) < 100:
        return path
    import hashlib
    import tempfile

    short = Path(tempfile.gettempdir()) / f"mlpipe-{os.getuid()}"
    short.mkdir(mode=0o700, exist_ok=True)
    return short / f"{hashlib.sha256(str(path).encode()).hexdigest()[:16]}.sock"


class SupervisorHandle:
    """``up``'s end of the supervisor: while connected the supervisor restarts nothing, and the services
    ``up`` starts are started by it (so it is their parent and knows how they end)."""

    def __init__(self, home: Path, info: Mapping[str, Any]) -> None:
        self.home = Path(home)
        self.pid = int(info["pid"])
        self.create_time = info.get("create_time")
        self.log = str(info.get("log") or stack_dir(home) / "logs" / "supervisor.log")
        self.mp: ManagedProcess | None = None
        self._sock: Any = None
        self._r: Any = None
        self._w: Any = None

    @classmethod
    def start(cls, home: Path, env: Mapping[str, str], options: Sequence[str] = (),
              timeout: float = 60.0) -> "SupervisorHandle":
        """A new supervisor process (its own session), once its socket answers."""
        log_path = stack_dir(home) / "logs" / "supervisor.log"
        supervisor_socket(home).unlink(missing_ok=True)  # a killed supervisor's
        mp = ManagedProcess(SUPERVISOR, [_py(), "-m", "tasks.cli", "stack", "--home", str(home), "supervise",
                                         *options], log_path, env=dict(env), cwd=PROJECT_ROOT).start()
        assert mp.pid is not None
        _STARTED[mp.pid] = mp
        handle = cls(home, {"pid": mp.pid, "create_time": start_time(mp.pid), "log": str(log_path)})
        handle.mp = mp
        deadline = time.monotonic() + timeout
        while not supervisor_socket(home).exists():
            if not mp.alive() or time.monotonic() > deadline:
                mp.stop(timeout=2)
                raise StackError(f"the stack supervisor did not start; see {log_path}:\n{_tail(log_path)}")
            time.sleep(0.05)
        return handle

    def record(self) -> dict[str, Any]:
        return {"pid": self.pid, "create_time": self.create_time, "log": self.log, "started_at": time.time()}

    def connect(self, timeout: float = 60.0) -> "SupervisorHandle":
        """Pause the supervisor (it ends its round of checks first) until ``close``."""
        import socket

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(supervisor_socket(self.home)))
            self._sock, self._r, self._w = sock, sock.makefile("r"), sock.makefile("w")
            line = self._r.readline()
        except OSError as exc:
            sock.close()
            raise StackError(f"cannot reach the stack supervisor (pid {self.pid}): {exc}") from None
        if not line or json.loads(line).get("paused") != self.pid:
            self.close()
            raise StackError(f"the stack supervisor (pid {self.pid}) did not answer; see {self.log}")
        return self

    def spawn(self, name: str, argv: Sequence[str], log: Path) -> tuple[int, float | None]:
        try:
            self._w.write(json.dumps({"name": name, "argv": list(argv), "log": str(log)}) + "\n")
            self._w.flush()
            line = self._r.readline()
        except (OSError, AttributeError, ValueError):
            line = ""
        if not line:
            raise StackError(f"the stack supervisor exited; see {self.log}:\n{_tail(Path(self.log))}")
        reply = json.loads(line)
        if "error" in reply:
            raise StackError(f"cannot start {name}: {reply['error']}")
        return int(reply["pid"]), reply.get("create_time")

    def close(self) -> None:
        """Done: the supervisor goes on watching."""
        for fh in (self._w, self._r, self._sock):
            try:
                if fh is not None:
                    fh.close()
            except OSError:
                pass
        self._sock = self._r = self._w = None


def supervisor_alive(state: Mapping[str, Any] | None) -> bool:
    info = (state or {}).get(SUPERVISOR) or {}
    return pid_alive(info.get("pid"), info.get("create_time"))


def stop_supervisor(home: Path, state: Mapping[str, Any] | None = None) -> str:
    """Stop the recorded supervisor (first in ``down``: nothing gets restarted while the stack stops)."""
    state = state if state is not None else read_state(home)
    info = (state or {}).get(SUPERVISOR) or {}
    if not info.get("pid"):
        return "not running"
    return stop_pids([(SUPERVISOR, info["pid"], info.get("create_time"))], grace=3, tree=False)[SUPERVISOR]


# --------------------------------------------------------------------------- REST client of the stack


def airflow_client(home: Path | None = None) -> AirflowClient:
    """An ``AirflowClient`` logged in as the stack's admin user (the stack must be up)."""
    home = Path(home or load_settings().home).resolve()
    state = read_state(home)
    if not state:
        raise StackError(f"no running stack recorded under {home}: start it with `make up`")
    password = admin_password(home)
    if not password:
        raise StackError(f"no admin password in {home}/airflow/passwords.json yet: is the api-server up?")
    return AirflowClient(state["urls"]["airflow_ui"], state.get("admin_user", ADMIN_USER), password)


# --------------------------------------------------------------------------- CLI


def _print_summary(st: Mapping[str, Any], out: Callable[[str], None] = print) -> None:
    urls = st.get("urls", {})
    login = st.get("login", {})
    svc = st.get("services", {})
    out(f"mlpipe stack (home {st['home']}):")
    for name, info in svc.items():
        flag = "healthy" if info.get("healthy") else ("running" if info.get("alive") else "DOWN")
        if info.get("failed") and not info.get("alive"):
            flag = "FAILED"
        extra = f"  restarts {info['restarts']} (last: {info.get('last_exit')})" if info.get("restarts") else ""
        if flag == "FAILED":
            extra = f"  {info['failed']}; `make up` starts it again"
        out(f"  {name:<14} {flag:<8} pid {info.get('pid')}{extra}")
    sup = st.get("supervisor") or {}
    out(f"  {'supervisor':<14} {'running' if sup.get('alive') else 'DOWN':<8} pid {sup.get('pid')}"
        + ("" if sup.get("alive") else "  (crashed services are not restarted; `make up` starts it again)"))
    if any(n in svc for n in AIRFLOW_SERVICES):
        out(f"  Airflow UI     {urls.get('airflow_ui')}   login: {login.get('user')} / {login.get('password')}")
    if "triton" in svc:
        out(f"  Triton         http {urls.get('triton_http')}  grpc {urls.get('triton_grpc')}")
    if "broker" in svc:
        out(f"  Kafka          {urls.get('kafka_bootstrap')}")
    if "consumer" in svc:
        out(f"  consumer       {urls.get('consumer_metrics')}")
    if "gateway" in svc:
        out(f"  gateway        {urls.get('gateway')}  (Authorization: Bearer <gateway_token in "
            f"{stack_dir(Path(st['home'])) / 'secrets.json'}>)")
    if "prometheus" in svc:
        out(f"  Prometheus     {urls.get('prometheus')}  (alerts: {urls.get('prometheus')}/alerts)")
    elif "exporter" in svc:
        out("  Prometheus     not running (not installed: `bash .ci/ensure-prometheus`, then `make up`)")
    if "exporter" in svc:
        out(f"  exporter       {urls.get('exporter_metrics')}")
    cost = st.get("cost")
    if cost is not None:
        per = cost.get("per_1k_frames") or {}
        if per:
            parts = ", ".join(f"{name} {value:.2f}" for name, value in sorted(per.items()) if name != "all")
            out(f"  cost           {per.get('all', 0.0):.2f} CPU s per 1,000 frames over the last "
                f"{cost.get('window_s', 0):.0f}s ({cost.get('window_frames', 0)} frames): {parts}")
        else:
            out(f"  cost           no frames processed in the last {cost.get('window_s', 0):.0f}s: no CPU s per "
                "1,000 frames yet")
    ro = st.get("rollout")
    if ro:
        if ro.get("mode") not in (None, "off"):
            share = f" {ro.get('share'):g}%" if ro.get("mode") == "canary" else ""
            out(f"  rollout        {ro['mode']}{share}: candidate v{ro.get('candidate')} vs champion "
                f"v{ro.get('champion')} (step {ro.get('step')}; {ro.get('running') or 'no controller running'}); "
                "stop: `mlpipe rollout kill`")
        else:
            out(f"  rollout        none (champion v{ro.get('champion') or '?'} answers every frame"
                + (f"; last kill: {ro['killed'].get('reason')}" if ro.get("killed") else "") + ")")
    out(f"  logs           {st.get('logs')}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlpipe stack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=None, help="state folder (default $MLPIPE_HOME or ./var)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up", help="start the stack (or what of it is down) and wait until healthy")
    u.add_argument("--services", default="all",
                   help=f"comma-separated services or groups ({', '.join(GROUPS)}; services: {', '.join(SERVICES)})")
    u.add_argument("--free-ports", action="store_true", help="pick free loopback ports instead of the defaults")
    u.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for every service to be healthy")
    d = sub.add_parser("down", help="stop the recorded services by PID")
    d.add_argument("--grace", type=float, default=STOP_GRACE_S, help="seconds between SIGTERM and SIGKILL")
    s = sub.add_parser("status", help="what runs, where, healthy or not, and the UI login")
    s.add_argument("--json", action="store_true")
    sub.add_parser("env", help="print shell exports (MLPIPE_*, AIRFLOW_*) to use the running stack")
    sv = sub.add_parser("supervise", help="restart crashed services with backoff (started by `up`; runs until `down`)")
    sv.add_argument("--initial-delay", type=float, default=Backoff.initial, help="seconds before the first restart")
    sv.add_argument("--max-delay", type=float, default=Backoff.maximum, help="longest delay (doubling up to it)")
    sv.add_argument("--max-restarts", type=int, default=Backoff.max_restarts,
                    help="restarts allowed within --window before the service is marked failed")
    sv.add_argument("--window", type=float, default=Backoff.window, help="seconds")
    sv.add_argument("--stable-after", type=float, default=Backoff.stable_after,
                    help="a run this long starts the delays over")
    sv.add_argument("--interval", type=float, default=0.5, help="seconds between checks")
    args = parser.parse_args(argv)
    from tasks.logs import setup_logging

    setup_logging(default_level="WARNING")
    home = Path(args.home or load_settings().home).resolve()
    if args.cmd == "supervise":
        def backoff() -> Backoff:
            return Backoff(initial=args.initial_delay, maximum=args.max_delay, max_restarts=args.max_restarts,
                           window=args.window, stable_after=args.stable_after)
        return Supervisor(home, backoff, interval=args.interval).run()
    try:
        if args.cmd == "up":
            spec = StackSpec.from_env(home=home, services=args.services, free_ports=args.free_ports,
                                      timeout=args.timeout)
            st = up(spec)
            _print_summary(st)
            down_services = [n for n, i in st["services"].items() if not i.get("healthy")]
            if down_services:
                print(f"error: not healthy: {', '.join(down_services)}; see the logs in {st['logs']}",
                      file=sys.stderr)
                return EXIT_FAILED
            return EXIT_OK
        if args.cmd == "down":
            down(home, grace=args.grace)
            return EXIT_OK
        if args.cmd == "status":
            st = status(home)
            if args.json:
                print(json.dumps(st, indent=2))
            elif not st["running"]:
                print(f"the mlpipe stack is not running (home {home}); start it with `make up`")
            else:
                _print_summary(st)
            return EXIT_OK if st["running"] else EXIT_FAILED
        state = read_state(home)
        if not state:
            print(f"error: the stack is not running (no {state_path(home)}); start it with `make up`", file=sys.stderr)
            return EXIT_FAILED
        spec = StackSpec(home=home, services=tuple(state["services"]), ports=state["ports"],
                         model=state.get("model", "digits"))
        env = stack_env(spec)
        for key in sorted(k for k in env if k.startswith(("MLPIPE_", "AIRFLOW_HOME", "AIRFLOW_CONFIG"))
                          and k != "MLPIPE_GATEWAY_TOKEN"):
            print(f"export {key}={env[key]}")
        return EXIT_OK
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
