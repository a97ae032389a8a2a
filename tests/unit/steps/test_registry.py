"""The registry of record: versions, stages, lineage, idempotency, events, CLI errors, the ONNX contract
of the model spec at register."""

from __future__ import annotations

import json
import subprocess
import sys
import zlib
from functools import lru_cache

import pytest

from tasks.contracts.errors import EXIT_BAD_INPUT, EXIT_REJECTED, exit_code_for
from tasks.contracts.files import sha256_file
from tasks.contracts.spec import SpecError
from tasks.model.networks import OnnxContractError
from tasks.steps import drops
from tasks.steps import registry
from tasks.steps.registry import RegistryError
from tests.support.factories import fake_run
from tests.support import spec_models as sm


@lru_cache(maxsize=None)
def _onnx_bytes(run_id: str, model: str = "digits") -> bytes:
    """A valid ONNX classifier of the shipped spec ``model``, different for each run id."""
    import tempfile
    from pathlib import Path

    from tasks.config import load_settings

    with tempfile.TemporaryDirectory() as tmp:
        path = sm.contract_onnx(Path(tmp) / "model.onnx", load_settings().model_spec(model),
                                seed=zlib.crc32(run_id.encode()))
        return path.read_bytes()


def _fake_run(store, run_id="r1", drop_id="d1", **kw):
    """``fake_run`` whose model.onnx is a real digits classifier (register checks the spec's ONNX contract)."""
    kw.setdefault("onnx", _onnx_bytes(run_id))
    fake_run(store, run_id, drop_id, **kw)


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
    assert store.get_bytes("models/digits/1/model.onnx") == _onnx_bytes("r1")
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


def test_the_version_records_its_model_spec(store, mlpipe_env):
    _fake_run(store)
    v = registry.register(store, "digits", "r1", ["d1"], mirror=False)
    record = {"name": "digits", "sha256": sha256_file(mlpipe_env.models_dir / "digits" / "spec.yaml")}
    assert v["spec"] == record and registry.get_version(store, "digits", 1)["spec"] == record
    assert registry.events(store, "digits")[0]["spec"] == record


def test_an_onnx_that_breaks_the_spec_is_rejected_naming_tensor_and_shape(store):
    """A classifier of the shapes spec (48x48 RGB in, 5 logits, 32-d embedding) registered as digits."""
    _fake_run(store, "r1", onnx=_onnx_bytes("r1", "shapes"))
    with pytest.raises(OnnxContractError) as err:
        registry.register(store, "digits", "r1", ["d1"], mirror=False)
    msg = str(err.value)
    assert exit_code_for(err.value) == EXIT_REJECTED
    assert "refusing to register run 'r1'" in msg and "as 'digits'" in msg
    assert "input 'input' has shape ['N', 3, 48, 48], expected ['N', 1, 28, 28]" in msg
    assert "output 'logits' has shape ['N', 5], expected ['N', 10]" in msg
    assert "output 'embedding' has shape ['N', 32], expected ['N', 64]" in msg
    assert registry.list_versions(store, "digits") == [] and store.list("models/") == []  # nothing claimed


def test_a_file_that_is_no_onnx_model_is_rejected(store):
    _fake_run(store, "r1", onnx=b"onnx-bytes-r1")
    with pytest.raises(OnnxContractError, match="not a loadable ONNX model"):
        registry.register(store, "digits", "r1", ["d1"], mirror=False)


def test_a_model_without_a_spec_is_bad_input(store, tmp_path, monkeypatch):
    _fake_run(store, "r1")
    with pytest.raises(SpecError, match="no model spec for 'nospec'") as err:
        registry.register(store, "nospec", "r1", ["d1"], mirror=False)
    assert exit_code_for(err.value) == EXIT_BAD_INPUT
    # the spec named by MLPIPE_MODELS_DIR is the one checked: a 3-class spec refuses the digits model
    sm.write_spec(tmp_path / "models", "digits", base="digits", classes=sm.TRICOLOUR["classes"])
    sm.use_specs(monkeypatch, tmp_path / "models")
    with pytest.raises(OnnxContractError, match=r"output 'logits' has shape \['N', 10\], expected \['N', 3\]"):
        registry.register(store, "digits", "r1", ["d1"], mirror=False)


def test_refuses_a_drop_validated_for_another_model(store):
    _fake_run(store, "r1")
    drops.bind_validation(store, "d1", {"success": True, "model": "shapes", "validated_at": "2026-01-01T00:00:00"},
                          drops.content_digest(store, "d1"))
    with pytest.raises(RegistryError, match="for model 'digits'.*validated for model 'shapes', not 'digits'"):
        registry.register(store, "digits", "r1", ["d1"], mirror=False)
    assert registry.list_versions(store, "digits") == []


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
    assert bad.returncode == EXIT_BAD_INPUT  # an unknown version: final
    assert "error: model 'digits' has no version 42" in bad.stderr
    assert "Traceback" not in bad.stderr
    _fake_run(store, "r2", onnx=_onnx_bytes("r2", "shapes"))
    wrong = subprocess.run([sys.executable, "-m", "tasks.cli", "registry", "register", "--run-id", "r2", "--drop-id",
                            "d1", "--no-mirror"], capture_output=True, text=True)
    assert wrong.returncode == EXIT_REJECTED, wrong.stderr  # the model breaks the spec: final, no retry
    assert "output 'logits' has shape ['N', 5], expected ['N', 10]" in wrong.stderr
    assert "Traceback" not in wrong.stderr


# --------------------------------------------------------------------------- concurrency (both stores)

import threading  # noqa: E402
from pathlib import Path  # noqa: E402

from tasks.contracts import layout  # noqa: E402
from tests.support.factories import validated  # noqa: E402

N = 8


@pytest.fixture(params=["local", "s3"])
def any_store(request):
    if request.param == "local":
        return request.getfixturevalue("store")
    request.getfixturevalue("mlpipe_env")
    return request.getfixturevalue("s3_store")


def _at_once(fn, args_list):
    """Run fn(*args) for every args in threads started together; return results (or raise the first error)."""
    barrier = threading.Barrier(len(args_list))
    results: list = [None] * len(args_list)
    errors: list = []

    def run(i, args):
        barrier.wait()
        try:
            results[i] = fn(*args)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, a)) for i, a in enumerate(args_list)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return results


def test_concurrent_registrations_of_one_run_give_one_version(any_store):
    _fake_run(any_store, "r1")
    out = _at_once(lambda: registry.register(any_store, "digits", "r1", ["d1"], mirror=False), [()] * N)
    assert {v["version"] for v in out} == {1}
    assert registry.list_versions(any_store, "digits") == [1]
    assert [e["event"] for e in registry.events(any_store, "digits")] == ["register"]
    assert any_store.list(layout.run_claims_prefix("digits")) == []  # every run claim released
    assert any_store.get_json(layout.version_claim_key("digits", 1))["run_id"] == "r1"


def test_concurrent_registrations_of_different_runs_get_distinct_versions_without_gaps(any_store):
    for i in range(N):
        _fake_run(any_store, f"r{i}")
    out = _at_once(lambda run_id: registry.register(any_store, "digits", run_id, ["d1"], mirror=False),
                   [(f"r{i}",) for i in range(N)])
    assert sorted(v["version"] for v in out) == list(range(1, N + 1))
    assert registry.list_versions(any_store, "digits") == list(range(1, N + 1))
    for v in out:  # each version holds its own run's model
        assert any_store.get_bytes(layout.version_file_key("digits", v["version"], "model.onnx")) == \
            _onnx_bytes(v["run_id"])
        assert registry.get_version(any_store, "digits", v["version"])["run_id"] == v["run_id"]
    # and registering them all again changes nothing
    again = _at_once(lambda run_id: registry.register(any_store, "digits", run_id, ["d1"], mirror=False),
                     [(f"r{i}",) for i in reversed(range(N))])
    assert {a["run_id"]: a["version"] for a in again} == {v["run_id"]: v["version"] for v in out}
    assert len([e for e in registry.events(any_store, "digits") if e["event"] == "register"]) == N


def test_concurrent_registrations_in_separate_processes(store, mlpipe_env):
    """The exclusive create holds across processes too (the CLI, as Airflow tasks run it)."""
    import os
    import subprocess

    for i in range(3):
        _fake_run(store, f"p{i}")
    runs = ["p0", "p0", "p1", "p2"]
    procs = [subprocess.Popen([sys.executable, "-m", "tasks.cli", "registry", "register", "--run-id", r,
                               "--drop-id", "d1", "--no-mirror"], env=os.environ.copy(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in runs]
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    versions = {r: json.loads(o[0])["version"] for r, o in zip(runs, outs)}
    assert sorted(set(versions.values())) == [1, 2, 3]
    assert registry.list_versions(store, "digits") == [1, 2, 3]
    assert {registry.get_version(store, "digits", v)["run_id"] for v in (1, 2, 3)} == {"p0", "p1", "p2"}


def test_a_crashed_registration_keeps_its_number_for_the_retry(store, monkeypatch):
    _fake_run(store, "r1")
    _fake_run(store, "r2")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(registry, "record_event", boom)
    with pytest.raises(OSError):
        registry.register(store, "digits", "r1", ["d1"], mirror=False)
    monkeypatch.undo()
    assert store.list(layout.run_claims_prefix("digits")) == []  # the run claim was released
    assert registry.register(store, "digits", "r2", ["d1"], mirror=False)["version"] == 2
    # r1's retry completes the number it claimed: no gap, no second number
    assert registry.register(store, "digits", "r1", ["d1"], mirror=False)["version"] == 1
    assert registry.list_versions(store, "digits") == [1, 2]


def test_a_held_run_claim_makes_a_second_registration_wait_then_give_up(store):
    _fake_run(store, "r1")
    store.put_json(layout.run_claim_key("digits", "r1"), {"run_id": "r1", "at": "now", "epoch": 4e9})
    with pytest.raises(registry.RegistryConflict, match="being registered by another process"):
        registry.register(store, "digits", "r1", ["d1"], mirror=False, wait_s=0.3)
    # a claim left by a killed process (older than stale_s) is taken over
    store.put_json(layout.run_claim_key("digits", "r1"), {"run_id": "r1", "at": "long ago", "epoch": 1.0})
    assert registry.register(store, "digits", "r1", ["d1"], mirror=False, wait_s=5)["version"] == 1


# --------------------------------------------------------------------------- one writer of version.json

def test_concurrent_stage_change_and_artifacts_lose_no_update(any_store):
    _fake_run(any_store, "r1")
    registry.register(any_store, "digits", "r1", ["d1"], mirror=False)

    def work(i):
        if i == 0:
            return registry.set_stage(any_store, "digits", 1, "production", "deployed", mirror=False)
        return registry.record_artifact(any_store, "digits", 1, f"extra-{i}.json", {"i": i},
                                        field=f"field_{i}", summary=i)

    _at_once(work, [(i,) for i in range(N)])
    manifest = registry.get_version(any_store, "digits", 1)
    assert manifest["stage"] == "production"
    assert [h["stage"] for h in manifest["history"]] == ["candidate", "production"]
    for i in range(1, N):
        assert manifest[f"field_{i}"] == i
        key = layout.version_file_key("digits", 1, f"extra-{i}.json")
        assert manifest["files"][f"extra-{i}.json"] == any_store.uri(key)
    kinds = [e["event"] for e in registry.events(any_store, "digits")]
    assert kinds.count("artifact") == N - 1 and kinds.count("stage") == 1


def test_only_from_decides_at_the_moment_of_the_write(store):
    _fake_run(store, "r1")
    registry.register(store, "digits", "r1", ["d1"], mirror=False)
    registry.set_stage(store, "digits", 1, "production", "deployed", mirror=False)
    assert registry.set_stage(store, "digits", 1, "rejected", "QC", only_from=("candidate",), mirror=False) is None
    assert registry.get_version(store, "digits", 1)["stage"] == "production"
    assert [e.get("stage") for e in registry.events(store, "digits") if e["event"] == "stage"] == ["production"]


def test_compile_records_through_the_registry(store):
    from tasks.steps import compile as trt_compile

    _fake_run(store, "r1")
    registry.register(store, "digits", "r1", ["d1"], mirror=False)
    registry.set_stage(store, "digits", 1, "production", "deployed", mirror=False)
    trt_compile.compile_version(store, "digits", 1, force_skip_reason="no GPU in this test")
    manifest = registry.get_version(store, "digits", 1)
    assert manifest["compile"]["status"] == "skipped" and manifest["compile"]["reason"] == "no GPU in this test"
    assert manifest["stage"] == "production"  # the stage set before is kept
    assert manifest["files"]["compile.json"] == store.uri("models/digits/1/compile.json")
    art = [e for e in registry.events(store, "digits") if e["event"] == "artifact"]
    assert art[-1]["name"] == "compile.json" and art[-1]["compile"]["status"] == "skipped"


# --------------------------------------------------------------------------- stage events + ClearML mirror

def _task(session: str) -> dict:
    return json.loads((Path(session).with_suffix("") / "task.json").read_text())


def test_stage_changes_are_events_and_mirrored_to_clearml(store, mlpipe_env):
    _fake_run(store, "r1")
    _fake_run(store, "r2")
    registry.register(store, "digits", "r1", ["d1"], mirror=False)
    registry.register(store, "digits", "r2", ["d1"], mirror=False)
    registry.set_stage(store, "digits", 1, "production", "deployed")
    registry.set_stage(store, "digits", 2, "rejected", "QC gate failed: accuracy")
    registry.set_stage(store, "digits", 1, "archived", "replaced")

    evs = registry.events(store, "digits")
    assert [e["event"] for e in evs] == ["register", "register", "stage", "stage", "stage"]
    stages = [(e["version"], e["previous"], e["stage"], e["reason"]) for e in evs if e["event"] == "stage"]
    assert stages == [(1, "candidate", "production", "deployed"),
                      (2, "candidate", "rejected", "QC gate failed: accuracy"),
                      (1, "production", "archived", "replaced")]

    prod, rej, arch = (e["clearml"] for e in evs if e["event"] == "stage")
    for mirrored, (version, previous, stage, _) in zip((prod, rej, arch), stages):
        assert "error" not in mirrored, mirrored
        assert mirrored["offline"] is True and mirrored["task_id"].startswith("offline-")
        assert (mirrored["version"], mirrored["previous"], mirrored["stage"]) == (version, previous, stage)
        task = _task(mirrored["offline_session"])
        assert {"registry", "digits", f"v{version}", "stage-change", stage} <= set(task["tags"])
        other_stages = set(registry.STAGES) - {stage}
        assert not other_stages & set(task["tags"]), task["tags"]
        assert task["hyperparams"]["params"]["previous_stage"]["value"] == previous
    # production: published where a server is (offline: said so); archived/rejected: archived in ClearML
    assert prod["archived"] is False and "publish" in prod and "offline" in prod["publish"]
    assert "archived" not in (_task(prod["offline_session"]).get("system_tags") or [])
    for mirrored in (rej, arch):
        assert mirrored["archived"] is True
        assert "archived" in _task(mirrored["offline_session"])["system_tags"]


# --------------------------------------------------------------------------- bound to the validated content

def _drop_with_images(store, drop_id="d1", n=4):
    for i in range(n):
        store.put_bytes(layout.image_key(drop_id, f"{drop_id}-{i}"), f"png-{drop_id}-{i}".encode())
    _fake_run(store, "r1", drop_id)  # manifest, _SUCCESS, a passing validation of these bytes


def test_lineage_records_the_validated_digests(store):
    from tasks.steps import drops

    _drop_with_images(store)
    v = registry.register(store, "digits", "r1", ["d1"], mirror=False)
    entry = v["lineage"]["drops"][0]
    now = drops.content_digest(store, "d1")
    assert entry["manifest_sha256"] == now["manifest_sha256"] == store.get_json(
        layout.validation_result_key("d1"))["content"]["manifest_sha256"]
    assert entry["images_sha256"] == now["images_sha256"] and entry["image_count"] == 4
    assert store.get_json("models/digits/1/lineage.json")["drops"][0]["images_sha256"] == now["images_sha256"]


@pytest.mark.parametrize("mutation, words", [
    ("manifest", ["manifest replaced"]),
    ("overwrite", ["1 image changed (d1-2.png)"]),
    ("add", ["1 image added (extra.png)"]),
    ("remove", ["2 images removed (d1-0.png, d1-3.png)"]),
    ("both", ["manifest replaced", "1 image changed (d1-1.png)"]),
])
def test_register_refuses_a_drop_changed_after_its_validation(store, mutation, words):
    _drop_with_images(store)
    if mutation in ("manifest", "both"):
        store.put_bytes(layout.manifest_key("d1"), b"another manifest")
    if mutation == "overwrite":
        store.put_bytes(layout.image_key("d1", "d1-2"), b"other bytes")
    if mutation == "both":
        store.put_bytes(layout.image_key("d1", "d1-1"), b"other bytes")
    if mutation == "add":
        store.put_bytes(layout.image_key("d1", "extra"), b"new")
    if mutation == "remove":
        store.delete(layout.image_key("d1", "d1-0"))
        store.delete(layout.image_key("d1", "d1-3"))
    with pytest.raises(drops.DropChanged) as err:
        registry.register(store, "digits", "r1", ["d1"], mirror=False)
    assert exit_code_for(err.value) == EXIT_REJECTED
    msg = str(err.value)
    assert "refusing to register" in msg and "drop 'd1' changed since its passing validation" in msg
    for w in words:
        assert w in msg, msg
    assert registry.list_versions(store, "digits") == [] and store.list("models/") == []
    # validated again, the drop is accepted as it is now
    validated(store, "d1")
    assert registry.register(store, "digits", "r1", ["d1"], mirror=False)["version"] == 1


def test_register_refuses_a_validation_without_digests(store):
    _fake_run(store, "r1")
    store.put_json(layout.validation_result_key("d1"), {"success": True})  # validated before digests existed
    with pytest.raises(RegistryError, match="no passing validation result.*no content digests"):
        registry.register(store, "digits", "r1", ["d1"], mirror=False)
