"""REAL small trained classifiers for the QC and deploy tests, trained once and cached.

Its fixtures are registered for every test by ``pytest_plugins`` in ``tests/conftest.py``.

* ``good_model`` (session): ``tasks.steps.train.train_arrays`` on a 3,000-image MNIST drop made by
  ``tasks.steps.drops.make_drop`` (2 epochs); golden-set accuracy >= 0.95 (checked).
* ``good_model_t`` (session): the good model with its classification head scaled by 0.6 (a
  "temperature" variant): the same labels and embeddings, different scores, so two deployed
  versions can be told apart through Triton.
* ``worse_model`` (session): 1 epoch on 300 images with 30 % label noise: a valid ONNX classifier
  that must fail the accuracy and per-class recall thresholds.

Each is a folder with ``model.onnx`` (exported and parity-checked by ``tasks.model.networks``),
``model.pt`` and ``metrics.json``, i.e. what the trainer writes under ``runs/<run_id>/``.
Models are cached across sessions in pytest's cache folder (``.pytest_cache``), keyed by the
training recipe, the source of ``tasks/model/networks.py``, ``tasks/steps/train.py``, ``tasks/steps/drops.py``,
``tasks/steps/sources.py`` and ``models/digits/spec.yaml``;
set ``MLPIPE_TEST_RETRAIN=1`` to ignore the cache. ``register_model`` puts one into a store as a
new registry version (``tasks.steps.registry.register``), with a validated drop as its lineage.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

ROOT = Path(__file__).resolve().parents[2]
logger = logging.getLogger(__name__)
MODEL = "digits"  # the fixtures are models of the shipped digits spec (models/digits/spec.yaml)


def digits_spec():
    from tasks.contracts.spec import find_spec

    return find_spec(MODEL, ROOT / "models")

# threads=1: on 2 busy cores one torch thread trains ~2x faster than two (measured: 9 s vs 21-25 s of CPU
# per epoch of 2,700 images), and a fixed thread count keeps the result reproducible.
GOOD_RECIPE = {"drop_size": 3000, "drop_seed": 11, "label_noise": 0.0, "epochs": 2, "batch_size": 64,
               "lr": 3e-3, "val_fraction": 0.1, "seed": 0, "threads": 1}
WORSE_RECIPE = {"drop_size": 300, "drop_seed": 12, "label_noise": 0.3, "epochs": 1, "batch_size": 32,
                "lr": 2e-3, "val_fraction": 0.1, "seed": 0, "threads": 1}
HEAD_SCALE = 0.6  # good_model_t: logits * 0.6 (same argmax, softer scores)
MIN_GOOD_ACCURACY = 0.95
MODEL_FILES = ("model.onnx", "model.pt", "metrics.json")


@dataclass(frozen=True)
class TrainedModel:
    name: str
    dir: Path
    metrics: dict[str, Any]

    @property
    def onnx(self) -> Path:
        return self.dir / "model.onnx"

    @property
    def pt(self) -> Path:
        return self.dir / "model.pt"

    @property
    def golden_accuracy(self) -> float:
        return float(self.metrics["golden_accuracy"])


def _source_key(recipe: dict[str, Any]) -> str:
    import torch

    h = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
    h.update(torch.__version__.encode())
    for rel in ("tasks/model/networks.py", "tasks/steps/train.py", "tasks/steps/drops.py", "tasks/steps/sources.py",
                f"models/{MODEL}/spec.yaml"):
        h.update((ROOT / rel).read_bytes())
    return h.hexdigest()[:16]


def _finish(model, out: Path, extra: dict[str, Any]) -> None:
    """Export ONNX (parity-checked), save the state_dict, and write metrics.json."""
    from tasks.model import networks as model_lib
    from tasks.steps.drops import golden_set
    from tasks.steps.train import evaluate_arrays

    spec = digits_spec()
    model = model.cpu().eval()
    X_golden, y_golden = golden_set(spec)
    golden = evaluate_arrays(model, X_golden, y_golden, spec)
    onnx_path = model_lib.export_onnx(model, out / "model.onnx", spec)
    parity = model_lib.check_onnx_parity(model, onnx_path, spec, inputs=model_lib.to_input(X_golden[:32], spec))
    model_lib.save_torch(model, out / "model.pt")
    metrics = {**extra, "golden_accuracy": golden["accuracy"], "golden_loss": golden["loss"],
               "per_class_recall": golden["per_class_recall"], "golden_n": golden["n"],
               "onnx_parity_max_abs_diff": parity, "onnx_opset": model_lib.OPSET}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))


def _train(recipe: dict[str, Any], out: Path, name: str) -> None:
    from tasks.steps.drops import load_arrays, make_drop
    from tasks.adapters.storage import LocalStore
    from tasks.steps.train import train_arrays

    t0 = time.monotonic()
    spec = digits_spec()
    store = LocalStore(out / "_drop_store")
    drop_id = f"{name}-drop"
    make_drop(store, drop_id, size=recipe["drop_size"], seed=recipe["drop_seed"], label_noise=recipe["label_noise"],
              spec=spec)
    X, y = load_arrays(store, [drop_id], spec)
    shutil.copyfile(store.root / "drops" / drop_id / "manifest.parquet", out / "manifest.parquet")
    shutil.rmtree(out / "_drop_store")
    saved = os.environ.get("MLPIPE_TORCH_THREADS")
    os.environ["MLPIPE_TORCH_THREADS"] = str(recipe["threads"])  # read by tasks.steps.train.default_threads()
    try:
        model, _history, fit = train_arrays(
            X, y, spec, epochs=recipe["epochs"], seed=recipe["seed"], batch_size=recipe["batch_size"], lr=recipe["lr"],
            val_fraction=recipe["val_fraction"], device="cpu", augment=False)
    finally:
        if saved is None:
            os.environ.pop("MLPIPE_TORCH_THREADS", None)
        else:
            os.environ["MLPIPE_TORCH_THREADS"] = saved
    _finish(model, out, {"run_kind": name, "recipe": recipe, "val_accuracy": fit["val_accuracy"],
                         "val_loss": fit["val_loss"], "epochs_run": fit["epochs_run"], "n_train": fit["n_train"],
                         "train_seconds": fit["train_seconds"], "fixture_seconds": round(time.monotonic() - t0, 1)})


def _variant(source: "TrainedModel", out: Path) -> None:
    import torch

    from tasks.model.networks import load_torch

    model = load_torch(source.pt, digits_spec())
    with torch.no_grad():
        model.head.weight.mul_(HEAD_SCALE)
        model.head.bias.mul_(HEAD_SCALE)
    shutil.copyfile(source.dir / "manifest.parquet", out / "manifest.parquet")
    _finish(model, out, {"run_kind": "good_t", "derived_from": "good", "head_scale": HEAD_SCALE,
                         "val_accuracy": source.metrics.get("val_accuracy")})


# Test modules import these fixtures, so pytest sees one session fixture per importing module: this memo
# makes each model trained (or copied from the cache) once per process however many modules use it.
# (Keyed by name only: the source key is read once, even if a file changes while the session runs.)
_SESSION_MODELS: dict[str, TrainedModel] = {}


def _cached(request, tmp_path_factory, name: str, key: str, build: Callable[[Path], None]) -> TrainedModel:
    """Build (or reuse from pytest's cache) model ``name`` for ``key``; returns a private session copy."""
    if name in _SESSION_MODELS and _SESSION_MODELS[name].onnx.is_file():
        return _SESSION_MODELS[name]
    cache = getattr(request.config, "cache", None)
    # pytest-xdist: the workers of one run share the run's base folder (each has its own sub-folder), so
    # without pytest's cache the first worker that needs a model trains it there and the others copy it.
    run_uid = os.environ.get("PYTEST_XDIST_TESTRUNUID", "")
    base = tmp_path_factory.getbasetemp()
    root = Path(cache.mkdir("mlpipe-trained-models")) if cache is not None else (base.parent if run_uid else base)
    with _lock(root / f".{name}.lock"):  # one trainer per model at a time across the workers of a run
        final = _build_once(root, name, key, run_uid, build)
    # a private copy: another session may replace the cache entry while this one runs
    copy = tmp_path_factory.mktemp(f"model-{name}")
    for f in (*MODEL_FILES, "manifest.parquet"):
        if (final / f).is_file():
            shutil.copyfile(final / f, copy / f)
    metrics = json.loads((copy / "metrics.json").read_text())
    _SESSION_MODELS[name] = TrainedModel(name, copy, metrics)
    return _SESSION_MODELS[name]


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive ``flock`` on ``path`` for the block (released when the process dies, too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_once(root: Path, name: str, key: str, run_uid: str, build: Callable[[Path], None]) -> Path:
    """``root/<name>-<key>``, trained unless it is complete (``MLPIPE_TEST_RETRAIN=1``: trained once per run)."""
    final = root / f"{name}-{key}"
    fresh = os.environ.get("MLPIPE_TEST_RETRAIN", "") not in ("", "0")
    done_by_this_run = bool(run_uid) and (final / f".trained-by-{run_uid}").is_file()
    if (fresh and not done_by_this_run) or not all((final / f).is_file() for f in MODEL_FILES):
        staging = root / f".{name}-{key}-{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        t0 = time.monotonic()
        try:
            build(staging)
            shutil.rmtree(final, ignore_errors=True)
            os.rename(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if run_uid:
            (final / f".trained-by-{run_uid}").write_text("")
        print(f"\n[model_fixtures] trained {name!r} in {time.monotonic() - t0:.1f}s -> {final}")
        for stale in root.glob(f"{name}-*"):  # models of older code: sessions use copies, so this is safe
            if stale != final and stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
    return final


@pytest.fixture(scope="session")
def good_model(request, tmp_path_factory) -> TrainedModel:
    m = _cached(request, tmp_path_factory, "good", _source_key(GOOD_RECIPE),
                lambda out: _train(GOOD_RECIPE, out, "good"))
    assert m.golden_accuracy >= MIN_GOOD_ACCURACY, (
        f"the 'good' fixture model reached only {m.golden_accuracy:.3f} golden accuracy "
        f"(need {MIN_GOOD_ACCURACY}); training changed? recipe {GOOD_RECIPE}")
    return m


@pytest.fixture(scope="session")
def good_model_t(request, tmp_path_factory, good_model) -> TrainedModel:
    key = _source_key({"variant_of": GOOD_RECIPE, "head_scale": HEAD_SCALE})
    return _cached(request, tmp_path_factory, "good_t", key, lambda out: _variant(good_model, out))


@pytest.fixture(scope="session")
def worse_model(request, tmp_path_factory) -> TrainedModel:
    m = _cached(request, tmp_path_factory, "worse", _source_key(WORSE_RECIPE),
                lambda out: _train(WORSE_RECIPE, out, "worse"))
    assert m.golden_accuracy < 0.9, f"the 'worse' fixture model is too good ({m.golden_accuracy:.3f})"
    return m


# ----------------------------------------------------------------------------------------------
# Putting models into a store
# ----------------------------------------------------------------------------------------------


def put_drop_lineage(store, drop_id: str, manifest: Path | bytes | None = None) -> None:
    """A complete drop with a passing validation result, as ``validate`` leaves it (for lineage)."""
    data = manifest.read_bytes() if isinstance(manifest, Path) else (manifest or b"manifest-" + drop_id.encode())
    if not store.exists(f"drops/{drop_id}/manifest.parquet"):
        store.put_bytes(f"drops/{drop_id}/manifest.parquet", data)
        store.put_json(f"drops/{drop_id}/_SUCCESS", {"drop_id": drop_id, "rows": 0})
        from tasks.steps import drops

        drops.bind_validation(store, drop_id, {"success": True, "failures": [], "report_uri": None,
                                               "note": "test fixture"}, drops.content_digest(store, drop_id))


def register_files(store, model_name: str, files: dict[str, bytes | Path], *, run_id: str | None = None,
                   drop_id: str = "fixture-drop", metrics: dict[str, Any] | None = None) -> int:
    """Write ``files`` (name -> bytes or path) to ``runs/<run_id>/`` and register the run; returns the version."""
    from tasks.steps import registry

    run_id = run_id or f"run-{uuid.uuid4().hex[:10]}"
    for name, data in files.items():
        store.put_bytes(f"runs/{run_id}/{name}", data.read_bytes() if isinstance(data, Path) else data)
    if "metrics.json" not in files:
        store.put_json(f"runs/{run_id}/metrics.json", metrics or {"val_accuracy": None})
    put_drop_lineage(store, drop_id)
    return int(registry.register(store, model_name, run_id, [drop_id], mirror=False)["version"])


def register_model(store, trained: TrainedModel, model_name: str = "digits", *, run_id: str | None = None) -> int:
    """Register ``trained`` as a new candidate version of ``model_name``; returns the version number."""
    drop_id = f"{trained.name}-drop"
    put_drop_lineage(store, drop_id, trained.dir / "manifest.parquet")
    return register_files(store, model_name, {f: trained.dir / f for f in MODEL_FILES},
                          run_id=run_id or f"run-{trained.name}-{uuid.uuid4().hex[:8]}", drop_id=drop_id)


def mark_qc_passed(store, model_name: str, version: int) -> None:
    """Record a passed QC verdict on a version without running the gate (deploy tests; QC is tested apart)."""
    key = f"models/{model_name}/{version}/version.json"
    manifest = store.get_json(key)
    manifest["qc"] = {"verdict": "passed", "reasons": [], "report": None, "note": "set by a test fixture"}
    store.put_json(key, manifest)


def export_wrong_shape_onnx(path: Path, num_logits: int = 7) -> Path:
    """A contract-named ONNX model whose ``logits`` are ``[N, num_logits]`` instead of ``[N, 10]``."""
    import torch
    from torch import nn

    class WrongHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 64), nn.ReLU())
            self.head = nn.Linear(64, num_logits)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            emb = self.embed(x)
            return self.head(emb), emb

    torch.manual_seed(0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(WrongHead().eval(), (torch.rand(2, 1, 28, 28),), str(path), dynamo=False,
                          opset_version=17, input_names=["input"], output_names=["logits", "embedding"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}, "embedding": {0: "batch"}})
    return path
