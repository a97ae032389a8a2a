"""Triton Python-backend model ``<model>_classifier`` (local flavour): ONNX Runtime on ``model.onnx``.

The Triton binary bundled in the nvidia-pytriton wheel has only the Python
backend, so locally the classifier is this file, copied next to ``model.onnx``
in every numbered version folder by ``tasks/model/repo.py``. Production uses
Triton's ``onnxruntime_onnx`` / ``tensorrt_plan`` platforms instead, with the
same tensor names and dims.

- The ONNX Runtime session is created once, in ``initialize`` (CPU, 1-2 intra-op
  threads, from the config parameter ``intra_op_threads``).
- The session's input/output names must match the config; a mismatch fails
  the load with a message saying which names differ.
- ``execute`` stacks the valid requests of a dynamic batch into one ONNX Runtime
  call and splits the results; a bad request gets its own error response.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

_NP_TYPES = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_FP64": np.float64}


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort  # imported here so a missing package fails this model's load, clearly

        config = json.loads(args["model_config"])
        self.model_name = config.get("name", "classifier")
        params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        # not default_model_filename: the Python backend sets that to model.py
        filename = params.get("onnx_file") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{self.model_name} v{args['model_version']}: {path} does not exist")

        if len(config.get("input", [])) != 1:
            raise ValueError(f"{self.model_name}: config must declare exactly one input")
        self.in_name = config["input"][0]["name"]
        self.in_dims = tuple(int(d) for d in config["input"][0]["dims"])
        self.in_dtype = _NP_TYPES.get(config["input"][0]["data_type"], np.float32)
        self.out_names = [o["name"] for o in config.get("output", [])]

        opts = ort.SessionOptions()
        threads = int(params.get("intra_op_threads") or 1)
        opts.intra_op_num_threads = max(1, threads)
        # no busy-waiting worker threads: they steal the few cores from the other models' stubs
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])

        onnx_inputs = [i.name for i in self.session.get_inputs()]
        onnx_outputs = [o.name for o in self.session.get_outputs()]
        if onnx_inputs != [self.in_name]:
            raise ValueError(f"{self.model_name}: {path} has inputs {onnx_inputs}, config expects [{self.in_name!r}]")
        missing = [n for n in self.out_names if n not in onnx_outputs]
        if missing:
            raise ValueError(f"{self.model_name}: {path} has outputs {onnx_outputs}, config also expects {missing}")

    def _read(self, request):
        tensor = pb_utils.get_input_tensor_by_name(request, self.in_name)
        if tensor is None:
            raise ValueError(f"missing input '{self.in_name}'")
        x = tensor.as_numpy()
        if x.ndim != len(self.in_dims) + 1 or tuple(x.shape[1:]) != self.in_dims:
            raise ValueError(f"input '{self.in_name}' must have shape [N, {', '.join(map(str, self.in_dims))}], "
                             f"got {list(x.shape)}")
        return x.astype(self.in_dtype, copy=False)

    def execute(self, requests):
        responses = [None] * len(requests)
        batch, owners = [], []
        for i, request in enumerate(requests):
            try:
                batch.append(self._read(request))
                owners.append(i)
            except Exception as exc:
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"{self.model_name}: {exc}"))
        if batch:
            try:
                x = batch[0] if len(batch) == 1 else np.concatenate(batch, axis=0)
                outs = self.session.run(self.out_names, {self.in_name: x})
                start = 0
                for i, part in zip(owners, batch):
                    n = part.shape[0]
                    tensors = [pb_utils.Tensor(name, np.ascontiguousarray(out[start:start + n]))
                               for name, out in zip(self.out_names, outs)]
                    responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
                    start += n
            except Exception as exc:  # a failed run answers every request of this batch with the reason
                for i in owners:
                    responses[i] = pb_utils.InferenceResponse(
                        output_tensors=[], error=pb_utils.TritonError(f"{self.model_name}: inference failed: {exc}"))
        return responses

    def finalize(self):
        self.session = None
