"""The drift monitor against a real stream: a champion trained on real MNIST drops and served by the local
Triton, frames on a real Kafka broker (Tansu) processed by the real consumer into ``predictions`` and
Qdrant. One stream is skewed on purpose (60 % zeros, a fifth of the digits inverted), one is not.

Checked: the verdicts (drift / no drift) from Kafka and from Qdrant, the report and plots in the object
store, the CLI, and the ``monitor`` DAG (``airflow dags test``) emitting the ``mlpipe_drift`` asset event
that requests a retrain only for the skewed stream.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tasks.config import load_settings
from tasks.contracts.errors import EXIT_BAD_INPUT, EXIT_REJECTED, EXIT_TRANSIENT
from tasks.steps import drops
from tasks.steps import monitor
from tasks.adapters.kafka import KafkaConfig, ensure_topics
from tasks.local.broker import LocalBroker
from tasks.adapters.storage import LocalStore
from tests.support.stream import ConsumerProcess, predicted_ids, send_frames

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration]
MODEL = "digits"
SPEC = load_settings().model_spec(MODEL)
FRAMES = 500
TH = monitor.Thresholds.for_spec(SPEC, min_samples=200)


@dataclass
class Served:
    store: LocalStore
    home: Path
    broker: LocalBroker
    streams: dict[str, KafkaConfig]  # "plain" | "skewed"
    qdrant: dict[str, Path]
    env: dict[str, str]


def stream_images(kind: str, n: int = FRAMES, seed: int = 0):
    """Golden-set digits (never trained on): uniform for "plain"; for "skewed" 60 % zeros, 1 % ones
    and a fifth of all digits inverted (black on white)."""
    import numpy as np

    images, labels = drops.golden_set(SPEC)
    rng = np.random.default_rng(seed)
    if kind == "plain":
        return images[rng.choice(len(labels), n, replace=False)]
    counts = {c: int(round(n * w)) for c, w in drops._skewed_mix(SPEC.num_classes).items()}
    counts[0] += n - sum(counts.values())
    idx = np.concatenate([rng.choice(np.flatnonzero(labels == c), k, replace=True) for c, k in counts.items()])
    out = images[rng.permutation(idx)].copy()
    flip = rng.random(n) < 0.2
    out[flip] = 255 - out[flip]
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from tasks.model import repo as model_repo
    from tasks.steps import registry
    from tasks.steps import train
    from tasks.steps import validate
    from tasks.local.triton import LocalTriton

    root = tmp_path_factory.mktemp("monitor")
    home = root / "var"
    env = {"MLPIPE_HOME": str(home), "MLPIPE_STORE_URL": f"file://{home / 'store'}", "MLPIPE_EXECUTION": "local",
           "CLEARML_OFFLINE_MODE": "1", "CLEARML_NO_DEFAULT_SERVER": "1",
           "CLEARML_CACHE_DIR": str(root / "clearml")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        store = LocalStore(home / "store")
        drops.make_drop(store, "base", size=800, seed=3)
        assert validate.validate_drop(store, "base").success
        # 5 epochs on 800 images: golden accuracy ~0.93, a champion that is right about what it sees
        result = train.train(store, ["base"], epochs=5, seed=0, track=False)
        version = registry.register(store, MODEL, result["run_id"], ["base"], mirror=False)["version"]
        registry.set_stage(store, MODEL, version, "production", "test champion")

        repo = model_repo.render_repo("local", root / "repo", SPEC)
        onnx = store.get_file(f"models/{MODEL}/{version}/model.onnx", root / "model.onnx")
        model_repo.write_classifier_version(repo, SPEC, version, onnx)
        model_repo.set_serving_version(repo, SPEC, version)
        with LocalBroker(root / "tansu") as broker, \
                LocalTriton(repo, root / "triton", backend_dir=root / "backends", load_models=[MODEL]) as triton:
            streams, qdrant, consumers = {}, {}, {}
            for kind in ("plain", "skewed"):
                cfg = KafkaConfig(bootstrap=broker.bootstrap, topic_prefix=f"{kind}{uuid.uuid4().hex[:6]}.",
                                  partitions=3)
                ensure_topics(cfg)
                streams[kind], qdrant[kind] = cfg, root / f"qdrant-{kind}"
                consumers[kind] = ConsumerProcess(cfg, triton.grpc_url, root, qdrant_path=qdrant[kind],
                                                  policy="all", name=f"consumer-{kind}").start()
            for kind, cons in consumers.items():
                cons.wait_ready(90)
                ids = send_frames(streams[kind], stream_images(kind), device=f"cam-{kind}")
                got = predicted_ids(streams[kind], set(ids), timeout=90)
                assert got == set(ids), f"{kind}: {len(got)} of {len(ids)} predicted\n{cons.log(40)}"
            for cons in consumers.values():
                cons.terminate()  # local-mode Qdrant is locked while the consumer runs
            yield Served(store, home, broker, streams, qdrant, {**env, "MLPIPE_KAFKA_BOOTSTRAP": broker.bootstrap})
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def checks(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


def test_unskewed_stream_no_drift_and_a_full_report(served):
    report = monitor.run_monitor(served.store, MODEL, source="kafka", kafka=served.streams["plain"], window=2000,
                                 thresholds=TH)
    assert report["status"] == "ok" and report["drift"] is False, report["checks"]
    assert report["samples"] == FRAMES and report["live"]["versions"] == {"1": FRAMES}
    assert report["reference"]["source"] == "training drops base"
    assert report["thresholds"] == {**SPEC.drift.model_dump(), "min_samples": 200}
    assert list(report["class_distribution"]["live"]) == report["classes"] == SPEC.class_names
    assert {c["status"] for c in report["checks"]} == {"ok"}
    assert set(checks(report)) == {"class_psi", "class_js", "confidence_drop", "confidence_ks",
                                   "embedding_cosine", "embedding_mmd"}
    prefix = report["json_uri"].split("/store/", 1)[1].rsplit("/", 1)[0]
    keys = set(served.store.list(prefix))
    assert {f"{prefix}/{n}" for n in ("report.html", "report.json", "class_distribution.png", "confidence.png",
                                      "embeddings.png")} <= keys
    html = served.store.get_bytes(f"{prefix}/report.html").decode()
    assert "no drift" in html and html.count("data:image/png;base64,") == 3
    assert served.store.get_json("monitoring/latest.json")["created_at"] == report["created_at"]
    assert served.store.exists(f"monitoring/reference/{MODEL}/v1.npz")  # cached for the next run


def test_skewed_stream_is_drift(served):
    report = monitor.run_monitor(served.store, MODEL, source="kafka", kafka=served.streams["skewed"], thresholds=TH)
    assert report["status"] == "drift" and report["drift"] is True
    c = checks(report)
    for name in ("class_psi", "class_js", "embedding_cosine", "embedding_mmd"):
        assert c[name]["drift"], (name, c[name])
    assert "class 0" in c["class_psi"]["detail"]
    assert report["summary"].startswith("drift past the threshold in class_psi")


def test_qdrant_source_gives_the_same_verdicts(served):
    plain = monitor.run_monitor(served.store, MODEL, source="qdrant", qdrant_path=str(served.qdrant["plain"]),
                                thresholds=TH)
    skewed = monitor.run_monitor(served.store, MODEL, source="qdrant", qdrant_path=str(served.qdrant["skewed"]),
                                 thresholds=TH)
    assert (plain["drift"], skewed["drift"]) == (False, True)
    assert plain["samples"] == skewed["samples"] == FRAMES and plain["live"]["source"].startswith("qdrant")


def test_too_few_predictions_give_no_verdict(served):
    report = monitor.run_monitor(served.store, MODEL, source="kafka", kafka=served.streams["skewed"], window=5000,
                                 thresholds=monitor.Thresholds.for_spec(SPEC, min_samples=5000))
    assert report["status"] == "insufficient_data" and report["drift"] is False and report["checks"] == []


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tasks.cli", "monitor", *args], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)


def test_cli(served, tmp_path):
    assert "--source {kafka,qdrant}" in _cli(["--help"], served.env).stdout
    skewed = served.streams["skewed"]
    out = _cli(["--topic-prefix", skewed.topic_prefix, "--fail-on-drift", "--result-json", str(tmp_path / "r.json")],
               served.env)
    assert out.returncode == EXIT_REJECTED, out.stderr[-1500:]  # drift with --fail-on-drift: final
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["drift"] is True and result["checks"]["class_psi"]["status"] == "drift"
    bad = _cli(["--window", "0"], served.env)
    assert bad.returncode == EXIT_BAD_INPUT and bad.stderr.strip() == "error: --window must be positive, got 0"
    empty = _cli([], {**served.env, "MLPIPE_STORE_URL": f"file://{tmp_path / 'empty'}"})
    assert empty.returncode == EXIT_BAD_INPUT and "has no production version" in empty.stderr and "Traceback" not in empty.stderr
    # As the scheduled DAG runs it: no champion yet is no verdict, not a failure.
    waiting = _cli(["--no-champion-ok", "--result-json", str(tmp_path / "w.json")],
                   {**served.env, "MLPIPE_STORE_URL": f"file://{tmp_path / 'empty'}"})
    assert waiting.returncode == 0, waiting.stderr[-1500:]
    result = json.loads((tmp_path / "w.json").read_text())
    assert (result["status"], result["drift"]) == ("no_champion", False)
    assert "has no production version" in result["summary"]
    down = _cli(["--bootstrap", "127.0.0.1:1", "--timeout", "3"], served.env)
    assert down.returncode == EXIT_TRANSIENT and "error: topic" in down.stderr  # retried by Airflow


def test_monitor_dag_requests_a_retrain_only_for_the_skewed_stream(served, tmp_path, airflow_template):
    """``airflow dags test monitor`` once per stream: the skewed one emits an ``mlpipe_drift`` asset event
    (the retrain request ``scheduled_retrain`` is scheduled on), the plain one skips ``request_retrain``."""
    from tasks.local.airflow import dags_test
    from tests.support.airflow import airflow_home_from

    def run(kind: str):
        home = airflow_home_from(airflow_template, tmp_path / kind)
        env = {**os.environ, **served.env, "MLPIPE_HOME": str(home),
               "MLPIPE_KAFKA_TOPIC_PREFIX": served.streams[kind].topic_prefix}
        proc = dags_test("monitor", {"source": "kafka", "window": 2000, "min_samples": 200}, env=env, timeout=300)
        db = sqlite3.connect(home / "airflow" / "airflow.db")
        try:
            states = dict(db.execute("SELECT task_id, state FROM task_instance WHERE dag_id='monitor'").fetchall())
            events = db.execute("SELECT a.name, e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id"
                                ).fetchall()
        finally:
            db.close()
        return kind, (proc, states, events)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(pool.map(run, ("plain", "skewed")))
    proc, states, events = results["skewed"]
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert states == {"analyze": "success", "drifted": "success", "request_retrain": "success"}
    assert [name for name, _ in events] == ["mlpipe_drift"]
    extra = json.loads(events[0][1])
    assert extra["champion"] == 1 and extra["report_uri"].endswith("report.html")
    assert extra["checks"]["class_psi"] > 0.25
    proc, states, events = results["plain"]
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert states == {"analyze": "success", "drifted": "success", "request_retrain": "skipped"}
    assert events == []  # no drift: no retrain requested
