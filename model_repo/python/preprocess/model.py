"""Triton Python-backend model ``<model>_preprocess``: encoded frames -> the classifier's float32 input.

Input (batched): ``FRAME`` BYTES ``[N, 1]``, one encoded frame (PNG, JPEG or raw pixels, as the model
spec's ``frames.encodings`` allow) per row. Outputs: ``PIXELS`` FP32 ``[N, *input_shape]`` (decoded,
resized and normalised as the spec says, in its layout) and ``FRAME_ERROR`` BYTES ``[N, 1]``: ``b""`` for
a frame that was used, ``b"<reason>: <detail>"`` (a dead-letter reason) for one that was not, whose
pixels are then zero. A bad frame is that row's error, never the batch's; only a malformed request
(no ``FRAME``, not BYTES ``[N, 1]``) gets an error response.

Tensor names and dims come from this model's ``config.pbtxt``, the codec parameters from its JSON
parameter ``codec`` (both rendered from the model spec by ``tasks/model/repo.py``). Decoding is
``frame_codec.py``, copied next to this file: the very decoder the host uses
(``tasks/model/frame_codec.py``). Frames of all requests of a dynamic batch are decoded in one loop and
normalised in one vectorised call.
"""

import importlib.util
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


def _load_codec(folder):
    path = os.path.join(folder, "frame_codec.py")
    spec = importlib.util.spec_from_file_location("frame_codec", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.model_name = config.get("name", "preprocess")
        self.codec = _load_codec(os.path.dirname(os.path.abspath(__file__)))
        inputs, outputs = config.get("input", []), config.get("output", [])
        if len(inputs) != 1 or len(outputs) != 2:
            raise ValueError(f"{self.model_name}: config must declare 1 input (frames) and 2 outputs (pixels, "
                             f"frame errors), got {len(inputs)} and {len(outputs)}")
        if inputs[0]["data_type"] != "TYPE_STRING" or outputs[1]["data_type"] != "TYPE_STRING":
            raise ValueError(f"{self.model_name}: input {inputs[0]['name']!r} and output {outputs[1]['name']!r} "
                             "must be TYPE_STRING (BYTES)")
        self.in_name = inputs[0]["name"]
        self.pixels_name, self.error_name = outputs[0]["name"], outputs[1]["name"]
        raw = ((config.get("parameters") or {}).get("codec") or {}).get("string_value")
        if not raw:
            raise ValueError(f"{self.model_name}: config parameter 'codec' (the frame codec parameters as JSON, "
                             "rendered from the model spec) is missing")
        self.params = self.codec.check_params(json.loads(raw))
        p = self.params
        if p["height"] is None or p["width"] is None:
            raise ValueError(f"{self.model_name}: codec parameters need a fixed height and width, got "
                             f"{p['height']}x{p['width']}")
        c = p["channels"]
        want = (c, p["height"], p["width"]) if p["layout"] == "NCHW" else (p["height"], p["width"], c)
        dims = tuple(int(d) for d in outputs[0]["dims"])
        if dims != want:
            raise ValueError(f"{self.model_name}: output {self.pixels_name!r} dims {list(dims)} differ from the "
                             f"codec's {p['layout']} input shape {list(want)}: re-render the repository")

    def _frames(self, request):
        tensor = pb_utils.get_input_tensor_by_name(request, self.in_name)
        if tensor is None:
            raise ValueError(f"missing input '{self.in_name}'")
        frames = tensor.as_numpy()
        if frames.dtype != np.object_ or frames.ndim != 2 or frames.shape[1] != 1:
            raise ValueError(f"input '{self.in_name}' must be BYTES [N, 1] (one encoded frame per row), got "
                             f"{frames.dtype} {list(frames.shape)}")
        return frames[:, 0]

    def execute(self, requests):
        responses = [None] * len(requests)
        parts, owners = [], []
        for i, request in enumerate(requests):
            try:
                parts.append(self._frames(request))
                owners.append(i)
            except Exception as exc:  # noqa: BLE001 - a malformed request gets its own error; the others go on
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"{self.model_name}: {exc}"))
        if not parts:
            return responses
        frames = parts[0] if len(parts) == 1 else np.concatenate(parts)
        images, errors = self.codec.decode_batch(frames, self.params)
        pixels = self.codec.normalise(images, self.params)
        failed = errors[:, 0] != b""
        if failed.any():
            pixels[failed] = 0.0
        start = 0
        for i, part in zip(owners, parts):
            end = start + len(part)
            responses[i] = pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(self.pixels_name, pixels[start:end]),
                pb_utils.Tensor(self.error_name, errors[start:end])])
            start = end
        return responses

    def finalize(self):
        pass
