"""End-to-end tests: a whole DAG, the demo path or the UI, against the real local stack."""

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/tests/e2e/" in str(item.path):
            item.add_marker(pytest.mark.e2e)
