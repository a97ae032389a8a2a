"""The data sources of drops and golden sets (tasks/steps/sources.py): mnist (the historical golden set),
sklearn-digits, the procedural shapes and bring-your-own folders, chosen by the model spec."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tasks.contracts.errors import BadInput
from tasks.contracts.spec import find_spec, parse_spec
from tasks.steps import sources

ROOT = Path(__file__).resolve().parents[3]
DIGITS = find_spec("digits", ROOT / "models")
SHAPES = find_spec("shapes", ROOT / "models")
# sha256 of X.tobytes() + y.tobytes() of the 1,000-digit golden set (tests/unit/steps/test_drops.py)
GOLDEN_DIGEST = "48269d798d163c40280e5410b78bb40f9f8d963a8fd8600d56789eba1d0967a9"


def _spec(name: str = "custom", base: str = "shapes", **changes):
    data = yaml.safe_load((ROOT / "models" / base / "spec.yaml").read_text())
    data.update(changes, name=name)
    return parse_spec(yaml.safe_dump(data))


def _classes(*names: str) -> list[dict]:
    return [{"id": i, "name": n} for i, n in enumerate(names)]


def test_mnist_golden_set_is_the_historical_one():
    src = sources.load(DIGITS)
    X, y = src.golden_set()
    assert src.name == "mnist" and X.shape == (1000, 28, 28) and np.bincount(y).tolist() == [100] * 10
    assert hashlib.sha256(X.tobytes() + y.tobytes()).hexdigest() == GOLDEN_DIGEST
    assert len(src.pool) == 4000 and not set(src.golden) & set(src.pool)
    assert not src.images.flags.writeable  # shared, read-only


def test_a_source_other_than_the_golden_one_is_all_pool():
    src = sources.load(DIGITS, "digits")  # the alias
    assert src.name == "sklearn-digits" and len(src.golden) == 0 and len(src.pool) == len(src.labels) == 1797
    assert src.images.shape[1:] == (28, 28) and src.images[:, :4].max() == 0  # centred in a 20x20 box


def test_unknown_source_and_impossible_classes_are_named():
    with pytest.raises(sources.SourceError, match="unknown data source 'imagenet'.*mnist, sklearn-digits, shapes"):
        sources.canonical("imagenet")
    with pytest.raises(sources.SourceError, match="source 'mnist' holds the digits 0..9.*circle"):
        sources.load(SHAPES, "mnist")
    spec = _spec(classes=_classes("circle", "hexagon", "blob"))
    with pytest.raises(sources.SourceError) as err:
        sources.load(spec)
    assert "['hexagon', 'blob']" in str(err.value) and "circle, square, triangle, cross, diamond, ring, star, bar" \
        in str(err.value)
    assert isinstance(err.value, BadInput)


def test_shapes_are_deterministic_fast_and_of_the_spec():
    t0 = time.monotonic()
    src = sources.load(SHAPES)
    assert time.monotonic() - t0 < 10  # 3,500 images of 48x48x3 (about 1 s on one core)
    assert src.images.shape == (5 * (sources.SHAPES_PER_CLASS + 100), 48, 48, 3) and src.images.dtype == np.uint8
    assert np.bincount(src.labels[src.golden]).tolist() == [100] * 5
    spec = _spec(name="again", classes=_classes(*SHAPES.class_names))  # the same draw, another spec object
    assert np.array_equal(sources.load(spec).images, src.images)
    other = _spec(name="seeded", golden_set={"source": "shapes", "per_class": 100, "seed": 1})
    assert not np.array_equal(sources.load(other).images[:10], src.images[:10])
    # a visible shape on a contrasting background: not constant images
    assert float(src.images.reshape(len(src.images), -1).std(axis=1).min()) > 10


def test_every_shape_of_the_vocabulary_draws_in_grey_and_colour():
    rng = np.random.default_rng(0)
    for name in sources.SHAPES:
        grey = sources.draw_shape(name, rng, 24, 32, 1)
        colour = sources.draw_shape(name, rng, 24, 32, 3)
        assert grey.shape == (24, 32) and colour.shape == (24, 32, 3)
    # the shape is brighter than its background by at least the contrast (luminance, before noise)
    img = sources.draw_shape("square", np.random.default_rng(1), 48, 48, 1)
    assert np.percentile(img, 99) - np.percentile(img, 1) >= sources.MIN_CONTRAST - 40


def _folder(root: Path, spec, per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for name in spec.class_names:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = Image.fromarray(sources.draw_shape(name, rng, spec.input.height, spec.input.width,
                                                     spec.input.channels))
            img.save(root / name / f"{i}.png")
    return root


def test_folder_source_reads_class_folders_relative_to_the_model_project(tmp_path, monkeypatch):
    spec = _spec(name="byo", classes=_classes("ring", "star"), input={"height": 20, "width": 20, "channels": 3,
                                                                        "layout": "NCHW", "dtype": "uint8"},
                 golden_set={"source": "folder:data", "per_class": 2, "seed": 0})
    monkeypatch.setenv("MLPIPE_MODELS_DIR", str(tmp_path / "models"))
    _folder(tmp_path / "models" / "byo" / "data", spec, per_class=5)
    src = sources.load(spec)
    assert src.name == "folder:data" and src.images.shape == (10, 20, 20, 3)
    assert src.labels.tolist() == [0] * 5 + [1] * 5 and np.bincount(src.labels[src.golden]).tolist() == [2, 2]
    assert len(src.pool) == 6
    absolute = sources.load(spec, f"folder:{tmp_path / 'models' / 'byo' / 'data'}")
    assert np.array_equal(absolute.images, src.images) and len(absolute.golden) == 0  # not the golden source


def test_folder_source_names_the_bad_file_or_folder(tmp_path):
    spec = _spec(name="byo2", classes=_classes("ring", "star"), golden_set={"source": "shapes", "per_class": 1,
                                                                             "seed": 0})
    root = _folder(tmp_path / "imgs", spec, per_class=2)
    Image.new("L", (48, 48)).save(root / "star" / "grey.png")  # a grayscale image for an RGB model
    with pytest.raises(sources.SourceError, match=r"grey\.png: image is 48x48 L, model 'byo2' takes 48x48 RGB"):
        sources.load(spec, f"folder:{root}")
    (root / "star" / "grey.png").unlink()
    (root / "star" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    with pytest.raises(sources.SourceError, match=r"broken\.jpg: not a readable PNG/JPEG image"):
        sources.load(spec, f"folder:{root}")
    with pytest.raises(sources.SourceError, match=r"does not exist: it needs one subfolder per class name \(ring, star\)"):
        sources.load(spec, f"folder:{tmp_path / 'nowhere'}")
    for f in (root / "star").iterdir():
        f.unlink()
    with pytest.raises(sources.SourceError, match=r"no PNG/JPEG images for class 'star'"):
        sources.load(spec, f"folder:{root}")


def test_a_golden_source_needs_more_images_than_the_golden_set(tmp_path, monkeypatch):
    spec = _spec(name="few", classes=_classes("ring", "star"),
                 golden_set={"source": "folder:data", "per_class": 3, "seed": 0})
    monkeypatch.setenv("MLPIPE_MODELS_DIR", str(tmp_path / "models"))
    _folder(tmp_path / "models" / "few" / "data", spec, per_class=3)
    with pytest.raises(sources.SourceError, match="has 3 images of class 'ring': the golden set takes 3 per class"):
        sources.load(spec)
