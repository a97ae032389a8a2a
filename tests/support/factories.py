"""Small builders of store content for unit tests of the registry-side steps.

They write what the trainer and `validate` leave in the store; those steps
themselves are tested against real data in their own test files.
"""

from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=None)
def digits_onnx_bytes(seed: int = 0) -> bytes:
    """An untrained built-in digits classifier as ONNX bytes: a ``model.onnx`` the registry accepts (it
    checks the spec's ONNX contract at register). Cached per seed."""
    from tasks.config import load_settings
    from tests.support.spec_models import contract_onnx

    with tempfile.TemporaryDirectory() as tmp:
        return contract_onnx(Path(tmp) / "model.onnx", load_settings().model_spec("digits"), seed).read_bytes()


def fake_run(store, run_id="r1", drop_id="d1", acc=0.97, passed=True, onnx: bytes | None = None):
    store.put_json(f"runs/{run_id}/metrics.json", {"val_accuracy": acc, "clearml_task_id": "offline-123"})
    store.put_bytes(f"runs/{run_id}/model.onnx", onnx if onnx is not None else digits_onnx_bytes())
    store.put_bytes(f"drops/{drop_id}/manifest.parquet", b"manifest-" + drop_id.encode())
    store.put_json(f"drops/{drop_id}/_SUCCESS", {"rows": 1})
    validated(store, drop_id, passed)


def validated(store, drop_id: str, passed: bool = True) -> dict:
    """A validation result bound to the drop's current bytes, as ``validate`` leaves it."""
    from tasks.steps import drops

    return drops.bind_validation(store, drop_id, {"success": passed, "report_uri": "x/index.html",
                                                  "validated_at": "2026-01-01T00:00:00+00:00"},
                                 drops.content_digest(store, drop_id))
