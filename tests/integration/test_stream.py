"""The streaming consumer end to end: real Tansu broker, real local Triton, Qdrant local mode.

The consumer runs as a subprocess (``mlpipe stream``) so that kill -9 and SIGTERM are
real. Qdrant local mode allows one process per path, so Qdrant is inspected after the consumer
has stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
import uuid

import numpy as np
import pytest

from tasks.adapters.kafka import BusProducer, KafkaConfig, committed_offsets, ensure_topics

from tasks.local.broker import LocalBroker
from tasks.local.procs import free_port, wait_until
from tasks.serving.consumer import DEFAULT_QDRANT_POLICY, QdrantPolicy
from tests.support.stream import ConsumerProcess, digit_images, frame_headers, png, predicted_ids, predictions, qdrant_ids, read_topic, send_frames, send_raw


pytestmark = pytest.mark.integration


# ----------------------------------------------------------------------------- pure helpers


def test_qdrant_policy_parsing_and_choice():
    fid = str(uuid.uuid4())
    assert QdrantPolicy.parse("all").reason(fid, 0.99) == "all"
    assert QdrantPolicy.parse("none").reason(fid, 0.01) is None and not QdrantPolicy.parse("none").enabled
    low = QdrantPolicy.parse("low_confidence:0.9")
    assert low.reason(fid, 0.5) == "low_confidence" and low.reason(fid, 0.95) is None
    sample = QdrantPolicy.parse("sample:0.25")
    ids = [str(uuid.uuid4()) for _ in range(4000)]
    chosen = [i for i in ids if sample.reason(i, 1.0)]
    assert 800 < len(chosen) < 1200
    assert chosen == [i for i in ids if sample.reason(i, 1.0)]  # deterministic: a redelivery chooses the same
    default = QdrantPolicy.parse(DEFAULT_QDRANT_POLICY)
    assert default.low_confidence == 0.7 and default.sample == 0.05
    for bad in ("sometimes", "sample:2", "low_confidence:x"):
        with pytest.raises(ValueError, match="Qdrant policy"):
            QdrantPolicy.parse(bad)


# ----------------------------------------------------------------------------- end to end


def _committed(cfg: KafkaConfig, group: str) -> int:
    """Frames committed by ``group`` (offsets start at 0 in fresh topics)."""
    return sum(max(0, o) for o in committed_offsets(cfg, group, cfg.frames_topic).values())


def _consumer(cfg, url, tmp_path, **kw) -> ConsumerProcess:
    return ConsumerProcess(cfg, url, tmp_path, qdrant_path=tmp_path / "qdrant", **kw)


def test_predictions_and_qdrant_points_for_every_frame(kafka_cfg, triton_server, tmp_path):  # noqa: F811
    ids = send_frames(kafka_cfg, digit_images(200), raw_every=5)
    consumer = _consumer(kafka_cfg, triton_server.grpc_url, tmp_path, policy="all").start()
    try:
        assert predicted_ids(kafka_cfg, set(ids), timeout=40) == set(ids), consumer.log()
        consumer.wait_ready(10)
        code, body = consumer.get("/healthz")
        assert code == 200 and json.loads(body)["status"] == "ok"
        wait_until(lambda: consumer.metric("mlpipe_consumer_frames_total", 'outcome="predicted"') == 200, 10,
                   "predicted metric")
        assert consumer.metric("mlpipe_consumer_batch_size_count") >= 1
        assert consumer.metric("mlpipe_consumer_e2e_latency_seconds_count") == 200
        assert consumer.metric("mlpipe_consumer_qdrant_points_total") == 200
        assert consumer.metric("mlpipe_consumer_triton_errors_total") == 0
        wait_until(lambda: consumer.metric("mlpipe_consumer_lag_total_messages") == 0, 10, "lag gauge at 0")
        recs = read_topic(kafka_cfg, kafka_cfg.predictions_topic, lambda r: len(r) >= 200, timeout=10)
    finally:
        code, secs = consumer.terminate()
    assert code == 0, consumer.log()

    preds = predictions(recs)
    assert {p["frame_id"] for p in preds} == set(ids)
    for rec, p in zip(recs, preds):
        assert rec.key == p["frame_id"].encode() and rec.header("frame_id") == p["frame_id"]
        assert 0 <= p["label"] <= 9 and p["class"] == str(p["label"]) and 0 < p["score"] <= 1
        assert len(p["topk"]) == 3 and p["topk"][0]["label"] == p["label"]
        assert [t["class"] for t in p["topk"]] == [str(t["label"]) for t in p["topk"]]
        assert p["model_name"] == "digits" and p["model_version"] == "1"
        assert p["device_id"] == "cam-test" and p["latency_ms"] >= 0
        assert p["processed_at"].endswith("Z") and p["captured_at"]
    # all offsets committed
    assert _committed(kafka_cfg, consumer.group) == 200

    count, point_ids, payloads = qdrant_ids(tmp_path / "qdrant")
    assert count == 200 and set(point_ids) == set(ids)
    assert payloads[0]["indexed_because"] == "all" and "label" in payloads[0]

    # each point: payload = the prediction with its model version, vector = the ensemble's embedding
    from tasks.adapters.qdrant import open_vectors

    by_id = {p["frame_id"]: p for p in preds}
    sample = [0, 1, 5, 77, 199]  # 0 and 5 were sent raw, the others as PNG
    with open_vectors(path=str(tmp_path / "qdrant"), create=False) as vs:
        points = {pt["id"]: pt for pt in vs.get([ids[i] for i in sample], with_vectors=True)}
    with triton_server.client() as client:
        frames = [png(img) for img in digit_images(200)[sample]]
        emb = client.infer_frames("digits", frames)["EMBEDDING"].reshape(len(sample), -1)
    for row, i in enumerate(sample):
        point = points[ids[i]]
        pred = by_id[ids[i]]
        assert point["payload"]["model_version"] == "1" and point["payload"]["frame_id"] == ids[i]
        assert point["payload"]["label"] == pred["label"] and point["payload"]["score"] == pred["score"]
        want = emb[row] / np.linalg.norm(emb[row])  # a cosine collection stores vectors normalised
        got = np.asarray(point["vector"], dtype=np.float64)
        assert got.shape == (64,) and np.allclose(got / np.linalg.norm(got), want, atol=1e-5)


def test_poison_frames_land_in_the_dlq_with_their_reason(kafka_cfg, triton_server, tmp_path):  # noqa: F811
    import io

    from PIL import Image

    img = digit_images(1)[0]
    rgb = io.BytesIO()
    Image.fromarray(np.stack([img] * 3, axis=-1), "RGB").save(rgb, "PNG")
    jpeg = io.BytesIO()
    Image.fromarray(img, "L").save(jpeg, "JPEG")
    good_png = png(img)
    broken = good_png[:40] + bytes(len(good_png) - 52) + good_png[-12:]  # PNG signature, body broken
    # found by the consumer's cheap checks (headers, size, content type, magic bytes) or by Triton's preprocess
    # model (a broken body, another size, not grayscale): the same dead letters either way
    poison = [
        ("missing_frame_id", png(img), frame_headers(None)),
        ("invalid_frame_id", png(img), frame_headers("not-a-uuid")),
        ("undecodable", b"this is not an image", frame_headers(str(uuid.uuid4()))),
        ("wrong_shape", png(np.zeros((32, 32), np.uint8)), frame_headers(str(uuid.uuid4()))),
        ("wrong_shape", rgb.getvalue(), frame_headers(str(uuid.uuid4()))),
        ("wrong_shape", b"\x01" * 700, frame_headers(str(uuid.uuid4()), "application/x-raw-uint8")),
        ("oversize", b"\x89PNG\r\n\x1a\n" + b"\x00" * 5000, frame_headers(str(uuid.uuid4()))),
        ("empty", b"", frame_headers(str(uuid.uuid4()))),
        ("unsupported_content_type", png(img), frame_headers(str(uuid.uuid4()), "text/plain")),
        ("unsupported_content_type", jpeg.getvalue(), frame_headers(str(uuid.uuid4()), "image/jpeg")),
        ("undecodable", broken, frame_headers(str(uuid.uuid4()))),
    ]
    producer = BusProducer(kafka_cfg)
    good = send_frames(kafka_cfg, digit_images(5), producer=producer)
    send_raw(kafka_cfg, [(value, headers) for _, value, headers in poison], key=b"cam-poison")
    good += send_frames(kafka_cfg, digit_images(5, start=5), producer=producer)
    producer.close()

    consumer = _consumer(kafka_cfg, triton_server.grpc_url, tmp_path, policy="all",
                         extra=["--max-frame-bytes", "4096"]).start()
    try:
        dlq = read_topic(kafka_cfg, kafka_cfg.dlq_topic, lambda r: len(r) >= len(poison), timeout=40)
        assert len(dlq) == len(poison), consumer.log()
        assert predicted_ids(kafka_cfg, set(good), timeout=20) == set(good)
        wait_until(lambda: consumer.metric("mlpipe_consumer_frames_total", 'outcome="dead_letter"') == len(poison),
                   10, "dead-letter metric")
        assert consumer.metric("mlpipe_consumer_dead_letters_total", 'reason="wrong_shape"') == 3
        assert consumer.metric("mlpipe_consumer_dead_letters_total", 'reason="undecodable"') == 2
    finally:
        code, _ = consumer.terminate()
    assert code == 0, consumer.log()

    expected = sorted((reason, value) for reason, value, _ in poison)
    got = sorted((r.header("reason"), r.value or b"") for r in dlq)
    assert got == expected
    for rec in dlq:
        sent = next(h for reason, v, h in poison if v == (rec.value or b"") and reason == rec.header("reason"))
        for name, value in sent:  # the original headers travel with the dead letter
            assert rec.headers.get(name) == value
        assert rec.key == b"cam-poison"
        assert rec.header("reason_detail") and rec.header("source_topic") == kafka_cfg.frames_topic
    # the consumer went on past the poison and committed everything
    total = 10 + len(poison)
    assert _committed(kafka_cfg, consumer.group) == total


class _Feeder(threading.Thread):
    """Sends ``total`` frames at about ``rate`` frames/s in the background."""

    def __init__(self, cfg: KafkaConfig, total: int, rate: float) -> None:
        super().__init__(daemon=True)
        self.cfg, self.total, self.rate = cfg, total, rate
        self.ids: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            producer = BusProducer(self.cfg)
            step = 20
            for start in range(0, self.total, step):
                t0 = time.monotonic()
                self.ids += send_frames(self.cfg, digit_images(step, start=start), producer=producer)
                time.sleep(max(0.0, step / self.rate - (time.monotonic() - t0)))
            producer.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def test_kill9_mid_stream_then_restart_loses_nothing(kafka_cfg, triton_server, tmp_path):  # noqa: F811
    feeder = _Feeder(kafka_cfg, total=1200, rate=400)
    first = _consumer(kafka_cfg, triton_server.grpc_url, tmp_path, policy="all", name="first",
                      extra=["--max-batch", "32"]).start()
    second = None
    try:
        first.wait_ready(30)
        feeder.start()
        wait_until(lambda: (first.metric("mlpipe_consumer_frames_total", 'outcome="predicted"') or 0) >= 150, 30,
                   "first consumer predicted 150 frames", alive=first.proc.alive)
        first.kill()  # kill -9 in the middle of the stream
        killed_at_sent = len(feeder.ids)
        second = _consumer(kafka_cfg, triton_server.grpc_url, tmp_path, policy="all", name="second",
                           extra=["--max-batch", "32"]).start()
        feeder.join(30)
        assert feeder.error is None and len(feeder.ids) == 1200
        assert killed_at_sent < 1200  # the kill happened mid-stream
        got = predicted_ids(kafka_cfg, set(feeder.ids), timeout=40)
        assert got == set(feeder.ids), second.log()
    finally:
        first.kill()
        if second is not None:
            code, _ = second.terminate()
            assert code == 0, second.log()
    count, point_ids, _ = qdrant_ids(tmp_path / "qdrant")
    assert count == len(feeder.ids) == len(set(point_ids))  # exactly one point per frame id
    assert set(point_ids) == set(feeder.ids)


def _shm_regions() -> set[str]:
    from pathlib import Path

    return {p.name for p in Path("/dev/shm").glob("triton_python_backend_shm_region_*")}


def _release_orphaned_shm(before: set[str]) -> None:
    """Remove Python-backend shared-memory regions a kill -9'd Triton left behind: created during this
    test and mapped by no live process (so never another server's)."""
    import glob

    mapped: set[str] = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as fh:
                mapped |= {line.rsplit("/", 1)[-1].strip() for line in fh if "triton_python_backend_shm" in line}
        except OSError:
            continue
    for name in _shm_regions() - before - mapped:
        try:
            os.unlink(f"/dev/shm/{name}")
        except OSError:
            pass


def _own_triton(triton_server, tmp_path, ports: dict[str, int]):
    """A Triton of the test's own (on ``ports``), serving the shared fixture's model repository."""
    from tasks.local.triton import LocalTriton

    t = LocalTriton(triton_server.repo, tmp_path / "triton-logs", backend_dir=triton_server.work / "backends",
                    load_models=["digits"], **ports)
    t.start(timeout=60)
    with t.client() as c:
        c.wait_model_ready("digits", timeout=60)
    return t


def test_triton_killed_and_restarted_mid_stream_loses_nothing(kafka_cfg, triton_server, tmp_path):  # noqa: F811
    shm_before = _shm_regions()

    ports = dict(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())

    def start_triton():
        return _own_triton(triton_server, tmp_path, ports)

    triton = start_triton()
    consumer = _consumer(kafka_cfg, triton.grpc_url, tmp_path, policy="all",
                         extra=["--max-batch", "32", "--backoff-max", "1"]).start()
    try:
        ids = send_frames(kafka_cfg, digit_images(100))
        assert predicted_ids(kafka_cfg, set(ids), timeout=40) == set(ids), consumer.log()
        triton.kill()
        triton.stop()  # reap the backend stubs of the killed server
        _release_orphaned_shm(shm_before)  # kill -9 leaves its shared-memory regions behind
        ids += send_frames(kafka_cfg, digit_images(100, start=100))
        wait_until(lambda: consumer.metric("mlpipe_consumer_paused") == 1, 20, "consumer paused")
        assert consumer.metric("mlpipe_consumer_triton_errors_total") >= 1
        assert consumer.get("/readyz")[0] == 503
        assert consumer.get("/healthz")[0] == 200  # alive: waiting, not crashing
        held = consumer.metric("mlpipe_consumer_frames_total", 'outcome="predicted"')
        committed = _committed(kafka_cfg, consumer.group)
        assert committed == held == 100  # nothing committed past the unprocessed frames
        triton = start_triton()
        assert predicted_ids(kafka_cfg, set(ids), timeout=40) == set(ids), consumer.log()
        wait_until(lambda: consumer.metric("mlpipe_consumer_paused") == 0, 10, "consumer resumed")
        consumer.wait_ready(10)
    finally:
        code, _ = consumer.terminate()
        triton.stop()
    assert code == 0, consumer.log()
    count, point_ids, _ = qdrant_ids(tmp_path / "qdrant")
    assert count == 200 and set(point_ids) == set(ids)


@contextlib.contextmanager
def _frozen(pid: int | None):
    """The process stopped (SIGSTOP: its sockets stay open, nothing answers) for the block, continued after."""
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_slow_triton_pauses_retries_and_loses_nothing(kafka_cfg, triton_server, tmp_path):  # noqa: F811
    """Triton hung (SIGSTOP: it accepts connections but answers nothing) for longer than --triton-timeout:
    every call times out, the consumer pauses and retries with backoff, commits nothing past the held frames,
    stays alive, and finishes everything once Triton answers again."""
    triton = _own_triton(triton_server, tmp_path,
                         dict(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()))
    consumer = _consumer(kafka_cfg, triton.grpc_url, tmp_path, policy="all",
                         extra=["--max-batch", "32", "--triton-timeout", "1", "--backoff-max", "1"]).start()
    try:
        ids = send_frames(kafka_cfg, digit_images(100))
        assert predicted_ids(kafka_cfg, set(ids), timeout=40) == set(ids), consumer.log()
        wait_until(lambda: _committed(kafka_cfg, consumer.group) == 100, 10, "first 100 frames committed")
        with _frozen(triton.pid):
            ids += send_frames(kafka_cfg, digit_images(100, start=100))
            wait_until(lambda: consumer.metric("mlpipe_consumer_paused") == 1, 20, "consumer paused")
            wait_until(lambda: (consumer.metric("mlpipe_consumer_triton_errors_total") or 0) >= 2, 20,
                       "retried with backoff")
            assert "Triton unavailable" in consumer.log()
            assert consumer.get("/readyz")[0] == 503
            assert consumer.get("/healthz")[0] == 200  # alive: waiting, not crashing
            assert consumer.metric("mlpipe_consumer_frames_total", 'outcome="predicted"') == 100
            assert _committed(kafka_cfg, consumer.group) == 100  # nothing committed past the held frames
            # the lag gauge goes on being updated while the consumer waits: the held frames are the lag
            wait_until(lambda: consumer.metric("mlpipe_consumer_lag_total_messages") == 100, 15,
                       "lag of 100 shown")
        assert predicted_ids(kafka_cfg, set(ids), timeout=40) == set(ids), consumer.log()
        wait_until(lambda: consumer.metric("mlpipe_consumer_paused") == 0, 10, "consumer resumed")
        wait_until(lambda: _committed(kafka_cfg, consumer.group) == 200, 10, "all 200 frames committed")
        wait_until(lambda: consumer.metric("mlpipe_consumer_lag_total_messages") == 0, 15, "lag back to 0")
        consumer.wait_ready(10)
    finally:
        code, _ = consumer.terminate()
        triton.stop()
    assert code == 0, consumer.log()
    count, point_ids, _ = qdrant_ids(tmp_path / "qdrant")
    assert count == 200 and set(point_ids) == set(ids)


@pytest.mark.parametrize("triton_timeout", ["1", "30"], ids=["paused-between-retries", "call-hanging"])
def test_sigterm_while_triton_hangs_exits_in_time_and_the_held_frames_are_redelivered(
        kafka_cfg, triton_server, tmp_path, triton_timeout):  # noqa: F811
    """SIGTERM during a Triton outage, either between retries (calls time out after 1 s, fetching paused) or
    while a call hangs (its 30 s timeout is far beyond the drain budget): the consumer exits within 10 s
    without committing the held frames, and the group's next consumer predicts them once Triton answers."""
    triton = _own_triton(triton_server, tmp_path,
                         dict(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()))
    args = ["--max-batch", "32", "--triton-timeout", triton_timeout, "--backoff-max", "1"]
    first = _consumer(kafka_cfg, triton.grpc_url, tmp_path, name="first", extra=args).start()
    second = None
    try:
        ids = send_frames(kafka_cfg, digit_images(50))
        assert predicted_ids(kafka_cfg, set(ids), timeout=40) == set(ids), first.log()
        wait_until(lambda: _committed(kafka_cfg, first.group) == 50, 10, "first 50 frames committed")
        with _frozen(triton.pid):
            ids += send_frames(kafka_cfg, digit_images(50, start=50))
            if triton_timeout == "1":
                wait_until(lambda: first.metric("mlpipe_consumer_paused") == 1, 20, "consumer paused")
            else:
                time.sleep(2)  # polled and sent to the frozen Triton: that call hangs for up to 30 s
            code, secs = first.terminate(timeout=15)
            assert code == 0 and secs < 10, (code, secs, first.log())
            assert "is not committed and will be redelivered" in first.log()
            assert _committed(kafka_cfg, first.group) == 50  # the held frames stay uncommitted
        second = _consumer(kafka_cfg, triton.grpc_url, tmp_path, name="second", extra=args).start()
        assert predicted_ids(kafka_cfg, set(ids), timeout=40) == set(ids), second.log()
        wait_until(lambda: _committed(kafka_cfg, second.group) == 100, 15, "all 100 frames committed")
    finally:
        first.kill()
        if second is not None:
            code, _ = second.terminate()
            assert code == 0, second.log()
        triton.stop()
    count, point_ids, _ = qdrant_ids(tmp_path / "qdrant")
    assert count == 100 and set(point_ids) == set(ids)


def test_sigterm_drains_commits_and_exits_within_10s(kafka_cfg, triton_server, tmp_path):  # noqa: F811
    feeder = _Feeder(kafka_cfg, total=1000, rate=500)
    latency_log = tmp_path / "latency.json"
    consumer = _consumer(kafka_cfg, triton_server.grpc_url, tmp_path, policy="all",
                         extra=["--max-batch", "64", "--latency-log", str(latency_log)]).start()
    consumer.wait_ready(30)
    feeder.start()
    wait_until(lambda: (consumer.metric("mlpipe_consumer_frames_total", 'outcome="predicted"') or 0) >= 100, 30,
               "100 frames predicted")
    code, secs = consumer.terminate(timeout=15)
    feeder.join(30)
    assert code == 0, consumer.log()
    assert secs < 10, f"took {secs:.1f}s to stop"
    assert "consumer stopped" in consumer.log()
    stats = consumer.stats()
    assert stats["predicted"] >= 100 and stats["commits"] >= 1
    # the main thread's time per step is accounted for, and adds up to no more than the run
    steps = stats["stage_s"]
    assert set(steps) == {"poll", "check", "wait_triton", "build_produce", "wait_kafka_acks", "qdrant", "commit"}
    assert all(v >= 0 for v in steps.values()) and steps["check"] > 0 and steps["qdrant"] > 0
    # --latency-log: per predicted frame, written on exit: captured_at, then the seconds until both sinks
    # were written, the frame was polled, Triton answered, the loop took the answer (in that order in time)
    lat = json.loads(latency_log.read_text())
    assert len(lat) == stats["predicted"]
    assert all(cap > 1.7e9 and 0 < secs < 30 for cap, secs, *_ in lat)
    assert all(0 <= polled <= answered <= taken <= secs for _, secs, polled, answered, taken in lat)

    # nothing was committed past a frame without a prediction
    committed = committed_offsets(kafka_cfg, consumer.group, kafka_cfg.frames_topic)
    frames = read_topic(kafka_cfg, kafka_cfg.frames_topic, lambda r: len(r) >= 1000, timeout=20)
    written = read_topic(kafka_cfg, kafka_cfg.predictions_topic, lambda r: len(r) >= stats["predicted"], timeout=15)
    done = {r.header("frame_id") for r in written}
    below = [r.header("frame_id") for r in frames if r.offset < committed.get(r.partition, -1)]
    assert len(below) == sum(max(0, o) for o in committed.values()) >= 100
    assert set(below) <= done


def test_commits_are_spaced_by_the_interval_and_complete_when_idle(kafka_cfg, triton_server, tmp_path):  # noqa: F811
    ids = send_frames(kafka_cfg, digit_images(200))  # queued first: the loop is never idle until the end
    consumer = _consumer(kafka_cfg, triton_server.grpc_url, tmp_path, policy="none",
                         extra=["--max-batch", "16", "--commit-interval-ms", "60000"]).start()
    try:
        assert predicted_ids(kafka_cfg, set(ids), timeout=40) == set(ids), consumer.log()
        # idle: what was confirmed is committed at once, not after the interval
        wait_until(lambda: _committed(kafka_cfg, consumer.group) == 200, 10, "all 200 offsets committed")
    finally:
        code, _ = consumer.terminate()
    assert code == 0, consumer.log()
    stats = consumer.stats()
    assert stats["batches"] >= 13  # 200 frames, at most 16 per batch
    # one commit when the first batch was confirmed, then none until the loop ran out of frames
    assert stats["commits"] <= stats["batches"] // 2, stats


def test_broker_unavailable_at_start_is_waited_for(triton_server, tmp_path):  # noqa: F811
    port = free_port()
    cfg = KafkaConfig(bootstrap=f"127.0.0.1:{port}", topic_prefix="late.", partitions=2)
    consumer = _consumer(cfg, triton_server.grpc_url, tmp_path, policy="none", extra=["--backoff-max", "1"]).start()
    try:
        wait_until(lambda: consumer.get("/healthz")[0] == 200, 20, "consumer /healthz", alive=consumer.proc.alive)
        time.sleep(1.5)
        assert consumer.proc.alive(), consumer.log()
        assert consumer.get("/readyz")[0] == 503
        with LocalBroker(tmp_path / "late-broker", port=port):
            ensure_topics(cfg)
            ids = send_frames(cfg, digit_images(20))
            assert predicted_ids(cfg, set(ids), timeout=40) == set(ids), consumer.log()
            code, _ = consumer.terminate()
            assert code == 0, consumer.log()
    finally:
        consumer.kill()


def test_broker_outage_mid_stream_is_survived(triton_server, tmp_path):  # noqa: F811
    # A broker of our own, frozen with SIGSTOP (Tansu's memory engine would lose everything on a restart):
    # connections hang, the group session expires, produce and commit time out.
    with LocalBroker(tmp_path / "frozen-broker") as own:
        cfg = KafkaConfig(bootstrap=own.bootstrap, topic_prefix="outage.", partitions=3)
        ensure_topics(cfg)
        consumer = _consumer(cfg, triton_server.grpc_url, tmp_path, policy="all", extra=["--backoff-max", "1"]).start()
        try:
            consumer.wait_ready(30)
            ids = send_frames(cfg, digit_images(50))
            assert predicted_ids(cfg, set(ids), timeout=20) == set(ids)
            with _frozen(own.pid):
                wait_until(lambda: consumer.get("/readyz")[0] == 503, 15, "consumer unready during the outage")
                assert consumer.proc.alive() and consumer.get("/healthz")[0] == 200
            ids += send_frames(cfg, digit_images(50, start=50))
            assert predicted_ids(cfg, set(ids), timeout=40) == set(ids), consumer.log()
            consumer.wait_ready(20)
        finally:
            code, _ = consumer.terminate()
        assert code == 0, consumer.log()
    count, point_ids, _ = qdrant_ids(tmp_path / "qdrant")
    assert count == 100 and set(point_ids) == set(ids)


def test_sigterm_during_a_broker_outage_exits_within_10s_and_loses_nothing(triton_server, tmp_path):  # noqa: F811
    """SIGTERM while the broker hangs, with the production session timeout (the member keeps its partitions
    meanwhile): acks, the final commit and leaving the group cannot complete, yet the consumer exits within
    10 s; whatever it had not committed is predicted by the group's next consumer once the broker is back."""
    with LocalBroker(tmp_path / "frozen-broker") as own:
        cfg = KafkaConfig(bootstrap=own.bootstrap, topic_prefix="outage2.", partitions=3)
        ensure_topics(cfg)
        args = ["--backoff-max", "1", "--session-timeout-ms", "10000"]
        first = _consumer(cfg, triton_server.grpc_url, tmp_path, name="first", extra=args).start()
        second = None
        feeder = _Feeder(cfg, total=600, rate=300)
        try:
            first.wait_ready(30)
            feeder.start()
            wait_until(lambda: (first.metric("mlpipe_consumer_frames_total", 'outcome="predicted"') or 0) >= 100,
                       30, "100 frames predicted")
            with _frozen(own.pid):
                time.sleep(1.0)
                code, secs = first.terminate(timeout=20)
                assert code == 0 and secs < 10, (code, secs, first.log())
            feeder.join(60)
            assert feeder.error is None and len(feeder.ids) == 600
            second = _consumer(cfg, triton_server.grpc_url, tmp_path, name="second", extra=args).start()
            assert predicted_ids(cfg, set(feeder.ids), timeout=60) == set(feeder.ids), second.log()
        finally:
            first.kill()
            if second is not None:
                code, _ = second.terminate()
                assert code == 0, second.log()
    count, point_ids, _ = qdrant_ids(tmp_path / "qdrant")
    assert count == 600 and set(point_ids) == set(feeder.ids)  # one point per frame, none twice


def _big_producer(cfg: KafkaConfig) -> BusProducer:
    """A producer that may write messages up to 8 MB (the frames a misbehaving camera could send)."""
    return BusProducer(cfg, **{"message.max.bytes": 8_000_000})


def test_oversize_value_and_oversize_header_end_in_the_dlq_and_the_consumer_stays_up(
        kafka_cfg, triton_server, tmp_path):  # noqa: F811
    """A 2 MB frame value and a valid frame with a 2 MB header (both above the producer's 1 MB message limit):
    each is dead-lettered (the oversize original stored in the object store, a pointer on the dead letter), the
    consumer does not exit, and the valid frames around them are predicted and committed."""
    from tasks.adapters.storage import LocalStore
    from tasks.contracts.layout import dlq_original_prefix

    store_dir = tmp_path / "store"
    big_value = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * (2_000_000 // 256)
    big_header = b"h" * 2_000_000
    img = digit_images(1, start=42)[0]
    producer = _big_producer(kafka_cfg)
    good = send_frames(kafka_cfg, digit_images(10), producer=producer)
    value_id, header_id = str(uuid.uuid4()), str(uuid.uuid4())
    producer.produce(kafka_cfg.frames_topic, big_value, key=b"cam-big", headers=frame_headers(value_id))
    producer.produce(kafka_cfg.frames_topic, png(img), key=b"cam-big",
                     headers=frame_headers(header_id) + [("junk", big_header)])
    producer.flush_confirmed(timeout=30)
    good += send_frames(kafka_cfg, digit_images(10, start=10), producer=producer)
    producer.close()

    consumer = _consumer(kafka_cfg, triton_server.grpc_url, tmp_path, policy="all",
                         env={"MLPIPE_STORE_URL": f"file://{store_dir}"}).start()
    try:
        dlq = read_topic(kafka_cfg, kafka_cfg.dlq_topic, lambda r: len(r) >= 2, timeout=40)
        assert len(dlq) == 2, consumer.log()
        assert predicted_ids(kafka_cfg, set(good), timeout=20) == set(good), consumer.log()
        assert consumer.proc.alive() and consumer.get("/healthz")[0] == 200
        wait_until(lambda: consumer.metric("mlpipe_consumer_dead_letters_total", 'reason="oversize"') == 1, 10,
                   "oversize metric")
        assert consumer.metric("mlpipe_consumer_dead_letters_total", 'reason="oversize_headers"') == 1
        assert consumer.metric("mlpipe_consumer_dlq_originals_stored_total") == 2
        wait_until(lambda: _committed(kafka_cfg, consumer.group) == 22, 10, "all 22 offsets committed")
    finally:
        code, _ = consumer.terminate()
    assert code == 0, consumer.log()
    assert "Traceback" not in consumer.log(400)

    by_id = {r.header("frame_id"): r for r in dlq}
    oversize, headers = by_id[value_id], by_id[header_id]
    store = LocalStore(store_dir)
    # the 2 MB value: not on the dead letter, which points at the stored original instead
    assert oversize.header("reason") == "oversize" and not oversize.value
    assert oversize.header("original_bytes") == str(len(big_value))
    prefix = dlq_original_prefix(kafka_cfg.frames_topic, int(oversize.header("source_partition")),
                                 int(oversize.header("source_offset")))
    assert oversize.header("original") == prefix
    assert store.get_bytes(prefix + "value") == big_value
    record = json.loads(store.get_bytes(prefix + "record.json"))
    assert record["offset"] == int(oversize.header("source_offset")) and record["value_bytes"] == len(big_value)
    assert oversize.headers.get("traceparent")  # the small original headers travel as before
    # the 2 MB header: the frame is a dead letter, the header dropped (the fact recorded), the rest kept
    assert headers.header("reason") == "oversize_headers" and headers.value == png(img)
    assert "junk" not in headers.headers and headers.header("headers_dropped") == f"junk:{len(big_header)}"
    hprefix = headers.header("original")
    stored = json.loads(store.get_bytes(hprefix + "record.json"))
    import base64

    assert dict((k, v) for k, v in stored["headers"])["junk"] == base64.b64encode(big_header).decode()
    for rec in dlq:
        size = len(rec.value or b"") + len(rec.key or b"") + sum(len(k) + len(v) for k, v in rec.raw_headers)
        assert size < 1_000_000


def test_broker_restart_with_an_empty_log_loses_no_frame(triton_server, tmp_path):  # noqa: F811
    """Tansu's memory engine restarted on the same port: every topic and offset is gone. The consumer notices
    (topic ids changed), is unready during the gap, never commits the offsets of the old log to the new one,
    re-joins and predicts the frames sent afterwards; a fresh consumer of the group then skips none of them."""
    port = free_port()
    own = LocalBroker(tmp_path / "broker-1", port=port).start()
    second_broker = None
    cfg = KafkaConfig(bootstrap=own.bootstrap, topic_prefix="reborn.", partitions=3)
    first = fresh = None
    try:
        ensure_topics(cfg)
        first = _consumer(cfg, triton_server.grpc_url, tmp_path, policy="all", name="first",
                          extra=["--backoff-max", "1", "--max-batch", "32"]).start()
        first.wait_ready(30)
        before = send_frames(cfg, digit_images(300))
        assert predicted_ids(cfg, set(before), timeout=40) == set(before), first.log()
        wait_until(lambda: _committed(cfg, first.group) == 300, 15, "300 offsets committed on the first log")

        own.stop()
        wait_until(lambda: first.get("/readyz")[0] == 503, 15, "unready while the broker is gone")
        assert first.proc.alive() and first.get("/healthz")[0] == 200
        second_broker = LocalBroker(tmp_path / "broker-2", port=port).start()  # the same address, an empty log
        ensure_topics(cfg)
        after = send_frames(cfg, digit_images(90, start=300))
        got = predicted_ids(cfg, set(after), timeout=60)
        assert got == set(after), first.log(150)
        first.wait_ready(30)
        assert first.metric("mlpipe_consumer_broker_resets_total", 'reason="topic_recreated"') or \
            first.metric("mlpipe_consumer_broker_resets_total", 'reason="topic_gone"'), first.log(150)
        wait_until(lambda: _committed(cfg, first.group) == 90, 15, "the 90 new offsets committed")
        code, _ = first.terminate()
        assert code == 0, first.log()
        # nothing of the old log (about 100 per partition) was committed to the new one (about 30 per partition)
        committed = committed_offsets(cfg, first.group, cfg.frames_topic)
        frames = read_topic(cfg, cfg.frames_topic, lambda r: len(r) >= 90, timeout=15)
        per_partition = {p: sum(1 for r in frames if r.partition == p) for p in range(3)}
        assert all(committed[p] <= per_partition[p] for p in range(3)), (committed, per_partition)
        assert sum(max(0, o) for o in committed.values()) == 90

        # a fresh consumer of the group reads on from there: it skips none of the frames sent after
        later = send_frames(cfg, digit_images(60, start=400))
        fresh = _consumer(cfg, triton_server.grpc_url, tmp_path, policy="all", name="fresh",
                          extra=["--max-batch", "32"]).start()
        assert set(later) <= predicted_ids(cfg, set(later), timeout=40), fresh.log()
        wait_until(lambda: _committed(cfg, fresh.group) == 150, 15, "150 offsets committed on the new log")
        code, _ = fresh.terminate()
        assert code == 0, fresh.log()
        preds = read_topic(cfg, cfg.predictions_topic, lambda r: len(r) >= 150, timeout=15, settle=1.0)
        assert {r.header("frame_id") for r in preds} == set(after) | set(later)
    finally:
        for c in (first, fresh):
            if c is not None:
                c.kill()
        own.stop()
        if second_broker is not None:
            second_broker.stop()
    count, point_ids, _ = qdrant_ids(tmp_path / "qdrant")
    assert count == 450 and set(point_ids) == set(before) | set(after) | set(later)


def test_model_with_a_smaller_max_batch_still_gets_every_frame(triton_server, kafka_cfg, tmp_path):  # noqa: F811
    """A repository rendered with max_batch_size 8 while the consumer batches 64 (and its --model-max-batch is the
    default 256): the consumer reads 8 from Triton's model configuration and splits its micro-batches."""
    from tasks.config import load_settings
    from tasks.local.triton import LocalTriton
    from tasks.model.repo import render_repo, set_serving_version, write_classifier_version

    spec = load_settings().model_spec("digits")
    repo = render_repo("local", tmp_path / "repo8", spec, max_batch_size=8)
    write_classifier_version(repo, spec, 1, triton_server.onnx_v1)
    set_serving_version(repo, spec, 1)
    triton = LocalTriton(repo, tmp_path / "triton8-logs", backend_dir=triton_server.work / "backends",
                         load_models=["digits"], http_port=free_port(), grpc_port=free_port(),
                         metrics_port=free_port())
    triton.start(timeout=90)
    consumer = None
    try:
        with triton.client() as c:
            c.wait_model_ready("digits", timeout=60)
            assert c.model_config("digits")["max_batch_size"] == 8
        ids = send_frames(kafka_cfg, digit_images(200))
        consumer = _consumer(kafka_cfg, triton.grpc_url, tmp_path, policy="none",
                             extra=["--max-batch", "64"]).start()
        assert predicted_ids(kafka_cfg, set(ids), timeout=60) == set(ids), consumer.log()
        assert consumer.metric("mlpipe_consumer_triton_errors_total") == 0, consumer.log()
        wait_until(lambda: consumer.metric("mlpipe_consumer_model_max_batch") == 8, 10, "model max batch gauge")
        assert (consumer.metric("mlpipe_consumer_batch_size_sum") or 0) >= 200
        assert consumer.metric("mlpipe_consumer_dead_letters_total", 'reason="inference_failed"') is None
    finally:
        if consumer is not None:
            code, _ = consumer.terminate()
            assert code == 0, consumer.log()
        triton.stop()


def test_cli_help_and_bad_arguments():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "tasks.cli", "stream", "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "--qdrant-policy" in out.stdout and "--max-batch" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "tasks.cli", "stream", "--qdrant-policy", "sometimes"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
    for args, message in ((["--kafka-config", "fetch.wait.max.mss=5"], "fetch.wait.max.mss"),
                          (["--kafka-config", "fetch.min.bytes"], "expected KEY=VALUE"),
                          (["--inflight", "0"], "--inflight must be positive")):
        bad = subprocess.run([sys.executable, "-m", "tasks.cli", "stream", "--http-port", "-1", *args],
                             capture_output=True, text=True, timeout=30)
        assert bad.returncode == 2 and bad.stderr.startswith("error: ") and message in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr
