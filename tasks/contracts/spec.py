"""The model spec: one YAML file per model project (``models/<name>/spec.yaml``) that declares the model.

What a model is, in one place: its classes, the image it takes, the frames the pipeline accepts
for it, the preprocessing, the embedding, the ONNX tensor names, the trainer, the QC gate's
thresholds, how its golden set is drawn and the drift thresholds of its monitor. ``ModelSpec`` is
the typed model; ``docs/model-spec.schema.json`` is its published JSON Schema (``mlpipe spec
schema`` prints it, ``tests/static/test_spec_schema.py`` fails when the committed file drifts);
``mlpipe spec check FILE`` validates a file and explains every error by field path and rule.

Every layer reads the model's numbers from here: ``tasks.config.Settings.model_spec(name)`` finds
``$MLPIPE_MODELS_DIR/<name>/spec.yaml`` (``find_spec``; the model name is ``MLPIPE_MODEL_NAME`` or a
step's ``--model``). No module outside this one keeps a shape, a class count or an embedding size
(``tests/static/test_no_model_constants.py``).

Rules beyond the types (each error names its field and rule, one line each):

* unknown keys are errors (``extra="forbid"``) at every level; values are not coerced
  (``"28"`` is not an integer, ``true`` is not 1);
* ``classes``: at least two; ``classes[i].id == i`` (ids 0..n-1 in order, without gaps or
  repeats); names unique and non-empty;
* ``input``: ``channels`` 1 or 3; ``height`` / ``width`` positive or ``null`` (any size);
  a ``stretch`` or ``letterbox`` resize needs both fixed (the target size);
* ``frames``: ``raw`` needs a fixed input size and ``raw_bytes == height * width * channels``
  (raw frames carry no header: the size is the only check); ``raw_bytes`` only with ``raw``;
  every size at most ``max_frame_bytes``; encodings listed once;
* ``preprocessing.normalisation``: ``scale > 0``; ``mean`` and ``std`` one value per input
  channel, ``std > 0``;
* ``onnx``: the three tensor names distinct;
* ``trainer.entry_point`` looks like ``module:function``; ``trainer.args`` use only the
  placeholders of ``TRAINER_PLACEHOLDERS`` and pass ``{drop_ids}``;
* QC fractions (accuracy, recall, regression) in [0, 1], parity tolerances > 0; drift thresholds
  >= 0, the bounded ones (JS, KS, confidence drop) <= 1, cosine distance <= 2, ``min_samples``
  >= 10 (``tasks.steps.monitor.Thresholds``).

The trainer contract (both paths, the same contract; also docs/CONTRACTS.md "Model spec"):

* **in**: validated data drops (``drops/<id>/``, the drop format of docs/CONTRACTS.md), by id;
* **out**: under ``runs/<run_id>/`` in the object store, ``model.onnx`` whose input is named
  ``onnx.input`` (float32, the spec's ``input`` layout and size after ``preprocessing``) and whose
  outputs are ``onnx.logits`` (float32 ``[N, len(classes)]``) and ``onnx.embedding`` (float32
  ``[N, embedding_dim]``), batch axis dynamic; plus ``metrics.json`` (a JSON object of the run's
  metrics);
* **local path**: ``trainer.entry_point`` (``module:function``) is imported and called as
  ``function(store, drop_ids, *, spec=..., run_id=..., seed=..., epochs=..., ...)``; it returns the result dict (at
  least ``run_id``, ``drop_ids``, ``onnx_key``, ``metrics``) and raises the error kinds of
  ``tasks.contracts.errors`` (BadInput, Rejected, Transient);
* **pod path**: ``trainer.image`` runs ``trainer.command`` + ``trainer.args`` (placeholders filled
  in) + ``--result-json PATH``; it writes the same result dict as JSON to PATH and exits with the
  codes of ``tasks.contracts.errors``.

YAML is read with PyYAML (pinned in requirements.txt), imported inside ``parse_spec`` only, so
importing this module needs nothing but the stdlib and pydantic.
"""

from __future__ import annotations

import json
import re
import string
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from tasks.contracts.errors import BadInput

SPEC_FILE = "spec.yaml"
#: where model projects live: ``models/<name>/spec.yaml`` at the repository root.
MODELS_DIR = "models"
SCHEMA_ID = "https://mlpipe.dev/schemas/model-spec.schema.json"
SCHEMA_PATH = "docs/model-spec.schema.json"

TASKS = ("classification", "detection")
ENCODINGS = ("png", "jpeg", "raw")
#: placeholders ``trainer.args`` may use (filled in by the step factory).
TRAINER_PLACEHOLDERS = {
    "drop_ids": "the validated drop ids, comma-separated",
    "run_id": "the run id (outputs go to runs/<run_id>/)",
    "seed": "the random seed of the run",
    "epochs": "the maximum number of epochs",
}
_ENTRY_POINT = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_RULES = "spec_rules"  # the error type that carries several located problems (see _fail)
_CUSTOM = {"entry_point", "model_name"}  # our other error types: their message is complete


def _fail(problems: list[tuple[tuple[str | int, ...], str]]) -> None:
    """Raise one pydantic error carrying ``problems`` (path relative to the validated value, rule)."""
    if problems:
        summary = "; ".join(f"{_path(loc) or '(here)'}: {msg}" for loc, msg in problems)
        raise PydanticCustomError(_RULES, "{summary}", {"summary": summary, "problems": problems})


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ClassSpec(_Section):
    """One class: its id (the logit index) and its name (what a prediction reports)."""

    id: int = Field(ge=0, description="the logit index: classes[i].id == i")
    name: str = Field(min_length=1, description="the label a prediction reports; unique")


class InputSpec(_Section):
    """The image the model takes: size, channels, layout of the ONNX input tensor, pixel type."""

    height: int | None = Field(gt=0, description="pixels; null = any height (needs resize: none)")
    width: int | None = Field(gt=0, description="pixels; null = any width (needs resize: none)")
    channels: Literal[1, 3] = Field(description="1 = grayscale, 3 = RGB")
    layout: Literal["NCHW", "NHWC"] = Field("NCHW", description="axis order of the ONNX input tensor")
    dtype: Literal["uint8"] = Field("uint8", description="pixel type of a decoded frame")

    @property
    def fixed(self) -> bool:
        return self.height is not None and self.width is not None

    @property
    def pixels(self) -> int | None:
        """height * width * channels (the bytes of one uint8 frame), None for a variable size."""
        return self.height * self.width * self.channels if self.fixed else None  # type: ignore[operator]


class FramesSpec(_Section):
    """What the serving path accepts as a frame (Kafka value, gateway body)."""

    encodings: list[Literal["png", "jpeg", "raw"]] = Field(
        min_length=1, description="accepted encodings; raw = the pixels, row-major, no header")
    max_frame_bytes: int = Field(gt=0, description="a larger frame is a dead letter (oversize)")
    raw_bytes: int | None = Field(None, gt=0, description="size of a raw frame: height*width*channels; "
                                                          "required with raw, only with raw")

    @model_validator(mode="after")
    def _rules(self) -> "FramesSpec":
        problems: list[tuple[tuple[str | int, ...], str]] = []
        seen: set[str] = set()
        for i, enc in enumerate(self.encodings):
            if enc in seen:
                problems.append((("encodings", i), f"each encoding is listed once ({enc!r} is repeated)"))
            seen.add(enc)
        if "raw" in self.encodings and self.raw_bytes is None:
            problems.append((("raw_bytes",), "the raw encoding needs a fixed frame size: set raw_bytes "
                                             "(height * width * channels)"))
        if "raw" not in self.encodings and self.raw_bytes is not None:
            problems.append((("raw_bytes",), f"only meaningful with the raw encoding (got {self.raw_bytes}, "
                                             f"encodings {self.encodings})"))
        if self.raw_bytes is not None and self.raw_bytes > self.max_frame_bytes:
            problems.append((("raw_bytes",), f"must be at most max_frame_bytes ({self.max_frame_bytes}) "
                                             f"(got {self.raw_bytes})"))
        _fail(problems)
        return self


class NormalisationSpec(_Section):
    """``x = (pixel * scale - mean[c]) / std[c]`` per channel, before the ONNX input."""

    scale: float = Field(gt=0, description="pixel multiplier, e.g. 1/255 = 0.00392156862745098")
    mean: list[float] = Field(min_length=1, description="one per channel, subtracted after scaling")
    std: list[Annotated[float, Field(gt=0)]] = Field(min_length=1, description="one per channel, > 0")

    @model_validator(mode="after")
    def _rules(self) -> "NormalisationSpec":
        if len(self.mean) != len(self.std):
            _fail([(("std",), f"needs one value per mean value ({len(self.mean)}) (got {len(self.std)})")])
        return self


class PreprocessingSpec(_Section):
    """From a decoded frame to the ONNX input."""

    resize: Literal["none", "stretch", "letterbox"] = Field(
        description="none: a frame of another size is rejected (wrong_shape); stretch: resized to "
                    "height x width; letterbox: scaled to fit, aspect kept, padded with 0")
    normalisation: NormalisationSpec


class OnnxSpec(_Section):
    """Tensor names of ``model.onnx`` (docs/CONTRACTS.md "ONNX classifier")."""

    input: str = Field(min_length=1, description="float32 input after preprocessing")
    logits: str = Field(min_length=1, description="classification: float32 [N, number of classes]; detection: "
                                                   "the centre heatmap logits float32 [N, classes, H/stride, W/stride]")
    embedding: str = Field(min_length=1, description="float32 [N, embedding_dim]")
    box_size: str | None = Field(None, min_length=1, description="detection only: float32 [N, 2, H/stride, "
                                                                 "W/stride], box (width, height) in input pixels")

    @model_validator(mode="after")
    def _rules(self) -> "OnnxSpec":
        names = {"input": self.input, "logits": self.logits, "embedding": self.embedding}
        if self.box_size is not None:
            names["box_size"] = self.box_size
        seen: dict[str, str] = {}
        problems: list[tuple[tuple[str | int, ...], str]] = []
        for field, name in names.items():
            if name in seen:
                problems.append(((field,), f"tensor names must be distinct ({name!r} is also onnx.{seen[name]})"))
            seen.setdefault(name, field)
        _fail(problems)
        return self


class TrainerSpec(_Section):
    """The trainer, behind one contract for both paths (this module's docstring)."""

    entry_point: str = Field(description="local path: module:function, called with (store, drop_ids, ...)")
    image: str = Field(min_length=1, description="pod path: the container image")
    command: list[str] = Field(min_length=1, description="pod path: the container command")
    args: list[str] = Field(description="pod path: arguments after the command; placeholders "
                                        + ", ".join(f"{{{k}}}" for k in TRAINER_PLACEHOLDERS)
                                        + "; --result-json PATH is appended")

    @field_validator("entry_point")
    @classmethod
    def _entry_point(cls, value: str) -> str:
        if not _ENTRY_POINT.match(value):
            raise PydanticCustomError("entry_point", "must look like module:function (got {got})",
                                      {"got": repr(value)})
        return value

    @field_validator("args")
    @classmethod
    def _args(cls, args: list[str]) -> list[str]:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        used: set[str] = set()
        for i, arg in enumerate(args):
            try:
                fields = [f for _, f, _, _ in string.Formatter().parse(arg) if f is not None]
            except ValueError as exc:
                problems.append(((i,), f"not a valid placeholder string ({exc}) (got {arg!r})"))
                continue
            for name in fields:
                if name not in TRAINER_PLACEHOLDERS:
                    problems.append(((i,), f"unknown placeholder {{{name}}} (known: "
                                           + ", ".join(f"{{{k}}}" for k in TRAINER_PLACEHOLDERS) + ")"))
                used.add(name)
        if not problems and "drop_ids" not in used:
            problems.append(((), "must pass the drops in: no argument uses {drop_ids}"))
        _fail(problems)
        return args


class QCSpec(_Section):
    """Thresholds of the QC gate (``tasks.steps.qc.QCThresholds``) on the golden set.

    Classification needs ``min_accuracy`` and ``min_class_recall``; detection needs ``min_precision`` and
    ``min_recall`` (boxes matched at ``iou_threshold``; ``max_regression`` is then the largest recall drop)."""

    min_accuracy: float | None = Field(None, ge=0, le=1, description="classification: golden-set accuracy, a "
                                                                     "fraction")
    min_class_recall: float | None = Field(None, ge=0, le=1, description="classification: lowest per-class "
                                                                         "recall, a fraction")
    min_precision: float | None = Field(None, ge=0, le=1, description="detection: golden-scene box precision "
                                                                      "at iou_threshold")
    min_recall: float | None = Field(None, ge=0, le=1, description="detection: golden-scene box recall at "
                                                                   "iou_threshold")
    iou_threshold: float = Field(0.5, gt=0, le=1, description="detection: least IoU of a matched box")
    max_regression: float = Field(ge=0, le=1, description="largest drop against the champion (classification: "
                                                          "accuracy; detection: recall)")
    max_parity_diff: float = Field(gt=0, description="largest |ONNX - PyTorch| output difference")
    max_trt_parity_diff: float = Field(gt=0, description="largest |TensorRT - ONNX| output difference")


class DetectionSpec(_Section):
    """How a detector's outputs become boxes (``tasks/model/scene_codec.py`` ``decode_centres``), the bounds of
    a drop's objects (``validate``) and the pipeline's fixed output size (``max_objects`` boxes per frame)."""

    stride: int = Field(gt=0, description="input pixels per heatmap cell: the heatmap is [H/stride, W/stride]")
    max_objects: int = Field(gt=0, le=64, description="most objects per frame: more in a drop row is rejected; "
                                                      "the pipeline answers this many box slots")
    min_objects: int = Field(0, ge=0, description="fewest objects in a drop row (0: frames without objects "
                                                  "are valid)")
    score_threshold: float = Field(gt=0, lt=1, description="least centre score (sigmoid of the heatmap) of a box")
    peak_window: int = Field(3, ge=1, description="odd size of the max-pool window that keeps local peaks only")
    min_box_size: float = Field(4.0, gt=0, description="pixels: a decoded box narrower or lower is dropped, and a "
                                                       "drop box smaller than this is rejected")

    @model_validator(mode="after")
    def _rules(self) -> "DetectionSpec":
        problems: list[tuple[tuple[str | int, ...], str]] = []
        if self.peak_window % 2 != 1:
            problems.append((("peak_window",), f"must be odd (got {self.peak_window})"))
        if self.min_objects > self.max_objects:
            problems.append((("min_objects",), f"must be at most max_objects ({self.max_objects}) "
                                               f"(got {self.min_objects})"))
        _fail(problems)
        return self


class GoldenSetSpec(_Section):
    """How the fixed held-out golden set is drawn (``tasks.steps.drops.golden_set``): never in a drop."""

    source: str = Field(min_length=1, description="the labelled data drops and the golden set are drawn from "
                        "(tasks/steps/sources.py): mnist, sklearn-digits, shapes, or folder:<path> (one "
                        "sub-folder per class name, relative to the spec file)")
    per_class: int = Field(gt=0, description="images per class")
    seed: int = Field(ge=0, description="fixes the golden/pool split forever: do not change")


class DriftSpec(_Section):
    """Thresholds of the drift monitor (``tasks.steps.monitor.Thresholds``): a check past one is drift."""

    class_psi: float = Field(ge=0, description="population stability index of the predicted classes")
    class_js: float = Field(ge=0, le=1, description="Jensen-Shannon distance (base 2) of the same")
    confidence_drop: float = Field(ge=0, le=1, description="mean top-1 score: reference minus live")
    confidence_ks: float = Field(ge=0, le=1, description="two-sample KS statistic of the top-1 scores")
    embedding_cosine: float = Field(ge=0, le=2, description="cosine distance of the mean embeddings")
    embedding_mmd: float = Field(ge=0, description="squared MMD (RBF kernel, median bandwidth)")
    min_samples: int = Field(ge=10, description="fewer live predictions: insufficient data, no verdict")


def _task_problems(spec: "ModelSpec") -> list[tuple[tuple[str | int, ...], str]]:
    """The rules a task adds: which sections and keys it needs (paths from the top level)."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    if spec.task == "classification":
        if len(spec.classes) < 2:
            problems.append((("classes",), f"a classifier needs at least 2 classes (got {len(spec.classes)})"))
        for key in ("min_accuracy", "min_class_recall"):
            if getattr(spec.qc, key) is None:
                problems.append((("qc", key), "required for task classification"))
        for key, where in (("detection", ()), ("box_size", ("onnx",))):
            if getattr(spec.onnx if where else spec, key) is not None:
                problems.append(((*where, key), "only for task detection"))
    else:
        if spec.detection is None:
            problems.append((("detection",), "required for task detection (stride, max_objects, "
                                             "score_threshold)"))
        if spec.onnx.box_size is None:
            problems.append((("onnx", "box_size"), "required for task detection: the box size output's name"))
        for key in ("min_precision", "min_recall"):
            if getattr(spec.qc, key) is None:
                problems.append((("qc", key), "required for task detection"))
        det, inp = spec.detection, spec.input
        if det is not None and inp.fixed:
            for side in ("height", "width"):
                if getattr(inp, side) % det.stride:
                    problems.append((("detection", "stride"), f"must divide input.{side} "
                                                              f"({getattr(inp, side)}) (got {det.stride})"))
        elif det is not None:
            problems.append((("input",), "a detector needs a fixed input size (input.height and input.width)"))
    return problems


def _cross_section_problems(inp: InputSpec, frames: FramesSpec,
                            pre: PreprocessingSpec) -> list[tuple[tuple[str | int, ...], str]]:
    """The rules between ``input``, ``frames`` and ``preprocessing`` (paths from the top level)."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    if "raw" in frames.encodings and not inp.fixed:
        problems.append((("frames", "encodings"),
                         "the raw encoding needs a fixed input size (input.height and input.width set)"))
    elif frames.raw_bytes is not None and inp.fixed and frames.raw_bytes != inp.pixels:
        problems.append((("frames", "raw_bytes"),
                         f"must be input height * width * channels = {inp.height}*{inp.width}*{inp.channels} "
                         f"= {inp.pixels} (got {frames.raw_bytes})"))
    if pre.resize != "none" and not inp.fixed:
        problems.append((("preprocessing", "resize"),
                         f"{pre.resize} needs a fixed input size (input.height and input.width set)"))
    for field in ("mean", "std"):
        values = getattr(pre.normalisation, field)
        if len(values) != inp.channels:
            problems.append((("preprocessing", "normalisation", field),
                             f"needs one value per input channel ({inp.channels}) (got {len(values)})"))
    return problems


class ModelSpec(_Section):
    """A model project's spec (``models/<name>/spec.yaml``); see the module docstring for the rules."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, title="mlpipe model spec",
                              json_schema_extra={"$schema": "https://json-schema.org/draft/2020-12/schema",
                                                 "$id": SCHEMA_ID})

    name: str = Field(description="the model's name: registry models/<name>/, Triton model <name>")
    task: Literal["classification", "detection"] = Field(
        description="classification (logits per image) or detection (centre heatmap and box sizes)")
    description: str = Field("", description="free text")
    classes: list[ClassSpec] = Field(min_length=1, description="in id order: classes[i].id == i; a classifier "
                                                               "needs two or more")
    input: InputSpec
    frames: FramesSpec
    preprocessing: PreprocessingSpec
    embedding_dim: int = Field(gt=0, description="size of the embedding output")
    onnx: OnnxSpec
    trainer: TrainerSpec
    qc: QCSpec
    golden_set: GoldenSetSpec
    drift: DriftSpec
    detection: DetectionSpec | None = Field(None, description="detection only: decoding and object bounds")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise PydanticCustomError("model_name", "must be lower case letters, digits, '-' or '_', starting "
                                      "with a letter, at most 63 (got {got})", {"got": repr(value)})
        return value

    @field_validator("classes")
    @classmethod
    def _classes(cls, classes: list[ClassSpec]) -> list[ClassSpec]:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        names: dict[str, int] = {}
        for i, c in enumerate(classes):
            if c.id != i:
                after = f"after {classes[i - 1].id}" if i else "first, expected 0"
                problems.append(((i, "id"), f"class ids must be 0..n-1 without gaps (got {c.id} {after})"))
            if c.name in names:
                problems.append(((i, "name"), f"class names must be unique ({c.name!r} is also "
                                              f"classes[{names[c.name]}].name)"))
            names.setdefault(c.name, i)
        _fail(problems)
        return classes

    @model_validator(mode="after")
    def _rules(self) -> "ModelSpec":
        _fail(_cross_section_problems(self.input, self.frames, self.preprocessing) + _task_problems(self))
        return self

    # ------------------------------------------------------------------ conveniences for the layers
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def class_name(self, class_id: int) -> str:
        """The name of class ``class_id`` (its id as text when out of range)."""
        return self.classes[class_id].name if 0 <= class_id < len(self.classes) else str(class_id)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Shape of one decoded uint8 image as arrays carry it: ``(H, W)`` for 1 channel, ``(H, W, 3)`` for 3
        (what Pillow's ``np.asarray`` gives). Needs a fixed input size."""
        inp = self.input
        if not inp.fixed:
            raise ValueError(f"model {self.name!r} has a variable input size: no fixed image shape")
        return (inp.height, inp.width) if inp.channels == 1 else (inp.height, inp.width, inp.channels)  # type: ignore[return-value]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of the ONNX input without the batch axis: ``(C, H, W)`` (NCHW) or ``(H, W, C)`` (NHWC);
        -1 for a variable height or width."""
        inp = self.input
        h, w = inp.height or -1, inp.width or -1
        return (inp.channels, h, w) if inp.layout == "NCHW" else (h, w, inp.channels)

    @property
    def pil_mode(self) -> str:
        """Pillow mode of a decoded frame: ``L`` (1 channel) or ``RGB`` (3)."""
        return "L" if self.input.channels == 1 else "RGB"

    @property
    def image_encoding(self) -> str:
        """How drops and producers encode this model's images: the first encoded format of ``frames.encodings``
        (``png`` when only raw is listed)."""
        return next((e for e in self.frames.encodings if e != "raw"), "png")

    def _qc_summary(self) -> str:
        qc = self.qc
        if self.task == "detection":
            det = self.detection
            return (f"precision >= {qc.min_precision:g}, recall >= {qc.min_recall:g} at IoU {qc.iou_threshold:g} "
                    f"(stride {det.stride}, at most {det.max_objects} objects, score > {det.score_threshold:g})")
        return f"accuracy >= {qc.min_accuracy:g}, class recall >= {qc.min_class_recall:g}"

    def summary(self) -> str:
        """One paragraph: what this spec declares."""
        inp, fr, norm = self.input, self.frames, self.preprocessing.normalisation
        size = f"{inp.height}x{inp.width}x{inp.channels}" if inp.fixed else f"any size x{inp.channels}"
        names = ", ".join(self.class_names[:10]) + (", ..." if self.num_classes > 10 else "")
        encodings = ", ".join(e if e != "raw" else f"raw ({fr.raw_bytes} bytes)" for e in fr.encodings)
        return (f"{self.name}: {self.task} of {self.num_classes} classes ({names}); input {size} {inp.dtype} "
                f"{inp.layout}; frames {encodings}, at most {fr.max_frame_bytes} bytes; resize "
                f"{self.preprocessing.resize}, normalisation pixel*{norm.scale:g} - mean {norm.mean} / std "
                f"{norm.std}; embedding {self.embedding_dim}; ONNX {self.onnx.input} -> {self.onnx.logits}, "
                f"{self.onnx.embedding}; trainer {self.trainer.entry_point} (pod {self.trainer.image}); QC "
                f"{self._qc_summary()}, "
                f"regression <= {self.qc.max_regression:g}, parity <= {self.qc.max_parity_diff:g}; golden set "
                f"{self.golden_set.per_class} per class from {self.golden_set.source} (seed "
                f"{self.golden_set.seed}); drift PSI > {self.drift.class_psi:g}, JS > {self.drift.class_js:g}, "
                f"KS > {self.drift.confidence_ks:g} with at least {self.drift.min_samples} samples.")


# ====================================================================== loading and explaining errors


class SpecError(BadInput, ValueError):
    """A spec file that cannot be used: ``problems`` holds one line per error (``path: rule (line N)``)."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = list(problems)
        n = len(self.problems)
        super().__init__(f"{source}: invalid model spec, {n} error{'s' if n != 1 else ''}: "
                         + "; ".join(self.problems))


def json_schema() -> dict[str, Any]:
    """The published JSON Schema of ``ModelSpec`` (``docs/model-spec.schema.json``)."""
    return ModelSpec.model_json_schema()


def json_schema_text() -> str:
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


def load_spec(path: str | Path) -> ModelSpec:
    """Read and validate ``path``; raises ``SpecError`` (BadInput) naming every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(str(path), [f"cannot read the file: {exc}"]) from exc
    return parse_spec(text, str(path))


def spec_path(name: str, root: str | Path = ".") -> Path:
    """``<root>/models/<name>/spec.yaml``."""
    return Path(root) / MODELS_DIR / name / SPEC_FILE


def known_models(models_dir: str | Path) -> list[str]:
    """The model projects under ``models_dir``: folder names holding a ``spec.yaml``, sorted."""
    root = Path(models_dir)
    return sorted(p.parent.name for p in root.glob(f"*/{SPEC_FILE}")) if root.is_dir() else []


_CACHE: dict[Path, tuple[int, int, ModelSpec]] = {}


def find_spec(name: str, models_dir: str | Path) -> ModelSpec:
    """The spec of model ``name``: ``<models_dir>/<name>/spec.yaml``, validated, whose ``name`` is ``name``.

    Cached per file (re-read when its size or mtime changes). Raises ``SpecError`` (BadInput) when the
    file is missing (naming the known models), invalid, or declares another name."""
    path = Path(models_dir) / str(name) / SPEC_FILE
    try:
        st = path.stat()
    except OSError:
        known = known_models(models_dir)
        raise SpecError(str(path), [
            f"no model spec for {name!r}: {path} does not exist (model projects in {models_dir}: "
            f"{', '.join(known) or 'none'}); write one (`mlpipe spec check FILE` explains it) or point "
            f"MLPIPE_MODELS_DIR at the folder holding <name>/spec.yaml"]) from None
    hit = _CACHE.get(path)
    if hit is not None and hit[:2] == (st.st_mtime_ns, st.st_size):
        return hit[2]
    spec = load_spec(path)
    if spec.name != name:
        raise SpecError(str(path), [f"name: must be the model project's folder name {name!r} (got {spec.name!r})"])
    _CACHE[path] = (st.st_mtime_ns, st.st_size, spec)
    return spec


def parse_spec(text: str, source: str = "<spec>") -> ModelSpec:
    """Parse YAML ``text`` and validate it; raises ``SpecError`` with one line per problem."""
    data, node = _load_yaml(text, source)
    if not isinstance(data, dict):
        got = "an empty document" if data is None else f"a {type(data).__name__}"
        raise SpecError(source, [f"(top level): must be a mapping of spec keys (got {got})"])
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as exc:
        problems = explain(exc, node)
    # The rules between sections run only once the whole spec is valid: where those sections are valid
    # on their own, report their problems now too, so one run lists every error.
    sections = {"input": InputSpec, "frames": FramesSpec, "preprocessing": PreprocessingSpec}
    try:
        parts = [cls.model_validate(data.get(key)) for key, cls in sections.items()]
    except ValidationError:
        parts = []
    for loc, msg in _cross_section_problems(*parts) if parts else []:
        line = _line(node, loc)
        text = f"{_path(loc)}: {msg}" + (f" (line {line})" if line else "")
        if text not in problems:  # already there when only these rules failed
            problems.append(text)
    raise SpecError(source, problems)


def explain(exc: ValidationError, node: Any = None) -> list[str]:
    """One line per error of ``exc``: ``path: rule (got ...)``, plus `` (line N)`` when the YAML node is known."""
    lines: list[str] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        if err["type"] == _RULES:
            located = [(loc + tuple(rel), msg) for rel, msg in err["ctx"]["problems"]]
        else:
            located = [(loc, _message(err))]
        for full, msg in located:
            line = _line(node, full)
            lines.append(f"{_path(full) or '(top level)'}: {msg}" + (f" (line {line})" if line else ""))
    return lines


def _path(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _got(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else json.dumps(value, default=str) \
        if isinstance(value, (list, dict, bool)) or value is None else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


_TYPE_WORDS = {
    "int": "an integer", "float": "a number", "string": "a string", "bool": "true or false",
    "list": "a list", "dict": "a mapping", "model": "a mapping",
}


def _message(err: dict[str, Any]) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    got = f" (got {_got(value)})"
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        return f"unknown key{_allowed(tuple(err['loc'])[:-1])}"
    if kind == "literal_error":
        return f"must be {ctx['expected']}{got}"
    bounds = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="), "less_than": ("lt", "<"),
              "less_than_equal": ("le", "<=")}
    if kind in bounds:
        key, word = bounds[kind]
        limit = ctx[key]
        limit = int(limit) if isinstance(limit, float) and limit.is_integer() else limit
        return f"must be {word} {limit}{got}"
    if kind == "too_short":
        n = ctx.get("min_length")
        if isinstance(value, str):
            return "must not be empty"
        return f"needs at least {n} item{'s' if n != 1 else ''} (got {ctx.get('actual_length')})"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "int_from_float":
        return f"must be an integer{got}"
    base = kind.split("_", 1)[0]
    if kind.endswith(("_type", "_parsing")) and base in _TYPE_WORDS:
        return f"must be {_TYPE_WORDS[base]}{got}"
    if kind in ("float_finite_number", "finite_number"):
        return f"must be a finite number{got}"
    msg = str(err.get("msg", kind))
    if kind in _CUSTOM:
        return msg  # ours: the message names the rule and what it got
    return (msg[:1].lower() + msg[1:]) + got


def _allowed(loc: tuple[str | int, ...]) -> str:
    """`` (allowed here: a, b, ...)`` for the section at ``loc`` (empty when it cannot be found)."""
    model: Any = ModelSpec
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return ""
        model = _model_of(field.annotation)
        if model is None:
            return ""
    fields = getattr(model, "model_fields", None)
    return f" (allowed here: {', '.join(fields)})" if fields else ""


def _model_of(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (list, Union, types.UnionType, Annotated):
        for arg in typing.get_args(annotation):
            found = _model_of(arg)
            if found is not None:
                return found
    return None


# --------------------------------------------------------------------------- YAML


def _load_yaml(text: str, source: str) -> tuple[Any, Any]:
    """(data, root node) of YAML ``text``; a syntax error or a duplicate key is a ``SpecError`` naming its line."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    class _DuplicateKey(yaml.constructor.ConstructorError):
        pass

    def construct_mapping(loader: Any, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                continue  # PyYAML's own error follows
            if key in seen:
                raise _DuplicateKey(None, None, f"duplicate key {key!r} (first at line {seen[key]})",
                                    key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    loader = Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        what = " ".join(p for p in (exc.context, exc.problem) if p) or "not valid YAML"
        kind = "YAML error" if isinstance(exc, _DuplicateKey) else "YAML syntax error"
        raise SpecError(source, [f"{kind} at {where}: {what}"]) from None
    except yaml.YAMLError as exc:
        raise SpecError(source, [f"YAML syntax error: {exc}"]) from None
    finally:
        loader.dispose()
    return data, node


def _line(node: Any, loc: tuple[str | int, ...]) -> int | None:
    """1-based line of the YAML node at ``loc`` (the nearest existing parent, e.g. for a missing key)."""
    if node is None:
        return None
    best = node
    for part in loc:
        nxt = None
        if isinstance(part, int) and type(best).__name__ == "SequenceNode":
            nxt = best.value[part] if 0 <= part < len(best.value) else None
        elif type(best).__name__ == "MappingNode":
            for key_node, value_node in best.value:
                if getattr(key_node, "value", None) == part:
                    nxt = value_node
                    break
        if nxt is None:
            break
        best = nxt
    return best.start_mark.line + 1
