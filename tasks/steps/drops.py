"""Data drops of a model: generate them from its data source, import your own, list them, read them.

Every drop belongs to one model (``models/<name>/spec.yaml``, ``tasks.contracts.spec.ModelSpec``) and
lives at ``drops/<drop_id>/`` in the object store (docs/CONTRACTS.md)::

    images/<image_id>.<ext>  the spec's image encoding (``spec.image_encoding``): ``.png`` (digits:
                             8-bit grayscale 28x28, white digit on black) or ``.jpg`` (shapes: RGB 48x48)
    manifest.parquet         image_id, label (the class id), sha256, height, width, source, captured_at
    drop.json                the generator's summary (model, parameters, class counts, faults)
    _SUCCESS                 {"drop_id", "rows", "created_at"}, written LAST

A drop without ``_SUCCESS`` is incomplete and is never read: ``read_manifest`` and
``load_arrays`` raise ``DropIncomplete`` for it. Functions that take ``spec=None`` use the
configured model (``MLPIPE_MODEL_NAME``, ``tasks.config.Settings.model_spec``).

Data source
-----------
``tasks.steps.sources``, chosen by the spec's ``golden_set.source`` (``mnist`` for digits, ``shapes``
for shapes, ``folder:<path>`` for your own images) or ``--source``. The golden set
(``golden_set(spec)``: ``golden_set.per_class`` images per class, fixed by ``golden_set.seed``) is
used by training and QC for evaluation and never put in a drop; drops sample the rest (the pool).

Augmentation (why two drops never share image bytes)
----------------------------------------------------
Each drop samples the pool with its seed (without replacement while a class has
enough images, otherwise with replacement) and every image gets a deterministic
per-image augmentation drawn from the seed: a rotation of -10..+10 degrees, a
shift of -2..+2 px in x and y (the uncovered corners black for grayscale, the mean
border colour for colour images), and a +-1 intensity jitter on the non-zero pixel
values (every channel). The jitter alone has more than 3^100 variants per image, so
two drops with different seeds share an exact image (sha256) with negligible
probability; within one drop every hash is checked and a colliding image is
re-drawn, so the hashes of a drop without faults are unique even when sampling with
replacement. Same seed + same options = the same images, labels and hashes.

Faults (``--fault``, repeatable) make drops that validation must reject:
``bad_label`` (labels = the number of classes, and -1), ``wrong_shape`` (images 4 px larger than
the spec's), ``duplicate_ids`` (repeated image_id), ``corrupt_image`` (truncated image bytes),
``missing_column`` (no ``sha256`` column), ``empty`` (zero rows), ``skewed`` (class 0 at 60 %,
class 1 at 1 %), ``seen_before`` (10 % of the images copied byte for byte from an
earlier drop: ``seen_from``, default the newest complete drop whose validation
passed, else the newest complete drop), ``future_timestamps`` (``captured_at`` 1..30
days after the drop was made), ``ancient_timestamps`` (``captured_at`` at the Unix
epoch or in the 1970s-80s, before any real capture), ``blank_images`` (constant
images, each one grey level: no signal, unique bytes) and ``wrong_format`` (the other
encoding under the spec's file name: JPEG bytes as ``.png`` for a PNG model, PNG bytes as
``.jpg`` for a JPEG model; the manifest hash matching them). Every row-level fault touches
5 % of the rows (at least one).
``--label-noise F`` flips a fraction F of the labels to another class (a valid
drop that trains a worse model).

Bring your own data: ``mlpipe drops import --model NAME --from DIR`` makes a proper drop of the
images under ``DIR/<class name>/`` (PNG or JPEG, the spec's size and channels).

Scene drops (a pipeline's, ``models/<pipeline>/pipeline.yaml``)
--------------------------------------------------------------
``mlpipe drops make --model <pipeline>`` writes a scene drop (``tasks.steps.scenes.make_scene_drop``): camera-like
frames of the detector member's input size (JPEG at ``data.jpeg_quality``, ``images/<image_id>.jpg``) composed of
pool digits only (never a golden one). ``drop.json`` records ``model: <pipeline>``, ``pipeline: true``,
``detector``, ``objects`` and ``object_class_counts``. The manifest has no ``label`` column (a frame has no single
class; its objects carry the classes); its columns are ``image_id``, ``sha256``, ``height``, ``width``, ``source``
(``scenes:<data.source>``), ``captured_at`` as above, plus:

``boxes``    string: JSON ``[[x0, y0, x1, y1], ...]``, frame pixels, float, right/bottom exclusive, the tight box
             of each digit's strokes (``[]`` for a frame without digits)
``classes``  string: JSON ``[c, ...]``, the classifier member's class id of each box, in the same order
``objects``  int64: the number of boxes (= ``len(boxes)`` = ``len(classes)``)

A scene drop is each member's drop (``check_drop_model``); ``load_arrays`` for the classifier member returns the
ground-truth crops (``tasks.steps.scenes.crops``), the detector reads it with ``tasks.steps.scenes.load_scenes``.
Faults of scene drops (``tasks.steps.scenes.SCENE_FAULTS``): ``box_outside``, ``negative_size``,
``unknown_class`` (10 and -1), ``too_many_objects`` (``detection.max_objects`` + 1), and ``corrupt_image``,
``duplicate_ids``, ``empty``, ``missing_column`` as above.

CLI: ``mlpipe drops {make,import,list,show} --help``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import logging
import re
import sys
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from tasks.contracts import layout
from tasks.contracts.errors import BadInput, Rejected, is_transient, run_cli
from tasks.logs import setup_logging
from tasks.contracts.results import write_result_json
from tasks.contracts.files import sha256_bytes
from tasks.steps import sources as sources_lib
from tasks.steps.scenes import SCENE_FAULTS

if TYPE_CHECKING:  # heavy imports stay out of module import time
    import numpy as np
    import pandas as pd

    from tasks.adapters.storage import Store
    from tasks.contracts.spec import ModelSpec

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("image_id", "label", "sha256", "height", "width", "source", "captured_at")
SOURCES = sources_lib.SOURCES  # the built-in sources (``--source``; also ``digits``, ``folder:<path>``)
FAULTS = ("bad_label", "wrong_shape", "duplicate_ids", "corrupt_image", "missing_column", "empty",
          "skewed", "seen_before", "future_timestamps", "ancient_timestamps", "blank_images", "wrong_format")
FAULT_FRACTION = 0.05  # rows touched by a row-level fault (at least one)
SEEN_BEFORE_FRACTION = 0.10
SKEWED_SHARES = (0.60, 0.01)  # skewed: class 0 and class 1; the rest share what is left equally
#: file extension of a drop image per encoding (``spec.image_encoding``)
IMAGE_EXTENSIONS = {"png": "png", "jpeg": "jpg"}
MISSING_COLUMN = "sha256"
WRONG_SHAPE_PAD = 2  # wrong_shape: images padded by this on every side (the spec's size + 4)
WRONG_FORMAT_JPEG_QUALITY = 95
DROP_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
RESERVED_IDS = {"latest"}
IO_THREADS = 8


# ---------------------------------------------------------------- errors

class DropError(BadInput, ValueError):
    """A drop that cannot be used (unknown, incomplete, unreadable, bad content, bad options): bad input, final."""


class DropNotFound(DropError):
    """No drop with this id in the store."""


class DropIncomplete(DropError):
    """The drop has no ``_SUCCESS`` marker: it is still being written (or was abandoned)."""


class DropUnreadable(DropError):
    """The drop is complete but its manifest or an image cannot be parsed."""


class DropExists(DropError):
    """A complete drop with this id already exists with different parameters."""


class DropNotValidated(Rejected, ValueError):
    """The drop has no passing validation result bound to its content: it must not be trained on or
    registered (validate it first). Rejected: final, not retried."""


class DropChanged(Rejected, ValueError):
    """The drop's bytes (manifest or images) differ from what its passing validation checked.
    Rejected: final until the drop is validated again."""


# ---------------------------------------------------------------- keys

# The keys themselves belong to tasks/contracts/layout.py; these names stay for the callers.
_prefix = layout.drop_prefix
manifest_key = layout.manifest_key
success_key = layout.success_key
summary_key = layout.summary_key


def image_name(image_id: str, spec: "ModelSpec") -> str:
    """The file name of an image below ``images/``: ``<image_id>.<ext>`` for the spec's image encoding."""
    return f"{image_id}.{IMAGE_EXTENSIONS[spec.image_encoding]}"


def image_key(drop_id: str, image_id: str, spec: "ModelSpec") -> str:
    """``drops/<drop_id>/images/<image_id>.<ext>`` (``.png`` or ``.jpg``: the spec's image encoding)."""
    return layout.image_key(drop_id, image_id, IMAGE_EXTENSIONS[spec.image_encoding])


def _spec(spec: "ModelSpec | None") -> "ModelSpec":
    """``spec``, or the configured model's (``MLPIPE_MODEL_NAME``) when None."""
    if spec is not None:
        return spec
    from tasks.config import load_settings

    return load_settings().model_spec()


def check_drop_id(drop_id: str) -> str:
    if not isinstance(drop_id, str) or not DROP_ID_RE.match(drop_id):
        raise DropError(
            f"invalid drop id {drop_id!r}: use 1-128 characters from A-Z a-z 0-9 . _ - "
            "starting with a letter or digit"
        )
    return drop_id


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def default_drop_id() -> str:
    return "drop-" + _now().strftime("%Y%m%dT%H%M%S%fZ")


# ---------------------------------------------------------------- source data

def golden_set(spec: "ModelSpec | None" = None) -> tuple["np.ndarray", "np.ndarray"]:
    """The model's fixed held-out golden set, never in any drop: ``golden_set.per_class`` images per class
    of its ``golden_set.source``, drawn with ``golden_set.seed`` (``tasks.steps.sources``).

    Returns ``(X uint8 [N, *spec.image_shape], y int64 [N])`` (class ids), identical on every call and
    machine; for digits the 1,000 real MNIST digits it always was.
    """
    spec = _spec(spec)
    if spec.golden_set.source == "scenes":  # a pipeline member: the crops of the pipeline's golden scenes
        from tasks.config import load_settings
        from tasks.contracts.pipeline import pipeline_of
        from tasks.steps import scenes

        pipeline = pipeline_of(spec.name, load_settings().models_dir)
        if pipeline is None or spec.task != "classification":
            raise DropError(f"model {spec.name!r} draws its golden set from scenes: "
                            + ("it is no pipeline's member (models/<pipeline>/pipeline.yaml members)" if pipeline is
                               None else "a detector's golden set is tasks.steps.scenes.golden_scenes(pipeline)"))
        return scenes.crops(scenes.golden_scenes(pipeline), pipeline)
    return sources_lib.load(spec).golden_set()


# ---------------------------------------------------------------- options

def parse_class_mix(text: str) -> dict[int, float]:
    """``"0:0.5,1:0.05,2:0.05"`` -> ``{0: 0.5, 1: 0.05, 2: 0.05}`` (classes left out get none)."""
    mix: dict[int, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition(":")
        try:
            if not sep:
                raise ValueError
            mix[int(key)] = float(value)
        except ValueError:
            raise DropError(f"bad class mix entry {part!r}: expected CLASS:WEIGHT such as 0:0.5") from None
    return mix


def _normalise_mix(mix: dict[int, float] | None, spec: "ModelSpec") -> dict[int, float] | None:
    """``mix`` checked against the spec's class ids and scaled to sum to 1 (classes without weight left out)."""
    if mix is None:
        return None
    mix = {int(k): float(v) for k, v in mix.items()}
    bad = [k for k in mix if not 0 <= k < spec.num_classes]
    if bad:
        raise DropError(f"class mix names classes {bad} outside the class ids 0..{spec.num_classes - 1} of model "
                        f"{spec.name!r}")
    if any(v < 0 or v != v for v in mix.values()):
        raise DropError(f"class mix weights must be >= 0, got {mix}")
    total = sum(mix.values())
    if total <= 0:
        raise DropError("class mix weights sum to 0: give at least one class a positive weight")
    return {k: mix[k] / total for k in sorted(mix) if mix[k] > 0}


def _skewed_mix(num_classes: int) -> dict[int, float]:
    """The ``skewed`` fault's class mix: class 0 at 60 %, class 1 at 1 %, the others share the rest."""
    rest = 1.0 - sum(SKEWED_SHARES)
    return {0: SKEWED_SHARES[0], 1: SKEWED_SHARES[1],
            **{c: rest / (num_classes - 2) for c in range(2, num_classes)}}


def _class_counts(size: int, mix: dict[int, float] | None, num_classes: int) -> dict[int, int]:
    """Exact per-class counts for ``size`` rows (largest remainder rounding)."""
    weights = mix or {c: 1.0 / num_classes for c in range(num_classes)}
    raw = {c: size * w for c, w in weights.items()}
    counts = {c: int(v) for c, v in raw.items()}
    left = size - sum(counts.values())
    for c in sorted(raw, key=lambda c: (-(raw[c] - counts[c]), c))[:left]:
        counts[c] += 1
    return {c: counts.get(c, 0) for c in range(num_classes)}


def _sample_plan(size: int, seed: int, src: "sources_lib.Source", class_mix: dict[int, float] | None,
                 spec: "ModelSpec") -> "np.ndarray":
    """Source indices for a drop: per class, without replacement while enough images exist."""
    import numpy as np

    y, pool_idx = src.labels, src.pool
    rng = np.random.default_rng([seed, 0])
    chosen = []
    for c, n in _class_counts(size, class_mix, spec.num_classes).items():
        if n == 0:
            continue
        avail = pool_idx[y[pool_idx] == c]
        if len(avail) == 0:
            raise DropError(f"source {src.name!r} has no images of class {spec.class_name(c)!r} (id {c}) for "
                            f"model {spec.name!r}")
        reps = [rng.permutation(avail) for _ in range(-(-n // len(avail)))]
        chosen.append(np.concatenate(reps)[:n])  # each pool image used as evenly as possible
    if not chosen:
        return np.zeros(0, dtype=np.int64)
    plan = np.concatenate(chosen)
    return plan[rng.permutation(len(plan))]


# ---------------------------------------------------------------- images

def _augment(img: "np.ndarray", rng: "np.random.Generator") -> "np.ndarray":
    """Rotate -10..10 deg, shift -2..2 px, +-1 jitter of the non-zero values; ``[H, W]`` or ``[H, W, 3]``."""
    import numpy as np
    from PIL import Image

    angle = float(rng.uniform(-10.0, 10.0))
    dx, dy = (int(v) for v in rng.integers(-2, 3, size=2))
    if img.ndim == 2:  # grayscale: black corners (the MNIST background)
        im, fill = Image.fromarray(img, mode="L"), 0
    else:  # colour: corners in the mean colour of the border, not a black wedge
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        im, fill = Image.fromarray(img, mode="RGB"), tuple(int(v) for v in border.mean(axis=0).round())
    out = np.asarray(im.rotate(angle, resample=Image.Resampling.BILINEAR, translate=(dx, dy), fillcolor=fill),
                     dtype=np.int16)
    jitter = rng.integers(-1, 2, size=out.shape).astype(np.int16)
    out = np.where(out > 0, out + jitter, 0)
    return np.clip(out, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- store helpers

def _parallel(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    if len(items) < 16:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
        return list(pool.map(fn, items))


def _delete_prefix(store: "Store", prefix: str) -> int:
    keys = store.list(prefix)
    _parallel(store.delete, keys)
    return len(keys)


def is_complete(store: "Store", drop_id: str) -> bool:
    """True when ``drops/<drop_id>/_SUCCESS`` exists."""
    return store.exists(success_key(drop_id))


def created_at(store: "Store", drop_id: str) -> str:
    """When the drop was made: ``created_at`` of its ``_SUCCESS`` marker, else of ``drop.json``; "" when
    neither can be read (such a drop sorts by id only). The one definition used for ordering drops
    (``list_drops``) and by the scheduled-retrain plan (plugins/mlpipe_triggers.py)."""
    for key in (success_key(drop_id), summary_key(drop_id)):
        try:
            return str(store.get_json(key).get("created_at") or "")
        except Exception as exc:  # noqa: BLE001 - missing or bad marker: sort by id only
            if is_transient(exc):
                raise  # an outage: retried, never a silently different order ("latest")
            continue
    return ""


def list_drops(store: "Store", complete_only: bool = True) -> list[str]:
    """Drop ids, oldest first (by ``created_at`` in ``_SUCCESS``, then id)."""
    ids = [d for d in store.list_dirs("drops") if DROP_ID_RE.match(d)]
    if complete_only:
        ids = [d for d in ids if is_complete(store, d)]
    return sorted(ids, key=lambda d: (created_at(store, d), d))


def latest_drop(store: "Store", exclude: Iterable[str] = ()) -> str:
    """The newest complete drop; DropNotFound when there is none."""
    skip = set(exclude)
    ids = [d for d in list_drops(store) if d not in skip]
    if not ids:
        raise DropNotFound(f"no complete drop in {store.url}/drops: make one with `mlpipe drops make`")
    return ids[-1]


def _default_seen_from(store: "Store", drop_id: str) -> str:
    """The newest complete drop whose validation passed, else the newest complete drop."""
    ids = [d for d in list_drops(store) if d != drop_id]
    for d in reversed(ids):
        try:
            if store.get_json(layout.validation_result_key(d)).get("success"):
                return d
        except Exception as exc:  # noqa: BLE001 - not validated (yet)
            if is_transient(exc):
                raise
            continue
    return latest_drop(store, exclude=[drop_id])


def resolve_drop_id(store: "Store", drop_id: str) -> str:
    """``latest`` -> the newest complete drop id; any other id is checked for syntax."""
    if drop_id == "latest":
        return latest_drop(store)
    return check_drop_id(drop_id)


def _require_complete(store: "Store", drop_id: str) -> None:
    if is_complete(store, drop_id):
        return
    if store.list(_prefix(drop_id)):
        raise DropIncomplete(
            f"drop {drop_id!r} is incomplete (no _SUCCESS marker at {store.uri(success_key(drop_id))}): "
            "it is still being written or was abandoned; wait for it, or re-create it with "
            f"`mlpipe drops make --drop-id {drop_id} --overwrite`"
        )
    raise DropNotFound(
        f"drop {drop_id!r} not found in {store.url}/drops; "
        "see `mlpipe drops list` for the complete drops"
    )


def read_manifest(store: "Store", drop_id: str) -> "pd.DataFrame":
    """The manifest of a complete drop as a DataFrame (columns as stored, not checked).

    Raises DropNotFound (unknown id), DropIncomplete (no ``_SUCCESS``) or
    DropUnreadable (manifest missing or not Parquet).
    """
    import pandas as pd

    from tasks.adapters.storage import ObjectNotFound

    drop_id = resolve_drop_id(store, drop_id)
    _require_complete(store, drop_id)
    key = manifest_key(drop_id)
    try:
        raw = store.get_bytes(key)
    except ObjectNotFound:
        raise DropUnreadable(
            f"drop {drop_id!r} has a _SUCCESS marker but no manifest at {store.uri(key)}: "
            "the producer must re-deliver the drop"
        ) from None
    try:
        return pd.read_parquet(io.BytesIO(raw))
    except Exception as exc:  # noqa: BLE001 - any parse error means the same to the reader
        raise DropUnreadable(
            f"drop {drop_id!r}: manifest {store.uri(key)} is not readable Parquet ({type(exc).__name__}: {exc}); "
            "the producer must re-deliver the drop"
        ) from None


def decode_image(data: bytes) -> "np.ndarray":
    """Image bytes (any format Pillow reads, any size) -> uint8 ``[H, W]`` (grayscale) or ``[H, W, C]``, as
    stored: no conversion. ``ValueError`` when the bytes do not decode."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return np.asarray(im, dtype=np.uint8).copy()
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad bytes
        raise ValueError(f"not a decodable image ({type(exc).__name__}: {exc})") from None


def shape_text(img: "np.ndarray") -> str:
    """``HxW`` for a grayscale image, ``HxWxC`` otherwise (how messages name an image's shape)."""
    return "x".join(str(d) for d in img.shape)


def drop_model(store: "Store", drop_id: str) -> str | None:
    """The model a drop was made for (``drop.json``'s ``model``); None when the drop does not say (a drop
    delivered by an external producer without ``drop.json``, or one made before drops recorded it)."""
    from tasks.adapters.storage import ObjectNotFound

    try:
        model = store.get_json(summary_key(drop_id)).get("model")
    except ObjectNotFound:
        return None
    except ValueError:  # an unreadable drop.json says nothing
        return None
    return str(model) if model else None


def made_for_model(made_for: str | None, model: str) -> bool:
    """A drop made (or validated) for ``made_for`` serves ``model``: the same model, or a pipeline that lists
    ``model`` as a member (a scene drop trains both the detector and the classifier); None says nothing."""
    if made_for is None or made_for == model:
        return True
    from tasks.config import load_settings
    from tasks.contracts.pipeline import is_pipeline, load_pipeline, pipeline_path

    models_dir = load_settings().models_dir
    if not is_pipeline(made_for, models_dir):
        return False
    try:
        return model in load_pipeline(pipeline_path(made_for, models_dir)).member_names.values()
    except ValueError:
        return False


def check_drop_model(store: "Store", drop_id: str, spec: "ModelSpec") -> None:
    """``DropError`` when the drop records another model than ``spec``'s (a drop that says nothing passes; a
    pipeline's scene drop serves its members)."""
    made_for = drop_model(store, drop_id)
    if not made_for_model(made_for, spec.name):
        raise DropError(f"drop {drop_id!r} was made for model {made_for!r}, not {spec.name!r}: use it with "
                        f"--model {made_for}, or make a drop for {spec.name!r}")


def load_arrays(store: "Store", drop_ids: Sequence[str], spec: "ModelSpec | None" = None
                ) -> tuple["np.ndarray", "np.ndarray"]:
    """Images and labels of complete drops of ``spec``'s model: ``(X uint8 [N, *spec.image_shape], y int64 [N])``.

    Raises DropNotFound / DropIncomplete / DropUnreadable for a drop that cannot be read, DropError for a
    drop made for another model, and DropUnreadable naming the image for an undecodable image, a shape
    other than the spec's (size and channels) or a label outside the spec's class ids (validate drops
    first).
    """
    import numpy as np

    from tasks.adapters.storage import ObjectNotFound

    spec = _spec(spec)
    shape = tuple(spec.image_shape)
    if isinstance(drop_ids, str):
        drop_ids = [drop_ids]
    xs, ys = [], []
    for drop_id in drop_ids:
        drop_id = resolve_drop_id(store, drop_id)
        df = read_manifest(store, drop_id)
        check_drop_model(store, drop_id, spec)
        if "boxes" in df.columns:  # a pipeline's scene drop read for its classifier member: the objects' crops
            X, y = _scene_crops(store, drop_id, spec)
            xs.append(X)
            ys.append(y)
            continue
        missing = [c for c in ("image_id", "label") if c not in df.columns]
        if missing:
            raise DropUnreadable(f"drop {drop_id!r}: manifest has no column(s) {missing}; validate the drop first")
        ids = [str(i) for i in df["image_id"]]
        labels = np.asarray(df["label"])
        bad = [(i, lab) for i, lab in zip(ids, labels) if not (0 <= int(lab) < spec.num_classes)]
        if bad:
            raise DropUnreadable(
                f"drop {drop_id!r}: image {bad[0][0]} has label {bad[0][1]} outside the class ids "
                f"0..{spec.num_classes - 1} of model {spec.name!r} ({len(bad)} such rows); validate the drop first")

        def _load(image_id: str, drop_id: str = drop_id) -> np.ndarray:
            key = image_key(drop_id, image_id, spec)
            try:
                img = decode_image(store.get_bytes(key))
            except ObjectNotFound:
                raise DropUnreadable(f"drop {drop_id!r}: image {image_id} is missing ({store.uri(key)})") from None
            except ValueError as exc:
                raise DropUnreadable(f"drop {drop_id!r}: image {image_id} ({store.uri(key)}): {exc}") from None
            if img.shape != shape:
                raise DropUnreadable(
                    f"drop {drop_id!r}: image {image_id} has shape {shape_text(img)}, model {spec.name!r} expects "
                    f"{'x'.join(map(str, shape))} ({store.uri(key)})")
            return img

        imgs = _parallel(_load, ids)
        xs.append(np.stack(imgs) if imgs else np.zeros((0, *shape), np.uint8))
        ys.append(labels.astype(np.int64))
        logger.info("loaded drop %s: %d images", drop_id, len(ids))
    if not xs:
        return np.zeros((0, *shape), np.uint8), np.zeros(0, np.int64)
    return np.concatenate(xs).astype(np.uint8), np.concatenate(ys).astype(np.int64)


def _scene_crops(store: "Store", drop_id: str, spec: "ModelSpec") -> tuple["np.ndarray", "np.ndarray"]:
    """The ground-truth crops of scene drop ``drop_id`` for classifier ``spec`` (a member of the drop's pipeline),
    cut as the served pipeline cuts them (``tasks.steps.scenes.crops``)."""
    from tasks.config import load_settings
    from tasks.contracts.pipeline import find_pipeline
    from tasks.steps import scenes

    pipeline = find_pipeline(drop_model(store, drop_id) or "", load_settings().models_dir)
    if spec.task != "classification":
        raise DropError(f"drop {drop_id!r} is a scene drop: a {spec.task} model reads it with "
                        "tasks.steps.scenes.load_scenes, not load_arrays")
    X, y = scenes.crops(scenes.load_scenes(store, [drop_id], pipeline), pipeline)
    bad = [int(c) for c in y if not 0 <= int(c) < spec.num_classes]
    if bad:
        raise DropUnreadable(f"drop {drop_id!r}: an object has class {bad[0]} outside the class ids "
                             f"0..{spec.num_classes - 1} of model {spec.name!r}; validate the drop first")
    logger.info("loaded scene drop %s for %s: %d crops", drop_id, spec.name, len(y))
    return X, y


# ---------------------------------------------------------------- content binding

def images_digest(hashes: dict[str, str]) -> str:
    """One sha256 over the image set: the sorted ``<name>\t<sha256 of its bytes>`` lines (name =
    the key below ``images/``), so a changed, added or removed image changes it."""
    h = hashlib.sha256()
    for name in sorted(hashes):
        h.update(f"{name}\t{hashes[name]}\n".encode())
    return h.hexdigest()


def content_digest(store: "Store", drop_id: str, known: dict[str, str] | None = None,
                   manifest_bytes: bytes | None = None) -> dict[str, Any]:
    """What a drop's bytes are now: ``manifest_sha256``, ``images_sha256``, ``image_count`` and
    ``images`` (name below ``images/`` -> sha256 of the bytes) over every object under
    ``drops/<id>/images/``, whatever the manifest says. ``known`` (name -> sha256) skips re-reading
    images whose bytes the caller has just hashed; ``manifest_bytes`` likewise the manifest."""
    from tasks.adapters.storage import ObjectNotFound

    if manifest_bytes is None:
        try:
            manifest_bytes = store.get_bytes(manifest_key(drop_id))
        except ObjectNotFound:
            raise DropUnreadable(f"drop {drop_id!r} has no manifest at {store.uri(manifest_key(drop_id))}") from None
    prefix = layout.images_prefix(drop_id)
    names = [k[len(prefix):] for k in store.list(prefix)]
    known = known or {}
    todo = [n for n in names if n not in known]

    def _hash(name: str) -> str | None:
        try:
            return sha256_bytes(store.get_bytes(prefix + name))
        except ObjectNotFound:  # deleted while we listed: not part of the set
            return None

    hashes = {n: known[n] for n in names if n in known}
    hashes.update({n: h for n, h in zip(todo, _parallel(_hash, todo)) if h is not None})
    return {"manifest_sha256": sha256_bytes(manifest_bytes), "images_sha256": images_digest(hashes),
            "image_count": len(hashes), "images": hashes}


def content_summary(content: dict[str, Any]) -> dict[str, Any]:
    """The digests of ``content_digest`` without the per-image table (for lineage and results)."""
    return {k: content[k] for k in ("manifest_sha256", "images_sha256", "image_count")}


def bind_validation(store: "Store", drop_id: str, result: dict[str, Any], content: dict[str, Any]) -> dict[str, Any]:
    """Store a validation result bound to the content it checked: the per-image hashes in
    ``validation/content.json``, then ``validation/result.json`` (last) with the digests under
    ``content``. Returns the stored result."""
    store.put_json(layout.validation_content_key(drop_id), content)
    body = {**result, "content": content_summary(content)}
    store.put_json(layout.validation_result_key(drop_id), body)
    return body


def _sample_names(names: Sequence[str], n: int = 3) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def verify_validated(store: "Store", drop_id: str, *, require: bool = True,
                     model: str | None = None) -> dict[str, Any] | None:
    """Check that the drop is what its passing validation checked; return the validated digests
    (``content_summary`` + ``validated_at``, ``result_uri``, ``report_uri``, ``model``).

    Raises ``DropChanged`` naming the drop and what changed (manifest replaced, N images changed,
    added or removed) and ``DropNotValidated`` for a failed validation, one that recorded no
    digests, or (with ``model``) one made for another model than ``model`` (a result that records
    no model, from before validations recorded it, is accepted). Without a validation result:
    ``DropNotValidated`` when ``require``, else None.
    """
    from tasks.adapters.storage import ObjectNotFound

    rkey = layout.validation_result_key(drop_id)
    try:
        result = store.get_json(rkey)
    except ObjectNotFound:
        if not require:
            return None
        raise DropNotValidated(f"drop {drop_id!r} has no validation result ({store.uri(rkey)}): validate it first "
                               f"(mlpipe validate --drop-id {drop_id})") from None
    if not result.get("success"):
        raise DropNotValidated(f"drop {drop_id!r} failed validation ({store.uri(rkey)}, report "
                               f"{result.get('report_uri')}): it is never trained on or registered")
    validated_for = result.get("model")
    if model is not None and not made_for_model(validated_for, model):
        raise DropNotValidated(f"drop {drop_id!r} was validated for model {validated_for!r}, not {model!r} "
                               f"({store.uri(rkey)}): a drop is only trained on or registered for the model whose "
                               f"spec it passed; validate it for {model!r} (mlpipe validate --model {model} "
                               f"--drop-id {drop_id}) or use --model {validated_for}")
    expected = result.get("content") or {}
    if not expected.get("manifest_sha256") or not expected.get("images_sha256"):
        raise DropNotValidated(f"drop {drop_id!r}: its validation result ({store.uri(rkey)}) records no content "
                               f"digests, so what was validated is unknown: validate it again "
                               f"(mlpipe validate --drop-id {drop_id})")
    now = content_digest(store, drop_id)
    changes: list[str] = []
    if now["manifest_sha256"] != expected["manifest_sha256"]:
        changes.append(f"manifest replaced (sha256 {expected['manifest_sha256'][:12]}... validated, "
                       f"{now['manifest_sha256'][:12]}... now)")
    if now["images_sha256"] != expected["images_sha256"]:
        try:
            before: dict[str, str] = store.get_json(layout.validation_content_key(drop_id))["images"]
        except (ObjectNotFound, KeyError, TypeError):
            before = {}
        if before and images_digest(before) == expected["images_sha256"]:
            changed = [n for n in now["images"] if n in before and before[n] != now["images"][n]]
            added = [n for n in now["images"] if n not in before]
            removed = [n for n in before if n not in now["images"]]
            for what, names in (("changed", changed), ("added", added), ("removed", removed)):
                if names:
                    changes.append(f"{len(names)} image{'s' if len(names) != 1 else ''} {what} "
                                   f"({_sample_names(names)})")
        else:
            changes.append(f"images changed ({expected.get('image_count')} images validated, "
                           f"{now['image_count']} now; the per-image record is missing)")
    if changes:
        raise DropChanged(f"drop {drop_id!r} changed since its passing validation at {result.get('validated_at')}: "
                          + "; ".join(changes) + f"; validate it again (mlpipe validate --drop-id {drop_id})")
    return {**content_summary(now), "validated_at": result.get("validated_at"), "result_uri": store.uri(rkey),
            "report_uri": result.get("report_uri"), "model": validated_for}


# ---------------------------------------------------------------- generator

def _params(size: int, seed: int, source: str, class_mix: dict[int, float] | None, label_noise: float,
            faults: Sequence[str], seen_from: str | None, complete: bool) -> dict[str, Any]:
    return {
        "size": size, "seed": seed, "source": source,
        "class_mix": None if class_mix is None else {str(k): round(v, 6) for k, v in class_mix.items()},
        "label_noise": label_noise, "faults": list(faults), "seen_from": seen_from, "complete": complete,
    }


def _fault_rows(rng: "np.random.Generator", n: int, fraction: float = FAULT_FRACTION) -> "np.ndarray":
    import numpy as np

    if n == 0:
        return np.zeros(0, dtype=np.int64)
    k = min(n, max(1, int(round(n * fraction))))
    return np.sort(rng.choice(n, size=k, replace=False))


def seed_for(drop_id: str) -> int:
    """The CLI's default seed: stable for one drop id, different across ids (32 bits of its sha256)."""
    return int(hashlib.sha256(drop_id.encode()).hexdigest()[:8], 16)


def make_drop(
    store: "Store",
    drop_id: str,
    *,
    size: int = 2000,
    seed: int = 0,
    source: str | None = None,
    spec: "ModelSpec | None" = None,
    class_mix: dict[int, float] | None = None,
    label_noise: float = 0.0,
    faults: Sequence[str] = (),
    seen_from: str | None = None,
    complete: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a drop of ``spec``'s model to ``drops/<drop_id>/`` and return its summary.

    ``source`` (default the spec's ``golden_set.source``; ``tasks.steps.sources``) gives the images, encoded
    with ``tasks.model.frames.encode_frame`` in the spec's image encoding. Images first, then the manifest
    and ``drop.json``, then ``_SUCCESS`` last (unless ``complete=False``). Re-running with the same
    arguments returns the existing drop's summary (idempotent); a complete drop with other parameters
    raises DropExists unless ``overwrite=True``. An incomplete leftover with the same id is replaced.
    """
    import numpy as np

    from tasks.model.frames import encode_frame

    t0 = time.monotonic()
    spec = _spec(spec)
    drop_id = check_drop_id(drop_id)
    if drop_id in RESERVED_IDS:
        raise DropError(f"drop id {drop_id!r} is reserved (it means the newest complete drop)")
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 0:
        raise DropError(f"size must be an integer >= 0, got {size!r}")
    size = int(size)
    seed = int(seed)
    if seed < 0:
        raise DropError(f"seed must be >= 0, got {seed}")
    if source is None and spec.golden_set.source == "scenes":  # a pipeline member: its drops are the pipeline's
        from tasks.config import load_settings
        from tasks.contracts.pipeline import pipeline_of

        pipeline = pipeline_of(spec.name, load_settings().models_dir)
        raise DropError(f"model {spec.name!r} is trained on its pipeline's scene drops: make one with `mlpipe drops "
                        f"make --model {pipeline.name if pipeline else '<pipeline>'}` (or pass --source)")
    source = sources_lib.canonical(source or spec.golden_set.source)
    if not 0.0 <= float(label_noise) <= 1.0:
        raise DropError(f"label noise must be a fraction in [0, 1], got {label_noise}")
    label_noise = float(label_noise)
    faults = list(dict.fromkeys(faults))
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        raise DropError(f"unknown fault(s) {unknown}: choose from {', '.join(FAULTS)}")
    class_mix = _normalise_mix(class_mix, spec)
    if "skewed" in faults:
        if class_mix is not None:
            logger.warning("fault 'skewed' replaces the given class mix %s", class_mix)
        class_mix = _skewed_mix(spec.num_classes)
    if seen_from is not None and "seen_before" not in faults:
        raise DropError("--seen-from only applies with --fault seen_before")
    if "seen_before" in faults:
        seen_from = _default_seen_from(store, drop_id) if seen_from is None else check_drop_id(seen_from)
        if seen_from == drop_id:
            raise DropError("--seen-from must name another drop than the one being made")
        _require_complete(store, seen_from)

    params = {**_params(size, seed, source, class_mix, label_noise, faults, seen_from, complete), "model": spec.name}
    existing = _existing(store, drop_id, params, overwrite)
    if existing is not None:
        return existing

    # ---- sample + augment (deterministic by seed)
    src_data = sources_lib.load(spec, source)
    X, y = src_data.images, src_data.labels
    n = 0 if "empty" in faults else size
    plan = _sample_plan(n, seed, src_data, class_mix, spec)
    rng_aug = np.random.default_rng([seed, 1])
    labels = y[plan].astype(np.int64).copy()
    blobs: list[bytes] = []
    hashes: list[str] = []
    seen: set[str] = set()
    for i, src in enumerate(plan):
        for _attempt in range(100):
            data = encode_frame(_augment(X[src], rng_aug), spec)
            digest = sha256_bytes(data)
            if digest not in seen:
                break
        else:  # pragma: no cover - 3^100 variants per image
            raise DropError(f"could not make a unique augmentation for source image {src}")
        seen.add(digest)
        blobs.append(data)
        hashes.append(digest)
        if (i + 1) % 1000 == 0:
            logger.info("drop %s: generated %d/%d images", drop_id, i + 1, n)
    heights = [spec.input.height] * n
    widths = [spec.input.width] * n
    row_sources = [src_data.name] * n
    ids = [f"{drop_id}-{i:06d}" for i in range(n)]

    # ---- label noise: a valid but worse drop
    rng_noise = np.random.default_rng([seed, 2])
    noisy = 0
    if label_noise > 0 and n:
        noisy = int(round(n * label_noise))
        rows = rng_noise.choice(n, size=noisy, replace=False)
        labels[rows] = (labels[rows] + rng_noise.integers(1, spec.num_classes, size=noisy)) % spec.num_classes

    # ---- faults
    fault_rows: dict[str, int] = {}

    def frng(name: str) -> np.random.Generator:
        return np.random.default_rng([seed, 3, FAULTS.index(name)])

    def replace(r: int, data: bytes) -> None:
        blobs[r], hashes[r] = data, sha256_bytes(data)

    if "seen_before" in faults and n:
        assert seen_from is not None
        earlier = read_manifest(store, seen_from)
        need = [c for c in ("image_id", "label") if c not in earlier.columns]
        if need or len(earlier) == 0:
            raise DropError(f"drop {seen_from!r} cannot be reused for seen_before (no rows or columns {need})")
        check_drop_model(store, seen_from, spec)
        rng = frng("seen_before")
        rows = _fault_rows(rng, n, SEEN_BEFORE_FRACTION)
        picks = rng.choice(len(earlier), size=len(rows), replace=len(rows) > len(earlier))
        for r, p in zip(rows, picks):
            src_row = earlier.iloc[int(p)]
            replace(r, store.get_bytes(image_key(seen_from, str(src_row["image_id"]), spec)))
            labels[r] = int(src_row["label"])
            if "source" in earlier.columns:
                row_sources[r] = str(src_row["source"])
        fault_rows["seen_before"] = len(rows)
    if "bad_label" in faults and n:
        rows = _fault_rows(frng("bad_label"), n)
        labels[rows] = np.where(np.arange(len(rows)) % 2 == 0, spec.num_classes, -1)
        fault_rows["bad_label"] = len(rows)
    if "wrong_shape" in faults and n:
        rows = _fault_rows(frng("wrong_shape"), n)
        for r in rows:
            img = decode_image(blobs[r])
            big = np.pad(img, [(WRONG_SHAPE_PAD, WRONG_SHAPE_PAD)] * 2 + [(0, 0)] * (img.ndim - 2))  # still centred
            replace(r, encode_frame(big, spec))
            heights[r], widths[r] = big.shape[:2]
        fault_rows["wrong_shape"] = len(rows)
    if "corrupt_image" in faults and n:
        rows = _fault_rows(frng("corrupt_image"), n)
        for r in rows:
            replace(r, blobs[r][: len(blobs[r]) // 2])  # a truncated upload: header intact, data cut
        fault_rows["corrupt_image"] = len(rows)
    if "duplicate_ids" in faults and n >= 2:
        rng = frng("duplicate_ids")
        rows = _fault_rows(rng, n)
        others = np.setdiff1d(np.arange(n), rows)
        if len(others) == 0:
            others = rows[:1]
            rows = rows[1:]
        targets = rng.choice(others, size=len(rows), replace=True)
        for r, t in zip(rows, targets):
            ids[r] = ids[t]
        fault_rows["duplicate_ids"] = len(rows)
    if "blank_images" in faults and n:
        rows = _fault_rows(frng("blank_images"), n)
        for k, r in enumerate(rows):  # constant images, each a different grey: no signal, unique bytes
            replace(r, encode_frame(np.full(spec.image_shape, k % 256, dtype=np.uint8), spec))
        fault_rows["blank_images"] = len(rows)
    if "wrong_format" in faults and n:
        rows = _fault_rows(frng("wrong_format"), n)
        other = _other_encoding(spec)
        for r in rows:  # the other encoding under the spec's file name; the manifest hash matches the bytes
            replace(r, _encode_as(decode_image(blobs[r]), other))
        fault_rows["wrong_format"] = len(rows)

    created = _now()
    offsets = np.random.default_rng([seed, 4]).integers(0, 3600 * 1_000_000, size=n)
    stamps = [created - dt.timedelta(microseconds=int(o)) for o in offsets]
    if "future_timestamps" in faults and n:
        rows = _fault_rows(frng("future_timestamps"), n)
        for k, r in enumerate(rows):  # 1..30 days ahead of the clock: cannot be true
            stamps[r] = created + dt.timedelta(days=1 + k % 30)
        fault_rows["future_timestamps"] = len(rows)
    if "ancient_timestamps" in faults and n:
        rows = _fault_rows(frng("ancient_timestamps"), n)
        for k, r in enumerate(rows):  # the Unix epoch (an unset clock) and the 1990s: before any capture
            stamps[r] = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(days=3650 * (k % 3))
        fault_rows["ancient_timestamps"] = len(rows)
    manifest = _manifest_frame(ids, labels, hashes, heights, widths, row_sources, stamps)
    if "missing_column" in faults:
        manifest = manifest.drop(columns=[MISSING_COLUMN])
        fault_rows["missing_column"] = n

    summary = _write_drop(store, drop_id, spec, manifest, _first_per_id(ids, blobs), created, complete, {
                              "source": src_data.name,
                              "label_noise_rows": int(noisy),
                              "fault_rows": fault_rows,
                              "params": params,
                              "augmentation": "rotate U(-10,10) deg, shift -2..2 px, +-1 jitter on non-zero "
                                              "pixel values (per image, by seed)",
                          })
    logger.info("drop %s (model %s): %d rows, %s, in %.1fs", drop_id, spec.name, n,
                "complete" if complete else "INCOMPLETE (no _SUCCESS)", time.monotonic() - t0)
    return summary


def _first_per_id(ids: Sequence[str], blobs: Sequence[bytes]) -> dict[str, bytes]:
    """image id -> bytes, the first image keeping a repeated id's name (the ``duplicate_ids`` fault)."""
    out: dict[str, bytes] = {}
    for image_id, data in zip(ids, blobs):
        out.setdefault(image_id, data)
    return out


def _other_encoding(spec: "ModelSpec") -> str:
    """The ``wrong_format`` fault's encoding: JPEG for a PNG model, PNG for a JPEG one."""
    return "jpeg" if spec.image_encoding == "png" else "png"


def _encode_as(image: "np.ndarray", encoding: str) -> bytes:
    """``image`` in ``encoding`` (``tasks.model.frame_codec.encode``; JPEG at quality 95)."""
    from tasks.model import frame_codec

    return frame_codec.encode(image, encoding, quality=WRONG_FORMAT_JPEG_QUALITY)


def _existing(store: "Store", drop_id: str, params: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The summary of a complete drop made with ``params`` (nothing to do), else None once any earlier
    attempt is removed; ``DropExists`` for a complete drop with other parameters (unless ``overwrite``)."""
    if is_complete(store, drop_id) and not overwrite:
        try:
            existing = store.get_json(summary_key(drop_id))
        except Exception as exc:  # noqa: BLE001
            if is_transient(exc):
                raise
            existing = {}
        if existing.get("params") == params:
            logger.info("drop %s already exists with the same parameters: nothing to do", drop_id)
            return existing
        raise DropExists(
            f"drop {drop_id!r} already exists in {store.url} with other parameters "
            f"({existing.get('params')}); choose another --drop-id or pass --overwrite")
    removed = _delete_prefix(store, _prefix(drop_id))
    if removed:
        logger.info("drop %s: removed %d objects of an earlier (incomplete or overwritten) attempt", drop_id, removed)
    return None


def _manifest_frame(ids: Sequence[str], labels: Any, hashes: Sequence[str], heights: Sequence[int],
                    widths: Sequence[int], row_sources: Sequence[str], stamps: Sequence[dt.datetime]) -> "pd.DataFrame":
    """The manifest with the contract's columns and dtypes (``MANIFEST_COLUMNS``)."""
    import pandas as pd

    captured = pd.to_datetime(list(stamps), utc=True).as_unit("us")
    return pd.DataFrame({
        "image_id": pd.Series(list(ids), dtype="str"),
        "label": pd.Series(labels, dtype="int64"),
        "sha256": pd.Series(list(hashes), dtype="str"),
        "height": pd.Series(list(heights), dtype="int64"),
        "width": pd.Series(list(widths), dtype="int64"),
        "source": pd.Series(list(row_sources), dtype="str"),
        "captured_at": pd.Series(captured, dtype="datetime64[us, UTC]"),
    })


def _write_drop(store: "Store", drop_id: str, spec: "ModelSpec", manifest: "pd.DataFrame", images: dict[str, bytes],
                created: dt.datetime, complete: bool, extra: dict[str, Any]) -> dict[str, Any]:
    """Write images, then the manifest, then ``drop.json`` (with ``extra``), then ``_SUCCESS`` last (when
    ``complete``); returns the summary."""
    import pandas as pd

    from tasks.model.frames import content_type_of

    ctype = content_type_of(spec.image_encoding)
    _parallel(lambda job: store.put_bytes(image_key(drop_id, job[0], spec), job[1], content_type=ctype),
              list(images.items()))
    logger.info("drop %s: wrote %d images", drop_id, len(images))
    buf = io.BytesIO()
    manifest.to_parquet(buf, index=False)
    manifest_bytes = buf.getvalue()
    store.put_bytes(manifest_key(drop_id), manifest_bytes)
    n = len(manifest)
    counts = ({str(k): int(v) for k, v in sorted(pd.Series(manifest["label"]).value_counts().items())}
              if "label" in manifest.columns else {})
    summary: dict[str, Any] = {
        "drop_id": drop_id,
        "uri": store.uri(_prefix(drop_id).rstrip("/")),
        "model": spec.name,
        "rows": int(n),
        "images_written": len(images),
        "image_encoding": spec.image_encoding,
        "class_counts": counts,
        "manifest_sha256": sha256_bytes(manifest_bytes),
        "created_at": created.isoformat(),
        "complete": complete,
        **extra,
    }
    store.put_json(summary_key(drop_id), summary)
    if complete:
        store.put_json(success_key(drop_id), {"drop_id": drop_id, "rows": int(n), "created_at": created.isoformat()})
    return summary


def import_drop(store: "Store", drop_id: str, folder: str | Path, *, spec: "ModelSpec | None" = None,
                overwrite: bool = False) -> dict[str, Any]:
    """Make a drop of ``spec``'s model from your own images: ``folder/<class name>/*.png|jpg|jpeg``.

    Every image must have the spec's size and channels (``tasks.steps.sources.read_image_file``: a
    ``SourceError`` naming the file otherwise). A file already in the spec's image encoding keeps its
    bytes; any other is re-encoded (``encode_frame``). Rows are ordered by class, then file name; the
    manifest's ``source`` is ``import:<folder name>`` and ``captured_at`` the file's modification time.
    Same folder content = the same drop (idempotent; other content raises DropExists unless
    ``overwrite``).
    """
    from tasks.model import frame_codec
    from tasks.model.frames import encode_frame

    t0 = time.monotonic()
    spec = _spec(spec)
    drop_id = check_drop_id(drop_id)
    if drop_id in RESERVED_IDS:
        raise DropError(f"drop id {drop_id!r} is reserved (it means the newest complete drop)")
    root = Path(folder).expanduser().resolve()
    files = sources_lib.class_folders(root, spec)
    ids, labels, blobs, hashes, stamps = [], [], [], [], []
    for cls, paths in files.items():
        for path in paths:
            img = sources_lib.read_image_file(path, spec)
            data = path.read_bytes()
            if frame_codec.sniff(data) != spec.image_encoding:
                data = encode_frame(img, spec)
            ids.append(f"{drop_id}-{len(ids):06d}")
            labels.append(cls)
            blobs.append(data)
            hashes.append(sha256_bytes(data))
            stamps.append(dt.datetime.fromtimestamp(path.stat().st_mtime, tz=dt.timezone.utc))
    params = {"imported_from": str(root), "content_sha256": sha256_bytes("".join(hashes).encode()),
              "model": spec.name}
    existing = _existing(store, drop_id, params, overwrite)
    if existing is not None:
        return existing
    n = len(ids)
    manifest = _manifest_frame(ids, labels, hashes, [spec.input.height] * n, [spec.input.width] * n,
                               [f"import:{root.name}"] * n, stamps)
    summary = _write_drop(store, drop_id, spec, manifest, dict(zip(ids, blobs)), _now(), True,
                          {"source": f"import:{root}", "params": params})
    logger.info("drop %s (model %s): imported %d images from %s in %.1fs", drop_id, spec.name, n, root,
                time.monotonic() - t0)
    return summary


def show_drop(store: "Store", drop_id: str) -> dict[str, Any]:
    """What a reader needs to know about a drop: marker, summary, manifest shape, validation."""
    drop_id = resolve_drop_id(store, drop_id)
    if not store.list(_prefix(drop_id)):
        raise DropNotFound(f"drop {drop_id!r} not found in {store.url}/drops; "
                           "see `mlpipe drops list --all`")
    info: dict[str, Any] = {"drop_id": drop_id, "uri": store.uri(_prefix(drop_id).rstrip("/")),
                            "complete": is_complete(store, drop_id)}
    if store.exists(summary_key(drop_id)):
        info["summary"] = store.get_json(summary_key(drop_id))
    if info["complete"]:
        info["marker"] = store.get_json(success_key(drop_id))
        try:
            df = read_manifest(store, drop_id)
            info["manifest"] = {"rows": len(df), "columns": {c: str(t) for c, t in df.dtypes.items()}}
            if "label" in df.columns:
                info["manifest"]["class_counts"] = {str(k): int(v) for k, v in
                                                    sorted(df["label"].value_counts().items())}
        except DropUnreadable as exc:
            info["manifest_error"] = str(exc)
    vkey = layout.validation_result_key(drop_id)
    if store.exists(vkey):
        v = store.get_json(vkey)
        info["validation"] = {"success": v.get("success"), "failures": len(v.get("failures", [])),
                              "report_uri": v.get("report_uri"), "validated_at": v.get("validated_at")}
    return info


# ---------------------------------------------------------------- CLI

IMPORT_HELP = """Make a drop of your own labelled images (bring your own data).

DIR holds one subfolder per class NAME of the model's spec (models/<name>/spec.yaml, classes[].name),
each with PNG or JPEG files (.png, .jpg, .jpeg) of exactly the spec's input size and channels
(8-bit grayscale for 1 channel, RGB for 3), for example for the shapes model:

    DIR/circle/0001.jpg   DIR/circle/0002.png   DIR/square/a.jpg   ...

A subfolder that is not a class name, a class without images or an image of another size or mode
is an error naming it (exit 2). The drop gets images/ (in the spec's encoding: a file already in it
keeps its bytes), manifest.parquet, drop.json and _SUCCESS, and is validated like any other drop
(`mlpipe validate --model NAME --drop-id ID`).
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlpipe drops", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{make,import,list,show}")
    m = sub.add_parser("make", help="generate a drop into the object store (MLPIPE_STORE_URL)")
    m.add_argument("--model", default=None, metavar="NAME",
                   help="the model project (models/<NAME>/spec.yaml; default $MLPIPE_MODEL_NAME or digits)")
    m.add_argument("--drop-id", default=None, help="drop id (default drop-<UTC timestamp>)")
    m.add_argument("--size", type=int, default=2000, help="rows (default 2000)")
    m.add_argument("--seed", type=int, default=None,
                   help="sampling/augmentation seed (default: derived from the drop id, so two drops with "
                        "different ids are different data and a second drop is not 'seen before')")
    m.add_argument("--source", default=None, metavar="SOURCE",
                   help="the data the images are drawn from (default the spec's golden_set.source): "
                        f"{', '.join(SOURCES)} (alias digits), or folder:<path> (tasks/steps/sources.py)")
    m.add_argument("--class-mix", default=None, metavar="SPEC",
                   help='class weights by class id such as "0:0.5,1:0.05,2:0.45" (default uniform)')
    m.add_argument("--label-noise", type=float, default=0.0, metavar="F",
                   help="flip this fraction of labels to a random other class (default 0)")
    m.add_argument("--fault", action="append", default=[], choices=list(dict.fromkeys(FAULTS + SCENE_FAULTS)),
                   metavar="FAULT",
                   help=f"inject a fault, repeatable: {', '.join(FAULTS)}; scene drops of a pipeline: "
                        f"{', '.join(SCENE_FAULTS)}")
    m.add_argument("--seen-from", default=None, metavar="DROP_ID",
                   help="with --fault seen_before: the drop to copy images from "
                        "(default the newest complete drop that passed validation, else the newest complete one)")
    m.add_argument("--no-success", action="store_true", help="leave the drop incomplete (no _SUCCESS marker)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing complete drop with this id")
    m.add_argument("--result-json", default=None, help="also write the summary JSON to this file")
    im = sub.add_parser("import", help="make a drop of your own images (DIR/<class name>/*.png|jpg)",
                        description=IMPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    im.add_argument("--model", default=None, metavar="NAME",
                    help="the model project (models/<NAME>/spec.yaml; default $MLPIPE_MODEL_NAME or digits)")
    im.add_argument("--from", dest="folder", required=True, metavar="DIR",
                    help="folder with one subfolder per class name holding PNG/JPEG images")
    im.add_argument("--drop-id", default=None, help="drop id (default drop-<UTC timestamp>)")
    im.add_argument("--overwrite", action="store_true", help="replace an existing complete drop with this id")
    im.add_argument("--result-json", default=None, help="also write the summary JSON to this file")
    ls = sub.add_parser("list", help="list drop ids (oldest first)")
    ls.add_argument("--all", action="store_true", help="include incomplete drops")
    ls.add_argument("--result-json", default=None, help=argparse.SUPPRESS)
    s = sub.add_parser("show", help="show one drop (marker, summary, manifest, validation)")
    s.add_argument("drop_id", help="drop id, or 'latest'")
    s.add_argument("--result-json", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit codes (``tasks.contracts.errors``): 0 ok; ``EXIT_BAD_INPUT`` a bad drop, option, spec or image
    folder; ``EXIT_TRANSIENT`` the object store is unreachable (retried)."""
    return run_cli(_main, argv, bad_input=(ValueError,))


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    setup_logging()
    from tasks.adapters.storage import open_store
    from tasks.config import load_settings

    store = open_store()
    cfg = load_settings()
    if args.cmd == "make" and cfg.is_pipeline(args.model):  # a pipeline's scene drop (tasks/steps/scenes.py)
        from tasks.contracts.pipeline import find_pipeline
        from tasks.steps import scenes

        drop_id = args.drop_id or default_drop_id()
        out: Any = scenes.make_scene_drop(store, drop_id, find_pipeline(args.model or cfg.model_name, cfg.models_dir),
                                          size=args.size, seed=args.seed if args.seed is not None else
                                          seed_for(drop_id), faults=args.fault, complete=not args.no_success,
                                          overwrite=args.overwrite)
    elif args.cmd == "make":
        drop_id = args.drop_id or default_drop_id()
        out = make_drop(
            store, drop_id, size=args.size, seed=args.seed if args.seed is not None else seed_for(drop_id),
            source=args.source, spec=load_settings().model_spec(args.model),
            class_mix=parse_class_mix(args.class_mix) if args.class_mix else None,
            label_noise=args.label_noise, faults=args.fault, seen_from=args.seen_from,
            complete=not args.no_success, overwrite=args.overwrite)
    elif args.cmd == "import":
        out = import_drop(store, args.drop_id or default_drop_id(), args.folder,
                          spec=load_settings().model_spec(args.model), overwrite=args.overwrite)
    elif args.cmd == "list":
        ids = list_drops(store, complete_only=not args.all)
        out = {"drops": ids} if not args.all else {
            "drops": [{"drop_id": d, "complete": is_complete(store, d)} for d in ids]}
    else:
        out = show_drop(store, args.drop_id)
    text = json.dumps(out, indent=2, default=str)
    print(text)
    if args.result_json:
        write_result_json(args.result_json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
