"""Step results that cross a process boundary: the ``--result-json`` file of every step's CLI.

Airflow reads the file after the step exits (XCom); it is JSON, one object, written
atomically, so a reader never sees half of it. Standard library only: every layer may import it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.contracts.files import atomic_write


def write_result_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` (indented, sorted keys, non-JSON values as ``str``; parents
    created, mode 0644, atomic); returns the path."""
    path = Path(path)
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", 0o644)
    return path
