"""The built-in classifier: a small CNN sized by the model spec, its ONNX export, and the ONNX contract.

Contract (docs/CONTRACTS.md, "ONNX classifier"; every size comes from the model spec,
``tasks.contracts.spec.ModelSpec``):

* input ``spec.onnx.input``: float32 ``[N, *spec.input_shape]`` (``[N, C, H, W]`` for NCHW), the
  pixels after the spec's ``preprocessing.normalisation`` (``pixel * scale - mean) / std``); the
  built-in CNN applies its own input statistics inside (MNIST's for one channel), so callers
  never repeat them;
* outputs ``spec.onnx.logits`` float32 ``[N, number of classes]`` and ``spec.onnx.embedding``
  float32 ``[N, spec.embedding_dim]`` (the penultimate layer: drift monitoring, vector store);
* dynamic batch axis, opset 17.

``check_onnx_contract`` is the one check of that contract (register, QC, compile, deploy): it
names the tensor and the expected shape. ``to_input`` is the one host-side preprocessing (QC,
monitor, compile calibration); the Triton preprocess model does the same on the server.

Shared by ``tasks.steps.train`` (builds and exports) and QC (parity checks, reloading the
framework model from ``model.pt``). ``torch`` is imported inside functions and in the model
factory so importing this module stays cheap.
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

    from tasks.contracts.spec import ModelSpec

logger = logging.getLogger(__name__)

OPSET = 17
PARITY_TOLERANCE = 1e-4
# Input statistics the built-in CNN applies inside (of pixel/255): MNIST's for grayscale, a neutral
# 0.5 / 0.25 per channel for colour. Saved with the weights (buffers), so a loaded model keeps its own.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
COLOUR_MEAN = 0.5
COLOUR_STD = 0.25


class OnnxContractError(Rejected, ValueError):
    """``model.onnx`` does not match the model spec's contract (a tensor missing, or of the wrong type or
    shape): the version is rejected (final). The message names the tensor and the expected shape."""


class ParityError(Rejected, RuntimeError):
    """ONNX Runtime and PyTorch disagree by more than the tolerance (the model is rejected: final)."""


def _define_classes() -> type:
    import torch
    from torch import nn

    class DigitCNN(nn.Module):
        """conv(32) -> pool -> conv(64) -> pool -> conv(128) -> pool -> fc(embedding) -> fc(classes) = logits.

        Every 3x3 conv is followed by BatchNorm and ReLU; dropout sits between the embedding and the
        classification head (inactive in eval mode and in ONNX). For the digits spec (28x28x1, 10
        classes, 64-d) about 0.17 M parameters and 7.5 M multiply-adds per image: 8 epochs on 2,000
        images take seconds on 2 CPU cores. Other specs: ``channels`` in, ``(H//8) * (W//8)`` cells
        after the three pools (so H and W must be at least 8).
        """

        def __init__(self, channels: int, height: int, width: int, num_classes: int, embedding_dim: int) -> None:
            super().__init__()
            if height < 8 or width < 8:
                raise ValueError(f"the built-in CNN needs an input of at least 8x8 (got {height}x{width})")
            grey = channels == 1
            self.register_buffer("mean", torch.full((1, channels, 1, 1), MNIST_MEAN if grey else COLOUR_MEAN))
            self.register_buffer("std", torch.full((1, channels, 1, 1), MNIST_STD if grey else COLOUR_STD))

            def block(c_in: int, c_out: int) -> list[nn.Module]:
                return [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
                        nn.BatchNorm2d(c_out), nn.ReLU(inplace=True), nn.MaxPool2d(2)]

            self.features = nn.Sequential(
                *block(channels, 32),  # 28 -> 14
                *block(32, 64),  # 14 -> 7
                *block(64, 128),  # 7 -> 3
            )
            self.embed = nn.Sequential(
                nn.Flatten(),
                nn.Linear(128 * (height // 8) * (width // 8), embedding_dim),
                nn.ReLU(inplace=True),
            )
            self.dropout = nn.Dropout(0.25)
            self.head = nn.Linear(embedding_dim, num_classes)

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


def _nchw(spec: "ModelSpec") -> None:
    if spec.input.layout != "NCHW" or not spec.input.fixed:
        raise ValueError(f"the built-in CNN takes a fixed-size NCHW input; model {spec.name!r} declares "
                         f"{spec.input.layout} {spec.input.height}x{spec.input.width} (bring your own trainer)")


def build_model(spec: "ModelSpec") -> "nn.Module":
    """A freshly initialised classifier for ``spec`` (seed torch first for reproducible weights)."""
    _nchw(spec)
    inp = spec.input
    return model_class()(inp.channels, inp.height, inp.width, spec.num_classes, spec.embedding_dim)


def count_params(model: "nn.Module") -> int:
    return int(sum(p.numel() for p in model.parameters()))


def to_input(images: "np.ndarray", spec: "ModelSpec") -> "np.ndarray":
    """Decoded uint8 images -> the float32 ONNX input of ``spec`` (its layout, ``(pixel * scale - mean) / std``).

    ``images``: ``[N, *spec.image_shape]`` (``[N, H, W]`` grayscale, ``[N, H, W, 3]`` colour) or already in
    the input layout ``[N, *spec.input_shape]``; a float array in the input layout passes through.
    The same arithmetic as the Triton preprocess model (``model_repo/python/preprocess``).
    """
    import numpy as np

    arr = np.asarray(images)
    want = tuple(spec.input_shape)
    if arr.dtype != np.uint8:
        if arr.ndim == 4 and tuple(arr.shape[1:]) == want:
            return arr.astype(np.float32, copy=False)
        raise ValueError(f"{spec.name}: float input must have shape [N, {', '.join(map(str, want))}], "
                         f"got {list(arr.shape)}")
    img = tuple(spec.image_shape)
    if tuple(arr.shape[1:]) == img and arr.ndim == len(img) + 1:
        hwc = arr  # decoded images: [N, H, W] or [N, H, W, C], what normalise takes
    elif arr.ndim == 4 and tuple(arr.shape[1:]) == want:
        hwc = arr.transpose(0, 2, 3, 1) if spec.input.layout == "NCHW" else arr  # already in the input layout
    else:
        raise ValueError(f"{spec.name}: expected uint8 images of shape [N, {', '.join(map(str, img))}] or "
                         f"[N, {', '.join(map(str, want))}], got {list(arr.shape)}")
    from tasks.model.frame_codec import normalise
    from tasks.model.frames import codec_params

    return normalise(hwc, codec_params(spec))


def export_onnx(model: "nn.Module", path: str | Path, spec: "ModelSpec") -> Path:
    """Export ``model`` to ONNX per ``spec``'s contract (TorchScript exporter, opset 17, dynamic batch)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    dummy = torch.zeros(2, *spec.input_shape, dtype=torch.float32, device=device)
    names = [spec.onnx.logits, spec.onnx.embedding]
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with torch.no_grad():
            torch.onnx.export(
                model,
                (dummy,),
                str(tmp),
                dynamo=False,
                opset_version=OPSET,
                input_names=[spec.onnx.input],
                output_names=names,
                dynamic_axes={spec.onnx.input: {0: "batch"}, **{name: {0: "batch"} for name in names}},
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
        with torch.no_grad():
            lo, em = model(torch.zeros(1, *x.shape[1:], dtype=torch.float32, device=device))
        return np.zeros((0, lo.shape[1]), np.float32), np.zeros((0, em.shape[1]), np.float32)
    return np.concatenate(logits), np.concatenate(embs)


def run_onnx(session: Any, x: "np.ndarray", spec: "ModelSpec", batch_size: int = 256) -> tuple["np.ndarray", "np.ndarray"]:
    """(logits, embedding) of ONNX Runtime ``session`` for contract input ``x``, in batches of ``batch_size``."""
    import numpy as np

    names = [spec.onnx.logits, spec.onnx.embedding]
    if len(x) == 0:
        return np.zeros((0, spec.num_classes), np.float32), np.zeros((0, spec.embedding_dim), np.float32)
    logits, embs = [], []
    for start in range(0, len(x), batch_size):
        lo, em = session.run(names, {spec.onnx.input: np.ascontiguousarray(x[start:start + batch_size])})
        logits.append(lo)
        embs.append(em)
    return np.concatenate(logits).astype(np.float32, copy=False), np.concatenate(embs).astype(np.float32, copy=False)


def _dims(shape: Any) -> list[Any]:
    out: list[Any] = []
    for d in shape:
        out.append(d if isinstance(d, int) and d > 0 else "N")
    return out


def check_onnx_contract(onnx_path: str | Path, spec: "ModelSpec", *, session: Any = None) -> None:
    """Raise ``OnnxContractError`` unless ``onnx_path`` is ``spec``'s classifier contract (a ``task: detection``
    spec: the detector's contract, ``tasks.model.detector.check_detector_contract``).

    Checks the declared tensors (the input ``spec.onnx.input`` float32 ``[N, *input_shape]``, the outputs
    ``spec.onnx.logits`` float32 ``[N, classes]`` and ``spec.onnx.embedding`` float32 ``[N, embedding_dim]``,
    batch axis dynamic), then runs a batch of 2 zero inputs and checks the output shapes. Every message
    names the tensor, what the spec expects and what the file has.
    """
    if getattr(spec, "task", "classification") == "detection":  # the detector's contract: tasks.model.detector
        from tasks.model.detector import check_detector_contract

        check_detector_contract(onnx_path, spec, session=session)
        return
    path = Path(onnx_path)
    want_out = {spec.onnx.logits: ["N", spec.num_classes], spec.onnx.embedding: ["N", spec.embedding_dim]}
    check_contract_tensors(path, spec, want_out, where=f"{path.name} for model {spec.name!r}",
                           contract="the ONNX contract", session=session)


def check_contract_tensors(path: Path, spec: "ModelSpec", want_out: dict[str, list[Any]], *, where: str,
                           contract: str, session: Any = None) -> None:
    """The checks of an ONNX contract (a classifier's or a detector's): one input ``spec.onnx.input`` float32
    ``[N, *input_shape]`` and the outputs ``want_out`` (name -> ``["N", *dims]``), all float32 with a dynamic
    batch axis; then a zero batch of 2 through the model and the output shapes it gives. Raises
    ``OnnxContractError`` naming ``where``, ``contract``, each tensor, what the spec expects and what the file
    has."""
    import numpy as np

    try:
        sess = session if session is not None else onnx_session(path)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for a bad file
        raise OnnxContractError(f"{path}: not a loadable ONNX model ({type(exc).__name__}: {exc})") from exc
    want_in = ["N", *spec.input_shape]
    inputs = {i.name: i for i in sess.get_inputs()}
    outputs = {o.name: o for o in sess.get_outputs()}
    problems: list[str] = []
    inp = inputs.get(spec.onnx.input)
    if inp is None:
        problems.append(f"input {spec.onnx.input!r} float32 {want_in} is missing (inputs: {sorted(inputs)})")
    else:
        if inp.type != "tensor(float)":
            problems.append(f"input {spec.onnx.input!r} is {inp.type}, expected tensor(float) (float32)")
        got = _dims(inp.shape)
        if len(got) != len(want_in) or any(g != w for g, w in zip(got[1:], want_in[1:]) if w != -1):
            problems.append(f"input {spec.onnx.input!r} has shape {got}, expected {want_in} (spec input "
                            f"{spec.input.height}x{spec.input.width}x{spec.input.channels} {spec.input.layout})")
        elif got[0] != "N":
            problems.append(f"input {spec.onnx.input!r} has a fixed batch axis {got[0]}, expected dynamic ({want_in})")
    extra = sorted(set(inputs) - {spec.onnx.input})
    if extra:
        problems.append(f"unexpected extra inputs {extra} (the contract has one input, {spec.onnx.input!r})")
    for name, want in want_out.items():
        out = outputs.get(name)
        if out is None:
            problems.append(f"output {name!r} float32 {want} is missing (outputs: {sorted(outputs)})")
            continue
        if out.type != "tensor(float)":
            problems.append(f"output {name!r} is {out.type}, expected tensor(float) (float32)")
        got = _dims(out.shape)
        if len(got) != len(want) or any(isinstance(g, int) and g != w for g, w in zip(got[1:], want[1:])):
            problems.append(f"output {name!r} has shape {got}, expected {want}")
        elif isinstance(got[0], int) and got[0] > 0:
            problems.append(f"output {name!r} has a fixed batch axis {got[0]}, expected dynamic ({want})")
    if problems:
        raise OnnxContractError(f"{where} breaks {contract}: " + "; ".join(problems))
    shape = [2, *[d if d != -1 else 32 for d in spec.input_shape]]
    try:
        res = sess.run(list(want_out), {spec.onnx.input: np.zeros(shape, np.float32)})
    except Exception as exc:  # noqa: BLE001
        raise OnnxContractError(f"{where}: inference on a zero batch {shape} failed "
                                f"({type(exc).__name__}: {exc})") from exc
    for (name, want), arr in zip(want_out.items(), res):
        if list(arr.shape) != [2, *want[1:]]:
            raise OnnxContractError(f"{where} breaks {contract}: output {name!r} is {list(arr.shape)} for a "
                                    f"batch of 2, expected {[2, *want[1:]]}")


def parity_inputs(n: int, spec: "ModelSpec", seed: int = 1234) -> "np.ndarray":
    """Deterministic contract inputs of ``spec`` for parity checks: sparse random uint8 images (mostly
    black, like MNIST), preprocessed as ``to_input``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    images = (rng.random((n, *spec.image_shape), dtype=np.float32) * 255).astype(np.uint8)
    images[images < 153] = 0
    return to_input(images, spec)


def check_onnx_parity(
    model: "nn.Module",
    onnx_path: str | Path,
    spec: "ModelSpec",
    batch_sizes: Sequence[int] = (1, 7, 32),
    inputs: "np.ndarray | None" = None,
    tolerance: float = PARITY_TOLERANCE,
) -> float:
    """Max |PyTorch - ONNX Runtime| over logits and embedding for each batch size.

    ``inputs`` (contract float32 ``[N, *spec.input_shape]``) defaults to deterministic
    synthetic images; batches are taken from its start. Raises ``ParityError``
    if the difference exceeds ``tolerance`` or a shape is wrong.
    """
    import numpy as np

    sess = onnx_session(onnx_path)
    need = max(batch_sizes)
    if inputs is None:
        inputs = parity_inputs(need, spec)
    elif len(inputs) < need:
        reps = -(-need // max(len(inputs), 1))
        inputs = np.concatenate([inputs] * reps)
    worst = 0.0
    for bs in batch_sizes:
        x = np.ascontiguousarray(inputs[:bs], dtype=np.float32)
        t_logits, t_emb = predict_torch(model, x)
        o_logits, o_emb = sess.run([spec.onnx.logits, spec.onnx.embedding], {spec.onnx.input: x})
        if o_logits.shape != (bs, spec.num_classes) or o_emb.shape != (bs, spec.embedding_dim):
            raise ParityError(
                f"ONNX output shapes {o_logits.shape}, {o_emb.shape} for batch {bs}; "
                f"expected ({bs}, {spec.num_classes}) and ({bs}, {spec.embedding_dim})"
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


def load_torch(path: str | Path, spec: "ModelSpec", device: str = "cpu") -> "nn.Module":
    """Rebuild the classifier from a saved state_dict (``model.pt``); returned in eval mode."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model weights not found: {path} (expected a state_dict saved by tasks.steps.train)")
    state = torch.load(str(path), map_location=device, weights_only=True)
    model = build_model(spec)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{path} is not a state_dict of this classifier: {exc}") from exc
    return model.to(device).eval()
