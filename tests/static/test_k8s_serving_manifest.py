"""docker/k8s/serving-deployment.yaml, checked statically (no cluster here): structure, probes,
resources, the sidecar wiring, Triton reading the S3 model repository the deploy step writes, the
image docker/triton.Dockerfile builds, configuration that the real CLIs accept, a schema check
against the Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields are errors) and
(when the kubernetes client is installed) deserialization into the client's typed models."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "docker" / "k8s" / "serving-deployment.yaml"
CONFIG_MAP = ROOT / "docker" / "k8s" / "configmap.yaml"
TRITON_DOCKERFILE = ROOT / "docker" / "triton.Dockerfile"
KUBERNETES_VERSION = "1.31.0"  # the schema version the manifests are checked against
# how tritonserver 2.51 parses an S3 repository path (the regex in its libtritonserver)
TRITON_S3_PATH = re.compile(
    r"s3://(http://|https://|)([0-9a-zA-Z\-.]+):([0-9]+)/([0-9a-z.\-]+)(((/[0-9a-zA-Z.\-_]+)*)?)")


@pytest.fixture(scope="module")
def docs() -> dict[str, dict]:
    loaded = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    by_kind = {d["kind"]: d for d in loaded}
    assert len(by_kind) == len(loaded), "one object per kind expected"
    return by_kind


def _containers(docs) -> dict[str, dict]:
    return {c["name"]: c for c in docs["Deployment"]["spec"]["template"]["spec"]["containers"]}


def _port(container: dict, ref) -> int:
    if isinstance(ref, int):
        return ref
    return next(p["containerPort"] for p in container["ports"] if p["name"] == ref)


def test_objects_and_api_versions(docs):
    assert set(docs) == {"ConfigMap", "Deployment", "Service"}
    assert docs["Deployment"]["apiVersion"] == "apps/v1"
    assert docs["Service"]["apiVersion"] == "v1" and docs["ConfigMap"]["apiVersion"] == "v1"
    namespaces = {d["metadata"]["namespace"] for d in docs.values()}
    assert namespaces == {"mlpipe"}
    dep = docs["Deployment"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert docs["Service"]["spec"]["selector"].items() <= labels.items()


def test_one_pod_with_triton_and_the_consumer_sidecar(docs):
    containers = _containers(docs)
    assert set(containers) == {"triton", "consumer"}
    triton = containers["triton"]
    image, tag = triton["image"].rsplit(":", 1)
    assert tag and tag != "latest"
    assert {p["containerPort"] for p in triton["ports"]} == {8000, 8001, 8002}
    assert "--load-model=digits" in triton["args"]


def _dockerfile_build_tag(path: Path) -> str:
    m = re.search(r"docker build -f \S+ -t (\S+) \.", path.read_text())
    assert m, f"{path} documents no `docker build ... -t IMAGE .` line"
    return m.group(1)


def test_triton_runs_the_image_docker_triton_dockerfile_builds(docs):
    triton = _containers(docs)["triton"]
    assert triton["image"] == _dockerfile_build_tag(TRITON_DOCKERFILE)
    assert not triton["image"].startswith("nvcr.io/"), "the stock NGC image lacks numpy for the Python backend"
    text = TRITON_DOCKERFILE.read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))
    assert entry == ["tritonserver"], "the Deployment's args go to tritonserver through the image's ENTRYPOINT"
    assert "command" not in triton  # the image's ENTRYPOINT, the manifest's args (they replace CMD)
    assert "numpy" in text and re.search(r"requirements\.txt", text)


def _triton_repo_url(triton: dict) -> str:
    repos = [a.split("=", 1)[1] for a in triton["args"] if a.startswith("--model-repository=")]
    assert len(repos) == 1, repos
    return repos[0]


def test_triton_reads_the_s3_repository_the_deploy_step_writes(docs):
    from tasks.steps.deploy import ServingTarget

    spec = docs["Deployment"]["spec"]["template"]["spec"]
    triton = _containers(docs)["triton"]
    assert "--model-control-mode=explicit" in triton["args"]  # deploy loads through the repository API
    url = _triton_repo_url(triton)
    m = TRITON_S3_PATH.fullmatch(url)
    assert m, f"{url} is not an S3 path tritonserver parses (s3://host:port/bucket/prefix)"
    _, host, port, bucket, prefix = m.group(1), m.group(2), m.group(3), m.group(4), m.group(5)
    # the same endpoint, bucket and prefix as the pipeline pods' settings (docker/k8s/configmap.yaml)
    pipeline = yaml.safe_load(CONFIG_MAP.read_text())["data"]
    assert pipeline["MLPIPE_S3_ENDPOINT"] == f"{host}:{port}"
    assert pipeline["MLPIPE_MODEL_REPO"] == f"s3://{bucket}{prefix}"
    target = ServingTarget(pipeline["MLPIPE_MODEL_REPO"], pipeline["MLPIPE_TRITON_URL"])
    assert target.repo_url == f"s3://{bucket}{prefix}" and target.default_flavour == "production"
    # the Triton the deploy pods talk to is this Deployment's Service
    svc = docs["Service"]["metadata"]
    assert pipeline["MLPIPE_TRITON_URL"] == f"{svc['name']}.{svc['namespace']}.svc:8000"
    # S3 credentials from the mlpipe-credentials Secret, an explicit region, no metadata lookups
    env = {e["name"]: e for e in triton["env"]}
    for var, key in (("AWS_ACCESS_KEY_ID", "MLPIPE_S3_ACCESS_KEY"), ("AWS_SECRET_ACCESS_KEY", "MLPIPE_S3_SECRET_KEY")):
        assert "value" not in env[var]
        assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "mlpipe-credentials", "key": key}
    assert env["AWS_DEFAULT_REGION"]["value"] == pipeline["MLPIPE_S3_REGION"]
    assert env["AWS_EC2_METADATA_DISABLED"]["value"] == "true"
    # no repository volume any more: Triton mounts only its shared memory
    assert [m["mountPath"] for m in triton["volumeMounts"]] == ["/dev/shm"]
    assert not [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
    assert "model-repository" not in {v["name"] for v in spec["volumes"]}


def test_trt_compiler_installs_the_pins_of_requirements_txt():
    text = (ROOT / "docker" / "trt-compiler.Dockerfile").read_text()
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-\[\],]+)==(\S+)", line)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    for name, version in re.findall(r"\b([A-Za-z][A-Za-z0-9_.\-]*)==([0-9][^\s'\"]*)", text):
        assert pins.get(name.lower()) == version, f"trt-compiler pins {name}=={version}, requirements.txt " \
                                                  f"{pins.get(name.lower())}"
    m = re.search(r"grep -E '\^\(([^)]*)\)==' *\\?\s*requirements\.txt", text)
    assert m, "trt-compiler.Dockerfile installs its packages from requirements.txt"
    names = m.group(1).split("|")
    assert "pyarrow" in names and all(n.lower() in pins for n in names)
    assert f"-eq {len(names)}" in text  # every package found, none silently missing


def test_manifests_match_the_kubernetes_schemas(docs):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")
    objects = list(docs.values()) + [d for d in yaml.safe_load_all(CONFIG_MAP.read_text()) if d]
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_the_schema_check_catches_mistakes(docs):
    import copy

    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")
    bad = copy.deepcopy(docs["Deployment"])
    bad["spec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"]["secretKeyRefs"] = {}  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)
    bad = copy.deepcopy(docs["Deployment"])
    bad["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def test_triton_probes_and_gpu_resources(docs):
    triton = _containers(docs)["triton"]
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert _port(triton, triton[probe]["httpGet"]["port"]) == 8000
    res = triton["resources"]
    assert int(res["limits"]["nvidia.com/gpu"]) == 1  # GPUs are requested through limits
    assert res["requests"]["cpu"] and res["requests"]["memory"] and res["limits"]["memory"]
    spec = docs["Deployment"]["spec"]["template"]["spec"]
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])


def test_consumer_points_at_localhost_and_probes_its_health_endpoints(docs):
    from tasks.serving.consumer import _parser

    consumer = _containers(docs)["consumer"]
    args = _parser().parse_args(consumer["args"])  # the manifest's arguments are valid for the real CLI
    assert args.triton_url in {"localhost:8001", "127.0.0.1:8001"}
    assert args.http_host == "0.0.0.0"  # the kubelet probes the pod IP
    http_port = args.http_port
    assert consumer["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert consumer["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe"):
        assert _port(consumer, consumer[probe]["httpGet"]["port"]) == http_port
    res = consumer["resources"]
    assert res["requests"]["cpu"] and res["requests"]["memory"] and res["limits"]["memory"]
    assert "nvidia.com/gpu" not in res.get("limits", {})
    grace = docs["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= args.drain_timeout + 10
    assert consumer["securityContext"]["runAsNonRoot"] is True


def test_consumer_config_from_configmap_and_secrets(docs, monkeypatch):
    from tasks.adapters.kafka import KafkaConfig
    from tasks.serving.consumer import QdrantPolicy

    consumer = _containers(docs)["consumer"]
    cm = docs["ConfigMap"]
    assert [e["configMapRef"]["name"] for e in consumer["envFrom"]] == [cm["metadata"]["name"]]
    env = {e["name"]: e for e in consumer["env"]}
    for name in ("MLPIPE_KAFKA_SASL_USERNAME", "MLPIPE_KAFKA_SASL_PASSWORD"):
        assert "secretKeyRef" in env[name]["valueFrom"], f"{name} must come from a Secret"
    # no secret in plain text anywhere
    for e in consumer["env"]:
        if any(w in e["name"] for w in ("PASSWORD", "SECRET", "TOKEN", "API_KEY")):
            assert "value" not in e
    assert not any(w in k for k in cm["data"] for w in ("PASSWORD", "SECRET", "TOKEN"))
    # the ConfigMap (+ the secrets) is a configuration the real code accepts
    for key, value in cm["data"].items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLPIPE_KAFKA_SASL_USERNAME", "u")
    monkeypatch.setenv("MLPIPE_KAFKA_SASL_PASSWORD", "p")
    cfg = KafkaConfig.from_env()
    assert cfg.security_protocol.startswith("SASL") and cfg.sasl_mechanism
    ca_dir = str(Path(cfg.ssl_ca).parent)
    assert ca_dir in {m["mountPath"] for m in consumer["volumeMounts"]}
    QdrantPolicy.parse(cm["data"]["MLPIPE_QDRANT_POLICY"])
    assert cm["data"]["MLPIPE_QDRANT_URL"].startswith("http")
    # the consumer's CLI reads its MLPIPE_CONSUMER_* settings from that environment
    from tasks.serving.consumer import _parser

    args = _parser().parse_args([])
    assert args.max_batch == int(cm["data"]["MLPIPE_CONSUMER_MAX_BATCH"])
    assert args.max_wait_ms == int(cm["data"]["MLPIPE_CONSUMER_MAX_WAIT_MS"])
    assert args.inflight == int(cm["data"]["MLPIPE_CONSUMER_INFLIGHT"])
    assert args.commit_interval_ms == int(cm["data"]["MLPIPE_CONSUMER_COMMIT_INTERVAL_MS"])
    assert args.qdrant_policy == cm["data"]["MLPIPE_QDRANT_POLICY"] and args.group == cm["data"]["MLPIPE_CONSUMER_GROUP"]


def test_service_exposes_named_ports(docs):
    containers = _containers(docs)
    named = {p["name"]: p["containerPort"] for c in containers.values() for p in c["ports"]}
    for port in docs["Service"]["spec"]["ports"]:
        assert port["targetPort"] in named, port
    assert {p["port"] for p in docs["Service"]["spec"]["ports"]} >= {8000, 8001, 8002, 9108}


def test_deserializes_into_kubernetes_models(docs):
    kubernetes = pytest.importorskip("kubernetes", reason="kubernetes python client not installed")
    api = kubernetes.client.ApiClient()

    class _Resp:
        def __init__(self, obj: dict) -> None:
            self.data = json.dumps(obj)

    dep = api.deserialize(_Resp(docs["Deployment"]), "V1Deployment")
    svc = api.deserialize(_Resp(docs["Service"]), "V1Service")
    cm = api.deserialize(_Resp(docs["ConfigMap"]), "V1ConfigMap")
    assert isinstance(dep, kubernetes.client.V1Deployment)
    pod = dep.spec.template.spec
    names = [c.name for c in pod.containers]
    assert names == ["triton", "consumer"]
    triton, consumer = pod.containers
    assert triton.liveness_probe.http_get.path == "/v2/health/live"
    assert consumer.readiness_probe.http_get.path == "/readyz"
    assert str(triton.resources.limits["nvidia.com/gpu"]) == "1"
    assert consumer.env_from[0].config_map_ref.name == cm.metadata.name
    assert isinstance(svc, kubernetes.client.V1Service) and svc.spec.selector == dep.spec.selector.match_labels
    # round trip: nothing in the YAML was dropped as an unknown field
    again = api.sanitize_for_serialization(dep)
    assert again["spec"]["template"]["spec"]["containers"][1]["args"] == docs["Deployment"]["spec"]["template"][
        "spec"]["containers"][1]["args"]
