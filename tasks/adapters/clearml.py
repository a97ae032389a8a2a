"""Experiment tracking: the only module that talks to ClearML.

Offline by default: with no ``CLEARML_API_HOST`` (or ``CLEARML_OFFLINE_MODE=1``)
every run is written as a ClearML offline session (a folder plus a ``.zip``
that ``clearml-task``/``Task.import_offline_session`` can upload later) under
the ClearML cache folder, which is ``$CLEARML_CACHE_DIR`` when set, otherwise
``$MLPIPE_HOME/clearml/cache``. Nothing is written to ``~``.

With a server configured (``CLEARML_API_HOST``, ``CLEARML_API_ACCESS_KEY``,
``CLEARML_API_SECRET_KEY``, optionally ``CLEARML_WEB_HOST`` /
``CLEARML_FILES_HOST``) the server is probed first with a short timeout
(``MLPIPE_CLEARML_CONNECT_TIMEOUT``, default 3 s) and ClearML's HTTP retries
are lowered (its default retries an unreachable server for hours). An
unreachable or refusing server never blocks a pipeline step: the run falls
back to an offline session, logs a warning and says so in ``run.warning`` and
in the ``close()`` result.

Traps handled here (see STACK-NOTES): the reporter subprocess is turned off
(otherwise ``close()`` takes ~11 s); ``OutputModel.update_weights`` offline
needs the base model unlocked; ``Task.create`` is refused offline, so every
run is a ``Task.init`` main task (one open run per process). ClearML prints to
stdout; those prints are redirected to stderr so a CLI's stdout stays clean.

``clearml`` is imported inside functions only (the import takes ~1 s).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

logger = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = 3.0
# ClearML's HTTP retry policy when a server is configured: a few quick retries, then fail (and fall back).
HTTP_RETRIES = {
    "total": 2, "connect": 1, "read": 1, "redirect": 2, "status": 2,
    "backoff_factor": 0.5, "backoff_max": 4.0,
}

_AUTO_CACHE_DIR: str | None = None  # the CLEARML_CACHE_DIR value this module set (not the user's)
_OVERRIDES_SET = False  # ClearML re-parses all its config files on each set_overrides (~1 s): once per process
_ACTIVE: "TrackingRun | None" = None


class TrackingError(RuntimeError):
    """A tracking request that cannot be honoured (e.g. a second open run in one process)."""


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class TrackingConfig:
    offline: bool  # the configuration asks for offline mode
    api_host: str | None
    cache_dir: Path
    connect_timeout: float


def tracking_config() -> TrackingConfig:
    """The tracking configuration (``load_settings().clearml``, read at call time)."""
    from tasks.config import load_settings

    settings = load_settings()
    cl = settings.clearml
    api_host = cl.api_host
    offline = cl.offline
    if cl.cache_dir is not None and str(cl.cache_dir) != _AUTO_CACHE_DIR:
        cache_dir = cl.cache_dir
    else:
        cache_dir = settings.home / "clearml" / "cache"
    timeout = cl.connect_timeout
    return TrackingConfig(offline=offline, api_host=api_host, cache_dir=cache_dir.resolve(),
                          connect_timeout=max(0.1, timeout))


def server_reachable(api_host: str, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> tuple[bool, str]:
    """Probe the ClearML API server (``GET <host>/debug.ping``) once, with ``timeout`` seconds.

    Any HTTP answer counts as reachable (authentication is checked by ClearML
    itself); a refused connection, a timeout or a bad URL does not.
    """
    url = api_host.rstrip("/") + "/debug.ping"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - configured server URL
            return True, f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        return True, f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"{type(reason).__name__}: {reason}" if not isinstance(reason, str) else reason


def _prepare_clearml(cfg: TrackingConfig, offline: bool) -> None:
    """Point ClearML's folders under our home, set its overrides and the offline switch."""
    global _AUTO_CACHE_DIR, _OVERRIDES_SET
    cfg.cache_dir.mkdir(parents=True, exist_ok=True)
    cache = str(cfg.cache_dir)
    if os.environ.get("CLEARML_CACHE_DIR", "") in ("", _AUTO_CACHE_DIR):
        os.environ["CLEARML_CACHE_DIR"] = cache
        _AUTO_CACHE_DIR = cache
    os.environ.setdefault("CLEARML_NO_DEFAULT_SERVER", "1")

    from clearml import Task
    from clearml.config import config_obj
    from clearml.config.cache import SessionCache

    # ClearML keeps a "last task" cache in ~/.clearml: keep it beside the cache instead.
    SessionCache.SESSION_CACHE_FOLDER = str(cfg.cache_dir / "session")
    if not _OVERRIDES_SET:
        # The cache folder itself comes from CLEARML_CACHE_DIR (read by ClearML at each use).
        config_obj.set_overrides({
            "api": {"http": {"retries": dict(HTTP_RETRIES), "wait_on_maintenance_forever": False}},
            "sdk": {
                "development": {
                    "report_use_subprocess": False,  # else close() waits ~11 s for the reporter process
                    "log_os_environments": [],
                    "store_uncommitted_code_diff": False,
                },
            },
        })
        _OVERRIDES_SET = True
    Task.set_offline(offline)


@contextlib.contextmanager
def _keep_offline_env() -> Iterator[None]:
    """``Task.set_offline`` writes CLEARML_OFFLINE_MODE into os.environ; restore the user's value so a
    fallback to offline for one run does not make every later run in this process offline too."""
    keys = ("CLEARML_OFFLINE_MODE", "TRAINS_OFFLINE_MODE")
    saved = {k: os.environ.get(k) for k in keys}
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """ClearML prints progress to stdout; keep a CLI's stdout for its own result."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


# --------------------------------------------------------------------------- runs


@dataclass
class TrackingRun:
    """One ClearML task (online or an offline session). Create it with ``start_run``."""

    task: Any
    task_id: str
    offline: bool
    project: str
    name: str
    warning: str | None = None
    offline_folder: str | None = None
    closed: bool = False
    model_ids: list[str] = field(default_factory=list)

    # -- metrics and parameters
    def log_metric(self, title: str, series: str, value: float, step: int) -> None:
        """One scalar point (``title``/``series`` at iteration ``step``)."""
        self._check_open()
        value = float(value)
        if math.isnan(value):
            logger.debug("skipping NaN metric %s/%s at step %s", title, series, step)
            return
        self.task.get_logger().report_scalar(title=str(title), series=str(series), value=value, iteration=int(step))

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Several scalars: key ``"title/series"`` (or ``"name"``, used as both)."""
        for key, value in metrics.items():
            if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            title, _, series = str(key).partition("/")
            self.log_metric(title, series or title, value, step)

    def log_params(self, params: Mapping[str, Any], name: str = "params") -> None:
        self._check_open()
        self.task.connect(_flat_params(params), name=name)

    def log_single_values(self, values: Mapping[str, Any]) -> None:
        """Summary numbers shown in the task's single-value table (e.g. final accuracy)."""
        self._check_open()
        lg = self.task.get_logger()
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(float(value)):
                lg.report_single_value(str(key), float(value))

    def log_configuration(self, name: str, obj: Mapping[str, Any]) -> None:
        self._check_open()
        self.task.connect_configuration(dict(obj), name=name)

    # -- files
    def upload_model(self, path: str | Path, name: str, tags: Iterable[str] = (),
                     metadata: Mapping[str, Any] | None = None, publish: bool = False) -> str:
        """Register ``path`` as an output model of this task; returns the ClearML model id."""
        from clearml import OutputModel

        self._check_open()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        framework = "ONNX" if path.suffix == ".onnx" else ("PyTorch" if path.suffix in {".pt", ".pth"} else None)
        with _stdout_to_stderr():
            model = OutputModel(task=self.task, name=name, tags=[str(t) for t in tags], framework=framework)
            if self.offline:
                model._get_base_model().locked = False  # offline update_weights needs this (STACK-NOTES)
            model.update_weights(weights_filename=str(path), auto_delete_file=False, async_enable=False)
            for key, value in (metadata or {}).items():
                try:
                    model.set_metadata(str(key), str(value), v_type=type(value).__name__)
                except Exception as exc:  # noqa: BLE001 - metadata is decoration
                    logger.debug("model metadata %s not set: %s", key, exc)
            if publish and not self.offline:
                model.publish()
        model_id = str(model.id)
        self.model_ids.append(model_id)
        logger.info("ClearML model %s (%s) <- %s", model_id, name, path.name)
        return model_id

    def log_artifact(self, name: str, path: str | Path) -> None:
        """Attach a file (metrics.json, curves.png...) to the task."""
        self._check_open()
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"artifact file not found: {path}")
        with _stdout_to_stderr():
            ok = self.task.upload_artifact(name=name, artifact_object=path, wait_on_upload=True)
        if ok is False:
            raise TrackingError(f"ClearML refused artifact {name!r} ({path})")

    # -- end
    def close(self) -> dict[str, Any]:
        """Close the task; returns ``task_id``, ``offline`` and, offline, ``offline_session`` (the zip)."""
        global _ACTIVE
        info: dict[str, Any] = {"task_id": self.task_id, "offline": self.offline, "project": self.project,
                                "name": self.name, "model_ids": list(self.model_ids)}
        if self.warning:
            info["warning"] = self.warning
        if self.closed:
            return self._session_info(info)
        try:
            with _stdout_to_stderr():
                self.task.close()
        finally:
            self.closed = True
            if _ACTIVE is self:
                _ACTIVE = None
        if not self.offline:
            try:
                info["web_url"] = self.task.get_output_log_web_page()
            except Exception:  # noqa: BLE001 - a URL is a convenience
                pass
        return self._session_info(info)

    def _session_info(self, info: dict[str, Any]) -> dict[str, Any]:
        if self.offline and self.offline_folder:
            info["offline_folder"] = self.offline_folder
            zip_path = Path(self.offline_folder + ".zip")
            info["offline_session"] = str(zip_path) if zip_path.is_file() else self.offline_folder
        return info

    def _check_open(self) -> None:
        if self.closed:
            raise TrackingError(f"ClearML task {self.task_id} is closed")

    def __enter__(self) -> "TrackingRun":
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.closed:
            self.close()


def _flat_params(params: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, Mapping):
            value = str(dict(value))
        elif value is not None and not isinstance(value, (str, int, float, bool)):
            value = str(value)
        out[str(key)] = value
    return out


def active_run() -> TrackingRun | None:
    """The run currently open in this process, if any."""
    return _ACTIVE if _ACTIVE is not None and not _ACTIVE.closed else None


def _init_task(project: str, name: str, task_type: str) -> Any:
    from clearml import Task

    with _stdout_to_stderr():
        return Task.init(
            project_name=project,
            task_name=name,
            task_type=getattr(Task.TaskTypes, task_type, Task.TaskTypes.custom),
            reuse_last_task_id=False,
            continue_last_task=False,
            auto_connect_frameworks=False,  # no patching of torch.save / onnx
            auto_connect_arg_parser=False,
            auto_connect_streams=False,  # keep our logging ours
            auto_resource_monitoring=False,
        )


def start_run(project: str, name: str, params: Mapping[str, Any] | None = None, tags: Iterable[str] = (),
              task_type: str = "training") -> TrackingRun:
    """Open a ClearML task (online if configured and reachable, else an offline session)."""
    global _ACTIVE
    if active_run() is not None:
        raise TrackingError(
            f"a ClearML run is already open in this process ({_ACTIVE.task_id}); close it before starting another"
        )
    cfg = tracking_config()
    warning = None
    offline = cfg.offline
    if not offline:
        assert cfg.api_host is not None
        ok, why = server_reachable(cfg.api_host, cfg.connect_timeout)
        if not ok:
            warning = (f"ClearML server {cfg.api_host} unreachable ({why}) within {cfg.connect_timeout:g}s; "
                       "logging to an offline session instead")
            logger.warning(warning)
            offline = True

    with _keep_offline_env():
        try:
            _prepare_clearml(cfg, offline)  # going online re-connects ClearML's sessions: may fail too
            task = _init_task(project, name, task_type)
        except Exception as exc:  # noqa: BLE001 - a refusing server must not stop the step
            if offline:
                raise
            warning = f"ClearML server {cfg.api_host} refused the run ({exc}); logging to an offline session instead"
            logger.warning(warning)
            offline = True
            _prepare_clearml(cfg, offline)
            task = _init_task(project, name, task_type)

    run = TrackingRun(task=task, task_id=str(task.id), offline=offline, project=project, name=name,
                      warning=warning)
    if offline:
        try:
            run.offline_folder = str(task.get_offline_mode_folder())
        except Exception:  # noqa: BLE001
            run.offline_folder = None
    _ACTIVE = run
    try:
        tags = [str(t) for t in tags if str(t)]
        if tags:
            task.add_tags(tags)
        if params:
            run.log_params(params)
    except Exception:
        run.close()
        raise
    logger.info("ClearML task %s (%s) %s", run.task_id, name,
                f"offline session in {run.offline_folder}" if offline else f"on {cfg.api_host}")
    return run


# --------------------------------------------------------------------------- registry mirror


@contextlib.contextmanager
def _registry_run(name: str, params: Mapping[str, Any], tags: Iterable[str]) -> Iterator[tuple[TrackingRun, bool,
                                                                                              dict[str, Any]]]:
    """The run a registry mirror records on: the one open in this process (``nested`` True), else a new
    ``custom`` task that is closed afterwards, its offline session path put into ``closed`` then."""
    from tasks.config import load_settings

    current = active_run()
    run = current or start_run(load_settings().clearml.project, name, params, tags=tags, task_type="custom")
    closed: dict[str, Any] = {}
    try:
        yield run, current is not None, closed
    except Exception:
        if current is None:
            run.close()
        raise
    if current is None:
        info = run.close()
        if "offline_session" in info:
            closed["offline_session"] = info["offline_session"]


def mirror_model_version(model_name: str, version: int, stage: str, metrics: Mapping[str, Any],
                         lineage: Mapping[str, Any], onnx_path: str | Path | None = None) -> dict[str, Any]:
    """Mirror a registry version to ClearML: a ``custom`` task with the lineage and metrics,
    and (with ``onnx_path``) an output model named ``model_name`` tagged ``v<version>`` and
    ``<stage>`` (published on a server when the stage is ``production``).

    The object store stays the registry of record (model queries do not work offline).
    Returns ``task_id``, ``model_id``, ``offline``, ``offline_session`` (offline), ``warning``.
    If a run is already open in this process, the version is recorded on that run.
    """
    params = {"model": model_name, "version": int(version), "stage": stage}
    tags = ("registry", model_name, f"v{version}", stage)
    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    with _registry_run(f"{model_name} v{version} [{stage}]", params, tags) as (run, current, closed):
        if current:
            run.log_params(params, name=f"registry_{model_name}_v{version}")
        run.log_configuration(f"lineage_v{version}" if current else "lineage", lineage)
        run.log_configuration(f"metrics_v{version}" if current else "metrics", dict(metrics))
        run.log_single_values({f"{k}" if not current else f"v{version}/{k}": v for k, v in numeric.items()})
        model_id = None
        if onnx_path is not None:
            model_id = run.upload_model(onnx_path, model_name, tags=(f"v{version}", stage, "registry"),
                                        metadata={"version": int(version), "stage": stage,
                                                  **{k: numeric[k] for k in list(numeric)[:20]}},
                                        publish=stage == "production")
        result: dict[str, Any] = {
            "task_id": run.task_id, "model_id": model_id, "offline": run.offline,
            "model": model_name, "version": int(version), "stage": stage,
        }
        if run.warning:
            result["warning"] = run.warning
    result.update(closed)
    logger.info("mirrored %s v%s (%s) to ClearML task %s", model_name, version, stage, run.task_id)
    return result


STAGE_TAGS = ("candidate", "production", "rejected", "archived")


def mirror_stage_change(model_name: str, version: int, stage: str, previous: str | None, reason: str,
                        model_id: str | None = None) -> dict[str, Any]:
    """Mirror a registry stage change to ClearML.

    A ``custom`` task ``<model> v<version> [<previous> -> <stage>]`` tagged ``registry``, the model,
    ``v<version>``, ``stage-change`` and the new stage, with the change as its parameters; for
    ``archived``/``rejected`` the task is archived (ClearML's ``archived`` system tag). On a server, the
    version's model (``model_id``, from the registration mirror) gets the new stage as its stage tag,
    is published on ``production`` and archived on ``archived``/``rejected``. Offline, model queries do
    not work: the result says so (``model_updated: False``) and the session records the change.
    Returns ``task_id``, ``offline``, ``stage``, ``previous``, ``archived``, ``published``,
    ``model_updated`` and ``offline_session`` (offline).
    """
    params = {"model": model_name, "version": int(version), "stage": stage, "previous_stage": previous or "",
              "reason": reason}
    tags = ("registry", model_name, f"v{version}", "stage-change", stage)
    archive = stage in ("archived", "rejected")
    result: dict[str, Any] = {"model": model_name, "version": int(version), "stage": stage, "previous": previous,
                              "archived": False, "published": False, "model_updated": False}
    with _registry_run(f"{model_name} v{version} [{previous} -> {stage}]", params, tags) as (run, current, closed):
        if current:
            run.log_params(params, name=f"registry_{model_name}_v{version}_{stage}")
        elif archive:  # Task.set_archived fails offline (no system tags yet): set ClearML's archived tag itself
            tags_now = list(run.task.get_system_tags() or [])
            run.task.set_system_tags(tags_now + [t for t in ("archived",) if t not in tags_now])
            result["archived"] = True
        if model_id and not run.offline:
            from clearml import Model

            m = Model(model_id=model_id)
            m.tags = [t for t in (m.tags or []) if t not in STAGE_TAGS] + [stage]
            if stage == "production" and not m.published:
                m.publish()
                result["published"] = True
            if archive:
                m.archive()
                result["archived"] = True
            result["model_updated"] = True
        result.update(task_id=run.task_id, offline=run.offline)
        if run.offline and stage == "production":
            result["publish"] = "not possible in an offline session: publish when the session is imported"
    result.update(closed)
    logger.info("mirrored the stage change of %s v%s (%s -> %s) to ClearML task %s", model_name, version,
                previous, stage, run.task_id)
    return result
