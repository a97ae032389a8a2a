"""The settings tree (tasks/config.py): defaults, environment overrides, errors, secrets, CLI flags."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tasks import config
from tasks.config import PROJECT_ROOT, ConfigError, Settings, load_settings, settings_table


@pytest.fixture
def clean_env(monkeypatch):
    """No MLPIPE_* / CLEARML_* variable of the caller's shell or of other tests."""
    for name in list(os.environ):
        if name.startswith(("MLPIPE_", "CLEARML_")):
            monkeypatch.delenv(name)
    return monkeypatch


def test_defaults(clean_env):
    s = load_settings()
    assert s.home == (PROJECT_ROOT / "var").resolve()
    assert s.store_url == f"file://{s.home / 'store'}"
    assert s.s3 is None
    assert (s.execution, s.kubernetes, s.model_name, s.log_level) == ("local", False, "digits", "INFO")
    assert s.model_repo == s.home / "triton" / "model_repository"
    assert s.qdrant_path == str(s.home / "qdrant")
    assert s.kafka.bootstrap == "127.0.0.1:9092" and s.kafka.security_protocol == "PLAINTEXT"
    assert s.kafka.sasl_password.get_secret_value() == ""
    assert (s.triton.url, s.triton.protocol, s.deploy.keep_versions) == ("127.0.0.1:8000", "http", 3)
    assert s.clearml.offline and s.clearml_offline and s.clearml_project == "mlpipe"
    # one image tag for the pods, the one the DAGs always used (was :latest in config, 0.1.0 in the plugin)
    assert s.k8s.trainer_image == "ghcr.io/mlpipe/trainer:0.1.0"
    assert s.k8s.image("MLPIPE_COMPILER_IMAGE") == "ghcr.io/mlpipe/trt-compiler:0.1.0"
    assert (s.k8s.namespace, s.k8s.gpu_node_selector, s.k8s.gpu_toleration) == (
        "mlpipe", "nvidia.com/gpu.present=true", "nvidia.com/gpu:NoSchedule")
    assert s.qc.min_accuracy is None and s.qc.triton_check is True  # None: the model spec's
    assert s.consumer.max_frame_bytes is None and s.models_dir == PROJECT_ROOT / "models"
    assert s.gateway.token is None and s.gateway.port == 8080 and s.local.gateway_port == 8090
    assert s.local.port("kafka") == 9092 and s.airflow.retrain_cron == "0 3 * * *"
    assert s.monitor.source == "kafka" and s.train.torch_threads is None


def test_consumer_section_matches_the_consumer_cli_defaults(clean_env):
    consumer = pytest.importorskip("tasks.serving.consumer")
    parser = getattr(consumer, "_parser", None)
    if parser is None:
        pytest.skip("the consumer CLI moved; its defaults are compared where it lives now")
    args = parser().parse_args([])
    c = load_settings().consumer
    for name in ("reject_hold_s", "broker_check_s"):  # added with the consumer package
        if hasattr(args, name):
            assert getattr(args, name) == getattr(c, name), name
    assert (args.group, args.triton_url, args.max_batch, args.max_wait_ms, args.inflight, args.commit_interval_ms,
            args.max_frame_bytes, args.qdrant_policy, args.http_host, args.http_port, args.session_timeout_ms) == (
        c.group, c.triton_url, c.max_batch, c.max_wait_ms, c.inflight, c.commit_interval_ms, c.max_frame_bytes,
        c.qdrant_policy, c.http_host, c.http_port, c.session_timeout_ms)


def test_environment_overrides(clean_env, tmp_path):
    clean_env.setenv("MLPIPE_HOME", str(tmp_path / "h"))
    clean_env.setenv("MLPIPE_EXECUTION", "Kubernetes")
    clean_env.setenv("MLPIPE_KAFKA_PARTITIONS", "6")
    clean_env.setenv("MLPIPE_KAFKA_SECURITY_PROTOCOL", "sasl_ssl")
    clean_env.setenv("MLPIPE_QC_TRITON_CHECK", "no")
    clean_env.setenv("MLPIPE_TRAINER_IMAGE", "registry.local/trainer:9")
    clean_env.setenv("MLPIPE_GATEWAY_PORT", "9001")
    clean_env.setenv("MLPIPE_MODEL_REPO", "s3://models/triton")
    clean_env.setenv("MLPIPE_TRITON_URL", "")  # empty counts as unset
    clean_env.setenv("CLEARML_API_HOST", "http://clearml:8008")
    s = load_settings()
    assert s.home == (tmp_path / "h").resolve() and s.store_url == f"file://{s.home / 'store'}"
    assert s.execution == "kubernetes" and s.kubernetes
    assert (s.kafka.partitions, s.kafka.security_protocol) == (6, "SASL_SSL")
    assert s.qc.triton_check is False
    assert s.k8s.image("MLPIPE_TRAINER_IMAGE") == "registry.local/trainer:9"
    assert s.gateway.port == 9001 and s.local.gateway_port == 9001  # one variable, both readers
    assert s.model_repo == "s3://models/triton" and s.triton.url == "127.0.0.1:8000"
    assert s.clearml.api_host == "http://clearml:8008" and not s.clearml.offline
    assert s.by_env("MLPIPE_KAFKA_PARTITIONS") == 6


def test_s3_store_needs_endpoint_and_keys(clean_env):
    clean_env.setenv("MLPIPE_STORE_URL", "s3://bucket/prefix")
    s = load_settings()  # loads: the Airflow scheduler parses DAGs without the keys (they are in the pods)
    assert s.store_url == "s3://bucket/prefix" and s.k8s.namespace == "mlpipe"
    with pytest.raises(ConfigError, match="MLPIPE_S3_ENDPOINT, MLPIPE_S3_ACCESS_KEY and MLPIPE_S3_SECRET_KEY"):
        s.s3  # noqa: B018 - opening the store needs them
    clean_env.setenv("MLPIPE_S3_ENDPOINT", "minio:9000")
    clean_env.setenv("MLPIPE_S3_ACCESS_KEY", "AKIA-TEST")
    clean_env.setenv("MLPIPE_S3_SECRET_KEY", "s3cr3t-value")
    clean_env.setenv("MLPIPE_S3_SECURE", "true")
    s3 = load_settings().s3
    assert s3 is not None and s3.endpoint == "minio:9000" and s3.secure is True
    assert s3.secret_key.get_secret_value() == "s3cr3t-value"


@pytest.mark.parametrize("var,value,message", [
    ("MLPIPE_EXECUTION", "k8s", "MLPIPE_EXECUTION must be one of local, kubernetes (got 'k8s')"),
    ("MLPIPE_KAFKA_SECURITY_PROTOCOL", "TLS",
     "MLPIPE_KAFKA_SECURITY_PROTOCOL must be one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL (got 'TLS')"),
    ("MLPIPE_MONITOR_SOURCE", "files", "MLPIPE_MONITOR_SOURCE must be one of kafka, qdrant (got 'files')"),
    ("MLPIPE_GATEWAY_PORT", "http", "MLPIPE_GATEWAY_PORT='http' is not an integer"),
    ("MLPIPE_QC_MIN_ACCURACY", "high", "MLPIPE_QC_MIN_ACCURACY='high' is not a number"),
    ("MLPIPE_S3_SECURE", "maybe", "MLPIPE_S3_SECURE='maybe' is not a boolean: one of 1, 0, true, false, yes, no"),
    ("MLPIPE_KAFKA_PORT", "70000", "MLPIPE_KAFKA_PORT must be <= 65535 (got '70000')"),
    ("MLPIPE_KEEP_VERSIONS", "0", "MLPIPE_KEEP_VERSIONS must be >= 1 (got '0')"),
    ("MLPIPE_LOG_LEVEL", "loud", "MLPIPE_LOG_LEVEL must be one of DEBUG, INFO, WARNING"),
])
def test_bad_setting_names_the_variable_and_the_accepted_values(clean_env, var, value, message):
    clean_env.setenv(var, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)  # the CLIs' "bad input" handling catches it
    assert "pydantic" not in str(info.value) and "errors.pydantic.dev" not in str(info.value)


SECRETS = {
    "MLPIPE_S3_ACCESS_KEY": "access-AAAA1111",
    "MLPIPE_S3_SECRET_KEY": "secret-BBBB2222",
    "MLPIPE_KAFKA_SASL_PASSWORD": "sasl-CCCC3333",
    "MLPIPE_GATEWAY_TOKEN": "token-DDDD4444",
    "MLPIPE_QDRANT_API_KEY": "qdrant-EEEE5555",
}


def test_secrets_are_never_shown(clean_env, caplog):
    import logging

    clean_env.setenv("MLPIPE_STORE_URL", "s3://bucket")
    clean_env.setenv("MLPIPE_S3_ENDPOINT", "minio:9000")
    for name, value in SECRETS.items():
        clean_env.setenv(name, value)
    s = load_settings()
    with caplog.at_level(logging.INFO):
        logging.getLogger("test").info("settings %s %r", s, s)
    shown = [repr(s), str(s), s.model_dump_json(), json.dumps(s.model_dump(mode="json")), str(s.model_dump()),
             repr(s.s3), str(s.s3), s.s3.model_dump_json(), repr(s.store), repr(s.kafka), settings_table(),
             caplog.text]
    for value in SECRETS.values():
        assert not any(value in text for text in shown), value
    # ... and the code that needs them gets them
    assert s.gateway.token.get_secret_value() == SECRETS["MLPIPE_GATEWAY_TOKEN"]
    assert s.s3.access_key.get_secret_value() == SECRETS["MLPIPE_S3_ACCESS_KEY"]
    assert s.kafka.sasl_password.get_secret_value() == SECRETS["MLPIPE_KAFKA_SASL_PASSWORD"]


def test_secret_value_is_not_echoed_in_an_error(clean_env):
    clean_env.setenv("MLPIPE_GATEWAY_TOKEN", "token-FFFF6666")
    with pytest.raises(ConfigError) as info:
        config.GatewaySection(token=12345)  # not a string: rejected without showing the input
    assert "MLPIPE_GATEWAY_TOKEN" in str(info.value) and "12345" not in str(info.value)


def test_overrides_replace_one_field_and_keep_the_rest(clean_env):
    clean_env.setenv("MLPIPE_KAFKA_BOOTSTRAP", "env-broker:9092")
    clean_env.setenv("MLPIPE_KAFKA_TOPIC_PREFIX", "t.")
    s = load_settings(model_name="other", kafka={"bootstrap": "flag-broker:9092", "client_id": None})
    assert s.model_name == "other"
    assert (s.kafka.bootstrap, s.kafka.topic_prefix, s.kafka.client_id) == ("flag-broker:9092", "t.", "mlpipe")
    with pytest.raises(ConfigError, match="MLPIPE_KAFKA_PARTITIONS='x' is not an integer"):
        load_settings(kafka={"partitions": "x"})


def test_cli_flag_overrides_the_setting_in_one_command(clean_env, tmp_path, capsys):
    from tasks.model import repo

    clean_env.setenv("MLPIPE_HOME", str(tmp_path / "var"))
    clean_env.setenv("MLPIPE_MODEL_NAME", "digits")
    assert repo.main(["render", "--out", str(tmp_path / "a")]) == 0
    assert json.loads(capsys.readouterr().out)["model_name"] == "digits"
    assert repo.main(["render", "--out", str(tmp_path / "b"), "--model", "shapes"]) == 0
    assert json.loads(capsys.readouterr().out)["model_name"] == "shapes"
    assert (tmp_path / "b" / "shapes").is_dir() and not (tmp_path / "b" / "digits").exists()


def test_cli_default_comes_from_the_setting(clean_env):
    from tasks.steps.monitor import _parser

    clean_env.setenv("MLPIPE_MONITOR_SOURCE", "qdrant")
    assert _parser().parse_args([]).source == "qdrant"
    assert _parser().parse_args(["--source", "kafka"]).source == "kafka"


def test_settings_are_frozen(clean_env):
    from pydantic import ValidationError

    s = load_settings()
    with pytest.raises(ValidationError, match="frozen"):
        s.model_name = "x"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        s.kafka.bootstrap = "x"  # type: ignore[misc]


def test_table_has_one_row_per_setting_and_no_environment_in_it(clean_env, tmp_path):
    rows = [line for line in settings_table().splitlines()[2:] if line.startswith("| `")]
    variables = [row.split("`")[1] for row in rows]
    assert len(rows) == sum(1 for _ in config._walk_fields(Settings))
    assert all(v.startswith(("MLPIPE_", "CLEARML_")) for v in variables)
    assert "MLPIPE_EXECUTION" in variables and "MLPIPE_GATEWAY_TOKEN" in variables
    before = settings_table()
    clean_env.setenv("MLPIPE_HOME", str(tmp_path))
    clean_env.setenv("MLPIPE_KAFKA_BOOTSTRAP", "elsewhere:1")
    assert settings_table() == before  # the table shows defaults, never this machine's environment
    assert str(Path.home()) not in before and str(PROJECT_ROOT) not in before
