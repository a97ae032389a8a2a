"""The built-in detector: a small centre-heatmap CNN sized by a ``task: detection`` spec, its loss, its ONNX
export and the detector's ONNX contract.

Contract (``models/<detector>/spec.yaml``; every size and name from the spec, ``tasks.contracts.spec``):

* input ``spec.onnx.input``: float32 ``[N, C, H, W]`` (NCHW), the pixels after the spec's
  ``preprocessing.normalisation`` (scenes: pixel/255); the network applies its own input statistics inside;
* outputs ``spec.onnx.logits`` float32 ``[N, classes, H/stride, W/stride]``: centre-heatmap *logits*
  (``tasks.model.scene_codec.decode_centres`` takes the sigmoid); ``spec.onnx.box_size`` float32
  ``[N, 2, H/stride, W/stride]``: the box (width, height) in *input pixels* at each cell (the network predicts
  the log of the size in cells and exports ``stride * exp(.)``); ``spec.onnx.embedding`` float32
  ``[N, embedding_dim]``: the frame's embedding, the global average of the backbone's last features through a
  linear projection, **L2-normalised** (unit length: cosine-ready for Qdrant and the drift monitor);
* dynamic batch axis, opset 17 (``tasks.model.networks.OPSET``).

Training (``tasks.steps.train_detector``): CenterNet's penalty-reduced focal loss of the heatmap against
``scene_codec.centre_targets`` (Gaussian peaks of the object centres) plus an L1 loss of the log box size at
the centre cells (``detection_loss``). The embedding is on no loss: a fixed (seeded) projection of features
the heatmap trained, enough for drift and similarity.

``check_detector_contract`` is the one check of the detector's contract (``tasks.model.networks.
check_onnx_contract`` dispatches to it for ``task: detection``): names, dtypes, shapes, dynamic batch, then a
zero batch of 2; the message names the tensor and what the spec expects. ``predict_boxes`` runs a model on
uint8 frames and decodes them with the spec's ``detection`` parameters; ``detection_metrics`` scores boxes
one to one (``scene_codec.match_boxes``). ``torch`` is imported inside functions so importing this module
stays cheap.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from tasks.model.networks import COLOUR_MEAN, COLOUR_STD, MNIST_MEAN, MNIST_STD, OPSET, OnnxContractError, \
    ParityError, check_contract_tensors, onnx_session, save_torch

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch
    from torch import nn

    from tasks.contracts.spec import ModelSpec

logger = logging.getLogger(__name__)

#: CenterNet's prior: the heatmap bias starts at logit(0.1), so the focal loss starts near its balanced value
HEAT_PRIOR = 0.1
#: the focal loss exponents (CenterNet: alpha 2 on the prediction, beta 4 on the Gaussian's penalty reduction)
FOCAL_ALPHA = 2.0
FOCAL_BETA = 4.0
#: weight of the box-size L1 (log space) against the heatmap's focal loss
SIZE_WEIGHT = 1.0
#: the log box size (in cells) is clipped to this range before ``exp``: no overflow, boxes of 1/50 to 50 cells
LOG_SIZE_LIMIT = 4.0
#: the log box size in cells the size head starts at (exp(1.5) = 4.5 cells)
LOG_SIZE_INIT = 1.5


class DetectorSpecError(ValueError):
    """The spec cannot be served by the built-in detector (not detection, no box_size name, size not a multiple
    of the stride, not NCHW)."""


def _check_spec(spec: "ModelSpec") -> None:
    det, inp = spec.detection, spec.input
    problems = []
    if spec.task != "detection" or det is None:
        problems.append(f"task is {spec.task!r} (the detector needs task: detection with a detection section)")
    if not spec.onnx.box_size:
        problems.append("onnx.box_size is not set (the detector's box-size output needs a name)")
    if inp.layout != "NCHW" or not inp.fixed:
        problems.append(f"input is {inp.layout} {inp.height}x{inp.width} (the detector takes a fixed-size NCHW input)")
    elif det is not None and (inp.height % det.stride or inp.width % det.stride or det.stride not in (1, 2, 4, 8)):
        problems.append(f"input {inp.height}x{inp.width} with stride {det.stride} (the built-in detector needs a stride "
                        "of 1, 2, 4 or 8 that divides the height and width)")
    if problems:
        raise DetectorSpecError(f"model {spec.name!r} cannot use the built-in detector: " + "; ".join(problems))


def grid_shape(spec: "ModelSpec") -> tuple[int, int]:
    """``(H/stride, W/stride)``: the heatmap's cells."""
    stride = spec.detection.stride  # type: ignore[union-attr]
    return spec.input.height // stride, spec.input.width // stride  # type: ignore[operator]


def output_shapes(spec: "ModelSpec") -> dict[str, list[Any]]:
    """Output name -> expected shape (``"N"`` the batch axis) of ``spec``'s detector contract."""
    h, w = grid_shape(spec)
    return {spec.onnx.logits: ["N", spec.num_classes, h, w], spec.onnx.box_size: ["N", 2, h, w],  # type: ignore[dict-item]
            spec.onnx.embedding: ["N", spec.embedding_dim]}


def _define_class() -> type:
    import torch
    from torch import nn

    def conv(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
                nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

    class CentreNet(nn.Module):
        """Backbone to stride ``stride`` (a stride-2 conv per halving, 16 -> 32 -> 48 channels), three dilated
        3x3 convs at the heatmap's resolution (dilation 1, 2, 4: a receptive field of about 70 input pixels at
        stride 4), then two heads of conv3x3(32)-ReLU-conv1x1: the centre logits (``classes``) and the log box
        size in cells (2). For 96x96x3 at stride 4 about 0.1 M parameters and 60 M multiply-adds per frame."""

        def __init__(self, channels: int, num_classes: int, embedding_dim: int, stride: int) -> None:
            super().__init__()
            grey = channels == 1
            self.register_buffer("mean", torch.full((1, channels, 1, 1), MNIST_MEAN if grey else COLOUR_MEAN))
            self.register_buffer("std", torch.full((1, channels, 1, 1), MNIST_STD if grey else COLOUR_STD))
            self.stride = int(stride)
            halvings = int(round(math.log2(stride)))
            widths = [16, 32, 48, 48][:max(halvings, 1) + 1] if halvings else [16, 48]
            layers: list[nn.Module] = conv(channels, widths[0], stride=2 if halvings else 1)
            for i in range(1, len(widths)):
                down = 2 if i < halvings else 1
                layers += conv(widths[i - 1], widths[i], stride=down)
            width = widths[-1]
            for d in (1, 2, 4):
                layers += conv(width, width, dilation=d)
            self.backbone = nn.Sequential(*layers)
            self.heat = nn.Sequential(nn.Conv2d(width, 32, 3, padding=1), nn.ReLU(inplace=True),
                                      nn.Conv2d(32, num_classes, 1))
            self.size = nn.Sequential(nn.Conv2d(width, 32, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(32, 2, 1))
            self.embed = nn.Linear(width, embedding_dim)
            nn.init.constant_(self.heat[-1].bias, math.log(HEAT_PRIOR / (1 - HEAT_PRIOR)))
            nn.init.constant_(self.size[-1].bias, LOG_SIZE_INIT)
            nn.init.normal_(self.size[-1].weight, std=1e-3)

        def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """(heatmap logits, log box size in cells (clipped), embedding)."""
            f = self.backbone((x - self.mean) / self.std)
            log_size = torch.clamp(self.size(f), -LOG_SIZE_LIMIT, LOG_SIZE_LIMIT)
            emb = torch.nn.functional.normalize(self.embed(f.mean(dim=(2, 3))), dim=1, eps=1e-6)
            return self.heat(f), log_size, emb

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """The contract's outputs: (heatmap logits, box (width, height) in input pixels, embedding)."""
            heat, log_size, emb = self.forward_train(x)
            return heat, torch.exp(log_size) * float(self.stride), emb

    return CentreNet


_CENTRE_NET: type | None = None


def model_class() -> type:
    """The ``CentreNet`` class (defined lazily so importing this module does not import torch)."""
    global _CENTRE_NET
    if _CENTRE_NET is None:
        _CENTRE_NET = _define_class()
    return _CENTRE_NET


def build_detector(spec: "ModelSpec") -> "nn.Module":
    """A freshly initialised detector for ``spec`` (seed torch first for reproducible weights);
    ``DetectorSpecError`` for a spec it cannot serve."""
    _check_spec(spec)
    return model_class()(spec.input.channels, spec.num_classes, spec.embedding_dim, spec.detection.stride)  # type: ignore[union-attr]


def load_detector(path: str | Path, spec: "ModelSpec", device: str = "cpu") -> "nn.Module":
    """Rebuild the detector from its saved state_dict (``model.pt``, ``networks.save_torch``); eval mode."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"detector weights not found: {path} (a state_dict saved by tasks.steps.train_detector)")
    state = torch.load(str(path), map_location=device, weights_only=True)
    model = build_detector(spec)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{path} is not a state_dict of the detector of {spec.name!r}: {exc}") from exc
    return model.to(device).eval()


save_detector = save_torch


# --------------------------------------------------------------------------- targets and loss


def scene_targets(boxes: Sequence["np.ndarray"], classes: Sequence[Sequence[int]], spec: "ModelSpec"
                  ) -> tuple["np.ndarray", "np.ndarray", "np.ndarray"]:
    """``scene_codec.centre_targets`` of every frame, stacked: heat ``[N, C, h, w]``, size ``[N, 2, h, w]``
    (pixels), mask ``[N, h, w]``. A one-class detector takes every object as class 0."""
    import numpy as np

    from tasks.model.scene_codec import centre_targets

    det, inp = spec.detection, spec.input
    heats, sizes, masks = [], [], []
    for b, c in zip(boxes, classes):
        b = np.asarray(b, np.float32).reshape(-1, 4)
        c = np.zeros(len(b), np.int64) if spec.num_classes == 1 else np.asarray(c, np.int64).reshape(-1)
        heat, size, mask = centre_targets(b, c, num_classes=spec.num_classes, height=inp.height, width=inp.width,
                                          stride=det.stride)  # type: ignore[union-attr]
        heats.append(heat)
        sizes.append(size)
        masks.append(mask)
    h, w = grid_shape(spec)
    if not heats:
        return (np.zeros((0, spec.num_classes, h, w), np.float32), np.zeros((0, 2, h, w), np.float32),
                np.zeros((0, h, w), np.float32))
    return np.stack(heats), np.stack(sizes), np.stack(masks)


def detection_loss(heat_logits: "torch.Tensor", log_size: "torch.Tensor", heat_t: "torch.Tensor",
                   size_t: "torch.Tensor", mask: "torch.Tensor", stride: int,
                   size_weight: float = SIZE_WEIGHT) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """(total, focal, size) losses of a batch: CenterNet's penalty-reduced focal loss of ``heat_logits``
    against the Gaussian targets ``heat_t`` (positives where the target is 1), normalised by the number of
    objects, plus ``size_weight`` times the mean L1 between ``log_size`` (cells) and log(``size_t`` / stride)
    at the centre cells ``mask``."""
    import torch
    import torch.nn.functional as F

    pos = (heat_t >= 1.0 - 1e-4).float()
    log_p = F.logsigmoid(heat_logits)
    log_1p = F.logsigmoid(-heat_logits)
    p = torch.sigmoid(heat_logits)
    pos_loss = -((1 - p) ** FOCAL_ALPHA) * log_p * pos
    neg_loss = -((1 - heat_t) ** FOCAL_BETA) * (p ** FOCAL_ALPHA) * log_1p * (1 - pos)
    n_pos = pos.sum().clamp(min=1.0)
    focal = (pos_loss.sum() + neg_loss.sum()) / n_pos
    m = mask.unsqueeze(1)
    target = torch.log(size_t.clamp(min=1e-3) / float(stride))
    n_obj = mask.sum().clamp(min=1.0)
    size = (torch.abs(log_size - target) * m).sum() / (2 * n_obj)
    return focal + size_weight * size, focal, size


# --------------------------------------------------------------------------- export and the contract


def export_detector_onnx(model: "nn.Module", path: str | Path, spec: "ModelSpec") -> Path:
    """Export ``model`` per ``spec``'s detector contract (TorchScript exporter, opset 17, dynamic batch)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    dummy = torch.zeros(2, *spec.input_shape, dtype=torch.float32, device=device)
    names = [spec.onnx.logits, spec.onnx.box_size, spec.onnx.embedding]
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with torch.no_grad():
            torch.onnx.export(model, (dummy,), str(tmp), dynamo=False, opset_version=OPSET,
                              input_names=[spec.onnx.input], output_names=names,
                              dynamic_axes={spec.onnx.input: {0: "batch"}, **{n: {0: "batch"} for n in names}},
                              do_constant_folding=True)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
        model.train(was_training)
    return path


def check_detector_contract(onnx_path: str | Path, spec: "ModelSpec", *, session: Any = None) -> None:
    """Raise ``OnnxContractError`` (rejected) unless ``onnx_path`` is ``spec``'s detector contract.

    The declared tensors first (one input ``onnx.input`` float32 ``[N, *input_shape]``; outputs ``onnx.logits``
    ``[N, classes, H/stride, W/stride]``, ``onnx.box_size`` ``[N, 2, H/stride, W/stride]``, ``onnx.embedding``
    ``[N, embedding_dim]``, all float32, batch axis dynamic), then a zero batch of 2 and the shapes it gives.
    Every message names the tensor, what the spec expects and what the file has."""
    path = Path(onnx_path)
    where = f"{path.name} for detector {spec.name!r}"
    if spec.detection is None or not spec.onnx.box_size:
        raise OnnxContractError(f"{where}: spec {spec.name!r} declares no detection section or onnx.box_size: "
                                "it is not a detector's spec")
    check_contract_tensors(path, spec, output_shapes(spec), where=where, contract="the detector's ONNX contract",
                           session=session)


# --------------------------------------------------------------------------- inference


def to_detector_input(images: "np.ndarray", spec: "ModelSpec") -> "np.ndarray":
    """uint8 frames ``[N, H, W, C]`` (or a float contract input, passed through) -> the float32 contract input."""
    from tasks.model.networks import to_input

    return to_input(images, spec)


def predict_torch(model: "nn.Module", x: "np.ndarray", batch_size: int = 128) -> dict[str, "np.ndarray"]:
    """The contract outputs (name -> float32 array) of the PyTorch ``model`` on contract input ``x``."""
    import numpy as np
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    parts: list[list[Any]] = [[], [], []]
    try:
        with torch.no_grad():
            for start in range(0, max(len(x), 1), batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size], np.float32)).to(device)
                if not len(batch):
                    break
                for part, out in zip(parts, model(batch)):
                    part.append(out.float().cpu().numpy())
    finally:
        model.train(was_training)
    return {"heatmap": np.concatenate(parts[0]) if parts[0] else np.zeros((0,), np.float32),
            "box_size": np.concatenate(parts[1]) if parts[1] else np.zeros((0,), np.float32),
            "embedding": np.concatenate(parts[2]) if parts[2] else np.zeros((0,), np.float32)}


def run_onnx(session: Any, x: "np.ndarray", spec: "ModelSpec", batch_size: int = 128) -> dict[str, "np.ndarray"]:
    """The contract outputs of an ONNX Runtime ``session`` on contract input ``x`` (keys ``heatmap``,
    ``box_size``, ``embedding``: the roles, whatever the spec names the tensors)."""
    import numpy as np

    names = [spec.onnx.logits, spec.onnx.box_size, spec.onnx.embedding]
    parts: list[list[Any]] = [[], [], []]
    for start in range(0, len(x), batch_size):
        outs = session.run(names, {spec.onnx.input: np.ascontiguousarray(x[start:start + batch_size], np.float32)})
        for part, out in zip(parts, outs):
            part.append(np.asarray(out, np.float32))
    if not parts[0]:
        h, w = grid_shape(spec)
        return {"heatmap": np.zeros((0, spec.num_classes, h, w), np.float32),
                "box_size": np.zeros((0, 2, h, w), np.float32),
                "embedding": np.zeros((0, spec.embedding_dim), np.float32)}
    return {role: np.concatenate(p) for role, p in zip(("heatmap", "box_size", "embedding"), parts)}


def decode_outputs(outputs: dict[str, "np.ndarray"], spec: "ModelSpec") -> list[tuple["np.ndarray", "np.ndarray",
                                                                                     "np.ndarray"]]:
    """``(boxes, scores, classes)`` per frame of ``outputs`` (``heatmap``, ``box_size``), decoded with the spec's
    ``detection`` parameters (``scene_codec.decode_centres``)."""
    from tasks.model.scene_codec import decode_centres

    det, inp = spec.detection, spec.input
    return [decode_centres(h, s, stride=det.stride, threshold=det.score_threshold, max_objects=det.max_objects,  # type: ignore[union-attr]
                           window=det.peak_window, min_box_size=det.min_box_size, height=inp.height,  # type: ignore[union-attr]
                           width=inp.width)
            for h, s in zip(outputs["heatmap"], outputs["box_size"])]


def predict_boxes(session_or_fn: Any, images: "np.ndarray", spec: "ModelSpec", batch_size: int = 128
                  ) -> list[tuple["np.ndarray", "np.ndarray", "np.ndarray"]]:
    """Boxes of uint8 frames ``images`` ``[N, H, W, C]``: ``(boxes [k, 4] float32, scores [k], classes [k] int64)``
    per frame, best first. ``session_or_fn``: an ONNX Runtime session, a PyTorch detector (``nn.Module``), or a
    function of the contract input returning ``(heatmap, box_size, ...)`` or the dict of ``run_onnx``."""
    x = to_detector_input(images, spec)
    if hasattr(session_or_fn, "get_outputs") and hasattr(session_or_fn, "run"):
        outputs = run_onnx(session_or_fn, x, spec, batch_size)
    elif hasattr(session_or_fn, "state_dict"):
        outputs = predict_torch(session_or_fn, x, batch_size)
    elif callable(session_or_fn):
        outputs = _call(session_or_fn, x, batch_size)
    else:
        raise TypeError(f"predict_boxes takes an ONNX Runtime session, a torch module or a function, not "
                        f"{type(session_or_fn).__name__}")
    return decode_outputs(outputs, spec)


def _call(fn: Callable[[Any], Any], x: "np.ndarray", batch_size: int) -> dict[str, "np.ndarray"]:
    import numpy as np

    heats, sizes = [], []
    for start in range(0, len(x), batch_size):
        out = fn(x[start:start + batch_size])
        if isinstance(out, dict):
            heats.append(np.asarray(out["heatmap"], np.float32))
            sizes.append(np.asarray(out["box_size"], np.float32))
        else:
            heats.append(np.asarray(out[0], np.float32))
            sizes.append(np.asarray(out[1], np.float32))
    if not heats:
        return {"heatmap": np.zeros((0, 1, 1, 1), np.float32), "box_size": np.zeros((0, 2, 1, 1), np.float32)}
    return {"heatmap": np.concatenate(heats), "box_size": np.concatenate(sizes)}


def detection_metrics(pred_list: Sequence[tuple[Any, Any, Any]], gt_boxes_list: Sequence[Any],
                      iou: float = 0.5) -> dict[str, Any]:
    """Precision, recall, F1, ``tp``/``fp``/``fn`` and ``count_accuracy`` (the share of frames with as many
    boxes as the truth) of ``pred_list`` (``(boxes, scores, classes)`` per frame) against ``gt_boxes_list``
    (``[k, 4]`` per frame), one-to-one matches at IoU >= ``iou`` (``scene_codec.match_boxes``). With nothing
    predicted precision is 1 only if there was nothing to find (else 0); recall is 1 when there was nothing to
    find."""
    import numpy as np

    from tasks.model.scene_codec import match_boxes

    if len(pred_list) != len(gt_boxes_list):
        raise ValueError(f"{len(pred_list)} predicted frames for {len(gt_boxes_list)} ground-truth frames")
    tp = fp = fn = right = 0
    for (boxes, scores, _), gt in zip(pred_list, gt_boxes_list):
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        gt = np.asarray(gt, np.float32).reshape(-1, 4)
        pairs = match_boxes(boxes, scores, gt, iou)
        tp += len(pairs)
        fp += len(boxes) - len(pairs)
        fn += len(gt) - len(pairs)
        right += int(len(boxes) == len(gt))
    # nothing predicted: precision is 1 only when there was nothing to find (else nothing was shown right: 0)
    precision = tp / (tp + fp) if tp + fp else (1.0 if tp + fn == 0 else 0.0)
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1), "tp": int(tp), "fp": int(fp),
            "fn": int(fn), "count_accuracy": float(right / len(gt_boxes_list)) if len(gt_boxes_list) else 1.0}


# --------------------------------------------------------------------------- parity


def parity_inputs(n: int, spec: "ModelSpec", seed: int = 1234) -> "np.ndarray":
    """Deterministic random uint8 frames of ``spec`` as contract input (parity checks)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *spec.image_shape), dtype=np.uint8)
    return to_detector_input(images, spec)


def check_detector_parity(model: "nn.Module", onnx_path: str | Path, spec: "ModelSpec",
                          batch_sizes: Sequence[int] = (1, 7, 32), images: "np.ndarray | None" = None,
                          tolerance: float | None = None) -> float:
    """Max |PyTorch - ONNX Runtime| over the three outputs for each batch size; ``ParityError`` above
    ``tolerance`` (default the spec's ``qc.max_parity_diff``) or on a wrong shape. ``images``: uint8 frames or
    a float contract input (default deterministic random frames); repeated when shorter than a batch.
    The box sizes are compared relative to the frame's larger side (they are pixels, the others are O(1))."""
    import numpy as np

    tolerance = float(spec.qc.max_parity_diff if tolerance is None else tolerance)
    need = max(batch_sizes)
    x = parity_inputs(need, spec) if images is None else to_detector_input(np.asarray(images), spec)
    if len(x) < need:
        x = np.concatenate([x] * -(-need // max(len(x), 1)))
    sess = onnx_session(onnx_path)
    scale = float(max(spec.input.height or 1, spec.input.width or 1))
    want = output_shapes(spec)
    worst = 0.0
    for bs in batch_sizes:
        xb = np.ascontiguousarray(x[:bs], np.float32)
        t = predict_torch(model, xb)
        o = run_onnx(sess, xb, spec)
        for role, name in zip(("heatmap", "box_size", "embedding"), want):
            if list(o[role].shape) != [bs, *want[name][1:]]:
                raise ParityError(f"ONNX output {name!r} is {list(o[role].shape)} for batch {bs}, expected "
                                  f"{[bs, *want[name][1:]]}")
            diff = float(np.max(np.abs(t[role] - o[role])))
            if role == "box_size":
                diff /= scale
            worst = max(worst, diff)
            if diff > tolerance:
                raise ParityError(f"ONNX/PyTorch mismatch of {name!r} at batch {bs}: max abs diff {diff:.3g} > "
                                  f"{tolerance:g} ({onnx_path})")
    logger.info("detector ONNX parity ok for batches %s: max abs diff %.3g", list(batch_sizes), worst)
    return worst
