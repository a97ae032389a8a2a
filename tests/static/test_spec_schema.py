"""docs/model-spec.schema.json is the JSON Schema generated from tasks/contracts/spec.py, and every shipped
model spec (models/<name>/spec.yaml) is valid against it and against the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tasks.contracts.spec import MODELS_DIR, SCHEMA_PATH, SPEC_FILE, json_schema_text, load_spec

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / SCHEMA_PATH
SPECS = sorted((ROOT / MODELS_DIR).glob(f"*/{SPEC_FILE}"))


def test_the_committed_schema_matches_the_model():
    assert SCHEMA.is_file(), f"{SCHEMA_PATH} is missing: run mlpipe spec schema --write {SCHEMA_PATH}"
    assert SCHEMA.read_text(encoding="utf-8") == json_schema_text(), (
        f"{SCHEMA_PATH} differs from tasks/contracts/spec.py: run mlpipe spec schema --write {SCHEMA_PATH}")


def test_the_digits_spec_is_shipped():
    assert ROOT / MODELS_DIR / "digits" / SPEC_FILE in SPECS


@pytest.mark.parametrize("path", SPECS, ids=[p.parent.name for p in SPECS])
def test_every_shipped_spec_is_valid(path):
    spec = load_spec(path)
    assert spec.name == path.parent.name, f"{path}: name {spec.name!r} is not its folder's name"
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text(encoding="utf-8"))).validate(
        yaml.safe_load(path.read_text(encoding="utf-8")))
