"""README's configuration table is the one generated from the settings tree (tasks/config.py)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tasks.config import (
    ENV_PREFIX,
    FOREIGN_PREFIXES,
    TABLE_END,
    TABLE_START,
    Settings,
    _walk_fields,
    render_readme,
    settings_table,
)

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
VAR = re.compile(r"(?:MLPIPE|CLEARML)_[A-Z0-9_]*[A-Z0-9]")
#: variables the code names that are not settings of the tree (set for children, or read by a library)
NOT_SETTINGS = {
    "CLEARML_NO_DEFAULT_SERVER",  # set by tasks.adapters.clearml for ClearML itself
    "CLEARML_WEB_HOST", "CLEARML_FILES_HOST",  # passed to pods, read by ClearML
    "CLEARML_API_ACCESS_KEY", "CLEARML_API_SECRET_KEY",  # read by ClearML (a Kubernetes Secret in production)
}


def test_readme_table_matches_the_settings_tree():
    text = README.read_text(encoding="utf-8")
    assert TABLE_START in text and TABLE_END in text, "README.md lost its settings-table markers"
    assert render_readme(text) == text, (
        "README.md's configuration table differs from tasks/config.py: run python -m tasks.tools.settings_docs")
    section = text[text.index(TABLE_START):text.index(TABLE_END)]
    assert section.strip().endswith(settings_table().strip())


def test_every_setting_has_a_variable_and_a_meaning():
    seen = set()
    for path, info, var in _walk_fields(Settings):
        assert var.startswith((ENV_PREFIX, *FOREIGN_PREFIXES)), f"{'.'.join(path)} reads {var}: not an MLPIPE_ name"
        assert (info.description or "").strip(), f"{var} ({'.'.join(path)}) has no meaning in the table"
        seen.add(var)
    assert len(seen) > 60


def _named_variables() -> dict[str, str]:
    """Every full MLPIPE_* / CLEARML_* name that appears as a string literal in the code."""
    found: dict[str, str] = {}
    files = [*(ROOT / "tasks").rglob("*.py"), *(ROOT / "plugins").glob("*.py"), *(ROOT / "dags").glob("*.py")]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and VAR.fullmatch(node.value):
                found.setdefault(node.value, str(path.relative_to(ROOT)))
    return found


def test_every_variable_the_code_names_is_documented():
    settings = {var for _path, _info, var in _walk_fields(Settings)}
    missing = {var: where for var, where in _named_variables().items()
               if var not in settings and var not in NOT_SETTINGS}
    assert not missing, f"variables named in the code but not in tasks/config.py's tree: {missing}"
