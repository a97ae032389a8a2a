"""The model registry of record: manifests in the object store, mirrored to ClearML.

Layout (see docs/CONTRACTS.md)::

    models/<model>/<version>/version.json   version, stage, metrics, lineage, spec, history
    models/<model>/<version>/model.onnx     + model.pt, metrics.json, lineage.json, curves.png
    models/<model>/_events/<ts>-<id>.json   one object per registry event
    models/<model>/_claims/...              run and version-number claims (exclusive creates)

(the keys: tasks/contracts/layout.py). Stages: ``candidate`` -> ``production`` | ``rejected``;
``production`` -> ``archived``. Registering the same training run twice returns the same version
(idempotent, also when done concurrently); concurrent registrations of different runs get distinct
version numbers without gaps. The registry is the only writer of ``version.json``: other steps go
through ``update_version`` / ``record_artifact`` / ``set_stage`` (compare-and-swap writes). Every
stage change is an event and is mirrored to ClearML.

A version is built for one model spec (``models/<model>/spec.yaml``, ``Settings.model_spec``): at
register the run's ``model.onnx`` must be that spec's ONNX contract
(``tasks.model.networks.check_onnx_contract``; a mismatch is rejected, naming the tensor and the
expected shape), and ``version.json`` ``spec`` records the spec's name and the sha256 of its file,
so QC and deploy can tell which spec a version was built for.

CLI: ``mlpipe registry {register,list,show,stage,champion} --help``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

from tasks.config import PROJECT_ROOT, load_settings
from tasks.contracts import layout
from tasks.contracts.errors import BadInput, Transient, run_cli
from tasks.contracts.files import sha256_file
from tasks.contracts.spec import SPEC_FILE, ModelSpec
from tasks.logs import setup_logging
from tasks.adapters.storage import ObjectNotFound, Store, StoreError, open_store
from tasks.contracts.results import write_result_json

logger = logging.getLogger(__name__)

STAGES = ("candidate", "production", "rejected", "archived")
RUN_FILES = (layout.MODEL_ONNX, layout.MODEL_PT, layout.METRICS, layout.CURVES)
CLAIM_WAIT_S = 300.0  # how long a second registration of the same run waits for the first
STALE_CLAIM_S = 1800.0  # a run claim older than this is left over from a killed process: taken over


class RegistryError(BadInput, ValueError):
    """A registry request that cannot be satisfied (unknown version, bad stage...): bad input, final."""


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class RegistryConflict(Transient, RuntimeError):
    """Concurrent writers kept changing a version manifest (or a run claim was held too long): retry."""


def _prefix(model: str, version: int | None = None) -> str:
    return layout.model_prefix(model) if version is None else layout.version_prefix(model, version)


def code_version() -> str:
    """The git commit of the code that runs (or MLPIPE_CODE_VERSION in an image)."""
    env = load_settings().code_version
    if env:
        return env
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def list_versions(store: Store, model: str) -> list[int]:
    return sorted(int(n) for n in store.list_dirs(_prefix(model).rstrip("/")) if n.isdigit())


def get_version(store: Store, model: str, version: int) -> dict[str, Any]:
    try:
        return store.get_json(layout.version_manifest_key(model, version))
    except ObjectNotFound:
        known = list_versions(store, model)
        raise RegistryError(
            f"model {model!r} has no version {version} (known versions: {known or 'none'})"
        ) from None


def all_versions(store: Store, model: str) -> list[dict[str, Any]]:
    out = []
    for v in list_versions(store, model):
        try:
            out.append(get_version(store, model, v))
        except RegistryError:
            continue  # a version being written (no version.json yet)
    return out


def champion(store: Store, model: str) -> dict[str, Any] | None:
    """The version currently in stage ``production`` (None before the first deploy)."""
    prod = [v for v in all_versions(store, model) if v.get("stage") == "production"]
    return max(prod, key=lambda v: v["version"]) if prod else None


#: Airflow's task runner exports these (``AIRFLOW_CTX_*``) to every task process; a step run by the local
#: operator inherits them. Recorded on each registry event as ``airflow``.
AIRFLOW_CONTEXT_VARS = {"dag_id": "AIRFLOW_CTX_DAG_ID", "run_id": "AIRFLOW_CTX_DAG_RUN_ID",
                        "task_id": "AIRFLOW_CTX_TASK_ID", "try_number": "AIRFLOW_CTX_TRY_NUMBER"}


def airflow_context() -> dict[str, str] | None:
    """The Airflow DAG run, task and try this process runs for (None outside Airflow)."""
    ctx = {k: os.environ[v] for k, v in AIRFLOW_CONTEXT_VARS.items() if os.environ.get(v)}
    return ctx if ctx.get("run_id") else None


def record_event(store: Store, model: str, event: str, *, at: dt.datetime | None = None,
                 **fields: Any) -> dict[str, Any]:
    """Record one registry event. ``at`` (default now, UTC) is for a history recorded elsewhere and
    imported (and for tests that build one): it sets both the body's ``at`` and the key's time stamp."""
    when = dt.datetime.now(dt.timezone.utc) if at is None else _utc(at)
    body = {"event": event, "model": model, "at": when.isoformat(timespec="seconds"), **fields}
    if "airflow" not in body and airflow_context():
        body["airflow"] = airflow_context()  # which DAG run did this: the lineage and `mlpipe audit` show it
    stamp = when.strftime("%Y%m%dT%H%M%S%fZ")
    store.put_json(layout.event_key(model, stamp, uuid.uuid4().hex[:8]), body)
    logger.info("registry event %s: %s", event, json.dumps(fields, default=str, sort_keys=True))
    return body


def events(store: Store, model: str, *, since: dt.datetime | None = None,
           until: dt.datetime | None = None) -> list[dict[str, Any]]:
    """The registry events of ``model``, oldest first (keys sort by their UTC time stamp).

    ``since`` / ``until`` (aware datetimes; naive ones are taken as UTC) keep the events recorded in
    ``[since, until]``: the filter reads the time stamp in each key, so events outside the window are
    never fetched (``mlpipe audit`` asks for one window of a long history)."""
    keys = [k for k in store.list(layout.events_prefix(model)) if k.endswith(".json")]
    if since is not None or until is not None:
        lo, hi = (None if t is None else _utc(t) for t in (since, until))
        keys = [k for k in keys if _in_window(_event_time(k), lo, hi)]
    return [store.get_json(k) for k in keys]


def _utc(at: dt.datetime) -> dt.datetime:
    """``at`` in UTC (a naive time is taken as UTC)."""
    return (at if at.tzinfo else at.replace(tzinfo=dt.timezone.utc)).astimezone(dt.timezone.utc)


def _event_time(key: str) -> dt.datetime | None:
    """The UTC time in an event key (``_events/<%Y%m%dT%H%M%S%fZ>-<id>.json``; None if it has none)."""
    stamp = key.rsplit("/", 1)[-1].split("-", 1)[0]
    try:
        return dt.datetime.strptime(stamp, "%Y%m%dT%H%M%S%fZ").replace(tzinfo=dt.timezone.utc)
    except ValueError:
        return None


def _in_window(at: dt.datetime | None, lo: dt.datetime | None, hi: dt.datetime | None) -> bool:
    return at is not None and (lo is None or at >= lo) and (hi is None or at <= hi)


def _drop_lineage(store: Store, drop_id: str, model: str) -> dict[str, Any]:
    """The lineage entry of a drop: the digests of the content its passing validation (for ``model``)
    checked, after checking that the drop still is that content. Raises ``DropChanged`` (rejected) naming
    the drop and what changed, ``RegistryError`` for a drop without a passing validation for ``model``."""
    from tasks.steps import drops

    try:
        validated = drops.verify_validated(store, drop_id, model=model)
    except drops.DropChanged as exc:  # rejected, like train's refusal (exit EXIT_REJECTED, no retry)
        raise drops.DropChanged(f"refusing to register: {exc}") from None
    except drops.DropNotValidated as exc:
        raise RegistryError(f"refusing to register: drops [{drop_id!r}] have no passing validation result "
                            f"for model {model!r} bound to their content ({exc})") from None
    except drops.DropError as exc:
        raise RegistryError(f"refusing to register: {exc}") from None
    assert validated is not None
    return {
        "drop_id": drop_id,
        "manifest_sha256": validated["manifest_sha256"],
        "images_sha256": validated["images_sha256"],
        "image_count": validated["image_count"],
        "validation": {
            "success": True,
            "validated_at": validated["validated_at"],
            "result_uri": validated["result_uri"],
            "report_uri": validated["report_uri"],
        },
    }


def spec_record(spec: ModelSpec) -> dict[str, str]:
    """What ``version.json`` ``spec`` records of the model spec a version is built for: its name and the
    sha256 of its file (``$MLPIPE_MODELS_DIR/<name>/spec.yaml``)."""
    return {"name": spec.name, "sha256": sha256_file(load_settings().models_dir / spec.name / SPEC_FILE)}


def _check_run_onnx(store: Store, run_id: str, spec: ModelSpec) -> None:
    """Raise ``OnnxContractError`` (rejected) unless the run's ``model.onnx`` is ``spec``'s ONNX contract."""
    from tasks.model.networks import OnnxContractError, check_onnx_contract

    with tempfile.TemporaryDirectory(prefix="mlpipe-register-") as tmp:
        path = store.get_file(layout.run_file_key(run_id, layout.MODEL_ONNX), Path(tmp) / layout.MODEL_ONNX)
        try:
            check_onnx_contract(path, spec)
        except OnnxContractError as exc:
            raise OnnxContractError(f"refusing to register run {run_id!r} ({store.uri(layout.run_prefix(run_id))}) "
                                    f"as {spec.name!r}: {exc}; export the model as the spec's onnx section and "
                                    f"input/classes/embedding_dim say") from None


def _version_claims(store: Store, model: str) -> dict[int, str]:
    """version number -> the run id it was claimed for (``models/<m>/_claims/versions/<v>.json``)."""
    prefix = layout.version_claims_prefix(model)
    out: dict[int, str] = {}
    for key in store.list(prefix):
        name = key[len(prefix):]
        if name.endswith(".json") and name[:-len(".json")].isdigit():
            try:
                out[int(name[:-len(".json")])] = str(store.get_json(key).get("run_id"))
            except (ObjectNotFound, StoreError):
                continue
    return out


def _registered(store: Store, model: str, run_id: str) -> dict[str, Any] | None:
    """The complete version of ``run_id``, if it has one."""
    for version, claimed_by in sorted(_version_claims(store, model).items()):
        if claimed_by == run_id:
            try:
                return get_version(store, model, version)
            except RegistryError:
                return None  # claimed, not complete yet
    for existing in all_versions(store, model):  # versions registered before version claims existed
        if existing.get("run_id") == run_id:
            return existing
    return None


def register(store: Store, model: str, run_id: str, drop_ids: Sequence[str], *,
             clearml_task_id: str | None = None, mirror: bool = True,
             wait_s: float = CLAIM_WAIT_S, stale_s: float = STALE_CLAIM_S) -> dict[str, Any]:
    """Register the training run ``runs/<run_id>/`` as a new ``candidate`` version.

    Idempotent and safe under concurrency, on a local store and on S3 alike: registering one run
    from N processes at once gives one version (one process registers it, the others wait up to
    ``wait_s`` for it and return it); N different runs at once get N distinct version numbers with
    no gaps. Both rest on exclusive creates (``Store.put_if_absent``): the run claim
    ``models/<m>/_claims/runs/<run_id>.json`` (deleted when done; one older than ``stale_s`` is
    taken over) and the version-number claim ``models/<m>/_claims/versions/<v>.json`` (kept: a retry
    after a crash reuses its number). Every drop must still be the content its passing validation
    checked (``tasks.steps.drops.verify_validated``); the lineage records the digests.

    The run's ``model.onnx`` must be the ONNX contract of the model spec of ``model``
    (``load_settings().model_spec(model)``: ``SpecError``, bad input, when there is none); otherwise
    ``OnnxContractError`` (rejected) names the tensor and the expected shape, and nothing is claimed.
    """
    run_prefix = layout.run_prefix(run_id)
    try:
        metrics = store.get_json(layout.run_file_key(run_id, layout.METRICS))
    except ObjectNotFound:
        raise RegistryError(f"training run {run_id!r} not found: no {run_prefix}metrics.json in {store.url}") from None
    if not store.exists(layout.run_file_key(run_id, layout.MODEL_ONNX)):
        raise RegistryError(f"training run {run_id!r} has no model.onnx in {store.url}/{run_prefix}")

    # Idempotency: the same run registered again is the same version.
    existing = _registered(store, model, run_id)
    if existing is not None:
        logger.info("run %s is already registered as %s v%s", run_id, model, existing["version"])
        return existing

    spec = load_settings().model_spec(model)
    _check_run_onnx(store, run_id, spec)  # refuses before anything is claimed
    lineage_drops = [_drop_lineage(store, d, model) for d in drop_ids]

    claim_key = layout.run_claim_key(model, run_id)
    deadline = time.monotonic() + wait_s
    while not store.put_json_if_absent(claim_key, {"run_id": run_id, "at": _now(), "epoch": time.time(),
                                                   "pid": os.getpid()}):
        existing = _registered(store, model, run_id)
        if existing is not None:  # another process registered it while we waited
            logger.info("run %s was registered concurrently as %s v%s", run_id, model, existing["version"])
            return existing
        try:
            held = store.get_json(claim_key)
        except (ObjectNotFound, StoreError):
            continue  # released a moment ago: try again
        if time.time() - float(held.get("epoch") or 0) > stale_s:
            logger.warning("taking over the stale registration claim of run %s (%s, since %s)", run_id,
                           store.uri(claim_key), held.get("at"))
            store.delete(claim_key)
            continue
        if time.monotonic() > deadline:
            raise RegistryConflict(f"run {run_id!r} is being registered by another process (claim "
                                   f"{store.uri(claim_key)} since {held.get('at')}); waited {wait_s:g}s: retry")
        time.sleep(random.uniform(0.02, 0.1))
    try:
        existing = _registered(store, model, run_id)  # registered between our first look and our claim
        if existing is not None:
            return existing
        return _write_version(store, model, run_id, drop_ids, metrics, lineage_drops, spec_record(spec),
                              clearml_task_id, mirror)
    finally:
        store.delete(claim_key)


def _write_version(store: Store, model: str, run_id: str, drop_ids: Sequence[str], metrics: dict[str, Any],
                   lineage_drops: list[dict[str, Any]], spec: dict[str, str], clearml_task_id: str | None,
                   mirror: bool) -> dict[str, Any]:
    """Claim a version number and write the version; called while holding the run claim."""
    parent = champion(store, model)
    lineage = {
        "drops": lineage_drops,
        "training_run_id": run_id,
        "clearml_task_id": clearml_task_id or metrics.get("clearml_task_id"),
        "code_version": code_version(),
        "parent_champion": None if parent is None else parent["version"],
    }
    version = _claim_version(store, model, run_id)
    prefix = _prefix(model, version)
    for name in RUN_FILES:
        src = layout.run_file_key(run_id, name)
        if store.exists(src):
            store.put_bytes(prefix + name, store.get_bytes(src))
    store.put_json(layout.version_file_key(model, version, layout.METRICS), metrics)
    store.put_json(layout.version_file_key(model, version, layout.LINEAGE), lineage)
    manifest = {
        "model": model,
        "version": version,
        "stage": "candidate",
        "created_at": _now(),
        "run_id": run_id,
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))},
        "lineage": lineage,
        "spec": spec,
        "files": {name: store.uri(prefix + name) for name in RUN_FILES if store.exists(prefix + name)},
        "history": [{"stage": "candidate", "at": _now(), "reason": "registered"}],
    }
    if mirror:
        manifest["clearml"] = _mirror(model, version, "candidate", manifest["metrics"], lineage, store, prefix)
    # written last: the version is complete. Exclusive: a second writer of this number is a bug, never silent.
    if not store.put_json_if_absent(layout.version_manifest_key(model, version), manifest):
        raise RegistryConflict(f"{model} v{version} already has a version manifest: its number was claimed twice")
    record_event(store, model, "register", version=version, run_id=run_id, drops=list(drop_ids),
                 stage="candidate", spec=spec)
    return manifest


def _claim_version(store: Store, model: str, run_id: str) -> int:
    """The version number of ``run_id``: the one claimed for it before (a retry after a crash), else
    the next free one, claimed by an exclusive create (losers of a race move to the next number)."""
    claims = _version_claims(store, model)
    mine = sorted(v for v, r in claims.items() if r == run_id)
    if mine:
        return mine[0]
    version = max([*claims, *list_versions(store, model)], default=0) + 1
    for _ in range(10_000):
        if store.put_json_if_absent(layout.version_claim_key(model, version), {"run_id": run_id, "at": _now()}):
            return version
        version += 1
    raise RegistryConflict(f"could not claim a version number for {model} (concurrent registrations?)")


def _mirror(model: str, version: int, stage: str, metrics: dict, lineage: dict, store: Store, prefix: str) -> dict:
    """Mirror the version to ClearML (offline session by default). Failures are recorded, not fatal:
    the object store stays the registry of record."""
    try:
        from tasks.adapters import clearml as tracking

        onnx_local = None
        if store.exists(prefix + layout.MODEL_ONNX):
            tmp = load_settings().home / "tmp" / f"{model}-{version}-{uuid.uuid4().hex[:6]}.onnx"
            onnx_local = store.get_file(prefix + layout.MODEL_ONNX, tmp)
        return tracking.mirror_model_version(model, version, stage, metrics, lineage, onnx_path=onnx_local)
    except Exception as exc:  # noqa: BLE001 - the mirror must never lose the registration
        logger.warning("ClearML mirror of %s v%s failed: %s", model, version, exc)
        return {"error": str(exc)}


def _mirror_stage(model: str, version: int, stage: str, previous: str | None, reason: str,
                  model_id: str | None) -> dict:
    """Mirror a stage change to ClearML; a failure is recorded in the event, never fatal."""
    try:
        from tasks.adapters import clearml as tracking

        return tracking.mirror_stage_change(model, version, stage, previous, reason, model_id=model_id)
    except Exception as exc:  # noqa: BLE001 - the store stays the registry of record
        logger.warning("ClearML mirror of the stage change %s v%s -> %s failed: %s", model, version, stage, exc)
        return {"error": str(exc)}


def update_version(store: Store, model: str, version: int,
                   change: Callable[[dict[str, Any]], dict[str, Any] | None], *,
                   event: str | None = None, **fields: Any) -> dict[str, Any] | None:
    """Read-modify-write of a version manifest that loses no concurrent update.

    ``change`` gets a copy of the manifest and returns the new one (or None: nothing to write). The
    write is a compare-and-swap (``Store.put_if_match``); when another writer got in between,
    ``change`` runs again on the fresh manifest. ``event`` (with ``fields``) is recorded after the
    write. The registry is the only writer of ``version.json``: other steps call this (or
    ``record_artifact`` / ``set_stage``).
    """
    key = layout.version_manifest_key(model, version)
    for _ in range(100):
        try:
            manifest, token = store.get_json_with_token(key)
        except ObjectNotFound:
            get_version(store, model, version)  # raises the RegistryError naming the known versions
            raise
        new = change(copy.deepcopy(manifest))
        if new is None:
            return None
        if store.put_json_if_match(key, new, token):
            if event is not None:
                record_event(store, model, event, version=int(version), **fields)
            return new
        time.sleep(random.uniform(0.005, 0.05))
    raise RegistryConflict(f"{model} v{version}: the version manifest kept changing under 100 updates: retry")


def record_artifact(store: Store, model: str, version: int, name: str, data: bytes | dict, *,
                    field: str | None = None, summary: Any = None) -> str:
    """Attach a file (QC report, TensorRT plan, compile.json...) to an existing version: the object
    ``models/<m>/<v>/<name>``, its URI under the manifest's ``files`` and, with ``field``, ``summary``
    as the manifest's ``field`` (e.g. ``compile``, ``qc``); an ``artifact`` event. Returns the URI."""
    get_version(store, model, version)
    key = layout.version_file_key(model, version, name)
    if isinstance(data, dict):
        store.put_json(key, data)
    else:
        store.put_bytes(key, data)
    uri = store.uri(key)

    def change(manifest: dict[str, Any]) -> dict[str, Any]:
        manifest.setdefault("files", {})[name] = uri
        if field is not None:
            manifest[field] = summary
        return manifest

    update_version(store, model, version, change, event="artifact", name=name,
                   **({"field": field, field: summary} if field is not None else {}))
    return uri


def put_version_file(store: Store, model: str, version: int, name: str, data: bytes | dict) -> str:
    """Attach a file to an existing version (``record_artifact`` without a manifest field)."""
    return record_artifact(store, model, version, name, data)


def set_stage(store: Store, model: str, version: int, stage: str, reason: str, *,
              only_from: Sequence[str] | None = None, mirror: bool = True, **extra: Any) -> dict[str, Any] | None:
    """Move a version to ``stage``: a compare-and-swap of its manifest (a concurrent change is never
    lost), a ``stage`` event and a ClearML mirror of the change (tags, publish on ``production``,
    archive on ``archived``/``rejected``; see ``tasks.adapters.clearml.mirror_stage_change``).

    With ``only_from``, the stage changes only if the version is in one of those stages at the moment
    of the write; otherwise nothing is written and None is returned.
    """
    if stage not in STAGES:
        raise RegistryError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    seen: dict[str, Any] = {}

    def change(manifest: dict[str, Any]) -> dict[str, Any] | None:
        seen["previous"] = manifest.get("stage")
        if only_from is not None and seen["previous"] not in only_from:
            return None
        manifest["stage"] = stage
        manifest.setdefault("history", []).append({"stage": stage, "at": _now(), "reason": reason, **extra})
        return manifest

    manifest = update_version(store, model, version, change)
    if manifest is None:
        logger.info("%s v%s is %r, not one of %s: stage left as it is", model, version, seen.get("previous"),
                    list(only_from or ()))
        return None
    previous = seen.get("previous")
    clearml = None
    if mirror:
        clearml = _mirror_stage(model, version, stage, previous, reason,
                                (manifest.get("clearml") or {}).get("model_id"))
    record_event(store, model, "stage", version=version, stage=stage, previous=previous, reason=reason,
                 **({"clearml": clearml} if clearml is not None else {}), **extra)
    return manifest


# --------------------------------------------------------------------------- CLI

def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def split_drop_ids(values: Sequence[str]) -> list[str]:
    """``["a", "b,c", "a"]`` -> ``["a", "b", "c"]``: comma lists expanded, repeats dropped, order kept."""
    return list(dict.fromkeys(part.strip() for value in values for part in str(value).split(",") if part.strip()))


def _parse_time(text: str | None, flag: str) -> dt.datetime | None:
    if text is None:
        return None
    try:
        at = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise RegistryError(f"{flag} {text!r} is not a time: give ISO 8601, e.g. 2026-11-24T03:47 (UTC)") from None
    return _utc(at)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlpipe registry", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model name (default: $MLPIPE_MODEL_NAME or 'digits')")
    sub = parser.add_subparsers(dest="cmd", required=True)
    reg = sub.add_parser("register", help="register a training run as a new candidate version")
    reg.add_argument("--run-id", required=True, help="training run id (runs/<run_id>/ in the store)")
    reg.add_argument("--drop-id", action="append", required=True,
                     help="drop the run trained on (repeatable, or a comma-separated list)")
    reg.add_argument("--clearml-task-id", default=None)
    reg.add_argument("--no-mirror", action="store_true", help="do not mirror to ClearML")
    reg.add_argument("--result-json", type=Path, help="write the version manifest here")
    sub.add_parser("list", help="list versions with stage and accuracy")
    show = sub.add_parser("show", help="print one version manifest")
    show.add_argument("version", type=int)
    st = sub.add_parser("stage", help="set the stage of a version")
    st.add_argument("version", type=int)
    st.add_argument("stage", choices=STAGES)
    st.add_argument("--reason", default="manual")
    sub.add_parser("champion", help="print the production version")
    ev = sub.add_parser("events", help="print the registry event log")
    ev.add_argument("--since", default=None, help="only events at or after this UTC time (ISO 8601)")
    ev.add_argument("--until", default=None, help="only events at or before this UTC time (ISO 8601)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes (``tasks.contracts.errors``): 0 ok; ``EXIT_BAD_INPUT`` an unknown run, drop or version,
    a missing or invalid model spec, a bad stage or option; ``EXIT_REJECTED`` a run whose ``model.onnx``
    breaks the spec's ONNX contract, or a drop changed since its validation; ``EXIT_TRANSIENT`` the object
    store is unreachable (retried)."""
    return run_cli(_main, argv, bad_input=(ValueError,))


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    cfg = load_settings()
    model = args.model or cfg.model_name
    store = open_store(cfg)
    if args.cmd == "register":
        result = register(store, model, args.run_id, split_drop_ids(args.drop_id),
                          clearml_task_id=args.clearml_task_id, mirror=not args.no_mirror)
        if args.result_json:
            write_result_json(args.result_json, result)
        _print({"model": model, "version": result["version"], "stage": result["stage"]})
    elif args.cmd == "list":
        for v in all_versions(store, model):
            acc = v.get("metrics", {}).get("val_accuracy")
            print(f"{model} v{v['version']:<4} {v['stage']:<11} val_accuracy={acc} created={v['created_at']}")
    elif args.cmd == "show":
        _print(get_version(store, model, args.version))
    elif args.cmd == "stage":
        _print(set_stage(store, model, args.version, args.stage, args.reason))
    elif args.cmd == "champion":
        _print(champion(store, model))
    elif args.cmd == "events":
        _print(events(store, model, since=_parse_time(args.since, "--since"), until=_parse_time(args.until, "--until")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
