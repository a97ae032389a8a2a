"""The drop generator and reader (tasks/steps/drops.py): contract, determinism, faults, golden set, CLI, for the
digits model (byte-identical to the drops made before the model spec) and a colour JPEG model (shapes), plus
``mlpipe drops import`` of your own images."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasks.contracts.errors import EXIT_BAD_INPUT
from tasks.contracts.spec import find_spec
from tasks.model.frames import encode_frame
from tasks.steps import drops, sources
from tasks.adapters.storage import LocalStore

ROOT = Path(__file__).resolve().parents[3]
DIGITS = find_spec("digits", ROOT / "models")
SHAPES = find_spec("shapes", ROOT / "models")
GOLDEN_DIGEST = "48269d798d163c40280e5410b78bb40f9f8d963a8fd8600d56789eba1d0967a9"
# Recorded with the code before the model spec existed (the same calls, digits' defaults): the images digest
# (drops.images_digest of the files under images/), then sha256 of the JSON label list and of the joined
# manifest sha256 column, 16 hex digits each. The digits drops must stay byte-identical.
BEFORE_SPEC = {
    "mnist": ({"size": 40, "seed": 7},
              "e1e9b4273d12d52e172e316ed771144f154ae027b57980fc6aaada1a0a0e640a", "092a5f7ddcec6c06", "3fbf196c0e8337f2"),
    "digits": ({"size": 30, "seed": 3, "source": "digits"},
               "64eacd31908d444fb0512daf1d75ff9ca5703c2296486ebe217991a2039f823e", "eb6ff69b96c87c8f", "de7ebb9273d459f8"),
    "faults": ({"size": 40, "seed": 11,
                "faults": ["bad_label", "wrong_shape", "corrupt_image", "blank_images", "wrong_format", "duplicate_ids"]},
               "d60268cca422e828b60a10e2c56110fb22980a7108c9e864cc6b9864179206e4", "b37906ab40360487", "ef570c6848f54aa4"),
    "noise": ({"size": 40, "seed": 5, "label_noise": 0.2, "class_mix": {0: 0.5, 3: 0.5}},
              "38936cda41b0b14de1712366f8b3b4320d070cabc1fd1b5028d48642b2dc1038", "294b9705d967d5e7", "81286ae7878ecf3c"),
}
EXPECTED_DTYPES = {"image_id": "str", "label": "int64", "sha256": "str", "height": "int64", "width": "int64",
                   "source": "str", "captured_at": "datetime64[us, UTC]"}


class RecordingStore(LocalStore):
    """A real local store that also records the order of writes."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.writes: list[str] = []

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        super().put_bytes(key, data, content_type)
        self.writes.append(key)


def _manifest(store, drop_id: str) -> pd.DataFrame:
    return drops.read_manifest(store, drop_id)


# ---------------------------------------------------------------- contract

def test_drop_contract_and_success_written_last(mlpipe_env):
    store = RecordingStore(mlpipe_env.home / "store")
    summary = drops.make_drop(store, "d1", size=200, seed=1)
    assert summary["rows"] == 200 and summary["complete"] is True

    assert store.writes[-1] == "drops/d1/_SUCCESS", "the _SUCCESS marker must be the last write"
    assert store.writes.index("drops/d1/manifest.parquet") > max(
        i for i, k in enumerate(store.writes) if k.startswith("drops/d1/images/"))
    marker = store.get_json("drops/d1/_SUCCESS")
    assert marker["drop_id"] == "d1" and marker["rows"] == 200 and marker["created_at"]

    df = _manifest(store, "d1")
    assert list(df.columns) == list(drops.MANIFEST_COLUMNS)
    assert {c: str(t) for c, t in df.dtypes.items()} == EXPECTED_DTYPES
    assert df["image_id"].is_unique and df["sha256"].is_unique
    assert set(df["label"]) == set(range(10))
    assert (df["height"] == 28).all() and (df["width"] == 28).all() and (df["source"] == "mnist").all()
    images = [k for k in store.list("drops/d1/images/")]
    assert len(images) == 200
    for row in df.head(50).itertuples():
        data = store.get_bytes(f"drops/d1/images/{row.image_id}.png")
        assert hashlib.sha256(data).hexdigest() == row.sha256
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "PNG" and im.mode == "L" and im.size == (28, 28)
            arr = np.asarray(im)
        assert arr.dtype == np.uint8 and arr.max() > 100 and arr[0, 0] == 0  # white digit on black

    X, y = drops.load_arrays(store, ["d1"])
    assert X.shape == (200, 28, 28) and X.dtype == np.uint8
    assert y.dtype == np.int64 and list(y) == list(df["label"])
    assert drops.list_drops(store) == ["d1"] and drops.is_complete(store, "d1")


def test_load_arrays_concatenates_drops_in_order(store):
    drops.make_drop(store, "a", size=120, seed=1)
    drops.make_drop(store, "b", size=130, seed=2)
    X, y = drops.load_arrays(store, ["a", "b"])
    Xa, ya = drops.load_arrays(store, ["a"])
    assert X.shape == (250, 28, 28) and np.array_equal(X[:120], Xa) and np.array_equal(y[:120], ya)
    assert drops.list_drops(store) == ["a", "b"]
    assert drops.resolve_drop_id(store, "latest") == "b"


# ---------------------------------------------------------------- determinism and uniqueness

def test_same_seed_same_images_different_seed_no_shared_hashes(store):
    drops.make_drop(store, "s1", size=300, seed=7)
    drops.make_drop(store, "s1-again", size=300, seed=7)
    drops.make_drop(store, "s2", size=300, seed=8)
    a, b, c = (_manifest(store, d) for d in ("s1", "s1-again", "s2"))
    assert list(a["sha256"]) == list(b["sha256"]) and list(a["label"]) == list(b["label"])
    assert np.array_equal(drops.load_arrays(store, ["s1"])[0], drops.load_arrays(store, ["s1-again"])[0])
    assert not set(a["sha256"]) & set(c["sha256"]), "drops with different seeds must not share image bytes"


def test_sampling_with_replacement_keeps_hashes_unique(store):
    # 400 zeros from the 400-per-class mnist pool, and 600 zeros from ~178 sklearn zeros: with replacement.
    s = drops.make_drop(store, "rep", size=600, seed=3, source="digits", class_mix={0: 1.0})
    df = _manifest(store, "rep")
    assert s["class_counts"] == {"0": 600} and (df["source"] == "sklearn-digits").all()
    assert df["sha256"].is_unique and len(df) == 600
    X, _ = drops.load_arrays(store, ["rep"])
    assert X.shape == (600, 28, 28) and len({x.tobytes() for x in X}) == 600


def test_class_mix_is_honoured(store):
    mix = drops.parse_class_mix("0:0.5,1:0.25,2:0.25")
    assert mix == {0: 0.5, 1: 0.25, 2: 0.25}
    drops.make_drop(store, "mix", size=200, seed=1, class_mix=mix)
    counts = _manifest(store, "mix")["label"].value_counts().to_dict()
    assert counts == {0: 100, 1: 50, 2: 50}
    with pytest.raises(drops.DropError, match="classes \\[11\\] outside the class ids 0..9 of model 'digits'"):
        drops.make_drop(store, "x", size=10, class_mix=drops.parse_class_mix("11:1"))
    with pytest.raises(drops.DropError, match="CLASS:WEIGHT"):
        drops.parse_class_mix("zero")


def test_label_noise_flips_that_fraction_to_other_classes(store):
    drops.make_drop(store, "clean", size=200, seed=5)
    s = drops.make_drop(store, "noisy", size=200, seed=5, label_noise=0.3)
    clean, noisy = _manifest(store, "clean"), _manifest(store, "noisy")
    assert list(clean["sha256"]) == list(noisy["sha256"])  # same images, only labels differ
    changed = (clean["label"] != noisy["label"]).sum()
    assert changed == 60 == s["label_noise_rows"]
    assert noisy["label"].between(0, 9).all()


def test_make_drop_is_idempotent_and_refuses_to_clobber(store):
    first = drops.make_drop(store, "idem", size=100, seed=1)
    again = drops.make_drop(store, "idem", size=100, seed=1)
    assert again == first
    with pytest.raises(drops.DropExists, match="--overwrite"):
        drops.make_drop(store, "idem", size=100, seed=2)
    replaced = drops.make_drop(store, "idem", size=120, seed=2, overwrite=True)
    assert replaced["rows"] == 120 and len(store.list("drops/idem/images/")) == 120


def test_bad_options_are_named(store):
    with pytest.raises(drops.DropError, match="unknown fault"):
        drops.make_drop(store, "x", size=10, faults=["nope"])
    with pytest.raises(drops.DropError, match="invalid drop id"):
        drops.make_drop(store, "../evil", size=10)
    with pytest.raises(drops.DropError, match="label noise"):
        drops.make_drop(store, "x", size=10, label_noise=2)
    with pytest.raises(drops.DropNotFound, match="no complete drop"):
        drops.make_drop(store, "x", size=10, faults=["seen_before"])


# ---------------------------------------------------------------- faults

@pytest.fixture
def base_drop(store):
    drops.make_drop(store, "base", size=200, seed=1)
    return "base"


def test_fault_bad_label(store, base_drop):
    s = drops.make_drop(store, "f", size=200, seed=2, faults=["bad_label"])
    labels = _manifest(store, "f")["label"]
    bad = labels[~labels.between(0, 9)]
    assert len(bad) == s["fault_rows"]["bad_label"] == 10 and set(bad) == {10, -1}
    with pytest.raises(drops.DropError, match=r"label .* outside the class ids 0..9 of model 'digits'"):
        drops.load_arrays(store, ["f"])


def test_fault_wrong_shape(store, base_drop):
    drops.make_drop(store, "f", size=200, seed=2, faults=["wrong_shape"])
    df = _manifest(store, "f")
    wrong = df[df["height"] != 28]
    assert len(wrong) == 10 and (wrong["width"] == 32).all()
    img = drops.decode_image(store.get_bytes(f"drops/f/images/{wrong.iloc[0]['image_id']}.png"))
    assert img.shape == (32, 32)
    with pytest.raises(drops.DropUnreadable, match=r"image f-\d+ has shape 32x32, model 'digits' expects 28x28"):
        drops.load_arrays(store, ["f"])


def test_fault_duplicate_ids(store, base_drop):
    drops.make_drop(store, "f", size=200, seed=2, faults=["duplicate_ids"])
    df = _manifest(store, "f")
    assert df["image_id"].duplicated().sum() == 10 and df["sha256"].is_unique


def test_fault_corrupt_image(store, base_drop):
    drops.make_drop(store, "f", size=200, seed=2, faults=["corrupt_image"])
    df = _manifest(store, "f")
    broken = []
    for row in df.itertuples():
        data = store.get_bytes(f"drops/f/images/{row.image_id}.png")
        assert hashlib.sha256(data).hexdigest() == row.sha256  # hashes describe the bytes as delivered
        try:
            drops.decode_image(data)
        except ValueError:
            broken.append(row.image_id)
    assert len(broken) == 10
    with pytest.raises(drops.DropUnreadable, match=f"image {broken[0]}|not a decodable image"):
        drops.load_arrays(store, ["f"])


def test_fault_missing_column(store, base_drop):
    drops.make_drop(store, "f", size=200, seed=2, faults=["missing_column"])
    df = _manifest(store, "f")
    assert "sha256" not in df.columns and len(df.columns) == 6


def test_fault_empty(store, base_drop):
    s = drops.make_drop(store, "f", size=200, seed=2, faults=["empty"])
    df = _manifest(store, "f")
    assert len(df) == 0 and s["rows"] == 0 and list(df.columns) == list(drops.MANIFEST_COLUMNS)
    assert str(df["label"].dtype) == "int64"
    X, y = drops.load_arrays(store, ["f"])
    assert X.shape == (0, 28, 28) and y.shape == (0,)


def test_fault_skewed(store, base_drop):
    drops.make_drop(store, "f", size=200, seed=2, faults=["skewed"])
    shares = _manifest(store, "f")["label"].value_counts(normalize=True)
    assert shares[0] >= 0.55 and shares.get(1, 0) <= 0.02


def test_fault_seen_before(store, base_drop):
    s = drops.make_drop(store, "f", size=200, seed=2, faults=["seen_before"])  # default: newest complete
    assert s["params"]["seen_from"] == "base"
    overlap = set(_manifest(store, "f")["sha256"]) & set(_manifest(store, "base")["sha256"])
    assert len(overlap) == s["fault_rows"]["seen_before"] == 20
    s2 = drops.make_drop(store, "g", size=200, seed=3, faults=["seen_before"], seen_from="base")
    assert s2["params"]["seen_from"] == "base"


def test_fault_future_and_ancient_timestamps(store):
    s = drops.make_drop(store, "f", size=200, seed=2, faults=["future_timestamps", "ancient_timestamps"])
    created = pd.Timestamp(s["created_at"])
    ts = _manifest(store, "f")["captured_at"]
    assert (ts > created).sum() == s["fault_rows"]["future_timestamps"] == 10
    assert (ts > created + pd.Timedelta(hours=23)).sum() == 10  # at least a day ahead: far beyond any clock skew
    assert (ts < pd.Timestamp("2000-01-01", tz="UTC")).sum() == s["fault_rows"]["ancient_timestamps"] == 10
    assert pd.Timestamp("1970-01-01", tz="UTC") in set(ts)
    clean = ts[(ts <= created) & (ts >= pd.Timestamp("2000-01-01", tz="UTC"))]
    assert len(clean) == 180


def test_fault_blank_images(store):
    s = drops.make_drop(store, "f", size=200, seed=2, faults=["blank_images"])
    df = _manifest(store, "f")
    stds = [drops.decode_image(store.get_bytes(drops.image_key("f", i, DIGITS))).std() for i in df["image_id"]]
    assert sum(v == 0 for v in stds) == s["fault_rows"]["blank_images"] == 10
    assert df["sha256"].is_unique  # each blank image is its own grey: no duplicate bytes


def test_fault_wrong_format(store):
    s = drops.make_drop(store, "f", size=200, seed=2, faults=["wrong_format"])
    formats = []
    for row in _manifest(store, "f").itertuples():
        data = store.get_bytes(drops.image_key("f", row.image_id, DIGITS))
        assert hashlib.sha256(data).hexdigest() == row.sha256  # the manifest hash describes the bytes
        with Image.open(io.BytesIO(data)) as im:
            formats.append(im.format)
    assert formats.count("JPEG") == s["fault_rows"]["wrong_format"] == 10 and formats.count("PNG") == 190


# ---------------------------------------------------------------- incomplete / unknown / unreadable

def test_incomplete_drop_is_never_read(store):
    s = drops.make_drop(store, "half", size=100, seed=1, complete=False)
    assert s["complete"] is False and not store.exists("drops/half/_SUCCESS")
    assert store.exists("drops/half/manifest.parquet")
    assert not drops.is_complete(store, "half")
    assert drops.list_drops(store) == [] and drops.list_drops(store, complete_only=False) == ["half"]
    with pytest.raises(drops.DropIncomplete, match=r"'half' is incomplete \(no _SUCCESS"):
        drops.read_manifest(store, "half")
    with pytest.raises(drops.DropIncomplete):
        drops.load_arrays(store, ["half"])
    # finishing it later replaces the leftover
    drops.make_drop(store, "half", size=100, seed=1)
    assert len(drops.read_manifest(store, "half")) == 100


def test_unknown_drop_is_named(store):
    with pytest.raises(drops.DropNotFound) as err:
        drops.read_manifest(store, "nope")
    assert "'nope' not found" in str(err.value) and "mlpipe drops list" in str(err.value)
    with pytest.raises(drops.DropNotFound):
        drops.load_arrays(store, ["nope"])
    assert isinstance(err.value, ValueError)


def test_unreadable_manifest(store):
    store.put_bytes("drops/junk/manifest.parquet", b"this is not parquet")
    store.put_json("drops/junk/_SUCCESS", {"drop_id": "junk", "rows": 1, "created_at": "2026-01-01T00:00:00+00:00"})
    with pytest.raises(drops.DropUnreadable, match="'junk': manifest .* not readable Parquet"):
        drops.read_manifest(store, "junk")


# ---------------------------------------------------------------- golden set

def test_golden_set_is_fixed_and_disjoint_from_drops(store):
    X, y = drops.golden_set()
    assert X.shape == (1000, 28, 28) and X.dtype == np.uint8 and y.dtype == np.int64
    assert np.bincount(y).tolist() == [100] * 10
    assert hashlib.sha256(X.tobytes() + y.tobytes()).hexdigest() == GOLDEN_DIGEST
    X2, y2 = drops.golden_set()
    assert np.array_equal(X, X2) and np.array_equal(y, y2)
    X2[0, 0, 0] = 255  # callers get copies
    assert drops.golden_set()[0][0, 0, 0] == X[0, 0, 0]

    src = sources.load(DIGITS)
    golden_idx, pool_idx = src.golden, src.pool
    assert len(pool_idx) == 4000 and not set(golden_idx) & set(pool_idx)
    for seed, size in [(0, 2000), (1, 4000), (2, 9000)]:  # 9000 > pool: sampled with replacement
        plan = drops._sample_plan(size, seed, src, None, DIGITS)
        assert len(plan) == size and not set(plan.tolist()) & set(golden_idx.tolist())
    # no golden image (as a PNG) appears in a drop
    drops.make_drop(store, "g", size=200, seed=0)
    golden_hashes = {hashlib.sha256(encode_frame(img, DIGITS)).hexdigest() for img in X}
    assert not golden_hashes & set(drops.read_manifest(store, "g")["sha256"])


# ---------------------------------------------------------------- CLI

def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "tasks.cli", "drops", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_make_list_show_and_errors(mlpipe_env, tmp_path):
    out = tmp_path / "r.json"
    p = _cli("make", "--drop-id", "cli1", "--size", "120", "--seed", "3", "--fault", "bad_label",
             "--fault", "skewed", "--result-json", str(out))
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout)
    assert summary["drop_id"] == "cli1" and summary["rows"] == 120
    assert summary["params"]["faults"] == ["bad_label", "skewed"] and json.loads(out.read_text()) == summary

    p = _cli("make", "--size", "100", "--no-success", "--class-mix", "0:1,1:1")
    assert p.returncode == 0, p.stderr
    auto_id = json.loads(p.stdout)["drop_id"]
    assert auto_id.startswith("drop-") and json.loads(p.stdout)["complete"] is False

    p = _cli("list")
    assert p.returncode == 0 and json.loads(p.stdout) == {"drops": ["cli1"]}
    p = _cli("show", "cli1")
    assert p.returncode == 0 and json.loads(p.stdout)["manifest"]["rows"] == 120

    p = _cli("show", "nope")
    assert p.returncode == EXIT_BAD_INPUT and p.stderr.strip().splitlines()[-1].startswith("error: drop 'nope' not found")
    assert "Traceback" not in p.stderr
    p = _cli("make", "--drop-id", "x", "--class-mix", "0:abc")
    assert p.returncode == EXIT_BAD_INPUT and "error: bad class mix entry '0:abc'" in p.stderr
    p = _cli("make", "--drop-id", "x", "--fault", "bogus")
    assert p.returncode == EXIT_BAD_INPUT and "invalid choice" in p.stderr  # argparse: the same code


def test_cli_default_seed_differs_per_drop_id_so_a_second_drop_is_not_seen_before(mlpipe_env, store):
    """Two `mlpipe drops make` without --seed (the README's walk-through): each drop id gets its own seed,
    so the second drop is new data and passes validation's seen-before check; the same id is reproducible."""
    from tasks.steps import validate

    assert drops.seed_for("d1") == drops.seed_for("d1") != drops.seed_for("d2")
    for drop_id in ("d1", "d2"):
        p = _cli("make", "--drop-id", drop_id, "--size", "300")
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["params"]["seed"] == drops.seed_for(drop_id)
        result = validate.validate_drop(store, drop_id)
        assert result.success, [f["expectation"] for f in result.failures]
    assert result.statistics.get("seen_before", 0) == 0


# ---------------------------------------------------------------- per model spec

@pytest.mark.parametrize("case", sorted(BEFORE_SPEC))
def test_digits_drops_are_byte_identical_to_before_the_model_spec(store, case):
    kwargs, images_digest, labels_digest, hashes_digest = BEFORE_SPEC[case]
    drop_id = f"d-{case}"  # the image ids (and names) start with the drop id
    drops.make_drop(store, drop_id, spec=DIGITS, **kwargs)
    names = {k.rsplit("/", 1)[1]: hashlib.sha256(store.get_bytes(k)).hexdigest()
             for k in store.list(f"drops/{drop_id}/images/")}
    df = _manifest(store, drop_id)
    assert drops.images_digest(names) == images_digest
    assert hashlib.sha256(json.dumps([int(v) for v in df["label"]]).encode()).hexdigest()[:16] == labels_digest
    assert hashlib.sha256("".join(df["sha256"]).encode()).hexdigest()[:16] == hashes_digest


def test_shapes_drop_is_colour_jpeg_of_the_spec(store):
    s = drops.make_drop(store, "sh", size=100, seed=4, spec=SHAPES)
    assert s["model"] == "shapes" and s["image_encoding"] == "jpeg" and s["params"]["model"] == "shapes"
    assert store.get_json("drops/sh/drop.json")["model"] == "shapes"
    df = _manifest(store, "sh")
    assert list(df.columns) == list(drops.MANIFEST_COLUMNS)
    assert (df["height"] == 48).all() and (df["width"] == 48).all() and (df["source"] == "shapes").all()
    assert set(df["label"]) == set(range(5))
    keys = store.list("drops/sh/images/")
    assert len(keys) == 100 and all(k.endswith(".jpg") for k in keys)
    for row in df.head(10).itertuples():
        data = store.get_bytes(drops.image_key("sh", row.image_id, SHAPES))
        assert hashlib.sha256(data).hexdigest() == row.sha256
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (48, 48)
    X, y = drops.load_arrays(store, ["sh"], SHAPES)
    assert X.shape == (100, 48, 48, 3) and X.dtype == np.uint8 and list(y) == list(df["label"])
    again = drops.make_drop(store, "sh-again", size=100, seed=4, spec=SHAPES)
    assert list(_manifest(store, "sh-again")["sha256"]) == list(df["sha256"]) and again["rows"] == 100
    with pytest.raises(drops.DropError, match="drop 'sh' was made for model 'shapes', not 'digits'"):
        drops.load_arrays(store, ["sh"], DIGITS)


def test_shapes_faults_follow_the_spec(store):
    s = drops.make_drop(store, "f", size=200, seed=2, spec=SHAPES,
                        faults=["bad_label", "wrong_shape", "wrong_format", "blank_images"])
    df = _manifest(store, "f")
    assert set(df["label"][~df["label"].between(0, 4)]) == {5, -1}  # the class count, and -1
    wrong = df[df["height"] != 48]
    assert len(wrong) == s["fault_rows"]["wrong_shape"] == 10 and (wrong["width"] == 52).all()
    formats, shapes_seen, stds = [], set(), []
    for row in df.itertuples():
        data = store.get_bytes(drops.image_key("f", row.image_id, SHAPES))
        with Image.open(io.BytesIO(data)) as im:
            formats.append(im.format)
        img = drops.decode_image(data)
        shapes_seen.add(img.shape)
        stds.append(img.std())
    assert formats.count("PNG") == s["fault_rows"]["wrong_format"] == 10  # PNG bytes under a .jpg name
    assert shapes_seen == {(48, 48, 3), (52, 52, 3)}
    assert sum(v == 0 for v in stds) == s["fault_rows"]["blank_images"] == 10


def _image_folder(root: Path, spec, per_class: int = 4) -> Path:
    """``root/<class name>/`` with ``per_class`` drawn images each, alternately JPEG and PNG files."""
    rng = np.random.default_rng(0)
    for name in spec.class_names:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = sources.draw_shape(name, rng, spec.input.height, spec.input.width, spec.input.channels)
            Image.fromarray(img).save(root / name / f"{i:03d}.{'jpg' if i % 2 == 0 else 'png'}")
    return root


def test_import_drop_from_class_folders(store, tmp_path):
    folder = _image_folder(tmp_path / "mine", SHAPES)
    s = drops.import_drop(store, "mine", folder, spec=SHAPES)
    assert s["model"] == "shapes" and s["rows"] == 20 and s["class_counts"] == {str(c): 4 for c in range(5)}
    df = _manifest(store, "mine")
    assert list(df.columns) == list(drops.MANIFEST_COLUMNS) and (df["source"] == "import:mine").all()
    assert list(df["label"]) == [c for c in range(5) for _ in range(4)]  # by class, then file name
    first = store.get_bytes(drops.image_key("mine", df["image_id"][0], SHAPES))
    assert first == (folder / "circle" / "000.jpg").read_bytes()  # a JPEG keeps its bytes
    with Image.open(io.BytesIO(store.get_bytes(drops.image_key("mine", df["image_id"][1], SHAPES)))) as im:
        assert im.format == "JPEG"  # a PNG is re-encoded in the spec's encoding
    X, _ = drops.load_arrays(store, ["mine"], SHAPES)
    assert X.shape == (20, 48, 48, 3)
    assert drops.import_drop(store, "mine", folder, spec=SHAPES) == s  # same content: nothing to do

    Image.new("RGB", (32, 48)).save(folder / "square" / "small.png")
    with pytest.raises(sources.SourceError, match=r"small\.png: image is 32x48 RGB, model 'shapes' takes 48x48 RGB"):
        drops.import_drop(store, "mine2", folder, spec=SHAPES)
    (folder / "square" / "small.png").unlink()
    (folder / "hexagon").mkdir()
    with pytest.raises(sources.SourceError, match=r"subfolders \['hexagon'\] are not classes of model 'shapes'"):
        drops.import_drop(store, "mine2", folder, spec=SHAPES)


def test_cli_make_and_import_for_a_model(mlpipe_env, tmp_path):
    p = _cli("make", "--model", "shapes", "--drop-id", "cs", "--size", "50", "--seed", "1")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["model"] == "shapes"
    p = _cli("import", "--help")
    assert p.returncode == 0 and "one subfolder per class NAME" in p.stdout and "DIR/circle/0001.jpg" in p.stdout
    folder = _image_folder(tmp_path / "byo", SHAPES, per_class=2)
    p = _cli("import", "--model", "shapes", "--from", str(folder), "--drop-id", "byo")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["rows"] == 10
    p = _cli("import", "--model", "digits", "--from", str(folder), "--drop-id", "byo2")
    assert p.returncode == EXIT_BAD_INPUT and "are not classes of model 'digits'" in p.stderr
    p = _cli("make", "--model", "nosuch", "--drop-id", "x")
    assert p.returncode == EXIT_BAD_INPUT and "no model spec for 'nosuch'" in p.stderr
