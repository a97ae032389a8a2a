"""The Triton model repository, rendered from the model spec: two flavours, atomic versions.

Layout rendered for model ``digits`` (``models/digits/spec.yaml``; see ``model_repo/README.md``)::

    <repo>/
      .mlpipe-repo.json            which flavour / batch size rendered this folder (Triton ignores files here)
      digits/config.pbtxt          ensemble: FRAME -> digits_preprocess -> digits_classifier -> digits_postprocess
      digits/1/                    (ensembles need one, empty, version folder)
      digits_preprocess/config.pbtxt, 1/model.py, 1/frame_codec.py     Python backend: decodes the frames
      digits_postprocess/config.pbtxt, 1/model.py                      Python backend: softmax, top-k
      digits_classifier/config.pbtxt                      version_policy pins the served version
      digits_classifier/<N>/model.onnx [model.plan] [model.py] mlpipe-version.json

Everything a config says comes from the ``tasks.contracts.spec.ModelSpec``: the ensemble takes one
BYTES input ``FRAME`` (an encoded frame per row: PNG / JPEG / raw, as ``frames.encodings`` allows);
the preprocess model decodes it with ``tasks/model/frame_codec.py`` (copied next to its
``model.py``: the one decoder, shared with the host), resizes and normalises as the spec says (the
codec parameters are the JSON config parameter ``codec``) and answers ``PIXELS`` (the ONNX input,
``spec.input_shape``) plus ``FRAME_ERROR`` per row; the classifier's tensors are the spec's
``onnx`` names and shapes; postprocess gives the top ``min(3, classes)``. Pre/postprocess are per
model (``<model>_preprocess``), so models of different shapes share one repository.

Flavours:

* ``local``: the Triton binary of the nvidia-pytriton wheel has only the Python
  backend, so the classifier is a Python-backend model (``model_repo/python/
  classifier_ort/model.py``, copied into each version folder) running ONNX
  Runtime on ``model.onnx``.
* ``production``: the classifier uses ``platform: "onnxruntime_onnx"``, or
  ``"tensorrt_plan"`` when the served version folder holds a ``model.plan``. The preprocess model
  is the same Python model; the GPU alternative, a DALI pipeline (``backend: "dali"``), is rendered
  from the same spec by :func:`render_dali_preprocess` (``templates/production/preprocess_dali/``).

Serving-version policy: the classifier config carries
``version_policy: { specific: { versions: [N] } }``; ``set_serving_version``
rewrites it atomically (new file, new mtime) and the deploy step then calls
``load_model(<model>_classifier)``. The ensemble asks for ``model_version: -1``
(the one loaded version). No config override is ever sent with a load:
Triton would keep such an override until a file's mtime changes.

New versions are written to a hidden staging folder inside the model folder
(``.tmp-<N>-<random>``; Triton only treats folders named by a number as
versions) and renamed to ``<N>`` in one ``os.rename``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as mc

from tasks.config import PROJECT_ROOT
from tasks.contracts.errors import BadInput, MlpipeError, exit_code_for
from tasks.contracts.files import atomic_write, sha256_file
from tasks.contracts.results import write_result_json
from tasks.contracts.serving import ENSEMBLE_OUTPUTS, FRAME_ERROR, FRAME_INPUT, MAX_BATCH

if TYPE_CHECKING:  # pragma: no cover
    from tasks.contracts.spec import ModelSpec

logger = logging.getLogger(__name__)

FLAVOURS = ("local", "production")
MARKER = ".mlpipe-repo.json"
VERSION_META = "mlpipe-version.json"
PYTHON_SOURCES = PROJECT_ROOT / "model_repo" / "python"
TEMPLATES_DIR = PROJECT_ROOT / "model_repo" / "templates"
#: the one frame decoder, copied next to the preprocess model.py (it imports nothing of ``tasks``)
FRAME_CODEC = Path(__file__).resolve().with_name("frame_codec.py")
PIXELS = "PIXELS"
#: the preprocess model's config parameter holding the frame codec parameters as JSON
CODEC_PARAMETER = "codec"
_ROLE_SUFFIXES = ("_preprocess", "_classifier", "_postprocess")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_VERSION_RE = re.compile(r"^[1-9][0-9]*$")

#: the Triton data types (every ``DataType`` of the model-config proto but ``TYPE_INVALID``)
DTYPES = frozenset(mc.DataType.keys()) - {"TYPE_INVALID"}


class ModelRepoError(BadInput, RuntimeError):
    """The model repository (or a config in it) is missing, malformed or inconsistent (bad input: not retried)."""


# ----------------------------------------------------------------------------------------------
# The repository's models: names, dtypes and dims, all derived from the model spec
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # Triton data type, e.g. "TYPE_FP32"
    dims: tuple[int, ...]  # without the batch dimension (all models are batched); -1 = variable


@dataclass(frozen=True)
class StepSpec:
    model: str
    input_map: Mapping[str, str]  # model tensor -> ensemble tensor
    output_map: Mapping[str, str]  # model tensor -> ensemble tensor


@dataclass(frozen=True)
class TritonModel:
    """One model of the repository (a folder with a ``config.pbtxt``)."""

    name: str
    role: str  # "preprocess" | "classifier" | "postprocess" | "ensemble"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    source: str | None = None  # folder under model_repo/python/ holding model.py
    steps: tuple[StepSpec, ...] = ()
    # dynamic batching: the longest a request waits for company, per flavour. Locally 0: measured on
    # 2 CPU cores, any delay only slowed a sequential client (200 us on each of the 3 models halved
    # batch-1 throughput) and did not help 8 concurrent clients; requests that queue while an instance
    # is busy are still merged. Production: a short wait on the GPU classifier fills bigger batches.
    queue_delay_us: Mapping[str, int] = field(default_factory=lambda: {"local": 0, "production": 0})
    parameters: Mapping[str, str] = field(default_factory=dict)  # config parameters (string values)


@dataclass(frozen=True)
class RepoSpec:
    model_name: str
    max_batch_size: int
    preprocess: TritonModel
    classifier: TritonModel
    postprocess: TritonModel
    ensemble: TritonModel
    intra_op_threads: int = 1
    instances: int = 1

    @property
    def models(self) -> tuple[TritonModel, ...]:
        return (self.preprocess, self.classifier, self.postprocess, self.ensemble)


def default_repo_dir() -> Path:
    """Where the local repository lives unless told otherwise: ``$MLPIPE_HOME/triton/model_repository``."""
    from tasks.config import load_settings

    return load_settings().home / "triton" / "model_repository"


def classifier_name(model_name: str) -> str:
    return f"{model_name}_classifier"


def preprocess_name(model_name: str) -> str:
    return f"{model_name}_preprocess"


def postprocess_name(model_name: str) -> str:
    return f"{model_name}_postprocess"


def model_names(model_name: str) -> tuple[str, str, str, str]:
    """The four repository models of ``model_name``: preprocess, classifier, postprocess, ensemble."""
    return (preprocess_name(model_name), classifier_name(model_name), postprocess_name(model_name), model_name)


def _check_model_name(model_name: str) -> str:
    if not _NAME_RE.match(model_name or "") or model_name.endswith(_ROLE_SUFFIXES):
        raise ModelRepoError(f"invalid model name {model_name!r}: use letters, digits, '_', '.', '-', not ending "
                             f"in {', '.join(_ROLE_SUFFIXES)} (the names of its step models)")
    return model_name


def repo_spec(model_spec: "ModelSpec", max_batch_size: int = MAX_BATCH, *, top_k: int = 3,
              intra_op_threads: int = 1) -> RepoSpec:
    """The repository's models for ``model_spec`` (``tasks.contracts.spec.ModelSpec``).

    Ensemble ``<name>``: ``FRAME`` BYTES ``[1]`` -> ``<name>_preprocess`` (``PIXELS`` FP32
    ``spec.input_shape``, ``FRAME_ERROR`` BYTES ``[1]``) -> ``<name>_classifier`` (the spec's ``onnx``
    tensor names: input ``spec.input_shape``, logits ``[classes]``, embedding ``[embedding_dim]``) ->
    ``<name>_postprocess`` (top ``min(top_k, classes)``); outputs ``ENSEMBLE_OUTPUTS``.
    """
    from tasks.model.frames import codec_params

    name = _check_model_name(model_spec.name)
    if not 1 <= max_batch_size <= 4096:
        raise ModelRepoError(f"max_batch_size must be between 1 and 4096, got {max_batch_size}")
    if top_k < 1:
        raise ModelRepoError(f"top_k must be at least 1, got {top_k}")
    if not model_spec.input.fixed:
        raise ModelRepoError(f"model {name!r}: serving in Triton needs a fixed input size (input.height and "
                             f"input.width in its spec), got {model_spec.input.height}x{model_spec.input.width}")
    classes, k = model_spec.num_classes, min(top_k, model_spec.num_classes)
    pixels = tuple(model_spec.input_shape)
    onnx = model_spec.onnx
    frame_error = TensorSpec(FRAME_ERROR, "TYPE_STRING", (1,))
    pre = TritonModel(
        preprocess_name(name), "preprocess",
        inputs=(TensorSpec(FRAME_INPUT, "TYPE_STRING", (1,)),),
        outputs=(TensorSpec(PIXELS, "TYPE_FP32", pixels), frame_error),
        source="preprocess",
        parameters={CODEC_PARAMETER: json.dumps(codec_params(model_spec), sort_keys=True)},
    )
    clf = TritonModel(
        classifier_name(name), "classifier",
        inputs=(TensorSpec(onnx.input, "TYPE_FP32", pixels),),
        outputs=(TensorSpec(onnx.logits, "TYPE_FP32", (classes,)),
                 TensorSpec(onnx.embedding, "TYPE_FP32", (model_spec.embedding_dim,))),
        source="classifier_ort",
        queue_delay_us={"local": 0, "production": 100},
    )
    post = TritonModel(
        postprocess_name(name), "postprocess",
        inputs=(TensorSpec("LOGITS", "TYPE_FP32", (classes,)),),
        outputs=(TensorSpec("LABEL", "TYPE_INT64", (1,)), TensorSpec("SCORE", "TYPE_FP32", (1,)),
                 TensorSpec("TOPK_LABELS", "TYPE_INT64", (k,)), TensorSpec("TOPK_SCORES", "TYPE_FP32", (k,))),
        source="postprocess",
    )
    ens_outputs = (*post.outputs, TensorSpec("EMBEDDING", "TYPE_FP32", (model_spec.embedding_dim,)), frame_error)
    assert tuple(t.name for t in ens_outputs) == ENSEMBLE_OUTPUTS, "the ensemble outputs are tasks.contracts.serving's"
    ens = TritonModel(
        name, "ensemble",
        inputs=(TensorSpec(FRAME_INPUT, "TYPE_STRING", (1,)),),
        outputs=ens_outputs,
        steps=(
            StepSpec(pre.name, {FRAME_INPUT: FRAME_INPUT}, {PIXELS: "pixels", FRAME_ERROR: FRAME_ERROR}),
            StepSpec(clf.name, {onnx.input: "pixels"}, {onnx.logits: "logits", onnx.embedding: "EMBEDDING"}),
            StepSpec(post.name, {"LOGITS": "logits"}, {t.name: t.name for t in post.outputs}),
        ),
    )
    return RepoSpec(name, max_batch_size, pre, clf, post, ens, intra_op_threads=intra_op_threads)


# ----------------------------------------------------------------------------------------------
# Rendering config.pbtxt: a ModelConfig message, printed by protobuf's text_format
# ----------------------------------------------------------------------------------------------


def _tensors(field: Any, tensors: Sequence[TensorSpec]) -> None:
    for t in tensors:
        field.add(name=t.name, data_type=mc.DataType.Value(t.dtype), dims=t.dims)


def _classifier_platform(flavour: str, version_dir: Path | None, prefer_plan: bool = True) -> str:
    if flavour == "local":
        return "python"
    if version_dir is not None and prefer_plan and (version_dir / "model.plan").is_file():
        return "tensorrt_plan"
    return "onnxruntime_onnx"


def build_config(model: TritonModel, spec: RepoSpec, flavour: str, *, serving_version: int | None = None,
                 classifier_platform: str | None = None) -> mc.ModelConfig:
    """The Triton ``ModelConfig`` message of one model of ``spec`` in ``flavour``."""
    _check_flavour(flavour)
    cfg = mc.ModelConfig(name=model.name, max_batch_size=spec.max_batch_size)
    kind = mc.ModelInstanceGroup.KIND_CPU
    python_classifier = False
    if model.role == "ensemble":
        cfg.platform = "ensemble"
    elif model.role == "classifier":
        platform = classifier_platform or _classifier_platform(flavour, None)
        if platform == "python":
            cfg.backend = "python"
            python_classifier = True
        elif platform in ("onnxruntime_onnx", "tensorrt_plan"):
            cfg.platform = platform
            cfg.default_model_filename = "model.onnx" if platform == "onnxruntime_onnx" else "model.plan"
            kind = mc.ModelInstanceGroup.KIND_GPU
        else:
            raise ModelRepoError(f"unknown classifier platform {platform!r}")
        if serving_version is None:
            cfg.version_policy.latest.num_versions = 1
        else:
            cfg.version_policy.specific.versions.append(int(serving_version))
    else:
        cfg.backend = "python"
    _tensors(cfg.input, model.inputs)
    _tensors(cfg.output, model.outputs)
    if model.role == "ensemble":
        for step in model.steps:
            cfg.ensemble_scheduling.step.add(model_name=step.model, model_version=-1,
                                             input_map=dict(step.input_map), output_map=dict(step.output_map))
    else:
        cfg.instance_group.add(count=spec.instances, kind=kind)
        cfg.dynamic_batching.SetInParent()  # on, even when the delay is 0 (queued requests still merge)
        cfg.dynamic_batching.max_queue_delay_microseconds = model.queue_delay_us[flavour]
        params = dict(model.parameters)
        if python_classifier:
            params.setdefault("intra_op_threads", str(spec.intra_op_threads))
        for key, value in params.items():
            cfg.parameters[key].string_value = value
    return cfg


def render_config(model: TritonModel, spec: RepoSpec, flavour: str, *, serving_version: int | None = None,
                  classifier_platform: str | None = None) -> str:
    """The ``config.pbtxt`` text of one model of ``spec`` in ``flavour`` (see :func:`build_config`)."""
    cfg = build_config(model, spec, flavour, serving_version=serving_version,
                       classifier_platform=classifier_platform)
    return (f"# Generated by tasks/model/repo.py (flavour: {flavour}); re-render instead of editing.\n"
            + text_format.MessageToString(cfg, use_short_repeated_primitives=True))


# ----------------------------------------------------------------------------------------------
# Parsing and validating config.pbtxt text
# ----------------------------------------------------------------------------------------------

# fields MessageToDict gives as strings (64-bit integers in the JSON mapping)
_INT_KEYS = {"dims", "versions", "model_version", "max_queue_delay_microseconds", "max_batch_size",
             "preferred_batch_size", "count", "num_versions", "priority_levels", "default_priority_level",
             "gpus", "shape"}
_PARSE_LOCATION_RE = re.compile(r"^\d+(?::\d+)? : ")


def _normalize_ints(obj: Any, key: str = "") -> Any:
    if isinstance(obj, dict):
        return {k: _normalize_ints(v, k) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_normalize_ints(v, key) for v in obj]
    if key in _INT_KEYS and isinstance(obj, str) and re.match(r"^-?\d+$", obj):
        return int(obj)
    return obj


def parse_config(text: str, *, source: str | Path | None = None) -> mc.ModelConfig:
    """Parse config.pbtxt text into a ``ModelConfig`` message (strict: unknown fields, wrong types are errors).

    A parse error is a ``ModelRepoError`` naming ``source`` (default ``config.pbtxt``), line and column.
    """
    msg = mc.ModelConfig()
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as exc:
        where = f"{source or 'config.pbtxt'}:{exc.GetLine()}:{exc.GetColumn()}" if exc.GetLine() else \
            str(source or "config.pbtxt")
        raise ModelRepoError(f"{where}: not a valid Triton ModelConfig: "
                             f"{_PARSE_LOCATION_RE.sub('', str(exc))}") from exc
    return msg


def parse_config_text(text: str, *, source: str | Path | None = None) -> dict[str, Any]:
    """Parse config.pbtxt text into a plain dict (proto field names, ints as ints, enums as names).

    The parsing is :func:`parse_config` (``google.protobuf.text_format`` into Triton's ``ModelConfig``);
    as in proto3 JSON, fields holding 0, "" or false are absent (set messages stay, even empty).
    """
    msg = parse_config(text, source=source)
    return _normalize_ints(json_format.MessageToDict(msg, preserving_proto_field_name=True))


def _tensor_problems(where: str, tensors: Any) -> list[str]:
    problems: list[str] = []
    seen: set[str] = set()
    for t in tensors or []:
        name = t.get("name", "")
        if not name:
            problems.append(f"{where}: a tensor has no name")
        if name in seen:
            problems.append(f"{where}: tensor {name!r} declared twice")
        seen.add(name)
        dtype = t.get("data_type", "TYPE_INVALID")
        if dtype not in DTYPES:
            problems.append(f"{where} {name!r}: data_type {dtype!r} is not a Triton data type")
        dims = t.get("dims") or []
        if not dims:
            problems.append(f"{where} {name!r}: dims are empty")
        if any((not isinstance(d, int)) or d == 0 or d < -1 for d in dims):
            problems.append(f"{where} {name!r}: dims {dims} must be positive or -1")
    return problems


def validate_config_text(text: str, *, source: str | Path | None = None) -> dict[str, Any]:
    """Parse and check one config.pbtxt; returns the parsed dict or raises ``ModelRepoError`` listing problems.

    Checks: a name; a platform or backend; typed, named, non-empty dims on every input/output;
    a sane version policy; for an ensemble, that every step input is an ensemble input or
    another step's output, each ensemble output is produced exactly once, and no tensor is
    produced twice. Errors name ``source`` (the file, default ``config.pbtxt``).
    """
    cfg = parse_config_text(text, source=source)
    name = cfg.get("name", "")
    problems: list[str] = []
    if not name:
        problems.append("config has no name")
    if not cfg.get("platform") and not cfg.get("backend"):
        problems.append(f"{name}: neither platform nor backend is set")
    if int(cfg.get("max_batch_size", 0)) < 0:
        problems.append(f"{name}: max_batch_size must be >= 0")
    if not cfg.get("input"):
        problems.append(f"{name}: no inputs")
    if not cfg.get("output"):
        problems.append(f"{name}: no outputs")
    problems += _tensor_problems(f"{name} input", cfg.get("input"))
    problems += _tensor_problems(f"{name} output", cfg.get("output"))
    policy = cfg.get("version_policy") or {}
    if "specific" in policy:
        versions = (policy.get("specific") or {}).get("versions") or []
        if not versions or any(int(v) < 1 for v in versions):
            problems.append(f"{name}: version_policy.specific.versions must list versions >= 1, got {versions}")
    if cfg.get("platform") == "ensemble":
        steps = (cfg.get("ensemble_scheduling") or {}).get("step") or []
        if not steps:
            problems.append(f"{name}: ensemble has no steps")
        available = {t.get("name") for t in cfg.get("input") or []}
        produced: dict[str, str] = {}
        for i, step in enumerate(steps):
            model = step.get("model_name", "")
            if not model:
                problems.append(f"{name}: step {i} has no model_name")
            for tensor in (step.get("output_map") or {}).values():
                if tensor in produced or tensor in available:
                    problems.append(f"{name}: ensemble tensor {tensor!r} is produced twice "
                                    f"({produced.get(tensor, 'ensemble input')} and {model})")
                produced[tensor] = model
        for step in steps:
            for model_tensor, tensor in (step.get("input_map") or {}).items():
                if tensor not in available and tensor not in produced:
                    problems.append(f"{name}: step {step.get('model_name')!r} input {model_tensor!r} reads "
                                    f"{tensor!r}, which no ensemble input or step output provides")
        for out in cfg.get("output") or []:
            if out.get("name") not in produced:
                problems.append(f"{name}: ensemble output {out.get('name')!r} is not produced by any step")
    if problems:
        raise ModelRepoError(f"invalid {source or 'config.pbtxt'}:\n  - " + "\n  - ".join(problems))
    return cfg


def _load_configs(repo_dir: Path) -> dict[str, dict[str, Any]]:
    configs = {}
    for cfg_path in sorted(Path(repo_dir).glob("*/config.pbtxt")):
        if cfg_path.parent.name.startswith("."):
            continue
        configs[cfg_path.parent.name] = validate_config_text(cfg_path.read_text(), source=cfg_path)
    return configs


def validate_repo(repo_dir: Path) -> dict[str, dict[str, Any]]:
    """Check every config.pbtxt under ``repo_dir`` and the wiring between ensembles and their steps.

    Returns ``{model name: parsed config}``; raises ``ModelRepoError`` listing every problem:
    config names vs folder names, steps naming missing models or tensors, dtype/dims
    mismatches between a producer and its consumers, missing version folders or model files.
    """
    repo_dir = Path(repo_dir)
    if not repo_dir.is_dir():
        raise ModelRepoError(f"model repository {repo_dir} does not exist")
    configs = _load_configs(repo_dir)
    problems: list[str] = []
    for folder, cfg in configs.items():
        if cfg.get("name") != folder:
            problems.append(f"{folder}/config.pbtxt: name {cfg.get('name')!r} differs from its folder name")
        versions = numbered_dirs(repo_dir / folder)
        policy = cfg.get("version_policy") or {}
        pinned = [int(v) for v in (policy.get("specific") or {}).get("versions", [])]
        if cfg.get("platform") == "ensemble":
            if not versions:
                problems.append(f"{folder}: an ensemble needs a version folder (e.g. {folder}/1/)")
        elif pinned:
            for v in pinned:
                if v not in versions:
                    problems.append(f"{folder}: version_policy serves version {v}, but {folder}/{v}/ does not exist")
        if cfg.get("backend") == "python":
            for v in pinned or versions:
                if (repo_dir / folder / str(v)).is_dir() and not (repo_dir / folder / str(v) / "model.py").is_file():
                    problems.append(f"{folder}/{v}: Python-backend model without model.py")
    for folder, cfg in configs.items():
        if cfg.get("platform") != "ensemble":
            continue
        batched = int(cfg.get("max_batch_size", 0)) > 0
        tensors: dict[str, tuple[str, list[int], str]] = {
            t["name"]: (t["data_type"], list(t["dims"]), "ensemble input") for t in cfg.get("input", [])}
        steps = (cfg.get("ensemble_scheduling") or {}).get("step") or []
        # producers first, so consumers can be checked whatever the step order
        for step in steps:
            model = step.get("model_name", "")
            sub = configs.get(model)
            if sub is None:
                problems.append(f"{folder}: step model {model!r} has no {model}/config.pbtxt in {repo_dir}")
                continue
            if (int(sub.get("max_batch_size", 0)) > 0) != batched:
                problems.append(f"{folder}: step {model!r} batching (max_batch_size "
                                f"{sub.get('max_batch_size', 0)}) differs from the ensemble's")
            if int(sub.get("max_batch_size", 0)) < int(cfg.get("max_batch_size", 0)):
                problems.append(f"{folder}: step {model!r} max_batch_size {sub.get('max_batch_size', 0)} is below "
                                f"the ensemble's {cfg.get('max_batch_size')}")
            outs = {t["name"]: t for t in sub.get("output", [])}
            for model_tensor, tensor in (step.get("output_map") or {}).items():
                if model_tensor not in outs:
                    problems.append(f"{folder}: step {model!r} maps output {model_tensor!r}, "
                                    f"but {model} has outputs {sorted(outs)}")
                    continue
                tensors[tensor] = (outs[model_tensor]["data_type"], list(outs[model_tensor]["dims"]),
                                   f"{model}.{model_tensor}")
        for step in steps:
            model = step.get("model_name", "")
            sub = configs.get(model)
            if sub is None:
                continue
            ins = {t["name"]: t for t in sub.get("input", [])}
            missing = set(ins) - set((step.get("input_map") or {}))
            if missing:
                problems.append(f"{folder}: step {model!r} leaves inputs {sorted(missing)} unmapped")
            for model_tensor, tensor in (step.get("input_map") or {}).items():
                if model_tensor not in ins:
                    problems.append(f"{folder}: step {model!r} maps input {model_tensor!r}, "
                                    f"but {model} has inputs {sorted(ins)}")
                    continue
                if tensor not in tensors:
                    continue  # reported by validate_config_text
                dtype, dims, source = tensors[tensor]
                want = (ins[model_tensor]["data_type"], list(ins[model_tensor]["dims"]))
                if (dtype, dims) != want:
                    problems.append(f"{folder}: {source} gives {tensor!r} as {dtype} {dims}, but "
                                    f"{model}.{model_tensor} expects {want[0]} {want[1]}")
        for out in cfg.get("output", []):
            if out["name"] in tensors:
                dtype, dims, source = tensors[out["name"]]
                if (dtype, dims) != (out["data_type"], list(out["dims"])):
                    problems.append(f"{folder}: output {out['name']!r} is {out['data_type']} {out['dims']}, "
                                    f"but {source} gives {dtype} {dims}")
    if problems:
        raise ModelRepoError(f"model repository {repo_dir} is inconsistent:\n  - " + "\n  - ".join(problems))
    return configs


# ----------------------------------------------------------------------------------------------
# Writing the repository
# ----------------------------------------------------------------------------------------------


def _check_flavour(flavour: str) -> str:
    if flavour not in FLAVOURS:
        raise ModelRepoError(f"unknown flavour {flavour!r}: choose one of {', '.join(FLAVOURS)}")
    return flavour


def write_repo_file(path: Path, data: bytes | str, *, only_if_changed: bool = True) -> bool:
    """Atomically write a file of the repository (``str``: UTF-8), mode 0644, with a strictly newer mtime
    (so Triton's "was this model modified?" check always sees the change).

    Returns False when the content is unchanged and ``only_if_changed`` (file and mtime kept).
    """
    data = data.encode() if isinstance(data, str) else data
    if only_if_changed:
        try:
            if Path(path).read_bytes() == data:
                return False
        except FileNotFoundError:
            pass
    atomic_write(path, data, 0o644, newer_mtime=True)
    return True


def _read_marker(repo_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(repo_dir) / MARKER).read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise ModelRepoError(f"{Path(repo_dir) / MARKER} is not valid JSON: {exc}") from exc


def repo_flavour(repo_dir: Path) -> str | None:
    """The flavour ``repo_dir`` was rendered with, or None if it was not rendered by ``render_repo``."""
    marker = _read_marker(repo_dir)
    return marker.get("flavour") if marker else None


def repo_max_batch_size(repo_dir: Path) -> int | None:
    """The ``max_batch_size`` ``repo_dir`` was rendered with, or None if it was not rendered by ``render_repo``."""
    marker = _read_marker(repo_dir)
    return int(marker["max_batch_size"]) if marker and "max_batch_size" in marker else None


def _spec_for(repo_dir: Path, model_spec: "ModelSpec") -> tuple[RepoSpec, str]:
    """The repository spec of ``model_spec`` at the batch size ``repo_dir`` was rendered with, and its flavour."""
    marker = _read_marker(repo_dir)
    if marker is None or model_spec.name not in marker.get("models", []):
        raise ModelRepoError(f"{repo_dir} has no rendered model {model_spec.name!r}: run "
                             f"`mlpipe model-repo render --out {repo_dir} --model {model_spec.name}` first")
    return repo_spec(model_spec, int(marker.get("max_batch_size", MAX_BATCH))), marker["flavour"]


def _write_python_model(mdir: Path, model: TritonModel) -> None:
    """``<model>/1/model.py`` from ``model_repo/python/<source>/``; the preprocess model also gets
    ``frame_codec.py``, the decoder the host uses (``tasks/model/frame_codec.py``)."""
    assert model.source is not None
    write_repo_file(mdir / "1" / "model.py", (PYTHON_SOURCES / model.source / "model.py").read_bytes())
    if model.role == "preprocess":
        write_repo_file(mdir / "1" / FRAME_CODEC.name, FRAME_CODEC.read_bytes())


def render_repo(flavour: str, out_dir: Path, model_spec: "ModelSpec", max_batch_size: int = MAX_BATCH, *,
                serving_version: int | None = None) -> Path:
    """Render the static parts of the repository for ``model_spec`` into ``out_dir``; returns ``out_dir``.

    Idempotent: unchanged files are left alone (their mtime too, so Triton does not reload),
    classifier version folders are never touched and an existing serving-version pin is kept
    unless ``serving_version`` is given. Refuses to mix flavours in one folder. Re-rendering after
    the spec changed rewrites what changed (the ONNX of existing versions must still match it).
    """
    _check_flavour(flavour)
    spec = repo_spec(model_spec, max_batch_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = _read_marker(out_dir) or {}
    if marker and marker.get("flavour") != flavour:
        raise ModelRepoError(f"{out_dir} holds a {marker.get('flavour')!r} repository; render the {flavour!r} "
                             "flavour into another folder")
    if marker and int(marker.get("max_batch_size", max_batch_size)) != max_batch_size:
        raise ModelRepoError(f"{out_dir} was rendered with max_batch_size {marker.get('max_batch_size')}; "
                             f"render max_batch_size {max_batch_size} into another folder")
    models = sorted(set(marker.get("models", [])) | {spec.model_name})
    write_repo_file(out_dir / MARKER, json.dumps(
        {"flavour": flavour, "max_batch_size": max_batch_size, "models": models,
         "generated_by": "tasks/model/repo.py"}, indent=2, sort_keys=True) + "\n")

    for model in (spec.preprocess, spec.postprocess):
        mdir = out_dir / model.name
        write_repo_file(mdir / "config.pbtxt", render_config(model, spec, flavour))
        _write_python_model(mdir, model)
    ens_dir = out_dir / spec.ensemble.name
    write_repo_file(ens_dir / "config.pbtxt", render_config(spec.ensemble, spec, flavour))
    (ens_dir / "1").mkdir(parents=True, exist_ok=True)

    clf_dir = out_dir / spec.classifier.name
    clf_dir.mkdir(parents=True, exist_ok=True)
    if serving_version is None:
        serving_version = _pinned_version(clf_dir / "config.pbtxt")
    if serving_version is not None and (clf_dir / str(serving_version)).is_dir():
        set_serving_version(out_dir, model_spec, serving_version, only_if_changed=True)
    else:
        write_repo_file(clf_dir / "config.pbtxt",
                        render_config(spec.classifier, spec, flavour, serving_version=serving_version,
                                      classifier_platform=_classifier_platform(flavour, None)))
    logger.info("rendered %s model repository for %r in %s", flavour, spec.model_name, out_dir)
    return out_dir


# ----------------------------------------------------------------------------------------------
# The GPU preprocess variant: a DALI pipeline, rendered from the same spec (not runnable here)
# ----------------------------------------------------------------------------------------------

DALI_PIPELINE = "dali.py"
#: DALI's image decoder output type per channel count
_DALI_OUTPUT_TYPE = {1: "types.GRAY", 3: "types.RGB"}


def dali_preprocess_config(spec: RepoSpec, *, instances: int = 1) -> mc.ModelConfig:
    """The ``ModelConfig`` of the DALI variant of ``<model>_preprocess`` (``backend: "dali"``, on the GPU).

    DALI takes each encoded frame as a UINT8 ``[-1]`` tensor (ragged batching merges requests of
    different lengths) and gives only ``PIXELS``: a frame DALI cannot decode fails its request (no
    per-row ``FRAME_ERROR``); see ``model_repo/README.md``.
    """
    pixels = spec.preprocess.outputs[0]
    cfg = mc.ModelConfig(name=spec.preprocess.name, backend="dali", max_batch_size=spec.max_batch_size)
    cfg.input.add(name=FRAME_INPUT, data_type=mc.TYPE_UINT8, dims=[-1], allow_ragged_batch=True)
    _tensors(cfg.output, (pixels,))
    cfg.instance_group.add(count=instances, kind=mc.ModelInstanceGroup.KIND_GPU)
    cfg.dynamic_batching.SetInParent()
    cfg.dynamic_batching.max_queue_delay_microseconds = spec.preprocess.queue_delay_us["production"]
    return cfg


def dali_ensemble_config(spec: RepoSpec) -> mc.ModelConfig:
    """The ensemble in front of the DALI preprocess: ``FRAME`` UINT8 ``[-1]`` (one frame per request), the
    outputs of ``ENSEMBLE_OUTPUTS`` but ``FRAME_ERROR``."""
    cfg = build_config(spec.ensemble, spec, "production")
    del cfg.input[:]
    cfg.input.add(name=FRAME_INPUT, data_type=mc.TYPE_UINT8, dims=[-1])
    kept = [o for o in cfg.output if o.name != FRAME_ERROR]
    del cfg.output[:]
    cfg.output.extend(kept)
    del cfg.ensemble_scheduling.step[0].output_map[FRAME_ERROR]
    return cfg


def render_dali_pipeline(model_spec: "ModelSpec", spec: RepoSpec) -> str:
    """The DALI pipeline source (``<model>_preprocess/1/dali.py``) for ``model_spec``: the GPU decoder
    (``fn.decoders.image(device="mixed")``), the spec's resize policy (``fn.resize``) and normalisation
    and layout (``fn.crop_mirror_normalize``). The DALI backend serializes it at load (``autoserialize``)."""
    inp, pre = model_spec.input, model_spec.preprocessing
    norm = pre.normalisation
    # (pixel * scale - mean) / std == (pixel - mean / scale) / (std / scale): DALI's mean/std are in pixels
    mean = [m / norm.scale for m in norm.mean]
    std = [s / norm.scale for s in norm.std]
    if pre.resize == "stretch":
        resize = "    images = fn.resize(images, resize_y=HEIGHT, resize_x=WIDTH, interp_type=types.INTERP_LINEAR)\n"
        crop = ""
    elif pre.resize == "letterbox":
        resize = ("    images = fn.resize(images, size=[HEIGHT, WIDTH], mode=\"not_larger\", "
                  "interp_type=types.INTERP_LINEAR)\n")
        crop = "crop=[HEIGHT, WIDTH], out_of_bounds_policy=\"pad\", fill_values=0.0, "
    else:  # none: DALI cannot reject a frame of another size; it is centre-cropped / padded instead
        resize = ""
        crop = "crop=[HEIGHT, WIDTH], out_of_bounds_policy=\"pad\", fill_values=0.0, "
    layout = "CHW" if inp.layout == "NCHW" else "HWC"
    return (
        f'"""DALI preprocess of model {model_spec.name!r}: encoded frames -> {spec.preprocess.outputs[0].name} '
        f'float32 {list(model_spec.input_shape)}.\n\n'
        "Generated by tasks/model/repo.py (render_dali_pipeline) from models/"
        f"{model_spec.name}/spec.yaml; re-render instead of editing.\n"
        f"Resize policy {pre.resize!r}; normalisation (pixel * {norm.scale!r} - mean) / std, "
        f"mean {list(norm.mean)}, std {list(norm.std)}.\n"
        '"""\n\n'
        "import nvidia.dali.fn as fn\n"
        "import nvidia.dali.types as types\n"
        "from nvidia.dali import pipeline_def\n"
        "from nvidia.dali.plugin.triton import autoserialize\n\n"
        f"MAX_BATCH_SIZE = {spec.max_batch_size}\n"
        f"HEIGHT, WIDTH = {inp.height}, {inp.width}\n"
        f"MEAN = {mean!r}  # spec mean / scale, in pixel units\n"
        f"STD = {std!r}  # spec std / scale, in pixel units\n\n\n"
        "@autoserialize\n"
        "@pipeline_def(batch_size=MAX_BATCH_SIZE, num_threads=4, device_id=0)\n"
        "def preprocess():\n"
        f"    frames = fn.external_source(device=\"cpu\", name={json.dumps(FRAME_INPUT)}, dtype=types.UINT8)\n"
        f"    images = fn.decoders.image(frames, device=\"mixed\", output_type={_DALI_OUTPUT_TYPE[inp.channels]})\n"
        f"{resize}"
        f"    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout={json.dumps(layout)}, {crop}"
        "mean=MEAN, std=STD)\n"
    )


def render_dali_preprocess(model_spec: "ModelSpec", out_dir: Path, max_batch_size: int = MAX_BATCH) -> list[Path]:
    """Write the DALI variant of ``model_spec``'s preprocess into ``out_dir``: ``<model>_preprocess/config.pbtxt``,
    ``<model>_preprocess/1/dali.py`` and the ensemble config that goes with it (``<model>/config.pbtxt``).
    Copy these over a rendered production repository to switch (``model_repo/README.md``)."""
    spec = repo_spec(model_spec, max_batch_size)
    header = ("# Generated by tasks/model/repo.py (flavour: production, DALI preprocess); "
              "re-render instead of editing.\n")
    files = {
        Path(spec.preprocess.name) / "config.pbtxt":
            header + text_format.MessageToString(dali_preprocess_config(spec), use_short_repeated_primitives=True),
        Path(spec.preprocess.name) / "1" / DALI_PIPELINE: render_dali_pipeline(model_spec, spec),
        Path(spec.ensemble.name) / "config.pbtxt":
            header + text_format.MessageToString(dali_ensemble_config(spec), use_short_repeated_primitives=True),
    }
    written = []
    for rel, text in files.items():
        if rel.suffix == ".pbtxt":
            validate_config_text(text, source=rel)
        write_repo_file(Path(out_dir) / rel, text)
        written.append(Path(out_dir) / rel)
    return written


def export_templates(model_spec: "ModelSpec", out_dir: Path = TEMPLATES_DIR,
                     max_batch_size: int = MAX_BATCH) -> list[Path]:
    """Write the config.pbtxt of every model for both flavours to ``out_dir/<flavour>/<model>/`` (for reading,
    and for images that copy a fixed repository), the TensorRT classifier config and the DALI preprocess
    variant (``production/preprocess_dali/``); ``tests/unit/model/test_model_repo.py`` checks they are current."""
    spec = repo_spec(model_spec, max_batch_size)
    written = []
    for flavour in FLAVOURS:
        for model in spec.models:
            platform = None
            if model.role == "classifier":
                platform = _classifier_platform(flavour, None)
            path = Path(out_dir) / flavour / model.name / "config.pbtxt"
            write_repo_file(path, render_config(model, spec, flavour, serving_version=1 if platform else None,
                                                classifier_platform=platform))
            written.append(path)
    # what set_serving_version writes in production when the served version folder holds model.plan
    path = Path(out_dir) / "production-tensorrt" / spec.classifier.name / "config.pbtxt"
    write_repo_file(path, render_config(spec.classifier, spec, "production", serving_version=1,
                                        classifier_platform="tensorrt_plan"))
    written.append(path)
    written += render_dali_preprocess(model_spec, Path(out_dir) / "production" / "preprocess_dali", max_batch_size)
    return written


# ----------------------------------------------------------------------------------------------
# Versions
# ----------------------------------------------------------------------------------------------


def _version_dir_name(version: int) -> str:
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ModelRepoError(f"version must be an integer >= 1, got {version!r}")
    return str(version)


def write_classifier_version(repo_dir: Path, model_spec: "ModelSpec", version: int, onnx_path: Path,
                             plan_path: Path | None = None, flavour: str | None = None) -> Path:
    """Write classifier version ``version`` of ``model_spec`` atomically; returns ``<repo>/<model>_classifier/<N>``.

    ``onnx_path`` must be the spec's classifier contract (``networks.check_onnx_contract``: an
    ``OnnxContractError``, rejected, names the tensor and the expected shape). Files are staged in
    ``<model>_classifier/.tmp-<version>-<random>`` (Triton ignores folders not named by a number) and
    renamed to ``<version>`` in one step, so Triton never sees half a version. Re-writing identical
    files is a no-op; different files under an existing number are refused. ``flavour`` (default: the
    repository's) must match the flavour the repository was rendered with.
    """
    from tasks.model.networks import check_onnx_contract

    repo_dir = Path(repo_dir)
    spec, repo_flav = _spec_for(repo_dir, model_spec)
    flavour = _check_flavour(flavour or repo_flav)
    if repo_flav != flavour:
        raise ModelRepoError(f"{repo_dir} is a {repo_flav!r} repository, but a {flavour!r} version was requested")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ModelRepoError(f"ONNX file {onnx_path} does not exist")
    if plan_path is not None and not Path(plan_path).is_file():
        raise ModelRepoError(f"TensorRT plan {plan_path} does not exist")
    check_onnx_contract(onnx_path, model_spec)
    clf_dir = repo_dir / spec.classifier.name
    meta = {"version": version, "onnx_sha256": sha256_file(onnx_path),
            "plan_sha256": sha256_file(plan_path) if plan_path else None, "flavour": flavour}
    files: dict[str, bytes | Path] = {"model.onnx": onnx_path}
    if plan_path is not None:
        files["model.plan"] = Path(plan_path)
    if flavour == "local":
        assert spec.classifier.source is not None
        files["model.py"] = PYTHON_SOURCES / spec.classifier.source / "model.py"
    final = write_version_dir(clf_dir, version, files, meta, same_model_files(meta))
    logger.info("wrote %s version %d to %s", spec.classifier.name, version, final)
    return final


def same_model_files(meta: Mapping[str, Any]) -> Callable[[Mapping[str, Any]], bool]:
    """For :func:`write_version_dir`: an existing version holds the same model files as ``meta`` says (its
    ``onnx_sha256``, and its ``plan_sha256`` when a plan is written)."""
    return lambda old: (old.get("onnx_sha256") == meta["onnx_sha256"]
                        and (meta.get("plan_sha256") is None or old.get("plan_sha256") == meta["plan_sha256"]))


def write_version_dir(model_dir: Path, version: int, files: Mapping[str, bytes | Path], meta: Mapping[str, Any],
                      same: Callable[[Mapping[str, Any]], bool]) -> Path:
    """Write version ``version`` of the model in ``model_dir`` atomically; returns ``model_dir/<version>``.

    ``files`` (name -> bytes, or a file to copy) plus ``mlpipe-version.json`` (``meta`` and ``written_at``) are
    staged in ``model_dir/.tmp-<version>-<random>`` (Triton ignores folders not named by a number), fsynced,
    and renamed to ``<version>`` in one step, so Triton never sees half a version. A version folder that
    exists already is returned when ``same(its meta)`` holds, else refused: versions are immutable."""
    model_dir = Path(model_dir)
    final = model_dir / _version_dir_name(version)
    if final.exists():
        return _existing_version(final, same)
    staging = model_dir / f".tmp-{version}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        for name, src in files.items():
            if isinstance(src, bytes):
                (staging / name).write_bytes(src)
            else:
                shutil.copyfile(src, staging / name)
        stamped = {**meta, "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (staging / VERSION_META).write_text(json.dumps(stamped, indent=2, sort_keys=True) + "\n")
        for f in staging.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.rename(staging, final)  # atomic on one filesystem; fails if `final` appeared meanwhile
        except OSError:
            if final.exists():
                shutil.rmtree(staging, ignore_errors=True)
                return _existing_version(final, same)
            raise
        dir_fd = os.open(model_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def _existing_version(final: Path, same: Callable[[Mapping[str, Any]], bool]) -> Path:
    try:
        old = json.loads((final / VERSION_META).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        old = {}
    if not same(old):
        raise ModelRepoError(f"{final} already exists with different model files; versions are immutable: "
                             "write a new version number, or remove_version() this one first if it is not served")
    logger.info("%s already holds these files; nothing to do", final)
    return final


def numbered_dirs(model_dir: Path) -> list[int]:
    """The folders of ``model_dir`` Triton treats as versions (canonical positive integers), sorted."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and _VERSION_RE.match(p.name))


def list_versions(repo_dir: Path, model_name: str) -> list[int]:
    """Classifier versions present for ``model_name`` (the ensemble name, e.g. ``digits``), sorted."""
    return numbered_dirs(Path(repo_dir) / classifier_name(model_name))


def _pinned_version(config_path: Path) -> int | None:
    try:
        cfg = parse_config_text(Path(config_path).read_text(), source=config_path)
    except FileNotFoundError:
        return None
    versions = ((cfg.get("version_policy") or {}).get("specific") or {}).get("versions") or []
    return int(versions[0]) if len(versions) == 1 else None


def serving_version(repo_dir: Path, model_name: str) -> int | None:
    """The classifier version the config pins (None when the policy is not ``specific`` with one version)."""
    return _pinned_version(Path(repo_dir) / classifier_name(model_name) / "config.pbtxt")


def set_serving_version(repo_dir: Path, model_spec: "ModelSpec", version: int, *, prefer_plan: bool = True,
                        only_if_changed: bool = False) -> Path:
    """Atomically rewrite ``<model>_classifier/config.pbtxt`` to serve exactly ``version``; returns its path.

    In the production flavour the platform follows the version folder: ``tensorrt_plan`` when it
    holds ``model.plan`` (and ``prefer_plan``), else ``onnxruntime_onnx``. The new file gets a
    strictly newer mtime (unless ``only_if_changed`` and the text is the same: ``render_repo``).
    Triton notices nothing until ``load_model(<model>_classifier)``.
    """
    repo_dir = Path(repo_dir)
    spec, flavour = _spec_for(repo_dir, model_spec)
    vdir = repo_dir / spec.classifier.name / _version_dir_name(version)
    if not vdir.is_dir():
        raise ModelRepoError(f"cannot serve version {version}: {vdir} does not exist "
                             f"(versions present: {list_versions(repo_dir, spec.model_name)})")
    platform = _classifier_platform(flavour, vdir, prefer_plan)
    needed = {"python": ["model.py", "model.onnx"], "onnxruntime_onnx": ["model.onnx"],
              "tensorrt_plan": ["model.plan"]}[platform]
    missing = [f for f in needed if not (vdir / f).is_file()]
    if missing:
        raise ModelRepoError(f"cannot serve version {version}: {vdir} lacks {missing}")
    path = vdir.parent / "config.pbtxt"
    text = render_config(spec.classifier, spec, flavour, serving_version=version, classifier_platform=platform)
    validate_config_text(text)
    if write_repo_file(path, text, only_if_changed=only_if_changed):
        logger.info("%s now pins version %d (%s)", spec.classifier.name, version, platform)
    return path


def remove_version(repo_dir: Path, model_name: str, version: int, *, force: bool = False) -> bool:
    """Remove classifier version ``version`` of ``model_name``; False if it was absent.

    Refuses to remove the pinned serving version unless ``force``. The folder is first renamed to a
    hidden name (one atomic step, so Triton never sees a half-deleted version), then deleted.
    """
    repo_dir = Path(repo_dir)
    clf_dir = repo_dir / classifier_name(model_name)
    vdir = clf_dir / _version_dir_name(version)
    if not vdir.is_dir():
        return False
    if not force and serving_version(repo_dir, model_name) == version:
        raise ModelRepoError(f"version {version} of {clf_dir.name} is the one being served; set another "
                             "serving version first (or pass force=True)")
    trash = clf_dir / f".trash-{version}-{uuid.uuid4().hex[:8]}"
    os.rename(vdir, trash)
    shutil.rmtree(trash, ignore_errors=True)
    logger.info("removed %s version %d", clf_dir.name, version)
    return True


def clean_staging(repo_dir: Path) -> list[Path]:
    """Delete leftover hidden staging/trash folders (from a crash mid-write); returns what was removed."""
    removed = []
    for p in Path(repo_dir).glob("*/.*"):
        if p.is_dir() and (p.name.startswith(".tmp-") or p.name.startswith(".trash-")):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    from tasks.config import load_settings

    model_name = load_settings().model_name  # MLPIPE_MODEL_NAME; --model wins
    p = argparse.ArgumentParser(prog="mlpipe model-repo", description=(
        "Render and maintain the Triton model repository of a model spec (models/<name>/spec.yaml; ensemble = "
        "<model>_preprocess -> <model>_classifier -> <model>_postprocess). Flavour 'local' runs on the "
        "Python-backend-only tritonserver of the nvidia-pytriton wheel; 'production' uses onnxruntime_onnx / "
        "tensorrt_plan."))
    p.add_argument("--result-json", type=Path, help="also write the result as JSON to this file")
    sub = p.add_subparsers(dest="cmd", required=True)
    model_help = "model spec name (models/<name>/spec.yaml under MLPIPE_MODELS_DIR; default $MLPIPE_MODEL_NAME)"
    repo_help = "default: $MLPIPE_HOME/triton/model_repository"
    r = sub.add_parser("render", help="render the static parts (configs, pre/post-processing models)")
    r.add_argument("--out", type=Path, help=f"repository folder ({repo_help})")
    r.add_argument("--flavour", choices=FLAVOURS, default="local")
    r.add_argument("--max-batch-size", type=int, default=MAX_BATCH)
    a = sub.add_parser("add-version", help="write a classifier version atomically")
    a.add_argument("--version", type=int, required=True)
    a.add_argument("--onnx", type=Path, required=True)
    a.add_argument("--plan", type=Path)
    a.add_argument("--serve", action="store_true", help="also pin this version in the classifier config")
    s = sub.add_parser("set-version", help="pin the classifier version Triton serves (then load the model)")
    s.add_argument("--version", type=int, required=True)
    ls = sub.add_parser("list", help="list classifier versions and the served one")
    rm = sub.add_parser("remove-version", help="remove a classifier version that is not served")
    rm.add_argument("--version", type=int, required=True)
    for sp in (r, a, s, ls, rm):
        sp.add_argument("--model", default=model_name, help=model_help)
    for sp in (a, s, ls, rm):
        sp.add_argument("--repo", type=Path, help=repo_help)
    v = sub.add_parser("validate", help="validate a repository folder or one config.pbtxt")
    v.add_argument("path", type=Path)
    t = sub.add_parser("templates", help="re-export model_repo/templates/ (configs of both flavours, the DALI "
                                         "preprocess) for a model")
    t.add_argument("--model", default="digits", help="model spec name (default: digits, the checked-in templates)")
    t.add_argument("--out", type=Path, default=TEMPLATES_DIR)
    return p


def _run(args: argparse.Namespace) -> dict[str, Any]:
    from tasks.config import load_settings

    for attr in ("out", "repo"):
        if attr in vars(args) and getattr(args, attr) is None and args.cmd != "templates":
            setattr(args, attr, default_repo_dir())
    if args.cmd == "validate":
        if args.path.is_dir():
            return {"valid": True, "models": sorted(validate_repo(args.path))}
        if not args.path.is_file():
            raise ModelRepoError(f"{args.path} does not exist")
        cfg = validate_config_text(args.path.read_text(), source=args.path)
        return {"valid": True, "name": cfg.get("name")}
    if args.cmd in ("list", "remove-version"):  # by name: no spec needed
        if args.cmd == "list":
            return {"model": classifier_name(args.model), "versions": list_versions(args.repo, args.model),
                    "serving_version": serving_version(args.repo, args.model), "flavour": repo_flavour(args.repo)}
        return {"removed": remove_version(args.repo, args.model, args.version), "version": args.version}
    model_spec = load_settings().model_spec(args.model)
    if args.cmd == "render":
        out = render_repo(args.flavour, args.out, model_spec, args.max_batch_size)
        validate_repo(out)
        return {"repo": str(out), "flavour": args.flavour, "model_name": model_spec.name,
                "versions": list_versions(out, model_spec.name),
                "serving_version": serving_version(out, model_spec.name)}
    if args.cmd == "add-version":
        path = write_classifier_version(args.repo, model_spec, args.version, args.onnx, args.plan)
        if args.serve:
            set_serving_version(args.repo, model_spec, args.version)
        return {"path": str(path), "version": args.version,
                "serving_version": serving_version(args.repo, model_spec.name)}
    if args.cmd == "set-version":
        path = set_serving_version(args.repo, model_spec, args.version)
        return {"config": str(path), "serving_version": args.version}
    if args.cmd == "templates":
        return {"written": [str(p) for p in export_templates(model_spec, args.out)]}
    raise AssertionError(args.cmd)


def main(argv: Sequence[str] | None = None) -> int:
    from tasks.logs import setup_logging

    setup_logging()
    try:
        parser = _parser()
    except ValueError as exc:  # a bad setting: the message names the variable
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        result = _run(args)
    except MlpipeError as exc:  # ModelRepoError, SpecError (bad input: 2), OnnxContractError (rejected: 3)
        print(f"error: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if args.result_json:
        write_result_json(args.result_json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
