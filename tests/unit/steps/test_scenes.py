"""Scene composition (tasks/steps/scenes.py): determinism, the golden/pool split of the digits, tight boxes inside
the frame, the ground-truth crops, and scene drops (JPEG images, manifest columns, faults, load_arrays/golden_set
for the pipeline's members)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.contracts.pipeline import find_pipeline, member_specs
from tasks.steps import drops, scenes

ROOT = Path(__file__).resolve().parents[3]
PIPELINE = find_pipeline("scenes", ROOT / "models")
MEMBERS = member_specs(PIPELINE, ROOT / "models")
DET, CLS = MEMBERS["detector"], MEMBERS["classifier"]
H, W = DET.input.height, DET.input.width
N = 40


@pytest.fixture(scope="module")
def pool40() -> scenes.Scenes:
    return scenes.pool_scenes(PIPELINE, N, seed=7)


def test_pool_scenes_are_deterministic_by_seed(pool40):
    again = scenes.pool_scenes(PIPELINE, N, seed=7)
    other = scenes.pool_scenes(PIPELINE, N, seed=8)
    assert again.images.shape == (N, H, W, 3) and again.images.dtype == np.uint8
    assert np.array_equal(pool40.images, again.images)
    assert all(np.array_equal(a, b) for a, b in zip(pool40.boxes, again.boxes))
    assert all(np.array_equal(a, b) for a, b in zip(pool40.classes, again.classes))
    assert not np.array_equal(pool40.images, other.images)
    assert len(pool40) == N


def test_scenes_follow_the_data_section(pool40):
    lo, hi = PIPELINE.data.objects
    s0, s1 = PIPELINE.data.scale
    counts = [len(b) for b in pool40.boxes]
    assert min(counts) >= max(lo, 1) and max(counts) <= hi
    assert len(set(counts)) > 1  # the number of digits varies
    for b, c in zip(pool40.boxes, pool40.classes):
        assert b.dtype == np.float32 and b.shape == (len(c), 4) and c.dtype == np.int64
        assert np.all((c >= 0) & (c < CLS.num_classes))
        # inside the frame, positive size, no taller than the largest digit square
        assert np.all(b[:, 0] >= 0) and np.all(b[:, 1] >= 0) and np.all(b[:, 2] <= W) and np.all(b[:, 3] <= H)
        assert np.all(b[:, 2] > b[:, 0]) and np.all(b[:, 3] > b[:, 1])
        assert np.all(b[:, 3] - b[:, 1] <= round(s1 * min(H, W)) + 1)
    # backgrounds vary from scene to scene (not one texture)
    means = pool40.images.reshape(N, -1, 3).mean(axis=1)
    assert np.ptp(means, axis=0).max() > 40


def test_boxes_do_not_overlap(pool40):
    from tasks.model.scene_codec import box_iou

    for b in pool40.boxes:
        iou = box_iou(b, b)
        np.fill_diagonal(iou, 0)
        assert iou.max(initial=0) < 0.1


def test_boxes_are_tight_around_the_strokes(monkeypatch):
    """On a black background the painted pixels are colour * alpha: the strokes (alpha above the threshold)
    must touch the box's top and bottom edges and stay inside it (a thin digit's box may be widened)."""
    monkeypatch.setattr(scenes, "_background", lambda rng, h, w: np.zeros((h, w, 3), np.float64))
    images, labels, _golden, pool = scenes._digits(PIPELINE)
    s = scenes.compose(PIPELINE, images[pool], labels[pool], np.random.default_rng(3), 12)
    checked = 0
    for img, boxes in zip(s.images, s.boxes):
        strong = img.astype(np.float32).max(axis=-1)
        inside = np.zeros(strong.shape, bool)
        for x0, y0, x1, y1 in boxes.astype(int):
            window = strong[y0:y1, x0:x1]
            alpha = window / max(float(window.max()), 1.0)  # the brightest stroke pixel has alpha ~1
            ys, xs = np.nonzero(alpha > (scenes.DIGIT_THRESHOLD + 8) / 255)
            assert len(ys)
            assert ys.min() <= 1 and ys.max() >= (y1 - y0) - 2, (y0, y1, ys.min(), ys.max())
            assert xs.min() >= 0 and xs.max() < x1 - x0
            inside[y0:y1, x0:x1] = True
            checked += 1
        # nothing bright outside every box: no digit left without its box
        assert strong[~inside].max(initial=0) <= 64
    assert checked >= 12


def test_golden_and_pool_digits_are_disjoint_and_fixed():
    images, labels, golden, pool = scenes._digits(PIPELINE)
    assert len(np.intersect1d(golden, pool)) == 0
    assert len(golden) + len(pool) == len(labels)
    per_class = np.bincount(labels[golden], minlength=CLS.num_classes)
    assert np.all(per_class == PIPELINE.data.golden_per_class)
    # no golden image bytes in the pool (the same digit under another index would leak)
    golden_bytes = {images[i].tobytes() for i in golden}
    assert not any(images[i].tobytes() in golden_bytes for i in pool)
    again = scenes._digits(PIPELINE)
    assert np.array_equal(again[2], golden)


def test_golden_scenes_use_every_golden_digit_once():
    g = scenes.golden_scenes(PIPELINE)
    assert g is scenes.golden_scenes(PIPELINE)  # cached
    total = PIPELINE.data.golden_per_class * CLS.num_classes
    assert g.objects() == total
    counts = np.bincount(np.concatenate(g.classes), minlength=CLS.num_classes)
    assert np.all(counts == PIPELINE.data.golden_per_class)
    assert g.images.shape[1:] == (H, W, 3) and len(g.ids) == len(g) == len(set(g.ids))


def test_crops_are_the_classifier_input(pool40):
    X, y = scenes.crops(pool40, PIPELINE)
    assert X.dtype == np.uint8 and X.shape == (pool40.objects(), CLS.input.height, CLS.input.width)
    assert y.dtype == np.int64 and np.array_equal(y, np.concatenate(pool40.classes))
    # a crop holds its digit: the centre is brighter or darker than the background, not flat
    assert float(np.mean([x.std() for x in X])) > 15
    from tasks.model.scene_codec import crop_boxes

    c = PIPELINE.crop
    first = crop_boxes(pool40.images[0], pool40.boxes[0], height=c.height, width=c.width, channels=c.channels,
                       padding=c.padding, square=c.square)
    assert np.array_equal(X[:len(first)], first)  # cut exactly as the served pipeline cuts


def test_scene_drop_is_jpeg_with_scene_columns(store):
    summary = scenes.make_scene_drop(store, "sc", PIPELINE, size=N, seed=5)
    assert summary["model"] == "scenes" and summary["pipeline"] is True and summary["rows"] == N
    df = drops.read_manifest(store, "sc")
    assert list(df.columns) == list(scenes.SCENE_COLUMNS)
    assert "label" not in df.columns
    row = df.iloc[0]
    data = store.get_bytes(f"drops/sc/images/{row['image_id']}.jpg")
    assert data[:3] == b"\xff\xd8\xff"
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (W, H)
    boxes, classes = json.loads(row["boxes"]), json.loads(row["classes"])
    assert len(boxes) == len(classes) == int(row["objects"]) and all(len(b) == 4 for b in boxes)
    # the same drop twice is the same drop; the scenes read back are the composed ones (JPEG-decoded)
    assert scenes.make_scene_drop(store, "sc", PIPELINE, size=N, seed=5)["manifest_sha256"] == summary["manifest_sha256"]
    loaded = scenes.load_scenes(store, ["sc"], PIPELINE)
    composed = scenes.pool_scenes(PIPELINE, N, seed=5)
    assert len(loaded) == N
    assert all(np.allclose(a, b, atol=0.01) for a, b in zip(loaded.boxes, composed.boxes))
    assert np.abs(loaded.images.astype(int) - composed.images.astype(int)).mean() < 6  # JPEG quality 90


def test_scene_drop_serves_the_members(store):
    scenes.make_scene_drop(store, "sm", PIPELINE, size=N, seed=6)
    for spec in (DET, CLS):
        drops.check_drop_model(store, "sm", spec)  # a pipeline's drop is each member's drop
    X, y = drops.load_arrays(store, ["sm"], CLS)
    s = scenes.load_scenes(store, ["sm"], PIPELINE)
    assert X.shape == (s.objects(), *CLS.image_shape) and np.array_equal(y, np.concatenate(s.classes))
    with pytest.raises(drops.DropError, match="load_scenes"):
        drops.load_arrays(store, ["sm"], DET)
    from tasks.contracts.spec import find_spec

    with pytest.raises(drops.DropError, match="made for model 'scenes'"):  # a model of no pipeline is refused
        drops.check_drop_model(store, "sm", find_spec("digits", ROOT / "models"))


def test_member_drops_are_the_pipelines(store):
    with pytest.raises(drops.DropError, match="drops make --model scenes"):
        drops.make_drop(store, "m", size=N, seed=1, spec=CLS)


def test_golden_set_of_the_members():
    X, y = drops.golden_set(CLS)
    assert X.shape[1:] == tuple(CLS.image_shape) and len(y) == PIPELINE.data.golden_per_class * CLS.num_classes
    with pytest.raises(drops.DropError, match="golden_scenes"):
        drops.golden_set(DET)


def test_a_scene_drop_is_complete_with_every_image(store):
    # (its speed, about 10 s for 2,000 scenes on these cores, is a measurement, not an assertion)
    info = scenes.make_scene_drop(store, "big", PIPELINE, size=300, seed=9)
    assert info["rows"] == 300 and info["complete"] and drops.is_complete(store, "big")
    assert len(store.list("drops/big/images/")) == 300


@pytest.mark.parametrize("fault, check", [
    ("box_outside", lambda b, c, n: np.any(b[:, 2] > W) or np.any(b[:, 3] > H) or np.any(b[:, :2] < 0)),
    ("negative_size", lambda b, c, n: np.any(b[:, 2] < b[:, 0]) or np.any(b[:, 3] < b[:, 1])),
    ("unknown_class", lambda b, c, n: np.any((c < 0) | (c >= CLS.num_classes))),
    ("too_many_objects", lambda b, c, n: n > DET.detection.max_objects),
])
def test_scene_faults_touch_rows(store, fault, check):
    scenes.make_scene_drop(store, f"x-{fault}", PIPELINE, size=N, seed=11, faults=[fault])
    df = drops.read_manifest(store, f"x-{fault}")
    bad = [r for r in df.itertuples() if check(np.asarray(json.loads(r.boxes), np.float32).reshape(-1, 4),
                                                np.asarray(json.loads(r.classes), np.int64), int(r.objects))]
    assert 1 <= len(bad) <= max(1, round(N * drops.FAULT_FRACTION)) + 1
    with pytest.raises(drops.DropError, match="unknown fault"):
        scenes.make_scene_drop(store, "x-bad", PIPELINE, size=N, seed=11, faults=["bad_label"])
