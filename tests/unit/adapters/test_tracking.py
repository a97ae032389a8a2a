"""tasks.adapters.clearml: ClearML offline sessions, fallback from an unreachable server, registry mirror.

No ClearML server is available here: every test runs ClearML for real in offline mode,
and the fallback tests point it at loopback ports where nothing (or something that is
not ClearML) answers.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
import zipfile
from pathlib import Path

import pytest

from tasks.adapters import clearml as tracking
from tasks.local.procs import free_port


@pytest.fixture
def clearml_env(mlpipe_env, tmp_path, monkeypatch):
    """Offline ClearML with its cache in tmp, and a HOME that must stay empty."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("CLEARML_OFFLINE_MODE", "1")
    cache = Path(tmp_path / "clearml-cache")
    yield {"cache": cache, "home": home}
    run = tracking.active_run()
    if run is not None:  # never leak an open task into the next test
        run.close()
    assert not any(home.iterdir()), f"ClearML wrote into HOME: {list(home.iterdir())}"


def _task_json(run_or_folder) -> dict:
    folder = Path(run_or_folder.offline_folder if hasattr(run_or_folder, "offline_folder") else run_or_folder)
    return json.loads((folder / "task.json").read_text())


def _scalars(folder: Path) -> list[dict]:
    path = Path(folder) / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            out.extend(json.loads(line))
    return out


def test_offline_run_records_params_metrics_model_and_artifacts(clearml_env, tmp_path):
    run = tracking.start_run("mlpipe-test", "offline run", {"lr": 0.002, "drop_ids": ["d1", "d2"], "epochs": 3},
                             tags=("train", "d1"))
    assert run.offline and run.task_id.startswith("offline-") and run.warning is None
    assert Path(run.offline_folder).is_relative_to(clearml_env["cache"])
    for step in range(1, 4):
        run.log_metrics({"loss/train": 1.0 / step, "accuracy/val": 0.5 + step / 10, "ignored": None}, step)
    run.log_metric("final", "golden_accuracy", 0.97, 3)
    weights = tmp_path / "model.onnx"
    weights.write_bytes(b"not really onnx")
    model_id = run.upload_model(weights, "digits", ("onnx", "run-1"))
    assert model_id.startswith("offline-")
    (tmp_path / "metrics.json").write_text('{"val_accuracy": 0.9}')
    run.log_artifact("metrics.json", tmp_path / "metrics.json")

    info = run.close()
    assert info["task_id"] == run.task_id and info["offline"] is True and info["model_ids"] == [model_id]
    session = Path(info["offline_session"])
    assert session.suffix == ".zip" and session.is_file() and session.is_relative_to(clearml_env["cache"])
    with zipfile.ZipFile(session) as zf:
        assert "task.json" in zf.namelist()

    task = _task_json(run)
    params = task["hyperparams"]["params"]
    assert params["lr"]["value"] == "0.002" and params["drop_ids"]["value"] == "d1,d2"
    assert {"train", "d1"} <= set(task["tags"])
    assert task["offline_output_models"][0]["init"]["name"] == "digits"
    assert task["offline_output_models"][0]["init"]["framework"] == "ONNX"
    assert Path(task["offline_output_models"][0]["weights"]["weights_filename"]).read_bytes() == b"not really onnx"
    assert [a["key"] for a in task["execution"]["artifacts"]] == ["metrics.json"]

    points = {(p["metric"], p["variant"], p["iter"]): p["value"] for p in _scalars(Path(run.offline_folder))}
    assert points[("loss", "train", 2)] == pytest.approx(0.5)
    assert points[("accuracy", "val", 3)] == pytest.approx(0.8)
    assert points[("final", "golden_accuracy", 3)] == pytest.approx(0.97)
    assert not any(k[0] == "ignored" for k in points)

    # the ClearML "last task" cache is kept beside the cache, not in ~/.clearml
    assert (clearml_env["cache"] / "session").is_dir()
    with pytest.raises(tracking.TrackingError, match="closed"):
        run.log_metric("x", "y", 1.0, 0)
    assert run.close()["task_id"] == run.task_id  # closing twice is harmless


def test_one_open_run_per_process(clearml_env):
    with tracking.start_run("mlpipe-test", "first", {}) as run:
        assert tracking.active_run() is run
        with pytest.raises(tracking.TrackingError, match="already open"):
            tracking.start_run("mlpipe-test", "second", {})
    assert tracking.active_run() is None
    second = tracking.start_run("mlpipe-test", "second", {})
    assert second.task_id != run.task_id
    second.close()


def _server_env(monkeypatch, host: str) -> None:
    monkeypatch.setenv("CLEARML_API_HOST", host)
    monkeypatch.setenv("CLEARML_OFFLINE_MODE", "0")
    monkeypatch.setenv("CLEARML_API_ACCESS_KEY", "test-key")
    monkeypatch.setenv("CLEARML_API_SECRET_KEY", "test-secret")


def test_unreachable_server_falls_back_to_offline_quickly(clearml_env, monkeypatch):
    host = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    _server_env(monkeypatch, host)
    t0 = time.monotonic()
    run = tracking.start_run("mlpipe-test", "no server", {"a": 1})
    elapsed = time.monotonic() - t0
    assert elapsed < 10, f"fallback took {elapsed:.1f}s"
    assert run.offline and run.task_id.startswith("offline-")
    assert "unreachable" in run.warning and host in run.warning
    run.log_metrics({"loss/train": 0.1}, 1)
    info = run.close()
    assert info["offline"] is True and "unreachable" in info["warning"] and Path(info["offline_session"]).is_file()
    # the fallback did not leak into the environment: the next run tries the server again
    import os

    assert os.environ["CLEARML_OFFLINE_MODE"] == "0"
    assert tracking.tracking_config().offline is False


def test_silent_server_times_out_and_falls_back(clearml_env, monkeypatch):
    """A port that accepts connections but never answers: the probe times out."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    try:
        _server_env(monkeypatch, f"http://127.0.0.1:{sock.getsockname()[1]}")
        monkeypatch.setenv("MLPIPE_CLEARML_CONNECT_TIMEOUT", "1")
        t0 = time.monotonic()
        run = tracking.start_run("mlpipe-test", "silent server", {})
        assert time.monotonic() - t0 < 10
        assert run.offline and "unreachable" in run.warning
        run.close()
    finally:
        sock.close()


def test_server_that_is_not_clearml_falls_back(clearml_env, monkeypatch):
    """Something answers HTTP but refuses ClearML's login: Task.init fails fast, the run goes offline."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(404)
            self.end_headers()

        do_POST = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        _server_env(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}")
        t0 = time.monotonic()
        run = tracking.start_run("mlpipe-test", "wrong server", {})
        assert time.monotonic() - t0 < 30
        assert run.offline and "refused" in run.warning
        run.close()
    finally:
        server.shutdown()
        server.server_close()


def test_mirror_model_version_offline(clearml_env, tmp_path):
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"onnx-bytes")
    lineage = {"drops": [{"drop_id": "d1", "manifest_sha256": "ab" * 32}], "training_run_id": "train-1"}
    out = tracking.mirror_model_version("digits", 3, "candidate", {"golden_accuracy": 0.97, "note": "x"},
                                        lineage, onnx_path=onnx)
    assert out["offline"] is True and out["version"] == 3 and out["stage"] == "candidate"
    assert out["task_id"].startswith("offline-") and out["model_id"].startswith("offline-")
    session = Path(out["offline_session"])
    assert session.is_file()
    task = _task_json(session.with_suffix(""))
    assert task["type"] == "custom"
    assert {"registry", "digits", "v3", "candidate"} <= set(task["tags"])
    assert "training_run_id" in task["configuration"]["lineage"]["value"]
    model = task["offline_output_models"][0]
    assert model["init"]["name"] == "digits" and {"v3", "candidate"} <= set(model["init"]["tags"])
    summary = {p["variant"]: p["value"] for p in _scalars(session.with_suffix("")) if p["metric"] == "Summary"}
    assert summary == {"golden_accuracy": pytest.approx(0.97)}

    # without a model file only the task is recorded
    out = tracking.mirror_model_version("digits", 4, "production", {}, lineage)
    assert out["model_id"] is None and Path(out["offline_session"]).is_file()


def test_mirror_during_an_open_run_records_on_that_run(clearml_env, tmp_path):
    run = tracking.start_run("mlpipe-test", "pipeline", {})
    out = tracking.mirror_model_version("digits", 5, "candidate", {"val_accuracy": 0.9}, {"x": 1})
    assert out["task_id"] == run.task_id and tracking.active_run() is run
    run.close()
    assert "lineage_v5" in _task_json(run)["configuration"]
