"""deploy and rollback: put a registered version into Triton's model repository and serve it.

deploy (in the spirit of TFX's Pusher, which only pushes a blessed model):

1. refuse a version that has not passed the QC gate (or was rejected);
2. check Triton answers *before* touching anything (down: clear error, nothing changed);
3. write the new numbered classifier version atomically (Triton never sees half a version);
4. pin it as the serving version and load it through Triton's repository API;
5. smoke-test it through the ensemble on golden samples;
6. promote it to ``production`` in the registry and archive the previous champion;
7. keep the last N versions in the repository.

Any failure in 3-5 restores the previous serving version (and checks it answers),
then fails with the reason. rollback serves any earlier registered version the same way.

    python -m tasks.deploy deploy --version 3
    python -m tasks.deploy rollback --version 2
    python -m tasks.deploy status
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from tasks import registry
from tasks.config import load_settings
from tasks.storage import Store, open_store

logger = logging.getLogger(__name__)
EXIT_REJECTED, EXIT_USAGE, EXIT_TEMPFAIL = 1, 2, 75


class DeployError(RuntimeError):
    """The deploy or rollback failed; the message says what and which version serves now."""


class TritonDown(DeployError):
    """Triton did not answer before anything was changed (transient: worth a retry)."""


@dataclass(frozen=True)
class ServingTarget:
    repo_dir: Path  # Triton's model repository (a shared volume in production)
    triton_url: str  # host:port of Triton's HTTP endpoint
    protocol: str = "http"
    keep_versions: int = 3
    smoke_min_accuracy: float = 0.9

    @classmethod
    def from_env(cls) -> "ServingTarget":
        home = load_settings().home
        return cls(
            repo_dir=Path(os.environ.get("MLPIPE_MODEL_REPO") or home / "model_repo"),
            triton_url=os.environ.get("MLPIPE_TRITON_URL", "127.0.0.1:8000"),
            protocol=os.environ.get("MLPIPE_TRITON_PROTOCOL", "http"),
            keep_versions=int(os.environ.get("MLPIPE_KEEP_VERSIONS", "3")),
        )


def _client(target: ServingTarget):
    from tasks.triton import TritonClient

    return TritonClient(target.triton_url, protocol=target.protocol)


def smoke_test(client, model: str, n: int = 64, min_accuracy: float = 0.9) -> dict[str, Any]:
    """Golden samples through the ensemble: every output present with the right shape, labels mostly right."""
    import numpy as np

    from tasks.drops import golden_set

    images, labels = golden_set()
    idx = np.linspace(0, len(labels) - 1, n).astype(int)  # spread over all classes
    out = client.infer_images(model, images[idx])
    got = np.asarray(out["LABEL"]).reshape(-1)
    if got.shape != (n,) or np.asarray(out["EMBEDDING"]).shape != (n, 64):
        raise DeployError(f"smoke test: unexpected output shapes LABEL {np.asarray(out['LABEL']).shape}, "
                          f"EMBEDDING {np.asarray(out['EMBEDDING']).shape}")
    acc = float(np.mean(got == labels[idx]))
    if acc < min_accuracy:
        raise DeployError(f"smoke test: only {acc:.0%} of {n} golden samples right through the ensemble "
                          f"(need {min_accuracy:.0%})")
    return {"samples": n, "accuracy": acc, "first_label": int(got[0]), "first_true": int(labels[idx][0]),
            "first_score": float(np.asarray(out["SCORE"]).reshape(-1)[0])}


def _ensure_base_models(client, model: str) -> None:
    from tasks import model_repo

    for name in (model_repo.PREPROCESS, model_repo.POSTPROCESS):
        if not client.model_ready(name):
            client.load_model(name)


def _serve(client, target: ServingTarget, model: str, version: int) -> None:
    """Pin ``version``, load it (Triton loads the new version before retiring the old), then the ensemble."""
    from tasks.triton import serve_classifier_version

    _ensure_base_models(client, model)
    serve_classifier_version(client, target.repo_dir, model, version)


def _materialize(store: Store, target: ServingTarget, model: str, version: int, tmp: Path) -> None:
    """Write the version into the repository if it is not there yet (atomic)."""
    from tasks import model_repo

    if version in model_repo.classifier_versions(target.repo_dir, model):
        return
    prefix = f"models/{model}/{version}/"
    onnx = store.get_file(prefix + "model.onnx", tmp / "model.onnx")
    flavour = model_repo.repo_flavour(target.repo_dir) or "local"
    plan = None
    if flavour == "production" and store.exists(prefix + "model.plan"):
        plan = store.get_file(prefix + "model.plan", tmp / "model.plan")
    model_repo.write_classifier_version(target.repo_dir, model, version, onnx, plan, flavour=flavour)


def _switch(store: Store, target: ServingTarget, model: str, version: int, action: str) -> dict[str, Any]:
    """Serve ``version``; on failure restore the previous serving version and raise DeployError."""
    from tasks import model_repo
    from tasks.triton import TritonError

    client = _client(target)
    try:
        live = client.is_live()
    except Exception:  # noqa: BLE001
        live = False
    if not live:
        raise TritonDown(f"Triton at {target.triton_url} is not reachable: {action} of {model} v{version} not "
                         "attempted; the serving version is unchanged")
    if model_repo.repo_flavour(target.repo_dir) is None:
        model_repo.render_repo("local", target.repo_dir, model)
    previous = model_repo.serving_version(target.repo_dir, model)
    was_present = version in model_repo.classifier_versions(target.repo_dir, model)
    with tempfile.TemporaryDirectory(prefix="mlpipe-deploy-") as tmp:
        try:
            _materialize(store, target, model, version, Path(tmp))
            _serve(client, target, model, version)
            smoke = smoke_test(client, model, min_accuracy=target.smoke_min_accuracy)
        except (DeployError, TritonError, model_repo.ModelRepoError, OSError, ValueError) as exc:
            reason = f"{action} of {model} v{version} failed: {exc}"
            logger.error("%s", reason)
            restored = _restore(client, target, model, previous)
            if not was_present and previous != version:
                try:
                    model_repo.remove_version(target.repo_dir, model, version, force=False)
                except model_repo.ModelRepoError:
                    pass
            raise DeployError(f"{reason}; {restored}") from exc
    return {"previous_version": previous, "smoke": smoke}


def _restore(client, target: ServingTarget, model: str, previous: int | None) -> str:
    if previous is None:
        return "there was no earlier version to restore"
    try:
        _serve(client, target, model, previous)
        smoke_test(client, model, min_accuracy=target.smoke_min_accuracy)
        return f"restored v{previous}, which answers again"
    except Exception as exc:  # noqa: BLE001
        return f"restoring v{previous} ALSO failed: {exc} (check Triton's log)"


def _prune(target: ServingTarget, model: str) -> list[int]:
    from tasks import model_repo

    serving = model_repo.serving_version(target.repo_dir, model)
    versions = [v for v in model_repo.classifier_versions(target.repo_dir, model) if v != serving]
    drop = versions[:max(0, len(versions) - (target.keep_versions - 1))]
    for v in drop:
        model_repo.remove_version(target.repo_dir, model, v)
    return drop


def _promote(store: Store, model: str, version: int, reason: str, **extra: Any) -> int | None:
    previous = registry.champion(store, model)
    registry.set_stage(store, model, version, "production", reason, **extra)
    if previous is not None and previous["version"] != version:
        registry.set_stage(store, model, previous["version"], "archived", f"replaced by v{version}")
        return previous["version"]
    return None


def deploy(store: Store, model: str, version: int, target: ServingTarget | None = None, *,
           force: bool = False) -> dict[str, Any]:
    target = target or ServingTarget.from_env()
    manifest = registry.get_version(store, model, version)
    verdict = (manifest.get("qc") or {}).get("verdict")
    if manifest.get("stage") == "rejected" and not force:
        raise registry.RegistryError(f"{model} v{version} was rejected ({manifest['history'][-1]['reason']}); "
                                     "it cannot be deployed")
    if verdict != "passed" and not force:
        raise registry.RegistryError(f"{model} v{version} has not passed the QC gate (verdict: {verdict}); "
                                     f"run `python -m tasks.qc --version {version}` first")
    switched = _switch(store, target, model, version, "deploy")
    archived = _promote(store, model, version, "deployed after QC", smoke=switched["smoke"])
    pruned = _prune(target, model)
    registry.record_event(store, model, "deploy", version=version, previous=switched["previous_version"],
                          smoke=switched["smoke"], pruned=pruned)
    logger.info("deployed %s v%s (previous v%s); smoke test %s", model, version, switched["previous_version"],
                switched["smoke"])
    return {"model": model, "deployed_version": version, "previous_version": switched["previous_version"],
            "archived_version": archived, "smoke": switched["smoke"], "pruned": pruned}


def rollback(store: Store, model: str, version: int, target: ServingTarget | None = None,
             reason: str = "manual rollback") -> dict[str, Any]:
    target = target or ServingTarget.from_env()
    manifest = registry.get_version(store, model, version)  # unknown version: RegistryError, nothing touched
    if not store.exists(f"models/{model}/{version}/model.onnx"):
        raise registry.RegistryError(f"{model} v{version} has no model.onnx in the store; cannot serve it")
    if manifest.get("stage") == "rejected":
        raise registry.RegistryError(f"{model} v{version} was rejected by QC; roll back to a version that passed")
    switched = _switch(store, target, model, version, "rollback")
    _promote(store, model, version, f"rollback: {reason}", previous=switched["previous_version"])
    registry.record_event(store, model, "rollback", version=version, previous=switched["previous_version"],
                          reason=reason, smoke=switched["smoke"])
    return {"model": model, "serving_version": version, "previous_version": switched["previous_version"],
            "smoke": switched["smoke"]}


def status(target: ServingTarget, model: str) -> dict[str, Any]:
    from tasks import model_repo

    return {"repo": str(target.repo_dir), "triton": target.triton_url,
            "serving_version": model_repo.serving_version(target.repo_dir, model)
            if model_repo.repo_flavour(target.repo_dir) else None,
            "versions_in_repo": model_repo.classifier_versions(target.repo_dir, model)
            if model_repo.repo_flavour(target.repo_dir) else []}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.deploy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model name (default $MLPIPE_MODEL_NAME or 'digits')")
    parser.add_argument("--repo", type=Path, default=None, help="Triton model repository (env MLPIPE_MODEL_REPO)")
    parser.add_argument("--triton-url", default=None, help="Triton HTTP host:port (env MLPIPE_TRITON_URL)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, text in (("deploy", "serve a version that passed QC"), ("rollback", "serve an earlier version")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--version", type=int, required=True)
        p.add_argument("--result-json", type=Path)
        if name == "rollback":
            p.add_argument("--reason", default="manual rollback", help="recorded in the registry event log")
        if name == "deploy":
            p.add_argument("--force", action="store_true", help="deploy without a passed QC verdict (emergency)")
    st = sub.add_parser("status", help="which version the repository serves")
    st.add_argument("--result-json", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_settings()
    model = args.model or cfg.model_name
    base = ServingTarget.from_env()
    target = ServingTarget(args.repo or base.repo_dir, args.triton_url or base.triton_url, base.protocol,
                           base.keep_versions)
    try:
        store = open_store(cfg)
        if args.cmd == "deploy":
            result = deploy(store, model, args.version, target, force=args.force)
        elif args.cmd == "rollback":
            result = rollback(store, model, args.version, target, reason=args.reason)
        else:
            result = status(target, model)
    except TritonDown as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_TEMPFAIL
    except DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REJECTED
    except (registry.RegistryError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(result, indent=2, default=str))
    if getattr(args, "result_json", None):
        args.result_json.parent.mkdir(parents=True, exist_ok=True)
        args.result_json.write_text(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
