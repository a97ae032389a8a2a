"""The local stack for daily use: ``make up`` / ``make down`` / ``make status``.

``up`` starts, on 127.0.0.1 only:

* ``broker``: Tansu, the Kafka-compatible broker (``mlpipe kafka broker``, memory storage);
* ``triton``: the bundled ``tritonserver`` (``python -m tasks.adapters.triton serve``) on the model
  repository ``$MLPIPE_HOME/triton/model_repository``, loading the deployed version if any;
* Airflow 3 as four processes on SQLite with small parallelism: ``api-server`` (UI + REST on
  :8080), ``scheduler``, ``dag-processor`` (new DAG files noticed within seconds) and
  ``triggerer`` (runs the drop-arrival watcher);
* ``consumer``: the streaming consumer (``mlpipe stream``), Triton's sidecar;
* ``gateway``: the ingest gateway (``mlpipe gateway``), bearer token generated once.

Every service is health-checked before ``up`` returns; its log is
``$MLPIPE_HOME/stack/logs/<service>.log``, its PID ``$MLPIPE_HOME/stack/pids/<service>.pid``
and the whole state (ports, PIDs, URLs) ``$MLPIPE_HOME/stack/stack.json``. A second ``up``
while the stack runs says so (and starts only what died); a port taken by another program is
named with the variable that moves it. ``down`` stops the services by the PIDs recorded
(SIGTERM, then SIGKILL after a grace period), children included; ``up`` again restarts them
with the same state (metadata DB, store, model repository, secrets).

Ports (environment variables): ``MLPIPE_AIRFLOW_PORT`` (8080), ``MLPIPE_TRITON_HTTP_PORT``
(8000), ``MLPIPE_TRITON_GRPC_PORT`` (8001), ``MLPIPE_TRITON_METRICS_PORT`` (8002),
``MLPIPE_KAFKA_PORT`` (9092), ``MLPIPE_CONSUMER_PORT`` (9108), ``MLPIPE_GATEWAY_PORT`` (8090),
``MLPIPE_SCHEDULER_HEALTH_PORT`` (8974); ``--free-ports`` picks free ones (tests).
The UI login is ``admin`` with the password Airflow's SimpleAuthManager generated
(``$MLPIPE_HOME/airflow/passwords.json``); ``up`` and ``status`` print it.

    mlpipe stack up [--services airflow,triton,...] [--free-ports]
    mlpipe stack status [--json]
    mlpipe stack down
    mlpipe stack env        # shell exports to talk to the running stack

This module never imports Airflow: it runs the ``airflow`` CLI and talks to the REST API
(``AirflowClient``: JWT from ``POST /auth/token``, ``/api/v2/...``).
"""

from __future__ import annotations

import argparse
import datetime as dt
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

from tasks.adapters.airflow import AirflowClient, AirflowError
from tasks.config import PROJECT_ROOT, load_settings
from tasks.local.procs import LOOPBACK, ManagedProcess, free_port, http_ok, port_open, proc_stat_fields
from tasks.adapters.storage import atomic_write

logger = logging.getLogger(__name__)

AIRFLOW_SERVICES = ("api-server", "scheduler", "dag-processor", "triggerer")
SERVICES = ("broker", "triton", *AIRFLOW_SERVICES, "consumer", "gateway")
GROUPS = {"airflow": AIRFLOW_SERVICES, "serving": ("broker", "triton", "consumer", "gateway"), "all": SERVICES}
#: port name -> (environment variable, default)
PORTS: dict[str, tuple[str, int]] = {
    "airflow": ("MLPIPE_AIRFLOW_PORT", 8080),
    "triton_http": ("MLPIPE_TRITON_HTTP_PORT", 8000),
    "triton_grpc": ("MLPIPE_TRITON_GRPC_PORT", 8001),
    "triton_metrics": ("MLPIPE_TRITON_METRICS_PORT", 8002),
    "kafka": ("MLPIPE_KAFKA_PORT", 9092),
    "consumer": ("MLPIPE_CONSUMER_PORT", 9108),
    "gateway": ("MLPIPE_GATEWAY_PORT", 8090),
    "scheduler_health": ("MLPIPE_SCHEDULER_HEALTH_PORT", 8974),
}
#: which ports a service listens on (checked before start)
SERVICE_PORTS = {
    "broker": ("kafka",), "triton": ("triton_http", "triton_grpc", "triton_metrics"),
    "api-server": ("airflow",), "scheduler": ("scheduler_health",), "consumer": ("consumer",),
    "gateway": ("gateway",),
}
ADMIN_USER = "admin"
STOP_GRACE_S = 20.0
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


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time in clock ticks) of a process, None when there is none."""
    rest = proc_stat_fields(pid)
    return None if rest is None else (rest[0], int(rest[1]), int(rest[19]))


def start_ticks(pid: int) -> int | None:
    st = _proc_stat(pid)
    return st[2] if st else None


def pid_alive(pid: int | None, ticks: int | None = None) -> bool:
    """The process exists, is not a zombie and (when ``ticks`` is given) is the one we started."""
    if not pid:
        return False
    st = _proc_stat(pid)
    if st is None or st[0] in ("Z", "X"):
        return False
    return ticks is None or st[2] == ticks


def descendants(pid: int) -> list[tuple[int, int]]:
    """(pid, start ticks) of every live descendant of ``pid`` (read from /proc)."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        st = _proc_stat(int(entry.name))
        if st is not None and st[0] not in ("Z", "X"):
            children.setdefault(st[1], []).append((int(entry.name), st[2]))
    out: list[tuple[int, int]] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child[0])
    return out


def _signal(pid: int, ticks: int | None, sig: int) -> None:
    if pid_alive(pid, ticks):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


# Processes started by this Python process: kept so they can be reaped (no zombies in tests).
_STARTED: dict[int, ManagedProcess] = {}


def _reap() -> None:
    for pid, mp in list(_STARTED.items()):
        if mp.proc is not None and mp.proc.poll() is not None:
            _STARTED.pop(pid, None)


def stop_pids(procs: Sequence[tuple[str, int, int | None]], grace: float = STOP_GRACE_S) -> dict[str, str]:
    """Stop processes we recorded, by PID: SIGTERM, wait up to ``grace``, then SIGKILL; descendants too.

    ``procs``: (name, pid, start ticks). Returns name -> "stopped" | "killed" | "not running".
    """
    result: dict[str, str] = {}
    tree: dict[str, list[tuple[int, int]]] = {}
    for name, pid, ticks in procs:
        if not pid_alive(pid, ticks):
            result[name] = "not running"
            continue
        tree[name] = descendants(pid)
        _signal(pid, ticks, signal.SIGTERM)
    deadline = time.monotonic() + grace
    pending = {name for name in tree}
    while pending and time.monotonic() < deadline:
        _reap()
        for name, pid, ticks in procs:
            if name in pending and not pid_alive(pid, ticks):
                pending.discard(name)
                result[name] = "stopped"
        if pending:
            time.sleep(0.1)
    for name, pid, ticks in procs:
        if name in pending:
            logger.warning("%s (pid %s) did not stop within %.0fs: SIGKILL", name, pid, grace)
            _signal(pid, ticks, signal.SIGKILL)
            result[name] = "killed"
    # Children left behind (worker processes, a server started in its own session): TERM, then KILL.
    left = [(p, t) for kids in tree.values() for p, t in kids if pid_alive(p, t)]
    for p, t in left:
        _signal(p, t, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while any(pid_alive(p, t) for p, t in left) and time.monotonic() < deadline:
        time.sleep(0.1)
    for p, t in left:
        _signal(p, t, signal.SIGKILL)
    _reap()
    for mp in list(_STARTED.values()):
        if mp.proc is not None and not pid_alive(mp.proc.pid):
            try:
                mp.proc.wait(timeout=1)
            except Exception:  # noqa: BLE001
                pass
    _reap()
    return result


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
        cfg = load_settings()
        home = Path(home or cfg.home).resolve()
        ports: dict[str, int] = {}
        for name, (var, default) in PORTS.items():
            if free_ports:
                ports[name] = free_port()
                continue
            raw = os.environ.get(var) or str(default)
            try:
                ports[name] = int(raw)
            except ValueError:
                raise StackError(f"{var}={raw!r} is not a port number") from None
            if not 1 <= ports[name] <= 65535:
                raise StackError(f"{var}={raw} is outside 1..65535")
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

    models = [model_repo.PREPROCESS, model_repo.POSTPROCESS]
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


def build_services(spec: StackSpec) -> dict[str, Service]:
    from tasks.adapters.kafka import broker_ready

    p = spec.ports
    logs = spec.log_dir
    af = _airflow()
    services = {
        "broker": Service("broker", [_py(), "-m", "tasks.cli", "broker", "--port", str(p["kafka"]),
                                     "--log-dir", str(logs), "--create-topics"],
                          lambda: port_open(p["kafka"]) and broker_ready(spec.kafka_bootstrap, timeout=1.0),
                          f"Kafka broker on {spec.kafka_bootstrap}"),
        "triton": Service("triton", [_py(), "-m", "tasks.cli", "triton", "serve", "--model-repository", str(spec.model_repo),
                                     "--log-dir", str(logs), "--backend-dir", str(spec.home / "triton" / "backends"),
                                     "--http-port", str(p["triton_http"]), "--grpc-port", str(p["triton_grpc"]),
                                     "--metrics-port", str(p["triton_metrics"]), "--timeout", "120",
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
    }
    return {name: services[name] for name in spec.services}


# --------------------------------------------------------------------------- status


def running_services(state: Mapping[str, Any] | None) -> dict[str, bool]:
    """Service -> alive (by the PID and start time recorded in the state)."""
    if not state:
        return {}
    return {name: pid_alive(info.get("pid"), info.get("start_ticks"))
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
                          "healthy": health.get(name) if check_health else None, "log": info.get("log")}
    return {
        "home": str(home), "running": any(alive.values()), "all_alive": bool(alive) and all(alive.values()),
        "started_at": state.get("started_at"), "urls": state.get("urls", {}), "ports": state.get("ports", {}),
        "login": {"user": state.get("admin_user", ADMIN_USER), "password": admin_password(home)},
        "services": services, "logs": str(stack_dir(home) / "logs"),
    }


def _safe(check: Callable[[], bool]) -> bool:
    try:
        return bool(check())
    except Exception:  # noqa: BLE001 - a failing health check is "not healthy"
        return False


# --------------------------------------------------------------------------- up / down


def up(spec: StackSpec, *, env: Mapping[str, str] | None = None, out: Callable[[str], None] = print) -> dict[str, Any]:
    """Start the services of ``spec`` that are not running and wait until all are healthy.

    Returns ``status()``. Raises StackError naming the service, its log and what to do when a port
    is taken by another program or a service does not become healthy (the services this call
    started are stopped again).
    """
    from tasks.local.airflow import ensure_db

    home = spec.home
    state = read_state(home)
    alive = running_services(state)
    if state and any(alive.values()):
        spec.ports = dict(state["ports"])  # keep talking to the running services on their ports
        spec.admin_user = state.get("admin_user", spec.admin_user)
        recorded = set(state.get("services", {}))
        wanted = set(spec.services) | {n for n, ok in alive.items() if ok}
        spec.services = tuple(s for s in SERVICES if s in wanted)
        missing = [s for s in spec.services if not alive.get(s)]
        if not missing:
            out(f"the mlpipe stack is already running (home {home}, started {state.get('started_at')}); "
                "nothing to do. `make down` stops it.")
            return settled_status(home, spec.timeout)
        out(f"the mlpipe stack is partly running; starting the services that are down: {', '.join(missing)}"
            + (f" (recorded but dead: {', '.join(sorted(recorded & set(missing)))})"
               if recorded & set(missing) else ""))
    else:
        missing = list(spec.services)

    # A port held by someone else: say which and how to move it (never fail on it later).
    taken = [(svc, port_name) for svc in missing for port_name in SERVICE_PORTS.get(svc, ())
             if port_open(spec.ports[port_name])]
    if taken:
        lines = [f"port {spec.ports[pn]} ({svc}) on {LOOPBACK} is in use by another program; stop it or set "
                 f"{PORTS[pn][0]} to a free port" for svc, pn in taken]
        raise StackError("; ".join(lines))

    run_env = stack_env(spec, env)
    spec.log_dir.mkdir(parents=True, exist_ok=True)
    spec.pid_dir.mkdir(parents=True, exist_ok=True)
    if "triton" in missing:
        from tasks.model import repo as model_repo

        model_repo.render_repo("local", spec.model_repo, spec.model)
    if set(missing) & set(AIRFLOW_SERVICES):
        out("preparing the Airflow metadata DB (SQLite)...")
        ensure_db(run_env)

    services = build_services(spec)
    state = dict(state or {}) if any(alive.values()) else {}
    state.update({"home": str(home), "ports": spec.ports, "urls": spec.urls(), "model": spec.model,
                  "admin_user": spec.admin_user})
    state.setdefault("started_at", dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    state.setdefault("services", {})
    started: list[tuple[str, int, int | None]] = []
    t0 = time.monotonic()
    try:
        # Dependencies first: the broker and Triton, then Airflow, the consumer and the gateway together.
        waves = [[s for s in ("broker", "triton") if s in missing],
                 [s for s in (*AIRFLOW_SERVICES, "consumer", "gateway") if s in missing]]
        for wave in waves:
            for name in wave:
                svc = services[name]
                log_path = spec.log_dir / f"{name}.log"
                with open(log_path, "ab") as fh:
                    fh.write(f"\n===== {dt.datetime.now(dt.timezone.utc).isoformat()} mlpipe stack: starting "
                             f"{name}: {' '.join(svc.argv)}\n".encode())
                mp = ManagedProcess(name, svc.argv, log_path, env=run_env, cwd=PROJECT_ROOT).start()
                assert mp.pid is not None
                _STARTED[mp.pid] = mp
                ticks = start_ticks(mp.pid)
                started.append((name, mp.pid, ticks))
                state["services"][name] = {"pid": mp.pid, "start_ticks": ticks, "argv": svc.argv,
                                           "log": str(log_path), "started_at": time.time()}
                atomic_write(spec.pid_dir / f"{name}.pid", f"{mp.pid}\n", mode=0o644)
                atomic_write(state_path(home), json.dumps(state, indent=2), mode=0o644)
                out(f"  started {name:<14} pid {mp.pid:<7} log {log_path}")
            _wait_healthy([services[n] for n in wave], state, spec, t0)
    except BaseException:
        if started:
            out("stopping the services started by this attempt...")
            stop_pids(started[::-1], grace=10)
            for name, _pid, _t in started:
                state["services"].pop(name, None)
                (spec.pid_dir / f"{name}.pid").unlink(missing_ok=True)
            if state["services"]:
                atomic_write(state_path(home), json.dumps(state, indent=2), mode=0o644)
            else:
                state_path(home).unlink(missing_ok=True)
        raise
    out(f"all {len(spec.services)} services healthy after {time.monotonic() - t0:.0f}s")
    return settled_status(home, spec.timeout)


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
            if not pid_alive(info["pid"], info.get("start_ticks")):
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
    """Stop the recorded services (all, or ``services``) by PID; returns name -> outcome."""
    home = Path(home or load_settings().home).resolve()
    state = read_state(home)
    if not state or not state.get("services"):
        out(f"the mlpipe stack is not running (no {state_path(home)})")
        return {}
    names = list(state["services"]) if services is None else list(parse_services(services, together=False))
    # Front to back: the gateway, the consumer and Airflow first (the consumer drains and commits while the
    # broker and Triton still run), then Triton and the broker.
    order = [s for s in ("gateway", "consumer", *AIRFLOW_SERVICES) if s in names], \
        [s for s in ("triton", "broker") if s in names]
    result: dict[str, str] = {}
    for wave in order:
        procs = [(n, state["services"][n]["pid"], state["services"][n].get("start_ticks"))
                 for n in wave if n in state["services"]]
        if procs:
            result.update(stop_pids(procs, grace=grace))
    for name in result:
        state["services"].pop(name, None)
        (stack_dir(home) / "pids" / f"{name}.pid").unlink(missing_ok=True)
        out(f"  {name:<14} {result[name]}")
    if state["services"]:
        atomic_write(state_path(home), json.dumps(state, indent=2), mode=0o644)
    else:
        state_path(home).unlink(missing_ok=True)
    return result


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
        out(f"  {name:<14} {flag:<8} pid {info.get('pid')}")
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    home = Path(args.home or load_settings().home).resolve()
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
