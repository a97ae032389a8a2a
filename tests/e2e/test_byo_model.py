"""Bring your own model, exactly as README's "Bring your own model" says: a third spec (3 named classes,
16x16 RGB, JPEG frames) and a trainer function written by the user (here: by this test, into a module of
its own, with nothing of the built-in trainer), checked with ``mlpipe spec check``, drops generated for
it, the ``retrain`` DAG run through ``airflow dags test`` to a deployed model on a real local Triton,
then frames streamed through a real broker and ``mlpipe stream`` that answer with the class names.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest

from tasks.adapters.storage import LocalStore
from tasks.config import load_settings
from tasks.local.airflow import dags_test
from tasks.local.triton import LocalTriton
from tasks.model import repo as model_repo
from tasks.model.frames import content_type_of, encode_frame
from tasks.steps import drops, registry
from tests.e2e.test_retrain_dag import task_states
from tests.support.airflow import airflow_home_from
from tests.support.stream import ConsumerProcess, frame_headers, read_topic, send_raw

pytestmark = [pytest.mark.e2e, pytest.mark.integration]
ALL_TASKS = ["validate", "train", "register", "compile", "qc", "qc_gate", "deploy", "outcome"]

SPEC = """\
name: tiny
task: classification
description: "three shapes, 16x16 colour, JPEG frames; a model brought by its user"
classes:
  - {id: 0, name: circle}
  - {id: 1, name: square}
  - {id: 2, name: triangle}
input: {height: 16, width: 16, channels: 3, layout: NCHW, dtype: uint8}
frames: {encodings: [jpeg], max_frame_bytes: 16384}
preprocessing:
  resize: stretch
  normalisation: {scale: 0.00392156862745098, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}
embedding_dim: 8
onnx: {input: pixels, logits: scores, embedding: features}
trainer:
  entry_point: byo_trainer:train
  image: registry.example.com/tiny-trainer:1
  command: [python, -m, tasks.cli, train]
  args: [--model, tiny, --drop-id, "{drop_ids}", --epochs, "{epochs}", --seed, "{seed}"]
qc: {min_accuracy: 0.5, min_class_recall: 0.2, max_regression: 0.05, max_parity_diff: 0.0001,
     max_trt_parity_diff: 0.05}
golden_set: {source: shapes, per_class: 40, seed: 7}
drift: {class_psi: 0.25, class_js: 0.15, confidence_drop: 0.08, confidence_ks: 0.3, embedding_cosine: 0.05,
        embedding_mmd: 0.05, min_samples: 50}
"""

TRAINER = '''\
"""A user's trainer: the trainer contract of tasks/contracts/spec.py and nothing of the built-in one.

In: the validated drops by id. Out: runs/<run_id>/model.onnx (tensors named as the spec says) and
runs/<run_id>/metrics.json. Returns the result dict.
"""
import tempfile
from pathlib import Path


def train(store, drop_ids, *, spec, run_id, seed=0, epochs=6, **_ignored):
    import torch
    from torch import nn

    from tasks.contracts import layout
    from tasks.model.networks import to_input
    from tasks.steps import drops

    torch.manual_seed(seed)
    X, y = drops.load_arrays(store, drop_ids, spec)
    x, t = torch.from_numpy(to_input(X, spec)), torch.from_numpy(y.astype("int64"))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(spec.input.channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
            cells = (spec.input.height // 4) * (spec.input.width // 4)
            self.embed = nn.Linear(32 * cells, spec.embedding_dim)
            self.head = nn.Linear(spec.embedding_dim, spec.num_classes)

        def forward(self, inp):
            emb = torch.relu(self.embed(self.features(inp)))
            return self.head(emb), emb

    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=5e-3)
    for _ in range(max(1, int(epochs)) * 4):
        perm = torch.randperm(len(t))
        for i in range(0, len(t), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x[idx])[0], t[idx])
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        accuracy = float((net(x)[0].argmax(1) == t).float().mean())
    work = Path(tempfile.mkdtemp(prefix="byo-"))
    names = [spec.onnx.logits, spec.onnx.embedding]
    torch.onnx.export(net, (torch.zeros(2, *spec.input_shape),), str(work / "model.onnx"), dynamo=False,
                      opset_version=17, input_names=[spec.onnx.input], output_names=names,
                      dynamic_axes={n: {0: "batch"} for n in [spec.onnx.input, *names]})
    metrics = {"train_accuracy": accuracy, "trainer": "byo_trainer", "n_train": len(t)}
    onnx_key = layout.run_file_key(run_id, layout.MODEL_ONNX)
    store.put_file(onnx_key, work / "model.onnx")
    store.put_json(layout.run_file_key(run_id, layout.METRICS), metrics)
    return {"run_id": run_id, "drop_ids": list(drop_ids), "onnx_key": onnx_key, "metrics": metrics}
'''


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The user's side: a models folder with the spec and a module with the trainer."""
    root = tmp_path_factory.mktemp("byo")
    (root / "models" / "tiny").mkdir(parents=True)
    (root / "models" / "tiny" / "spec.yaml").write_text(SPEC)
    (root / "code").mkdir()
    (root / "code" / "byo_trainer.py").write_text(TRAINER)
    return root


def test_bring_your_own_model_through_the_retrain_dag_to_live_predictions(project, monkeypatch, tmp_path,
                                                                         airflow_template):
    # 1. check the spec
    check = subprocess.run([sys.executable, "-m", "tasks.cli", "spec", "check",
                            str(project / "models" / "tiny" / "spec.yaml")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "tiny: classification of 3 classes (circle, square, triangle); input 16x16x3" in check.stdout

    home = airflow_home_from(airflow_template, tmp_path / "home")  # a migrated Airflow DB of its own
    env = {"MLPIPE_HOME": str(home), "MLPIPE_STORE_URL": f"file://{home / 'store'}",
           "MLPIPE_MODEL_REPO": str(home / "model_repo"), "MLPIPE_MODEL_NAME": "tiny",
           "MLPIPE_MODELS_DIR": str(project / "models"), "MLPIPE_EXECUTION": "local",
           "MLPIPE_QC_LATENCY_REQUESTS": "20",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(project / "code"), os.environ.get("PYTHONPATH")]))}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    spec = load_settings().model_spec()
    assert spec.name == "tiny" and spec.onnx.input == "pixels"

    # 2. drops for it (the procedural shapes source draws the spec's class names at its size)
    store = LocalStore(home / "store")
    info = drops.make_drop(store, "byo-1", size=600, seed=1, spec=spec)
    assert info["rows"] == 600
    first = store.list("drops/byo-1/images/")[0]
    assert first.endswith(".jpg") and store.get_bytes(first)[:3] == b"\xff\xd8\xff"

    # 3. the retrain DAG, to a deployed model on a real Triton
    repo = model_repo.render_repo("local", home / "model_repo", spec)
    with LocalTriton(repo, home / "logs" / "triton") as triton:
        run_env = {**os.environ, **env, "MLPIPE_TRITON_URL": triton.http_url}
        run = dags_test("retrain", {"drop_id": "byo-1", "epochs": 4, "seed": 0}, env=run_env)
        out = run.stdout + run.stderr
        (home / "dag_run.log").write_text(out)
        assert run.returncode == 0, f"the retrain run failed; its log: {home / 'dag_run.log'}\n" + out[-3000:]
        states = task_states(home, out)
        assert all(states[t] == "success" for t in ALL_TASKS), states
        v1 = registry.get_version(store, "tiny", 1)
        assert v1["stage"] == "production" and v1["qc"]["verdict"] == "passed"
        assert v1["metrics"]["trainer"] == "byo_trainer"  # the user's function trained it
        assert model_repo.serving_version(home / "model_repo", "tiny") == 1
        report = store.get_json("models/tiny/1/qc_report.json")
        assert set(report["per_class_recall"]) == {"circle", "square", "triangle"}

        # 4. live: JPEG frames through the broker and the consumer sidecar, answered with class names
        from tasks.adapters.kafka import KafkaConfig, ensure_topics
        from tasks.local.broker import LocalBroker

        images, labels = drops.golden_set(spec)
        with LocalBroker(home / "logs" / "broker") as broker:
            cfg = KafkaConfig(bootstrap=broker.bootstrap, topic_prefix="byo.", partitions=1)
            ensure_topics(cfg)
            ids, truth, messages = [], {}, []
            for i in range(0, len(labels), 2):
                fid = str(uuid.uuid4())
                ids.append(fid)
                truth[fid] = int(labels[i])
                messages.append((encode_frame(images[i], spec), frame_headers(fid, content_type_of("jpeg"))))
            bad = str(uuid.uuid4())  # a PNG: an encoding this model does not accept
            messages.append((encode_frame(images[0], spec, "png"), frame_headers(bad, "image/png")))
            send_raw(cfg, messages)
            consumer = ConsumerProcess(cfg, triton.grpc_url, tmp_path, qdrant_path=tmp_path / "qdrant",
                                       extra=["--model", "tiny"], env=env).start()
            try:
                recs = read_topic(cfg, cfg.predictions_topic, lambda r: len(r) >= len(ids), timeout=90)
                dlq = read_topic(cfg, cfg.dlq_topic, lambda r: len(r) >= 1, timeout=30)
            finally:
                consumer.terminate()
            preds = {p["frame_id"]: p for p in (json.loads(r.value) for r in recs)}
            assert set(preds) == set(ids), consumer.log()  # lost: 0
            assert all(p["class"] == spec.class_name(p["label"]) for p in preds.values())
            accuracy = np.mean([preds[f]["label"] == truth[f] for f in ids])
            assert accuracy > 0.5, accuracy  # chance is 1/3
            assert len(dlq) == 1 and dlq[0].header("reason") == "unsupported_content_type"
            assert dlq[0].header("frame_id") == bad
