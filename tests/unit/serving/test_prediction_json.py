"""Predictions are serialised by orjson in one call: the same compact JSON document as the standard library's
encoder wrote (keys, order, values; a number below 1e-4 may be spelled
differently, the same float), UTF-8 text instead of escapes, and nothing per frame that a batch shares."""

from __future__ import annotations

import json

import numpy as np

from tests.unit.serving.fakes import frame, outputs
from tests.unit.serving.test_records import TOPIC, _predict


def test_the_value_is_the_compact_json_of_the_prediction_in_contract_order():
    records = [frame(TOPIC, 0, o, key=b"cam-%d" % o) for o in range(4)]
    _, built = _predict(records, out=outputs(4, scores=[0.125, 2.5e-5, 0.5, 1.0]))
    for k, (_topic, value, _key, _headers) in enumerate(built.messages):
        pred = json.loads(value)
        assert list(pred) == ["frame_id", "device_id", "label", "class", "score", "topk", "model_name",
                              "model_version", "lineage", "latency_ms", "inference_ms", "processed_at",
                              "captured_at", "traceparent"]
        if k != 1:  # byte for byte what json.dumps(separators=(",", ":")) makes of it (ASCII content)
            assert value == json.dumps(pred, separators=(",", ":")).encode()
    # a small number is spelled 0.000025 (the standard library: 2.5e-05): the same float
    assert b'"score":0.000025' in built.messages[1][1] and json.loads(built.messages[1][1])["score"] == 2.5e-5


def test_text_other_than_ascii_is_utf8_and_a_nan_score_is_null():
    records = [frame(TOPIC, 0, 0, key="Kamera-Süd-№3".encode())]
    out = outputs(1)
    out["SCORE"] = np.array([[np.nan]], dtype=np.float32)
    _, built = _predict(records, out=out)
    value = built.messages[0][1]
    assert "Kamera-Süd-№3".encode() in value  # not \\u escapes
    pred = json.loads(value)
    assert pred["device_id"] == "Kamera-Süd-№3" and pred["score"] is None


def test_messages_share_the_batch_constant_header():
    records = [frame(TOPIC, 0, o) for o in range(3)]
    _, built = _predict(records)
    cts = [m[3][1] for m in built.messages]
    assert cts[0] == ("content-type", b"application/json")
    assert cts[0] is cts[1] is cts[2]
