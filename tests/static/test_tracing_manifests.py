"""Production tracing, checked statically: Triton's OpenTelemetry mode in the serving pod, one collector for
Triton, the consumer and the step pods."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "docker" / "k8s"


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _container(name: str) -> dict:
    (deploy,) = [d for d in _docs("serving-deployment.yaml") if d["kind"] == "Deployment"]
    return next(c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def _trace_config(args: list[str]) -> dict[str, str]:
    out = {}
    for arg in args:
        if arg.startswith("--trace-config="):
            key, _, value = arg.removeprefix("--trace-config=").partition("=")
            out[key] = value
    return out


def test_triton_runs_in_opentelemetry_mode_exporting_to_the_consumers_collector():
    cfg = _trace_config(_container("triton")["args"])
    assert cfg.get("mode") == "opentelemetry", cfg
    assert cfg.get("level") in ("TIMESTAMPS", "TENSORS") and int(cfg.get("rate", "0")) >= 1
    url = cfg.get("opentelemetry,url", "")
    assert url.endswith("/v1/traces") and url.startswith("http://")
    assert cfg.get("opentelemetry,resource", "").startswith("service.name=")
    (consumer_cm,) = [d for d in _docs("serving-deployment.yaml")
                      if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "mlpipe-consumer-config"]
    endpoint = consumer_cm["data"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert url == endpoint.rstrip("/") + "/v1/traces"  # one collector: Triton's spans join the consumer's
    assert 0 < float(consumer_cm["data"]["MLPIPE_TRACE_SAMPLE"]) <= 1
    assert "mlpipe-consumer-config" in [e["configMapRef"]["name"] for e in _container("consumer")["envFrom"]]
    (pipeline_cm,) = _docs("configmap.yaml")
    assert pipeline_cm["data"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == endpoint


def test_the_trace_flag_is_one_tritonserver_knows():
    # tritonserver takes "--trace-config <setting>=<value>" (and "<mode>,<setting>=<value>"); a typo would make
    # the pod exit at start, so every setting is one of the documented ones
    known = {"mode", "rate", "level", "count", "file", "log-frequency", "opentelemetry,url",
             "opentelemetry,resource", "opentelemetry,bsp_max_queue_size", "opentelemetry,bsp_schedule_delay",
             "opentelemetry,bsp_max_export_batch_size"}
    assert set(_trace_config(_container("triton")["args"])) <= known
