"""Every step CLI maps an object-store outage to ``EXIT_TRANSIENT`` (retried) and a missing object
to ``EXIT_BAD_INPUT`` (final), through the one ``run_cli`` wrapper.

The store is a fake of our own ``ObjectStore`` protocol whose every call fails like an
unreachable endpoint (or a missing key): the steps see what ``S3Store`` raises. The real
endpoint going down and coming back is ``tests/integration/test_step_retries.py``.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from tasks.adapters import storage
from tasks.adapters.storage import ObjectNotFound, StoreError
from tasks.contracts.errors import EXIT_BAD_INPUT, EXIT_TRANSIENT, FINAL_EXIT_CODES


class FailingStore:
    """An ``ObjectStore`` whose every operation raises ``error(key)``."""

    url = "s3://unreachable"

    def __init__(self, error) -> None:
        self._error = error

    def _fail(self, key: str = "", *args, **kwargs):
        raise self._error(key)

    put_bytes = get_bytes = exists = list = delete = put_file = get_file = _fail
    put_json = get_json = put_text = put_dir = list_dirs = _fail
    get_json_with_token = put_json_if_absent = put_json_if_match = _fail

    def uri(self, key: str) -> str:
        return f"{self.url}/{key}"


def outage(key: str) -> StoreError:
    return StoreError(f"S3 error on s3://unreachable/{key} at 127.0.0.1:1: Connection refused")


#: step -> (module, argv): a request each step starts with a store read for
STEPS = {
    "drops": ("tasks.steps.drops", ["show", "d1"]),
    "validate": ("tasks.steps.validate", ["--drop-id", "d1"]),
    "train": ("tasks.steps.train", ["--drop-id", "d1", "--epochs", "1", "--no-tracking"]),
    "registry": ("tasks.steps.registry", ["show", "1"]),
    "compile": ("tasks.steps.compile", ["--version", "1"]),
    "qc": ("tasks.steps.qc", ["--version", "1"]),
    "deploy": ("tasks.steps.deploy", ["deploy", "--version", "1"]),
    "monitor": ("tasks.steps.monitor", ["--source", "qdrant"]),
}


@pytest.fixture
def failing_store(monkeypatch, mlpipe_env, tmp_path):
    def install(error):
        fake = FailingStore(error)
        monkeypatch.setattr(storage, "open_store", lambda *a, **k: fake)
        for module, _ in STEPS.values():  # the steps that imported the name at module level
            mod = importlib.import_module(module)
            if hasattr(mod, "open_store"):
                monkeypatch.setattr(mod, "open_store", lambda *a, **k: fake)
        return fake

    monkeypatch.setenv("MLPIPE_MODEL_REPO", str(tmp_path / "repo"))
    return install


@pytest.mark.parametrize("step", list(STEPS))
def test_an_outage_is_transient_in_every_step(step, failing_store, capsys):
    failing_store(outage)
    module, argv = STEPS[step]
    code = importlib.import_module(module).main(argv)
    err = capsys.readouterr().err
    assert code == EXIT_TRANSIENT and code not in FINAL_EXIT_CODES, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Connection refused" in last, err[-2000:]
    assert "Traceback" not in err


@pytest.mark.parametrize("step", ["drops", "validate", "train", "registry", "compile", "qc"])
def test_a_missing_object_is_bad_input(step, failing_store, capsys):
    failing_store(lambda key: ObjectNotFound(key, "s3://unreachable"))
    module, argv = STEPS[step]
    code = importlib.import_module(module).main(argv)
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err


def test_the_step_modules_have_no_exit_numbers_of_their_own():
    root = Path(__file__).resolve().parents[3] / "tasks" / "steps"
    for path in root.glob("*.py"):
        text = path.read_text()
        assert "EXIT_USAGE" not in text and "EXIT_ERROR" not in text and "EXIT_FAILED" not in text, path.name
