"""ops/prometheus and ops/grafana, checked with the real promtool and against the metrics the code exports.

* ``promtool check config`` (the template and the configuration ``make up`` renders), ``check rules`` and
  ``test rules`` (ops/prometheus/tests/*.yml), and a rule made wrong on purpose must fail its unit test;
* every metric an alert, a recording rule or a dashboard panel names is one a service really exports
  (the consumer's ``Metrics``, the gateway's registry, the exporter's families, Triton's ``nv_*`` names,
  which tests/integration/test_prometheus.py checks against a running tritonserver), or a recording rule;
* the Grafana dashboard parses and every panel has an expression.

promtool is Debian's ``prometheus`` package (``.ci/ensure-prometheus``, run by ``make test``); the tests
that run it skip, naming the install command, only where it is not installed."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
OPS = ROOT / "ops" / "prometheus"
RULES = sorted((OPS / "rules").glob("*.yml"))
RULE_TESTS = sorted((OPS / "tests").glob("*.yml"))
DASHBOARD = ROOT / "ops" / "grafana" / "mlpipe.json"
#: Triton 2.51's metric names used by the rules and the dashboard (checked live by the integration test)
TRITON_METRICS = {"nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
                  "nv_inference_exec_count", "nv_inference_request_duration_us", "nv_inference_queue_duration_us"}
BUILTIN = {"up", "ALERTS", "ALERTS_FOR_STATE", "scrape_duration_seconds"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                "offset", "inf", "nan", "le"}


def _promtool() -> str:
    from tasks.local.prometheus import PrometheusMissing, promtool_binary

    try:
        return str(promtool_binary())
    except PrometheusMissing as exc:
        pytest.skip(f"promtool cannot run here: {exc}")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_promtool(), *args], capture_output=True, text=True, timeout=120)


def test_promtool_checks_the_config_template_and_the_rules():
    assert RULES and RULE_TESTS
    for args in (("check", "config", str(OPS / "prometheus.yml")), ("check", "rules", *map(str, RULES))):
        res = _run(*args)
        assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_runs_the_rule_unit_tests_and_they_catch_a_broken_rule(tmp_path):
    res = _run("test", "rules", *map(str, RULE_TESTS))
    assert res.returncode == 0, res.stdout + res.stderr
    # the same tests against a rule file with one threshold moved must fail (the tests bite)
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    for rule in RULES:
        text = rule.read_text()
        if "> 5000" in text:
            text = text.replace("> 5000", "> 50000", 1)
        (tmp_path / "rules" / rule.name).write_text(text)
    for test in RULE_TESTS:
        (tmp_path / "tests" / test.name).write_text(test.read_text())
    broken = _run("test", "rules", *(str(tmp_path / "tests" / t.name) for t in RULE_TESTS))
    assert broken.returncode != 0 and "MlpipeConsumerLagHigh" in broken.stdout + broken.stderr


def test_every_alert_the_issue_asks_for_has_a_rule_and_a_unit_test():
    alerts = {r["alert"] for f in RULES for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"]
              if "alert" in r}
    wanted = {"MlpipeConsumerLagHigh", "MlpipeDeadLetterRateHigh", "MlpipeConsumerPaused", "MlpipeTritonErrors",
              "MlpipeEndToEndLatencyHigh", "MlpipeDriftDetected"}
    assert wanted <= alerts
    tested = {t["alertname"] for f in RULE_TESTS for case in yaml.safe_load(f.read_text())["tests"]
              for t in case.get("alert_rule_test", [])}
    assert alerts <= tested, f"alerts without a unit test: {sorted(alerts - tested)}"


def test_the_rendered_stack_config_is_valid(tmp_path):
    from tasks.local.prometheus import JOBS, write_config

    targets = {job: f"127.0.0.1:{9000 + i}" for i, job in enumerate(JOBS)}
    path = write_config(tmp_path, targets, scrape_interval="1s", evaluation_interval="1s")
    res = _run("check", "config", str(path))
    assert res.returncode == 0, res.stdout + res.stderr
    cfg = yaml.safe_load(path.read_text())
    assert {j["job_name"]: j["static_configs"][0]["targets"] for j in cfg["scrape_configs"]} == \
        {job: [addr] for job, addr in targets.items()}
    assert cfg["global"]["scrape_timeout"] == "1s"  # never longer than the interval
    # only the services the stack runs are scraped; a job the template lacks is refused
    partial = yaml.safe_load(write_config(tmp_path / "p", {"exporter": "127.0.0.1:1"}).read_text())
    assert [j["job_name"] for j in partial["scrape_configs"]] == ["exporter"]
    with pytest.raises(ValueError, match="no scrape job gatway"):
        write_config(tmp_path / "q", {"gatway": "127.0.0.1:1"})


# --------------------------------------------------------------------------- metric names


def exported_metric_names() -> set[str]:
    """Every sample name the mlpipe services export (their real registries and collectors)."""
    from prometheus_client import CollectorRegistry

    from tasks.serving import exporter as ex
    from tasks.serving.consumer.telemetry import Metrics
    from tasks.serving.gateway import _metrics
    from tasks.serving.gateway_metrics import GatewayMetrics

    names: set[str] = set()

    def add(families) -> None:
        for family in families:
            names.add(family.name)
            names.update(s.name for s in family.samples)
            if family.type == "counter":
                names.add(family.name + "_total")
            if family.type == "histogram":
                names.update(family.name + s for s in ("_bucket", "_sum", "_count"))

    consumer = Metrics()
    consumer.frames.labels("predicted").inc()
    add(consumer.registry.collect())
    registry, rejected = _metrics()
    gw = GatewayMetrics(registry)
    gw.requests.labels("/v1/frames", "POST", "2xx").inc()
    gw.duration.labels("/v1/frames", "POST").observe(0.01)
    gw.request_bytes.labels("/v1/frames").inc()
    gw.response_bytes.labels("/v1/frames").inc()
    gw.auth_failures.labels("missing_token").inc()
    rejected.labels("unauthorized").inc()
    add(registry.collect())
    report = {"model": "m", "champion": 1, "created_at": "2026-01-01T00:00:00+00:00", "status": "ok",
              "drift": False, "samples": 10, "checks": [{"name": "class_psi", "value": 0.1, "threshold": 0.2}]}
    add(ex.drift_families(report))

    class _NoStore:
        def list_dirs(self, prefix):
            return []

    add(ex.qc_families(_NoStore(), ["m"]))
    add(ex.lag_families({0: (1, 2)}, "g", "frames"))
    watch = ex.KafkaWatch(type("Kafka", (), {"frames_topic": "frames"})(), "g", clock=lambda: 1.0)  # type: ignore
    watch.snapshot = ex.KafkaSnapshot(0.0, {0: (1, 2)}, {"frames": {0: 2}})  # what poll() leaves
    add(watch.families())
    clock = iter(range(100)).__next__
    meter = ex.CostMeter(cpu=lambda: {"consumer": float(clock())}, frames=lambda: clock() * 10,
                         clock=lambda: float(clock()))
    meter.sample()
    meter.sample()
    add(meter.families())
    add(ex.ExporterCollector(None, [], None, None).collect())
    reg = CollectorRegistry()
    add(reg.collect())
    return names


def recording_rules() -> set[str]:
    return {r["record"] for f in RULES for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"]
            if "record" in r}


def metric_names_in(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (strings, label matchers, ranges, clauses removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    found = set()
    for m in re.finditer(r"(?<![\w:.])([A-Za-z_:][A-Za-z0-9_:]*)\b(?!\s*\()", text):
        word = m.group(1)
        if word.lower() in PROMQL_WORDS or word == "e":
            continue
        found.add(word)
    return found


def test_the_name_extractor():
    assert metric_names_in('sum by (le) (rate(a_bucket{x="y(z)"}[5m])) / on () group_left () (b > 0)') == \
        {"a_bucket", "b"}
    assert metric_names_in("histogram_quantile(0.95, sum by (le, route) (rate(c[5m]))) > 1e-9") == {"c"}


def _rule_exprs() -> list[tuple[str, str]]:
    return [(r.get("alert") or r.get("record"), r["expr"]) for f in RULES
            for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"]]


def test_rules_name_only_metrics_that_exist():
    known = exported_metric_names() | recording_rules() | TRITON_METRICS | BUILTIN
    for name, expr in _rule_exprs():
        unknown = metric_names_in(expr) - known
        assert not unknown, f"rule {name} names metrics no service exports: {sorted(unknown)}"
    # the consumer's own series the issue names are the ones the rules use
    used = set().union(*(metric_names_in(e) for _n, e in _rule_exprs()))
    assert {"mlpipe_consumer_paused", "mlpipe_consumer_dead_letters_total", "mlpipe_consumer_triton_errors_total",
            "mlpipe_consumer_e2e_latency_seconds_bucket", "mlpipe_kafka_group_lag_total_messages",
            "mlpipe_drift_detected", "nv_inference_request_failure"} <= used


def test_the_grafana_dashboard_parses_and_names_only_metrics_that_exist():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    known = exported_metric_names() | recording_rules() | TRITON_METRICS | BUILTIN
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(panels) >= 10
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["type"] == "prometheus"
        for target in panel["targets"]:
            names = metric_names_in(target["expr"])
            assert names, f"panel {panel['title']!r}: {target['expr']!r} selects no metric"
            assert not names - known, f"panel {panel['title']!r} names unknown metrics {sorted(names - known)}"
    for ann in dash.get("annotations", {}).get("list", []):
        assert not metric_names_in(ann["expr"]) - known
    used = set().union(*(metric_names_in(t["expr"]) for p in panels for t in p["targets"]))
    # each service has its panel: consumer, gateway, Triton, the exporter (drift, QC, lag, cost)
    for prefix in ("mlpipe_consumer_", "mlpipe_gateway_", "nv_inference_", "mlpipe_drift_", "mlpipe_qc_",
                   "mlpipe_kafka_", "mlpipe:cost_"):
        assert any(n.startswith(prefix) for n in used), prefix
