"""deploy / rollback against a REAL local Triton (nvidia-pytriton's tritonserver) and real trained models.

One Triton serves a repository this module controls; each test deploys its own ensemble name
(``dep_<n>``), so tests share the server but not state. QC verdicts are recorded directly
(``mark_qc_passed``): the gate itself is tested in tests/test_qc.py.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tasks.config import load_settings
from tasks.contracts.errors import EXIT_BAD_INPUT, EXIT_REJECTED, EXIT_TRANSIENT
from tasks.contracts.serving import FRAME_ERROR
from tasks.model import repo as model_repo
from tasks.steps import registry
from tasks.steps.deploy import (
    LOCK_NAME, DeployError, ServingTarget, TritonDown, deploy, main as deploy_main, rollback, smoke_samples, status)
from tasks.local.procs import free_port
from tasks.adapters.triton import TritonClient
from tasks.local.triton import LocalTriton
from tests.support.models import export_wrong_shape_onnx, mark_qc_passed, register_files, register_model
from tests.support.triton import build_tiny_onnx
from tests.support.spec_models import use_specs, write_spec

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SPEC = load_settings().model_spec("digits")  # every dep_<n> model is a copy of it under its own name
_names = itertools.count(1)


@pytest.fixture(scope="module")
def deploy_triton(tmp_path_factory):
    """A local Triton on an (initially empty) repository that the deploy step controls."""
    work = tmp_path_factory.mktemp("deploy-triton")
    repo = work / "repo"
    repo.mkdir()
    triton = LocalTriton(repo, work / "logs", backend_dir=work / "backends")
    triton.start(timeout=90)
    try:
        yield triton
    finally:
        triton.stop()


@pytest.fixture
def serving(deploy_triton, mlpipe_env, monkeypatch, tmp_path):
    """(ServingTarget over HTTP, a fresh ensemble name, a gRPC client); unloads the test's models after.

    The model's spec is the digits spec under the test's name (``MLPIPE_MODELS_DIR`` points at it)."""
    model = f"dep_{next(_names)}"
    write_spec(use_specs(monkeypatch, tmp_path / "models", "digits"), model, base="digits")
    target = ServingTarget(deploy_triton.model_repository, deploy_triton.http_url, "http", keep_versions=3)
    client = TritonClient(deploy_triton.grpc_url, protocol="grpc")
    try:
        yield target, model, client
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


def _expected_scores(onnx: Path, images: np.ndarray) -> np.ndarray:
    """The SCORE (top softmax probability) ONNX Runtime gives for decoded ``images``."""
    from tasks.model.networks import onnx_session, run_onnx, to_input

    logits, _ = run_onnx(onnx_session(onnx), to_input(images, SPEC), SPEC)
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (z / z.sum(axis=1, keepdims=True)).max(axis=1)


def _served_scores(client: TritonClient, model: str, frames: list[bytes]) -> np.ndarray:
    out = client.infer_frames(model, frames)
    assert not any(out[FRAME_ERROR].reshape(-1)), out[FRAME_ERROR]
    return np.asarray(out["SCORE"]).reshape(-1)


def _answers_like(client, model, onnx: Path, frames: list[bytes], images: np.ndarray) -> bool:
    """Whether ``model`` answers ``frames`` with the scores ``onnx`` gives for their decoded ``images``."""
    return bool(np.max(np.abs(_served_scores(client, model, frames) - _expected_scores(onnx, images))) < 1e-4)


def test_deploy_v1_then_v2_then_rollback(serving, store, good_model, good_model_t, capsys):
    target, model, client = serving
    frames, images, labels = smoke_samples(SPEC, 32)
    v1 = _register(store, good_model, model)
    v2 = _register(store, good_model_t, model)
    assert not np.allclose(_expected_scores(good_model.onnx, images), _expected_scores(good_model_t.onnx, images),
                           atol=1e-3), "the two versions must be distinguishable by their scores"

    first = deploy(store, model, v1, target)
    assert first["deployed_version"] == v1 and first["previous_version"] is None
    assert first["archived_version"] is None and first["pruned"] == []
    assert first["smoke"]["accuracy"] >= 0.9 and first["smoke"]["max_score_diff"] < 1e-3
    # the smoke test also sent one request of the ensemble's declared max batch (what the consumer may send)
    from tasks.contracts.serving import MAX_BATCH
    assert first["smoke"]["full_batch"] == MAX_BATCH
    assert (target.repo_dir / LOCK_NAME).is_file()
    assert not any(m["name"].startswith(".") for m in client.repository_index())  # Triton ignores the lock file
    assert _answers_like(client, model, good_model.onnx, frames, images)

    second = deploy(store, model, v2, target)
    assert set(second) == {"model", "deployed_version", "previous_version", "archived_version", "smoke", "pruned"}
    assert (second["deployed_version"], second["previous_version"], second["archived_version"]) == (v2, v1, v1)
    assert registry.get_version(store, model, v2)["stage"] == "production"
    assert registry.get_version(store, model, v1)["stage"] == "archived"
    assert model_repo.serving_version(target.repo_dir, model) == v2
    assert client.ready_versions(model_repo.classifier_name(model)) == [v2]
    assert _answers_like(client, model, good_model_t.onnx, frames, images)
    out = client.infer_frames(model, frames)
    assert np.mean(np.asarray(out["LABEL"]).reshape(-1) == labels) >= 0.9
    assert np.asarray(out["EMBEDDING"]).shape == (32, SPEC.embedding_dim)

    # re-running the same deploy (an Airflow retry) is a no-op apart from the smoke test
    again = deploy(store, model, v2, target)
    assert again["previous_version"] == v2 and again["archived_version"] is None
    assert [e["event"] for e in registry.events(store, model)].count("deploy") == 3

    # rollback through the CLI, as the rollback DAG runs it
    code = deploy_main(["--model", model, "--repo", str(target.repo_dir), "--triton-url", target.triton_url,
                        "rollback", "--version", str(v1), "--reason", "test: v2 misbehaves"])
    assert code == 0, capsys.readouterr().err
    assert model_repo.serving_version(target.repo_dir, model) == v1
    assert _answers_like(client, model, good_model.onnx, frames, images)
    assert registry.get_version(store, model, v1)["stage"] == "production"
    assert registry.get_version(store, model, v2)["stage"] == "archived"
    rb = [e for e in registry.events(store, model) if e["event"] == "rollback"]
    assert len(rb) == 1 and rb[0]["version"] == v1 and rb[0]["previous"] == v2
    assert rb[0]["reason"] == "test: v2 misbehaves"
    assert status(target, model, store)["triton_ready_versions"] == [v1]

    # rollback to a version that does not exist: a clear error, nothing changes
    capsys.readouterr()
    code = deploy_main(["--model", model, "--repo", str(target.repo_dir), "--triton-url", target.triton_url,
                        "rollback", "--version", "99"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"error: model '{model}' has no version 99 (known versions: ")
    assert model_repo.serving_version(target.repo_dir, model) == v1
    assert _answers_like(client, model, good_model.onnx, frames, images)


def test_module_entry_point_errors_are_one_line(mlpipe_env, store, tmp_path):
    env = {**os.environ, "MLPIPE_MODEL_REPO": str(tmp_path / "repo"), "MLPIPE_TRITON_URL": f"127.0.0.1:{free_port()}"}
    proc = subprocess.run([sys.executable, "-m", "tasks.cli", "deploy", "rollback", "--version", "3"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_BAD_INPUT
    assert proc.stderr.strip().splitlines() == ["error: model 'digits' has no version 3 (known versions: none)"]
    proc = subprocess.run([sys.executable, "-m", "tasks.cli", "deploy", "status"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    st = json.loads(proc.stdout)
    assert st["triton_live"] is False and st["serving_version"] is None and st["champion"] is None


def test_deploy_refuses_versions_without_a_passed_qc(serving, store, good_model):
    target, model, _client = serving
    v = register_model(store, good_model, model)  # no QC verdict
    with pytest.raises(registry.RegistryError, match="has not passed the QC gate"):
        deploy(store, model, v, target)
    registry.set_stage(store, model, v, "rejected", "QC gate failed: accuracy")
    with pytest.raises(registry.RegistryError, match="was rejected"):
        deploy(store, model, v, target)
    with pytest.raises(registry.RegistryError, match="rejected by QC"):
        rollback(store, model, v, target)
    assert not (target.repo_dir / model_repo.classifier_name(model)).exists()


def test_deploy_with_triton_down_exits_75_and_changes_nothing(serving, store, good_model, capsys):
    target, model, client = serving
    v1 = _register(store, good_model, model)
    deploy(store, model, v1, target)
    v2 = _register(store, good_model, model)
    config = target.repo_dir / model_repo.classifier_name(model) / "config.pbtxt"
    before = (config.read_bytes(), config.stat().st_mtime_ns)
    dead = f"127.0.0.1:{free_port()}"

    code = deploy_main(["--model", model, "--repo", str(target.repo_dir), "--triton-url", dead,
                        "deploy", "--version", str(v2)])

    err = capsys.readouterr().err
    assert code == EXIT_TRANSIENT and "Traceback" not in err
    assert f"error: Triton at {dead} (http) is not reachable" in err and f"pins v{v1}" in err
    assert (config.read_bytes(), config.stat().st_mtime_ns) == before
    assert model_repo.list_versions(target.repo_dir, model) == [v1]
    assert registry.get_version(store, model, v2)["stage"] == "candidate"
    assert registry.champion(store, model)["version"] == v1
    with pytest.raises(TritonDown):
        rollback(store, model, v1, ServingTarget(target.repo_dir, dead))
    failed = [e for e in registry.events(store, model) if e["event"].endswith("_failed")]
    assert [(e["event"], e["transient"]) for e in failed] == [("deploy_failed", True), ("rollback_failed", True)]


def test_failed_first_deploy_leaves_nothing_served(serving, store, tmp_path):
    """No earlier version to fall back to: the failed version is unloaded and removed, the config put back."""
    target, model, client = serving
    v = register_files(store, model, {"model.onnx": build_tiny_onnx(tmp_path / "random.onnx", seed=5)})
    with pytest.raises(DeployError, match="there was no earlier version to restore: the classifier is unloaded"):
        deploy(store, model, v, target, force=True)
    clf = model_repo.classifier_name(model)
    assert model_repo.serving_version(target.repo_dir, model) is None  # the unpinned config is back
    assert model_repo.list_versions(target.repo_dir, model) == []
    assert client.ready_versions(clf) == [] and not client.model_ready(model)
    assert registry.champion(store, model) is None


def test_broken_models_fail_deploy_and_previous_version_keeps_answering(serving, store, good_model, tmp_path):
    target, model, client = serving
    frames, images, _ = smoke_samples(SPEC, 16)
    v1 = _register(store, good_model, model)
    deploy(store, model, v1, target)
    clf = model_repo.classifier_name(model)

    def still_v1() -> None:
        assert model_repo.serving_version(target.repo_dir, model) == v1
        assert client.ready_versions(clf) == [v1]
        assert _answers_like(client, model, good_model.onnx, frames, images)
        assert registry.champion(store, model)["version"] == v1
        assert model_repo.list_versions(target.repo_dir, model) == [v1]

    # 1. a corrupt model.onnx in the store for a version that passed QC
    v2 = _register(store, good_model, model)
    store.put_bytes(f"models/{model}/{v2}/model.onnx", np.random.default_rng(1).bytes(2048))
    with pytest.raises(DeployError, match=rf"deploy of {model} v{v2} \(nothing was changed, v{v1} still serves\): "
                                          "model.onnx is not a usable ONNX classifier"):
        deploy(store, model, v2, target)
    still_v1()
    failed = [e for e in registry.events(store, model) if e["event"] == "deploy_failed"]
    assert len(failed) == 1 and failed[0]["version"] == v2 and "not a usable ONNX" in failed[0]["reason"]
    assert registry.get_version(store, model, v2)["stage"] == "candidate"

    # 2. outputs of the wrong shape (the registry refuses such a run: replaced in the store after registering)
    v3 = _register(store, good_model, model)
    store.put_bytes(f"models/{model}/{v3}/model.onnx", export_wrong_shape_onnx(tmp_path / "wrong.onnx").read_bytes())
    with pytest.raises(DeployError, match=r"output 'logits' has shape \['N', 7\], expected \['N', 10\]"):
        deploy(store, model, v3, target)
    still_v1()

    # 3. a valid file that Triton loads but that answers wrongly (random weights): the smoke test
    #    fails after the switch, and deploy puts v1 back
    v4 = register_files(store, model, {"model.onnx": build_tiny_onnx(tmp_path / "random.onnx", seed=3)})
    with pytest.raises(DeployError) as exc:
        deploy(store, model, v4, target, force=True)
    assert "smoke test: only" in str(exc.value) and f"restored v{v1}, which answers again" in str(exc.value)
    still_v1()
    assert registry.get_version(store, model, v4)["stage"] == "candidate"

    # 4. the CLI says the same in one line, exit EXIT_REJECTED (final: not retried)
    code = deploy_main(["--model", model, "--repo", str(target.repo_dir), "--triton-url", target.triton_url,
                        "deploy", "--version", str(v2)])
    assert code == EXIT_REJECTED
    still_v1()


def test_zero_failed_requests_while_deploy_switches_versions(serving, store, good_model, good_model_t):
    target, model, client = serving
    frames, images, _ = smoke_samples(SPEC, 8)
    v1 = _register(store, good_model, model)
    v2 = _register(store, good_model_t, model)
    deploy(store, model, v1, target)
    s1, s2 = _expected_scores(good_model.onnx, images), _expected_scores(good_model_t.onnx, images)

    stop = threading.Event()
    seen: list[str] = []
    failures: list[str] = []

    def loop() -> None:
        with TritonClient(client.url, protocol="grpc") as c:
            for i in range(5000):
                if stop.is_set():
                    return
                j = i % len(images)
                try:
                    score = float(np.asarray(c.infer_frames(model, frames[j:j + 1])["SCORE"]).reshape(-1)[0])
                except Exception as exc:  # noqa: BLE001 - every failure is what this test counts
                    failures.append(f"request {i}: {exc}")
                    continue
                seen.append("v1" if abs(score - s1[j]) < 1e-4 else "v2" if abs(score - s2[j]) < 1e-4 else "?")

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    time.sleep(0.3)
    result = deploy(store, model, v2, target)
    time.sleep(1.0)
    stop.set()
    thread.join(timeout=30)

    print(f"\n{len(seen)} requests during the switch: {seen.count('v1')} answered by v1, {seen.count('v2')} by v2, "
          f"{len(failures)} failed")
    assert result["deployed_version"] == v2
    assert failures == [], failures[:3]
    assert len(seen) > 20 and "?" not in seen
    assert seen[0] == "v1" and seen[-1] == "v2"
    last_v1 = max(i for i, s in enumerate(seen) if s == "v1")
    assert all(s == "v2" for s in seen[last_v1 + 1:])  # one switch, no flapping back


def test_keep_last_n_versions_and_rollback_to_a_pruned_version(serving, store, good_model, good_model_t):
    target, model, client = serving
    target = ServingTarget(target.repo_dir, target.triton_url, "http", keep_versions=2)
    frames, images, _ = smoke_samples(SPEC, 16)
    versions = [_register(store, m, model) for m in (good_model, good_model_t, good_model)]

    pruned = [deploy(store, model, v, target)["pruned"] for v in versions]

    assert pruned == [[], [], [versions[0]]]
    assert model_repo.list_versions(target.repo_dir, model) == versions[1:]
    assert [v["stage"] for v in registry.all_versions(store, model)] == ["archived", "archived", "production"]
    # v1 is gone from the repository but not from the registry: rollback writes it again
    rollback(store, model, versions[0], target, reason="test: back to the first")
    assert model_repo.serving_version(target.repo_dir, model) == versions[0]
    assert versions[0] in model_repo.list_versions(target.repo_dir, model)
    assert _answers_like(client, model, good_model.onnx, frames, images)
    assert status(target, model)["versions_in_repo"] == sorted(model_repo.list_versions(target.repo_dir, model))
