"""The model registry of record: manifests in the object store, mirrored to ClearML.

Layout (see docs/CONTRACTS.md)::

    models/<model>/<version>/version.json   version, stage, metrics, lineage, history
    models/<model>/<version>/model.onnx     + model.pt, metrics.json, lineage.json, curves.png
    models/<model>/_events/<ts>-<id>.json   one object per registry event

Stages: ``candidate`` -> ``production`` | ``rejected``; ``production`` -> ``archived``.
Registering the same training run twice returns the same version (idempotent).

CLI: ``mlpipe registry {register,list,show,stage,champion} --help``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Sequence

from tasks.config import PROJECT_ROOT, load_settings
from tasks.adapters.storage import ObjectNotFound, Store, open_store

logger = logging.getLogger(__name__)

STAGES = ("candidate", "production", "rejected", "archived")
RUN_FILES = ("model.onnx", "model.pt", "metrics.json", "curves.png")
EXIT_INVALID, EXIT_USAGE = 1, 2


class RegistryError(ValueError):
    """A registry request that cannot be satisfied (unknown version, bad stage...)."""


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _prefix(model: str, version: int | None = None) -> str:
    return f"models/{model}/" if version is None else f"models/{model}/{version}/"


def code_version() -> str:
    """The git commit of the code that runs (or MLPIPE_CODE_VERSION in an image)."""
    env = os.environ.get("MLPIPE_CODE_VERSION")
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
        return store.get_json(_prefix(model, version) + "version.json")
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


def record_event(store: Store, model: str, event: str, **fields: Any) -> dict[str, Any]:
    body = {"event": event, "model": model, "at": _now(), **fields}
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    store.put_json(f"{_prefix(model)}_events/{stamp}-{uuid.uuid4().hex[:8]}.json", body)
    logger.info("registry event %s: %s", event, json.dumps(fields, default=str, sort_keys=True))
    return body


def events(store: Store, model: str) -> list[dict[str, Any]]:
    return [store.get_json(k) for k in store.list(f"{_prefix(model)}_events/") if k.endswith(".json")]


def _drop_lineage(store: Store, drop_id: str) -> dict[str, Any]:
    manifest_key = f"drops/{drop_id}/manifest.parquet"
    try:
        manifest_sha = hashlib.sha256(store.get_bytes(manifest_key)).hexdigest()
    except ObjectNotFound:
        raise RegistryError(f"drop {drop_id!r} has no manifest at {manifest_key}: cannot record lineage") from None
    try:
        validation = store.get_json(f"drops/{drop_id}/validation/result.json")
    except ObjectNotFound:
        validation = None
    return {
        "drop_id": drop_id,
        "manifest_sha256": manifest_sha,
        "validation": None if validation is None else {
            "success": validation.get("success"),
            "result_uri": store.uri(f"drops/{drop_id}/validation/result.json"),
            "report_uri": validation.get("report_uri"),
        },
    }


def register(store: Store, model: str, run_id: str, drop_ids: Sequence[str], *,
             clearml_task_id: str | None = None, mirror: bool = True) -> dict[str, Any]:
    """Register the training run ``runs/<run_id>/`` as a new ``candidate`` version."""
    run_prefix = f"runs/{run_id}/"
    try:
        metrics = store.get_json(run_prefix + "metrics.json")
    except ObjectNotFound:
        raise RegistryError(f"training run {run_id!r} not found: no {run_prefix}metrics.json in {store.url}") from None
    if not store.exists(run_prefix + "model.onnx"):
        raise RegistryError(f"training run {run_id!r} has no model.onnx in {store.url}/{run_prefix}")

    # Idempotency: the same run registered again is the same version.
    for existing in all_versions(store, model):
        if existing.get("run_id") == run_id:
            logger.info("run %s is already registered as %s v%s", run_id, model, existing["version"])
            return existing

    parent = champion(store, model)
    lineage = {
        "drops": [_drop_lineage(store, d) for d in drop_ids],
        "training_run_id": run_id,
        "clearml_task_id": clearml_task_id or metrics.get("clearml_task_id"),
        "code_version": code_version(),
        "parent_champion": None if parent is None else parent["version"],
    }
    failed = [d["drop_id"] for d in lineage["drops"] if not (d["validation"] or {}).get("success")]
    if failed:
        raise RegistryError(f"refusing to register: drops {failed} have no passing validation result")

    version = _claim_version(store, model, run_id)
    prefix = _prefix(model, version)
    for name in RUN_FILES:
        if store.exists(run_prefix + name):
            store.put_bytes(prefix + name, store.get_bytes(run_prefix + name))
    store.put_json(prefix + "metrics.json", metrics)
    store.put_json(prefix + "lineage.json", lineage)
    manifest = {
        "model": model,
        "version": version,
        "stage": "candidate",
        "created_at": _now(),
        "run_id": run_id,
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))},
        "lineage": lineage,
        "files": {name: store.uri(prefix + name) for name in RUN_FILES if store.exists(prefix + name)},
        "history": [{"stage": "candidate", "at": _now(), "reason": "registered"}],
    }
    if mirror:
        manifest["clearml"] = _mirror(model, version, "candidate", manifest["metrics"], lineage, store, prefix)
    store.put_json(prefix + "version.json", manifest)  # written last: the version is complete
    store.delete(prefix + "_claim.json")
    record_event(store, model, "register", version=version, run_id=run_id, drops=list(drop_ids))
    return manifest


def _claim_version(store: Store, model: str, run_id: str) -> int:
    """Claim the next free version number (a claim object, read back to detect a race)."""
    for _ in range(20):
        taken = list_versions(store, model)
        version = (max(taken) + 1) if taken else 1
        claim = f"{_prefix(model, version)}_claim.json"
        if store.exists(claim):
            continue
        store.put_json(claim, {"run_id": run_id, "at": _now()})
        if store.get_json(claim).get("run_id") == run_id:
            return version
    raise RegistryError(f"could not claim a version number for {model} after 20 tries (concurrent registrations?)")


def _mirror(model: str, version: int, stage: str, metrics: dict, lineage: dict, store: Store, prefix: str) -> dict:
    """Mirror the version to ClearML (offline session by default). Failures are recorded, not fatal:
    the object store stays the registry of record."""
    try:
        from tasks.adapters import clearml as tracking

        onnx_local = None
        if store.exists(prefix + "model.onnx"):
            tmp = load_settings().home / "tmp" / f"{model}-{version}.onnx"
            onnx_local = store.get_file(prefix + "model.onnx", tmp)
        return tracking.mirror_model_version(model, version, stage, metrics, lineage, onnx_path=onnx_local)
    except Exception as exc:  # noqa: BLE001 - the mirror must never lose the registration
        logger.warning("ClearML mirror of %s v%s failed: %s", model, version, exc)
        return {"error": str(exc)}


def set_stage(store: Store, model: str, version: int, stage: str, reason: str, **extra: Any) -> dict[str, Any]:
    if stage not in STAGES:
        raise RegistryError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    manifest = get_version(store, model, version)
    previous = manifest.get("stage")
    manifest["stage"] = stage
    manifest.setdefault("history", []).append({"stage": stage, "at": _now(), "reason": reason, **extra})
    store.put_json(_prefix(model, version) + "version.json", manifest)
    record_event(store, model, "stage", version=version, stage=stage, previous=previous, reason=reason, **extra)
    return manifest


def put_version_file(store: Store, model: str, version: int, name: str, data: bytes | dict) -> str:
    """Attach a file (QC report, TensorRT plan...) to an existing version."""
    get_version(store, model, version)
    key = _prefix(model, version) + name
    if isinstance(data, dict):
        store.put_json(key, data)
    else:
        store.put_bytes(key, data)
    return store.uri(key)


# --------------------------------------------------------------------------- CLI

def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def split_drop_ids(values: Sequence[str]) -> list[str]:
    """``["a", "b,c", "a"]`` -> ``["a", "b", "c"]``: comma lists expanded, repeats dropped, order kept."""
    return list(dict.fromkeys(part.strip() for value in values for part in str(value).split(",") if part.strip()))


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
    sub.add_parser("events", help="print the registry event log")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_settings()
    model = args.model or cfg.model_name
    try:
        store = open_store(cfg)
        if args.cmd == "register":
            result = register(store, model, args.run_id, split_drop_ids(args.drop_id),
                              clearml_task_id=args.clearml_task_id, mirror=not args.no_mirror)
            if args.result_json:
                args.result_json.parent.mkdir(parents=True, exist_ok=True)
                args.result_json.write_text(json.dumps(result, default=str))
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
            _print(events(store, model))
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
