"""The pipeline spec: one YAML file (``models/<name>/pipeline.yaml``) that composes model projects.

A pipeline is what one inference call runs on a camera frame::

    preprocess (decode the frame, the detector's spec)
      -> detector (a ``task: detection`` model: centre heatmap + box sizes)
      -> crop-and-resize (every box found, ``crop`` below; tasks/model/scene_codec.py)
      -> classifier (a ``task: classification`` model, on each crop)
      -> postprocess (boxes, per-box labels and scores, the read-out, the frame's embedding)

Each member is a model project of its own (``models/<member>/spec.yaml``): versioned, trained, gated and
compiled on its own. A *pipeline version* is a set of member versions (``pipelines/<name>/<n>/
pipeline.json``, written by ``tasks.steps.pipeline``); QC gates it end to end and deploy swaps its
members as one step.

``data`` says how the pipeline's scenes are composed from the real digits of its source
(``tasks/steps/scenes.py``): the golden scenes only from the golden digits (``golden_per_class`` per
class, fixed by ``seed``), drops from the rest. The members' ``golden_set`` say ``source: scenes`` with
the same ``per_class`` and ``seed`` (``check_members``).

Rules beyond the types: unknown keys are errors; the two members are different model projects;
``data.objects`` is ``[min, max]`` with ``0 <= min <= max``; ``data.scale`` is ``[min, max]`` with
``0 < min <= max <= 1`` (the digit's side as a fraction of the frame's shorter side). Cross-file rules
(``check_members``): the detector's task is detection and the classifier's classification; the
classifier's input size is the crop size and its channels the crop's; ``data.objects[1]`` is at most
the detector's ``detection.max_objects``; the members' golden sets agree with ``data``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, ValidationError, model_validator

from tasks.contracts.spec import DriftSpec, SpecError, _fail, _load_yaml, _NAME, _Section, explain, find_spec

if TYPE_CHECKING:  # pragma: no cover
    from tasks.contracts.spec import ModelSpec

PIPELINE_FILE = "pipeline.yaml"


class MembersSpec(_Section):
    """Which model project fills each role."""

    detector: str = Field(min_length=1, description="a model project with task: detection")
    classifier: str = Field(min_length=1, description="a model project with task: classification, run on "
                                                      "every crop")


class CropSpec(_Section):
    """How a detected box becomes the classifier's input."""

    height: int = Field(gt=0, description="pixels: the classifier's input height")
    width: int = Field(gt=0, description="pixels: the classifier's input width")
    channels: Literal[1, 3] = Field(description="1: the crop is converted to grayscale (ITU-R 601-2 luma)")
    padding: float = Field(0.1, ge=0, le=1, description="each side of the box grows by this fraction of its "
                                                        "size before cutting (clipped to the frame)")
    square: bool = Field(True, description="cut a square around the box (its longer side), so digits keep "
                                           "their aspect")


class ReadoutSpec(_Section):
    """How the per-box labels become the frame's read-out."""

    order: Literal["left_to_right"] = Field("left_to_right", description="boxes sorted by centre x")
    min_label_score: float = Field(0.0, ge=0, lt=1, description="a box whose classifier score is lower is "
                                                                "reported but left out of the read-out")


class DataSpec(_Section):
    """How scenes are composed (``tasks/steps/scenes.py``)."""

    source: Literal["mnist"] = Field("mnist", description="the labelled digits scenes are composed from")
    golden_per_class: int = Field(gt=0, description="golden digits per class: the golden scenes use them only")
    seed: int = Field(ge=0, description="fixes the golden/pool split forever: do not change")
    objects: list[int] = Field(min_length=2, max_length=2, description="[min, max] digits per scene")
    scale: list[float] = Field(min_length=2, max_length=2, description="[min, max] digit side as a fraction "
                                                                       "of the frame's shorter side")
    jpeg_quality: int = Field(90, ge=30, le=100, description="JPEG quality of the scene images")

    @model_validator(mode="after")
    def _rules(self) -> "DataSpec":
        problems: list[tuple[tuple[str | int, ...], str]] = []
        lo, hi = self.objects
        if not 0 <= lo <= hi:
            problems.append((("objects",), f"must be [min, max] with 0 <= min <= max (got {self.objects})"))
        s0, s1 = self.scale
        if not 0 < s0 <= s1 <= 1:
            problems.append((("scale",), f"must be [min, max] with 0 < min <= max <= 1 (got {self.scale})"))
        _fail(problems)
        return self


class PipelineQCSpec(_Section):
    """The pipeline's end-to-end QC gate on the golden scenes (``tasks.steps.pipeline``)."""

    min_readout_accuracy: float = Field(ge=0, le=1, description="share of golden scenes whose read-out is "
                                                                "exactly right")
    min_class_recall: float = Field(ge=0, le=1, description="lowest per-class recall of the classified crops "
                                                            "(ground-truth boxes matched at IoU 0.5)")
    max_regression: float = Field(ge=0, le=1, description="largest read-out accuracy drop against the serving "
                                                          "pipeline")
    max_latency_p95_ms: float = Field(gt=0, description="p95 of one pipeline call of one frame, milliseconds")
    smoke_margin: float = Field(0.1, ge=0, le=1, description="deploy's smoke test floor: min_readout_accuracy "
                                                             "less this (a few frames are noisy)")


class PipelineSpec(_Section):
    """A pipeline project's spec (``models/<name>/pipeline.yaml``); see the module docstring."""

    name: str = Field(description="the pipeline's name: pipelines/<name>/ in the store, Triton model <name>")
    description: str = Field("", description="free text")
    members: MembersSpec
    crop: CropSpec
    readout: ReadoutSpec = ReadoutSpec()
    data: DataSpec
    qc: PipelineQCSpec
    drift: DriftSpec

    @model_validator(mode="after")
    def _rules(self) -> "PipelineSpec":
        problems: list[tuple[tuple[str | int, ...], str]] = []
        if not _NAME.match(self.name):
            problems.append((("name",), f"must be lower case letters, digits, '-' or '_', starting with a "
                                        f"letter, at most 63 (got {self.name!r})"))
        if self.members.detector == self.members.classifier:
            problems.append((("members", "classifier"), f"must be another model project than the detector "
                                                        f"(both {self.members.detector!r})"))
        _fail(problems)
        return self

    @property
    def member_names(self) -> dict[str, str]:
        """role -> model project name."""
        return {"detector": self.members.detector, "classifier": self.members.classifier}

    def summary(self) -> str:
        m, c, d = self.members, self.crop, self.data
        return (f"{self.name}: pipeline detector {m.detector} -> crop {c.height}x{c.width}x{c.channels} "
                f"(padding {c.padding:g}) -> classifier {m.classifier}; read-out {self.readout.order}; scenes of "
                f"{d.objects[0]}..{d.objects[1]} {d.source} digits at scale {d.scale[0]:g}..{d.scale[1]:g}; QC "
                f"read-out accuracy >= {self.qc.min_readout_accuracy:g}, crop class recall >= "
                f"{self.qc.min_class_recall:g}, regression <= {self.qc.max_regression:g}, p95 <= "
                f"{self.qc.max_latency_p95_ms:g} ms.")


def pipeline_path(name: str, models_dir: str | Path) -> Path:
    return Path(models_dir) / str(name) / PIPELINE_FILE


def is_pipeline(name: str, models_dir: str | Path) -> bool:
    """True when ``name`` is a pipeline project (``<models_dir>/<name>/pipeline.yaml`` exists)."""
    return pipeline_path(name, models_dir).is_file()


def known_pipelines(models_dir: str | Path) -> list[str]:
    root = Path(models_dir)
    return sorted(p.parent.name for p in root.glob(f"*/{PIPELINE_FILE}")) if root.is_dir() else []


def parse_pipeline(text: str, source: str = "<pipeline>") -> PipelineSpec:
    """Parse YAML ``text`` and validate it; raises ``SpecError`` (BadInput) with one line per problem."""
    data, node = _load_yaml(text, source)
    if not isinstance(data, dict):
        got = "an empty document" if data is None else f"a {type(data).__name__}"
        raise SpecError(source, [f"(top level): must be a mapping of pipeline keys (got {got})"])
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as exc:
        problems = explain(exc, node)
    raise SpecError(source, problems)


def load_pipeline(path: str | Path) -> PipelineSpec:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(str(path), [f"cannot read the file: {exc}"]) from exc
    return parse_pipeline(text, str(path))


def find_pipeline(name: str, models_dir: str | Path) -> PipelineSpec:
    """The pipeline spec ``<models_dir>/<name>/pipeline.yaml``, validated, its members checked
    (``check_members``). Raises ``SpecError`` (BadInput) naming the problem."""
    path = pipeline_path(name, models_dir)
    if not path.is_file():
        raise SpecError(str(path), [f"no pipeline spec for {name!r}: {path} does not exist (pipelines in "
                                    f"{models_dir}: {', '.join(known_pipelines(models_dir)) or 'none'})"])
    spec = load_pipeline(path)
    if spec.name != name:
        raise SpecError(str(path), [f"name: must be the project's folder name {name!r} (got {spec.name!r})"])
    check_members(spec, models_dir, source=str(path))
    return spec


def member_specs(spec: PipelineSpec, models_dir: str | Path) -> dict[str, "ModelSpec"]:
    """role -> the member's model spec."""
    return {role: find_spec(name, models_dir) for role, name in spec.member_names.items()}


def check_members(spec: PipelineSpec, models_dir: str | Path, *, source: str = "<pipeline>") -> None:
    """The rules between the pipeline and its members' specs; raises ``SpecError`` naming each."""
    members = member_specs(spec, models_dir)
    det, cls = members["detector"], members["classifier"]
    problems: list[str] = []
    if det.task != "detection":
        problems.append(f"members.detector: {det.name!r} must be a detection model (its task is {det.task})")
    if cls.task != "classification":
        problems.append(f"members.classifier: {cls.name!r} must be a classification model (its task is "
                        f"{cls.task})")
    if (cls.input.height, cls.input.width) != (spec.crop.height, spec.crop.width):
        problems.append(f"crop: must be the classifier's input size {cls.input.height}x{cls.input.width} "
                        f"(got {spec.crop.height}x{spec.crop.width})")
    if cls.input.channels != spec.crop.channels:
        problems.append(f"crop.channels: must be the classifier's input channels {cls.input.channels} "
                        f"(got {spec.crop.channels})")
    if det.detection is not None and spec.data.objects[1] > det.detection.max_objects:
        problems.append(f"data.objects: at most the detector's detection.max_objects "
                        f"{det.detection.max_objects} (got {spec.data.objects[1]})")
    for m in (det, cls):
        gs = m.golden_set
        if gs.source != "scenes" or gs.per_class != spec.data.golden_per_class or gs.seed != spec.data.seed:
            problems.append(f"members: {m.name}'s golden_set must be source scenes, per_class "
                            f"{spec.data.golden_per_class}, seed {spec.data.seed} (data.golden_per_class, "
                            f"data.seed) (got {gs.source}, {gs.per_class}, {gs.seed})")
    if problems:
        raise SpecError(source, problems)


def pipeline_of(model: str, models_dir: str | Path) -> PipelineSpec | None:
    """The pipeline that lists ``model`` as a member (the first by name), else None."""
    for name in known_pipelines(models_dir):
        try:
            spec = load_pipeline(pipeline_path(name, models_dir))
        except SpecError:
            continue
        if model in spec.member_names.values():
            return spec
    return None


__all__ = ["CropSpec", "DataSpec", "MembersSpec", "PipelineQCSpec", "PipelineSpec", "ReadoutSpec", "PIPELINE_FILE",
           "check_members", "find_pipeline", "is_pipeline", "known_pipelines", "load_pipeline", "member_specs",
           "parse_pipeline", "pipeline_of", "pipeline_path"]
