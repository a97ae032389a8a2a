"""Integration tests: each starts the real local services it needs (S3 endpoint, broker, Triton, Airflow)."""

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/tests/integration/" in str(item.path):
            item.add_marker(pytest.mark.integration)
