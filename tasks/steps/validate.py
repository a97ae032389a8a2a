"""Validate a data drop against its model's spec with Great Expectations before anything trains on it.

The suite lives in the repository (``tasks/steps/expectations/drop_suite.json``: the
expectation types and kwargs). Its expectations are rendered from the model spec
(``models/<name>/spec.yaml``: image size and channels, class ids, image encoding, model
name) and from the thresholds, arguments of ``validate_drop`` (row-count and class-share
bounds), at run time. The suite runs on the drop's manifest plus per-row columns computed
from the image files (``images/<image_id>.<ext>``, the spec's image encoding):

* ``drop_model``: the model the drop says it was made for (``drop.json``; null when it does not
  say): it must be the model validated for;
* ``decodes`` / ``decode_error``: the image opens and fully decodes;
* ``decoded_shape`` / ``decoded_shape_ok``: the spec's height x width and channels (``28x28`` for
  8-bit grayscale, ``48x48x3`` for RGB: a mismatch names the shape found);
* ``file_sha256`` / ``sha256_matches_file``: the bytes match the manifest's hash;
* ``seen_before`` / ``seen_in``: the image (by sha256 of its bytes) was already
  delivered in an earlier drop, i.e. another complete drop whose validation
  passed (``drops/<id>/validation/result.json`` has ``success: true``);
* ``class_share``: the share of the row's class in the drop;
* ``file_format`` / ``format_ok``: what the bytes are (magic number, then Pillow), not
  what the file name or the manifest says: the spec's image encoding (``spec.image_encoding``,
  one of ``frames.encodings``; the message names the format found and the one accepted);
* ``pixel_std``: the pixels' standard deviation; a constant image (all black, std ~0)
  carries no signal (below ``MIN_PIXEL_STD``);
* ``captured_at_future`` / ``captured_at_too_old``: a ``captured_at`` later than the
  validation clock + ``MAX_CLOCK_SKEW``, or before ``EARLIEST_CAPTURE`` (2000-01-01: an
  unset clock, the Unix epoch), cannot be true.

A missing manifest column is a named failure (``expect_column_to_exist``), not a
crash: expectations on absent columns are skipped and everything else runs.

Outputs, beside the drop (re-validation overwrites them)::

    drops/<drop_id>/validation/result.json        success, failures, statistics, report_uri,
                                                  content (digests of the validated bytes)
    drops/<drop_id>/validation/content.json       the sha256 of every object under images/
    drops/<drop_id>/validation/data_docs/index.html   the GX Data Docs site, rewritten to render
                                                  offline (no CDN asset: ``tasks.steps.data_docs``)

The result records the model it was validated for (``model``): ``train`` and ``register``
refuse a drop validated for another model. It is bound to the content it checked (``tasks.steps.drops.bind_validation``):
``content.manifest_sha256`` (the manifest's bytes) and ``content.images_sha256`` (one
digest over the sorted image names and the sha256 of their bytes). ``train`` and
``register`` refuse a drop whose bytes no longer match (``drops.verify_validated``).

Every failed expectation is logged as exactly one line, e.g.
``validation failed: expect_column_values_to_be_in_set(label): 12 of 500 rows unexpected (2.4%),
sample [10, -1] -- labels must be in 0..9, the class ids of model 'digits' (10 classes) (bad labels)``
(one line in the log).

CLI: ``mlpipe validate [--model NAME] --drop-id ID [--result-json PATH] [--min-rows N] ...``;
exit codes (``tasks.contracts.errors``): 0 pass; ``EXIT_REJECTED`` validation failed;
``EXIT_BAD_INPUT`` unknown / incomplete / unreadable drop or bad options; ``EXIT_TRANSIENT``
the object store is unreachable (retried).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import io
import json
import logging
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.contracts.errors import Rejected, is_transient, run_cli
from tasks.logs import setup_logging
from tasks.contracts import layout
from tasks.steps import drops
from tasks.contracts.results import write_result_json
from tasks.contracts.files import sha256_bytes

if TYPE_CHECKING:
    from tasks.contracts.pipeline import PipelineSpec
    import pandas as pd

    from tasks.adapters.storage import Store
    from tasks.contracts.spec import ModelSpec

logger = logging.getLogger(__name__)

SUITE_PATH = Path(__file__).resolve().parent / "expectations" / "drop_suite.json"
SITE_NAME = "drop_validation_site"  # "local_site" is taken by GX's own default
DEFAULT_THRESHOLDS: dict[str, Any] = {
    "min_rows": 100,
    "max_rows": 100_000,
    "min_class_share": None,  # default_thresholds: MIN_SHARE_OF_UNIFORM of an equal share (0.03 for 10 classes)
    "max_class_share": None,  # default_thresholds: MAX_SHARE_OF_UNIFORM of an equal share (0.30 for 10 classes)
}
MIN_SHARE_OF_UNIFORM = 0.3  # a class with less than 0.3x its equal share is missing data
MAX_SHARE_OF_UNIFORM = 3.0  # a class with more than 3x its equal share (capped at 1) dominates the drop
SAMPLE_SIZE = 5
# Content checks (the bytes, not what the file name or the manifest claims):
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: the format name ``sniff_format`` gives each spec encoding
FORMAT_NAMES = {"png": "PNG", "jpeg": "JPEG"}
_MAGIC = ((PNG_MAGIC, "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"),
          (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"\x00\x00\x01\x00", "ICO"))
MIN_PIXEL_STD = 1.0  # a 0..255 image whose pixels vary less than this carries no signal (constant image)
MAX_CLOCK_SKEW = dt.timedelta(minutes=5)  # captured_at may be this far after the validation clock
EARLIEST_CAPTURE = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)  # before this, captured_at is not real
_PLACEHOLDER = re.compile(r"^\$([a-z_]+)$")


class ValidationFailed(Rejected):
    """The drop failed its expectations (rejected: final; the failures were logged one per line)."""


@dataclass
class ValidationResult:
    drop_id: str
    model: str  # the model (spec name) the drop was validated for
    success: bool
    failures: list[dict[str, Any]]
    statistics: dict[str, Any]
    report_uri: str
    result_uri: str
    thresholds: dict[str, Any] = field(default_factory=dict)
    validated_at: str = ""
    content: dict[str, Any] = field(default_factory=dict)  # digests of the validated bytes (drops.content_summary)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def failure_lines(self) -> list[str]:
        return [f"validation failed: {f['summary']}" for f in self.failures]


validation_prefix = layout.validation_prefix
result_key = layout.validation_result_key
report_key = layout.data_docs_index_key


def load_suite_spec() -> dict[str, Any]:
    """The suite as kept in the repository (placeholders not yet filled in)."""
    return json.loads(SUITE_PATH.read_text())


#: the scene suite's rules (``tasks.steps.scenes.ROW_RULES``): the sentence of a failure line of each
SCENE_RULE_MESSAGES = {
    "boxes_parse": "scene rows: boxes must be a JSON list of [x0, y0, x1, y1] and classes a JSON list of class ids",
    "counts_agree": "scene rows: the number of boxes, of classes and the objects column must agree",
    "objects_in_bounds": "scene rows: objects per frame must be within [$min_objects, $max_objects] (too many "
                         "objects; the detector's detection.min_objects / max_objects)",
    "boxes_positive_size": "scene rows: every box must have a positive size (x1 > x0, y1 > y0; negative sizes)",
    "boxes_min_size": "scene rows: every box must be at least $min_box_size px wide and high",
    "boxes_inside_frame": "scene rows: every box must lie inside the $image_width x $image_height frame (boxes "
                          "outside the frame)",
    "classes_known": "scene rows: every object's class must be one of $class_range, the classes of "
                     "'$classifier' (unknown classes)",
}


def scene_suite_spec() -> dict[str, Any]:
    """The suite of a pipeline's scene drop: the drop suite without its ``label`` checks (a scene row has objects,
    not a label), the scene manifest's columns, and one expectation per row rule (``SCENE_RULE_MESSAGES``) whose
    failure line names the rows and their reasons (``scene_problem``: ``<image_id>: <reason>``)."""
    from tasks.steps import scenes

    suite = copy.deepcopy(load_suite_spec())
    suite["name"] = "scene_drop_suite"
    suite["manifest_columns"] = list(scenes.SCENE_COLUMNS)
    suite["derived_columns"] = [c for c in suite["derived_columns"] if c != "class_share"] + \
        ["scene_problem", *scenes.ROW_RULES]
    kept = []
    for exp in suite["expectations"]:
        if exp["kwargs"].get("column") in ("label", "class_share"):
            continue
        if exp["type"] == "expect_table_columns_to_match_set":
            exp["meta"]["message"] = "scene manifest columns must be exactly " + ", ".join(scenes.SCENE_COLUMNS)
        kept.append(exp)
    for col, kind in (("boxes", "str"), ("classes", "str"), ("objects", "int64")):
        kept.append({"type": "expect_column_to_exist", "kwargs": {"column": col},
                     "meta": {"check": "schema", "message": f"scene manifest column {col!r} is missing"}})
        kept.append({"type": "expect_column_values_to_be_in_type_list", "kwargs": {"column": col, "type_list": [kind]},
                     "meta": {"check": "types", "message": f"{col} must be {'a JSON string' if kind == 'str' else kind}"}})
    for rule in scenes.ROW_RULES:
        kept.append({"type": "expect_column_values_to_be_in_set", "kwargs": {"column": rule, "value_set": [True]},
                     "meta": {"check": "scene_" + rule, "message": SCENE_RULE_MESSAGES[rule],
                              "sample_column": "scene_problem"}})
    suite["expectations"] = kept
    return suite


def _scene_columns(df: "pd.DataFrame", spec: "ModelSpec", classifier: "ModelSpec") -> None:
    """Add the scene rule columns (``tasks.steps.scenes.ROW_RULES``) and ``scene_problem`` to the frame."""
    import pandas as pd

    from tasks.steps import scenes

    if not {"boxes", "classes", "objects"} <= set(df.columns):
        return
    det = spec.detection
    per_row = [scenes.row_problems(b, c, o, height=spec.input.height, width=spec.input.width,
                                   num_classes=classifier.num_classes, min_objects=det.min_objects,
                                   max_objects=det.max_objects, min_box_size=det.min_box_size)
               for b, c, o in zip(df["boxes"], df["classes"], df["objects"])]
    for rule in scenes.ROW_RULES:
        df[rule] = pd.Series([all(r != rule for r, _ in probs) for probs in per_row], index=df.index, dtype=object)
    ids = df["image_id"].astype(str).tolist() if "image_id" in df.columns else [str(i) for i in df.index]
    df["scene_problem"] = pd.Series([f"{i}: " + "; ".join(m for _, m in probs) if probs else ""
                                     for i, probs in zip(ids, per_row)], index=df.index, dtype=object)


def default_thresholds(spec: "ModelSpec") -> dict[str, Any]:
    """``DEFAULT_THRESHOLDS`` with the class-share bounds of ``spec``'s class count (an equal share is 1/n)."""
    uniform = 1.0 / spec.num_classes
    return {**DEFAULT_THRESHOLDS, "min_class_share": round(MIN_SHARE_OF_UNIFORM * uniform, 6),
            "max_class_share": round(min(1.0, MAX_SHARE_OF_UNIFORM * uniform), 6)}


def _check_thresholds(t: dict[str, Any], spec: "ModelSpec") -> dict[str, Any]:
    unknown = sorted(set(t) - set(DEFAULT_THRESHOLDS))
    if unknown:
        raise ValueError(f"unknown threshold(s) {unknown}: known are {sorted(DEFAULT_THRESHOLDS)}")
    out = {**default_thresholds(spec), **{k: v for k, v in t.items() if v is not None}}
    out["min_rows"], out["max_rows"] = int(out["min_rows"]), int(out["max_rows"])
    out["min_class_share"], out["max_class_share"] = float(out["min_class_share"]), float(out["max_class_share"])
    if not 0 <= out["min_rows"] <= out["max_rows"]:
        raise ValueError(f"need 0 <= min_rows <= max_rows, got {out['min_rows']} and {out['max_rows']}")
    if not 0.0 <= out["min_class_share"] <= out["max_class_share"] <= 1.0:
        raise ValueError("need 0 <= min_class_share <= max_class_share <= 1, got "
                         f"{out['min_class_share']} and {out['max_class_share']}")
    return out


# ---------------------------------------------------------------- the frame

def _earlier_hashes(store: "Store", drop_id: str) -> tuple[dict[str, str], list[str]]:
    """sha256 -> drop id, over the other complete drops whose validation passed."""
    seen: dict[str, str] = {}
    used: list[str] = []
    for other in drops.list_drops(store):
        if other == drop_id:
            continue
        try:
            if not store.get_json(result_key(other)).get("success"):
                continue
            df = drops.read_manifest(store, other)
        except Exception as exc:  # noqa: BLE001 - an unreadable old drop must not block this one
            if is_transient(exc):
                raise  # an outage: retried; a partial history would miss seen-before images
            logger.debug("skipping drop %s for the seen-before check: %s", other, exc)
            continue
        if "sha256" not in df.columns:
            continue
        used.append(other)
        for h in df["sha256"].astype(str):
            seen.setdefault(h, other)
    return seen, used


def sniff_format(data: bytes) -> str:
    """The real format of ``data`` from its magic bytes (``PNG``, ``JPEG``, ``GIF``...), else what
    Pillow recognises, else ``unknown``: whatever the file's name says."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            return str(im.format or "unknown")
    except Exception:  # noqa: BLE001 - not an image Pillow knows
        return "unknown"


def _inspect_image(data: bytes | None, spec: "ModelSpec") -> dict[str, Any]:
    """The per-image columns for one image's bytes (None: the file is missing), checked against ``spec``."""
    if data is None:
        return {"decodes": False, "decode_error": "image file missing", "decoded_shape": None,
                "decoded_shape_ok": None, "file_sha256": None, "file_format": None, "format_ok": None,
                "pixel_std": None}
    sha = sha256_bytes(data)
    fmt = sniff_format(data)
    format_ok = fmt == FORMAT_NAMES[spec.image_encoding]
    try:
        img = drops.decode_image(data)
    except ValueError as exc:
        return {"decodes": False, "decode_error": str(exc)[:120], "decoded_shape": None,
                "decoded_shape_ok": None, "file_sha256": sha, "file_format": fmt, "format_ok": format_ok,
                "pixel_std": None}
    return {"decodes": True, "decode_error": None, "decoded_shape": drops.shape_text(img),
            "decoded_shape_ok": img.shape == tuple(spec.image_shape), "file_sha256": sha, "file_format": fmt,
            "format_ok": format_ok, "pixel_std": round(float(img.std()), 4) if img.size else 0.0}


def _captured_at_checks(values: "pd.Series", now: dt.datetime) -> tuple[list[Any], list[Any]]:
    """(in the future beyond the clock skew, before EARLIEST_CAPTURE) per row; None where the value
    is not a timestamp (the type expectation names those)."""
    import pandas as pd

    future, too_old = [], []
    latest = pd.Timestamp(now + MAX_CLOCK_SKEW)
    earliest = pd.Timestamp(EARLIEST_CAPTURE)
    for v in values:
        if isinstance(v, pd.Timestamp) and not pd.isna(v):
            ts = v if v.tzinfo is not None else v.tz_localize("UTC")
            future.append(bool(ts > latest))
            too_old.append(bool(ts < earliest))
        else:
            future.append(None)
            too_old.append(None)
    return future, too_old


def build_frame(store: "Store", drop_id: str, manifest: "pd.DataFrame",
                spec: "ModelSpec") -> tuple["pd.DataFrame", dict[str, Any]]:
    """The manifest plus the derived per-row columns the suite checks, for ``spec``'s model."""
    import pandas as pd

    from tasks.adapters.storage import ObjectNotFound

    info: dict[str, Any] = {}
    df = manifest.reset_index(drop=True).copy()
    # GX checks value types on object columns (python str / pd.Timestamp): pandas'
    # extension dtypes ("str", tz-aware datetime) are not understood by its type list.
    for col in df.columns:
        dtype = df[col].dtype
        if isinstance(dtype, pd.StringDtype) or isinstance(dtype, pd.DatetimeTZDtype):
            df[col] = df[col].astype(object)
    df["drop_model"] = pd.Series([drops.drop_model(store, drop_id)] * len(df), index=df.index, dtype=object)
    if "label" in df.columns:
        n = len(df)
        shares = df["label"].map(df["label"].value_counts(dropna=False) / n) if n else df["label"]
        df["class_share"] = pd.Series(shares, index=df.index, dtype="float64")
    if "captured_at" in df.columns:
        future, too_old = _captured_at_checks(df["captured_at"], dt.datetime.now(dt.timezone.utc))
        df["captured_at_future"] = pd.Series(future, index=df.index, dtype=object)
        df["captured_at_too_old"] = pd.Series(too_old, index=df.index, dtype=object)
    if "image_id" in df.columns:
        ids = [str(i) for i in df["image_id"]]
        unique_ids = list(dict.fromkeys(ids))

        def fetch(image_id: str) -> bytes | None:
            try:
                return store.get_bytes(drops.image_key(drop_id, image_id, spec))
            except (ObjectNotFound, ValueError):  # ValueError: an id that is not a valid key
                return None

        t0 = time.monotonic()
        blobs = dict(zip(unique_ids, drops._parallel(fetch, unique_ids)))
        per_id = {i: _inspect_image(b, spec) for i, b in blobs.items()}
        info["images_read_seconds"] = round(time.monotonic() - t0, 3)
        info["images_checked"] = len(per_id)
        for col in ("decodes", "decode_error", "decoded_shape", "decoded_shape_ok", "file_sha256", "file_format",
                    "format_ok"):
            df[col] = pd.Series([per_id[i][col] for i in ids], index=df.index, dtype=object)
        df["pixel_std"] = pd.Series([per_id[i]["pixel_std"] for i in ids], index=df.index, dtype="float64")
        if "sha256" in df.columns:
            df["sha256_matches_file"] = pd.Series(
                [None if f is None else bool(f == str(m)) for f, m in zip(df["file_sha256"], df["sha256"])],
                index=df.index, dtype=object)
        earlier, used = _earlier_hashes(store, drop_id)
        info["earlier_drops_compared"] = used
        info["earlier_hashes"] = len(earlier)
        seen_in = [earlier.get(f) if f is not None else None for f in df["file_sha256"]]
        df["seen_before"] = pd.Series([s is not None for s in seen_in], index=df.index, dtype=bool)
        df["seen_in"] = pd.Series(seen_in, index=df.index, dtype=object)
    return df, info


# ---------------------------------------------------------------- the suite

def _fill(value: Any, params: dict[str, Any]) -> Any:
    if isinstance(value, str):
        m = _PLACEHOLDER.match(value)
        if m:
            if m.group(1) not in params:
                raise KeyError(f"suite placeholder ${m.group(1)} has no value")
            return params[m.group(1)]
        return value
    if isinstance(value, list):
        return [_fill(v, params) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, params) for k, v in value.items()}
    return value


def _fill_text(text: str, params: dict[str, Any]) -> str:
    for name in sorted(params, key=len, reverse=True):
        text = text.replace(f"${name}", str(params[name]))
    return text


def render_suite(spec: dict[str, Any], params: dict[str, Any], columns: set[str]) -> tuple[list[dict], list[dict]]:
    """(expectations to run, skipped ones) with placeholders filled in."""
    run, skipped = [], []
    for exp in spec["expectations"]:
        exp = copy.deepcopy(exp)
        exp["kwargs"] = _fill(exp["kwargs"], params)
        meta = exp.setdefault("meta", {})
        if "message" in meta:
            meta["message"] = _fill_text(meta["message"], params)
        col = exp["kwargs"].get("column")
        if col is not None and col not in columns and exp["type"] != "expect_column_to_exist":
            skipped.append({"expectation": exp["type"], "column": col,
                            "reason": f"column {col!r} is not in the manifest (or cannot be derived without it)"})
            continue
        run.append(exp)
    return run, skipped


# ---------------------------------------------------------------- failures

def _jsonable(v: Any) -> Any:
    import numpy as np

    if isinstance(v, np.generic):
        return v.item()
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return str(v)


def _sample(values: list[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        v = _jsonable(v)
        if v not in out:
            out.append(v)
        if len(out) >= SAMPLE_SIZE:
            break
    return out


def _failure(r: Any, df: "pd.DataFrame", params: dict[str, Any]) -> dict[str, Any]:
    cfg = r.expectation_config
    etype, kwargs, meta = cfg.type, dict(cfg.kwargs), dict(cfg.meta or {})
    col = kwargs.get("column")
    res = dict(r.result or {})
    message = meta.get("message", etype)
    label = f"{etype}({col})" if col else etype
    f: dict[str, Any] = {"expectation": etype, "column": col, "check": meta.get("check"), "message": message,
                         "unexpected_count": None, "element_count": None, "unexpected_percent": None,
                         "observed_value": None, "sample": []}
    exc = (r.exception_info or {}) if hasattr(r, "exception_info") else {}
    if exc.get("raised_exception"):
        f["error"] = str(exc.get("exception_message"))[:300]
        f["summary"] = f"{label}: could not be evaluated ({f['error']}) -- {message}"
        return f
    if "unexpected_count" in res:
        n_bad, n = int(res["unexpected_count"]), int(res.get("element_count") or 0)
        pct = 100.0 * n_bad / n if n else 0.0
        idx = res.get("partial_unexpected_index_list") or []
        sample_col = meta.get("sample_column")
        if sample_col and sample_col in df.columns and idx and all(isinstance(i, int) for i in idx):
            sample = _sample(df.loc[[i for i in idx if i in df.index], sample_col].tolist())
        else:
            sample = _sample(res.get("partial_unexpected_list") or [])
        f.update(unexpected_count=n_bad, element_count=n, unexpected_percent=round(pct, 3), sample=sample)
        if "image_id" in df.columns and idx and all(isinstance(i, int) for i in idx):
            f["sample_image_ids"] = _sample([df.at[i, "image_id"] for i in idx if i in df.index])
        detail = ""
        if col == "class_share" and "label" in df.columns and len(df):
            shares = df["label"].value_counts(normalize=True)
            bad = {k: v for k, v in shares.items()
                   if not params["min_class_share"] <= v <= params["max_class_share"]}
            f["classes_out_of_bounds"] = {str(_jsonable(k)): round(float(v), 4) for k, v in sorted(bad.items())}
            detail = "; classes " + ", ".join(f"{_jsonable(k)} ({100 * v:.1f}%)" for k, v in sorted(bad.items()))
            f["sample"] = sorted(_jsonable(k) for k in bad)[:SAMPLE_SIZE]
        f["summary"] = (f"{label}: {n_bad} of {n} rows unexpected ({pct:.1f}%), sample {f['sample']} "
                        f"-- {message}{detail}")
        return f
    observed = res.get("observed_value")
    f["observed_value"] = _jsonable(observed) if not isinstance(observed, list) else [_jsonable(v) for v in observed]
    if etype == "expect_column_to_exist":
        f["summary"] = f"{label}: column {col!r} missing from the manifest -- {message}"
    elif etype == "expect_table_columns_to_match_set":
        mism = (res.get("details") or {}).get("mismatched") or {}
        f["missing_columns"] = list(mism.get("missing") or [])
        f["unexpected_columns"] = list(mism.get("unexpected") or [])
        f["summary"] = (f"{label}: missing columns {f['missing_columns']}, unexpected columns "
                        f"{f['unexpected_columns']} -- {message}")
    elif etype == "expect_table_row_count_to_be_between":
        f["summary"] = (f"{label}: observed {observed} rows, expected {kwargs.get('min_value')}.."
                        f"{kwargs.get('max_value')} -- {message}")
    elif etype == "expect_column_distinct_values_to_contain_set":
        missing = [_jsonable(v) for v in (res.get("partial_missing_list") or [])]
        if not missing:
            present = set(df[col].dropna().tolist()) if col in df.columns else set()
            missing = [v for v in kwargs.get("value_set", []) if v not in present]
        f["missing_values"] = missing
        f["sample"] = missing[:SAMPLE_SIZE]
        f["summary"] = f"{label}: values {missing} never occur -- {message}"
    elif etype == "expect_column_values_to_be_in_type_list":
        f["summary"] = f"{label}: observed type {observed}, expected one of {kwargs.get('type_list')} -- {message}"
    else:
        f["summary"] = f"{label}: observed {observed} -- {message}"
    return f


# ---------------------------------------------------------------- GX run

def _run_gx(df: "pd.DataFrame", expectations: list[dict], docs_dir: Path, suite_name: str,
            run_name: str) -> Any:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    gx_logger = logging.getLogger("great_expectations")
    if gx_logger.level == logging.NOTSET:  # GX is chatty at INFO (docs decorators, temp dirs)
        gx_logger.setLevel(logging.WARNING)
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    base_logger = logging.getLogger("great_expectations.data_context.types.base")
    if base_logger.level == logging.INFO:  # GX pins this one to INFO at import ("Created temporary directory")
        base_logger.setLevel(logging.WARNING)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    context.add_data_docs_site(site_name=SITE_NAME, site_config={
        "class_name": "SiteBuilder",
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
    })
    source = context.data_sources.add_pandas("drops")
    batch_def = source.add_dataframe_asset(name="manifest").add_batch_definition_whole_dataframe("whole_drop")
    suite = gx.ExpectationSuite(
        name=suite_name,
        expectations=[ExpectationConfiguration(type=e["type"], kwargs=e["kwargs"], meta=e.get("meta")).to_domain_obj()
                      for e in expectations],
    )
    suite = context.suites.add(suite)
    vdef = context.validation_definitions.add(gx.ValidationDefinition(name=run_name, data=batch_def, suite=suite))
    checkpoint = context.checkpoints.add(gx.Checkpoint(
        name=f"{run_name}-checkpoint", validation_definitions=[vdef],
        actions=[gx.checkpoint.UpdateDataDocsAction(name="update_data_docs", site_names=[SITE_NAME])],
        result_format={"result_format": "SUMMARY"},
    ))
    from great_expectations.core.run_identifier import RunIdentifier

    result = checkpoint.run(batch_parameters={"dataframe": df},
                            run_id=RunIdentifier(run_name=run_name, run_time=dt.datetime.now(dt.timezone.utc)))
    return next(iter(result.run_results.values()))


def suite_params(spec: "ModelSpec", thresholds: dict[str, Any], frame_columns: list[str]) -> dict[str, Any]:
    """The values of the suite's ``$name`` placeholders: the model spec's expectations and the thresholds."""
    accepted = FORMAT_NAMES[spec.image_encoding]
    return {
        **thresholds,
        "model": spec.name,
        "models": [spec.name],
        "image_height": spec.input.height,
        "image_width": spec.input.width,
        "image_shape": "x".join(map(str, spec.image_shape)),
        "image_mode": f"{spec.input.channels}-channel {'8-bit grayscale' if spec.input.channels == 1 else 'RGB'}",
        "image_format": accepted,
        "image_extension": drops.IMAGE_EXTENSIONS[spec.image_encoding],
        "spec_encodings": ", ".join(spec.frames.encodings),
        "class_ids": list(range(spec.num_classes)),
        "class_range": f"0..{spec.num_classes - 1}",
        "num_classes": spec.num_classes,
        "required_classes": list(range(spec.num_classes)) if thresholds["min_class_share"] > 0 else [],
        "frame_columns": frame_columns,
        "min_pixel_std": MIN_PIXEL_STD,
        "max_clock_skew": f"{int(MAX_CLOCK_SKEW.total_seconds() // 60)} min",
        "earliest_capture": EARLIEST_CAPTURE.date().isoformat(),
    }


def validate_drop(store: "Store", drop_id: str, *, spec: "ModelSpec | None" = None, min_rows: int | None = None,
                  max_rows: int | None = None, min_class_share: float | None = None,
                  max_class_share: float | None = None, pipeline: "PipelineSpec | None" = None) -> ValidationResult:
    """Validate ``drops/<drop_id>/`` against ``spec`` (default the configured model, ``MLPIPE_MODEL_NAME``) and
    store ``validation/result.json`` (recording the model) + Data Docs beside it.

    ``drop_id`` may be ``latest`` (the newest complete drop). Thresholds default to
    ``default_thresholds(spec)``. Raises DropNotFound / DropIncomplete / DropUnreadable
    (all ``DropError``, a ``ValueError``) for a drop that cannot be read, and
    ValueError for bad thresholds. A failing drop is not an exception: see
    ``ValidationResult.success`` and ``.failures``.

    ``pipeline``: the drop is that pipeline's scene drop; ``spec`` is then its detector's (the frames' size,
    channels and encoding), the suite is ``scene_suite_spec`` and the result records the pipeline's name. A
    scene drop validated by a member's name (``--model scenes-detector``, ``spec`` a member) is validated the same
    way (``drop.json`` names the pipeline), so the result serves every member.
    """
    t0 = time.monotonic()
    if spec is None:
        from tasks.config import load_settings

        spec = load_settings().model_spec()
    drop_id = drops.resolve_drop_id(store, drop_id)
    if pipeline is None:  # validated by a member's name: a scene drop of its pipeline is validated as the pipeline's
        pipeline = _scene_pipeline(store, drop_id, spec)
        if pipeline is not None:
            from tasks.config import load_settings as _settings
            from tasks.contracts.pipeline import member_specs

            spec = member_specs(pipeline, _settings().models_dir)["detector"]
    thresholds = _check_thresholds({"min_rows": min_rows, "max_rows": max_rows,
                                    "min_class_share": min_class_share, "max_class_share": max_class_share},
                                   spec)
    manifest = drops.read_manifest(store, drop_id)
    manifest_bytes = store.get_bytes(drops.manifest_key(drop_id))
    logger.info("validating drop %s for %s: %d rows, columns %s", drop_id,
                spec.name if pipeline is None else f"pipeline {pipeline.name} (frames of {spec.name})", len(manifest),
                list(manifest.columns))
    df, frame_info = build_frame(store, drop_id, manifest, spec)
    owner = spec.name
    if pipeline is not None:
        from tasks.config import load_settings as _settings
        from tasks.contracts.pipeline import member_specs

        _scene_columns(df, spec, member_specs(pipeline, _settings().models_dir)["classifier"])
        owner = pipeline.name
    if sha256_bytes(manifest_bytes) != _manifest_sha(store, drop_id) or not manifest.equals(
            drops.read_manifest(store, drop_id)):
        raise drops.DropChanged(f"drop {drop_id!r}: its manifest was replaced while it was being validated; "
                                "validate it again once the producer has finished writing")

    suite = load_suite_spec() if pipeline is None else scene_suite_spec()
    derived_present = [c for c in suite["derived_columns"] if c in df.columns]
    params = suite_params(spec, thresholds, list(suite["manifest_columns"]) + derived_present)
    if pipeline is not None:
        from tasks.config import load_settings as _settings
        from tasks.contracts.pipeline import member_specs

        classifier = member_specs(pipeline, _settings().models_dir)["classifier"]
        params.update(model=owner, models=[owner], classifier=classifier.name, min_objects=spec.detection.min_objects,
                      max_objects=spec.detection.max_objects, min_box_size=spec.detection.min_box_size,
                      class_range=f"0..{classifier.num_classes - 1}")
    expectations, skipped = render_suite(suite, params, set(df.columns))

    with tempfile.TemporaryDirectory(prefix="mlpipe-validate-") as tmp:
        docs_dir = Path(tmp) / "data_docs"
        t_gx = time.monotonic()
        vres = _run_gx(df, expectations, docs_dir, suite["name"], f"drop-{drop_id}")
        gx_seconds = time.monotonic() - t_gx
        from tasks.steps.data_docs import make_offline

        make_offline(docs_dir)  # no CDN asset: the site renders where nothing outside can be reached
        failures = [_failure(r, df, thresholds) for r in vres.results if not r.success]
        # Re-validation overwrites: upload the new site, remove files of an older
        # site that the new one does not have, write result.json last.
        docs_prefix = layout.data_docs_prefix(drop_id)
        stale = set(store.list(docs_prefix))
        uploaded = store.put_dir(docs_prefix, docs_dir)
        drops._parallel(store.delete, sorted(stale - set(uploaded)))

    checks = [{"expectation": r.expectation_config.type, "column": r.expectation_config.kwargs.get("column"),
               "success": bool(r.success)} for r in vres.results]
    stats = dict(vres.statistics or {})
    statistics = {
        "rows": int(len(manifest)),
        "columns": [str(c) for c in manifest.columns],
        "evaluated_expectations": int(stats.get("evaluated_expectations", len(checks))),
        "successful_expectations": int(stats.get("successful_expectations", 0)),
        "unsuccessful_expectations": int(stats.get("unsuccessful_expectations", len(failures))),
        "skipped": skipped,
        "checks": checks,
        "class_counts": ({str(_jsonable(k)): int(v) for k, v in sorted(manifest["label"].value_counts().items())}
                         if "label" in manifest.columns else {}),
        **frame_info,
        "data_docs_files": len(uploaded),
        "gx_seconds": round(gx_seconds, 3),
        "seconds": round(time.monotonic() - t0, 3),
    }
    result = ValidationResult(
        drop_id=drop_id,
        model=owner,
        success=bool(vres.success) and not failures,
        failures=failures,
        statistics=statistics,
        report_uri=store.uri(report_key(drop_id)),
        result_uri=store.uri(result_key(drop_id)),
        thresholds=thresholds,
        validated_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
    # Bind the result to the bytes it checked: the manifest read above and every object under images/
    # (the validated images' hashes from the frame; any other file there is read and hashed now).
    known = ({drops.image_name(i, spec): h for i, h in zip(df["image_id"].astype(str), df["file_sha256"]) if h is not None}
             if "file_sha256" in df.columns else {})
    content = drops.content_digest(store, drop_id, known=known, manifest_bytes=manifest_bytes)
    result.content = drops.content_summary(content)
    drops.bind_validation(store, drop_id, {**result.to_dict(), "suite": suite["name"],
                                           "manifest_sha256": content["manifest_sha256"]}, content)
    for line in result.failure_lines():
        logger.error("%s", line)
    logger.info("drop %s validation for model %s %s: %d/%d expectations passed, %d skipped, %.1fs; report %s",
                drop_id, owner, "PASSED" if result.success else "FAILED", statistics["successful_expectations"],
                statistics["evaluated_expectations"], len(skipped), statistics["seconds"], result.report_uri)
    return result


def _scene_pipeline(store: "Store", drop_id: str, spec: "ModelSpec") -> "PipelineSpec | None":
    """The pipeline whose scene drop ``drop_id`` is, when ``spec`` is one of its members (``drop.json`` names the
    pipeline): such a drop is validated with the pipeline's scene suite, whichever member's name was given."""
    made_for = drops.drop_model(store, drop_id)
    if made_for is None or made_for == spec.name or not drops.made_for_model(made_for, spec.name):
        return None
    from tasks.config import load_settings
    from tasks.contracts.pipeline import find_pipeline

    return find_pipeline(made_for, load_settings().models_dir)


def _manifest_sha(store: "Store", drop_id: str) -> str:
    return sha256_bytes(store.get_bytes(drops.manifest_key(drop_id)))


# ---------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv, bad_input=(ValueError,))  # DropError is a BadInput; ValueError: bad options


def _main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog="mlpipe validate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, metavar="NAME",
                   help="the model whose spec the drop must match (models/<NAME>/spec.yaml; default "
                        "$MLPIPE_MODEL_NAME or digits)")
    p.add_argument("--drop-id", required=True, help="drop to validate (drops/<ID>/ in the store), or 'latest'")
    p.add_argument("--result-json", default=None, help="write the result dict here (for Airflow XCom)")
    p.add_argument("--min-rows", type=int, default=None, help=f"default {DEFAULT_THRESHOLDS['min_rows']}")
    p.add_argument("--max-rows", type=int, default=None, help=f"default {DEFAULT_THRESHOLDS['max_rows']}")
    p.add_argument("--min-class-share", type=float, default=None,
                   help=f"smallest allowed share of any class (default {MIN_SHARE_OF_UNIFORM:g} / number of classes)")
    p.add_argument("--max-class-share", type=float, default=None,
                   help=f"largest allowed share of any class (default {MAX_SHARE_OF_UNIFORM:g} / number of classes, "
                        "at most 1)")
    args = p.parse_args(argv)
    setup_logging()
    from tasks.adapters.storage import open_store
    from tasks.config import load_settings

    store = open_store()
    cfg = load_settings()
    pipeline = None
    if cfg.is_pipeline(args.model):  # a pipeline's scene drop: the detector's frames plus the scene rules
        from tasks.contracts.pipeline import find_pipeline

        pipeline = find_pipeline(args.model or cfg.model_name, cfg.models_dir)
    result = validate_drop(store, args.drop_id, spec=cfg.frame_spec(args.model), min_rows=args.min_rows,
                           max_rows=args.max_rows, min_class_share=args.min_class_share,
                           max_class_share=args.max_class_share, pipeline=pipeline)
    out = result.to_dict()
    if args.result_json:
        write_result_json(args.result_json, out)
    if result.success:
        print(json.dumps({"drop_id": result.drop_id, "model": result.model, "success": True, "report_uri": result.report_uri,
                          "result_uri": result.result_uri, "rows": result.statistics["rows"]}, indent=2))
        return 0
    # the failed expectations were logged by validate_drop, one line each: not repeated here
    raise ValidationFailed(f"drop {result.drop_id} failed validation for model {result.model} ({len(result.failures)} failed "
                           f"expectations); report: {result.report_uri}")


if __name__ == "__main__":
    sys.exit(main())
