"""The Triton model repository: one Python spec, two rendered flavours, atomic versions.

Layout rendered for model ``digits`` (see ``model_repo/README.md``)::

    <repo>/
      .mlpipe-repo.json            which flavour / batch size rendered this folder (Triton ignores files here)
      digits/config.pbtxt          ensemble: IMAGE -> preprocess -> digits_classifier -> postprocess
      digits/1/                    (ensembles need one, empty, version folder)
      preprocess/config.pbtxt, preprocess/1/model.py      Python backend
      postprocess/config.pbtxt, postprocess/1/model.py    Python backend
      digits_classifier/config.pbtxt                      version_policy pins the served version
      digits_classifier/<N>/model.onnx [model.plan] [model.py] mlpipe-version.json

Flavours:

* ``local``: the Triton binary of the nvidia-pytriton wheel has only the Python
  backend, so the classifier is a Python-backend model (``model_repo/python/
  classifier_ort/model.py``, copied into each version folder) running ONNX
  Runtime on ``model.onnx``.
* ``production``: the classifier uses ``platform: "onnxruntime_onnx"``, or
  ``"tensorrt_plan"`` when the served version folder holds a ``model.plan``.

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
from typing import Any, Mapping, Sequence

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as mc

from tasks.config import PROJECT_ROOT
from tasks.contracts.files import atomic_write, sha256_file
from tasks.contracts.results import write_result_json
from tasks.contracts.errors import BadInput
from tasks.contracts.serving import MAX_BATCH

logger = logging.getLogger(__name__)

FLAVOURS = ("local", "production")
MARKER = ".mlpipe-repo.json"
VERSION_META = "mlpipe-version.json"
PYTHON_SOURCES = PROJECT_ROOT / "model_repo" / "python"
TEMPLATES_DIR = PROJECT_ROOT / "model_repo" / "templates"
PREPROCESS = "preprocess"
POSTPROCESS = "postprocess"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_VERSION_RE = re.compile(r"^[1-9][0-9]*$")

#: the Triton data types (every ``DataType`` of the model-config proto but ``TYPE_INVALID``)
DTYPES = frozenset(mc.DataType.keys()) - {"TYPE_INVALID"}


class ModelRepoError(BadInput, RuntimeError):
    """The model repository (or a config in it) is missing, malformed or inconsistent (bad input: not retried)."""


# ----------------------------------------------------------------------------------------------
# The spec: the single source of truth for names, dtypes and dims
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # Triton data type, e.g. "TYPE_FP32"
    dims: tuple[int, ...]  # without the batch dimension (all models are batched)


@dataclass(frozen=True)
class StepSpec:
    model: str
    input_map: Mapping[str, str]  # model tensor -> ensemble tensor
    output_map: Mapping[str, str]  # model tensor -> ensemble tensor


@dataclass(frozen=True)
class ModelSpec:
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


@dataclass(frozen=True)
class RepoSpec:
    model_name: str
    max_batch_size: int
    preprocess: ModelSpec
    classifier: ModelSpec
    postprocess: ModelSpec
    ensemble: ModelSpec
    intra_op_threads: int = 1
    instances: int = 1
    parameters: Mapping[str, str] = field(default_factory=dict)

    @property
    def models(self) -> tuple[ModelSpec, ...]:
        return (self.preprocess, self.classifier, self.postprocess, self.ensemble)


def default_repo_dir() -> Path:
    """Where the local repository lives unless told otherwise: ``$MLPIPE_HOME/triton/model_repository``."""
    from tasks.config import load_settings

    return load_settings().home / "triton" / "model_repository"


def classifier_name(model_name: str) -> str:
    return f"{model_name}_classifier"


def _check_model_name(model_name: str) -> str:
    if not _NAME_RE.match(model_name or "") or model_name in {PREPROCESS, POSTPROCESS}:
        raise ModelRepoError(
            f"invalid model name {model_name!r}: use letters, digits, '_', '.', '-' (not 'preprocess'/'postprocess')")
    return model_name


def repo_spec(model_name: str = "digits", max_batch_size: int = MAX_BATCH, *, image_size: int = 28,
              num_classes: int = 10, embedding_dim: int = 64, top_k: int = 3,
              intra_op_threads: int = 1) -> RepoSpec:
    """The repository spec; the ONNX contract of docs/CONTRACTS.md (``input`` -> ``logits``, ``embedding``)."""
    _check_model_name(model_name)
    if not 1 <= max_batch_size <= 4096:
        raise ModelRepoError(f"max_batch_size must be between 1 and 4096, got {max_batch_size}")
    if not 1 <= top_k <= num_classes:
        raise ModelRepoError(f"top_k must be between 1 and num_classes ({num_classes}), got {top_k}")
    hw = (image_size, image_size)
    pre = ModelSpec(
        PREPROCESS, "preprocess",
        inputs=(TensorSpec("IMAGE", "TYPE_UINT8", hw),),
        outputs=(TensorSpec("PIXELS", "TYPE_FP32", (1, *hw)),),
        source="preprocess",
    )
    clf = ModelSpec(
        classifier_name(model_name), "classifier",
        inputs=(TensorSpec("input", "TYPE_FP32", (1, *hw)),),
        outputs=(TensorSpec("logits", "TYPE_FP32", (num_classes,)),
                 TensorSpec("embedding", "TYPE_FP32", (embedding_dim,))),
        source="classifier_ort",
        queue_delay_us={"local": 0, "production": 100},
    )
    post = ModelSpec(
        POSTPROCESS, "postprocess",
        inputs=(TensorSpec("LOGITS", "TYPE_FP32", (num_classes,)),),
        outputs=(TensorSpec("LABEL", "TYPE_INT64", (1,)), TensorSpec("SCORE", "TYPE_FP32", (1,)),
                 TensorSpec("TOPK_LABELS", "TYPE_INT64", (top_k,)), TensorSpec("TOPK_SCORES", "TYPE_FP32", (top_k,))),
        source="postprocess",
    )
    ens = ModelSpec(
        model_name, "ensemble",
        inputs=(TensorSpec("IMAGE", "TYPE_UINT8", hw),),
        outputs=(*post.outputs, TensorSpec("EMBEDDING", "TYPE_FP32", (embedding_dim,))),
        steps=(
            StepSpec(PREPROCESS, {"IMAGE": "IMAGE"}, {"PIXELS": "pixels"}),
            StepSpec(clf.name, {"input": "pixels"}, {"logits": "logits", "embedding": "EMBEDDING"}),
            StepSpec(POSTPROCESS, {"LOGITS": "logits"},
                     {t.name: t.name for t in post.outputs}),
        ),
    )
    return RepoSpec(model_name, max_batch_size, pre, clf, post, ens, intra_op_threads=intra_op_threads)


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


def build_config(model: ModelSpec, spec: RepoSpec, flavour: str, *, serving_version: int | None = None,
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
        params = dict(spec.parameters)
        if python_classifier:
            params.setdefault("intra_op_threads", str(spec.intra_op_threads))
        for key, value in params.items():
            cfg.parameters[key].string_value = value
    return cfg


def render_config(model: ModelSpec, spec: RepoSpec, flavour: str, *, serving_version: int | None = None,
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


def _spec_for(repo_dir: Path, model_name: str) -> tuple[RepoSpec, str]:
    marker = _read_marker(repo_dir)
    if marker is None or model_name not in marker.get("models", []):
        raise ModelRepoError(f"{repo_dir} has no rendered model {model_name!r}: run "
                             f"`mlpipe model-repo render --out {repo_dir} --model-name {model_name}` first")
    return repo_spec(model_name, int(marker.get("max_batch_size", MAX_BATCH))), marker["flavour"]


def render_repo(flavour: str, out_dir: Path, model_name: str = "digits", max_batch_size: int = MAX_BATCH, *,
                serving_version: int | None = None) -> Path:
    """Render the static parts of the repository for ``model_name`` into ``out_dir``; returns ``out_dir``.

    Idempotent: unchanged files are left alone (their mtime too, so Triton does not reload),
    classifier version folders are never touched and an existing serving-version pin is kept
    unless ``serving_version`` is given. Refuses to mix flavours in one folder.
    """
    _check_flavour(flavour)
    spec = repo_spec(model_name, max_batch_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = _read_marker(out_dir) or {}
    if marker and marker.get("flavour") != flavour:
        raise ModelRepoError(f"{out_dir} holds a {marker.get('flavour')!r} repository; render the {flavour!r} "
                             "flavour into another folder")
    if marker and int(marker.get("max_batch_size", max_batch_size)) != max_batch_size:
        raise ModelRepoError(f"{out_dir} was rendered with max_batch_size {marker.get('max_batch_size')}; "
                             f"render max_batch_size {max_batch_size} into another folder")
    models = sorted(set(marker.get("models", [])) | {model_name})
    write_repo_file(out_dir / MARKER, json.dumps(
        {"flavour": flavour, "max_batch_size": max_batch_size, "models": models,
         "generated_by": "tasks/model_repo.py"}, indent=2, sort_keys=True) + "\n")

    for model in (spec.preprocess, spec.postprocess):
        mdir = out_dir / model.name
        write_repo_file(mdir / "config.pbtxt", render_config(model, spec, flavour))
        assert model.source is not None
        write_repo_file(mdir / "1" / "model.py", (PYTHON_SOURCES / model.source / "model.py").read_bytes())
    ens_dir = out_dir / spec.ensemble.name
    write_repo_file(ens_dir / "config.pbtxt", render_config(spec.ensemble, spec, flavour))
    (ens_dir / "1").mkdir(parents=True, exist_ok=True)

    clf_dir = out_dir / spec.classifier.name
    clf_dir.mkdir(parents=True, exist_ok=True)
    if serving_version is None:
        serving_version = _pinned_version(clf_dir / "config.pbtxt")
    if serving_version is not None and (clf_dir / str(serving_version)).is_dir():
        set_serving_version(out_dir, model_name, serving_version)
    else:
        platform = _classifier_platform(flavour, None)
        write_repo_file(clf_dir / "config.pbtxt",
                           render_config(spec.classifier, spec, flavour, serving_version=serving_version,
                                         classifier_platform=platform))
    logger.info("rendered %s model repository for %r in %s", flavour, model_name, out_dir)
    return out_dir


def export_templates(out_dir: Path = TEMPLATES_DIR, model_name: str = "digits", max_batch_size: int = MAX_BATCH) -> list[Path]:
    """Write the config.pbtxt of every model for both flavours to ``out_dir/<flavour>/<model>/`` (for reading,
    and for images that copy a fixed repository); ``tests/test_model_repo.py`` checks they are current."""
    spec = repo_spec(model_name, max_batch_size)
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
    return written


# ----------------------------------------------------------------------------------------------
# Versions
# ----------------------------------------------------------------------------------------------


def _check_onnx_contract(onnx_path: Path, spec: RepoSpec) -> None:
    """Fail early, with names, when ``onnx_path`` does not match the classifier's tensors."""
    try:
        import onnx
    except ImportError:  # pragma: no cover - onnx is in requirements
        return
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure means "not an ONNX model"
        raise ModelRepoError(f"{onnx_path} is not a readable ONNX model: {exc}") from exc
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    outputs = [o.name for o in model.graph.output]
    want_in = [t.name for t in spec.classifier.inputs]
    want_out = [t.name for t in spec.classifier.outputs]
    if inputs != want_in or any(n not in outputs for n in want_out):
        raise ModelRepoError(f"{onnx_path} has inputs {inputs} and outputs {outputs}; the classifier contract "
                             f"(docs/CONTRACTS.md) needs inputs {want_in} and outputs {want_out}")
    shape = [d.dim_value or d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    want_shape = list(spec.classifier.inputs[0].dims)
    if len(shape) != len(want_shape) + 1 or shape[1:] != want_shape or isinstance(shape[0], int) and shape[0] > 0:
        raise ModelRepoError(f"{onnx_path} input shape is {shape}; expected [batch (dynamic), "
                             f"{', '.join(map(str, want_shape))}]")


def _version_dir_name(version: int) -> str:
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ModelRepoError(f"version must be an integer >= 1, got {version!r}")
    return str(version)


def write_classifier_version(repo_dir: Path, model_name: str, version: int, onnx_path: Path,
                             plan_path: Path | None = None, flavour: str | None = None) -> Path:
    """Write classifier version ``version`` atomically; returns ``<repo>/<model>_classifier/<version>``.

    Files are staged in ``<model>_classifier/.tmp-<version>-<random>`` (Triton ignores folders not
    named by a number) and renamed to ``<version>`` in one step, so Triton never sees half a version.
    Re-writing identical files is a no-op; different files under an existing number are refused.
    ``flavour`` (default: the repository's) must match the flavour the repository was rendered with.
    """
    repo_dir = Path(repo_dir)
    spec, repo_flav = _spec_for(repo_dir, model_name)
    flavour = _check_flavour(flavour or repo_flav)
    if repo_flav != flavour:
        raise ModelRepoError(f"{repo_dir} is a {repo_flav!r} repository, but a {flavour!r} version was requested")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ModelRepoError(f"ONNX file {onnx_path} does not exist")
    if plan_path is not None and not Path(plan_path).is_file():
        raise ModelRepoError(f"TensorRT plan {plan_path} does not exist")
    _check_onnx_contract(onnx_path, spec)
    clf_dir = repo_dir / spec.classifier.name
    final = clf_dir / _version_dir_name(version)
    meta = {"version": version, "onnx_sha256": sha256_file(onnx_path),
            "plan_sha256": sha256_file(plan_path) if plan_path else None, "flavour": flavour}
    if final.exists():
        return _existing_version(final, meta)

    staging = clf_dir / f".tmp-{version}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        shutil.copyfile(onnx_path, staging / "model.onnx")
        if plan_path is not None:
            shutil.copyfile(plan_path, staging / "model.plan")
        if flavour == "local":
            assert spec.classifier.source is not None
            shutil.copyfile(PYTHON_SOURCES / spec.classifier.source / "model.py", staging / "model.py")
        meta["written_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        (staging / VERSION_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for f in staging.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.rename(staging, final)  # atomic on one filesystem; fails if `final` appeared meanwhile
        except OSError:
            if final.exists():
                shutil.rmtree(staging, ignore_errors=True)
                return _existing_version(final, meta)
            raise
        dir_fd = os.open(clf_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("wrote %s version %d to %s", spec.classifier.name, version, final)
    return final


def _existing_version(final: Path, meta: dict[str, Any]) -> Path:
    try:
        old = json.loads((final / VERSION_META).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        old = {}
    same = (old.get("onnx_sha256") == meta["onnx_sha256"] and
            (meta["plan_sha256"] is None or old.get("plan_sha256") == meta["plan_sha256"]))
    if not same:
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


def set_serving_version(repo_dir: Path, model_name: str, version: int, *, prefer_plan: bool = True) -> Path:
    """Atomically rewrite ``<model>_classifier/config.pbtxt`` to serve exactly ``version``; returns its path.

    In the production flavour the platform follows the version folder: ``tensorrt_plan`` when it
    holds ``model.plan`` (and ``prefer_plan``), else ``onnxruntime_onnx``. The new file gets a
    strictly newer mtime. Triton notices nothing until ``load_model(<model>_classifier)``.
    """
    repo_dir = Path(repo_dir)
    spec, flavour = _spec_for(repo_dir, model_name)
    vdir = repo_dir / spec.classifier.name / _version_dir_name(version)
    if not vdir.is_dir():
        raise ModelRepoError(f"cannot serve version {version}: {vdir} does not exist "
                             f"(versions present: {list_versions(repo_dir, model_name)})")
    platform = _classifier_platform(flavour, vdir, prefer_plan)
    needed = {"python": ["model.py", "model.onnx"], "onnxruntime_onnx": ["model.onnx"],
              "tensorrt_plan": ["model.plan"]}[platform]
    missing = [f for f in needed if not (vdir / f).is_file()]
    if missing:
        raise ModelRepoError(f"cannot serve version {version}: {vdir} lacks {missing}")
    path = repo_dir / spec.classifier.name / "config.pbtxt"
    text = render_config(spec.classifier, spec, flavour, serving_version=version, classifier_platform=platform)
    validate_config_text(text)
    write_repo_file(path, text, only_if_changed=False)
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

    model_name = load_settings().model_name  # MLPIPE_MODEL_NAME; --model-name wins
    p = argparse.ArgumentParser(prog="mlpipe model-repo", description=(
        "Render and maintain the Triton model repository (ensemble = preprocess -> <model>_classifier -> "
        "postprocess). Flavour 'local' runs on the Python-backend-only tritonserver of the nvidia-pytriton "
        "wheel; 'production' uses onnxruntime_onnx / tensorrt_plan."))
    p.add_argument("--result-json", type=Path, help="also write the result as JSON to this file")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render", help="render the static parts (configs, pre/post-processing models)")
    r.add_argument("--out", type=Path, help="repository folder (default: $MLPIPE_HOME/triton/model_repository)")
    r.add_argument("--flavour", choices=FLAVOURS, default="local")
    r.add_argument("--model-name", default=model_name)
    r.add_argument("--max-batch-size", type=int, default=MAX_BATCH)
    a = sub.add_parser("add-version", help="write a classifier version atomically")
    a.add_argument("--repo", type=Path, help="default: $MLPIPE_HOME/triton/model_repository")
    a.add_argument("--model-name", default=model_name)
    a.add_argument("--version", type=int, required=True)
    a.add_argument("--onnx", type=Path, required=True)
    a.add_argument("--plan", type=Path)
    a.add_argument("--serve", action="store_true", help="also pin this version in the classifier config")
    s = sub.add_parser("set-version", help="pin the classifier version Triton serves (then load the model)")
    s.add_argument("--repo", type=Path, help="default: $MLPIPE_HOME/triton/model_repository")
    s.add_argument("--model-name", default=model_name)
    s.add_argument("--version", type=int, required=True)
    ls = sub.add_parser("list", help="list classifier versions and the served one")
    ls.add_argument("--repo", type=Path, help="default: $MLPIPE_HOME/triton/model_repository")
    ls.add_argument("--model-name", default=model_name)
    rm = sub.add_parser("remove-version", help="remove a classifier version that is not served")
    rm.add_argument("--repo", type=Path, help="default: $MLPIPE_HOME/triton/model_repository")
    rm.add_argument("--model-name", default=model_name)
    rm.add_argument("--version", type=int, required=True)
    v = sub.add_parser("validate", help="validate a repository folder or one config.pbtxt")
    v.add_argument("path", type=Path)
    t = sub.add_parser("templates", help="re-export model_repo/templates/ (configs of both flavours)")
    t.add_argument("--out", type=Path, default=TEMPLATES_DIR)
    return p


def _run(args: argparse.Namespace) -> dict[str, Any]:
    for attr in ("out", "repo"):
        if attr in vars(args) and getattr(args, attr) is None and args.cmd != "templates":
            setattr(args, attr, default_repo_dir())
    if args.cmd == "render":
        out = render_repo(args.flavour, args.out, args.model_name, args.max_batch_size)
        validate_repo(out)
        return {"repo": str(out), "flavour": args.flavour, "model_name": args.model_name,
                "versions": list_versions(out, args.model_name),
                "serving_version": serving_version(out, args.model_name)}
    if args.cmd == "add-version":
        path = write_classifier_version(args.repo, args.model_name, args.version, args.onnx, args.plan)
        if args.serve:
            set_serving_version(args.repo, args.model_name, args.version)
        return {"path": str(path), "version": args.version, "serving_version": serving_version(args.repo,
                                                                                               args.model_name)}
    if args.cmd == "set-version":
        path = set_serving_version(args.repo, args.model_name, args.version)
        return {"config": str(path), "serving_version": args.version}
    if args.cmd == "list":
        return {"model": classifier_name(args.model_name), "versions": list_versions(args.repo, args.model_name),
                "serving_version": serving_version(args.repo, args.model_name), "flavour": repo_flavour(args.repo)}
    if args.cmd == "remove-version":
        return {"removed": remove_version(args.repo, args.model_name, args.version), "version": args.version}
    if args.cmd == "validate":
        if args.path.is_dir():
            return {"valid": True, "models": sorted(validate_repo(args.path))}
        if not args.path.is_file():
            raise ModelRepoError(f"{args.path} does not exist")
        cfg = validate_config_text(args.path.read_text(), source=args.path)
        return {"valid": True, "name": cfg.get("name")}
    if args.cmd == "templates":
        return {"written": [str(p) for p in export_templates(args.out)]}
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
    except ModelRepoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
