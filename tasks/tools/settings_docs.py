"""Rewrite (or check) the configuration table in README.md from the settings tree.

``python -m tasks.tools.settings_docs`` replaces what lies between
``<!-- settings-table:start -->`` and ``<!-- settings-table:end -->`` in README.md
with ``tasks.config.settings_table()``; ``--check`` only says whether it is up to date
(exit 1 when not). tests/static/test_config_docs.py runs the check.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tasks.config import PROJECT_ROOT, render_readme

README = PROJECT_ROOT / "README.md"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.tools.settings_docs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", type=Path, default=README, help="the file to rewrite (default README.md)")
    p.add_argument("--check", action="store_true", help="do not write; exit 1 when the table is out of date")
    args = p.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    try:
        new = render_readme(text)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if new == text:
        print(f"{args.readme}: configuration table is up to date")
        return 0
    if args.check:
        print(f"{args.readme}: configuration table is out of date: run python -m tasks.tools.settings_docs",
              file=sys.stderr)
        return 1
    args.readme.write_text(new, encoding="utf-8")
    print(f"{args.readme}: configuration table rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
