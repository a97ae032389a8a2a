"""Triton Python-backend model ``<pipeline>``: encoded camera frames -> boxes, per-box labels, read-out, embedding.

One pipeline version is one version folder ``<pipeline>/<n>/`` holding this file, ``frame_codec.py`` and
``scene_codec.py`` (copies of ``tasks/model/``: the host decodes, crops and reads out the same way) and
``members.json`` (``tasks.contracts.serving.PIPELINE_MEMBERS_FILE``, written by ``tasks/model/pipeline_repo.py``):
the member Triton models and the versions this pipeline version pins, the detector's frame codec parameters,
the detection, crop and read-out parameters and the classifier's class names. Everything is read from there, so
a version never answers with another version's members or parameters.

Per ``execute`` (the requests of a dynamic batch together):

1. decode every frame (``FRAME`` BYTES ``[N, 1]``) with ``frame_codec`` as the detector's spec says; a frame
   that cannot be used gets its ``FRAME_ERROR`` (``b"<reason>: <detail>"``) and padding outputs, never a
   failed request;
2. one BLS call of the detector member (its pinned version) on all decoded frames (chunks of its max batch);
3. ``scene_codec.decode_centres`` per frame, ``crop_boxes`` of every box;
4. one BLS call of the classifier member (its pinned version) on all crops (chunks of its max batch), none
   when no frame has a box (an empty read-out);
5. softmax, labels, ``scene_codec.readout`` with the classifier's class names; ``EMBEDDING`` = the detector's.

A member that fails answers every request of the batch with an error naming the member and its version (a
member failure is the server's problem, not the frame's). Outputs (``PIPELINE_OUTPUTS``, K box slots):
``BOXES`` FP32 ``[N, K, 4]``, ``BOX_SCORES`` FP32 ``[N, K]``, ``BOX_LABELS`` INT64 ``[N, K]`` (-1 padding),
``LABEL_SCORES`` FP32 ``[N, K]``, ``COUNT`` INT32 ``[N, 1]``, ``READOUT`` BYTES ``[N, 1]``, ``EMBEDDING`` FP32
``[N, D]``, ``FRAME_ERROR`` BYTES ``[N, 1]``.
"""

import importlib.util
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


def _load(folder, name):
    path = os.path.join(folder, f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _softmax(logits):
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.model_name = config.get("name", "pipeline")
        folder = os.path.join(args["model_repository"], args["model_version"])
        self.codec = _load(folder, "frame_codec")
        self.scene = _load(folder, "scene_codec")
        with open(os.path.join(folder, "members.json"), encoding="utf-8") as fh:
            m = json.load(fh)
        self.version = int(args["model_version"])
        if int(m.get("version", -1)) != self.version:
            raise ValueError(f"{self.model_name} v{self.version}: members.json is for version {m.get('version')}")
        self.members = m["members"]
        self.det, self.cls = self.members["detector"], self.members["classifier"]
        self.frame_params = self.codec.check_params(m["frame_codec"])
        self.crop_params = self.codec.check_params(m["crop_codec"])
        self.detection = m["detection"]
        self.crop = m["crop"]
        self.readout_params = m["readout"]
        self.class_names = list(m["class_names"])
        self.k = int(self.detection["max_objects"])
        self.emb_dim = int(self.det["embedding_dim"])
        outs = {o["name"]: o for o in config.get("output", [])}
        want = ["BOXES", "BOX_SCORES", "BOX_LABELS", "LABEL_SCORES", "COUNT", "READOUT", "EMBEDDING", "FRAME_ERROR"]
        missing = [n for n in want if n not in outs]
        if missing:
            raise ValueError(f"{self.model_name}: config lacks outputs {missing}: re-render the repository")
        if [int(d) for d in outs["BOX_SCORES"]["dims"]] != [self.k] or \
                [int(d) for d in outs["EMBEDDING"]["dims"]] != [self.emb_dim]:
            raise ValueError(f"{self.model_name}: config dims (BOX_SCORES {outs['BOX_SCORES']['dims']}, EMBEDDING "
                             f"{outs['EMBEDDING']['dims']}) differ from members.json (K {self.k}, embedding "
                             f"{self.emb_dim}): re-render the repository")
        self.in_name = config["input"][0]["name"]
        self._cpu = None
        if hasattr(pb_utils, "PreferredMemory"):  # BLS outputs in CPU memory (a GPU member answers on the GPU)
            self._cpu = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)

    # -- members ------------------------------------------------------------------------------
    def _call(self, member, inputs, outputs):
        """One BLS call of ``member`` (its pinned version) on float32 ``inputs`` in chunks of its max batch."""
        n = len(inputs)
        step = max(1, int(member["max_batch_size"]))
        parts = {name: [] for name in outputs}
        for start in range(0, n, step):
            kw = {"preferred_memory": self._cpu} if self._cpu is not None else {}
            request = pb_utils.InferenceRequest(
                model_name=member["model"], model_version=int(member["version"]),
                requested_output_names=list(outputs),
                inputs=[pb_utils.Tensor(member["input"], np.ascontiguousarray(inputs[start:start + step]))], **kw)
            response = request.exec()
            if response.has_error():
                raise RuntimeError(f"member {member['model']} v{member['version']} failed: "
                                   f"{response.error().message()}")
            for name in outputs:
                tensor = pb_utils.get_output_tensor_by_name(response, name)
                if tensor is None:
                    raise RuntimeError(f"member {member['model']} v{member['version']} gave no output {name!r}")
                if not tensor.is_cpu():
                    from torch.utils.dlpack import from_dlpack  # only on a GPU server

                    parts[name].append(from_dlpack(tensor.to_dlpack()).cpu().numpy())
                else:
                    parts[name].append(tensor.as_numpy())
        return {name: np.concatenate(v) if len(v) > 1 else v[0] for name, v in parts.items()}

    # -- requests -----------------------------------------------------------------------------
    def _frames(self, request):
        tensor = pb_utils.get_input_tensor_by_name(request, self.in_name)
        if tensor is None:
            raise ValueError(f"missing input '{self.in_name}'")
        frames = tensor.as_numpy()
        if frames.dtype != np.object_ or frames.ndim != 2 or frames.shape[1] != 1:
            raise ValueError(f"input '{self.in_name}' must be BYTES [N, 1] (one encoded frame per row), got "
                             f"{frames.dtype} {list(frames.shape)}")
        return frames[:, 0]

    def _run(self, frames):
        n, k = len(frames), self.k
        images, errors = self.codec.decode_batch(frames, self.frame_params)
        out = {"BOXES": np.zeros((n, k, 4), np.float32), "BOX_SCORES": np.zeros((n, k), np.float32),
               "BOX_LABELS": np.full((n, k), -1, np.int64), "LABEL_SCORES": np.zeros((n, k), np.float32),
               "COUNT": np.zeros((n, 1), np.int32), "READOUT": np.full((n, 1), b"", dtype=object),
               "EMBEDDING": np.zeros((n, self.emb_dim), np.float32), "FRAME_ERROR": errors}
        good = np.flatnonzero(errors[:, 0] == b"")
        if not len(good):
            return out
        det, d = self.det, self.detection
        res = self._call(det, self.codec.normalise(images[good], self.frame_params),
                         [det["heatmap"], det["box_size"], det["embedding"]])
        heat, size, emb = res[det["heatmap"]], res[det["box_size"]], res[det["embedding"]]
        out["EMBEDDING"][good] = emb
        found, crops = [], []
        for row, j in enumerate(good):
            boxes, scores, _ = self.scene.decode_centres(
                heat[row], size[row], stride=d["stride"], threshold=d["score_threshold"], max_objects=k,
                window=d["peak_window"], min_box_size=d["min_box_size"], height=self.frame_params["height"],
                width=self.frame_params["width"])
            c = len(boxes)
            out["COUNT"][j, 0] = c
            if c:
                out["BOXES"][j, :c] = boxes
                out["BOX_SCORES"][j, :c] = scores
                crops.append(self.scene.crop_boxes(images[j], boxes, height=self.crop["height"],
                                                   width=self.crop["width"], channels=self.crop["channels"],
                                                   padding=self.crop["padding"], square=self.crop["square"]))
                found.append((j, boxes))
        if not crops:
            return out  # no box anywhere: empty read-outs, no classifier call
        cls = self.cls
        logits = self._call(cls, self.codec.normalise(np.concatenate(crops), self.crop_params),
                            [cls["logits"]])[cls["logits"]]
        probs = _softmax(logits.astype(np.float64))
        labels, label_scores = probs.argmax(axis=1), probs.max(axis=1).astype(np.float32)
        floor = float(self.readout_params.get("min_label_score", 0.0))
        start = 0
        for j, boxes in found:
            c = len(boxes)
            lab, sc = labels[start:start + c], label_scores[start:start + c]
            start += c
            out["BOX_LABELS"][j, :c] = lab
            out["LABEL_SCORES"][j, :c] = sc
            names = [self.class_names[int(i)] for i in lab]
            out["READOUT"][j, 0] = self.scene.readout(boxes, names, [s >= floor for s in sc]).encode("utf-8")
        return out

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
        try:
            out = self._run(frames)
        except Exception as exc:  # noqa: BLE001 - a member's failure fails this batch's requests, not the server
            for i in owners:
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"{self.model_name} v{self.version}: {exc}"))
            return responses
        start = 0
        for i, part in zip(owners, parts):
            end = start + len(part)
            responses[i] = pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(name, np.ascontiguousarray(value[start:end])) for name, value in out.items()])
            start = end
        return responses

    def finalize(self):
        pass
