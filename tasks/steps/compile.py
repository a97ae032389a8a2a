"""compile: a TensorRT engine and ONNX Runtime CPU models from a registered version's ONNX model.

Every tensor name and shape comes from the model spec of ``--model`` (``models/<name>/spec.yaml``,
``load_settings().model_spec``): the input ``onnx.input`` of shape ``[N, *input_shape]``, the outputs
checked with ``tasks.model.networks.check_onnx_contract``.

TensorRT (the GPU path): FP16 (when the GPU supports it) with one optimization profile
for the dynamic batch axis (1..max batch) of the spec's fixed input size. Runs as a Kubernetes pod on the serving GPU
type in production (``MLPIPE_EXECUTION=kubernetes``, image ``MLPIPE_COMPILER_IMAGE``).
Where TensorRT or a GPU is absent, nothing is faked: the step records
``{"status": "skipped", "reason": ...}`` (the top-level ``status``/``reason`` of the result
are TensorRT's).

ONNX Runtime (the CPU path, every machine; ``MLPIPE_COMPILE_CPU``), under ``cpu`` in the result:

* ``model.opt.onnx``: the graph ONNX Runtime optimises at ``MLPIPE_COMPILE_OPT_LEVEL``
  (default ``extended``: constant folding, Conv+BN/activation fusions), saved with
  ``SessionOptions.optimized_model_filepath`` as a standard ONNX file that plain onnxruntime loads;
* ``model.int8.onnx``: INT8 static quantisation (``onnxruntime.quantization.quantize_static``,
  QDQ format, S8S8, per-channel weight scales by default) calibrated (MinMax) on a seeded sample of
  ``MLPIPE_COMPILE_CALIBRATION_SAMPLES`` images of the version's training drops (``lineage.drops``,
  read with ``tasks.steps.drops.load_arrays``, preprocessed for the spec by ``tasks.model.networks.to_input``).
  A detector's (``task: detection``) drops are scenes of its pipeline: the frames come from
  ``tasks.steps.scenes.load_scenes`` (``scene_images``), the rest is the same code.
  The golden set is never used to calibrate (QC measures on it). Drops that cannot be read: no
  INT8 model, with the reason (``skipped``); a calibration set of fewer than
  ``MLPIPE_COMPILE_MIN_CALIBRATION_SAMPLES`` images or not of the spec's input shape is refused
  (``refused``, with the reason: ``check_calibration``).

A model ONNX Runtime cannot optimise or quantise is recorded (``cpu.artifacts.<name>.status``
``failed`` with why), never a failed step: QC's ``loads`` check decides about ``model.onnx``, and
QC gates each compiled artefact against ``model.onnx`` before deploy may serve it.

Outputs on the version: ``model.plan`` (when compiled), ``model.opt.onnx``, ``model.int8.onnx``
and ``compile.json`` (the report: sizes, seconds, calibration count), all through the registry.

    mlpipe compile --version 3 [--max-batch 256] [--no-fp16] [--no-cpu]

Exit codes (``tasks.contracts.errors``): 0 compiled or skipped; ``EXIT_BAD_INPUT`` an unknown
version, a missing or invalid model spec, or a bad option; ``EXIT_REJECTED`` TensorRT could not
build an engine from this model; ``EXIT_TRANSIENT`` the object store is unreachable (retried).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from tasks.steps import registry
from tasks.config import load_settings
from tasks.contracts import layout
from tasks.contracts.errors import Rejected, is_transient, run_cli
from tasks.contracts.files import sha256_file
from tasks.contracts.spec import ModelSpec
from tasks.logs import setup_logging
from tasks.contracts.serving import MAX_BATCH
from tasks.adapters.storage import Store, open_store
from tasks.contracts.results import write_result_json

logger = logging.getLogger(__name__)


class CompileError(Rejected, RuntimeError):
    """TensorRT is present but could not build an engine (the version is rejected: final)."""


class CalibrationUnavailable(RuntimeError):
    """The version's training drops cannot give calibration images (no INT8 model; the reason is recorded)."""


class CalibrationRefused(CalibrationUnavailable):
    """The calibration set is not fit to calibrate with: too few images, or not the model's input (no INT8 model;
    recorded as ``refused`` with the reason)."""


def check_calibration(x: Any, spec: ModelSpec, minimum: int) -> None:
    """Refuse (``CalibrationRefused``, naming the problem and what to do) a calibration set that is not ``spec``'s
    contract input (float ``[n, *spec.input_shape]``, finite) or has fewer than ``minimum`` images: MinMax ranges
    from a handful of images do not cover what the model will see, and a wrong shape would calibrate nothing."""
    import numpy as np

    shape = tuple(int(d) for d in spec.input_shape)
    got = tuple(int(d) for d in getattr(x, "shape", ()))
    if len(got) != len(shape) + 1 or any(want >= 1 and have != want for have, want in zip(got[1:], shape)):
        raise CalibrationRefused(
            f"the calibration images have shape {list(got)}, model {spec.name!r} takes {spec.onnx.input} "
            f"[N, {', '.join(map(str, shape))}]: the training drops do not match the model spec (validate the drops "
            "against this spec, or register the version with drops of this model)")
    if not np.issubdtype(x.dtype, np.floating):
        raise CalibrationRefused(f"the calibration images are {x.dtype}, the contract input is float32 "
                                 "(tasks.model.networks.to_input)")
    if got[0] < minimum:
        raise CalibrationRefused(
            f"the calibration set has {got[0]} image(s), at least {minimum} are needed "
            "(MLPIPE_COMPILE_MIN_CALIBRATION_SAMPLES) for activation ranges that represent the data: train on larger "
            "drops or raise MLPIPE_COMPILE_CALIBRATION_SAMPLES")
    if not np.isfinite(x).all():
        raise CalibrationRefused("the calibration images hold NaN or infinite values")


def calibration_inputs(store: Store, manifest: dict[str, Any], spec: ModelSpec, *, samples: int,
                       seed: int) -> tuple[Any, dict[str, Any]]:
    """A seeded sample of ``samples`` images of the version's training drops as ``spec``'s contract input
    (float32 ``[n, *spec.input_shape]``), and what it is (drops, count, seed)."""
    import numpy as np

    from tasks.model.networks import to_input
    from tasks.steps import drops

    drop_ids = [str(d.get("drop_id")) for d in (manifest.get("lineage") or {}).get("drops") or [] if d.get("drop_id")]
    if not drop_ids:
        raise CalibrationUnavailable("the version's lineage names no training drops")
    if spec.task == "detection":
        images = scene_images(store, drop_ids, spec)
    else:
        try:
            images, _labels = drops.load_arrays(store, drop_ids, spec)
        except drops.DropError as exc:  # an outage (Transient) is not caught: the step is retried
            raise CalibrationUnavailable(f"training drops {drop_ids} cannot be read for calibration: {exc}") from None
    if len(images) == 0:
        raise CalibrationUnavailable(f"training drops {drop_ids} hold no images")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(images), size=min(samples, len(images)), replace=False))
    return to_input(images[idx], spec), {"drops": drop_ids, "count": len(idx), "seed": int(seed),
                                   "pool": len(images)}


def scene_images(store: Store, drop_ids: Sequence[str], spec: ModelSpec) -> Any:
    """The frames (uint8 ``[N, *spec.image_shape]``) of a detector's training drops: the scenes of the pipeline
    whose detector ``spec`` is (``tasks.steps.scenes.load_scenes``); ``CalibrationUnavailable`` naming why when
    there is no such pipeline or the drops cannot be read as its scenes."""
    import numpy as np

    from tasks.contracts.errors import BadInput
    from tasks.contracts.pipeline import pipeline_of

    try:
        pipeline = pipeline_of(spec.name, load_settings().models_dir)
    except BadInput as exc:
        raise CalibrationUnavailable(f"the pipeline of detector {spec.name!r} cannot be read: {exc}") from None
    if pipeline is None:
        raise CalibrationUnavailable(f"detector {spec.name!r} is no pipeline's member: its training drops are scenes "
                                     "of a pipeline (models/<pipeline>/pipeline.yaml), none names it")
    try:
        from tasks.steps import scenes

        data = scenes.load_scenes(store, list(drop_ids), pipeline)
    except ImportError as exc:
        raise CalibrationUnavailable(f"the scene reader (tasks.steps.scenes) is not available: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - DropError and the like; an outage is re-raised: the step is retried
        if is_transient(exc):
            raise
        raise CalibrationUnavailable(f"training drops {list(drop_ids)} cannot be read as scenes of pipeline "
                                     f"{pipeline.name!r} for calibration: {type(exc).__name__}: {exc}") from None
    return np.asarray(data.images)


class _Batches:
    """``onnxruntime.quantization.CalibrationDataReader`` over fixed batches of contract input ``input_name``."""

    def __init__(self, x, input_name: str, batch_size: int = 64) -> None:
        self._batches = [x[i:i + batch_size] for i in range(0, len(x), batch_size)]
        self._input = input_name
        self._next = 0

    def get_next(self) -> dict[str, Any] | None:
        if self._next >= len(self._batches):
            return None
        self._next += 1
        return {self._input: self._batches[self._next - 1]}

    def rewind(self) -> None:
        self._next = 0


def optimize_onnx(onnx_path: Path, out_path: Path, *, level: str = "extended") -> dict[str, Any]:
    """Save ONNX Runtime's optimised graph of ``onnx_path`` (``SessionOptions.optimized_model_filepath``)."""
    import onnxruntime as ort

    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if level not in levels:
        raise ValueError(f"unknown optimisation level {level!r}: one of {', '.join(levels)}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = levels[level]
    opts.optimized_model_filepath = str(out_path)
    opts.log_severity_level = 3
    ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
    if not out_path.is_file():
        raise CompileError(f"ONNX Runtime wrote no optimised model to {out_path}")
    return {"opt_level": level}


def quantize_int8(onnx_path: Path, out_path: Path, calibration, input_name: str, *,
                  per_channel: bool = True) -> dict[str, Any]:
    """INT8 static quantisation of ``onnx_path`` (QDQ, S8S8, MinMax calibration on ``calibration``, the
    contract input fed to the input tensor ``input_name``)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out_path.with_name(f".{out_path.stem}.pre.onnx")
    try:
        # the recommended pre-processing (shape inference, basic folding); symbolic shape inference is not needed
        # for this static-shaped CNN (and fails on some exporters' dim names)
        quant_pre_process(str(onnx_path), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out_path), _Batches(calibration, input_name), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    finally:
        pre.unlink(missing_ok=True)
    return {"format": "QDQ", "activation_type": "int8", "weight_type": "int8", "per_channel": per_channel,
            "calibrate_method": "MinMax"}


def compile_cpu(store: Store, spec: ModelSpec, version: int, onnx_path: Path, work: Path, *, opt_level: str,
                calibration_samples: int, calibration_seed: int, per_channel: bool,
                min_calibration_samples: int = 32) -> dict[str, Any]:
    """Build ``model.opt.onnx`` and ``model.int8.onnx`` from ``onnx_path``; record each through the registry.

    The source and each built file must be ``spec``'s ONNX contract (``check_onnx_contract``); a file that
    is not is recorded as failed, with the tensor and the expected shape."""
    from tasks.model.networks import check_onnx_contract

    model = spec.name
    try:
        import onnxruntime as ort
        import onnxruntime.quantization  # needs onnx
    except ImportError as exc:
        why = f"ONNX Runtime (with onnx) is not installed: {exc}"
        logger.warning("CPU compile skipped: %s", why)
        return {"tool": "onnxruntime", "status": "skipped", "reason": why,
                "artifacts": {n: {"status": "skipped", "reason": why} for n in layout.CPU_COMPILED}}
    started = time.monotonic()
    out: dict[str, Any] = {"tool": "onnxruntime", "onnxruntime_version": ort.__version__,
                           "source": layout.MODEL_ONNX, "source_bytes": onnx_path.stat().st_size, "artifacts": {}}
    try:
        check_onnx_contract(onnx_path, spec)
    except Exception as exc:  # noqa: BLE001 - a model ORT cannot run: nothing to compile, QC's loads check decides
        why = (f"{layout.MODEL_ONNX} does not load or run as the ONNX contract of spec {model!r} in ONNX Runtime: "
               f"{type(exc).__name__}: {str(exc)[:300]}")
        logger.warning("CPU compile skipped: %s", why)
        out.update(status="failed", reason=why, seconds=round(time.monotonic() - started, 2))
        for name in layout.CPU_COMPILED:
            out["artifacts"][name] = {"status": "failed", "reason": why}
        return out

    def build(name: str, fn) -> None:
        path = work / name
        t0 = time.monotonic()
        try:
            info = fn(path)
            check_onnx_contract(path, spec)
        except CalibrationUnavailable as exc:
            status = "refused" if isinstance(exc, CalibrationRefused) else "skipped"
            out["artifacts"][name] = {"status": status, "reason": str(exc)}
            logger.warning("%s not built (%s): %s", name, status, exc)
            return
        except Exception as exc:  # noqa: BLE001 - recorded; QC and deploy go on with model.onnx
            if is_transient(exc):
                raise
            out["artifacts"][name] = {"status": "failed", "reason": f"{type(exc).__name__}: {str(exc)[:500]}"}
            logger.warning("%s could not be built: %s", name, exc)
            return
        seconds = round(time.monotonic() - t0, 3)
        uri = registry.record_artifact(store, model, version, name, path.read_bytes())
        size = path.stat().st_size
        out["artifacts"][name] = {"status": "compiled", "reason": None, "bytes": size,
                                  "size_ratio": round(size / out["source_bytes"], 4), "seconds": seconds,
                                  "sha256": sha256_file(path), "uri": uri, **info}
        logger.info("built %s (%d bytes, %.0f%% of model.onnx) in %.2fs", name, size,
                    100 * size / out["source_bytes"], seconds)

    build(layout.MODEL_OPT_ONNX, lambda path: optimize_onnx(onnx_path, path, level=opt_level))

    def int8(path: Path) -> dict[str, Any]:
        x, calib = calibration_inputs(store, registry.get_version(store, model, version), spec,
                                      samples=calibration_samples, seed=calibration_seed)
        check_calibration(x, spec, min_calibration_samples)  # too few or the wrong shape: refused, with why
        return {**quantize_int8(onnx_path, path, x, spec.onnx.input, per_channel=per_channel), "calibration": calib}

    build(layout.MODEL_INT8_ONNX, int8)
    built = [n for n, a in out["artifacts"].items() if a["status"] == "compiled"]
    out["status"] = "compiled" if len(built) == len(layout.CPU_COMPILED) else "partial" if built else "failed"
    out["reason"] = None if out["status"] == "compiled" else "; ".join(
        f"{n}: {a['reason']}" for n, a in out["artifacts"].items() if a["status"] != "compiled")
    out["seconds"] = round(time.monotonic() - started, 2)
    return out


def tensorrt_unavailable_reason() -> str | None:
    """Why TensorRT compilation cannot run on this machine, or None when it can."""
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError or a broken stub package
        trtexec = shutil.which("trtexec")
        if trtexec is None:
            return f"TensorRT is not installed (python package: {type(exc).__name__}: {exc}; no trtexec on PATH)"
    if not _cuda_gpu_present():
        return "no CUDA GPU visible (TensorRT engines are built on the serving GPU type)"
    return None


def _cuda_gpu_present() -> bool:
    try:
        import torch

        if torch.cuda.is_available():
            return True
    except Exception:  # noqa: BLE001
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10)
        return out.returncode == 0 and "GPU" in out.stdout
    except (OSError, subprocess.SubprocessError):
        return False


def _profile_shape(spec: ModelSpec) -> tuple[int, ...]:
    """The input shape without the batch axis of the TensorRT profile (``spec.input_shape``); a variable
    height or width has no profile: ``CompileError``."""
    shape = tuple(spec.input_shape)
    if any(d < 1 for d in shape):
        raise CompileError(f"model {spec.name!r} declares a variable input size ({spec.input.height}x"
                           f"{spec.input.width}): the TensorRT profile needs fixed input.height and input.width")
    return shape


def build_engine_api(onnx_path: Path, plan_path: Path, spec: ModelSpec, *, max_batch: int,
                     fp16: bool) -> dict[str, Any]:
    """Build with the TensorRT Python API (explicit batch, one optimization profile of ``spec``'s input)."""
    import tensorrt as trt

    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CompileError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 30)
    use_fp16 = fp16 and builder.platform_has_fast_fp16
    if use_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    opt = max(1, max_batch // 2)
    shape = _profile_shape(spec)
    profile.set_shape(spec.onnx.input, (1, *shape), (opt, *shape), (max_batch, *shape))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CompileError("TensorRT builder returned no engine (see the TensorRT log above)")
    plan_path.write_bytes(bytes(serialized))
    return {"tool": "tensorrt-api", "tensorrt_version": trt.__version__, "precision": "fp16" if use_fp16 else "fp32",
            "profile": {"min": 1, "opt": opt, "max": max_batch}}


def build_engine_trtexec(onnx_path: Path, plan_path: Path, spec: ModelSpec, *, max_batch: int,
                         fp16: bool) -> dict[str, Any]:
    """Build with ``trtexec`` (the NGC TensorRT image ships it), the profile of ``spec``'s input."""
    shape = "x".join(map(str, _profile_shape(spec)))
    opt = max(1, max_batch // 2)
    name = spec.onnx.input
    cmd = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={plan_path}",
           f"--minShapes={name}:1x{shape}", f"--optShapes={name}:{opt}x{shape}",
           f"--maxShapes={name}:{max_batch}x{shape}"] + (["--fp16"] if fp16 else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not plan_path.exists():
        raise CompileError(f"trtexec failed (exit {proc.returncode}): {proc.stdout[-1500:]}{proc.stderr[-1500:]}")
    return {"tool": "trtexec", "precision": "fp16" if fp16 else "fp32",
            "profile": {"min": 1, "opt": opt, "max": max_batch}}


def compile_version(store: Store, model: str, version: int, *, max_batch: int = MAX_BATCH, fp16: bool = True,
                    force_skip_reason: str | None = None, cpu: bool | None = None) -> dict[str, Any]:
    """Compile ``models/<model>/<version>/model.onnx`` to ``model.plan`` (TensorRT, where it can) and to
    ``model.opt.onnx`` / ``model.int8.onnx`` (ONNX Runtime, unless ``cpu`` is False or
    ``MLPIPE_COMPILE_CPU=0``); record compile.json either way. Names and shapes come from ``model``'s spec
    (``load_settings().model_spec(model)``; ``SpecError``, bad input, when there is none)."""
    cfg = load_settings()
    spec = cfg.model_spec(model)
    registry.get_version(store, model, version)  # unknown version: RegistryError before any work
    settings = cfg.compile
    cpu = settings.cpu if cpu is None else cpu
    result: dict[str, Any] = {"model": model, "version": version, "max_batch": max_batch,
                              "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    reason = force_skip_reason or tensorrt_unavailable_reason()
    if reason:
        logger.warning("compile skipped: %s; the run goes on with ONNX", reason)
        result.update(status="skipped", reason=reason)
    else:
        with tempfile.TemporaryDirectory(prefix="mlpipe-trt-") as tmp:
            onnx_path = store.get_file(layout.version_file_key(model, version, layout.MODEL_ONNX),
                                       Path(tmp) / "model.onnx")
            plan_path = Path(tmp) / "model.plan"
            started = time.monotonic()
            try:
                import tensorrt  # noqa: F401

                info = build_engine_api(onnx_path, plan_path, spec, max_batch=max_batch, fp16=fp16)
            except ImportError:
                info = build_engine_trtexec(onnx_path, plan_path, spec, max_batch=max_batch, fp16=fp16)
            registry.record_artifact(store, model, version, layout.MODEL_PLAN, plan_path.read_bytes())
            result.update(status="compiled", reason=None, seconds=round(time.monotonic() - started, 1),
                          plan_bytes=plan_path.stat().st_size, **info)
            logger.info("compiled %s v%s with %s (%s) in %.1fs", model, version, info["tool"],
                        info["precision"], result["seconds"])
    if cpu:
        with tempfile.TemporaryDirectory(prefix="mlpipe-ort-") as tmp:
            onnx_path = store.get_file(layout.version_file_key(model, version, layout.MODEL_ONNX),
                                       Path(tmp) / "model.onnx")
            result["cpu"] = compile_cpu(store, spec, version, onnx_path, Path(tmp), opt_level=settings.opt_level,
                                        calibration_samples=settings.calibration_samples,
                                        calibration_seed=settings.calibration_seed, per_channel=settings.per_channel,
                                        min_calibration_samples=settings.min_calibration_samples)
    else:
        result["cpu"] = {"status": "skipped", "reason": "MLPIPE_COMPILE_CPU=0", "artifacts": {}}
    # compile.json, and its summary on the version manifest, through the registry (its only writer)
    summary = {k: result.get(k) for k in ("status", "reason", "precision", "tool")}
    summary["cpu"] = {"status": result["cpu"]["status"], "reason": result["cpu"].get("reason"),
                      "artifacts": {n: {k: a.get(k) for k in ("status", "bytes", "sha256")}
                                    for n, a in result["cpu"]["artifacts"].items()}}
    registry.record_artifact(store, model, version, layout.COMPILE_JSON, result, field="compile", summary=summary)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv, bad_input=(ValueError,))  # RegistryError is a BadInput


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="mlpipe compile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", type=int, required=True, help="registered model version to compile")
    parser.add_argument("--model", default=None, help="model name: its spec is $MLPIPE_MODELS_DIR/<name>/spec.yaml "
                        "(default $MLPIPE_MODEL_NAME or 'digits')")
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH,
                        help="upper end of the batch optimization profile (the repository's max_batch_size)")
    parser.add_argument("--no-fp16", action="store_true", help="build an FP32 engine")
    parser.add_argument("--no-cpu", action="store_true", help="do not build the ONNX Runtime CPU models "
                        "(default: MLPIPE_COMPILE_CPU)")
    parser.add_argument("--result-json", type=Path, help="write the result here (Airflow XCom)")
    args = parser.parse_args(argv)
    setup_logging()
    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {args.max_batch}")
    cfg = load_settings()
    result = compile_version(open_store(cfg), args.model or cfg.model_name, args.version,
                             max_batch=args.max_batch, fp16=not args.no_fp16, cpu=False if args.no_cpu else None)
    print(json.dumps(result, indent=2, default=str))
    if args.result_json:
        write_result_json(args.result_json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
