"""Run-time configuration, read from environment variables once per process.

Every knob has a local default so ``make demo`` works on a fresh machine; the
same code points at MinIO, a ClearML server, Kafka and Triton in production by
setting the variables below. Nothing here is read at import time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _env(name: str, default: str) -> str:
    value = os.environ.get(name)
    return default if value is None or value == "" else value


def _env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class S3Settings:
    endpoint: str  # host:port, never a cloud default
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    secure: bool = False
    region: str = "us-east-1"


@dataclass(frozen=True)
class Settings:
    home: Path  # var/ folder for local state
    store_url: str  # file:///abs/dir or s3://bucket[/prefix]
    s3: S3Settings | None
    execution: str  # "local" or "kubernetes"
    model_name: str
    clearml_offline: bool
    clearml_project: str
    k8s_namespace: str
    trainer_image: str
    compiler_image: str
    gpu_node_selector: str  # "key=value"
    gpu_toleration: str  # "key=value:Effect" or "key:Effect"

    @property
    def kubernetes(self) -> bool:
        return self.execution == "kubernetes"


def load_settings() -> Settings:
    """Read settings from the environment (not cached: tests change it)."""
    home = Path(_env("MLPIPE_HOME", str(PROJECT_ROOT / "var"))).resolve()
    store_url = _env("MLPIPE_STORE_URL", f"file://{home / 'store'}")
    s3 = None
    if store_url.startswith("s3://"):
        endpoint = os.environ.get("MLPIPE_S3_ENDPOINT", "")
        access = os.environ.get("MLPIPE_S3_ACCESS_KEY", "")
        secret = os.environ.get("MLPIPE_S3_SECRET_KEY", "")
        if not endpoint or not access or not secret:
            raise ValueError(
                "MLPIPE_STORE_URL is an s3:// URL, so MLPIPE_S3_ENDPOINT, "
                "MLPIPE_S3_ACCESS_KEY and MLPIPE_S3_SECRET_KEY must all be set "
                "(explicit credentials and endpoint; no cloud defaults are probed)"
            )
        s3 = S3Settings(
            endpoint=endpoint,
            access_key=access,
            secret_key=secret,
            secure=_env_bool("MLPIPE_S3_SECURE", False),
            region=_env("MLPIPE_S3_REGION", "us-east-1"),
        )
    execution = _env("MLPIPE_EXECUTION", "local").lower()
    if execution not in {"local", "kubernetes"}:
        raise ValueError(f"MLPIPE_EXECUTION must be 'local' or 'kubernetes', got {execution!r}")
    return Settings(
        home=home,
        store_url=store_url,
        s3=s3,
        execution=execution,
        model_name=_env("MLPIPE_MODEL_NAME", "digits"),
        clearml_offline=not bool(os.environ.get("CLEARML_API_HOST")) or _env_bool("CLEARML_OFFLINE_MODE", False),
        clearml_project=_env("MLPIPE_CLEARML_PROJECT", "mlpipe"),
        k8s_namespace=_env("MLPIPE_K8S_NAMESPACE", "mlpipe"),
        trainer_image=_env("MLPIPE_TRAINER_IMAGE", "ghcr.io/mlpipe/trainer:latest"),
        compiler_image=_env("MLPIPE_COMPILER_IMAGE", "ghcr.io/mlpipe/trt-compiler:latest"),
        gpu_node_selector=_env("MLPIPE_GPU_NODE_SELECTOR", "nvidia.com/gpu.present=true"),
        gpu_toleration=_env("MLPIPE_GPU_TOLERATION", "nvidia.com/gpu:NoSchedule"),
    )


@lru_cache(maxsize=1)
def settings() -> Settings:
    """Settings for a long-running process (loaded once)."""
    return load_settings()
