"""Serve one classifier version: pin it in the rendered repository and make Triton load exactly it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from tasks.adapters.triton import TritonClient, TritonError

if TYPE_CHECKING:  # pragma: no cover
    from tasks.contracts.spec import ModelSpec

logger = logging.getLogger(__name__)


def serve_classifier_version(client: TritonClient, repo_dir: Path, model_spec: "ModelSpec", version: int,
                             timeout: float = 120.0, sync: Callable[[], None] | None = None) -> dict[str, Any]:
    """Make Triton serve exactly classifier ``version`` of ``model_spec`` (the version folder must exist).

    Pins the version in ``<model>_classifier/config.pbtxt`` (atomic rewrite, new mtime), reloads the
    classifier (Triton loads the new version before it retires the old one, and reloads the ensemble
    that depends on it), loads the ensemble if it was not loaded, and checks that exactly
    ``version`` is READY. Returns ``{"model", "classifier", "version", "ready_versions"}``.

    ``sync`` is called after each change of the pin and before Triton is told anything: for a
    repository kept in object storage, ``repo_dir`` is a local copy and ``sync`` uploads it.
    """
    from tasks.model.repo import classifier_name, serving_version, set_serving_version

    model_name = model_spec.name
    clf = classifier_name(model_name)
    previous = serving_version(repo_dir, model_name)
    set_serving_version(repo_dir, model_spec, version)
    publish = sync or (lambda: None)
    try:
        publish()
        client.load_model(clf)
        if not client.model_ready(model_name):
            client.load_model(model_name)
        client.wait_model_ready(clf, version, timeout=timeout)
        client.wait_model_ready(model_name, timeout=timeout)
        ready = client.ready_versions(clf)
        if ready != [version]:
            raise TritonError(f"Triton at {client.url}: after loading, {clf} serves versions {ready}, expected "
                              f"[{version}]", url=client.url, model=clf, what="serve version")
    except TritonError as exc:
        # Triton keeps serving the old version when the new one fails to load: make the files say so too
        if previous is not None and previous != version:
            try:
                set_serving_version(repo_dir, model_spec, previous)
                publish()
                note = f"; config.pbtxt pins version {previous} again (Triton keeps serving it if it was loaded)"
            except Exception as restore_exc:  # noqa: BLE001 - report both failures
                note = f"; restoring the pin on version {previous} failed too: {restore_exc}"
        else:
            note = ""
        raise TritonError(f"{exc}{note}", url=client.url, model=clf, what="serve version",
                          unreachable=exc.unreachable) from exc
    logger.info("Triton at %s serves %s version %d", client.url, clf, version)
    return {"model": model_name, "classifier": clf, "version": version, "ready_versions": ready}
