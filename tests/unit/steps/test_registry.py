"""The registry of record: versions, stages, lineage, idempotency, events, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tasks.steps import registry
from tasks.steps.registry import RegistryError
from tests.support.factories import fake_run as _fake_run


def test_register_creates_candidate_with_lineage(store):
    _fake_run(store)
    v = registry.register(store, "digits", "r1", ["d1"], mirror=False)
    assert v["version"] == 1 and v["stage"] == "candidate"
    lineage = store.get_json("models/digits/1/lineage.json")
    assert lineage["drops"][0]["drop_id"] == "d1"
    assert len(lineage["drops"][0]["manifest_sha256"]) == 64
    assert lineage["drops"][0]["validation"]["success"] is True
    assert lineage["training_run_id"] == "r1"
    assert lineage["clearml_task_id"] == "offline-123"
    assert lineage["code_version"]
    assert lineage["parent_champion"] is None
    assert store.get_bytes("models/digits/1/model.onnx") == b"onnx-bytes-r1"
    assert not store.exists("models/digits/1/_claim.json")
    assert [e["event"] for e in registry.events(store, "digits")] == ["register"]


def test_register_is_idempotent_and_numbers_grow(store):
    _fake_run(store, "r1")
    _fake_run(store, "r2")
    assert registry.register(store, "digits", "r1", ["d1"], mirror=False)["version"] == 1
    assert registry.register(store, "digits", "r1", ["d1"], mirror=False)["version"] == 1
    assert registry.register(store, "digits", "r2", ["d1"], mirror=False)["version"] == 2
    assert registry.list_versions(store, "digits") == [1, 2]


def test_stages_and_champion(store):
    _fake_run(store, "r1")
    _fake_run(store, "r2")
    registry.register(store, "digits", "r1", ["d1"], mirror=False)
    assert registry.champion(store, "digits") is None
    registry.set_stage(store, "digits", 1, "production", "deployed")
    v2 = registry.register(store, "digits", "r2", ["d1"], mirror=False)
    assert v2["lineage"]["parent_champion"] == 1
    registry.set_stage(store, "digits", 2, "production", "deployed")
    registry.set_stage(store, "digits", 1, "archived", "replaced by v2")
    assert registry.champion(store, "digits")["version"] == 2
    hist = registry.get_version(store, "digits", 1)["history"]
    assert [h["stage"] for h in hist] == ["candidate", "production", "archived"]
    with pytest.raises(RegistryError, match="unknown stage"):
        registry.set_stage(store, "digits", 1, "golden", "x")


def test_unknown_version_and_run_are_clear_errors(store):
    with pytest.raises(RegistryError, match="no version 7"):
        registry.get_version(store, "digits", 7)
    with pytest.raises(RegistryError, match="training run 'nope' not found"):
        registry.register(store, "digits", "nope", ["d1"], mirror=False)


def test_refuses_unvalidated_drop(store):
    _fake_run(store, "r1", passed=False)
    with pytest.raises(RegistryError, match="no passing validation"):
        registry.register(store, "digits", "r1", ["d1"], mirror=False)
    assert registry.list_versions(store, "digits") == []


def test_cli_register_and_errors(store, tmp_path):
    _fake_run(store, "r1")
    out = tmp_path / "res.json"
    ok = subprocess.run([sys.executable, "-m", "tasks.cli", "registry", "register", "--run-id", "r1", "--drop-id", "d1",
                         "--no-mirror", "--result-json", str(out)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(out.read_text())["version"] == 1
    bad = subprocess.run([sys.executable, "-m", "tasks.cli", "registry", "show", "42"], capture_output=True, text=True)
    assert bad.returncode == 1
    assert "error: model 'digits' has no version 42" in bad.stderr
    assert "Traceback" not in bad.stderr
