"""deploy and rollback: put a registered version into Triton's model repository and serve it.

deploy (in the spirit of TFX's Pusher, which only pushes a blessed model):

1. refuse a version that has not passed the QC gate (or was rejected), unless ``--force``;
2. check Triton answers *before* touching anything (down: exit 75, nothing changed);
3. pre-flight the version's ``model.onnx`` in ONNX Runtime (corrupt file, wrong output
   shape: a clear error, nothing changed);
4. write the new numbered classifier version atomically (Triton never sees half a version);
5. pin it as the serving version and load it through Triton's repository API (Triton loads
   the new version before it retires the old one, so in-flight clients see no errors);
6. smoke-test it through the ensemble on golden samples: shapes, labels, and the scores
   ONNX Runtime gives for this version's file (so the right version answers);
7. promote it to ``production`` in the registry and archive the previous champion;
8. keep the last N versions in the repository (the serving one always stays).

Any failure in 4-6 restores the previous serving version (and checks that it answers),
then fails with the reason. ``rollback`` serves any earlier registered version the same way
and records a ``rollback`` event in the registry. One deploy or rollback at a time per
repository (a lock file at its root).

    mlpipe deploy deploy --version 3
    mlpipe deploy rollback --version 2 --reason "v3 misclassifies 7s"
    mlpipe deploy status

Exit codes: 0 done; 1 the deploy/rollback failed (the previous version serves again);
2 bad request (unknown version, not QC-passed, rejected); 75 Triton unreachable (transient:
retry later; nothing was changed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from tasks.steps import registry
from tasks.config import load_settings
from tasks.adapters.storage import ObjectNotFound, Store, StoreError, open_store

logger = logging.getLogger(__name__)
EXIT_REJECTED, EXIT_USAGE, EXIT_TEMPFAIL = 1, 2, 75
SMOKE_SAMPLES = 64
LOCK_NAME = ".mlpipe-deploy.lock"  # a file at the repository root: Triton only indexes folders
SCORE_TOLERANCE = {"onnx": 1e-3, "plan": 5e-2}  # |Triton - ONNX Runtime| on SCORE/TOPK_SCORES


class DeployError(RuntimeError):
    """The deploy or rollback failed; the message says what and which version serves now."""


class TritonDown(DeployError):
    """Triton did not answer (transient: worth a retry); the message says what was left as it was."""


@dataclass(frozen=True)
class ServingTarget:
    repo_dir: Path  # Triton's model repository (a shared volume in production)
    triton_url: str  # host:port of Triton's HTTP endpoint (or gRPC with protocol="grpc")
    protocol: str = "http"
    keep_versions: int = 3
    smoke_min_accuracy: float = 0.9
    lock_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.protocol not in ("http", "grpc"):
            raise ValueError(f"Triton protocol must be 'http' or 'grpc', got {self.protocol!r} "
                             "(MLPIPE_TRITON_PROTOCOL)")
        if self.keep_versions < 1:
            raise ValueError(f"keep_versions must be >= 1 (the serving version is always kept), got "
                             f"{self.keep_versions} (MLPIPE_KEEP_VERSIONS)")

    @classmethod
    def from_env(cls) -> "ServingTarget":
        from tasks.model.repo import default_repo_dir

        raw_keep = os.environ.get("MLPIPE_KEEP_VERSIONS") or "3"
        try:
            keep = int(raw_keep)
        except ValueError:
            raise ValueError(f"MLPIPE_KEEP_VERSIONS={raw_keep!r} is not an integer") from None
        return cls(
            repo_dir=Path(os.environ.get("MLPIPE_MODEL_REPO") or default_repo_dir()),
            triton_url=os.environ.get("MLPIPE_TRITON_URL") or "127.0.0.1:8000",
            protocol=os.environ.get("MLPIPE_TRITON_PROTOCOL") or "http",
            keep_versions=keep,
        )


def _client(target: ServingTarget):
    from tasks.adapters.triton import TritonClient

    return TritonClient(target.triton_url, protocol=target.protocol)


# ----------------------------------------------------------------------------------------------
# Pre-flight and smoke test
# ----------------------------------------------------------------------------------------------


def smoke_samples(n: int = SMOKE_SAMPLES):
    """``(images uint8 [n,28,28], labels [n])``: golden images spread over every class."""
    import numpy as np

    from tasks.steps.drops import golden_set

    images, labels = golden_set()
    idx = np.linspace(0, len(labels) - 1, n).astype(int)
    return images[idx], labels[idx]


def preflight(onnx_path: Path, what: str, n: int = SMOKE_SAMPLES) -> dict[str, Any]:
    """Run ``onnx_path`` in ONNX Runtime on the smoke samples and check the contract shapes.

    Returns what the ensemble must answer for these samples (``labels``, ``topk_scores``);
    raises ``DeployError`` naming the problem (unreadable file, wrong output shape) before
    anything in the repository or in Triton is touched.
    """
    import numpy as np

    from tasks.model.networks import EMBEDDING_DIM, INPUT_NAME, NUM_CLASSES, OUTPUT_NAMES, onnx_session, to_input

    images, _ = smoke_samples(n)
    try:
        sess = onnx_session(onnx_path)
        logits, emb = sess.run(list(OUTPUT_NAMES), {INPUT_NAME: to_input(images)})
    except Exception as exc:  # noqa: BLE001 - any failure here means "not a usable model file"
        raise DeployError(f"{what}: model.onnx is not a usable ONNX classifier ({type(exc).__name__}: "
                          f"{str(exc).strip()[:300]})") from None
    if logits.shape != (n, NUM_CLASSES) or emb.shape != (n, EMBEDDING_DIM):
        raise DeployError(f"{what}: model.onnx outputs have the wrong shape: logits {list(logits.shape)}, "
                          f"embedding {list(emb.shape)} for {n} images; the contract needs [N, {NUM_CLASSES}] and "
                          f"[N, {EMBEDDING_DIM}]")
    if not (np.isfinite(logits).all() and np.isfinite(emb).all()):
        raise DeployError(f"{what}: model.onnx gives NaN or infinite outputs on golden samples")
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = z / z.sum(axis=1, keepdims=True)
    return {"labels": logits.argmax(axis=1), "topk_scores": -np.sort(-probs, axis=1)[:, :3]}


def smoke_test(client, model: str, n: int = SMOKE_SAMPLES, min_accuracy: float = 0.9,
               expected: dict[str, Any] | None = None, score_tolerance: float = SCORE_TOLERANCE["onnx"]
               ) -> dict[str, Any]:
    """Golden samples through the ensemble: every output present with the right shape, labels mostly
    right and, given ``expected`` (from ``preflight``), the same labels and scores ONNX Runtime gives
    for the version's file. Raises ``DeployError`` (or ``TritonError``) with what was wrong."""
    import numpy as np

    images, labels = smoke_samples(n)
    out = client.infer_images(model, images)
    shapes = {k: list(np.asarray(v).shape) for k, v in out.items()}
    want = {"LABEL": [n, 1], "SCORE": [n, 1], "TOPK_LABELS": [n, 3], "TOPK_SCORES": [n, 3], "EMBEDDING": [n, 64]}
    wrong = {k: shapes.get(k) for k, v in want.items() if shapes.get(k) != v}
    if wrong:
        raise DeployError(f"smoke test: ensemble {model!r} answered with wrong output shapes {wrong}; expected "
                          f"{ {k: want[k] for k in wrong} }")
    got = np.asarray(out["LABEL"]).reshape(-1)
    acc = float(np.mean(got == labels))
    if acc < min_accuracy:
        raise DeployError(f"smoke test: only {acc:.0%} of {n} golden samples right through the ensemble "
                          f"(need {min_accuracy:.0%})")
    result: dict[str, Any] = {"samples": n, "accuracy": acc, "first_label": int(got[0]),
                              "first_true": int(labels[0]),
                              "first_score": float(np.asarray(out["SCORE"]).reshape(-1)[0])}
    if expected is not None:
        agree = float(np.mean(got == expected["labels"]))
        diff = float(np.max(np.abs(np.asarray(out["TOPK_SCORES"]) - expected["topk_scores"])))
        result.update(onnx_agreement=agree, max_score_diff=diff)
        if agree < 0.95 or diff > score_tolerance:
            raise DeployError(f"smoke test: the ensemble's answers do not match this version's model.onnx "
                              f"({agree:.0%} of labels agree, max score difference {diff:.3g} > "
                              f"{score_tolerance:g}): another version may be answering")
    return result


# ----------------------------------------------------------------------------------------------
# Repository and Triton steps
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _repo_lock(target: ServingTarget) -> Iterator[None]:
    """One deploy/rollback at a time per repository (``flock`` on a file at its root)."""
    import fcntl

    target.repo_dir.mkdir(parents=True, exist_ok=True)
    path = target.repo_dir / LOCK_NAME
    with open(path, "a+") as fh:
        deadline = time.monotonic() + target.lock_timeout_s
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise DeployError(f"another deploy or rollback holds {path} for over "
                                      f"{target.lock_timeout_s:.0f}s; try again when it is done") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _ensure_rendered(target: ServingTarget, model: str) -> str:
    """Render the static parts for ``model`` if the repository lacks them; returns its flavour."""
    from tasks.model import repo as model_repo

    flavour = model_repo.repo_flavour(target.repo_dir)
    rendered = all((target.repo_dir / name / "config.pbtxt").is_file()
                   for name in (model, model_repo.classifier_name(model), model_repo.PREPROCESS,
                                model_repo.POSTPROCESS))
    if flavour is None or not rendered:
        flavour = flavour or "local"
        logger.info("rendering the %s repository parts of %r in %s", flavour, model, target.repo_dir)
        model_repo.render_repo(flavour, target.repo_dir, model)
    return flavour


def _ensure_base_models(client, model: str) -> None:
    from tasks.model import repo as model_repo

    for name in (model_repo.PREPROCESS, model_repo.POSTPROCESS):
        if not client.model_ready(name):
            client.load_model(name)


def _is_serving(client, target: ServingTarget, model: str, version: int) -> bool:
    """Pinned in the files, the only READY classifier version, and the ensemble ready."""
    from tasks.model import repo as model_repo

    if model_repo.serving_version(target.repo_dir, model) != version:
        return False
    return (client.ready_versions(model_repo.classifier_name(model)) == [version]
            and client.model_ready(model) and client.model_ready(model_repo.PREPROCESS)
            and client.model_ready(model_repo.POSTPROCESS))


def _serve(client, target: ServingTarget, model: str, version: int) -> None:
    """Pin ``version`` and load it (Triton loads the new version before retiring the old), then the ensemble."""
    from tasks.model.serve import serve_classifier_version

    _ensure_base_models(client, model)
    serve_classifier_version(client, target.repo_dir, model, version)


def _fetch(store: Store, model: str, version: int, tmp: Path, flavour: str) -> tuple[Path, Path | None]:
    prefix = f"models/{model}/{version}/"
    try:
        onnx = store.get_file(prefix + "model.onnx", tmp / "model.onnx")
    except ObjectNotFound:
        raise DeployError(f"{model} v{version} has no model.onnx in the store ({store.uri(prefix)}); "
                          "nothing was changed") from None
    plan = None
    if flavour == "production" and store.exists(prefix + "model.plan"):
        plan = store.get_file(prefix + "model.plan", tmp / "model.plan")
    return onnx, plan


def _read_config(target: ServingTarget, model: str) -> bytes | None:
    from tasks.model import repo as model_repo

    try:
        return (target.repo_dir / model_repo.classifier_name(model) / "config.pbtxt").read_bytes()
    except FileNotFoundError:
        return None


def _put_back_config(target: ServingTarget, model: str, data: bytes) -> None:
    """Atomically put the classifier's config.pbtxt back as it was (newer mtime, so Triton notices)."""
    from tasks.model import repo as model_repo

    path = target.repo_dir / model_repo.classifier_name(model) / "config.pbtxt"
    model_repo.atomic_write_bytes(path, data, only_if_changed=False)


def _restore(client, target: ServingTarget, model: str, previous: int | None, config: bytes | None,
             expected: dict[str, Any] | None) -> str:
    """Serve ``previous`` again (or, with none, put the config back and unload the classifier)."""
    from tasks.model import repo as model_repo

    if previous is None:
        try:
            if config is not None:
                _put_back_config(target, model, config)
            for name in (model, model_repo.classifier_name(model)):
                client.unload_model(name)
            return "there was no earlier version to restore: the classifier is unloaded and its config put back"
        except Exception as exc:  # noqa: BLE001
            return f"there was no earlier version to restore; cleaning up also failed: {exc}"
    try:
        if not _is_serving(client, target, model, previous):
            _serve(client, target, model, previous)
        smoke_test(client, model, min_accuracy=target.smoke_min_accuracy, expected=expected)
        return f"restored v{previous}, which answers again"
    except Exception as exc:  # noqa: BLE001
        return f"restoring v{previous} ALSO failed: {exc} (check Triton's log)"


def _switch(store: Store, target: ServingTarget, model: str, version: int, action: str) -> dict[str, Any]:
    """Serve ``version``; on failure restore the previous serving version and raise DeployError."""
    from tasks.model import repo as model_repo
    from tasks.adapters.triton import TritonError

    what = f"{action} of {model} v{version}"
    client = _client(target)
    try:
        if not client.is_live():
            pinned = model_repo.serving_version(target.repo_dir, model) \
                if model_repo.repo_flavour(target.repo_dir) else None
            raise TritonDown(f"Triton at {target.triton_url} ({target.protocol}) is not reachable: {what} not "
                             f"attempted; nothing was changed (the repository still pins "
                             f"{f'v{pinned}' if pinned else 'no version'}). Start Triton or point "
                             "MLPIPE_TRITON_URL / --triton-url at it, then retry")
        with _repo_lock(target), tempfile.TemporaryDirectory(prefix="mlpipe-deploy-") as tmp:
            flavour = _ensure_rendered(target, model)
            present = model_repo.list_versions(target.repo_dir, model)
            previous = model_repo.serving_version(target.repo_dir, model)
            if previous is not None and previous not in present:
                logger.warning("the repository pins v%s, but its folder is missing: nothing to restore", previous)
                previous = None
            config = _read_config(target, model)
            onnx, plan = _fetch(store, model, version, Path(tmp), flavour)
            unchanged = "nothing was changed" + (f", v{previous} still serves" if previous is not None else "")
            expected = preflight(onnx, f"{what} ({unchanged})")
            prev_expected = None
            prev_dir = target.repo_dir / model_repo.classifier_name(model) / str(previous)
            if previous is not None and not (flavour == "production" and (prev_dir / "model.plan").is_file()):
                try:  # what v<previous> must answer, to check a restore (not for a TensorRT plan: FP16)
                    prev_expected = preflight(prev_dir / "model.onnx", f"v{previous}")
                except DeployError as exc:
                    logger.warning("cannot pre-compute v%s's answers for the restore check: %s", previous, exc)
            tolerance = SCORE_TOLERANCE["plan" if plan is not None else "onnx"]
            try:
                model_repo.write_classifier_version(target.repo_dir, model, version, onnx, plan, flavour=flavour)
                if _is_serving(client, target, model, version):
                    logger.info("%s v%s is already served: smoke test only", model, version)
                else:
                    _serve(client, target, model, version)
                smoke = smoke_test(client, model, min_accuracy=target.smoke_min_accuracy, expected=expected,
                                   score_tolerance=tolerance)
            except Exception as exc:  # noqa: BLE001 - whatever failed, put the previous version back
                reason = f"{what} failed: {exc}"
                logger.error("%s", reason)
                restored = _restore(client, target, model, previous, config, prev_expected)
                if version not in present and previous != version:
                    try:
                        model_repo.remove_version(target.repo_dir, model, version)
                    except Exception as rm_exc:  # noqa: BLE001
                        logger.warning("could not remove the failed v%s from the repository: %s", version, rm_exc)
                logger.error("%s", restored)
                cls = TritonDown if isinstance(exc, TritonError) and exc.unreachable else DeployError
                raise cls(f"{reason}; {restored}") from exc
    finally:
        client.close()
    logger.info("%s: Triton at %s serves v%s (was v%s); smoke test %s", action, target.triton_url, version,
                previous, smoke)
    return {"previous_version": previous, "smoke": smoke}


def _switch_recorded(store: Store, target: ServingTarget, model: str, version: int, action: str) -> dict[str, Any]:
    """``_switch``, with a failure also recorded as a ``<action>_failed`` registry event (the reason)."""
    try:
        return _switch(store, target, model, version, action)
    except DeployError as exc:
        try:
            registry.record_event(store, model, f"{action}_failed", version=version, reason=str(exc),
                                  transient=isinstance(exc, TritonDown), triton=target.triton_url)
        except Exception as rec_exc:  # noqa: BLE001 - the failure itself is what must be reported
            logger.warning("could not record the failed %s in the registry: %s", action, rec_exc)
        raise


def _prune(target: ServingTarget, model: str) -> list[int]:
    """Remove the oldest classifier versions beyond ``keep_versions`` (never the serving one)."""
    from tasks.model import repo as model_repo

    serving = model_repo.serving_version(target.repo_dir, model)
    versions = [v for v in model_repo.list_versions(target.repo_dir, model) if v != serving]
    drop = versions[:max(0, len(versions) - (target.keep_versions - 1))]
    for v in drop:
        model_repo.remove_version(target.repo_dir, model, v)
    if drop:
        logger.info("pruned %s versions %s (keeping the last %d)", model, drop, target.keep_versions)
    return drop


def _promote(store: Store, model: str, version: int, reason: str, **extra: Any) -> int | None:
    """``version`` -> production, every other production version -> archived; returns the replaced champion."""
    others = [v["version"] for v in registry.all_versions(store, model)
              if v.get("stage") == "production" and v["version"] != version]
    if registry.get_version(store, model, version).get("stage") != "production":
        registry.set_stage(store, model, version, "production", reason, **extra)
    for other in others:
        registry.set_stage(store, model, other, "archived", f"replaced by v{version} ({reason})")
    return max(others) if others else None


def _check_version(model: str, version: int) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise registry.RegistryError(f"version must be an integer >= 1, got {version!r}")


def deploy(store: Store, model: str, version: int, target: ServingTarget | None = None, *,
           force: bool = False) -> dict[str, Any]:
    """Serve ``version`` (it must have passed QC unless ``force``); see the module doc for the steps."""
    _check_version(model, version)
    target = target or ServingTarget.from_env()
    manifest = registry.get_version(store, model, version)
    verdict = (manifest.get("qc") or {}).get("verdict")
    if manifest.get("stage") == "rejected" and not force:
        why = (manifest.get("history") or [{}])[-1].get("reason", "no reason recorded")
        raise registry.RegistryError(f"{model} v{version} was rejected ({why}); it cannot be deployed")
    if verdict != "passed" and not force:
        raise registry.RegistryError(f"{model} v{version} has not passed the QC gate (verdict: {verdict}); "
                                     f"run `mlpipe qc --version {version}` first")
    if force and verdict != "passed":
        logger.warning("FORCED deploy of %s v%s without a passed QC verdict (verdict: %s)", model, version, verdict)
    switched = _switch_recorded(store, target, model, version, "deploy")
    archived = _promote(store, model, version, "deployed after QC" if verdict == "passed" else "forced deploy",
                        smoke=switched["smoke"])
    pruned = _prune(target, model)
    registry.record_event(store, model, "deploy", version=version, previous=switched["previous_version"],
                          archived=archived, smoke=switched["smoke"], pruned=pruned, forced=bool(force),
                          triton=target.triton_url)
    logger.info("deployed %s v%s (previous v%s, archived v%s); pruned %s", model, version,
                switched["previous_version"], archived, pruned)
    return {"model": model, "deployed_version": version, "previous_version": switched["previous_version"],
            "archived_version": archived, "smoke": switched["smoke"], "pruned": pruned}


def rollback(store: Store, model: str, version: int, target: ServingTarget | None = None,
             reason: str = "manual rollback") -> dict[str, Any]:
    """Serve an earlier registered ``version`` (re-written from the store if it was pruned)."""
    _check_version(model, version)
    target = target or ServingTarget.from_env()
    manifest = registry.get_version(store, model, version)  # unknown version: RegistryError, nothing touched
    if not store.exists(f"models/{model}/{version}/model.onnx"):
        raise registry.RegistryError(f"{model} v{version} has no model.onnx in the store; cannot serve it")
    if manifest.get("stage") == "rejected":
        raise registry.RegistryError(f"{model} v{version} was rejected by QC; roll back to a version that passed")
    switched = _switch_recorded(store, target, model, version, "rollback")
    replaced = _promote(store, model, version, f"rollback: {reason}", served_before=switched["previous_version"])
    registry.record_event(store, model, "rollback", version=version, previous=switched["previous_version"],
                          archived=replaced, reason=reason, smoke=switched["smoke"], triton=target.triton_url)
    logger.info("rolled back %s to v%s (was v%s): %s", model, version, switched["previous_version"], reason)
    return {"model": model, "serving_version": version, "previous_version": switched["previous_version"],
            "smoke": switched["smoke"]}


def status(target: ServingTarget, model: str, store: Store | None = None) -> dict[str, Any]:
    """The repository's pinned version and versions, what Triton reports READY, and the registry champion."""
    from tasks.model import repo as model_repo

    rendered = model_repo.repo_flavour(target.repo_dir) is not None
    out: dict[str, Any] = {
        "model": model, "repo": str(target.repo_dir), "triton": target.triton_url,
        "serving_version": model_repo.serving_version(target.repo_dir, model) if rendered else None,
        "versions_in_repo": model_repo.list_versions(target.repo_dir, model) if rendered else [],
    }
    client = _client(target)
    try:
        out["triton_live"] = client.is_live()
        if out["triton_live"]:
            out["triton_ready_versions"] = client.ready_versions(model_repo.classifier_name(model))
    except Exception as exc:  # noqa: BLE001 - status is informative
        out["triton_error"] = str(exc)
    finally:
        client.close()
    if store is not None:
        champ = registry.champion(store, model)
        out["champion"] = None if champ is None else champ["version"]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlpipe deploy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model name (default $MLPIPE_MODEL_NAME or 'digits')")
    parser.add_argument("--repo", type=Path, default=None,
                        help="Triton model repository (env MLPIPE_MODEL_REPO, default "
                        "$MLPIPE_HOME/triton/model_repository, as tasks.model.repo and tasks.adapters.triton)")
    parser.add_argument("--triton-url", default=None, help="Triton host:port (env MLPIPE_TRITON_URL, default "
                        "127.0.0.1:8000)")
    parser.add_argument("--protocol", choices=("http", "grpc"), default=None,
                        help="protocol of --triton-url (env MLPIPE_TRITON_PROTOCOL, default http)")
    parser.add_argument("--keep-versions", type=int, default=None,
                        help="classifier versions kept in the repository (env MLPIPE_KEEP_VERSIONS, default 3)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, text in (("deploy", "serve a version that passed QC"), ("rollback", "serve an earlier version")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--version", type=int, required=True)
        p.add_argument("--result-json", type=Path)
        if name == "rollback":
            p.add_argument("--reason", default="manual rollback", help="recorded in the registry event log")
        if name == "deploy":
            p.add_argument("--force", action="store_true", help="deploy without a passed QC verdict (emergency)")
    st = sub.add_parser("status", help="which version the repository pins and Triton serves")
    st.add_argument("--result-json", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from tasks.model.repo import ModelRepoError
    from tasks.adapters.triton import TritonError

    try:
        cfg = load_settings()
        model = args.model or cfg.model_name
        base = ServingTarget.from_env()
        target = ServingTarget(args.repo or base.repo_dir, args.triton_url or base.triton_url,
                               args.protocol or base.protocol,
                               args.keep_versions if args.keep_versions is not None else base.keep_versions)
        store = open_store(cfg)
        if args.cmd == "deploy":
            result = deploy(store, model, args.version, target, force=args.force)
        elif args.cmd == "rollback":
            result = rollback(store, model, args.version, target, reason=args.reason)
        else:
            result = status(target, model, store)
    except TritonDown as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_TEMPFAIL
    except DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REJECTED
    except (registry.RegistryError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (StoreError, ModelRepoError, TritonError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REJECTED
    print(json.dumps(result, indent=2, default=str))
    if getattr(args, "result_json", None):
        args.result_json.parent.mkdir(parents=True, exist_ok=True)
        args.result_json.write_text(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
