"""The pipeline's box arithmetic, one copy for both sides: Triton's pipeline model and the host (training, QC,
the drop validator, tests).

Like ``frame_codec.py`` this file imports only the standard library, NumPy and Pillow (never ``tasks``): the
model-repository renderer copies it next to the pipeline model, so the server decodes, crops and reads out
exactly as the host does. Parameters are plain values taken from the specs
(``tasks.contracts.spec.DetectionSpec``, ``tasks.contracts.pipeline.CropSpec``).

Boxes are float32 ``[k, 4]`` rows ``(x0, y0, x1, y1)`` in frame pixels, x0 < x1 and y0 < y1, the right and
bottom edges exclusive (a box of a whole 96x96 frame is ``(0, 0, 96, 96)``).

* ``decode_centres``: a detector's outputs for one frame (centre-heatmap logits ``[C, h, w]``, box sizes
  ``[2, h, w]`` = width, height in pixels) to boxes, scores and classes: the sigmoid of the heatmap, its local
  peaks (a max-pool of ``window``), those above ``threshold``, the ``max_objects`` best, each a box of the
  predicted size centred on its cell, clipped to the frame;
* ``centre_targets``: the training targets of the same contract (a Gaussian peak per object, the size at
  the centre cell, the mask of those cells);
* ``crop_boxes``: each box grown by ``padding`` (and made square), cut out and resized (bilinear) to the
  classifier's input; converted to grayscale for a one-channel classifier;
* ``box_iou``, ``match_boxes``: IoU and greedy one-to-one matching by score (QC's precision and recall);
* ``readout``: the labels left to right.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

EMPTY_BOXES = np.zeros((0, 4), np.float32)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.clip(x, -60.0, 60.0)))).astype(np.float32)


def _local_peaks(heat: np.ndarray, window: int) -> np.ndarray:
    """Mask of the cells of ``heat`` [C, h, w] that are the maximum of their ``window`` neighbourhood."""
    if window <= 1:
        return np.ones(heat.shape, bool)
    r = window // 2
    padded = np.pad(heat, ((0, 0), (r, r), (r, r)), mode="constant", constant_values=-np.inf)
    c, h, w = heat.shape
    best = np.full(heat.shape, -np.inf, heat.dtype)
    for dy in range(window):
        for dx in range(window):
            np.maximum(best, padded[:, dy:dy + h, dx:dx + w], out=best)
    return heat >= best


def decode_centres(heat_logits: np.ndarray, box_size: np.ndarray, *, stride: int, threshold: float,
                   max_objects: int, window: int = 3, min_box_size: float = 1.0, height: int | None = None,
                   width: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(boxes [k, 4] float32, scores [k] float32, classes [k] int64)`` of one frame, best score first,
    ``k <= max_objects``; ``height`` / ``width`` (the frame's; default the heatmap's times ``stride``) clip."""
    heat = sigmoid(np.asarray(heat_logits, np.float32))
    if heat.ndim != 3:
        raise ValueError(f"heatmap must be [C, h, w] (got shape {heat.shape})")
    c, h, w = heat.shape
    size = np.asarray(box_size, np.float32)
    if size.shape != (2, h, w):
        raise ValueError(f"box sizes must be [2, {h}, {w}] (got shape {size.shape})")
    H = height if height is not None else h * stride
    W = width if width is not None else w * stride
    keep = _local_peaks(heat, window) & (heat > threshold)
    cls, ys, xs = np.nonzero(keep)
    scores = heat[cls, ys, xs]
    order = np.argsort(-scores, kind="stable")
    boxes, out_scores, out_classes = [], [], []
    for i in order:
        if len(boxes) >= max_objects:
            break
        y, x = int(ys[i]), int(xs[i])
        bw, bh = float(max(size[0, y, x], 0.0)), float(max(size[1, y, x], 0.0))
        cx, cy = (x + 0.5) * stride, (y + 0.5) * stride
        x0, x1 = max(0.0, cx - bw / 2), min(float(W), cx + bw / 2)
        y0, y1 = max(0.0, cy - bh / 2), min(float(H), cy + bh / 2)
        if x1 - x0 < min_box_size or y1 - y0 < min_box_size:
            continue
        boxes.append((x0, y0, x1, y1))
        out_scores.append(float(scores[i]))
        out_classes.append(int(cls[i]))
    if not boxes:
        return EMPTY_BOXES.copy(), np.zeros(0, np.float32), np.zeros(0, np.int64)
    return (np.asarray(boxes, np.float32), np.asarray(out_scores, np.float32),
            np.asarray(out_classes, np.int64))


def centre_targets(boxes: np.ndarray, classes: Sequence[int], *, num_classes: int, height: int, width: int,
                   stride: int, sigma_scale: float = 0.15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training targets of one frame: ``heat [C, h, w]`` (a Gaussian of each object's centre, peak 1 at its
    cell, sigma ``sigma_scale`` times the box side in cells, at least 0.5), ``size [2, h, w]`` (the box's
    width and height at its centre cell) and ``mask [h, w]`` (1 at those cells)."""
    h, w = height // stride, width // stride
    heat = np.zeros((num_classes, h, w), np.float32)
    size = np.zeros((2, h, w), np.float32)
    mask = np.zeros((h, w), np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for (x0, y0, x1, y1), c in zip(np.asarray(boxes, np.float32).reshape(-1, 4), classes):
        bw, bh = x1 - x0, y1 - y0
        cx = min(max(int((x0 + x1) / 2 // stride), 0), w - 1)
        cy = min(max(int((y0 + y1) / 2 // stride), 0), h - 1)
        sigma = max(0.5, sigma_scale * max(bw, bh) / stride)
        g = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma * sigma))
        np.maximum(heat[int(c)], g, out=heat[int(c)])
        size[:, cy, cx] = (bw, bh)
        mask[cy, cx] = 1.0
    return heat, size, mask


def to_gray(image: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W]`` of an ``[H, W]`` or ``[H, W, 3]`` image (ITU-R 601-2 luma, as Pillow's ``L``)."""
    if image.ndim == 2:
        return image
    rgb = image.astype(np.float32)
    return np.clip(rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114 + 0.5, 0, 255).astype(np.uint8)


def crop_window(box: Sequence[float], *, frame_height: int, frame_width: int, padding: float,
                square: bool) -> tuple[int, int, int, int]:
    """The integer window ``(x0, y0, x1, y1)`` a box is cut from: grown by ``padding`` of its size on every
    side, squared around its centre (``square``), clipped to the frame, at least one pixel."""
    x0, y0, x1, y1 = (float(v) for v in box)
    bw, bh = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
    if square:
        bw = bh = max(bw, bh)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    hw, hh = bw * (1 + 2 * padding) / 2, bh * (1 + 2 * padding) / 2
    wx0, wy0 = int(round(max(0.0, cx - hw))), int(round(max(0.0, cy - hh)))
    wx1, wy1 = int(round(min(float(frame_width), cx + hw))), int(round(min(float(frame_height), cy + hh)))
    return wx0, wy0, max(wx1, wx0 + 1), max(wy1, wy0 + 1)


def crop_boxes(image: np.ndarray, boxes: np.ndarray, *, height: int, width: int, channels: int,
               padding: float = 0.1, square: bool = True) -> np.ndarray:
    """uint8 crops of ``image`` (``[H, W]`` or ``[H, W, 3]``) at ``boxes``: ``[k, height, width]`` for one
    channel, ``[k, height, width, 3]`` for three."""
    from PIL import Image

    shape = (0, height, width) if channels == 1 else (0, height, width, 3)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if not len(boxes):
        return np.zeros(shape, np.uint8)
    src = to_gray(image) if channels == 1 else (image if image.ndim == 3 else np.stack([image] * 3, -1))
    H, W = src.shape[:2]
    out = np.empty((len(boxes),) + shape[1:], np.uint8)
    for i, box in enumerate(boxes):
        x0, y0, x1, y1 = crop_window(box, frame_height=H, frame_width=W, padding=padding, square=square)
        patch = Image.fromarray(np.ascontiguousarray(src[y0:y1, x0:x1]))
        out[i] = np.asarray(patch.resize((width, height), Image.BILINEAR))
    return out


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU ``[n, m]`` of boxes ``a [n, 4]`` and ``b [m, 4]``."""
    a = np.asarray(a, np.float32).reshape(-1, 4)
    b = np.asarray(b, np.float32).reshape(-1, 4)
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)), np.float32)
    ix0 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy0 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix1 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0).astype(np.float32)


def match_boxes(pred: np.ndarray, scores: np.ndarray, gt: np.ndarray, iou_threshold: float = 0.5
                ) -> list[tuple[int, int]]:
    """Greedy one-to-one matches ``(pred index, gt index)``: predictions by descending score, each to the
    unmatched ground-truth box of highest IoU, when that IoU is at least ``iou_threshold``."""
    iou = box_iou(pred, gt)
    taken: set[int] = set()
    pairs: list[tuple[int, int]] = []
    for p in np.argsort(-np.asarray(scores, np.float32).reshape(-1), kind="stable"):
        if not iou.shape[1]:
            break
        row = iou[p].copy()
        for g in taken:
            row[g] = -1.0
        g = int(np.argmax(row))
        if row[g] >= iou_threshold:
            taken.add(g)
            pairs.append((int(p), g))
    return pairs


def readout(boxes: np.ndarray, labels: Sequence[str], keep: Sequence[bool] | None = None) -> str:
    """The labels of ``boxes`` ordered by box centre x (left to right), joined; ``keep`` leaves boxes out."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    centres = (boxes[:, 0] + boxes[:, 2]) / 2
    order = np.argsort(centres, kind="stable")
    return "".join(str(labels[i]) for i in order if keep is None or keep[i])
