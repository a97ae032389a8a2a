"""The gateway's limits without a server or a broker: the rate limiter on a fake clock, log redaction,
the rejection counter, and the app's ordering (401 before the rate limit, 429 with Retry-After)."""

from __future__ import annotations

import logging
import uuid

import pytest

from tasks.serving.gateway_limits import RateLimiter, RedactQueryFilter, Rejections, redact_url, secret_params

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def test_bucket_admits_the_burst_then_refuses_with_the_wait_until_one_token():
    clock = Clock()
    rl = RateLimiter(rate_per_s=2.0, burst=3, clock=clock)
    assert [rl.check("a") for _ in range(3)] == [None, None, None]
    r = rl.check("a")
    assert r is not None and r.limit == "rate" and r.retry_after == 1 and "2 requests/s" in r.message
    clock.advance(0.5)  # one token back (2/s)
    assert rl.check("a") is None
    assert rl.check("a") is not None
    clock.advance(100)  # refills to the burst, never above
    assert [rl.check("a") for _ in range(4)].count(None) == 3


def test_retry_after_is_whole_seconds_rounded_up():
    clock = Clock()
    rl = RateLimiter(rate_per_s=0.1, burst=1, clock=clock)  # one request per 10 s
    assert rl.check("a") is None
    assert rl.check("a").retry_after == 10
    clock.advance(2.5)
    assert rl.check("a").retry_after == 8  # 7.5 s left -> 8


def test_a_refusal_consumes_nothing_and_keys_are_independent():
    clock = Clock()
    rl = RateLimiter(rate_per_s=1.0, burst=1, clock=clock)
    assert rl.check("a") is None
    for _ in range(50):  # hammering while refused does not push the next admission further out
        assert rl.check("a") is not None
    assert rl.check("b") is None  # another token has its own bucket
    clock.advance(1.0)
    assert rl.check("a") is None


def test_quota_per_window_with_retry_after_until_the_window_resets():
    clock = Clock()
    rl = RateLimiter(rate_per_s=0, burst=1, quota=3, window_s=3600, clock=clock)
    assert [rl.check("a") for _ in range(3)] == [None, None, None]
    clock.advance(600)
    r = rl.check("a")
    assert r is not None and r.limit == "quota" and r.retry_after == 3000 and "3 frames per 3600s" in r.message
    assert rl.check("a", quota=False) is None  # requests that do not count against the quota still pass
    clock.advance(2999.5)
    assert rl.check("a").retry_after == 1
    clock.advance(0.5)  # the window is over: a new one starts
    assert [rl.check("a") for _ in range(3)] == [None, None, None] and rl.check("a").limit == "quota"


def test_rate_refusal_does_not_use_quota_and_quota_refusal_does_not_use_a_token():
    clock = Clock()
    rl = RateLimiter(rate_per_s=1.0, burst=2, quota=2, window_s=60, clock=clock)
    assert rl.check("a") is None and rl.check("a") is None  # quota 2/2 used, bucket empty
    assert rl.check("a").limit == "rate"
    clock.advance(2.0)  # bucket full again
    assert rl.check("a").limit == "quota"
    assert rl.check("a", quota=False) is None and rl.check("a", quota=False) is None  # both tokens still there
    assert rl.check("a", quota=False).limit == "rate"

    rl2 = RateLimiter(rate_per_s=1.0, burst=1, quota=5, window_s=60, clock=clock)
    assert rl2.check("b") is None
    for _ in range(10):
        assert rl2.check("b").limit == "rate"
    for _ in range(4):  # the 10 refusals used none of the quota: 4 more fit
        clock.advance(1.0)
        assert rl2.check("b") is None
    clock.advance(1.0)
    assert rl2.check("b").limit == "quota"


def test_disabled_limits_and_bounded_keys():
    assert RateLimiter(0, 1, 0).enabled is False
    off = RateLimiter(0, 1, 0)
    assert all(off.check("a") is None for _ in range(10_000))
    clock = Clock()
    rl = RateLimiter(rate_per_s=1.0, burst=1, clock=clock, max_keys=100)
    for i in range(1000):
        rl.check(f"k{i}")
    assert len(rl._accounts) == 100
    with pytest.raises(ValueError):
        RateLimiter(-1, 1)


def test_credentials_are_found_and_redacted_from_urls():
    assert secret_params(b"token=abc") == ["token"]
    assert secret_params("a=1&Access_Token=x&api-key=y") == ["access_token", "api-key"]
    assert secret_params(b"%74oken=abc") == ["token"]  # percent-encoded name
    assert secret_params(b"page=2") == [] and secret_params(b"") == []
    assert redact_url("/v1/frames?token=SECRET") == "/v1/frames?[REDACTED]"
    assert "SECRET" not in redact_url('"GET /x?a=1&access_token=SECRET HTTP/1.1" 400')
    assert "SECRET" not in redact_url("/x?%74oken=SECRET")
    assert redact_url("/v1/frames?page=2") == "/v1/frames?page=2"
    rec = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                            ("127.0.0.1:1", "GET", "/v1/frames/x?token=SECRET", "1.1", 400), None)
    assert RedactQueryFilter().filter(rec) and "SECRET" not in rec.getMessage()
    assert "/v1/frames/x?[REDACTED]" in rec.getMessage()


def test_rejections_are_counted_and_logged_at_a_bounded_rate(caplog):
    clock = Clock()
    rej = Rejections(log_every_s=10, clock=clock)
    with caplog.at_level(logging.WARNING, logger="tasks.serving.gateway"):
        for _ in range(100):
            rej("rate_limited", "token abc")
        clock.advance(10)
        rej("rate_limited")
        rej("quota_exceeded")
    assert rej.snapshot() == {"rate_limited": 101, "quota_exceeded": 1}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert "101 refused for this reason so far (100 since the last such line)" in lines[1]


# --------------------------------------------------------------------------- the app, without a server

TOKEN = "tok-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _app(**kw):
    from tasks.adapters.kafka import KafkaConfig
    from tasks.serving.gateway import GatewaySettings, create_app

    settings = GatewaySettings(**{"token": TOKEN, "create_topics": False, "follow_predictions": False,
                                  "max_frame_bytes": 1024, **kw})
    return create_app(KafkaConfig(bootstrap="127.0.0.1:1"), settings)


@pytest.fixture
def fake_clock():
    return Clock()


def test_app_401_before_the_rate_limit_and_429_with_retry_after(fake_clock):
    from fastapi.testclient import TestClient

    app = _app(rate_per_s=1.0, rate_burst=3)
    app.state.limiter.clock = fake_clock
    c = TestClient(app)  # no lifespan: nothing here reaches Kafka
    for _ in range(20):  # unauthenticated requests consume nothing
        assert c.get("/v1/frames/not-a-uuid").status_code == 401
        assert c.get("/v1/frames/not-a-uuid", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert [c.get("/v1/frames/not-a-uuid", headers=AUTH).status_code for _ in range(3)] == [404] * 3
    r = c.get("/v1/frames/not-a-uuid", headers=AUTH)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["detail"] == {"reason": "rate_limited", "limit": "rate", "retry_after": 1,
                                  "message": r.json()["detail"]["message"]}
    fake_clock.advance(1.0)
    assert c.get("/v1/frames/not-a-uuid", headers=AUTH).status_code == 404
    assert c.get("/healthz").status_code == 200  # unauthenticated endpoints are not limited
    snap = c.get("/readyz").json()["rejected"]
    assert snap["unauthorized"] == 40 and snap["rate_limited"] == 1
    metrics = c.get("/metrics").text
    assert 'mlpipe_gateway_rejected_total{reason="rate_limited"} 1.0' in metrics


def test_app_quota_counts_frames_only(fake_clock):
    from fastapi.testclient import TestClient

    app = _app(rate_per_s=0, quota=2, quota_window_s=60)
    app.state.limiter.clock = fake_clock
    c = TestClient(app)
    big = {**AUTH, "Content-Type": "image/png", "Content-Length": "999999"}
    for _ in range(2):  # admitted (then refused as oversize: the body is never read)
        r = c.post("/v1/frames", content=b"x" * 2000, headers=big)
        assert r.status_code == 413 and r.headers["connection"] == "close"
    r = c.post("/v1/frames", content=b"x", headers={**AUTH, "Content-Type": "image/png"})
    assert r.status_code == 429 and r.json()["detail"]["limit"] == "quota" and r.headers["retry-after"] == "60"
    assert c.get("/v1/frames/not-a-uuid", headers=AUTH).status_code == 404  # GET is not a frame


def test_app_refuses_query_credentials_and_too_many_headers():
    from fastapi.testclient import TestClient

    c = TestClient(_app())
    for q in ("token=SECRET", "access_token=SECRET", "api_key=SECRET"):
        r = c.get(f"/v1/frames/{uuid.uuid4()}?{q}", headers=AUTH)
        assert r.status_code == 400 and r.json()["detail"]["reason"] == "credentials_in_query"
        assert "Authorization: Bearer" in r.json()["detail"]["message"] and "SECRET" not in r.text
    assert c.get("/healthz?token=x").status_code == 400
    r = c.get("/healthz", headers={f"X-H{i}": "1" for i in range(120)})
    assert r.status_code == 431 and r.json()["detail"]["reason"] == "too_many_headers"
    r = c.get("/healthz", headers={"X-Big": "a" * 20_000})
    assert r.status_code == 431 and r.json()["detail"]["reason"] == "headers_too_large"


def test_frame_limit_must_fit_a_kafka_message():
    from tasks.adapters.kafka import KafkaConfig
    from tasks.serving.gateway import GatewaySettings, create_app

    small_bus = KafkaConfig(bootstrap="127.0.0.1:1", max_message_bytes=65536)
    with pytest.raises(ValueError, match="frame limit 65536 .*MLPIPE_MAX_FRAME_BYTES.* MLPIPE_MAX_MESSAGE_BYTES"):
        create_app(small_bus, GatewaySettings(token=TOKEN, max_frame_bytes=65536))
    # without an override the limit is the spec's (digits: 65536 bytes)
    with pytest.raises(ValueError, match="model 'digits'.s frames.max_frame_bytes"):
        create_app(small_bus, GatewaySettings(token=TOKEN))
    create_app(small_bus, GatewaySettings(token=TOKEN, max_frame_bytes=1024))  # an override that fits


def test_a_missing_model_spec_is_a_bad_input_naming_the_known_models():
    from tasks.adapters.kafka import KafkaConfig
    from tasks.contracts.spec import SpecError
    from tasks.serving.gateway import GatewaySettings, create_app

    with pytest.raises(SpecError, match="no model spec for 'nope'.*digits"):
        create_app(KafkaConfig(bootstrap="127.0.0.1:1"), GatewaySettings(token=TOKEN, model="nope"))


@pytest.mark.parametrize("model", ["digits", "shapes"])
def test_app_makes_the_consumer_s_cheap_checks_of_the_model_s_spec(model):
    """Bad frames are refused before anything reaches Kafka, with the reason the consumer would dead-letter them
    under and a message naming what the model accepts (no lifespan: a frame that passes would need the broker)."""
    import numpy as np
    from fastapi.testclient import TestClient

    from tasks.config import load_settings
    from tasks.model.frame_codec import encode

    spec = load_settings().model_spec(model)
    c = TestClient(_app(model=model, max_frame_bytes=None))
    h = {**AUTH, "Content-Type": "image/png"}
    other = {"digits": ("image/jpeg", encode(np.zeros((28, 28, 3), np.uint8), "jpeg")),
             "shapes": ("application/x-raw-uint8", bytes(48 * 48 * 3))}[model]
    limit = spec.frames.max_frame_bytes
    cases = [
        (b"this is not an image", h, 422, "undecodable", "no PNG/JPEG signature"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * limit, h, 413, "oversize", f"{limit}"),
        (b"", h, 422, "empty", "empty"),
        (other[1], {**AUTH, "Content-Type": other[0]}, 415, "unsupported_content_type",
         ", ".join(["image/png", "application/x-raw-uint8"] if model == "digits" else ["image/jpeg", "image/png"])),
        (b"\x89PNG\r\n\x1a\n", {**AUTH, "Content-Type": "text/plain"}, 415, "unsupported_content_type",
         f"model {model!r}"),
    ]
    if model == "digits":
        cases.append((b"\x00" * 700, {**AUTH, "Content-Type": "application/x-raw-uint8"}, 422, "wrong_shape",
                      "expected 784"))
    for body, headers, status, reason, words in cases:
        r = c.post("/v1/frames", content=body, headers=headers)
        assert r.status_code == status, (reason, r.status_code, r.text)
        assert r.json()["detail"]["reason"] == reason and words in r.json()["detail"]["message"], r.text
    doc = c.get("/openapi.json").json()
    accepted = set(doc["paths"]["/v1/frames"]["post"]["requestBody"]["content"]) - {"multipart/form-data"}
    assert accepted == ({"image/png", "application/x-raw-uint8"} if model == "digits" else {"image/jpeg", "image/png"})
    assert f"model '{model}'" in doc["info"]["description"]
