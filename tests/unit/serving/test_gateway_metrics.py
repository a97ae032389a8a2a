"""The gateway's /metrics: answers by route template and status class, latency, bytes, auth failures.

No broker: the app is built with topics, the predictions reader and produce disabled in effect (a
bootstrap nobody listens on), and only requests that never reach Kafka are sent."""

from __future__ import annotations

import pytest

from tasks.adapters.kafka import KafkaConfig
from tasks.local.procs import free_port
from tasks.serving.gateway import GatewaySettings, create_app

TOKEN = "unit-test-token-0123456789"


@pytest.fixture
def client():
    from fastapi.testclient import TestClient

    cfg = KafkaConfig(bootstrap=f"127.0.0.1:{free_port()}")
    app = create_app(cfg, GatewaySettings(token=TOKEN, produce_timeout_s=1.0, create_topics=False,
                                          follow_predictions=False))
    with TestClient(app) as c:
        yield c


def _samples(client) -> dict[tuple[str, frozenset], float]:
    from prometheus_client.parser import text_string_to_metric_families

    r = client.get("/metrics")
    assert r.status_code == 200
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _value(samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_answers_are_counted_by_route_template_and_status_class(client):
    fid = "5b0b3f5e-8f1c-4d0e-9a59-0c2a9d4c2f11"
    assert client.get(f"/v1/frames/{fid}", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404
    assert client.get(f"/v1/frames/{fid}").status_code == 401
    assert client.get(f"/v1/frames/{fid}", headers={"Authorization": "Bearer wrong"}).status_code == 401
    body = b"x" * 100
    r = client.post("/v1/frames", content=body, headers={"Authorization": f"Bearer {TOKEN}",
                                                         "Content-Type": "text/plain"})
    assert r.status_code in (415, 422)
    assert client.get("/healthz").status_code == 200
    assert client.get("/no/such/path").status_code == 404
    s = _samples(client)
    route = "/v1/frames/{frame_id}"
    assert _value(s, "mlpipe_gateway_requests_total", route=route, method="GET", code="4xx") == 3
    assert _value(s, "mlpipe_gateway_requests_total", route="/v1/frames", method="POST", code="4xx") == 1
    assert _value(s, "mlpipe_gateway_requests_total", route="/healthz", method="GET", code="2xx") == 1
    assert _value(s, "mlpipe_gateway_requests_total", route="unmatched", method="GET", code="4xx") == 1
    # the frame id never becomes a label value
    assert not [k for k in s if any(fid in v for _n, v in k[1])]
    assert _value(s, "mlpipe_gateway_auth_failures_total", reason="missing_token") == 1
    assert _value(s, "mlpipe_gateway_auth_failures_total", reason="invalid_token") == 1
    assert _value(s, "mlpipe_gateway_request_bytes_total", route="/v1/frames") == len(body)
    assert _value(s, "mlpipe_gateway_response_bytes_total", route="/healthz") == len(b'{"status":"ok"}')
    assert _value(s, "mlpipe_gateway_request_duration_seconds_count", route=route, method="GET") == 3
    assert _value(s, "mlpipe_gateway_request_duration_seconds_sum", route=route, method="GET") > 0
    # the refusal counter that was there before is still rendered beside the new series
    assert _value(s, "mlpipe_gateway_rejected_total", reason="unauthorized") == 2
    # the token is in no label or value
    assert TOKEN not in client.get("/metrics").text


def test_refusals_before_routing_are_counted_too(client):
    r = client.get("/healthz?token=abc")  # RequestGuard answers 400 before any route
    assert r.status_code == 400
    s = _samples(client)
    assert _value(s, "mlpipe_gateway_requests_total", route="unmatched", method="GET", code="4xx") == 1
    assert _value(s, "mlpipe_gateway_requests_in_flight") == 1  # the /metrics request itself
