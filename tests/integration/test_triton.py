"""Integration tests against the real tritonserver of the nvidia-pytriton wheel (no mocks)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tasks.model import repo as mr
from tasks.local.procs import http_ok
from tasks.adapters.triton import TritonClient, TritonError
from tasks.local.triton import LocalTriton
from tasks.model.serve import serve_classifier_version
from tests.support.triton import MODEL_NAME, build_tiny_onnx, sample_images

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _ort_outputs(onnx_path: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits, emb = sess.run(["logits", "embedding"], {"input": images[:, None].astype(np.float32) / 255.0})
    return logits, emb


def _group_gone(pgid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def test_start_stop_health_and_loopback_only(tmp_path, _tiny_onnx_cache):
    repo = mr.render_repo("local", tmp_path / "repo", MODEL_NAME)
    triton = LocalTriton(repo, tmp_path / "logs", backend_dir=tmp_path / "backends")
    with triton:
        assert triton.pid and triton.alive()
        assert triton.startup_s is not None and triton.startup_s < 60
        for url in (triton.http_url, triton.grpc_url):
            assert url.startswith("127.0.0.1:")
        assert http_ok(f"http://{triton.http_url}/v2/health/live")
        assert http_ok(triton.metrics_url)
        for protocol in ("grpc", "http"):
            with triton.client(protocol) as client:
                assert client.is_live() and client.is_ready()
                # explicit model control: nothing loaded, but the repository is indexed
                index = {m["name"]: m["state"] for m in client.repository_index()}
                assert set(index) == {"digits", "digits_classifier", "preprocess", "postprocess"}
                assert not any(state == "READY" for state in index.values())
                assert client.model_ready("preprocess") is False
        pid = triton.pid
    assert not triton.alive()
    assert _group_gone(pid), "backend stubs survived stop()"
    assert "Started GRPCInferenceService at 127.0.0.1" in triton.log_path.read_text()


def test_infer_batch_matches_onnxruntime(triton_server):
    images = sample_images(32, seed=1)
    logits, emb = _ort_outputs(triton_server.onnx_v1, images)
    for protocol in ("grpc", "http"):
        with triton_server.client(protocol) as client:
            out = client.infer_images(MODEL_NAME, images)
            expected = {"LABEL": (np.int64, (32, 1)), "SCORE": (np.float32, (32, 1)),
                        "TOPK_LABELS": (np.int64, (32, 3)), "TOPK_SCORES": (np.float32, (32, 3)),
                        "EMBEDDING": (np.float32, (32, 64))}
            assert {k: (v.dtype.type, v.shape) for k, v in out.items()} == expected
            np.testing.assert_array_equal(out["LABEL"][:, 0], logits.argmax(axis=1))
            probs = np.exp(logits - logits.max(1, keepdims=True))
            probs /= probs.sum(1, keepdims=True)
            np.testing.assert_allclose(out["SCORE"][:, 0], probs.max(1), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(out["EMBEDDING"], emb, rtol=1e-4, atol=1e-5)
            np.testing.assert_array_equal(out["TOPK_LABELS"][:, 0], out["LABEL"][:, 0])
            assert np.all(np.diff(out["TOPK_SCORES"], axis=1) <= 0)


def test_batches_above_max_batch_size_are_split(triton_server):
    images = sample_images(100, seed=2)
    logits, _ = _ort_outputs(triton_server.onnx_v1, images)
    with triton_server.client() as client:
        out = client.infer_images(MODEL_NAME, images)
        single = client.infer_images(MODEL_NAME, images[0])  # one [28, 28] image
    assert out["LABEL"].shape == (100, 1)
    np.testing.assert_array_equal(out["LABEL"][:, 0], logits.argmax(axis=1))
    assert single["LABEL"].shape == (1, 1) and single["LABEL"][0, 0] == logits[0].argmax()


def test_write_version_2_and_switch_serving_version(triton_server, tmp_path):
    repo = triton_server.repo
    images = sample_images(16, seed=3)
    onnx_v2 = build_tiny_onnx(tmp_path / "v2.onnx", seed=1)
    logits_v1, _ = _ort_outputs(triton_server.onnx_v1, images)
    logits_v2, _ = _ort_outputs(onnx_v2, images)
    assert not np.array_equal(logits_v1.argmax(1), logits_v2.argmax(1)), "seeds should give different models"
    clf = mr.classifier_name(MODEL_NAME)
    with triton_server.client() as client:
        mr.write_classifier_version(repo, MODEL_NAME, 2, onnx_v2)
        # writing a version changes nothing served until the pin moves
        assert client.ready_versions(clf) == [1]
        # the hidden staging folder never shows up as a version in Triton's index
        assert {m["version"] for m in client.repository_index() if m["name"] == clf} <= {"1", "2", ""}
        try:
            result = serve_classifier_version(client, repo, MODEL_NAME, 2)
            assert result["ready_versions"] == [2]
            assert client.model_ready(clf, 2) and not client.model_ready(clf, 1)
            out = client.infer_images(MODEL_NAME, images)
            np.testing.assert_array_equal(out["LABEL"][:, 0], logits_v2.argmax(1))
        finally:
            serve_classifier_version(client, repo, MODEL_NAME, 1)  # rollback, and leave the fixture as found
        assert client.ready_versions(clf) == [1]
        out = client.infer_images(MODEL_NAME, images)
        np.testing.assert_array_equal(out["LABEL"][:, 0], logits_v1.argmax(1))


def test_broken_version_fails_to_load_and_old_version_keeps_serving(triton_server):
    repo = triton_server.repo
    clf = mr.classifier_name(MODEL_NAME)
    vdir = mr.write_classifier_version(repo, MODEL_NAME, 3, triton_server.onnx_v1)
    (vdir / "model.onnx").write_bytes(b"corrupted after the write")
    with triton_server.client() as client:
        with pytest.raises(TritonError) as err:
            serve_classifier_version(client, repo, MODEL_NAME, 3, timeout=30)
        msg = str(err.value)
        assert triton_server.grpc_url in msg and clf in msg and "version 3" in msg
        assert "pins version 1 again" in msg
        assert mr.serving_version(repo, MODEL_NAME) == 1
        assert client.ready_versions(clf) == [1]
        assert client.infer_images(MODEL_NAME, sample_images(2))["LABEL"].shape == (2, 1)
    mr.remove_version(repo, MODEL_NAME, 3)


def test_malformed_input_gives_clear_error_and_server_stays_up(triton_server):
    with triton_server.client() as client:
        with pytest.raises(TritonError) as err:
            client.infer(MODEL_NAME, {"IMAGE": np.zeros((2, 32, 32), np.uint8)}, ["LABEL"])
        msg = str(err.value)
        assert triton_server.grpc_url in msg and repr(MODEL_NAME) in msg and "unexpected shape" in msg
        assert not err.value.unreachable
        with pytest.raises(TritonError, match="data-type is 'FP32', but model 'digits' expects 'UINT8'"):
            client.infer(MODEL_NAME, {"IMAGE": np.zeros((2, 28, 28), np.float32)}, ["LABEL"])
        with pytest.raises(TritonError, match="batch-size must be <= 256"):
            client.infer(MODEL_NAME, {"IMAGE": np.zeros((257, 28, 28), np.uint8)}, ["LABEL"])
        with pytest.raises(TritonError, match="must be uint8 pixels 0..255"):
            client.infer_images(MODEL_NAME, np.full((1, 28, 28), 300, np.int32))
        # bad values reaching a Python model: an error for that request, not a crash
        with pytest.raises(TritonError, match="postprocess: input 'LOGITS' holds non-finite values"):
            client.infer("postprocess", {"LOGITS": np.full((2, 10), np.nan, np.float32)}, ["LABEL"])
        with pytest.raises(TritonError, match="'nope' is not found"):
            client.infer_images("nope", sample_images(1))
        assert client.is_live() and client.is_ready() and client.model_ready(MODEL_NAME)
        assert client.infer_images(MODEL_NAME, sample_images(4))["LABEL"].shape == (4, 1)


def test_killed_server_gives_error_naming_the_url(tmp_path, _tiny_onnx_cache):
    repo = mr.render_repo("local", tmp_path / "repo", MODEL_NAME)
    mr.write_classifier_version(repo, MODEL_NAME, 1, _tiny_onnx_cache)
    mr.set_serving_version(repo, MODEL_NAME, 1)
    triton = LocalTriton(repo, tmp_path / "logs", backend_dir=tmp_path / "backends", load_models=[MODEL_NAME])
    triton.start()
    try:
        grpc_c, http_c = triton.client("grpc", timeout=5), triton.client("http", timeout=5)
        assert grpc_c.infer_images(MODEL_NAME, sample_images(2))["LABEL"].shape == (2, 1)
        pid = triton.pid
        triton.kill()
        for client, url in ((grpc_c, triton.grpc_url), (http_c, triton.http_url)):
            assert client.is_live() is False
            with pytest.raises(TritonError) as err:
                client.infer_images(MODEL_NAME, sample_images(2))
            assert f"Triton at {url} is not reachable" in str(err.value)
            assert err.value.unreachable and err.value.url == url and err.value.model == MODEL_NAME
            with pytest.raises(TritonError, match=f"Triton at {url} is not reachable"):
                client.load_model(MODEL_NAME)
            client.close()
    finally:
        triton.stop()
    assert _group_gone(pid), "backend stubs survived the killed server"


def test_cli_status_and_serve(tmp_path, triton_server, _tiny_onnx_cache):
    env = {**os.environ, "MLPIPE_HOME": str(tmp_path / "var")}
    out = subprocess.run([sys.executable, "-m", "tasks.cli", "triton", "status", "--url", triton_server.grpc_url,
                          "--model", MODEL_NAME], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["live"] and status["model_ready"] == {MODEL_NAME: True}

    from tasks.local.procs import free_port

    dead = subprocess.run([sys.executable, "-m", "tasks.cli", "triton", "load", "--url", f"127.0.0.1:{free_port()}",
                           "--model", MODEL_NAME], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert dead.returncode == 1 and dead.stderr.startswith("error: Triton at 127.0.0.1:")
    assert "Traceback" not in dead.stderr

    # `serve` in the foreground (what `make up` runs), stopped with SIGTERM
    repo = mr.render_repo("local", tmp_path / "repo", MODEL_NAME)
    mr.write_classifier_version(repo, MODEL_NAME, 1, _tiny_onnx_cache)
    mr.set_serving_version(repo, MODEL_NAME, 1)
    state = tmp_path / "triton.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tasks.cli", "triton", "serve", "--model-repository", str(repo), "--load-model", MODEL_NAME,
         "--state-file", str(state), "--backend-dir", str(tmp_path / "backends"), "--log-dir", str(tmp_path / "logs")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert state.exists(), proc.stderr.read() if proc.poll() is not None else "no state file"
        info = json.loads(state.read_text())
        with TritonClient(info["grpc_url"]) as client:
            assert client.infer_images(MODEL_NAME, sample_images(3))["LABEL"].shape == (3, 1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not state.exists()
        assert _group_gone(info["pid"])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
