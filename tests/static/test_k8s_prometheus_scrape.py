"""docker/k8s/prometheus-scrape.yaml: the scrape configuration of both metrics ports of the serving pod.

No cluster here, so the Kubernetes pod discovery is simulated on the Deployment's own pod template (one
discovered target per container port, with the ``__meta_kubernetes_*`` labels Prometheus gives it) and
the real relabelling rules are applied to it: exactly the consumer's and Triton's metrics ports survive,
with the job names the alert rules use. The embedded configuration is checked by ``promtool check config``
with the discovery block swapped for a static one: Debian's prometheus is built without the Kubernetes
discovery plugin, so its promtool refuses ``kubernetes_sd_configs`` although upstream Prometheus reads it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCRAPE = ROOT / "docker" / "k8s" / "prometheus-scrape.yaml"
SERVING = ROOT / "docker" / "k8s" / "serving-deployment.yaml"
KUBERNETES_VERSION = "1.31.0"


def _docs(path: Path) -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(path.read_text()) if d}


@pytest.fixture(scope="module")
def scrape() -> dict[str, dict]:
    return _docs(SCRAPE)


@pytest.fixture(scope="module")
def pod() -> dict:
    return _docs(SERVING)["Deployment"]["spec"]["template"]


def _sanitize(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def discovered_targets(pod: dict, namespace: str = "mlpipe", pod_name: str = "mlpipe-serving-abc12",
                       pod_ip: str = "10.1.2.3") -> list[dict[str, str]]:
    """What Prometheus' pod role discovers for this pod: one target per container port."""
    base = {"__meta_kubernetes_namespace": namespace, "__meta_kubernetes_pod_name": pod_name,
            "__meta_kubernetes_pod_ip": pod_ip}
    base.update({f"__meta_kubernetes_pod_label_{_sanitize(k)}": v for k, v in pod["metadata"]["labels"].items()})
    base.update({f"__meta_kubernetes_pod_annotation_{_sanitize(k)}": str(v)
                 for k, v in pod["metadata"].get("annotations", {}).items()})
    out = []
    for c in pod["spec"]["containers"]:
        for port in c.get("ports", []):
            out.append({**base, "__address__": f"{pod_ip}:{port['containerPort']}",
                        "__meta_kubernetes_pod_container_name": c["name"],
                        "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
                        "__meta_kubernetes_pod_container_port_number": str(port["containerPort"]),
                        "__metrics_path__": "/metrics", "job": "mlpipe-serving"})
    return out


def relabel(labels: dict[str, str], configs: list[dict]) -> dict[str, str] | None:
    """Prometheus' relabelling (keep, drop, replace) of one target; None when it is dropped."""
    labels = dict(labels)
    for c in configs:
        action = c.get("action", "replace")
        value = c.get("separator", ";").join(labels.get(n, "") for n in c.get("source_labels", []))
        m = re.fullmatch(c.get("regex", "(.*)"), value)
        if action == "keep" and not m:
            return None
        if action == "drop" and m:
            return None
        if action == "replace" and m:
            repl = re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", c.get("replacement", "$1"))
            labels[c["target_label"]] = m.expand(repl)
        if action not in ("keep", "drop", "replace"):
            raise AssertionError(f"the simulation does not know relabel action {action!r}")
    return labels


def _scrape_config(scrape) -> dict:
    return yaml.safe_load(scrape["ConfigMap"]["data"]["prometheus.yml"])


def _ports(pod: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}


def test_both_metrics_ports_are_scraped_and_nothing_else(scrape, pod):
    (job,) = _scrape_config(scrape)["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod", "namespaces": {"names": ["mlpipe"]}}]
    kept = [t for t in (relabel(t, job["relabel_configs"]) for t in discovered_targets(pod)) if t]
    got = {(t["job"], t["__address__"].rsplit(":", 1)[1], t["container"]) for t in kept}
    ports = _ports(pod)
    assert got == {("consumer", str(ports["consumer-http"]), "consumer"),
                   ("triton", str(ports["triton-metrics"]), "triton")}
    assert all(t["__metrics_path__"] == "/metrics" and t["namespace"] == "mlpipe" and t["pod"] for t in kept)
    # the ports are the ones the processes listen on: the consumer's --http-port, Triton's --metrics-port
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    assert f"--http-port={ports['consumer-http']}" in containers["consumer"]["args"]
    assert f"--metrics-port={ports['triton-metrics']}" in containers["triton"]["args"]
    # another pod in the namespace is not scraped
    other = {**pod, "metadata": {**pod["metadata"], "labels": {"app.kubernetes.io/name": "something-else"}}}
    assert not [t for t in (relabel(t, job["relabel_configs"]) for t in discovered_targets(other)) if t]


def test_the_job_names_are_the_ones_the_rules_and_the_local_config_use(scrape):
    local = yaml.safe_load((ROOT / "ops" / "prometheus" / "prometheus.yml").read_text())
    local_jobs = {j["job_name"] for j in local["scrape_configs"]}
    (job,) = _scrape_config(scrape)["scrape_configs"]
    produced = {c["replacement"] for c in job["relabel_configs"] if c.get("target_label") == "job"}
    assert produced == {"consumer", "triton"} and produced <= local_jobs
    rules = (ROOT / "ops" / "prometheus" / "rules" / "mlpipe.yml").read_text()
    assert all(name in rules for name in produced)
    assert _scrape_config(scrape)["rule_files"] == ["/etc/prometheus/rules/*.yml"]


def test_the_pod_monitor_selects_the_serving_pod_and_both_named_ports(scrape, pod):
    pm = scrape["PodMonitor"]
    assert pm["apiVersion"] == "monitoring.coreos.com/v1" and pm["metadata"]["namespace"] == "mlpipe"
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    endpoints = {e["port"]: e for e in pm["spec"]["podMetricsEndpoints"]}
    assert set(endpoints) == {"consumer-http", "triton-metrics"} and set(endpoints) <= set(_ports(pod))
    jobs = {port: next(r["replacement"] for r in e["relabelings"] if r["targetLabel"] == "job")
            for port, e in endpoints.items()}
    assert jobs == {"consumer-http": "consumer", "triton-metrics": "triton"}
    assert all(e["path"] == "/metrics" for e in endpoints.values())


def test_the_config_map_matches_the_kubernetes_schema(scrape):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")
    kubernetes_validate.validate(scrape["ConfigMap"], KUBERNETES_VERSION, strict=True)


def test_promtool_accepts_the_embedded_configuration(scrape, tmp_path):
    from tasks.local.prometheus import PrometheusMissing, promtool_binary

    try:
        promtool = promtool_binary()
    except PrometheusMissing as exc:
        pytest.skip(f"promtool cannot run here: {exc}")
    cfg = _scrape_config(scrape)
    for job in cfg["scrape_configs"]:  # Debian's build has no Kubernetes discovery (see the module docstring)
        job.pop("kubernetes_sd_configs")
        job["static_configs"] = [{"targets": ["10.1.2.3:9108"]}]
    cfg["rule_files"] = [str(ROOT / "ops" / "prometheus" / "rules" / "*.yml")]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    res = subprocess.run([str(promtool), "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
