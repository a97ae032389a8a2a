"""Small real ONNX files of a pipeline's detector contract (no training): tests of the consumer, the monitor
and the served pipeline that need a detector whose answers are known in advance.

``detector_onnx``: input ``onnx.input`` float32 ``[N, C, H, W]`` (pixels after the spec's normalisation, 0..1 for
the scenes detector); ``onnx.logits`` (the centre heatmap ``[N, 1, H / stride, W / stride]``) = 20 x (the cell's
mean brightness - 0.5), so a bright ``stride`` x ``stride`` square aligned to a cell on a dark frame is one peak
there; ``onnx.box_size`` ``[N, 2, h, w]`` = ``box`` pixels everywhere; ``onnx.embedding`` ``[N, embedding_dim]``
= the per-channel mean brightness, repeated.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def detector_onnx(path: Path, spec, box: float = 16.0) -> Path:
    """Write the detector described in the module doc for detection spec ``spec`` to ``path``."""
    import onnx
    from onnx import TensorProto, helper

    det = spec.detection
    c, h, w = spec.input.channels, spec.input.height, spec.input.width
    d, s = spec.embedding_dim, det.stride
    rep = -(-d // c)
    tile = np.zeros((c, rep * c), np.float32)
    for i in range(rep * c):
        tile[i % c, i] = 1.0
    x, heat, size, emb = spec.onnx.input, spec.onnx.logits, spec.onnx.box_size, spec.onnx.embedding
    nodes = [
        helper.make_node("GlobalAveragePool", [x], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "tile"], ["wide"]),
        helper.make_node("Slice", ["wide", "starts", "ends", "axes"], [emb]),
        helper.make_node("ReduceMean", [x], ["gray"], axes=[1], keepdims=1),
        helper.make_node("AveragePool", ["gray"], ["cells"], kernel_shape=[s, s], strides=[s, s]),
        helper.make_node("Sub", ["cells", "half"], ["centred"]),
        helper.make_node("Mul", ["centred", "gain"], [heat]),
        helper.make_node("Mul", ["cells", "zero"], ["nothing"]),
        helper.make_node("Add", ["nothing", "box"], ["side"]),
        helper.make_node("Concat", ["side", "side"], [size], axis=1),
    ]
    inits = [helper.make_tensor("tile", TensorProto.FLOAT, tile.shape, tile.reshape(-1).tolist()),
             helper.make_tensor("starts", TensorProto.INT64, [1], [0]),
             helper.make_tensor("ends", TensorProto.INT64, [1], [d]),
             helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
             helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
             helper.make_tensor("gain", TensorProto.FLOAT, [], [20.0]),
             helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
             helper.make_tensor("box", TensorProto.FLOAT, [], [float(box)])]
    graph = helper.make_graph(
        nodes, "detector", [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", c, h, w])],
        [helper.make_tensor_value_info(heat, TensorProto.FLOAT, ["N", 1, h // s, w // s]),
         helper.make_tensor_value_info(size, TensorProto.FLOAT, ["N", 2, h // s, w // s]),
         helper.make_tensor_value_info(emb, TensorProto.FLOAT, ["N", d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, str(path))
    return path


def scene(spec, cells: list[tuple[int, int]]) -> np.ndarray:
    """A dark uint8 frame of ``spec`` with a white ``stride`` square at each ``(row, col)`` cell: ``detector_onnx``
    finds one box centred on each."""
    s = spec.detection.stride
    img = np.full(spec.image_shape, 10, np.uint8)
    for r, c in cells:
        img[r * s:(r + 1) * s, c * s:(c + 1) * s] = 255
    return img
