"""deploy / rollback with Triton's model repository in object storage (the production layout).

What the bundled tritonserver 2.51 (nvidia-pytriton 0.7.0) does with ``s3://``: it reads it. Its
libtritonserver is built with the S3 filesystem (the binary holds the parser of
``s3://host:port/bucket/path`` and reads ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_DEFAULT_REGION``); started with ``--model-repository=s3://127.0.0.1:<port>/<bucket>/repo``
against moto's S3 server on loopback it logs ``Using credential ... for path s3://...``, downloads
each model folder it is asked to load into a temporary folder, loads it, and reloads the
classifier when its config.pbtxt object changes. So these tests run the real thing: deploy writes
the repository to S3 (through ``tasks.adapters.storage``), a ``LocalTriton`` reading only the
``s3://`` URL loads and serves the pinned version, and a rollback switches it.

Conditional writes (the cross-node lease): moto 5.2.5 honours ``If-None-Match: *`` and
``If-Match`` on PutObject (412 PreconditionFailed), but only when the header really is sent:
``Minio.put_object`` of minio 7.2.20 has no ``headers`` parameter, and ``metadata=`` turns
``If-None-Match`` into ``x-amz-meta-if-none-match`` (the second PUT then silently overwrites). The
store's ``put_if_absent`` / ``put_if_match`` send the real headers; the lease uses those.

Nothing here leaves loopback: explicit endpoint and credentials, ``AWS_EC2_METADATA_DISABLED``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tasks.adapters.storage import S3Store
from tasks.adapters.triton import TritonClient
from tasks.config import load_settings
from tasks.contracts.serving import FRAME_ERROR
from tasks.local.triton import LocalTriton
from tasks.model import repo as model_repo
from tasks.steps import registry
from tasks.steps.deploy import (
    KEEP_NAME, LOCK_NAME, RepoBusy, RepoLease, ServingTarget, deploy, rollback, smoke_samples, status)
from tests.support.models import mark_qc_passed, register_model
from tests.support.spec_models import use_specs, write_spec

pytestmark = pytest.mark.integration
SPEC = load_settings().model_spec("digits")  # every s3dep_<n> model is a copy of it under its own name
REPO_BUCKET = "mlpipe-models"
REPO_PREFIX = "repo"
_names = itertools.count(1)


def _plain(value) -> str:
    """A setting as a plain string (secrets may be held as ``SecretStr``)."""
    return value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)


class S3Triton(LocalTriton):
    """The bundled tritonserver reading ONLY an ``s3://`` model repository (``model_repository``, a
    local folder ``LocalTriton`` insists on, is replaced on the command line)."""

    def __init__(self, s3_url: str, s3, placeholder: Path, log_dir: Path, **kwargs) -> None:
        super().__init__(placeholder, log_dir, **kwargs)
        self.s3_url, self._s3 = s3_url, s3

    def _argv(self, backend_dir: Path) -> list[str]:
        return [f"--model-repository={self.s3_url}" if a.startswith("--model-repository=") else a
                for a in super()._argv(backend_dir)]

    def _env(self, libpython_dir: str) -> dict[str, str]:
        env = super()._env(libpython_dir)
        env.update(AWS_ACCESS_KEY_ID=_plain(self._s3.access_key), AWS_SECRET_ACCESS_KEY=_plain(self._s3.secret_key),
                   AWS_DEFAULT_REGION=_plain(self._s3.region), AWS_EC2_METADATA_DISABLED="true")
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_CONFIG_FILE",
                    "AWS_SHARED_CREDENTIALS_FILE"):
            env.pop(var, None)
        return env


@pytest.fixture(scope="module")
def repo_store(s3_endpoint) -> S3Store:
    st = S3Store(REPO_BUCKET, s3_endpoint, prefix=REPO_PREFIX)
    st.put_bytes(KEEP_NAME, b"")  # the repository "folder" exists before Triton starts
    return st


@pytest.fixture(scope="module")
def s3_triton(s3_endpoint, repo_store, tmp_path_factory):
    work = tmp_path_factory.mktemp("s3-triton")
    (work / "unused-local-repo").mkdir()
    url = f"s3://{s3_endpoint.endpoint}/{REPO_BUCKET}/{REPO_PREFIX}"
    triton = S3Triton(url, s3_endpoint, work / "unused-local-repo", work / "logs", backend_dir=work / "backends")
    triton.start(timeout=90)
    try:
        yield triton
    finally:
        triton.stop()


@pytest.fixture
def s3_env(mlpipe_env, s3_endpoint, monkeypatch):
    """The production settings: registry and repository in the S3 endpoint (moto on loopback)."""
    monkeypatch.setenv("MLPIPE_STORE_URL", "s3://mlpipe-registry")
    monkeypatch.setenv("MLPIPE_S3_ENDPOINT", s3_endpoint.endpoint)
    monkeypatch.setenv("MLPIPE_S3_ACCESS_KEY", _plain(s3_endpoint.access_key))
    monkeypatch.setenv("MLPIPE_S3_SECRET_KEY", _plain(s3_endpoint.secret_key))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return s3_endpoint


@pytest.fixture
def served(s3_triton, s3_env, monkeypatch, tmp_path):
    """(registry store, ServingTarget on s3://, a fresh ensemble name, a gRPC client); the model's spec is the
    digits spec under that name (``MLPIPE_MODELS_DIR`` points at it)."""
    model = f"s3dep_{next(_names)}"
    write_spec(use_specs(monkeypatch, tmp_path / "models", "digits"), model, base="digits")
    store = S3Store("mlpipe-registry", s3_env)
    # flavour "local": the bundled Triton has only the Python backend (production renders onnxruntime)
    target = ServingTarget(f"s3://{REPO_BUCKET}/{REPO_PREFIX}", s3_triton.http_url, "http", keep_versions=3,
                           flavour="local")
    client = TritonClient(s3_triton.grpc_url, protocol="grpc")
    try:
        yield store, target, model, client
    finally:
        for name in model_repo.model_names(model):
            try:
                client.unload_model(name)
            except Exception:  # noqa: BLE001 - best effort
                pass
        client.close()


def _register(store, trained, model: str) -> int:
    v = register_model(store, trained, model)
    mark_qc_passed(store, model, v)
    return v


def _scores(client, model, frames: list[bytes]) -> np.ndarray:
    out = client.infer_frames(model, frames)
    assert not any(out[FRAME_ERROR].reshape(-1)), out[FRAME_ERROR]
    return np.asarray(out["SCORE"]).reshape(-1)


def _expected(onnx: Path, images) -> np.ndarray:
    """The SCORE ONNX Runtime gives for decoded ``images``."""
    from tasks.model.networks import onnx_session, run_onnx, to_input

    logits, _ = run_onnx(onnx_session(onnx), to_input(images, SPEC), SPEC)
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (z / z.sum(axis=1, keepdims=True)).max(axis=1)


def _pin(repo_store: S3Store, model: str) -> int | None:
    text = repo_store.get_bytes(f"{model_repo.classifier_name(model)}/config.pbtxt").decode()
    versions = ((model_repo.parse_config_text(text).get("version_policy") or {}).get("specific") or {}).get(
        "versions") or []
    return int(versions[0]) if len(versions) == 1 else None


def test_deploy_writes_the_repository_to_s3_and_triton_serves_it_from_there(
        served, repo_store, s3_triton, good_model, good_model_t):
    store, target, model, client = served
    clf = model_repo.classifier_name(model)
    frames, images, _ = smoke_samples(SPEC, 32)
    v1 = _register(store, good_model, model)
    v2 = _register(store, good_model_t, model)

    first = deploy(store, model, v1, target)
    assert first["deployed_version"] == v1 and first["previous_version"] is None
    keys = set(repo_store.list(""))
    # the rendered parts, the pinned version's files, the ensemble's (otherwise empty) version folder
    pre, post = model_repo.preprocess_name(model), model_repo.postprocess_name(model)
    for key in (model_repo.MARKER, f"{model}/config.pbtxt", f"{model}/1/{KEEP_NAME}", f"{pre}/config.pbtxt",
                f"{pre}/1/model.py", f"{pre}/1/frame_codec.py", f"{post}/config.pbtxt", f"{post}/1/model.py",
                f"{clf}/config.pbtxt", f"{clf}/{v1}/model.onnx", f"{clf}/{v1}/model.py",
                f"{clf}/{v1}/{model_repo.VERSION_META}"):
        assert key in keys, f"{key} missing from {repo_store.url}: {sorted(keys)}"
    assert LOCK_NAME not in keys, "the lease is released after the deploy"
    assert not [k for k in keys if "/.tmp-" in k or "/.trash-" in k]
    assert json.loads(repo_store.get_bytes(model_repo.MARKER))["flavour"] == "local"
    onnx = repo_store.get_bytes(f"{clf}/{v1}/model.onnx")
    assert onnx == store.get_bytes(f"models/{model}/{v1}/model.onnx")  # the registered file, byte for byte
    meta = json.loads(repo_store.get_bytes(f"{clf}/{v1}/{model_repo.VERSION_META}"))
    assert meta["onnx_sha256"] == hashlib.sha256(onnx).hexdigest() and meta["version"] == v1
    assert _pin(repo_store, model) == v1
    model_repo.validate_config_text(repo_store.get_bytes(f"{clf}/config.pbtxt").decode())
    # Triton (reading only s3://) serves exactly v1
    assert client.ready_versions(clf) == [v1]
    assert np.max(np.abs(_scores(client, model, frames) - _expected(good_model.onnx, images))) < 1e-4
    assert {m["name"] for m in client.repository_index()} >= set(model_repo.model_names(model))

    second = deploy(store, model, v2, target)
    assert (second["deployed_version"], second["previous_version"]) == (v2, v1)
    assert _pin(repo_store, model) == v2
    assert f"{clf}/{v2}/model.onnx" in repo_store.list(f"{clf}/")
    assert client.ready_versions(clf) == [v2]
    assert np.max(np.abs(_scores(client, model, frames) - _expected(good_model_t.onnx, images))) < 1e-4

    back = rollback(store, model, v1, target, reason="s3 test")  # at once: same-second config rewrites
    assert (back["serving_version"], back["previous_version"]) == (v1, v2)
    assert _pin(repo_store, model) == v1
    assert client.ready_versions(clf) == [v1]
    assert np.max(np.abs(_scores(client, model, frames) - _expected(good_model.onnx, images))) < 1e-4
    assert registry.get_version(store, model, v1)["stage"] == "production"

    st = status(target, model, store)
    assert st["repo"] == f"s3://{REPO_BUCKET}/{REPO_PREFIX}"
    assert (st["serving_version"], st["versions_in_repo"], st["triton_ready_versions"]) == (v1, [v1, v2], [v1])
    assert LOCK_NAME not in repo_store.list("")


def test_prune_deletes_old_versions_from_s3_and_a_pruned_version_rolls_back(
        served, repo_store, good_model, good_model_t):
    store, target, model, client = served
    clf = model_repo.classifier_name(model)
    target = ServingTarget(target.repo_dir, target.triton_url, "http", keep_versions=2, flavour="local")
    versions = [_register(store, m, model) for m in (good_model, good_model_t, good_model)]
    for v in versions:
        deploy(store, model, v, target)
    present = sorted({int(k.split("/")[1]) for k in repo_store.list(f"{clf}/") if k.count("/") == 2})
    assert present == versions[1:]
    rollback(store, model, versions[0], target, reason="pruned, re-written from the registry")
    assert _pin(repo_store, model) == versions[0]
    assert f"{clf}/{versions[0]}/model.onnx" in repo_store.list(f"{clf}/")
    assert client.ready_versions(clf) == [versions[0]]


def test_deploy_waits_for_the_lease_of_another_node_and_changes_nothing(served, repo_store, good_model):
    store, target, model, client = served
    v1 = _register(store, good_model, model)
    held = RepoLease(repo_store, "a deploy on another node", ttl_s=30).acquire()
    try:
        quick = ServingTarget(target.repo_dir, target.triton_url, "http", flavour="local", lock_timeout_s=1.5)
        with pytest.raises(RepoBusy, match="holds the lease"):
            deploy(store, model, v1, quick)
        assert not repo_store.list(f"{model_repo.classifier_name(model)}/")
        assert repo_store.get_json(LOCK_NAME)["owner"] == held.owner
    finally:
        held.release()
    assert LOCK_NAME not in repo_store.list("")


@pytest.fixture
def lease_store(s3_endpoint, request) -> S3Store:
    return S3Store("mlpipe-leases", s3_endpoint, prefix=request.node.name.replace("_", "-")[:60])


def test_lease_is_exclusive_and_released(lease_store):
    a = RepoLease(lease_store, "deploy a", ttl_s=30, timeout_s=0.5, poll_s=0.1).acquire()
    with pytest.raises(RepoBusy, match="deploy a"):
        RepoLease(lease_store, "deploy b", ttl_s=30, timeout_s=0.5, poll_s=0.1).acquire()
    a.release()
    with RepoLease(lease_store, "deploy b", ttl_s=30, timeout_s=0.5, poll_s=0.1) as b:
        assert lease_store.get_json(LOCK_NAME)["owner"] == b.owner
    assert not lease_store.exists(LOCK_NAME)


def test_lease_has_one_winner_among_concurrent_deployers(lease_store):
    winners, errors = [], []
    barrier = threading.Barrier(6)

    def contend(i: int) -> None:
        lease = RepoLease(lease_store, f"deploy {i}", ttl_s=30, timeout_s=0.3, poll_s=0.1)
        barrier.wait()
        try:
            lease.acquire()
            winners.append(lease)
        except RepoBusy as exc:
            errors.append(exc)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(winners) == 1 and len(errors) == 5
    finally:
        for w in winners:
            w.release()


def test_lease_is_renewed_while_held_and_a_dead_holders_lease_expires(lease_store):
    with RepoLease(lease_store, "long deploy", ttl_s=0.9, timeout_s=0.5, poll_s=0.1):
        first = lease_store.get_json(LOCK_NAME)
        time.sleep(1.5)  # longer than the TTL: the renewals keep it
        assert lease_store.get_json(LOCK_NAME)["renewals"] > first["renewals"]
        with pytest.raises(RepoBusy):
            RepoLease(lease_store, "other", ttl_s=0.9, timeout_s=0.5, poll_s=0.1).acquire()
    # a holder killed without releasing: its lease object stays, nobody renews it
    dead = {"owner": "node-x:1:dead", "what": "killed deploy", "ttl_s": 0.9, "renewed_at": time.time(), "renewals": 0}
    assert lease_store.put_json_if_absent(LOCK_NAME, dead)
    t0 = time.monotonic()
    with RepoLease(lease_store, "next deploy", ttl_s=0.9, timeout_s=10, poll_s=0.1) as nxt:
        assert 0.8 <= time.monotonic() - t0 < 5  # taken over once unchanged for a TTL
        assert nxt.took_over["owner"] == "node-x:1:dead"
    # long dead by the wall clock: taken over at once
    assert lease_store.put_json_if_absent(LOCK_NAME, {**dead, "renewed_at": time.time() - 3600})
    t0 = time.monotonic()
    with RepoLease(lease_store, "later deploy", ttl_s=30, timeout_s=10, poll_s=0.1):
        assert time.monotonic() - t0 < 1


def test_a_holder_that_lost_its_lease_stops_before_writing(lease_store):
    lease = RepoLease(lease_store, "slow deploy", ttl_s=0.6, timeout_s=0.5, poll_s=0.1).acquire()
    try:
        lease_store.put_json(LOCK_NAME, {"owner": "someone else", "renewed_at": time.time()})  # taken over
        time.sleep(0.6)
        with pytest.raises(RepoBusy, match="taken over by someone else"):
            lease.check()
    finally:
        lease.release()
    assert lease_store.get_json(LOCK_NAME)["owner"] == "someone else"  # release leaves another's lease alone


def test_serving_target_takes_an_s3_url(monkeypatch, tmp_path):
    t = ServingTarget(Path("s3://mlpipe-models/repo/"), "triton:8000")  # `--repo s3://...` through type=Path
    assert t.repo_url == "s3://mlpipe-models/repo" and t.default_flavour == "production"
    assert ServingTarget(tmp_path, "triton:8000").repo_url is None
    assert ServingTarget(str(tmp_path), "triton:8000").default_flavour == "local"
    with pytest.raises(ValueError, match="names no bucket"):
        ServingTarget("s3:///repo", "triton:8000")
    with pytest.raises(ValueError, match="unsupported model repository"):
        ServingTarget("gs://bucket/repo", "triton:8000")
    monkeypatch.setenv("MLPIPE_MODEL_REPO", "s3://mlpipe-models/repo")
    monkeypatch.setenv("MLPIPE_REPO_FLAVOUR", "local")
    monkeypatch.setenv("MLPIPE_DEPLOY_LEASE_TTL_S", "30")
    env = ServingTarget.from_env()
    assert (env.repo_url, env.flavour, env.lease_ttl_s) == ("s3://mlpipe-models/repo", "local", 30.0)


def test_mirror_uploads_the_pin_after_the_files_it_names(tmp_path, tiny_onnx):
    from tasks.adapters.storage import LocalStore
    from tasks.steps.deploy import RepoMirror

    class Recording(LocalStore):
        def __init__(self, root):
            super().__init__(root)
            self.log: list[tuple[str, str]] = []

        def put_file(self, key, path):
            self.log.append(("put", key))
            super().put_file(key, path)

        def delete(self, key):
            self.log.append(("delete", key))
            super().delete(key)

    remote = Recording(tmp_path / "bucket")
    mirror = RepoMirror(remote, tmp_path / "work")
    mirror.pull()
    spec = SPEC.model_copy(update={"name": "m"})
    model_repo.render_repo("local", mirror.root, spec)
    model_repo.write_classifier_version(mirror.root, spec, 1, tiny_onnx)
    model_repo.set_serving_version(mirror.root, spec, 1)
    mirror.push()
    puts = [k for op, k in remote.log if op == "put"]
    assert puts[-1] == model_repo.MARKER
    assert puts.index("m_classifier/config.pbtxt") > puts.index("m_classifier/1/model.onnx")
    assert f"m/1/{KEEP_NAME}" in puts  # the ensemble's empty version folder exists in object storage
    # nothing changed: nothing is uploaded; a second version and a re-pin upload only those
    remote.log.clear()
    assert mirror.push() == {"uploaded": [], "deleted": []}
    model_repo.write_classifier_version(mirror.root, spec, 2, tiny_onnx)
    model_repo.set_serving_version(mirror.root, spec, 2)
    model_repo.remove_version(mirror.root, "m", 1)
    result = mirror.push()
    assert result["uploaded"][-1] == "m_classifier/config.pbtxt"
    assert all(k.startswith("m_classifier/2/") for k in result["uploaded"][:-1])
    assert sorted(result["deleted"]) == sorted(f"m_classifier/1/{n}" for n in ("model.onnx", "model.py",
                                                                             model_repo.VERSION_META))
    ops = [op for op, _ in remote.log]
    assert ops.index("delete") > max(i for i, op in enumerate(ops) if op == "put")  # deletions last
    # a fresh copy of the store is the same repository
    again = RepoMirror(remote, tmp_path / "work2")
    again.pull()
    assert model_repo.serving_version(again.root, "m") == 2 and model_repo.list_versions(again.root, "m") == [2]
    model_repo.validate_repo(again.root)
