"""Reusable Triton fixtures: a tiny contract-conforming ONNX classifier and a running local Triton.

Its fixtures are registered by ``pytest_plugins`` in ``tests/conftest.py``; import the helpers::

    from tests.support.triton import build_tiny_onnx

* ``build_tiny_onnx(path, seed=0)``: a small torch CNN exported to ONNX per docs/CONTRACTS.md
  (input ``input`` float32 [N,1,28,28], outputs ``logits`` [N,10] and ``embedding`` [N,64],
  dynamic batch, opset 17). Different seeds give different weights (distinguishable versions).
* ``tiny_onnx`` (function scope): such a model in ``tmp_path``.
* ``triton_server`` (session scope): a ``TritonServerHandle`` with a rendered local repository
  (model ``digits``, classifier version 1 pinned and loaded) and a started ``LocalTriton``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

MODEL_NAME = "digits"


def build_tiny_onnx(path: Path, seed: int = 0) -> Path:
    """Export a small seeded CNN matching the ONNX contract to ``path``; returns ``path``."""
    import torch
    from torch import nn

    class TinyNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            )
            self.embed = nn.Sequential(nn.Flatten(), nn.Linear(16 * 7 * 7, 64), nn.ReLU())
            self.head = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = (x - 0.1307) / 0.3081  # normalization lives inside the model (contract)
            emb = self.embed(self.features(x))
            return self.head(emb), emb

    torch.manual_seed(seed)
    net = TinyNet().eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            net, (torch.rand(2, 1, 28, 28),), str(path), dynamo=False, opset_version=17,
            input_names=["input"], output_names=["logits", "embedding"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}, "embedding": {0: "batch"}},
        )
    return path


@pytest.fixture(scope="session")
def _tiny_onnx_cache(tmp_path_factory) -> Path:
    return build_tiny_onnx(tmp_path_factory.mktemp("tiny-onnx") / "seed0.onnx", seed=0)


@pytest.fixture
def tiny_onnx(tmp_path, _tiny_onnx_cache) -> Path:
    """A tiny contract-conforming ONNX classifier (seed 0) at ``tmp_path/model.onnx``."""
    dst = tmp_path / "model.onnx"
    shutil.copyfile(_tiny_onnx_cache, dst)
    return dst


def sample_images(n: int, seed: int = 0):
    """``n`` uint8 images [n, 28, 28]: random strokes on black, deterministic per seed."""
    import numpy as np

    rng = np.random.default_rng(seed)
    imgs = np.zeros((n, 28, 28), dtype=np.uint8)
    for i in range(n):
        r0, c0 = rng.integers(4, 14, size=2)
        h, w = rng.integers(6, 14, size=2)
        imgs[i, r0:r0 + h, c0:c0 + w] = rng.integers(100, 256, size=(h, w), dtype=np.uint8)
    return imgs


@dataclass
class TritonServerHandle:
    triton: object  # tasks.adapters.triton.LocalTriton
    repo: Path
    model_name: str
    onnx_v1: Path
    work: Path

    @property
    def grpc_url(self) -> str:
        return self.triton.grpc_url  # type: ignore[attr-defined]

    @property
    def http_url(self) -> str:
        return self.triton.http_url  # type: ignore[attr-defined]

    def client(self, protocol: str = "grpc"):
        from tasks.adapters.triton import TritonClient

        return TritonClient(self.grpc_url if protocol == "grpc" else self.http_url, protocol=protocol)


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory, _tiny_onnx_cache):
    """A started LocalTriton serving ensemble ``digits`` with classifier version 1 (seed-0 tiny ONNX)."""
    from tasks.config import load_settings
    from tasks.local.triton import LocalTriton
    from tasks.model.repo import render_repo, set_serving_version, write_classifier_version

    spec = load_settings().model_spec(MODEL_NAME)
    work = tmp_path_factory.mktemp("triton")
    repo = render_repo("local", work / "repo", spec)
    write_classifier_version(repo, spec, 1, _tiny_onnx_cache)
    set_serving_version(repo, spec, 1)
    triton = LocalTriton(repo, work / "logs", backend_dir=work / "backends", load_models=[MODEL_NAME])
    triton.start(timeout=90)
    try:
        handle = TritonServerHandle(triton, repo, MODEL_NAME, _tiny_onnx_cache, work)
        client = handle.client()
        try:
            client.wait_model_ready(MODEL_NAME, timeout=60)
        finally:
            client.close()
        yield handle
    finally:
        triton.stop()
