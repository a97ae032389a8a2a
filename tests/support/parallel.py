"""How ``make test`` spreads the suite over pytest-xdist workers (``-n 3 --dist loadgroup``).

``WorkUnits`` (the scheduler ``tests/conftest.py`` gives pytest-xdist) sends each worker whole units:

* ``stack``: every test file that uses the shared local stack (``tests/support/stack.py``: a file that
  names ``mlpipe_stack`` or ``airflow_stack``), so that one worker starts the stack once and runs those
  files in their order;
* a whole test file when it defines a module- or class-scoped fixture (one Triton, one trained champion,
  one set of DAG runs per module: set up once, on one worker);
* each other test on its own, to whichever worker is free.

Units go out in that order (each kind biggest first), so the stack starts at once on one worker while
the other works through the files, and single tests fill in at the end. Session fixtures (a broker, a Triton, moto) start once per
worker; the trained models and the migrated Airflow DB are made once per run and shared
(``tests/support/models.py``, ``tests/support/airflow.py``). Without ``-n`` nothing of this applies.

(pytest-xdist's own ``xdist_group`` marks cannot be used: with pytest 9 its node-id suffix is lost.)
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from xdist.scheduler import LoadScopeScheduling

from tests.support.stack import STACK_FIXTURES

ROOT = Path(__file__).resolve().parents[2]
_SHARED_SCOPE = re.compile(r"""scope\s*=\s*["'](module|class|package)["']""")


@lru_cache(maxsize=None)
def _file_kind(path: str) -> str:
    """``stack`` | ``file`` | ``tests`` for a test file (relative to the repository root)."""
    try:
        text = (ROOT / path).read_text()
    except OSError:
        return "tests"
    if any(name in text for name in STACK_FIXTURES):
        return "stack"
    return "file" if _SHARED_SCOPE.search(text) else "tests"


def unit_of(nodeid: str) -> str:
    """The unit of work a test belongs to (see the module docstring)."""
    path = nodeid.split("::", 1)[0]
    kind = _file_kind(path)
    return "stack" if kind == "stack" else path if kind == "file" else nodeid


def _rank(unit: str, size: int) -> tuple[int, int]:
    """The stack first, then whole files (the heavy module fixtures), then single tests; bigger first."""
    return (0 if unit == "stack" else 2 if "::" in unit else 1, -size)


class WorkUnits(LoadScopeScheduling):
    _ordered = False

    def _split_scope(self, nodeid: str) -> str:
        return unit_of(nodeid)

    def _assign_work_unit(self, node) -> None:  # noqa: ANN001 - xdist's WorkerController
        if not self._ordered:  # once, before the first unit goes out: a one-test file (an e2e run) is not last
            units = sorted(self.workqueue.items(), key=lambda kv: _rank(kv[0], len(kv[1])))
            self.workqueue.clear()
            self.workqueue.update(units)
            self._ordered = True
        super()._assign_work_unit(node)
