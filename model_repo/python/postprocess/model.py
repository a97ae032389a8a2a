"""Triton Python-backend model ``postprocess``: logits -> label, score, top-k.

Input (batched): FP32 logits ``[N, C]``. Outputs (names from ``config.pbtxt``,
in this order): the label (INT64 ``[N, 1]``, argmax), its softmax score
(FP32 ``[N, 1]``), the top-k labels (INT64 ``[N, K]``) and their scores
(FP32 ``[N, K]``), K taken from the config's dims.

A bad request (wrong shape, non-finite logits) gets its own error response.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.model_name = config.get("name", "postprocess")
        if len(config.get("input", [])) != 1 or len(config.get("output", [])) != 4:
            raise ValueError(f"{self.model_name}: config must declare 1 input (logits) and 4 outputs "
                             "(label, score, top-k labels, top-k scores)")
        self.in_name = config["input"][0]["name"]
        self.num_classes = int(config["input"][0]["dims"][-1])
        outs = config["output"]
        self.label_name, self.score_name, self.topk_labels_name, self.topk_scores_name = (o["name"] for o in outs)
        self.k = int(outs[2]["dims"][-1])
        if not 1 <= self.k <= self.num_classes:
            raise ValueError(f"{self.model_name}: top-k {self.k} must be between 1 and {self.num_classes}")

    def _one(self, request):
        tensor = pb_utils.get_input_tensor_by_name(request, self.in_name)
        if tensor is None:
            raise ValueError(f"missing input '{self.in_name}'")
        logits = tensor.as_numpy().astype(np.float32, copy=False)
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"input '{self.in_name}' must have shape [N, {self.num_classes}], "
                             f"got {list(logits.shape)}")
        if not np.all(np.isfinite(logits)):
            raise ValueError(f"input '{self.in_name}' holds non-finite values (NaN or Inf)")
        shifted = logits - logits.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        probs = exp / exp.sum(axis=1, keepdims=True)
        # stable sort on -probs: ties resolve to the lower class index, like argmax
        order = np.argsort(-probs, axis=1, kind="stable")[:, : self.k]
        topk_scores = np.take_along_axis(probs, order, axis=1).astype(np.float32)
        label = order[:, :1].astype(np.int64)
        return [
            pb_utils.Tensor(self.label_name, label),
            pb_utils.Tensor(self.score_name, topk_scores[:, :1].copy()),
            pb_utils.Tensor(self.topk_labels_name, order.astype(np.int64)),
            pb_utils.Tensor(self.topk_scores_name, topk_scores),
        ]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(pb_utils.InferenceResponse(output_tensors=self._one(request)))
            except Exception as exc:  # one bad request never takes the others (or the server) down
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"{self.model_name}: {exc}")))
        return responses

    def finalize(self):
        pass
