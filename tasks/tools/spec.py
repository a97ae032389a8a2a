"""``mlpipe spec``: check a model spec file, print the spec's JSON Schema.

* ``mlpipe spec check FILE [FILE ...]``: load each YAML file and validate it against
  ``tasks.contracts.spec.ModelSpec``. A valid spec prints ``FILE: ok`` and a one-paragraph
  summary (exit 0). An invalid one prints every problem on its own line, ``FILE: path: rule
  (got ...) (line N)``, a YAML syntax error with its line, and exits 2 (BadInput, through
  ``run_cli``: the ``error:`` line on stderr says how many).
  A pipeline file (``models/<name>/pipeline.yaml``, ``tasks.contracts.pipeline``) is checked as a
  pipeline: its own rules, then its members' specs and the rules between them.
* ``mlpipe spec schema [--write PATH]``: the JSON Schema generated from the model (the committed
  copy is ``docs/model-spec.schema.json``; ``tests/static/test_spec_schema.py`` checks it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from tasks.contracts.errors import BadInput, run_cli
from tasks.contracts.files import atomic_write
from tasks.contracts.pipeline import PIPELINE_FILE, check_members, load_pipeline
from tasks.contracts.spec import SCHEMA_PATH, SpecError, json_schema_text, load_spec
from tasks.logs import setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlpipe spec", description="Check model spec files (models/<name>/spec.yaml) and pipeline files (models/<name>/pipeline.yaml); print the JSON Schema.",
        epilog="Exit codes: 0 valid, 2 an invalid spec, a YAML syntax error or a bad option.")
    parser.add_argument("--log-level", default=None, help="logging level (default $MLPIPE_LOG_LEVEL or INFO)")
    sub = parser.add_subparsers(dest="action", required=True)
    check = sub.add_parser("check", help="validate spec files and explain every error, one line each")
    check.add_argument("files", nargs="+", type=Path, metavar="FILE")
    schema = sub.add_parser("schema", help=f"print the JSON Schema of the spec (committed as {SCHEMA_PATH})")
    schema.add_argument("--write", type=Path, default=None, metavar="PATH",
                        help=f"write it to PATH instead of printing it (e.g. {SCHEMA_PATH})")
    return parser


def check(files: Sequence[Path]) -> int:
    """Print the verdict of every file; raise ``BadInput`` naming the invalid ones."""
    bad: list[SpecError] = []
    for path in files:
        try:
            if path.name == PIPELINE_FILE:
                spec = load_pipeline(path)
                check_members(spec, path.resolve().parent.parent, source=str(path))
            else:
                spec = load_spec(path)
        except SpecError as exc:
            bad.append(exc)
            for problem in exc.problems:
                print(f"{path}: {problem}")
            continue
        print(f"{path}: ok\n{spec.summary()}")
    if bad:
        total = sum(len(e.problems) for e in bad)
        which = ", ".join(e.source for e in bad)
        raise BadInput(f"invalid model spec: {which} ({total} error{'s' if total != 1 else ''}, listed above)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    if args.action == "check":
        return check(args.files)
    text = json_schema_text()
    if args.write:
        atomic_write(args.write, text, mode=0o644)
        print(f"wrote {args.write}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
