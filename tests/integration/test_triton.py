"""Integration tests against the real tritonserver of the nvidia-pytriton wheel (no mocks): model ``digits``,
its golden-like images sent as PNG frames (tests/integration/test_triton_frames.py: other encodings, bad
frames, a second model shape)."""

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

from tasks.config import load_settings
from tasks.contracts.serving import FRAME_ERROR, FRAME_INPUT
from tasks.model import repo as mr
from tasks.local.procs import http_ok
from tasks.adapters.triton import TritonClient, TritonError
from tasks.local.triton import LocalTriton
from tasks.model.frames import encode_frame
from tasks.model.networks import onnx_session, run_onnx, to_input
from tasks.model.serve import serve_classifier_version
from tests.support.triton import MODEL_NAME, build_tiny_onnx, sample_images

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SPEC = load_settings().model_spec(MODEL_NAME)


def _ort_outputs(onnx_path: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return run_onnx(onnx_session(onnx_path), to_input(images, SPEC), SPEC)


def _frames(images: np.ndarray) -> list[bytes]:
    """``images`` as the PNG frames a producer sends (lossless: they decode to ``images``)."""
    return [encode_frame(img, SPEC) for img in images]


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
    repo = mr.render_repo("local", tmp_path / "repo", SPEC)
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
                assert set(index) == set(mr.model_names(MODEL_NAME))
                assert not any(state == "READY" for state in index.values())
                assert client.model_ready(mr.preprocess_name(MODEL_NAME)) is False
        pid = triton.pid
    assert not triton.alive()
    assert _group_gone(pid), "backend stubs survived stop()"
    assert "Started GRPCInferenceService at 127.0.0.1" in triton.log_path.read_text()


def test_infer_batch_matches_onnxruntime(triton_server):
    images = sample_images(32, seed=1)
    logits, emb = _ort_outputs(triton_server.onnx_v1, images)
    for protocol in ("grpc", "http"):
        with triton_server.client(protocol) as client:
            out = client.infer_frames(MODEL_NAME, _frames(images))
            expected = {"LABEL": (np.int64, (32, 1)), "SCORE": (np.float32, (32, 1)),
                        "TOPK_LABELS": (np.int64, (32, 3)), "TOPK_SCORES": (np.float32, (32, 3)),
                        "EMBEDDING": (np.float32, (32, SPEC.embedding_dim)), FRAME_ERROR: (np.object_, (32, 1))}
            assert {k: (v.dtype.type, v.shape) for k, v in out.items()} == expected
            assert not any(out[FRAME_ERROR].reshape(-1))
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
    with TritonClient(triton_server.grpc_url, max_batch_size=32) as client:
        out = client.infer_frames(MODEL_NAME, _frames(images))  # 4 requests
        single = client.infer_frames(MODEL_NAME, _frames(images[:1]))
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
        mr.write_classifier_version(repo, SPEC, 2, onnx_v2)
        # writing a version changes nothing served until the pin moves
        assert client.ready_versions(clf) == [1]
        # the hidden staging folder never shows up as a version in Triton's index
        assert {m["version"] for m in client.repository_index() if m["name"] == clf} <= {"1", "2", ""}
        try:
            result = serve_classifier_version(client, repo, SPEC, 2)
            assert result["ready_versions"] == [2]
            assert client.model_ready(clf, 2) and not client.model_ready(clf, 1)
            out = client.infer_frames(MODEL_NAME, _frames(images))
            np.testing.assert_array_equal(out["LABEL"][:, 0], logits_v2.argmax(1))
        finally:
            serve_classifier_version(client, repo, SPEC, 1)  # rollback, and leave the fixture as found
        assert client.ready_versions(clf) == [1]
        out = client.infer_frames(MODEL_NAME, _frames(images))
        np.testing.assert_array_equal(out["LABEL"][:, 0], logits_v1.argmax(1))


def test_broken_version_fails_to_load_and_old_version_keeps_serving(triton_server):
    repo = triton_server.repo
    clf = mr.classifier_name(MODEL_NAME)
    vdir = mr.write_classifier_version(repo, SPEC, 3, triton_server.onnx_v1)
    (vdir / "model.onnx").write_bytes(b"corrupted after the write")
    with triton_server.client() as client:
        with pytest.raises(TritonError) as err:
            serve_classifier_version(client, repo, SPEC, 3, timeout=30)
        msg = str(err.value)
        assert triton_server.grpc_url in msg and clf in msg and "version 3" in msg
        assert "pins version 1 again" in msg
        assert mr.serving_version(repo, MODEL_NAME) == 1
        assert client.ready_versions(clf) == [1]
        assert client.infer_frames(MODEL_NAME, _frames(sample_images(2)))["LABEL"].shape == (2, 1)
    mr.remove_version(repo, MODEL_NAME, 3)


def test_malformed_input_gives_clear_error_and_server_stays_up(triton_server):
    frames = _frames(sample_images(2))
    with triton_server.client() as client:
        with pytest.raises(TritonError) as err:  # two frames in one row: FRAME is [N, 1]
            client.infer(MODEL_NAME, {FRAME_INPUT: np.array([frames], dtype=object)}, ["LABEL"])
        msg = str(err.value)
        assert triton_server.grpc_url in msg and repr(MODEL_NAME) in msg and "unexpected shape" in msg
        assert not err.value.unreachable
        with pytest.raises(TritonError, match="data-type is 'UINT8', but model 'digits' expects 'BYTES'"):
            client.infer(MODEL_NAME, {FRAME_INPUT: np.zeros((2, 1), np.uint8)}, ["LABEL"])
        with pytest.raises(TritonError, match="batch-size must be <= 256"):
            client.infer(MODEL_NAME, {FRAME_INPUT: np.array(frames * 129, dtype=object)[:257, None]}, ["LABEL"])
        with pytest.raises(TritonError, match="no frames given"):
            client.infer_frames(MODEL_NAME, [])
        # bad values reaching a Python model: an error for that request, not a crash
        post = mr.postprocess_name(MODEL_NAME)
        with pytest.raises(TritonError, match=f"{post}: input 'LOGITS' holds non-finite values"):
            client.infer(post, {"LOGITS": np.full((2, SPEC.num_classes), np.nan, np.float32)}, ["LABEL"])
        with pytest.raises(TritonError, match="'nope' is not found"):
            client.infer_frames("nope", frames)
        assert client.is_live() and client.is_ready() and client.model_ready(MODEL_NAME)
        assert client.infer_frames(MODEL_NAME, _frames(sample_images(4)))["LABEL"].shape == (4, 1)


def test_killed_server_gives_error_naming_the_url(tmp_path, _tiny_onnx_cache):
    repo = mr.render_repo("local", tmp_path / "repo", SPEC)
    mr.write_classifier_version(repo, SPEC, 1, _tiny_onnx_cache)
    mr.set_serving_version(repo, SPEC, 1)
    triton = LocalTriton(repo, tmp_path / "logs", backend_dir=tmp_path / "backends", load_models=[MODEL_NAME])
    triton.start()
    try:
        grpc_c, http_c = triton.client("grpc", timeout=5), triton.client("http", timeout=5)
        assert grpc_c.infer_frames(MODEL_NAME, _frames(sample_images(2)))["LABEL"].shape == (2, 1)
        pid = triton.pid
        triton.kill()
        for client, url in ((grpc_c, triton.grpc_url), (http_c, triton.http_url)):
            assert client.is_live() is False
            with pytest.raises(TritonError) as err:
                client.infer_frames(MODEL_NAME, _frames(sample_images(2)))
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
    repo = mr.render_repo("local", tmp_path / "repo", SPEC)
    mr.write_classifier_version(repo, SPEC, 1, _tiny_onnx_cache)
    mr.set_serving_version(repo, SPEC, 1)
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
            assert client.infer_frames(MODEL_NAME, _frames(sample_images(3)))["LABEL"].shape == (3, 1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not state.exists()
        assert _group_gone(info["pid"])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
