"""Train the built-in detector (``tasks.model.detector``) on the scene drops of its pipeline: a trainer behind
the trainer contract (``tasks/steps/train.py``'s docstring, ``tasks/contracts/spec.py``).

The entry point ``tasks.steps.train_detector:train`` (a detection spec's ``trainer.entry_point``) is called by
``tasks.steps.train.run_trainer`` (``mlpipe train --model <detector> --drop-id ...``) as
``train(store, drop_ids, *, spec, run_id, seed, epochs, batch_size, lr, patience, val_fraction, device, track)``
and returns the same result dict as the built-in classifier trainer. ``run_trainer`` then checks the run
(``check_run``: ``model.onnx`` against the detector's contract through ``tasks.model.networks.check_onnx_contract``).

Data: the scenes of the drops (``tasks.steps.scenes.load_scenes``; each drop validated for the pipeline or the
detector, ``tasks.steps.train.check_drops``) and the pipeline's golden scenes (``tasks.steps.scenes.golden_scenes``,
composed only from golden digits: never trained on). The pipeline is the one whose ``members.detector`` is this
spec (``tasks.contracts.pipeline.pipeline_of``).

Training (``train_scenes``): a seeded train/val split of the scenes, Adam with a one-cycle schedule, CenterNet's
focal loss plus the L1 of the log box size (``detector.detection_loss``), small colour jitter (per-frame
brightness, contrast and per-channel gain: no flips, digits are not symmetric), early stopping on the
validation loss (best weights restored). Metrics: validation and golden precision / recall / F1 at the spec's
``qc.iou_threshold`` (boxes decoded with the spec's ``detection`` parameters).

Outputs under ``runs/<run_id>/``: ``model.onnx`` (checked against the contract and against PyTorch at the spec's
``qc.max_parity_diff``), ``model.pt`` (``tasks.model.detector.load_detector``), ``metrics.json``, ``history.json``,
``curves.png``, then ``result.json`` last (the run is complete). ClearML tracking as the classifier trainer's
(best effort, never loses a model).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from tasks.contracts import layout
from tasks.contracts.files import sha256_file
from tasks.steps.train import (DEFAULT_EPOCHS, DEFAULT_LR, DEFAULT_PATIENCE, DEFAULT_SEED,
                               DEFAULT_VAL_FRACTION, MIN_DELTA, RUN_FILES, WEIGHT_DECAY, TrainError, _Tracker,
                               _work_root, check_drops, default_run_id, default_threads, resolve_device,
                               resolve_drop_ids, seed_everything)

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    from torch import nn

    from tasks.adapters.storage import Store
    from tasks.contracts.spec import ModelSpec

#: the detector's default batch: a scene holds several objects and a drop few frames, so more, smaller steps
#: (500 scenes, 8 epochs: val precision/recall 0.99 at 16, nothing found at 64)
DETECTOR_BATCH_SIZE = 16
logger = logging.getLogger(__name__)

#: colour jitter of the training frames (fractions of the pixel range / gains): small, a camera's variation
JITTER_BRIGHTNESS = 0.08
JITTER_CONTRAST = 0.15
JITTER_GAIN = 0.08

EpochCallback = Callable[[dict[str, Any]], None]


def _check_scenes(images: Any, boxes: Sequence[Any], classes: Sequence[Any], spec: "ModelSpec"
                  ) -> tuple["np.ndarray", list["np.ndarray"], list["np.ndarray"]]:
    import numpy as np

    images = np.asarray(images)
    shape = tuple(spec.image_shape)
    if images.ndim != len(shape) + 1 or tuple(images.shape[1:]) != shape:
        raise TrainError(f"detector {spec.name!r} takes frames of shape [N, {', '.join(map(str, shape))}], got "
                         f"{list(images.shape)}")
    if images.dtype != np.uint8:
        raise TrainError(f"expected uint8 frames (0..255), got dtype {images.dtype}")
    if len(boxes) != len(images) or len(classes) != len(images):
        raise TrainError(f"{len(images)} frames but {len(boxes)} box lists and {len(classes)} class lists")
    if len(images) < 10:
        raise TrainError(f"need at least 10 scenes to train and validate a detector, got {len(images)}")
    out_b = [np.asarray(b, np.float32).reshape(-1, 4) for b in boxes]
    out_c = [np.asarray(c, np.int64).reshape(-1) for c in classes]
    for i, (b, c) in enumerate(zip(out_b, out_c)):
        if len(b) != len(c):
            raise TrainError(f"scene {i}: {len(b)} boxes but {len(c)} classes")
        if len(b) and not (np.all(b[:, 2] > b[:, 0]) and np.all(b[:, 3] > b[:, 1])):
            raise TrainError(f"scene {i}: boxes must be (x0, y0, x1, y1) with x0 < x1 and y0 < y1, got {b.tolist()}")
    return images, out_b, out_c


def _jitter(xb: Any, gen: Any) -> Any:
    """Small colour jitter of a float batch in [0, 1] (NCHW): brightness, contrast, per-channel gain."""
    import torch

    n, c = xb.shape[:2]

    def uniform(*shape: int) -> Any:
        return (torch.rand(*shape, generator=gen) * 2 - 1).to(xb.device)

    mean = xb.mean(dim=(1, 2, 3), keepdim=True)
    contrast = 1 + JITTER_CONTRAST * uniform(n, 1, 1, 1)
    gain = 1 + JITTER_GAIN * uniform(n, c, 1, 1)
    bright = JITTER_BRIGHTNESS * uniform(n, 1, 1, 1)
    return ((xb - mean) * contrast + mean) * gain + bright


def _split(n: int, val_fraction: float, seed: int) -> tuple["np.ndarray", "np.ndarray"]:
    import numpy as np

    if not 0.0 < val_fraction < 1.0:
        raise TrainError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(max(int(round(n * val_fraction)), 1), n - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def evaluate_scenes(model: "nn.Module", images: "np.ndarray", boxes: Sequence["np.ndarray"], spec: "ModelSpec",
                    batch_size: int = 128) -> dict[str, Any]:
    """``detector.detection_metrics`` of ``model`` on uint8 ``images`` against ``boxes`` at the spec's
    ``qc.iou_threshold`` (plus ``n``: the frames)."""
    from tasks.model import detector

    pred = detector.predict_boxes(model, images, spec, batch_size=batch_size)
    return {**detector.detection_metrics(pred, boxes, spec.qc.iou_threshold), "n": int(len(images))}


def train_scenes(
    images: "np.ndarray",
    boxes: Sequence[Any],
    classes: Sequence[Any],
    spec: "ModelSpec",
    *,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = DEFAULT_SEED,
    batch_size: int = DETECTOR_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    patience: int = DEFAULT_PATIENCE,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    device: str = "cpu",
    augment: bool = True,
    on_epoch: EpochCallback | None = None,
) -> tuple["nn.Module", list[dict[str, Any]], dict[str, Any]]:
    """Train ``spec``'s detector on uint8 frames ``images`` ``[N, *spec.image_shape]`` with ``boxes`` (``[k, 4]``
    per frame, pixels) and ``classes`` (``[k]`` per frame; a one-class detector ignores them).

    Returns ``(model, history, metrics)``: the model in eval mode on ``device``; one dict per epoch
    (``train_loss``, ``train_focal``, ``train_size``, ``val_loss``, ``val_precision``, ``val_recall``, ``val_f1``,
    ``lr``, ``seconds``); and ``val_precision``, ``val_recall``, ``val_f1``, ``val_loss``, ``best_epoch``,
    ``epochs_run``, ``early_stopped``, ``train_seconds``, ``n_train``, ``n_val``, ``seed``, ``device``,
    ``threads``, ``num_parameters``. A loss that is not finite raises ``TrainError``."""
    import numpy as np
    import torch

    from tasks.model import detector
    from tasks.model.networks import count_params

    images, boxes, classes = _check_scenes(images, boxes, classes, spec)
    for name, value, ok in (("epochs", epochs, epochs >= 1), ("batch_size", batch_size, batch_size >= 1),
                            ("patience", patience, patience >= 0), ("lr", lr, lr > 0)):
        if not ok:
            raise TrainError(f"{name} must be {'> 0' if name == 'lr' else '>= 0' if name == 'patience' else '>= 1'}, "
                             f"got {value}")
    device = resolve_device(device)
    threads = default_threads()
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    stride = spec.detection.stride  # type: ignore[union-attr]
    try:
        seed_everything(seed)
        train_idx, val_idx = _split(len(images), val_fraction, seed)
        heat, size, mask = detector.scene_targets(boxes, classes, spec)
        x_all = torch.from_numpy(detector.to_detector_input(images, spec))
        targets = [torch.from_numpy(t) for t in (heat, size, mask)]
        x_tr, t_tr = x_all[train_idx].to(device), [t[train_idx].to(device) for t in targets]
        x_va, t_va = x_all[val_idx].to(device), [t[val_idx].to(device) for t in targets]

        model = detector.build_detector(spec).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
        steps = math.ceil(len(train_idx) / batch_size)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, epochs=epochs, steps_per_epoch=steps,
                                                        pct_start=0.15)
        gen = torch.Generator().manual_seed(seed)

        def val_loss_of() -> float:
            model.eval()
            total = 0.0
            with torch.no_grad():
                for start in range(0, len(x_va), 256):
                    h, ls, _ = model.forward_train(x_va[start:start + 256])
                    loss, _, _ = detector.detection_loss(h, ls, *(t[start:start + 256] for t in t_va), stride)
                    total += float(loss) * len(h)
            return total / max(len(x_va), 1)

        history: list[dict[str, Any]] = []
        best_loss, best_epoch, best_state, bad = math.inf, 0, None, 0
        early_stopped = False
        t_start = time.perf_counter()
        logger.info("training detector %s on %d scenes (%d train / %d val), %d epochs max, batch %d, lr %g, "
                    "device %s, %d threads", spec.name, len(images), len(train_idx), len(val_idx), epochs,
                    batch_size, lr, device, threads)
        for epoch in range(1, epochs + 1):
            t_epoch = time.perf_counter()
            model.train()
            order = torch.randperm(len(train_idx), generator=gen).to(device)
            sums = np.zeros(3)
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                xb = x_tr[idx]
                if augment:
                    xb = _jitter(xb, gen)
                h, ls, _ = model.forward_train(xb)
                loss, focal, sz = detector.detection_loss(h, ls, *(t[idx] for t in t_tr), stride)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                sums += np.array([float(loss.detach()), float(focal.detach()), float(sz.detach())]) * len(idx)
            if not np.all(np.isfinite(sums)):
                raise TrainError(f"training diverged at epoch {epoch} (loss {sums[0] / len(train_idx)}): lower the "
                                 f"learning rate (--lr, now {lr:g}) or check the boxes")
            val_loss = val_loss_of()
            val = evaluate_scenes(model, images[val_idx], [boxes[i] for i in val_idx], spec)
            row = {"epoch": epoch, "train_loss": sums[0] / len(train_idx), "train_focal": sums[1] / len(train_idx),
                   "train_size": sums[2] / len(train_idx), "val_loss": val_loss, "val_precision": val["precision"],
                   "val_recall": val["recall"], "val_f1": val["f1"], "lr": float(optimizer.param_groups[0]["lr"]),
                   "seconds": time.perf_counter() - t_epoch}
            history.append(row)
            improved = val_loss < best_loss - MIN_DELTA
            if improved:
                best_loss, best_epoch, bad = val_loss, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad += 1
            logger.info("epoch %d/%d loss %.4f (focal %.4f size %.4f) val_loss %.4f val P %.3f R %.3f %.1fs%s",
                        epoch, epochs, row["train_loss"], row["train_focal"], row["train_size"], val_loss,
                        val["precision"], val["recall"], row["seconds"],
                        "" if improved else f" (no improvement {bad}/{patience})")
            if on_epoch is not None:
                on_epoch(row)
            if bad > patience and epoch < epochs:
                early_stopped = True
                logger.info("early stopping after epoch %d: best val_loss %.4f at epoch %d", epoch, best_loss,
                            best_epoch)
                break
        train_seconds = time.perf_counter() - t_start
        if best_state is not None:
            model.load_state_dict(best_state)
        model.eval()
        val = evaluate_scenes(model, images[val_idx], [boxes[i] for i in val_idx], spec)
        metrics = {"val_precision": val["precision"], "val_recall": val["recall"], "val_f1": val["f1"],
                   "val_loss": best_loss if math.isfinite(best_loss) else None, "best_epoch": best_epoch,
                   "epochs_run": len(history), "early_stopped": early_stopped,
                   "train_seconds": round(train_seconds, 3), "n_train": int(len(train_idx)),
                   "n_val": int(len(val_idx)), "seed": int(seed), "device": device, "threads": threads,
                   "num_parameters": count_params(model)}
        logger.info("detector trained in %.1fs: val P %.4f R %.4f (best epoch %d of %d)", train_seconds,
                    val["precision"], val["recall"], best_epoch, len(history))
        return model, history, metrics
    finally:
        torch.set_num_threads(prev_threads)


def plot_curves(history: Sequence[dict[str, Any]], path: str | Path, best_epoch: int | None = None,
                title: str = "") -> Path:
    """Loss (train, val) and validation precision / recall / F1 per epoch as a PNG (``train.plot_curves``)."""
    from tasks.steps.train import plot_curves as _plot

    return _plot(history, path, best_epoch, title, loss_label="focal + size L1",
                 panel=("validation boxes", (("val_precision", "precision"), ("val_recall", "recall"),
                                             ("val_f1", "f1"))))


def _as_scenes(data: Any) -> tuple["np.ndarray", list[Any], list[Any]]:
    """(images, boxes, classes) of a scenes object (``.images``, ``.boxes``, ``.classes``) or such a tuple."""
    if isinstance(data, tuple):
        return data[0], list(data[1]), list(data[2])
    return data.images, list(data.boxes), list(data.classes)


def load_data(store: "Store", drop_ids: Sequence[str], spec: "ModelSpec") -> tuple[Any, Any]:
    """(training scenes of the drops, golden scenes) of the pipeline whose detector ``spec`` is; ``BadInput``
    when no pipeline has it as its detector."""
    from tasks.config import load_settings
    from tasks.contracts.errors import BadInput
    from tasks.contracts.pipeline import pipeline_of
    from tasks.steps import scenes

    pipeline = pipeline_of(spec.name, load_settings().models_dir)
    if pipeline is None:
        raise BadInput(f"detector {spec.name!r} is no pipeline's member: its scenes and golden scenes come from the "
                       f"pipeline (models/<pipeline>/pipeline.yaml members.detector: {spec.name})")
    return scenes.load_scenes(store, list(drop_ids), pipeline), scenes.golden_scenes(pipeline)


def train(
    store: "Store",
    drop_ids: Sequence[str],
    *,
    spec: "ModelSpec | None" = None,
    run_id: str | None = None,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = DEFAULT_SEED,
    batch_size: int = DETECTOR_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    patience: int = DEFAULT_PATIENCE,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    device: str = "auto",
    track: bool = True,
) -> dict[str, Any]:
    """The detector's trainer (entry point ``tasks.steps.train_detector:train``): train on the scenes of the
    drops, evaluate on the pipeline's golden scenes, export and check ONNX, upload to ``runs/<run_id>/``, log to
    ClearML. Errors as ``tasks.steps.train.train``'s (drops, ``TrainError``, ``OnnxContractError``,
    ``ParityError``); returns the result dict (also ``runs/<run_id>/result.json``)."""
    from tasks.config import load_settings

    cfg = load_settings()
    spec = spec or cfg.model_spec()
    if spec.task != "detection":
        raise TrainError(f"model {spec.name!r} is a {spec.task} model: train it with tasks.steps.train:train")
    drop_ids = resolve_drop_ids(store, drop_ids)
    device = resolve_device(device)
    run_id = run_id or default_run_id(drop_ids, seed=seed, epochs=epochs, batch_size=batch_size, lr=lr,
                                      patience=patience, val_fraction=val_fraction, model=spec.name)
    drop_content = check_drops(store, drop_ids, spec)
    t0 = time.perf_counter()
    data, golden = load_data(store, drop_ids, spec)
    logger.info("loaded %d scenes from drops %s and %d golden scenes in %.1fs", len(_as_scenes(data)[0]), drop_ids,
                len(_as_scenes(golden)[0]), time.perf_counter() - t0)
    return train_and_upload(store, drop_ids, spec=spec, run_id=run_id, train_data=data, golden=golden,
                            drop_content=drop_content, epochs=epochs, seed=seed, batch_size=batch_size, lr=lr,
                            patience=patience, val_fraction=val_fraction, device=device, track=track,
                            started=t0)


def train_and_upload(
    store: "Store",
    drop_ids: Sequence[str],
    *,
    spec: "ModelSpec",
    run_id: str,
    train_data: Any,
    golden: Any,
    drop_content: dict[str, Any] | None = None,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = DEFAULT_SEED,
    batch_size: int = DETECTOR_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    patience: int = DEFAULT_PATIENCE,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    device: str = "cpu",
    track: bool = True,
    started: float | None = None,
) -> dict[str, Any]:
    """The run itself, on scenes already loaded (``train_data``, ``golden``: objects with ``images``, ``boxes``,
    ``classes``, or ``(images, boxes, classes)`` tuples): ``train_scenes``, golden metrics, ONNX export with the
    contract and parity checks, ``model.pt``, ``metrics.json``, ``history.json``, ``curves.png`` uploaded under
    ``runs/<run_id>/``, then ``result.json`` last."""
    import torch

    from tasks.config import load_settings
    from tasks.model import detector
    from tasks.model.networks import check_onnx_contract

    cfg = load_settings()
    t0 = started if started is not None else time.perf_counter()
    drop_ids = list(drop_ids)
    run_prefix = layout.run_prefix(run_id)
    images, boxes, classes = _as_scenes(train_data)
    g_images, g_boxes, _ = _as_scenes(golden)
    params = {"drop_ids": drop_ids, "epochs": epochs, "seed": seed, "batch_size": batch_size, "lr": lr,
              "patience": patience, "val_fraction": val_fraction, "weight_decay": WEIGHT_DECAY, "device": device,
              "augment": "colour jitter", "model": spec.name, "trainer": "tasks.steps.train_detector:train"}

    tracker = _Tracker(track)
    if track:
        from tasks.adapters import clearml as tracking

        tracker.run = tracker.call(
            "start_run", tracking.start_run, cfg.clearml_project, f"train {spec.name} {run_id}",
            {k: (",".join(v) if isinstance(v, list) else v) for k, v in params.items()},
            tags=("train", spec.name, *drop_ids))
    run = tracker.run

    def on_epoch(row: dict[str, Any]) -> None:
        if run is not None:
            tracker.call("log_metrics", run.log_metrics,
                         {"loss/train": row["train_loss"], "loss/val": row["val_loss"],
                          "boxes/val_precision": row["val_precision"], "boxes/val_recall": row["val_recall"],
                          "lr/lr": row["lr"], "seconds/epoch": row["seconds"]}, row["epoch"])

    close_info: dict[str, Any] = {}
    clearml_model_id = None
    work = Path(tempfile.mkdtemp(prefix=f"train-{run_id}-", dir=_work_root(cfg.home)))
    try:
        model, history, fit = train_scenes(images, boxes, classes, spec, epochs=epochs, seed=seed,
                                           batch_size=batch_size, lr=lr, patience=patience,
                                           val_fraction=val_fraction, device=device, on_epoch=on_epoch)
        model = model.cpu().eval()
        threads = torch.get_num_threads()
        torch.set_num_threads(fit["threads"])
        try:
            gold = evaluate_scenes(model, g_images, g_boxes, spec)
        finally:
            torch.set_num_threads(threads)
        logger.info("golden scenes: precision %.4f recall %.4f f1 %.4f on %d scenes (IoU %.2f)", gold["precision"],
                    gold["recall"], gold["f1"], gold["n"], spec.qc.iou_threshold)
        onnx_path = detector.export_detector_onnx(model, work / "model.onnx", spec)
        check_onnx_contract(onnx_path, spec)
        parity = detector.check_detector_parity(model, onnx_path, spec, batch_sizes=(1, 7, 32),
                                                images=g_images[:32] if len(g_images) else None)
        detector.save_detector(model, work / "model.pt")
        metrics: dict[str, Any] = {
            "run_id": run_id, "model": spec.name, "task": spec.task, "drop_ids": drop_ids,
            "drop_content": drop_content or {},
            **{k: fit[k] for k in ("val_precision", "val_recall", "val_f1", "val_loss")},
            "golden_precision": gold["precision"], "golden_recall": gold["recall"], "golden_f1": gold["f1"],
            "golden_tp": gold["tp"], "golden_fp": gold["fp"], "golden_fn": gold["fn"],
            "golden_count_accuracy": gold["count_accuracy"], "golden_n": gold["n"],
            "iou_threshold": spec.qc.iou_threshold,
            **{k: fit[k] for k in ("epochs_run", "best_epoch", "early_stopped", "train_seconds", "n_train", "n_val",
                                   "num_parameters", "device", "threads")},
            "seed": seed, "params": params, "onnx_parity_max_abs_diff": parity, "onnx_opset": detector.OPSET,
            "onnx_sha256": sha256_file(onnx_path), "torch_version": torch.__version__,
            "embedding": "L2-normalised", "clearml_task_id": getattr(run, "task_id", None),
        }
        (work / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        (work / "history.json").write_text(json.dumps(history, indent=2))
        plot_curves(history, work / "curves.png", best_epoch=fit["best_epoch"],
                    title=f"{run_id}  golden P {gold['precision']:.3f} R {gold['recall']:.3f}")

        store.delete(run_prefix + layout.RUN_RESULT)
        for name in RUN_FILES:
            store.put_file(run_prefix + name, work / name)
        logger.info("uploaded %s to %s", ", ".join(RUN_FILES), store.uri(run_prefix))
        if run is not None:
            tracker.call("log_metrics", run.log_metrics, {
                "final/val_precision": fit["val_precision"], "final/val_recall": fit["val_recall"],
                "final/golden_precision": gold["precision"], "final/golden_recall": gold["recall"],
                "final/golden_f1": gold["f1"], "final/onnx_parity_max_abs_diff": parity}, fit["epochs_run"])
            clearml_model_id = tracker.call("upload_model", run.upload_model, onnx_path, spec.name, ("onnx", run_id))
            for name in ("metrics.json", "curves.png"):
                tracker.call("log_artifact", run.log_artifact, name, work / name)
            close_info = tracker.call("close", run.close) or {}
            run = None
    finally:
        if run is not None:
            tracker.call("close", run.close)
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "run_id": run_id, "model": spec.name, "run_prefix": run_prefix, "store_url": store.url,
        "drop_ids": drop_ids, "onnx_key": run_prefix + "model.onnx", "onnx_uri": store.uri(run_prefix + "model.onnx"),
        "model_pt_key": run_prefix + "model.pt", "metrics_key": run_prefix + "metrics.json",
        "curves_key": run_prefix + "curves.png", "history_key": run_prefix + "history.json", "metrics": metrics,
        "clearml_task_id": metrics["clearml_task_id"], "clearml_model_id": clearml_model_id,
        "clearml_offline": getattr(tracker.run, "offline", None),
        "clearml_offline_session": close_info.get("offline_session"),
        "clearml_warning": getattr(tracker.run, "warning", None), "tracking_errors": tracker.errors,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    store.put_json(run_prefix + layout.RUN_RESULT, result)
    logger.info("run %s done in %.1fs: golden P %.4f R %.4f", run_id, result["seconds"], metrics["golden_precision"],
                metrics["golden_recall"])
    return result


