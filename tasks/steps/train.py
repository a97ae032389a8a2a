"""Train a model on one or more validated data drops: the trainer contract and the built-in trainer.

The trainer contract (also ``tasks/contracts/spec.py`` and docs/CONTRACTS.md "Model spec")
----------------------------------------------------------------------------------------
A model's spec names its trainer (``trainer`` in ``models/<name>/spec.yaml``). Both paths keep one
contract:

* **in**: validated data drops of the model, by id (``drops/<id>/``; each drop's validation must have
  passed for this model and still match its bytes: ``check_drops``);
* **out**: under ``runs/<run_id>/`` in the object store, ``model.onnx`` whose input is named
  ``spec.onnx.input`` (float32 ``[N, *spec.input_shape]``, the pixels after ``spec.preprocessing``) and
  whose outputs are ``spec.onnx.logits`` (float32 ``[N, number of classes]``) and ``spec.onnx.embedding``
  (float32 ``[N, spec.embedding_dim]``), batch axis dynamic; plus ``metrics.json`` (a JSON object);
* **local path** (``mlpipe train``): ``spec.trainer.entry_point`` (``module:function``) is imported and
  called as ``function(store, drop_ids, *, spec, run_id, seed, epochs, ...)`` (the other options of the
  CLI, ``batch_size``, ``lr``, ``patience``, ``val_fraction``, ``device``, ``track``, only where its
  signature takes them); it returns the result dict with at least ``run_id``, ``drop_ids``,
  ``onnx_key`` and ``metrics``, and raises the error kinds of ``tasks.contracts.errors``;
* **pod path** (``plugins/mlpipe_steps.py``): ``spec.trainer.image`` runs ``spec.trainer.command`` +
  ``spec.trainer.args`` (placeholders filled in) + ``--result-json PATH`` and writes the same dict there.

``run_trainer`` is the step: it resolves the drops and the run id, calls the entry point, then checks
what the trainer left whatever it was: the result's keys, ``metrics.json`` present, and ``model.onnx``
against the spec (``tasks.model.networks.check_onnx_contract``: an ``OnnxContractError``, rejected,
naming the tensor and the expected shape). A run is complete once ``runs/<run_id>/result.json`` exists.

The built-in trainer (``tasks.steps.train:train``)
--------------------------------------------------
Any spec with a fixed-size NCHW input (``tasks.model.networks.build_model(spec)``). Outputs, under
``runs/<run_id>/``:

* ``model.onnx``   the classifier (opset 17, dynamic batch), checked against the spec's ONNX contract
                   and against PyTorch with ONNX Runtime (batches 1, 7, 32);
* ``model.pt``     the PyTorch state_dict (``tasks.model.networks.load_torch`` reloads it);
* ``metrics.json`` validation and golden-set accuracy, per-class recall by class name, epochs,
                   early stopping, timings, parameters, parity, versions;
* ``history.json`` per-epoch loss / accuracy / seconds;
* ``curves.png``   training curves;
* ``result.json``  the step result, written last: a run with it is complete.

The default run id is derived from the drop ids and the training parameters, so
a retry with the same inputs overwrites the same run (idempotent step).

Training is deterministic for a given seed on a given device and thread count.
It uses a GPU when one is present (``--device auto``), as in the Kubernetes pod
that requests ``nvidia.com/gpu: 1``; the same CLI runs as a local process.

CLI::

    mlpipe train [--model NAME] --drop-id d1 [--drop-id d2 ...] [--epochs 8] [--seed 0]
        [--batch-size 64] [--lr 0.002] [--patience 2] [--device auto]
        [--run-id ID] [--result-json PATH]

The store comes from the environment (``MLPIPE_STORE_URL``, see tasks/config.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from tasks.contracts import layout
from tasks.contracts.errors import BadInput, Rejected, run_cli
from tasks.logs import setup_logging
from tasks.contracts.results import write_result_json
from tasks.contracts.files import sha256_bytes, sha256_file

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    from torch import nn

    from tasks.adapters.storage import Store
    from tasks.contracts.spec import ModelSpec

logger = logging.getLogger(__name__)

DEFAULT_EPOCHS = 8
DEFAULT_SEED = 0
DEFAULT_BATCH_SIZE = 64
DEFAULT_LR = 2e-3
DEFAULT_PATIENCE = 2
DEFAULT_VAL_FRACTION = 0.2
WEIGHT_DECAY = 1e-4
LABEL_SMOOTHING = 0.1  # training loss only; val/golden losses are plain cross-entropy
MIN_DELTA = 1e-4  # a val loss must improve by more than this to count as better
RUN_FILES = ("model.onnx", "model.pt", "metrics.json", "history.json", "curves.png")
RESULT_KEYS = ("run_id", "drop_ids", "onnx_key", "metrics")  # what every trainer's result dict has
#: options of ``run_trainer`` passed to an entry point only where its signature takes them
TRAINER_OPTIONS = ("batch_size", "lr", "patience", "val_fraction", "device", "track")

EpochCallback = Callable[[dict[str, Any]], None]


class TrainError(BadInput, RuntimeError):
    """Training could not produce a usable model (bad input arrays, unavailable device...): final."""


class TrainerNotFound(BadInput, ValueError):
    """The spec's ``trainer.entry_point`` cannot be imported or is not callable: bad input, final."""


class TrainerContractError(Rejected, ValueError):
    """A trainer returned without what the contract promises (result keys, ``metrics.json``): rejected, final."""


# --------------------------------------------------------------------------- set-up


def default_threads() -> int:
    """Torch intra-op threads: ``MLPIPE_TORCH_THREADS`` if set, else min(2, cores)."""
    from tasks.config import load_settings

    try:
        value = load_settings().train.torch_threads
    except ValueError as exc:  # the message names the variable and what it accepts
        raise TrainError(str(exc)) from None
    return value if value is not None else max(1, min(2, os.cpu_count() or 1))


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cuda`` without a GPU is an error."""
    import torch

    device = (device or "auto").lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise TrainError(
                f"--device {device} requested but torch {torch.__version__} sees no CUDA GPU; "
                "use --device auto or cpu, or run the trainer image on a GPU node"
            )
        return device
    if device == "cpu":
        return device
    raise TrainError(f"unknown device {device!r}: use auto, cpu or cuda")


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def default_run_id(drop_ids: Sequence[str], *, seed: int, epochs: int, batch_size: int = DEFAULT_BATCH_SIZE,
                   lr: float = DEFAULT_LR, patience: int = DEFAULT_PATIENCE,
                   val_fraction: float = DEFAULT_VAL_FRACTION, model: str | None = None) -> str:
    """A run id that depends only on the inputs (drop ids in order + training parameters, and the model: the
    members of a pipeline train on the same scene drop with the same parameters, each into its own run)."""
    key = {
        "drops": list(drop_ids), "seed": int(seed), "epochs": int(epochs), "batch_size": int(batch_size),
        "lr": float(lr), "patience": int(patience), "val_fraction": float(val_fraction),
    }
    if model is not None:
        key["model"] = str(model)
    digest = sha256_bytes(json.dumps(key, sort_keys=True).encode())[:16]
    return f"train-{digest}"


def stratified_split(y: "np.ndarray", val_fraction: float, seed: int) -> tuple["np.ndarray", "np.ndarray"]:
    """Deterministic per-class split: (train indices, val indices), each sorted."""
    import numpy as np

    if not 0.0 < val_fraction < 1.0:
        raise TrainError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(len(idx) * val_fraction))
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        else:
            n_val = 0
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


def _check_arrays(X: "np.ndarray", y: "np.ndarray", spec: "ModelSpec") -> tuple["np.ndarray", "np.ndarray"]:
    import numpy as np

    X = np.asarray(X)
    y = np.asarray(y)
    shape = tuple(spec.image_shape)
    if X.ndim != len(shape) + 1 or X.shape[1:] != shape:
        raise TrainError(f"model {spec.name!r} takes images of shape [N, {', '.join(map(str, shape))}], "
                         f"got {list(X.shape)}")
    if X.dtype != np.uint8:
        raise TrainError(f"expected uint8 images (0..255), got dtype {X.dtype}")
    if y.shape != (len(X),):
        raise TrainError(f"expected {len(X)} labels, got shape {list(y.shape)}")
    y = y.astype(np.int64)
    if len(X) < 20:
        raise TrainError(f"need at least 20 images to train and validate, got {len(X)}")
    if y.min() < 0 or y.max() >= spec.num_classes:
        raise TrainError(f"labels must be the class ids 0..{spec.num_classes - 1} of model {spec.name!r}, got "
                         f"range {int(y.min())}..{int(y.max())}")
    return X, y


# --------------------------------------------------------------------------- training


def _evaluate(model: "nn.Module", x: Any, y: Any, batch_size: int = 1024) -> tuple[float, float, Any]:
    """(mean loss, accuracy, predictions) of ``model`` on device tensors ``x`` (float) and ``y``."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total_loss, preds = 0.0, []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            logits, _ = model(x[start:start + batch_size])
            total_loss += float(F.cross_entropy(logits, y[start:start + batch_size], reduction="sum"))
            preds.append(logits.argmax(dim=1))
    pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=x.device)
    n = max(len(x), 1)
    return total_loss / n, float((pred == y).float().mean()) if len(x) else 0.0, pred.cpu().numpy()


def _shift_batch(xb: Any, gen: Any, max_shift: int = 2) -> Any:
    """Translate each image by its own random offset of up to ``max_shift`` pixels (zero fill).

    One gather per batch (NCHW, every channel alike): pad by ``max_shift``, then read an HxW window at
    a per-image offset drawn from ``gen`` (deterministic for a seeded generator).
    """
    import torch
    import torch.nn.functional as F

    n, c, h, w = xb.shape
    pw = w + 2 * max_shift
    offsets = torch.randint(0, 2 * max_shift + 1, (2, n), generator=gen).to(xb.device)
    padded = F.pad(xb, (max_shift, max_shift, max_shift, max_shift)).reshape(n, c, -1)
    rows = offsets[0][:, None, None] + torch.arange(h, device=xb.device)[None, :, None]
    cols = offsets[1][:, None, None] + torch.arange(w, device=xb.device)[None, None, :]
    index = (rows * pw + cols).reshape(n, 1, -1).expand(n, c, h * w)
    return padded.gather(2, index).reshape(n, c, h, w)


def train_arrays(
    X: "np.ndarray",
    y: "np.ndarray",
    spec: "ModelSpec",
    *,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = DEFAULT_SEED,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    patience: int = DEFAULT_PATIENCE,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    device: str = "cpu",
    augment: bool = True,
    on_epoch: EpochCallback | None = None,
) -> tuple["nn.Module", list[dict[str, Any]], dict[str, Any]]:
    """Train ``spec``'s built-in CNN on uint8 images ``X`` ``[N, *spec.image_shape]`` and class ids ``y`` [N].

    Stratified train/val split, random +-2 px shifts of the training images
    (``augment``), Adam with a one-cycle learning-rate schedule (warm-up to
    ``lr``, cosine decay over ``epochs``), early stopping on validation loss
    (stop after more than ``patience`` epochs without improvement; the best
    weights are restored). Training loss that is not finite raises TrainError. Returns ``(model, history, metrics)``: the model
    (in eval mode, on ``device``), one dict per epoch, and summary metrics with
    ``val_accuracy``, ``val_loss``, ``best_epoch``, ``epochs_run``,
    ``early_stopped``, ``train_seconds``, ``n_train``, ``n_val``, ``seed``.
    ``on_epoch`` is called with each epoch's dict (for tracking).
    """
    import torch
    import torch.nn.functional as F

    from tasks.model import networks as model_lib

    X, y = _check_arrays(X, y, spec)
    if epochs < 1:
        raise TrainError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise TrainError(f"batch_size must be >= 1, got {batch_size}")
    if patience < 0:
        raise TrainError(f"patience must be >= 0, got {patience}")
    if not lr > 0:
        raise TrainError(f"lr must be > 0, got {lr}")

    device = resolve_device(device)
    threads = default_threads()
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_det_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        seed_everything(seed)
        train_idx, val_idx = stratified_split(y, val_fraction, seed)
        x_all = torch.from_numpy(model_lib.to_input(X, spec))
        y_all = torch.from_numpy(y)
        x_tr, y_tr = x_all[train_idx].to(device), y_all[train_idx].to(device)
        x_va, y_va = x_all[val_idx].to(device), y_all[val_idx].to(device)

        model = model_lib.build_model(spec).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
        steps_per_epoch = math.ceil(len(train_idx) / batch_size)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch, pct_start=0.15,
        )
        gen = torch.Generator().manual_seed(seed)

        history: list[dict[str, Any]] = []
        best_loss, best_epoch, best_state, bad_epochs = math.inf, 0, None, 0
        early_stopped = False
        t_start = time.perf_counter()
        logger.info(
            "training on %d images (%d train / %d val), %d epochs max, batch %d, lr %g, device %s, %d threads",
            len(X), len(train_idx), len(val_idx), epochs, batch_size, lr, device, threads,
        )
        for epoch in range(1, epochs + 1):
            t_epoch = time.perf_counter()
            model.train()
            order = torch.randperm(len(train_idx), generator=gen).to(device)
            run_loss, run_correct = 0.0, 0
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                xb, yb = x_tr[idx], y_tr[idx]
                if augment:
                    xb = _shift_batch(xb, gen)
                logits, _ = model(xb)
                loss = F.cross_entropy(logits, yb, label_smoothing=LABEL_SMOOTHING)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                run_loss += float(loss.detach()) * len(idx)
                run_correct += int((logits.detach().argmax(dim=1) == yb).sum())
            if not math.isfinite(run_loss):
                raise TrainError(
                    f"training diverged at epoch {epoch} (loss {run_loss / len(train_idx)}): "
                    f"lower the learning rate (--lr, now {lr:g}) or check the labels"
                )
            val_loss, val_acc, _ = _evaluate(model, x_va, y_va)
            seconds = time.perf_counter() - t_epoch
            row = {
                "epoch": epoch,
                "train_loss": run_loss / len(train_idx),
                "train_accuracy": run_correct / len(train_idx),
                "val_loss": val_loss,
                "val_accuracy": val_acc,
                "lr": float(optimizer.param_groups[0]["lr"]),
                "seconds": seconds,
            }
            history.append(row)
            improved = val_loss < best_loss - MIN_DELTA
            if improved:
                best_loss, best_epoch, bad_epochs = val_loss, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad_epochs += 1
            logger.info(
                "epoch %d/%d loss %.4f train_acc %.4f val_loss %.4f val_acc %.4f %.1fs%s",
                epoch, epochs, row["train_loss"], row["train_accuracy"], val_loss, val_acc, seconds,
                "" if improved else f" (no improvement {bad_epochs}/{patience})",
            )
            if on_epoch is not None:
                on_epoch(row)
            if bad_epochs > patience and epoch < epochs:
                early_stopped = True
                logger.info("early stopping after epoch %d: best val_loss %.4f at epoch %d",
                            epoch, best_loss, best_epoch)
                break
        train_seconds = time.perf_counter() - t_start
        if best_state is not None:
            model.load_state_dict(best_state)
        val_loss, val_acc, _ = _evaluate(model, x_va, y_va)
        model.eval()
        metrics = {
            "val_accuracy": val_acc,
            "val_loss": val_loss,
            "best_epoch": best_epoch,
            "epochs_run": len(history),
            "early_stopped": early_stopped,
            "train_seconds": round(train_seconds, 3),
            "n_train": int(len(train_idx)),
            "n_val": int(len(val_idx)),
            "seed": int(seed),
            "device": device,
            "threads": threads,
            "num_parameters": model_lib.count_params(model),
        }
        logger.info("trained in %.1fs: val_acc %.4f val_loss %.4f (best epoch %d of %d)",
                    train_seconds, val_acc, val_loss, best_epoch, len(history))
        return model, history, metrics
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_det_warn)
        torch.set_num_threads(prev_threads)


def evaluate_arrays(model: "nn.Module", X: "np.ndarray", y: "np.ndarray", spec: "ModelSpec") -> dict[str, Any]:
    """Accuracy, mean loss and per-class recall (keyed by class name) of ``model`` on ``spec``'s uint8 images
    ``X`` and class ids ``y``."""
    import numpy as np
    import torch

    from tasks.model import networks as model_lib

    X, y = np.asarray(X), np.asarray(y).astype(np.int64)
    logits, _ = model_lib.predict_torch(model, model_lib.to_input(X, spec))
    pred = logits.argmax(axis=1)
    loss = float(torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y)))
    recall = {}
    for label, name in enumerate(spec.class_names):
        mask = y == label
        recall[name] = float((pred[mask] == label).mean()) if mask.any() else None
    return {"accuracy": float((pred == y).mean()) if len(y) else 0.0, "loss": loss,
            "per_class_recall": recall, "n": int(len(y))}


ACCURACY_PANEL = ("accuracy", (("train_accuracy", "train"), ("val_accuracy", "val")))


def plot_curves(history: Sequence[dict[str, Any]], path: str | Path, best_epoch: int | None = None,
                title: str = "", *, loss_label: str = "cross-entropy",
                panel: tuple[str, Sequence[tuple[str, str]]] = ACCURACY_PANEL) -> Path:
    """Loss (train, val) and the ``panel`` series (title, ``(history key, label)`` pairs; default accuracy) per
    epoch as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    try:
        ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
        ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
        ax_loss.set_xlabel("epoch")
        ax_loss.set_ylabel(loss_label)
        ax_loss.set_title("loss")
        for key, label in panel[1]:
            ax_acc.plot(epochs, [h[key] for h in history], "o-", label=label)
        ax_acc.set_xlabel("epoch")
        ax_acc.set_ylabel(panel[0])
        ax_acc.set_title(panel[0])
        for ax in (ax_loss, ax_acc):
            if best_epoch:
                ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"best ({best_epoch})")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        if title:
            fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


# --------------------------------------------------------------------------- the pipeline step


class _Tracker:
    """Wraps tasks.adapters.clearml so a tracking failure is recorded and never loses a trained model."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.run: Any = None
        self.errors: list[str] = []

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self.enabled:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - tracking is best effort, the store is the record
            logger.warning("ClearML %s failed: %s", what, exc)
            self.errors.append(f"{what}: {exc}")
            return None


def check_drops(store: "Store", drop_ids: Sequence[str], spec: "ModelSpec") -> dict[str, Any]:
    """Refuse drops whose bytes are not what their passing validation checked, each of them (the
    extra drops of ``--drop-id a,b`` too): ``DropChanged`` naming the drop and what changed,
    ``DropNotValidated`` for a drop that failed validation or was validated for another model than
    ``spec``'s. A drop never validated is trained on with a warning (the registry refuses to register
    it). Returns drop id -> validated digests."""
    from tasks.steps import drops

    out: dict[str, Any] = {}
    for drop_id in drop_ids:
        validated = drops.verify_validated(store, drop_id, require=False, model=spec.name)
        if validated is None:
            logger.warning("drop %s has no validation result: training on it, but a model trained on it "
                           "cannot be registered until it is validated", drop_id)
        out[drop_id] = validated
    return out


def train(
    store: "Store",
    drop_ids: Sequence[str],
    *,
    spec: "ModelSpec | None" = None,
    run_id: str | None = None,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = DEFAULT_SEED,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    patience: int = DEFAULT_PATIENCE,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    device: str = "auto",
    track: bool = True,
) -> dict[str, Any]:
    """The built-in trainer (the entry point ``tasks.steps.train:train``): train ``spec``'s CNN (default the
    configured model, ``MLPIPE_MODEL_NAME``) on the drops, evaluate on its golden set, export ONNX, upload
    to ``runs/<run_id>/``, log to ClearML.

    Raises ``tasks.steps.drops.DropError`` (a ``ValueError``) for an unknown or
    incomplete drop or one made for another model, ``DropChanged`` / ``DropNotValidated``
    (``check_drops``) for a drop that changed since its passing validation, failed it or was validated
    for another model, ``TrainError`` for bad arrays or an unavailable device,
    ``tasks.model.networks.OnnxContractError`` if the export breaks the spec's ONNX contract and
    ``tasks.model.networks.ParityError`` if it disagrees with PyTorch.
    Returns the result dict (also stored as ``runs/<run_id>/result.json``).
    """
    import torch

    from tasks.steps import drops
    from tasks.model import networks as model_lib
    from tasks.config import load_settings

    cfg = load_settings()
    spec = spec or cfg.model_spec()
    drop_ids = resolve_drop_ids(store, drop_ids)
    device = resolve_device(device)
    run_id = run_id or default_run_id(drop_ids, seed=seed, epochs=epochs, batch_size=batch_size, lr=lr,
                                      patience=patience, val_fraction=val_fraction, model=spec.name)
    run_prefix = layout.run_prefix(run_id)
    drop_content = check_drops(store, drop_ids, spec)
    params = {
        "drop_ids": drop_ids, "epochs": epochs, "seed": seed, "batch_size": batch_size, "lr": lr,
        "patience": patience, "val_fraction": val_fraction, "weight_decay": WEIGHT_DECAY,
        "label_smoothing": LABEL_SMOOTHING,
        "device": device, "augment": True, "model": spec.name,
    }

    t0 = time.perf_counter()
    X, y = drops.load_arrays(store, drop_ids, spec)
    logger.info("loaded %d images from drops %s in %.1fs", len(X), drop_ids, time.perf_counter() - t0)
    X_golden, y_golden = drops.golden_set(spec)

    tracker = _Tracker(track)
    if track:
        from tasks.adapters import clearml as tracking

        tracker.run = tracker.call(
            "start_run", tracking.start_run, cfg.clearml_project, f"train {spec.name} {run_id}",
            {k: (",".join(v) if isinstance(v, list) else v) for k, v in params.items()},
            tags=("train", spec.name, *drop_ids),
        )
    run = tracker.run

    def on_epoch(row: dict[str, Any]) -> None:
        if run is not None:
            tracker.call("log_metrics", run.log_metrics,
                         {"loss/train": row["train_loss"], "loss/val": row["val_loss"],
                          "accuracy/train": row["train_accuracy"], "accuracy/val": row["val_accuracy"],
                          "lr/lr": row["lr"], "seconds/epoch": row["seconds"]}, row["epoch"])

    close_info: dict[str, Any] = {}
    work = Path(tempfile.mkdtemp(prefix=f"train-{run_id}-", dir=_work_root(cfg.home)))
    try:
        model, history, fit = train_arrays(
            X, y, spec, epochs=epochs, seed=seed, batch_size=batch_size, lr=lr, patience=patience,
            val_fraction=val_fraction, device=device, on_epoch=on_epoch,
        )
        model = model.cpu().eval()
        golden = evaluate_arrays(model, X_golden, y_golden, spec)
        logger.info("golden set: accuracy %.4f on %d images", golden["accuracy"], golden["n"])

        onnx_path = model_lib.export_onnx(model, work / "model.onnx", spec)
        model_lib.check_onnx_contract(onnx_path, spec)
        parity_x = model_lib.to_input(X_golden[:32], spec) if len(X_golden) >= 32 else None
        parity = model_lib.check_onnx_parity(model, onnx_path, spec, batch_sizes=(1, 7, 32), inputs=parity_x)
        model_lib.save_torch(model, work / "model.pt")

        metrics: dict[str, Any] = {
            "run_id": run_id,
            "model": spec.name,
            "drop_ids": drop_ids,
            "drop_content": drop_content,
            "val_accuracy": fit["val_accuracy"],
            "val_loss": fit["val_loss"],
            "golden_accuracy": golden["accuracy"],
            "golden_loss": golden["loss"],
            "golden_n": golden["n"],
            "per_class_recall": golden["per_class_recall"],
            "epochs_run": fit["epochs_run"],
            "best_epoch": fit["best_epoch"],
            "early_stopped": fit["early_stopped"],
            "train_seconds": fit["train_seconds"],
            "n_train": fit["n_train"],
            "n_val": fit["n_val"],
            "seed": seed,
            "params": params,
            "num_parameters": fit["num_parameters"],
            "onnx_parity_max_abs_diff": parity,
            "onnx_opset": model_lib.OPSET,
            "onnx_sha256": sha256_file(onnx_path),
            "torch_version": torch.__version__,
            "device": fit["device"],
            "threads": fit["threads"],
            "clearml_task_id": getattr(run, "task_id", None),
        }
        (work / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        (work / "history.json").write_text(json.dumps(history, indent=2))
        plot_curves(history, work / "curves.png", best_epoch=fit["best_epoch"],
                    title=f"{run_id}  val_acc {fit['val_accuracy']:.3f}  golden_acc {golden['accuracy']:.3f}")

        # Upload: the result object is written last and marks the run complete.
        store.delete(run_prefix + "result.json")
        for name in RUN_FILES:
            store.put_file(run_prefix + name, work / name)
        logger.info("uploaded %s to %s", ", ".join(RUN_FILES), store.uri(run_prefix))

        clearml_model_id = None
        if run is not None:
            tracker.call("log_metrics", run.log_metrics, {
                "final/val_accuracy": fit["val_accuracy"], "final/val_loss": fit["val_loss"],
                "final/golden_accuracy": golden["accuracy"], "final/onnx_parity_max_abs_diff": parity,
                **{f"golden_recall/{k}": v for k, v in golden["per_class_recall"].items() if v is not None},
            }, fit["epochs_run"])
            clearml_model_id = tracker.call("upload_model", run.upload_model, onnx_path, spec.name,
                                            ("onnx", run_id))
            for name in ("metrics.json", "curves.png"):
                tracker.call("log_artifact", run.log_artifact, name, work / name)
            close_info = tracker.call("close", run.close) or {}
            run = None
    finally:
        if run is not None:  # training failed: still close the tracking run
            tracker.call("close", run.close)
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "run_id": run_id,
        "model": spec.name,
        "run_prefix": run_prefix,
        "store_url": store.url,
        "drop_ids": drop_ids,
        "onnx_key": run_prefix + "model.onnx",
        "onnx_uri": store.uri(run_prefix + "model.onnx"),
        "model_pt_key": run_prefix + "model.pt",
        "metrics_key": run_prefix + "metrics.json",
        "curves_key": run_prefix + "curves.png",
        "history_key": run_prefix + "history.json",
        "metrics": metrics,
        "clearml_task_id": metrics["clearml_task_id"],
        "clearml_model_id": clearml_model_id,
        "clearml_offline": getattr(tracker.run, "offline", None),
        "clearml_offline_session": close_info.get("offline_session"),
        "clearml_warning": getattr(tracker.run, "warning", None),
        "tracking_errors": tracker.errors,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    store.put_json(run_prefix + "result.json", result)
    logger.info("run %s done in %.1fs: val_acc %.4f golden_acc %.4f", run_id, result["seconds"],
                metrics["val_accuracy"], metrics["golden_accuracy"])
    return result


def _work_root(home: Path) -> Path:
    root = Path(home) / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    return root


def resolve_drop_ids(store: "Store", drop_ids: Sequence[str]) -> list[str]:
    """The drop ids, ``latest`` replaced by the drop it names now (so a run id, and a retry, always mean the
    same data), repeats dropped; ``TrainError`` for none."""
    from tasks.steps import drops

    if not drop_ids:
        raise TrainError("no drop ids given: pass at least one --drop-id")
    return list(dict.fromkeys(drops.resolve_drop_id(store, str(d)) for d in drop_ids))


def load_entry_point(spec: "ModelSpec") -> Callable[..., dict[str, Any]]:
    """The callable named by ``spec.trainer.entry_point`` (``module:function``); ``TrainerNotFound`` naming the
    entry point when the module cannot be imported, has no such attribute, or it is not callable."""
    import importlib

    entry = spec.trainer.entry_point
    module_name, _, attr = entry.partition(":")
    where = f"trainer.entry_point {entry!r} of model {spec.name!r}"
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - ImportError or whatever the module raises on import
        raise TrainerNotFound(f"{where}: cannot import module {module_name!r} ({type(exc).__name__}: {exc}); "
                              "install it or fix the spec") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise TrainerNotFound(f"{where}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise TrainerNotFound(f"{where}: {module_name}.{attr} is a {type(fn).__name__}, not a function")
    return fn


def _accepted(fn: Callable[..., Any], options: dict[str, Any]) -> dict[str, Any]:
    """The ``options`` that ``fn``'s signature takes (all of them when it has ``**kwargs``)."""
    import inspect

    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(options)
    names = {p.name for p in params}
    return {k: v for k, v in options.items() if k in names}


def check_run(store: "Store", result: Any, spec: "ModelSpec", run_id: str) -> None:
    """What any trainer must leave (the contract in this module's docstring): a result dict with
    ``RESULT_KEYS`` for ``run_id``, ``runs/<run_id>/metrics.json``, and a ``model.onnx`` at ``onnx_key`` that
    matches ``spec`` (``check_onnx_contract``). ``TrainerContractError`` / ``OnnxContractError`` (rejected)."""
    from tasks.adapters.storage import ObjectNotFound
    from tasks.model import networks as model_lib

    who = f"trainer {spec.trainer.entry_point} of model {spec.name!r}"
    if not isinstance(result, dict):
        raise TrainerContractError(f"{who} returned a {type(result).__name__}, not the result dict "
                                   f"(keys {', '.join(RESULT_KEYS)})")
    missing = [k for k in RESULT_KEYS if k not in result]
    if missing:
        raise TrainerContractError(f"{who}: the result dict has no {', '.join(missing)} (needs {', '.join(RESULT_KEYS)})")
    if result["run_id"] != run_id:
        raise TrainerContractError(f"{who} reported run {result['run_id']!r}, but was asked for run {run_id!r}")
    metrics_key = layout.run_file_key(run_id, layout.METRICS)
    if not store.exists(metrics_key):
        raise TrainerContractError(f"{who} wrote no {store.uri(metrics_key)} (the contract: model.onnx and "
                                   "metrics.json under runs/<run_id>/)")
    with tempfile.TemporaryDirectory(prefix="mlpipe-trainer-check-") as tmp:
        try:
            onnx_path = store.get_file(str(result["onnx_key"]), Path(tmp) / "model.onnx")
        except ObjectNotFound:
            raise TrainerContractError(f"{who}: no model at onnx_key {store.uri(str(result['onnx_key']))}") from None
        model_lib.check_onnx_contract(onnx_path, spec)


def run_trainer(
    store: "Store",
    drop_ids: Sequence[str],
    *,
    spec: "ModelSpec | None" = None,
    run_id: str | None = None,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = DEFAULT_SEED,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    patience: int = DEFAULT_PATIENCE,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    device: str = "auto",
    track: bool = True,
) -> dict[str, Any]:
    """The training step: call ``spec``'s trainer (``trainer.entry_point``, default model
    ``MLPIPE_MODEL_NAME``) per the contract, then check what it left (``check_run``); returns its result.

    The run id defaults to ``default_run_id`` of the resolved drops and the parameters. ``TrainerNotFound``
    (bad input) for an entry point that cannot be loaded; ``TrainerContractError`` / ``OnnxContractError``
    (rejected) for a trainer that breaks the contract; the trainer's own errors pass through.
    """
    from tasks.config import load_settings

    spec = spec or load_settings().model_spec()
    fn = load_entry_point(spec)
    drop_ids = resolve_drop_ids(store, drop_ids)
    run_id = run_id or default_run_id(drop_ids, seed=seed, epochs=epochs, batch_size=batch_size, lr=lr,
                                      patience=patience, val_fraction=val_fraction, model=spec.name)
    options = {"batch_size": batch_size, "lr": lr, "patience": patience, "val_fraction": val_fraction,
               "device": device, "track": track}
    logger.info("training model %s with %s on drops %s (run %s)", spec.name, spec.trainer.entry_point, drop_ids,
                run_id)
    result = fn(store, drop_ids, spec=spec, run_id=run_id, seed=seed, epochs=epochs, **_accepted(fn, options))
    check_run(store, result, spec, run_id)
    result_key = layout.run_file_key(run_id, layout.RUN_RESULT)
    if not store.exists(result_key):  # the built-in trainer writes it; another one may not: it marks the run done
        store.put_json(result_key, result)
    return result


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlpipe train",
        description="Train a model on validated data drops with the trainer of its spec (models/<NAME>/spec.yaml, "
                    "trainer.entry_point; the built-in CNN by default): model.onnx and metrics.json go to the "
                    "run's folder in the object store, checked against the spec's ONNX contract.",
        epilog="The store comes from MLPIPE_STORE_URL (see tasks/config.py); ClearML is offline unless "
               "CLEARML_API_HOST is set. Exit codes (tasks.contracts.errors): 0 ok, 2 bad input (a drop, an "
               "option, a spec or trainer entry point, a training that cannot converge), 3 rejected (a drop not "
               "validated for the model, an ONNX model that breaks the spec's contract or disagrees with PyTorch), "
               "75 the object store is unreachable (retried); 1 an unexpected error (retried).",
    )
    parser.add_argument("--model", default=None, metavar="NAME",
                        help="the model project (models/<NAME>/spec.yaml; default $MLPIPE_MODEL_NAME or digits)")
    parser.add_argument("--drop-id", dest="drop_ids", action="append", required=True, metavar="ID",
                        help="drop to train on (drops/<ID>/ in the store; 'latest' = the newest complete drop); "
                             "repeat, or give a comma-separated list, for several drops")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help=f"max epochs (default {DEFAULT_EPOCHS})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"random seed (default {DEFAULT_SEED})")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"mini-batch size (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"peak learning rate (default {DEFAULT_LR})")
    parser.add_argument("--patience", type=int, default=DEFAULT_PATIENCE,
                        help=f"early-stopping patience in epochs on val loss (default {DEFAULT_PATIENCE})")
    parser.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                        help=f"stratified validation fraction (default {DEFAULT_VAL_FRACTION})")
    parser.add_argument("--device", default="auto", help="auto (GPU if present), cpu or cuda (default auto)")
    parser.add_argument("--run-id", default=None,
                        help="run id (default: derived from the drop ids and parameters, so retries overwrite)")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to ClearML")
    parser.add_argument("--result-json", type=Path, default=None, metavar="PATH",
                        help="write the result dict (run_id, keys, metrics, ClearML ids) here")
    parser.add_argument("--log-level", default=None,
                        help="logging level (default $MLPIPE_LOG_LEVEL or INFO)")
    return parser


def split_drop_ids(values: Sequence[str]) -> list[str]:
    """``["a", "b,c", "a"]`` -> ``["a", "b", "c"]``: comma lists expanded, repeats dropped, order kept."""
    out = [part.strip() for value in values for part in str(value).split(",") if part.strip()]
    return list(dict.fromkeys(out))


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv, bad_input=(ValueError,))


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    from tasks.adapters.storage import open_store
    from tasks.config import load_settings

    drop_ids = split_drop_ids(args.drop_ids)
    spec = load_settings().model_spec(args.model)
    store = open_store()
    result = run_trainer(
        store, drop_ids, spec=spec, run_id=args.run_id, epochs=args.epochs, seed=args.seed,
        batch_size=args.batch_size, lr=args.lr, patience=args.patience, val_fraction=args.val_fraction,
        device=args.device, track=not args.no_tracking,
    )
    if args.result_json:
        write_result_json(args.result_json, result)
    m = result["metrics"]
    print(json.dumps({"run_id": result["run_id"], "model": spec.name, "onnx_key": result["onnx_key"],
                      **{k: m[k] for k in ("val_accuracy", "golden_accuracy", "golden_precision", "golden_recall", "golden_f1",
                                         "epochs_run") if k in m},
                      **{k: result[k] for k in ("onnx_uri", "clearml_task_id") if k in result}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
