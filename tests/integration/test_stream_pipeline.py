"""The streaming consumer serving a pipeline end to end: real Tansu broker -> ``mlpipe stream --model scenes``
(a subprocess) -> real local Triton serving the pipeline model ``scenes`` (rendered by
``tasks.model.pipeline_repo``) -> predictions with boxes, count and read-out on Kafka, one Qdrant point per
frame, FRAME_ERROR frames on the dead-letter topic, nothing lost.

The members are small real ONNX files of their contracts: the detector of ``tests/support/pipeline_models.py``
(a bright ``stride`` square on a dark frame is one box centred on it), the classifier an untrained built-in CNN
of the classifier's spec; so the boxes and the count are known in advance, the labels are whatever the
classifier says (checked against the read-out)."""

from __future__ import annotations

import uuid

import pytest

from tasks.adapters.kafka import committed_offsets
from tasks.config import load_settings
from tasks.model import frame_codec
from tests.support import spec_models as sm
from tests.support.pipeline_models import detector_onnx, scene
from tests.support.stream import ConsumerProcess, frame_headers, predictions, qdrant_ids, read_topic, send_raw

pytestmark = pytest.mark.integration

NAME = "scenes"


@pytest.fixture(scope="module")
def pipeline_triton(tmp_path_factory):
    """A started LocalTriton serving pipeline ``scenes`` v1 (detector v1, classifier v1)."""
    from tasks.contracts.pipeline import find_pipeline, member_specs
    from tasks.local.triton import LocalTriton
    from tasks.model import pipeline_repo

    models_dir = load_settings().models_dir
    spec = find_pipeline(NAME, models_dir)
    members = member_specs(spec, models_dir)
    work = tmp_path_factory.mktemp("pipeline-triton")
    repo = work / "repo"
    pipeline_repo.render_pipeline("local", repo, spec, models_dir)
    onnx = {"detector": detector_onnx(work / "detector.onnx", members["detector"]),
            "classifier": sm.contract_onnx(work / "classifier.onnx", members["classifier"])}
    for role, path in onnx.items():
        pipeline_repo.write_member_version(repo, members[role], 1, path, pipeline=NAME)
    pipeline_repo.write_pipeline_version(repo, spec, models_dir, 1, {"detector": 1, "classifier": 1})
    pipeline_repo.set_pipeline_serving(repo, spec, 1)
    triton = LocalTriton(repo, work / "logs", backend_dir=work / "backends")
    triton.start(timeout=120)
    try:
        with triton.client("grpc") as client:  # the members first: the pipeline calls them
            for name in pipeline_repo.member_model_names(spec).values():
                client.load_model(name)
            client.load_model(NAME)
            client.wait_model_ready(NAME, timeout=120)
        yield triton, members
    finally:
        triton.stop()


def test_frames_to_predictions_and_qdrant_through_the_pipeline(kafka_cfg, pipeline_triton, tmp_path):
    triton, members = pipeline_triton
    det = members["detector"]
    layouts = [[(2 + (i % 5), 3 + 4 * b) for b in range(1 + i % det.detection.max_objects)] for i in range(40)]
    layouts[7] = []  # an empty scene: an empty read-out
    sent: dict[str, int] = {}
    messages = []
    for i, cells in enumerate(layouts):
        fid = str(uuid.uuid4())
        sent[fid] = cells
        fmt = "jpeg" if i % 2 else "png"
        messages.append((frame_codec.encode(scene(det, cells), fmt), frame_headers(fid, f"image/{fmt}")))
    broken = str(uuid.uuid4())  # PNG magic, broken body: the pipeline's FRAME_ERROR, a dead letter
    good = frame_codec.encode(scene(det, [(1, 1)]), "png")
    messages.append((good[:40] + bytes(len(good) - 52) + good[-12:], frame_headers(broken, "image/png")))
    send_raw(kafka_cfg, messages)

    consumer = ConsumerProcess(kafka_cfg, triton.grpc_url, tmp_path, qdrant_path=tmp_path / "qdrant", policy="all",
                               extra=["--model", NAME, "--exit-when-idle", "4"]).start()
    try:
        recs = read_topic(kafka_cfg, kafka_cfg.predictions_topic, lambda r: len(r) >= len(sent), timeout=90)
        dlq = read_topic(kafka_cfg, kafka_cfg.dlq_topic, lambda r: len(r) >= 1, timeout=20)
        assert "safe rollout is off" in consumer.log(200)
        code, _ = consumer.terminate()
    except BaseException:
        print(consumer.log(120))
        raise
    assert code == 0, consumer.log()
    preds = {p["frame_id"]: p for p in predictions(recs)}
    assert set(preds) == set(sent), consumer.log()  # lost 0
    names = members["classifier"].class_names
    for fid, p in preds.items():
        assert p["model_name"] == NAME and p["model_version"] == "1" and p["lineage"] == f"{NAME}/1"
        assert p["count"] == len(sent[fid]) == len(p["boxes"]), p
        s = det.detection.stride  # one box centred on each bright cell drawn
        centres = sorted(((b["box"][1] + b["box"][3]) / 2, (b["box"][0] + b["box"][2]) / 2) for b in p["boxes"])
        assert centres == sorted(((r + 0.5) * s, (c + 0.5) * s) for r, c in sent[fid]), p
        assert all(b["label_name"] == names[b["label"]] and 0 < b["label_score"] <= 1 for b in p["boxes"])
        assert sorted(p["readout"]) == sorted("".join(b["label_name"] for b in p["boxes"]))
        assert (p["readout"] == "") is (not sent[fid]) and (p["score"] is None) is (not sent[fid])
    assert [(r.header("frame_id"), r.header("reason")) for r in dlq] == [(broken, "undecodable")]
    committed = sum(max(0, o) for o in committed_offsets(kafka_cfg, "mlpipe-consumer-test",
                                                           kafka_cfg.frames_topic).values())
    assert committed == len(messages)
    count, ids, payloads = qdrant_ids(tmp_path / "qdrant")
    assert count == len(sent) and set(ids) == set(sent)  # one point per frame
    assert all({"readout", "count", "boxes"} <= set(pl) for pl in payloads)
