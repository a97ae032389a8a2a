"""Camera-like scenes composed from real digits: the data of a pipeline (``models/<name>/pipeline.yaml``).

A scene is a frame of the detector's input size (the shipped pipeline: 96x96 RGB) holding ``data.objects``
(1 to 4) real MNIST digits at random positions and scales (``data.scale``: the digit's side as a fraction of
the frame's shorter side) on a noisy, textured colour background: a smooth colour gradient, low-frequency
blotches and pixel noise, different in every scene. Each digit is painted in a random colour that contrasts
with the background under it, its strokes' intensity as the alpha; its box is the tight box of its strokes
after scaling (float32 ``(x0, y0, x1, y1)``, right and bottom exclusive; a thin digit's box is widened about
its centre to 0.4 of its height), so IoU against the detector is measured on what is visible. Digits never overlap (boxes at least 2 px apart).

The split is fixed forever by ``data.seed``: the golden digits (``data.golden_per_class`` per class, the
mnist source's golden split of the classifier member) make the golden scenes, each golden digit used once in a
fixed order; drops are composed only from the other digits (the pool). Same seed, same scenes.

* ``compose(pipeline, digits, labels, rng, n)``: ``n`` scenes from the given digits;
* ``golden_scenes(pipeline)``: the golden scenes (cached per process);
* ``pool_scenes(pipeline, n, seed)``: ``n`` scenes of pool digits (what a drop holds);
* ``load_scenes(store, drop_ids, pipeline)``: the scenes of complete scene drops (images decoded, boxes and
  classes from the manifest);
* ``crops(scenes, pipeline)``: the ground-truth crops (``tasks.model.scene_codec.crop_boxes`` with the
  pipeline's ``crop`` section: training crops are cut exactly as the served pipeline cuts them) and their
  class ids: the classifier member's training data.
* ``row_problems(boxes, classes, ...)``: what is wrong with one manifest row (the validation suite's scene
  columns use it).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from tasks.contracts.errors import BadInput

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from tasks.adapters.storage import Store
    from tasks.contracts.pipeline import PipelineSpec
    from tasks.contracts.spec import ModelSpec

logger = logging.getLogger(__name__)

MIN_GAP = 2.0  # pixels between two digits' boxes
PLACEMENT_TRIES = 60
DIGIT_THRESHOLD = 40  # a digit pixel brighter than this is a stroke (its tight box)
MIN_CONTRAST = 90  # least luminance difference between a digit's colour and the background under it
MIN_ASPECT = 0.4  # a digit's box is at least this fraction of its height wide (thin digits: a 1)


class SceneError(BadInput, ValueError):
    """Scenes that cannot be made or read as asked."""


@dataclass
class Scenes:
    """Frames with their objects: ``images`` uint8 ``[N, H, W, 3]``; per frame ``boxes`` float32 ``[k, 4]`` and
    ``classes`` int64 ``[k]`` (the classifier's class ids); ``ids`` the frames' ids."""

    images: "np.ndarray"
    boxes: list["np.ndarray"]
    classes: list["np.ndarray"]
    ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def objects(self) -> int:
        return int(sum(len(b) for b in self.boxes))


def member_specs(pipeline: "PipelineSpec") -> dict[str, "ModelSpec"]:
    from tasks.config import load_settings
    from tasks.contracts.pipeline import member_specs as _members

    return _members(pipeline, load_settings().models_dir)


def _digits(pipeline: "PipelineSpec") -> tuple["np.ndarray", "np.ndarray", "np.ndarray", "np.ndarray"]:
    """(images uint8 [N, 28, 28], class ids [N], golden indices, pool indices) of the pipeline's digit source,
    split as its classifier member's golden set says."""
    from tasks.steps import sources

    classifier = member_specs(pipeline)["classifier"]
    # the classifier's golden_set says `source: scenes`: the digits come from the pipeline's data source, split
    # with the classifier's class names and the pipeline's golden count and seed (check_members: they agree)
    spec = classifier.model_copy(update={"golden_set": classifier.golden_set.model_copy(
        update={"source": pipeline.data.source, "per_class": pipeline.data.golden_per_class,
                "seed": pipeline.data.seed})})
    src = sources.load(spec, pipeline.data.source)
    images = src.images if src.images.ndim == 3 else src.images[..., 0]
    return images, src.labels, src.golden, src.pool


def _background(rng: "np.random.Generator", h: int, w: int) -> "np.ndarray":
    """A textured colour background: a gradient between two colours, low-frequency blotches, pixel noise."""
    import numpy as np

    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = ((xx - w / 2) * np.cos(angle) + (yy - h / 2) * np.sin(angle)) / max(h, w) + 0.5
    img = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    coarse = rng.normal(0, 1, (6, 6, 3)).astype(np.float32)
    from PIL import Image

    blotch = np.stack([np.asarray(Image.fromarray(coarse[..., c]).resize((w, h), Image.BICUBIC)) for c in range(3)], -1)
    img = img + blotch * rng.uniform(10, 30) + rng.normal(0, rng.uniform(4, 12), (h, w, 3))
    return np.clip(img, 0, 255)


def _place(rng: "np.random.Generator", size: int, h: int, w: int, taken: list[tuple[float, ...]]
           ) -> tuple[int, int] | None:
    for _ in range(PLACEMENT_TRIES):
        x, y = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
        box = (x, y, x + size, y + size)
        if all(box[0] >= t[2] + MIN_GAP or box[2] + MIN_GAP <= t[0] or box[1] >= t[3] + MIN_GAP
               or box[3] + MIN_GAP <= t[1] for t in taken):
            return x, y
    return None


def _paint(canvas: "np.ndarray", digit: "np.ndarray", x: int, y: int, size: int, rng: "np.random.Generator"
           ) -> tuple[float, float, float, float] | None:
    """Paint ``digit`` (uint8 [28, 28]) scaled to ``size`` at (x, y); its tight stroke box, None if blank."""
    import numpy as np
    from PIL import Image

    alpha = np.asarray(Image.fromarray(digit).resize((size, size), Image.BILINEAR), np.float32) / 255.0
    ys, xs = np.nonzero(alpha * 255 > DIGIT_THRESHOLD)
    if not len(xs):
        return None
    patch = canvas[y:y + size, x:x + size]
    under = patch.mean(axis=(0, 1))
    lum = float(under @ np.array([0.299, 0.587, 0.114]))
    for _ in range(20):  # a colour that stands out from what is under it
        colour = rng.uniform(0, 255, 3)
        if abs(float(colour @ np.array([0.299, 0.587, 0.114])) - lum) >= MIN_CONTRAST:
            break
    else:
        colour = np.full(3, 0.0 if lum > 127 else 255.0)
    canvas[y:y + size, x:x + size] = patch * (1 - alpha[..., None]) + colour[None, None, :] * alpha[..., None]
    x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
    # a thin digit (a 1) keeps a box at least MIN_ASPECT of its height wide, centred on its strokes, inside its square
    want = max(MIN_ASPECT * (y1 - y0), x1 - x0)
    cx = (x0 + x1) / 2
    x0, x1 = max(0.0, cx - want / 2), min(float(size), cx + want / 2)
    return float(x + x0), float(y + y0), float(x + x1), float(y + y1)


def compose(pipeline: "PipelineSpec", digits: "np.ndarray", labels: "np.ndarray", rng: "np.random.Generator",
            n: int, *, order: "np.ndarray | None" = None) -> Scenes:
    """``n`` scenes of the pipeline's frame size from ``digits`` (uint8 [M, 28, 28]) and their class ids.

    Digits are taken in ``order`` (indices into ``digits``, each once, until used up; default a random draw
    with replacement), ``data.objects`` per scene."""
    import numpy as np

    det = member_specs(pipeline)["detector"]
    h, w = det.input.height, det.input.width
    lo, hi = pipeline.data.objects
    s0, s1 = pipeline.data.scale
    side = min(h, w)
    images = np.zeros((n, h, w, 3), np.uint8)
    boxes: list[np.ndarray] = []
    classes: list[np.ndarray] = []
    cursor = 0
    for i in range(n):
        canvas = _background(rng, h, w)
        k = int(rng.integers(lo, hi + 1))
        taken: list[tuple[float, ...]] = []
        found: list[tuple[float, ...]] = []
        cls: list[int] = []
        for _ in range(k):
            if order is not None:
                if cursor >= len(order):
                    break
                j = int(order[cursor])
                cursor += 1
            else:
                j = int(rng.integers(0, len(digits)))
            size = max(8, int(round(rng.uniform(s0, s1) * side)))
            spot = _place(rng, size, h, w, taken)
            if spot is None:
                if order is not None:
                    cursor -= 1  # not placed: the next scene takes it
                break
            box = _paint(canvas, digits[j], spot[0], spot[1], size, rng)
            taken.append((spot[0], spot[1], spot[0] + size, spot[1] + size))
            if box is not None:
                found.append(box)
                cls.append(int(labels[j]))
        images[i] = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
        boxes.append(np.asarray(found, np.float32).reshape(-1, 4))
        classes.append(np.asarray(cls, np.int64))
    return Scenes(images, boxes, classes, [f"scene-{i:06d}" for i in range(n)])


_GOLDEN: dict[tuple[Any, ...], Scenes] = {}


def golden_scenes(pipeline: "PipelineSpec") -> Scenes:
    """The golden scenes: every golden digit once, in an order fixed by ``data.seed``, as JPEG-decoded frames
    (what a camera sends and the served pipeline sees). Cached per process."""
    import numpy as np

    key = (pipeline.name, pipeline.data.model_dump_json(), pipeline.crop.model_dump_json())
    hit = _GOLDEN.get(key)
    if hit is not None:
        return hit
    images, labels, golden, _ = _digits(pipeline)
    rng = np.random.default_rng(pipeline.data.seed)
    order = rng.permutation(golden)
    # enough scenes to use every golden digit (a scene takes at least one while any is left: the first digit
    # always fits an empty frame); the scenes after the last digit are left out. Placement failures make scenes
    # hold fewer digits than drawn, so the count is not the mean number per scene.
    lo = pipeline.data.objects[0]
    scenes = compose(pipeline, images, labels, rng, len(order) * (1 if lo >= 1 else 4) + 1, order=order)
    last = max((i for i, b in enumerate(scenes.boxes) if len(b)), default=-1)
    keep = [i for i, b in enumerate(scenes.boxes[:last + 1]) if len(b) or lo == 0]
    out = Scenes(_as_jpeg(scenes.images[keep], pipeline), [scenes.boxes[i] for i in keep],
                 [scenes.classes[i] for i in keep], [f"golden-{i:05d}" for i in range(len(keep))])
    _GOLDEN[key] = out
    logger.info("golden scenes of %s: %d frames, %d digits", pipeline.name, len(out), out.objects())
    return out


def pool_scenes(pipeline: "PipelineSpec", n: int, seed: int) -> Scenes:
    """``n`` scenes of pool digits only (never a golden one), drawn by ``seed``."""
    import numpy as np

    images, labels, _, pool = _digits(pipeline)
    rng = np.random.default_rng([pipeline.data.seed, int(seed)])
    return compose(pipeline, images[pool], labels[pool], rng, n)


def _as_jpeg(images: "np.ndarray", pipeline: "PipelineSpec") -> "np.ndarray":
    """The images after a JPEG round trip at ``data.jpeg_quality`` (golden frames as they travel)."""
    import numpy as np

    from tasks.model.frame_codec import encode

    from PIL import Image
    import io

    out = np.empty_like(images)
    for i, img in enumerate(images):
        out[i] = np.asarray(Image.open(io.BytesIO(encode(img, "jpeg", pipeline.data.jpeg_quality))).convert("RGB"))
    return out


def encode_jpeg(image: "np.ndarray", pipeline: "PipelineSpec") -> bytes:
    from tasks.model.frame_codec import encode

    return encode(image, "jpeg", pipeline.data.jpeg_quality)


def crops(scenes: Scenes, pipeline: "PipelineSpec") -> tuple["np.ndarray", "np.ndarray"]:
    """The ground-truth crops of ``scenes`` as the served pipeline cuts them: ``(X uint8 [M, h, w(, 3)], y [M])``."""
    import numpy as np

    from tasks.model.scene_codec import crop_boxes

    c = pipeline.crop
    parts, ys = [], []
    for img, boxes, cls in zip(scenes.images, scenes.boxes, scenes.classes):
        if len(boxes):
            parts.append(crop_boxes(img, boxes, height=c.height, width=c.width, channels=c.channels,
                                    padding=c.padding, square=c.square))
            ys.append(cls)
    shape = (0, c.height, c.width) if c.channels == 1 else (0, c.height, c.width, 3)
    if not parts:
        return np.zeros(shape, np.uint8), np.zeros(0, np.int64)
    return np.concatenate(parts), np.concatenate(ys).astype(np.int64)


# ----------------------------------------------------------------- manifest rows


def boxes_json(boxes: "np.ndarray") -> str:
    return json.dumps([[round(float(v), 2) for v in b] for b in boxes])


def classes_json(classes: "np.ndarray") -> str:
    return json.dumps([int(c) for c in classes])


def parse_row(boxes_text: Any, classes_text: Any) -> tuple["np.ndarray", "np.ndarray"]:
    """``(boxes float32 [k, 4], classes int64 [k])`` of one manifest row; ``SceneError`` naming what is wrong."""
    import numpy as np

    try:
        boxes = json.loads(boxes_text) if isinstance(boxes_text, str) else boxes_text
        classes = json.loads(classes_text) if isinstance(classes_text, str) else classes_text
        b = np.asarray(boxes, np.float32).reshape(-1, 4) if len(boxes) else np.zeros((0, 4), np.float32)
        c = np.asarray(classes, np.int64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise SceneError(f"boxes / classes are not JSON lists of [x0, y0, x1, y1] and class ids ({exc})") from None
    return b, c


#: the rules of one scene row, each a derived column of the validation suite (True: the row keeps it)
ROW_RULES = ("boxes_parse", "counts_agree", "objects_in_bounds", "boxes_positive_size", "boxes_min_size",
             "boxes_inside_frame", "classes_known")


def row_problems(boxes_text: Any, classes_text: Any, objects: Any, *, height: int, width: int, num_classes: int,
                 min_objects: int, max_objects: int, min_box_size: float) -> list[tuple[str, str]]:
    """``(rule, what is wrong)`` for one scene row (empty: nothing), rules from ``ROW_RULES``: unparsable boxes,
    counts that disagree or are out of bounds, negative or too small sizes, boxes outside the frame, unknown
    classes."""
    import numpy as np

    try:
        b, c = parse_row(boxes_text, classes_text)
    except SceneError as exc:
        return [("boxes_parse", f"unparsable: {exc}")]
    out: list[tuple[str, str]] = []
    try:
        n = int(objects)
    except (TypeError, ValueError):
        n = -1
    if len(b) != len(c) or n != len(b):
        out.append(("counts_agree", f"{len(b)} boxes, {len(c)} classes, objects {objects}: they must agree"))
    if not min_objects <= len(b) <= max_objects:
        out.append(("objects_in_bounds", f"{len(b)} objects, outside [{min_objects}, {max_objects}] (the detector's "
                                         f"detection.min_objects / max_objects)"))
    if len(b):
        neg = np.flatnonzero((b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1]))
        if len(neg):
            out.append(("boxes_positive_size", f"box {int(neg[0])} {b[neg[0]].tolist()} has a negative or zero size "
                                               "(x1 <= x0 or y1 <= y0)"))
        small = [i for i in np.flatnonzero(((b[:, 2] - b[:, 0]) < min_box_size) | ((b[:, 3] - b[:, 1]) < min_box_size))
                 if i not in set(neg.tolist())]
        if small:
            out.append(("boxes_min_size", f"box {int(small[0])} {b[small[0]].tolist()} is smaller than "
                                          f"{min_box_size:g} px (detection.min_box_size)"))
        outside = np.flatnonzero((b[:, 0] < 0) | (b[:, 1] < 0) | (b[:, 2] > width) | (b[:, 3] > height))
        if len(outside):
            out.append(("boxes_inside_frame", f"box {int(outside[0])} {b[outside[0]].tolist()} is outside the "
                                              f"{width}x{height} frame"))
    bad = [int(v) for v in c if not 0 <= int(v) < num_classes]
    if bad:
        out.append(("classes_known", f"unknown class {bad[0]} (the classifier's classes are 0..{num_classes - 1})"))
    return out


def load_scenes(store: "Store", drop_ids: Sequence[str], pipeline: "PipelineSpec") -> Scenes:
    """The scenes of complete scene drops ``drop_ids`` (images decoded RGB; boxes and classes from the manifest)."""
    import io

    import numpy as np
    from PIL import Image

    from tasks.steps import drops

    images, boxes, classes, ids = [], [], [], []
    for drop_id in drops_list(drop_ids):
        manifest = drops.read_manifest(store, drop_id)
        if "boxes" not in manifest.columns:
            raise SceneError(f"drop {drop_id!r} is not a scene drop (no boxes column): make one with "
                             f"`mlpipe drops make --model {pipeline.name}`")
        names = [f"{drops.layout.DROPS}/{drop_id}/{drops.layout.IMAGES_DIR}/{i}.jpg" for i in manifest["image_id"]]
        blobs = drops._parallel(store.get_bytes, names)
        for row, blob in zip(manifest.itertuples(index=False), blobs):
            images.append(np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")))
            b, c = parse_row(row.boxes, row.classes)
            boxes.append(b)
            classes.append(c)
            ids.append(str(row.image_id))
    if not images:
        raise SceneError(f"drops {list(drop_ids)} hold no scenes")
    return Scenes(np.stack(images), boxes, classes, ids)


def drops_list(drop_ids: Sequence[str] | str) -> list[str]:
    if isinstance(drop_ids, str):
        return [d for d in drop_ids.split(",") if d]
    return [d for part in drop_ids for d in str(part).split(",") if d]


# ----------------------------------------------------------------- scene drops

#: faults a scene drop can carry (``mlpipe drops make --model <pipeline> --fault ...``), each on 5 % of the rows
#: (at least one): a box past the frame's edge, a negative size (x1 < x0), an unknown class (10 and -1), more
#: objects than the detector's ``detection.max_objects``; and the generic ones that apply to any drop (a truncated
#: JPEG, repeated image ids, no rows, no ``sha256`` column).
SCENE_FAULTS = ("box_outside", "negative_size", "unknown_class", "too_many_objects", "corrupt_image",
                "duplicate_ids", "empty", "missing_column")
SCENE_COLUMNS = ("image_id", "sha256", "height", "width", "source", "captured_at", "boxes", "classes", "objects")


def make_scene_drop(store: "Store", drop_id: str, pipeline: "PipelineSpec", *, size: int = 2000, seed: int = 0,
                    faults: Sequence[str] = (), complete: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Write a scene drop of ``pipeline`` to ``drops/<drop_id>/`` (the drop format of docs/CONTRACTS.md with the
    scene manifest: ``boxes``, ``classes``, ``objects`` instead of ``label``) and return its summary.

    Idempotent like ``drops.make_drop``: the same arguments return the existing drop; other arguments on a
    complete drop raise ``DropExists`` unless ``overwrite``."""
    import datetime as dt
    import hashlib

    import numpy as np
    import pandas as pd

    from tasks.steps import drops

    drop_id = drops.check_drop_id(drop_id)
    if drop_id in drops.RESERVED_IDS:
        raise drops.DropError(f"drop id {drop_id!r} is reserved (it means the newest complete drop)")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise drops.DropError(f"size must be an integer >= 0, got {size!r}")
    faults = list(dict.fromkeys(faults))
    unknown = [f for f in faults if f not in SCENE_FAULTS]
    if unknown:
        raise drops.DropError(f"unknown fault(s) {unknown} for a scene drop: choose from {', '.join(SCENE_FAULTS)}")
    params = {"model": pipeline.name, "size": size, "seed": int(seed), "faults": faults, "complete": complete,
              "kind": "scenes"}
    existing = drops._existing(store, drop_id, params, overwrite)
    if existing is not None:
        return existing
    det = member_specs(pipeline)["detector"]
    n = 0 if "empty" in faults else size
    scenes = pool_scenes(pipeline, n, seed)
    blobs = [encode_jpeg(img, pipeline) for img in scenes.images]
    boxes = [b.copy() for b in scenes.boxes]
    classes = [c.copy() for c in scenes.classes]
    ids = [f"{drop_id}-{i:06d}" for i in range(n)]
    rng = np.random.default_rng([int(seed), 15])
    fault_rows: dict[str, int] = {}

    def rows() -> np.ndarray:
        return drops._fault_rows(rng, n) if n else np.zeros(0, np.int64)

    h, w = det.input.height, det.input.width
    max_obj = det.detection.max_objects
    for fault in faults:
        picked = rows()
        if fault == "box_outside":
            for r in picked:
                if len(boxes[r]):
                    boxes[r][0, 2] = w + 7.0
        elif fault == "negative_size":
            for r in picked:
                if len(boxes[r]):
                    boxes[r][0, 0], boxes[r][0, 2] = boxes[r][0, 2], boxes[r][0, 0]
        elif fault == "unknown_class":
            for k, r in enumerate(picked):
                if len(classes[r]):
                    classes[r][0] = 10 if k % 2 == 0 else -1
        elif fault == "too_many_objects":
            for r in picked:
                extra = max_obj + 1 - len(boxes[r])
                boxes[r] = np.concatenate([boxes[r], np.tile([[1, 1, 9, 9]], (extra, 1)).astype(np.float32)])
                classes[r] = np.concatenate([classes[r], np.zeros(extra, np.int64)])
        elif fault == "corrupt_image":
            for r in picked:
                blobs[r] = blobs[r][: len(blobs[r]) // 3]
        elif fault == "duplicate_ids":
            for r in picked:
                ids[r] = ids[0 if r else 1] if n > 1 else ids[r]
        else:
            continue
        fault_rows[fault] = int(len(picked))
    created = drops._now()
    offsets = np.random.default_rng([int(seed), 4]).integers(0, 3600 * 1_000_000, size=n)
    manifest = pd.DataFrame({
        "image_id": pd.Series(ids, dtype="str"),
        "sha256": pd.Series([hashlib.sha256(b).hexdigest() for b in blobs], dtype="str"),
        "height": pd.Series([h] * n, dtype="int64"),
        "width": pd.Series([w] * n, dtype="int64"),
        "source": pd.Series([f"scenes:{pipeline.data.source}"] * n, dtype="str"),
        "captured_at": pd.Series(pd.to_datetime([created - dt.timedelta(microseconds=int(o)) for o in offsets],
                                                utc=True).as_unit("us"), dtype="datetime64[us, UTC]"),
        "boxes": pd.Series([boxes_json(b) for b in boxes], dtype="str"),
        "classes": pd.Series([classes_json(c) for c in classes], dtype="str"),
        "objects": pd.Series([len(b) for b in boxes], dtype="int64"),
    })
    if "missing_column" in faults:
        manifest = manifest.drop(columns=[drops.MISSING_COLUMN])
        fault_rows["missing_column"] = n
    objects = int(sum(len(b) for b in boxes))
    counts = np.bincount(np.concatenate(classes).clip(0) if classes and objects else np.zeros(0, np.int64))
    return drops._write_drop(store, drop_id, det, manifest, drops._first_per_id(ids, blobs), created, complete, {
        "model": pipeline.name, "pipeline": True, "detector": det.name, "source": f"scenes:{pipeline.data.source}",
        "objects": objects, "object_class_counts": {str(i): int(v) for i, v in enumerate(counts)},
        "fault_rows": fault_rows, "params": params,
        "composition": f"{pipeline.data.objects[0]}..{pipeline.data.objects[1]} pool digits per scene at scale "
                       f"{pipeline.data.scale[0]:g}..{pipeline.data.scale[1]:g} on textured backgrounds, JPEG "
                       f"quality {pipeline.data.jpeg_quality}"})
