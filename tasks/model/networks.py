"""The digit classifier: a small CNN for 28x28 grayscale images, and its ONNX export.

Contract (docs/CONTRACTS.md, "ONNX classifier"):

* input ``input``: float32 ``[N, 1, 28, 28]``, pixel/255 in 0..1; the MNIST
  normalisation happens inside the model, so callers never repeat it;
* outputs ``logits`` float32 ``[N, 10]`` and ``embedding`` float32 ``[N, 64]``
  (the penultimate layer, used for drift monitoring and the vector store);
* dynamic batch axis, opset 17.

Shared by ``tasks.steps.train`` (builds and exports) and QC (parity checks, reloading
the framework model from ``model.pt``). ``torch`` is imported inside functions
and in the model factory so importing this module stays cheap.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from tasks.contracts.errors import Rejected

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAMES = ("logits", "embedding")
NUM_CLASSES = 10
EMBEDDING_DIM = 64
IMAGE_SIZE = 28
OPSET = 17
PARITY_TOLERANCE = 1e-4
# MNIST pixel statistics (of pixel/255), applied inside the model.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


class ParityError(Rejected, RuntimeError):
    """ONNX Runtime and PyTorch disagree by more than the tolerance (the model is rejected: final)."""


def _define_classes() -> type:
    import torch
    from torch import nn

    class DigitCNN(nn.Module):
        """conv(32) -> pool -> conv(64) -> pool -> conv(128) -> pool -> fc(64) = embedding -> fc(10) = logits.

        Every 3x3 conv is followed by BatchNorm and ReLU; dropout sits between the
        embedding and the classification head (inactive in eval mode and in ONNX).
        About 0.17 M parameters and 7.5 M multiply-adds per image: 8 epochs on
        2,000 images take seconds on 2 CPU cores.
        """

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.tensor(MNIST_MEAN))
            self.register_buffer("std", torch.tensor(MNIST_STD))

            def block(c_in: int, c_out: int) -> list[nn.Module]:
                return [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
                        nn.BatchNorm2d(c_out), nn.ReLU(inplace=True), nn.MaxPool2d(2)]

            self.features = nn.Sequential(
                *block(1, 32),  # 28 -> 14
                *block(32, 64),  # 14 -> 7
                *block(64, 128),  # 7 -> 3
            )
            self.embed = nn.Sequential(
                nn.Flatten(),
                nn.Linear(128 * 3 * 3, EMBEDDING_DIM),
                nn.ReLU(inplace=True),
            )
            self.dropout = nn.Dropout(0.25)
            self.head = nn.Linear(EMBEDDING_DIM, NUM_CLASSES)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = (x - self.mean) / self.std
            embedding = self.embed(self.features(x))
            logits = self.head(self.dropout(embedding))
            return logits, embedding

    return DigitCNN


_DIGIT_CNN: type | None = None


def model_class() -> type:
    """The ``DigitCNN`` class (defined lazily so importing this module does not import torch)."""
    global _DIGIT_CNN
    if _DIGIT_CNN is None:
        _DIGIT_CNN = _define_classes()
    return _DIGIT_CNN


def build_model() -> "nn.Module":
    """A freshly initialised classifier (seed torch first for reproducible weights)."""
    return model_class()()


def count_params(model: "nn.Module") -> int:
    return int(sum(p.numel() for p in model.parameters()))


def to_input(images: "np.ndarray") -> "np.ndarray":
    """uint8 ``[N, 28, 28]`` (or ``[N, 1, 28, 28]``) -> float32 ``[N, 1, 28, 28]`` in 0..1 (the contract input)."""
    import numpy as np

    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[:, None, :, :]
    if arr.ndim != 4 or arr.shape[1:] != (1, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"expected images of shape [N, 28, 28] or [N, 1, 28, 28], got {list(arr.shape)}")
    if arr.dtype == np.uint8:
        return (arr.astype(np.float32) / 255.0).astype(np.float32)
    return arr.astype(np.float32)


def export_onnx(model: "nn.Module", path: str | Path) -> Path:
    """Export ``model`` to ONNX per the contract (TorchScript exporter, opset 17, dynamic batch)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    dummy = torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.float32, device=device)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with torch.no_grad():
            torch.onnx.export(
                model,
                (dummy,),
                str(tmp),
                dynamo=False,
                opset_version=OPSET,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes={INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in OUTPUT_NAMES}},
                do_constant_folding=True,
            )
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
        model.train(was_training)
    return path


def onnx_session(onnx_path: str | Path, threads: int = 1) -> Any:
    """A CPU ONNX Runtime session for ``onnx_path`` (``threads`` intra-op threads; 1 gives repeatable numbers)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])


def predict_torch(model: "nn.Module", x: "np.ndarray", batch_size: int = 512) -> tuple["np.ndarray", "np.ndarray"]:
    """(logits, embedding) as float32 numpy arrays for contract input ``x`` (eval mode, no grad)."""
    import numpy as np
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits, embs = [], []
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size])).to(device)
                lo, em = model(batch)
                logits.append(lo.float().cpu().numpy())
                embs.append(em.float().cpu().numpy())
    finally:
        model.train(was_training)
    if not logits:
        return np.zeros((0, NUM_CLASSES), np.float32), np.zeros((0, EMBEDDING_DIM), np.float32)
    return np.concatenate(logits), np.concatenate(embs)


def parity_inputs(n: int, seed: int = 1234) -> "np.ndarray":
    """Deterministic contract inputs for parity checks: digit-like sparse images in 0..1."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.random((n, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    x[x < 0.6] = 0.0  # mostly black background, like MNIST
    return x.astype(np.float32)


def check_onnx_parity(
    model: "nn.Module",
    onnx_path: str | Path,
    batch_sizes: Sequence[int] = (1, 7, 32),
    inputs: "np.ndarray | None" = None,
    tolerance: float = PARITY_TOLERANCE,
) -> float:
    """Max |PyTorch - ONNX Runtime| over logits and embedding for each batch size.

    ``inputs`` (contract float32 ``[N,1,28,28]``) defaults to deterministic
    synthetic images; batches are taken from its start. Raises ``ParityError``
    if the difference exceeds ``tolerance`` or a shape is wrong.
    """
    import numpy as np

    sess = onnx_session(onnx_path)
    need = max(batch_sizes)
    if inputs is None:
        inputs = parity_inputs(need)
    elif len(inputs) < need:
        reps = -(-need // max(len(inputs), 1))
        inputs = np.concatenate([inputs] * reps)
    worst = 0.0
    for bs in batch_sizes:
        x = np.ascontiguousarray(inputs[:bs], dtype=np.float32)
        t_logits, t_emb = predict_torch(model, x)
        o_logits, o_emb = sess.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
        if o_logits.shape != (bs, NUM_CLASSES) or o_emb.shape != (bs, EMBEDDING_DIM):
            raise ParityError(
                f"ONNX output shapes {o_logits.shape}, {o_emb.shape} for batch {bs}; "
                f"expected ({bs}, {NUM_CLASSES}) and ({bs}, {EMBEDDING_DIM})"
            )
        diff = max(float(np.max(np.abs(t_logits - o_logits))), float(np.max(np.abs(t_emb - o_emb))))
        worst = max(worst, diff)
        if diff > tolerance:
            raise ParityError(
                f"ONNX/PyTorch mismatch at batch {bs}: max abs diff {diff:.3g} > {tolerance:g} ({onnx_path})"
            )
    logger.info("ONNX parity ok for batches %s: max abs diff %.3g", list(batch_sizes), worst)
    return worst


def save_torch(model: "nn.Module", path: str | Path) -> Path:
    """Save the state_dict (CPU tensors) to ``path`` (``model.pt``)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, str(tmp))
    tmp.replace(path)
    return path


def load_torch(path: str | Path, device: str = "cpu") -> "nn.Module":
    """Rebuild the classifier from a saved state_dict (``model.pt``); returned in eval mode."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model weights not found: {path} (expected a state_dict saved by tasks.steps.train)")
    state = torch.load(str(path), map_location=device, weights_only=True)
    model = build_model()
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{path} is not a state_dict of this classifier: {exc}") from exc
    return model.to(device).eval()
