"""Fixtures of the consumer's in-process tests."""

import pytest

from tasks.serving.consumer import loop as loop_module


@pytest.fixture(autouse=True)
def _no_gc_tuning(monkeypatch):
    monkeypatch.setattr(loop_module, "tune_gc", lambda: None)  # gc.freeze() would outlive the test
