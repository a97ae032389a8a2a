"""Model specs and small real ONNX classifiers for the tests of the spec-driven steps (registry, QC,
compile, monitor).

* ``write_spec(models_dir, name, base=..., **changes)``: a spec file ``<models_dir>/<name>/spec.yaml``
  made from a shipped spec (``models/<base>/spec.yaml``) with top-level sections replaced; point
  ``MLPIPE_MODELS_DIR`` at ``models_dir`` to use it (``use_specs``).
* ``TRICOLOUR``: a non-digits model (3 named classes, 16x16 RGB, JPEG frames, an 8-d embedding, its
  own QC and drift thresholds); ``colour_images`` is data it can learn in a second (a class is the
  bright channel).
* ``contract_onnx(path, spec)``: an untrained built-in CNN of ``spec`` exported to ONNX (the contract
  of ``spec``, deterministic per seed); ``train_tiny`` trains one on ``colour_images``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[2]

TRICOLOUR: dict[str, Any] = {
    "classes": [{"id": 0, "name": "circle"}, {"id": 1, "name": "square"}, {"id": 2, "name": "cross"}],
    "input": {"height": 16, "width": 16, "channels": 3, "layout": "NCHW", "dtype": "uint8"},
    "frames": {"encodings": ["jpeg", "png"], "max_frame_bytes": 65536},
    "preprocessing": {"resize": "stretch",
                      "normalisation": {"scale": 1 / 255, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}},
    "embedding_dim": 8,
    "qc": {"min_accuracy": 0.6, "min_class_recall": 0.5, "max_regression": 0.02, "max_parity_diff": 1e-4,
           "max_trt_parity_diff": 0.05},
    "golden_set": {"source": "shapes", "per_class": 20, "seed": 7},
    "drift": {"class_psi": 0.3, "class_js": 0.2, "confidence_drop": 0.1, "confidence_ks": 0.4,
              "embedding_cosine": 0.1, "embedding_mmd": 0.1, "min_samples": 30},
}


def spec_data(name: str, base: str = "shapes", **changes: Any) -> dict[str, Any]:
    """The YAML data of ``models/<base>/spec.yaml`` named ``name``, with the top-level keys of ``changes`` replaced."""
    data = yaml.safe_load((ROOT / "models" / base / "spec.yaml").read_text())
    data.update(copy.deepcopy(changes), name=name)
    return data


def write_spec(models_dir: Path, name: str, base: str = "shapes", **changes: Any) -> Path:
    """Write ``spec_data(name, base, **changes)`` to ``<models_dir>/<name>/spec.yaml``; returns its path."""
    path = Path(models_dir) / name / "spec.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec_data(name, base, **changes), sort_keys=False))
    return path


def use_specs(monkeypatch, models_dir: Path, *shipped: str) -> Path:
    """Point ``MLPIPE_MODELS_DIR`` at ``models_dir``, with copies of the shipped specs ``shipped`` in it."""
    for name in shipped:
        target = Path(models_dir) / name / "spec.yaml"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((ROOT / "models" / name / "spec.yaml").read_bytes())
    monkeypatch.setenv("MLPIPE_MODELS_DIR", str(models_dir))
    return Path(models_dir)


def load(name: str, base: str = "shapes", **changes: Any):
    """The validated ``ModelSpec`` of ``spec_data(name, base, **changes)`` (no file needed)."""
    from tasks.contracts.spec import parse_spec

    return parse_spec(yaml.safe_dump(spec_data(name, base, **changes)), f"<{name}>")


def colour_images(spec, labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """uint8 ``[N, *spec.image_shape]`` RGB images: channel ``labels[i]`` bright, the others dark, with noise."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(len(labels), *spec.image_shape)).astype(np.uint8)
    for i, c in enumerate(labels):
        images[i, ..., int(c)] = rng.integers(180, 255, size=spec.image_shape[:2])
    return images


def contract_onnx(path: Path, spec, seed: int = 0) -> Path:
    """An untrained built-in CNN of ``spec`` exported as ``spec``'s ONNX contract to ``path``."""
    import torch

    from tasks.model.networks import build_model, export_onnx

    torch.manual_seed(seed)
    return export_onnx(build_model(spec).eval(), path, spec)


def train_tiny(spec, out: Path, steps: int = 60, seed: int = 0) -> tuple[Path, Path]:
    """Train the built-in CNN of ``spec`` on ``colour_images`` (class = bright channel) for ``steps`` Adam
    steps; export ``out/model.onnx`` (parity-checked) and ``out/model.pt``. Returns their paths."""
    import torch

    from tasks.model import networks

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, spec.num_classes, size=600)
    x = torch.from_numpy(networks.to_input(colour_images(spec, labels, seed), spec))
    y = torch.from_numpy(labels.astype(np.int64))
    model = networks.build_model(spec)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        idx = torch.from_numpy(rng.choice(len(y), 32, replace=False))
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[idx])[0], y[idx])
        loss.backward()
        opt.step()
    model.eval()
    onnx = networks.export_onnx(model, Path(out) / "model.onnx", spec)
    networks.check_onnx_parity(model, onnx, spec)
    return onnx, networks.save_torch(model, Path(out) / "model.pt")
