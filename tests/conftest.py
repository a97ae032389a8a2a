"""Shared fixtures: an isolated MLPIPE_HOME per test, a local store, a real S3 endpoint."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tasks.config import load_settings  # noqa: E402
from tasks.local.procs import ManagedProcess, free_port, port_open, wait_until  # noqa: E402
from tasks.adapters.storage import LocalStore, S3Store  # noqa: E402
from tasks.config import S3Settings  # noqa: E402

# ClearML never touches the network in tests.
os.environ.setdefault("CLEARML_OFFLINE_MODE", "1")
os.environ.setdefault("CLEARML_NO_DEFAULT_SERVER", "1")
# Log files and spans of in-process CLIs (tasks.logs, tasks.tracing) go to a folder of this session, not ./var/logs.
os.environ.setdefault("MLPIPE_LOG_DIR", os.path.join(__import__("tempfile").gettempdir(),
                                                     f"mlpipe-test-logs-{os.getpid()}"))


@pytest.fixture(autouse=True)
def _process_log_context():
    """A CLI run in-process may bind process-wide log context (``tasks.logs.bind``, e.g. the consumer's served
    version via ``tasks.tracing``): put it back after each test, so that no later test's records carry it."""
    from tasks import logs, tracing

    bound = dict(logs._bound)
    state = {k: tracing._state.get(k) for k in ("bind", "bound_version")}
    yield
    logs._bound.clear()
    logs._bound.update(bound)
    for k, v in state.items():
        if v is None:
            tracing._state.pop(k, None)
        else:
            tracing._state[k] = v


@pytest.fixture
def mlpipe_env(tmp_path, monkeypatch):
    """Point MLPIPE_HOME and the store at a fresh temporary folder."""
    home = tmp_path / "var"
    monkeypatch.setenv("MLPIPE_HOME", str(home))
    monkeypatch.setenv("MLPIPE_LOG_DIR", str(home / "logs"))
    monkeypatch.setenv("MLPIPE_STORE_URL", f"file://{home / 'store'}")
    monkeypatch.setenv("MLPIPE_EXECUTION", "local")
    monkeypatch.setenv("CLEARML_CACHE_DIR", str(tmp_path / "clearml-cache"))
    monkeypatch.delenv("CLEARML_API_HOST", raising=False)
    return load_settings()


@pytest.fixture
def store(mlpipe_env):
    return LocalStore(mlpipe_env.home / "store")


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A real S3-compatible endpoint (moto's server) on a free loopback port."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    proc = ManagedProcess(
        "moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], log,
        env={**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
             "AWS_EC2_METADATA_DISABLED": "true"},
    ).start()
    try:
        wait_until(lambda: port_open(port), 30, "moto S3 server", alive=proc.alive)
        yield S3Settings(endpoint=f"127.0.0.1:{port}", access_key="testing", secret_key="testing")
    finally:
        proc.stop()


@pytest.fixture
def s3_store(s3_endpoint, request):
    bucket = "t-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40].strip("-")
    return S3Store(bucket, s3_endpoint)


# Fixtures shared by the suites (tests/support/): trained models, a tiny ONNX classifier and a Triton
# server, a broker, a migrated Airflow DB to copy, and the local stack (`make up` on free ports). The stack's
# tests run last (under pytest-xdist: together, on one worker; tests/support/parallel.py).
pytest_plugins = ("tests.support.models", "tests.support.triton", "tests.support.stream", "tests.support.stack",
                  "tests.support.airflow")


def pytest_collection_modifyitems(session, config, items):
    from tests.support.stack import stack_tests_last

    stack_tests_last(items)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: `make test` runs the suite on 3 workers
def pytest_xdist_make_scheduler(config, log):
    from tests.support.parallel import WorkUnits

    return WorkUnits(config, log)
