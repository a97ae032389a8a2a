"""One migrated Airflow metadata DB per test session, copied into each test's own Airflow home.

Its fixture is registered for every test by ``pytest_plugins`` in ``tests/conftest.py``.

* ``airflow_template`` (session): an ``MLPIPE_HOME`` whose ``airflow/`` holds a SQLite DB made by
  ``airflow db migrate`` and the project's pools (``tasks.local.airflow.ensure_db``, about 9 s of CPU).
* ``airflow_home_from(template, home)``: copy it to ``home/airflow`` (a few milliseconds); ``ensure_db``
  then finds its markers and does nothing, so ``dags_test`` with ``MLPIPE_HOME=home`` starts at once.

Every ``airflow dags test`` of the suite gets a private copy: runs never share a DB, only the
migration is done once (once per run under pytest-xdist: the workers share the template).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def airflow_template(tmp_path_factory) -> Path:
    """A migrated Airflow home (with its pools) to copy from; never run against directly."""
    from tasks.local.airflow import airflow_env, ensure_db
    from tests.support.models import _lock

    if not os.environ.get("PYTEST_XDIST_TESTRUNUID"):
        template = tmp_path_factory.mktemp("airflow-template")
        ensure_db(airflow_env({**os.environ, "MLPIPE_HOME": str(template)}))
        return template
    # pytest-xdist: the workers of one run share their parent folder; the first one migrates, the others copy
    template = tmp_path_factory.getbasetemp().parent / "airflow-template"
    with _lock(template.parent / ".airflow-template.lock"):
        ensure_db(airflow_env({**os.environ, "MLPIPE_HOME": str(template)}))  # a no-op once its markers exist
    return template


def airflow_home_from(template: Path, home: Path) -> Path:
    """Copy ``template``'s migrated ``airflow/`` to ``home/airflow`` (``home`` is the MLPIPE_HOME); returns ``home``."""
    shutil.copytree(Path(template) / "airflow", Path(home) / "airflow")
    return Path(home)
