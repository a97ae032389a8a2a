"""Triton client: the only module that talks to a Triton server.

``TritonClient``: health, repository control (load / unload / index) and
``infer_frames`` (encoded frames) for the ensemble, ``infer_pipeline`` for a pipeline model, over gRPC (default) or HTTP. Every failure
is a ``TritonError`` naming the server URL, the model and what failed. An inference request carries
the current span's W3C ``traceparent`` (``tasks.tracing.trace_headers``) as gRPC metadata / an HTTP
header, so a Triton started with ``--trace-config mode=opentelemetry`` continues the frame's trace.
The local server (the ``tritonserver`` binary of the nvidia-pytriton wheel) is
``tasks.local.triton``; ``tasks.model.serve.serve_classifier_version`` pins and
loads one classifier version.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Mapping, Sequence, TypeVar

from tasks.contracts.errors import Transient
from tasks.contracts.serving import ENSEMBLE_OUTPUTS, FRAME_INPUT, MAX_BATCH, PIPELINE_OUTPUTS, frame_error_rows
from tasks.tracing import trace_headers

logger = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 30.0


class TritonError(Transient, RuntimeError):
    """A Triton call failed (transient: retried). ``url``, ``model`` and ``what`` say where; ``unreachable`` if the server was down."""

    def __init__(self, message: str, *, url: str = "", model: str = "", what: str = "",
                 unreachable: bool = False) -> None:
        super().__init__(message)
        self.url = url
        self.model = model
        self.what = what
        self.unreachable = unreachable


class TritonNotFound(TritonError):
    """The ``tritonserver`` binary (nvidia-pytriton wheel) or its backends could not be found."""


# ----------------------------------------------------------------------------------------------
# The client
# ----------------------------------------------------------------------------------------------

class TritonClient:
    """Talks to one Triton server over gRPC (``host:port`` of the gRPC endpoint) or HTTP.

    Health probes (``is_live``, ``is_ready``) answer False when the server is unreachable;
    everything else raises ``TritonError`` naming the URL, the model and what failed.
    """

    def __init__(self, url: str, protocol: str = "grpc", *, timeout: float = DEFAULT_TIMEOUT_S,
                 max_batch_size: int = MAX_BATCH) -> None:
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
        for prefix in ("http://", "https://", "grpc://"):
            if url.startswith(prefix):
                url = url[len(prefix):]
        self.url = url.rstrip("/")
        self.protocol = protocol
        self.timeout = timeout
        self.max_batch_size = max_batch_size
        self._client: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"TritonClient({self.url!r}, protocol={self.protocol!r})"

    # -- plumbing -------------------------------------------------------------------------
    @property
    def raw(self) -> Any:
        """The underlying ``tritonclient`` client (created on first use)."""
        with self._lock:
            if self._client is None:
                if self.protocol == "grpc":
                    import tritonclient.grpc as grpcclient

                    self._client = grpcclient.InferenceServerClient(self.url)
                else:
                    import tritonclient.http as httpclient

                    self._client = httpclient.InferenceServerClient(
                        self.url, connection_timeout=min(self.timeout, 10.0), network_timeout=self.timeout)
            return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                try:
                    self._client.close()
                except Exception:  # noqa: BLE001 - closing a broken channel must not raise
                    pass
                self._client = None

    def __enter__(self) -> "TritonClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _timeout_kw(self) -> dict[str, Any]:
        return {"client_timeout": self.timeout} if self.protocol == "grpc" else {}

    def _error(self, what: str, model: str, exc: BaseException) -> TritonError:
        text = str(exc).strip() or type(exc).__name__
        status = ""
        try:
            from tritonclient.utils import InferenceServerException

            if isinstance(exc, InferenceServerException):
                status = str(exc.status() or "")
                text = exc.message() or text
        except ImportError:  # pragma: no cover
            pass
        about = f"{what}{f' of model {model!r}' if model else ''}"
        if status.endswith("DEADLINE_EXCEEDED") or isinstance(exc, TimeoutError):
            msg = f"Triton at {self.url} did not answer within {self.timeout:.0f}s ({about}): {text}"
            return TritonError(msg, url=self.url, model=model, what=what, unreachable=True)
        # gRPC: UNAVAILABLE; HTTP: socket errors (refused, reset, closed) surface as OSError subclasses
        if status.endswith("UNAVAILABLE") or isinstance(exc, (ConnectionError, OSError)):
            msg = f"Triton at {self.url} is not reachable ({about}): {text}"
            return TritonError(msg, url=self.url, model=model, what=what, unreachable=True)
        return TritonError(f"Triton at {self.url}: {about} failed: {text}", url=self.url, model=model, what=what)

    def _call(self, what: str, model: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except TritonError:
            raise
        except Exception as exc:  # noqa: BLE001 - every client failure becomes a TritonError
            raise self._error(what, model, exc) from exc

    # -- health ---------------------------------------------------------------------------
    def is_live(self) -> bool:
        try:
            return bool(self.raw.is_server_live(**self._timeout_kw()))
        except Exception:  # noqa: BLE001 - a probe answers False when the server is down
            return False

    def is_ready(self) -> bool:
        try:
            return bool(self.raw.is_server_ready(**self._timeout_kw()))
        except Exception:  # noqa: BLE001
            return False

    def wait_live(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.is_live():
            if time.monotonic() > deadline:
                raise TritonError(f"Triton at {self.url} is not reachable: not live after {timeout:.0f}s",
                                  url=self.url, what="wait live", unreachable=True)
            time.sleep(0.1)

    def model_ready(self, name: str, version: str | int = "") -> bool:
        """Whether ``name`` (``version`` or any version) is loaded and ready. Raises if the server is down."""
        return bool(self._call("readiness check", name,
                               lambda: self.raw.is_model_ready(name, str(version), **self._timeout_kw())))

    def wait_model_ready(self, name: str, version: str | int = "", timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.model_ready(name, version):
            failed = [m for m in self.repository_index() if m["name"] == name and m["state"] == "UNAVAILABLE"
                      and m["reason"] and m["reason"] != "unloaded" and (not version or m["version"] == str(version))]
            if failed:
                raise TritonError(f"Triton at {self.url}: model {name!r} version {version or 'any'} is UNAVAILABLE: "
                                  f"{failed[0]['reason']}", url=self.url, model=name, what="wait ready")
            if time.monotonic() > deadline:
                raise TritonError(f"Triton at {self.url}: model {name!r} version {version or 'any'} not ready "
                                  f"after {timeout:.0f}s", url=self.url, model=name, what="wait ready")
            time.sleep(0.1)

    def server_metadata(self) -> dict[str, Any]:
        return self._call("server metadata", "", lambda: self.raw.get_server_metadata(**self._json_kw()))

    # -- repository -----------------------------------------------------------------------
    def _json_kw(self) -> dict[str, Any]:
        return {"as_json": True, **self._timeout_kw()} if self.protocol == "grpc" else {}

    def repository_index(self) -> list[dict[str, Any]]:
        """Every model folder of the repository: ``[{"name", "version", "state", "reason"}]``.

        A model never loaded has version and state "".
        """
        def fetch() -> list[dict[str, Any]]:
            raw = self.raw.get_model_repository_index(**self._json_kw())
            models = raw.get("models", []) if isinstance(raw, dict) else list(raw or [])
            return [{"name": m.get("name", ""), "version": str(m.get("version", "")),
                     "state": m.get("state", ""), "reason": m.get("reason", "")} for m in models]
        return self._call("repository index", "", fetch)

    def ready_versions(self, name: str) -> list[int]:
        """The versions of ``name`` Triton reports READY in its repository index, sorted."""
        return sorted(int(m["version"]) for m in self.repository_index()
                      if m["name"] == name and m["state"] == "READY" and str(m["version"]).isdigit())

    def load_model(self, name: str) -> None:
        """(Re)load ``name`` from the repository files. Never sends a config override: Triton would keep
        an override until a file's mtime changes, hiding later config.pbtxt edits."""
        def load() -> None:
            if self.protocol == "grpc":
                self.raw.load_model(name, client_timeout=max(self.timeout, 120.0))
            else:
                self.raw.load_model(name)
        self._call("load", name, load)

    def unload_model(self, name: str, unload_dependents: bool = False) -> None:
        self._call("unload", name, lambda: self.raw.unload_model(
            name, unload_dependents=unload_dependents, **self._timeout_kw()))

    def model_config(self, name: str, version: str | int = "") -> dict[str, Any]:
        def fetch() -> dict[str, Any]:
            cfg = self.raw.get_model_config(name, str(version), **self._json_kw())
            return cfg.get("config", cfg) if isinstance(cfg, dict) else cfg
        return self._call("config", name, fetch)

    # -- inference ------------------------------------------------------------------------
    def infer(self, model_name: str, inputs: Mapping[str, Any], outputs: Sequence[str],
              version: str | int = "") -> dict[str, Any]:
        """One request: ``inputs`` name -> numpy array (dtype gives the Triton type); returns name -> array."""
        import numpy as np
        from tritonclient.utils import np_to_triton_dtype

        mod = self._module()

        def run() -> dict[str, Any]:
            req_inputs = []
            for name, array in inputs.items():
                arr = np.ascontiguousarray(array)
                inp = mod.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
                inp.set_data_from_numpy(arr)
                req_inputs.append(inp)
            req_outputs = [mod.InferRequestedOutput(o) for o in outputs]
            kw: dict[str, Any] = {"client_timeout": self.timeout} if self.protocol == "grpc" else {}
            trace = trace_headers()  # W3C context of the current span: gRPC metadata / HTTP headers for Triton
            if trace:
                kw["headers"] = trace
            result = self.raw.infer(model_name, req_inputs, model_version=str(version), outputs=req_outputs, **kw)
            return {o: result.as_numpy(o) for o in outputs}
        return self._call("inference", model_name, run)

    def _module(self) -> Any:
        if self.protocol == "grpc":
            import tritonclient.grpc as mod
        else:
            import tritonclient.http as mod
        return mod

    def infer_frames(self, model_name: str, frames: Sequence[bytes], version: str | int = "",
                     outputs: Sequence[str] = ENSEMBLE_OUTPUTS) -> dict[str, Any]:
        """Run the ensemble on encoded frames (PNG / JPEG / raw ``bytes``, one per row of the BYTES input
        ``FRAME`` ``[N, 1]``); Triton's preprocess model decodes them as the model spec says.

        Returns the ensemble outputs, row i for ``frames[i]``; ``FRAME_ERROR`` (object ``[N, 1]``, bytes)
        is ``b""`` for a frame that was used and ``b"<reason>: <detail>"`` for one that was not (its other
        outputs are then meaningless). Batches above ``max_batch_size`` are split into several requests.
        The frames go into the request as they are (one object array, no per-frame copy).
        """
        import numpy as np

        if not len(frames):
            raise TritonError(f"Triton at {self.url}: no frames given for model {model_name!r}",
                              url=self.url, model=model_name, what="input check")
        arr = np.empty((len(frames), 1), dtype=object)
        arr[:, 0] = frames
        parts = [self.infer(model_name, {FRAME_INPUT: arr[i:i + self.max_batch_size]}, outputs, version)
                 for i in range(0, arr.shape[0], self.max_batch_size)]
        if len(parts) == 1:
            return parts[0]
        return {o: np.concatenate([p[o] for p in parts], axis=0) for o in outputs}

    def infer_pipeline(self, frames: Sequence[bytes], model: str, version: str | int = "") -> list[dict[str, Any]]:
        """Run the pipeline model ``model`` (``models/<model>/pipeline.yaml``, one Triton model) on encoded frames;
        one dict per frame, in order: ``boxes`` (``[[x0, y0, x1, y1], ...]``, frame pixels, best detector score
        first), ``box_scores``, ``labels`` (the classifier's class ids), ``label_scores``, ``count``, ``readout``
        (``""`` when no box: an empty read-out, not an error), ``embedding`` (float32 array) and ``error``
        (``"<reason>: <detail>"`` for a frame the pipeline could not use, else None; its other values are then
        empty). Requests are split as in :meth:`infer_frames` (outputs ``PIPELINE_OUTPUTS``)."""
        import numpy as np

        out = self.infer_frames(model, frames, version, outputs=PIPELINE_OUTPUTS)
        errors = dict(frame_error_rows(out))
        readouts = out["READOUT"].reshape(-1)
        answers = []
        for i, k in enumerate(np.asarray(out["COUNT"]).reshape(-1).tolist()):
            k = 0 if i in errors else int(k)
            text = readouts[i]
            answers.append({
                "boxes": out["BOXES"][i, :k].astype(float).tolist(),
                "box_scores": out["BOX_SCORES"][i, :k].astype(float).tolist(),
                "labels": out["BOX_LABELS"][i, :k].astype(int).tolist(),
                "label_scores": out["LABEL_SCORES"][i, :k].astype(float).tolist(),
                "count": k,
                "readout": "" if i in errors else (text.decode("utf-8", "replace") if isinstance(text, bytes)
                                                   else str(text)),
                "embedding": np.asarray(out["EMBEDDING"][i], np.float32),
                "error": errors.get(i)})
        return answers
