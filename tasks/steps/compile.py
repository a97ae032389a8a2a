"""compile: a TensorRT engine from a registered version's ONNX model.

FP16 (when the GPU supports it) with one optimization profile for the dynamic
batch axis (1..max batch). Runs as a Kubernetes pod on the serving GPU type in
production (``MLPIPE_EXECUTION=kubernetes``, image ``MLPIPE_COMPILER_IMAGE``).
Where TensorRT or a GPU is absent, nothing is faked: the step records
``{"status": "skipped", "reason": ...}`` and the run goes on with ONNX.

Outputs on the version: ``model.plan`` (when compiled) and ``compile.json``.

    mlpipe compile --version 3 [--max-batch 256] [--no-fp16]

Exit codes (``tasks.contracts.errors``): 0 compiled or skipped; ``EXIT_BAD_INPUT`` an unknown
version or a bad option; ``EXIT_REJECTED`` TensorRT could not build an engine from this model;
``EXIT_TRANSIENT`` the object store is unreachable (retried).
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
from tasks.contracts.errors import Rejected, run_cli
from tasks.logs import setup_logging
from tasks.contracts.serving import MAX_BATCH
from tasks.adapters.storage import Store, open_store
from tasks.contracts.results import write_result_json

logger = logging.getLogger(__name__)
INPUT_NAME = "input"
INPUT_SHAPE = (1, 28, 28)


class CompileError(Rejected, RuntimeError):
    """TensorRT is present but could not build an engine (the version is rejected: final)."""


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


def build_engine_api(onnx_path: Path, plan_path: Path, *, max_batch: int, fp16: bool) -> dict[str, Any]:
    """Build with the TensorRT Python API (explicit batch, one optimization profile)."""
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
    profile.set_shape(INPUT_NAME, (1, *INPUT_SHAPE), (opt, *INPUT_SHAPE), (max_batch, *INPUT_SHAPE))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CompileError("TensorRT builder returned no engine (see the TensorRT log above)")
    plan_path.write_bytes(bytes(serialized))
    return {"tool": "tensorrt-api", "tensorrt_version": trt.__version__, "precision": "fp16" if use_fp16 else "fp32",
            "profile": {"min": 1, "opt": opt, "max": max_batch}}


def build_engine_trtexec(onnx_path: Path, plan_path: Path, *, max_batch: int, fp16: bool) -> dict[str, Any]:
    """Build with ``trtexec`` (the NGC TensorRT image ships it)."""
    shape = "x".join(map(str, INPUT_SHAPE))
    opt = max(1, max_batch // 2)
    cmd = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={plan_path}",
           f"--minShapes={INPUT_NAME}:1x{shape}", f"--optShapes={INPUT_NAME}:{opt}x{shape}",
           f"--maxShapes={INPUT_NAME}:{max_batch}x{shape}"] + (["--fp16"] if fp16 else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not plan_path.exists():
        raise CompileError(f"trtexec failed (exit {proc.returncode}): {proc.stdout[-1500:]}{proc.stderr[-1500:]}")
    return {"tool": "trtexec", "precision": "fp16" if fp16 else "fp32",
            "profile": {"min": 1, "opt": opt, "max": max_batch}}


def compile_version(store: Store, model: str, version: int, *, max_batch: int = MAX_BATCH, fp16: bool = True,
                    force_skip_reason: str | None = None) -> dict[str, Any]:
    """Compile ``models/<model>/<version>/model.onnx`` to ``model.plan``; record compile.json either way."""
    registry.get_version(store, model, version)  # unknown version: RegistryError before any work
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

                info = build_engine_api(onnx_path, plan_path, max_batch=max_batch, fp16=fp16)
            except ImportError:
                info = build_engine_trtexec(onnx_path, plan_path, max_batch=max_batch, fp16=fp16)
            registry.record_artifact(store, model, version, layout.MODEL_PLAN, plan_path.read_bytes())
            result.update(status="compiled", reason=None, seconds=round(time.monotonic() - started, 1),
                          plan_bytes=plan_path.stat().st_size, **info)
            logger.info("compiled %s v%s with %s (%s) in %.1fs", model, version, info["tool"],
                        info["precision"], result["seconds"])
    # compile.json, and its summary on the version manifest, through the registry (its only writer)
    registry.record_artifact(store, model, version, layout.COMPILE_JSON, result, field="compile",
                             summary={k: result.get(k) for k in ("status", "reason", "precision", "tool")})
    return result


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv, bad_input=(ValueError,))  # RegistryError is a BadInput


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="mlpipe compile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", type=int, required=True, help="registered model version to compile")
    parser.add_argument("--model", default=None, help="model name (default $MLPIPE_MODEL_NAME or 'digits')")
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH,
                        help="upper end of the batch optimization profile (the repository's max_batch_size)")
    parser.add_argument("--no-fp16", action="store_true", help="build an FP32 engine")
    parser.add_argument("--result-json", type=Path, help="write the result here (Airflow XCom)")
    args = parser.parse_args(argv)
    setup_logging()
    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {args.max_batch}")
    cfg = load_settings()
    result = compile_version(open_store(cfg), args.model or cfg.model_name, args.version,
                             max_batch=args.max_batch, fp16=not args.no_fp16)
    print(json.dumps(result, indent=2, default=str))
    if args.result_json:
        write_result_json(args.result_json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
