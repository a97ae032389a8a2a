"""The exporter and Prometheus in the local stack: their command lines, the summary `make up`/`make status`
print, and a missing prometheus binary named with the fix (nothing is started here)."""

from __future__ import annotations

from pathlib import Path

from tasks.local import prometheus, stack


def _spec(tmp_path: Path, services: str) -> stack.StackSpec:
    ports = {name: 20000 + i for i, name in enumerate(stack.PORTS)}
    return stack.StackSpec(home=tmp_path, services=stack.parse_services(services), ports=ports)


def test_prometheus_scrapes_exactly_the_services_the_stack_runs(tmp_path):
    spec = _spec(tmp_path, "serving,observability")
    services = stack.build_services(spec)
    assert list(services)[-2:] == ["exporter", "prometheus"]
    argv = services["prometheus"].argv
    p = spec.ports
    targets = {a.split("=", 1)[1] for a in argv if a.startswith("--target=")}
    assert targets == {f"consumer=127.0.0.1:{p['consumer']}", f"gateway=127.0.0.1:{p['gateway']}",
                       f"triton=127.0.0.1:{p['triton_metrics']}", f"exporter=127.0.0.1:{p['exporter']}"}
    assert argv[argv.index("--port") + 1] == str(p["prometheus"])
    exporter = services["exporter"].argv
    assert exporter[exporter.index("--pid-dir") + 1] == str(spec.pid_dir)
    assert exporter[exporter.index("--bootstrap") + 1] == spec.kafka_bootstrap
    # without the gateway and Triton, their jobs are not in the configuration
    only = stack.build_services(_spec(tmp_path, "broker,consumer,observability"))["prometheus"].argv
    assert {a.split("=", 2)[1] for a in only if a.startswith("--target=")} == {"consumer", "exporter"}
    assert stack.parse_services("observability") == ("exporter", "prometheus")
    assert set(stack.OBSERVABILITY) <= set(stack.parse_services("all"))


def _summary(services: dict, cost) -> str:
    lines: list[str] = []
    st = {"home": "/h", "urls": {"prometheus": "http://127.0.0.1:9090", "exporter_metrics": "http://x/metrics"},
          "services": {n: {"alive": True, "healthy": True, "pid": 1} for n in services}, "supervisor": {},
          "login": {}, "logs": "/h/logs", "cost": cost}
    stack._print_summary(st, lines.append)
    return "\n".join(lines)


def test_summary_prints_the_prometheus_url_and_the_cost_per_frame():
    out = _summary(["consumer", "exporter", "prometheus"],
                   {"per_1k_frames": {"consumer": 1.5, "triton": 2.25, "all": 3.75}, "window_s": 300,
                    "window_frames": 4000})
    assert "Prometheus     http://127.0.0.1:9090  (alerts: http://127.0.0.1:9090/alerts)" in out
    assert "3.75 CPU s per 1,000 frames over the last 300s (4000 frames): consumer 1.50, triton 2.25" in out
    idle = _summary(["exporter", "prometheus"], {"per_1k_frames": {}, "window_s": 42, "window_frames": 0})
    assert "no frames processed in the last 42s" in idle
    missing = _summary(["exporter"], None)
    assert "Prometheus     not running (not installed: `bash .ci/ensure-prometheus`" in missing
    assert "Prometheus" not in _summary(["consumer"], None)  # not asked for: nothing said


def test_a_missing_prometheus_binary_is_named_with_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLPIPE_PROMETHEUS_BIN", str(tmp_path / "no-such-prometheus"))
    why = prometheus.available()
    assert why and "MLPIPE_PROMETHEUS_BIN" in why
    assert prometheus.main(["serve", "--dir", str(tmp_path / "p"), "--port", "1"]) == 1
    assert "is not an executable file" in capsys.readouterr().err
    monkeypatch.delenv("MLPIPE_PROMETHEUS_BIN")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert ".ci/ensure-prometheus" in (prometheus.available() or "")
    assert prometheus.main(["serve", "--dir", str(tmp_path / "p"), "--target", "nonsense"]) == 1
