"""The pure record builders of the consumer: frames -> the cheap checks, Triton's results -> predictions, points,
dead letters (FRAME_ERROR rows included)."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import numpy as np
import pytest

from tasks.contracts.messages import DLQ_REASONS, FrameRejected
from tasks.serving.consumer import QdrantPolicy
from tasks.serving.consumer.records import (
    check_frames,
    dead_letter_records,
    frame_errors,
    iso,
    parse_frame_error,
    parse_time,
    prediction_point,
    prediction_records,
)
from tests.unit.serving.fakes import CAPTURED, frame, outputs, spec_of

TOPIC = "frames"
PROCESSED = CAPTURED + dt.timedelta(milliseconds=42.5)


def _predict(records, *, policy=None, out=None, version="3", spec=None, **kw):
    spec = spec or spec_of()
    d = check_frames(records, spec)
    out = out if out is not None else outputs(len(d.good), classes=spec.num_classes)
    return d, prediction_records(records, d.good, d.frame_ids, out, topic="predictions", model=spec.name,
                                 version=version, infer_s=0.0123456, processed=PROCESSED, policy=policy, spec=spec,
                                 **kw)


def test_check_frames_keeps_good_frames_in_order_and_rejects_poison_without_decoding():
    fid = uuid.uuid4()
    records = [frame(TOPIC, 0, 0, frame_id=str(fid).upper()), frame(TOPIC, 0, 1, kind="missing_id"),
               frame(TOPIC, 0, 2, encoding="png"), frame(TOPIC, 0, 3, kind="invalid_id"),
               frame(TOPIC, 0, 4, kind="undecodable"), frame(TOPIC, 0, 5, kind="oversize"),
               frame(TOPIC, 0, 6, kind="jpeg"), frame(TOPIC, 0, 7, kind="raw_wrong_size"),
               frame(TOPIC, 0, 8, kind="corrupt_png"), frame(TOPIC, 0, 9, kind="wrong_shape_png")]
    d = check_frames(records, spec_of("digits"))
    assert d.good == [0, 2, 8, 9]  # a broken PNG body and a PNG of another size are found by Triton
    assert d.frame_ids[0] == str(fid)  # canonical form
    assert d.frames == [records[i].value for i in d.good]  # the encoded values, as they came
    assert [(i, r.reason) for i, r in d.rejected] == [
        (1, "missing_frame_id"), (3, "invalid_frame_id"), (4, "undecodable"), (5, "oversize"),
        (6, "unsupported_content_type"), (7, "wrong_shape")]
    assert "image/png, application/x-raw-uint8" in d.rejected[4][1].detail  # names what to send
    assert "expected 784 (28x28x1" in d.rejected[5][1].detail
    nothing = check_frames([frame(TOPIC, 0, 0, kind="missing_id")], spec_of("digits"))
    assert nothing.frames == [] and nothing.good == [] and len(nothing.rejected) == 1


def test_the_frame_limit_is_the_spec_s_unless_overridden():
    spec = spec_of("digits")
    limit = spec.frames.max_frame_bytes
    png = frame(TOPIC, 0, 0, encoding="png")
    assert check_frames([png], spec).good == [0]
    small = check_frames([png], spec, max_frame_bytes=len(png.value) - 1)
    assert [(i, r.reason) for i, r in small.rejected] == [(0, "oversize")]
    assert f"the limit is {len(png.value) - 1}" in small.rejected[0][1].detail
    big = frame(TOPIC, 0, 1, kind="oversize")
    assert f"the limit is {limit}" in check_frames([big], spec).rejected[0][1].detail
    assert check_frames([big], spec, max_frame_bytes=2 * limit).good == [0]  # the override wins


def test_a_shapes_consumer_takes_jpeg_and_png_frames_and_refuses_raw():
    shapes = spec_of("shapes")
    records = [frame(TOPIC, 0, 0, encoding="jpeg", spec=shapes), frame(TOPIC, 0, 1, encoding="png", spec=shapes),
               frame(TOPIC, 0, 2, encoding="raw", spec=shapes)]
    d = check_frames(records, shapes)
    assert d.good == [0, 1]
    assert [(i, r.reason) for i, r in d.rejected] == [(2, "unsupported_content_type")]
    assert "image/jpeg, image/png" in d.rejected[0][1].detail


def test_frame_error_rows_become_rejections_with_their_reason():
    out = outputs(4, errors={1: b"wrong_shape: image is 32x28, expected 28x28", 3: b"something odd happened"})
    got = frame_errors(out)
    assert [(j, r.reason, r.detail) for j, r in got] == [
        (1, "wrong_shape", "image is 32x28, expected 28x28"),
        (3, "undecodable", "Triton could not use the frame: something odd happened")]
    assert frame_errors(outputs(3)) == []
    assert frame_errors({k: v for k, v in outputs(2).items() if k != "FRAME_ERROR"}) == []
    for reason in DLQ_REASONS:
        parsed = parse_frame_error(f"{reason}: why".encode())
        assert isinstance(parsed, FrameRejected) and (parsed.reason, parsed.detail) == (reason, "why")
    assert parse_frame_error("no_such_reason: x").reason == "undecodable"


def test_prediction_json_fields_headers_and_key():
    trace = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    records = [frame(TOPIC, 1, 9, traceparent=trace, key=b"cam-7"),
               frame(TOPIC, 1, 10, key=None, captured_at=None, timestamp_ms=int(CAPTURED.timestamp() * 1000)),
               frame(TOPIC, 1, 11, captured_at="not a time")]
    d, built = _predict(records, out=outputs(3, scores=[0.91234567, 0.5, 0.25]))
    assert [m[0] for m in built.messages] == ["predictions"] * 3
    topic, value, key, headers = built.messages[0]
    pred = json.loads(value)
    assert key == d.frame_ids[0].encode()
    assert headers == [("frame_id", key), ("content-type", b"application/json"), ("traceparent", trace)]
    assert pred == {
        "frame_id": d.frame_ids[0], "device_id": "cam-7", "label": 0, "class": "0", "score": 0.912346,
        "topk": [{"label": 0, "class": "0", "score": 0.912346}, {"label": 1, "class": "1", "score": 0.012346},
                 {"label": 2, "class": "2", "score": 0.012346}],
        "model_name": "digits", "model_version": "3", "lineage": "digits/3", "latency_ms": 42.5,
        "inference_ms": 12.346,
        "processed_at": "2026-01-02T03:04:05.720Z", "captured_at": "2026-01-02T03:04:05.678Z",
        "traceparent": trace.decode(),
    }
    assert b" " not in value  # compact JSON
    second = json.loads(built.messages[1][1])
    assert second["device_id"] == "" and second["captured_at"] is None
    assert second["latency_ms"] == 42.5  # from the record's timestamp when there is no captured_at
    assert len(built.messages[1][3]) == 2  # no traceparent header without one
    third = json.loads(built.messages[2][1])
    assert third["captured_at"] == "not a time" and third["latency_ms"] is None
    assert built.captured == [CAPTURED, None, None]
    assert built.points == []  # no policy: nothing indexed


def test_predictions_name_the_classes_of_the_spec():
    shapes = spec_of("shapes")
    records = [frame(TOPIC, 0, o, encoding="jpeg", spec=shapes) for o in range(3)]
    out = outputs(3, classes=shapes.num_classes)
    out["LABEL"][2, 0] = 9  # out of the spec's range: named by its id
    _, built = _predict(records, spec=shapes, out=out)
    preds = [json.loads(m[1]) for m in built.messages]
    assert [(p["label"], p["class"]) for p in preds] == [(0, "circle"), (1, "square"), (9, "9")]
    assert preds[1]["topk"] == [{"label": 1, "class": "square", "score": 0.95},
                                {"label": 2, "class": "triangle", "score": 0.012346},
                                {"label": 3, "class": "cross", "score": 0.012346}]
    assert preds[0]["model_name"] == "shapes"


def test_points_follow_the_policy_and_drop_the_traceparent():
    records = [frame(TOPIC, 0, o, traceparent=b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01") for o in range(3)]
    d, built = _predict(records, policy=QdrantPolicy.parse("low_confidence:0.7"),
                        out=outputs(3, scores=[0.9, 0.5, 0.69]))
    assert [p.frame_id for p in built.points] == [d.frame_ids[1], d.frame_ids[2]]
    point = built.points[0]
    assert np.array_equal(point.embedding, [4, 5, 6, 7])
    pred = json.loads(built.messages[1][1])
    assert point.payload == {**{k: v for k, v in pred.items() if k != "traceparent"}, "indexed_because": "low_confidence"}
    _, every = _predict(records, policy=QdrantPolicy.parse("all"))
    assert [p.payload["indexed_because"] for p in every.points] == ["all"] * 3
    _, no_embedding = _predict(records, policy=QdrantPolicy.parse("all"), out=outputs(3, embedding=False))
    assert no_embedding.points == [] and len(no_embedding.messages) == 3


def test_prediction_point_and_builders_are_pure():
    pred = {"frame_id": "f", "score": 0.5, "traceparent": "t"}
    p = prediction_point(pred, [1.0], "sample")
    assert p.frame_id == "f" and p.payload == {"frame_id": "f", "score": 0.5, "indexed_because": "sample"}
    assert pred == {"frame_id": "f", "score": 0.5, "traceparent": "t"}  # the input is not changed
    records = [frame(TOPIC, 0, o) for o in range(4)]
    _, a = _predict(records, policy=QdrantPolicy.parse("all"))
    _, b = _predict(records, policy=QdrantPolicy.parse("all"))
    assert a.messages == b.messages and [p.payload for p in a.points] == [p.payload for p in b.points]
    _, empty = _predict([frame(TOPIC, 0, 0, kind="missing_id")], out={})
    assert empty.messages == [] and empty.points == [] and empty.captured == []


def test_dead_letters_keep_the_original_and_say_why():
    records = [frame(TOPIC, 2, 5), frame(TOPIC, 2, 6, kind="undecodable", key=b"cam-1"),
               frame(TOPIC, 2, 7, kind="missing_id", key=None)]
    records[2].value = None
    d = check_frames(records, spec_of())
    dl = dead_letter_records(records, d.rejected, dlq_topic="frames.dlq", processed_iso=iso(PROCESSED))
    assert len(dl) == 2
    topic, value, key, headers = dl[0]
    assert (topic, value, key) == ("frames.dlq", b"definitely not a picture", b"cam-1")
    assert headers[:len(records[1].raw_headers)] == records[1].raw_headers  # original headers first, in order
    extra = dict(headers[len(records[1].raw_headers):])
    assert extra["reason"] == b"undecodable" and extra["reason_detail"]
    assert (extra["source_topic"], extra["source_partition"], extra["source_offset"]) == (b"frames", b"2", b"6")
    assert extra["dead_lettered_at"] == b"2026-01-02T03:04:05.720Z"
    assert dl[1][1] == b"" and dl[1][2] is None and dict(dl[1][3])["reason"] == b"missing_frame_id"
    long = [(0, type(d.rejected[0][1])("undecodable", "x" * 2000))]
    assert len(dict(dead_letter_records(records, long, dlq_topic="q", processed_iso="t")[0][3])["reason_detail"]) == 500


@pytest.mark.parametrize("text, expected", [
    ("2026-01-02T03:04:05.678Z", CAPTURED),
    ("2026-01-02T03:04:05.678", CAPTURED),  # naive = UTC
    ("2026-01-02T04:04:05.678+01:00", CAPTURED),
    ("yesterday", None), ("", None), (None, None),
])
def test_parse_time(text, expected):
    assert parse_time(text) == expected
