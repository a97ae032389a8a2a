"""The inference backend the loop calls: its interface (``InferenceBackend``) and the Triton implementation.

``infer(frames)`` returns the ensemble's outputs for N encoded frames (the values as they came from Kafka,
sent as the BYTES input ``FRAME``; Triton's preprocess model decodes them as the model spec says):
``LABEL``, ``SCORE``, ``TOPK_LABELS``, ``TOPK_SCORES``, ``EMBEDDING`` and ``FRAME_ERROR`` (``b""``, or
``b"<reason>: <detail>"`` for a frame the server could not use; first axis N), or raises
``InferenceUnavailable`` (Triton down, slow, model not loaded: the batch is held and retried, never
dropped) or ``InferenceRejected`` (a permanent error for this request, e.g. INVALID_ARGUMENT: the loop
bisects the batch to find the frames at fault). ``ready()`` may call the server; ``version`` never
does; ``model_version(max_age_s)`` refreshes it at most that often. ``max_batch_size`` is the served
model's (its Triton configuration, read at start and whenever the served version changes): larger
batches are split into requests of at most that size.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol, Sequence, runtime_checkable

from tasks.contracts.serving import MAX_BATCH

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

logger = logging.getLogger(__name__)


class InferenceUnavailable(RuntimeError):
    """Triton could not answer (down, slow, model not loaded): retry later, never drop."""


class InferenceRejected(RuntimeError):
    """Triton answered with a permanent error for this request (not unavailability): retrying the same request
    cannot help; a smaller one (a part of the batch) may."""


#: gRPC status codes of a Triton error that retrying the same request can cure (the server or model is down,
#: loading, overloaded or slow). Any other status (INVALID_ARGUMENT, INTERNAL, ...) is permanent for the request.
TRANSIENT_STATUSES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "NOT_FOUND", "RESOURCE_EXHAUSTED", "CANCELLED",
                                "ABORTED", "UNKNOWN", ""})


def is_permanent(exc: BaseException) -> bool:
    """Whether a failed Triton call is a permanent error for its request (see ``TRANSIENT_STATUSES``)."""
    if getattr(exc, "unreachable", False):
        return False
    cause: BaseException | None = exc
    while cause is not None:  # TritonError wraps the client's InferenceServerException (raise ... from)
        status = getattr(cause, "status", None)
        if callable(status) and type(cause).__name__ == "InferenceServerException":
            code = str(status() or "").rsplit(".", 1)[-1].upper()
            return code not in TRANSIENT_STATUSES
        cause = cause.__cause__
    return False


@runtime_checkable
class InferenceBackend(Protocol):
    """What the consumer loop needs from an inference server."""

    def infer(self, frames: Sequence[bytes]) -> "dict[str, np.ndarray]":
        """The ensemble's outputs for N encoded frames (row i for ``frames[i]``, ``FRAME_ERROR`` included);
        ``InferenceUnavailable`` or ``InferenceRejected`` on failure."""
        ...

    def ready(self) -> bool:
        ...

    @property
    def version(self) -> str:
        """The last known served classifier version ("" when unknown), without calling the server."""
        ...

    def model_version(self, max_age_s: float = 10.0) -> str:
        ...


class TritonBackend:
    """The consumer's view of Triton: batched inference, readiness, the served classifier version.

    All calls go through ``tasks.adapters.triton.TritonClient`` (the one module that talks
    to Triton). A micro-batch larger than the served model's ``max_batch_size`` (read from its
    Triton configuration; ``max_model_batch`` caps it and is used until it could be read) is split
    into chunks that are sent concurrently.
    """

    def __init__(self, url: str, model: str, timeout_s: float = 10.0, max_model_batch: int = MAX_BATCH,
                 concurrency: int = 4, *, outputs: Sequence[str] | None = None,
                 version_model: str | None = None) -> None:
        from tasks.adapters.triton import TritonClient

        self.url = url
        self.model = model
        # the outputs asked for (None: the ensemble's) and the Triton model whose ready versions are the served
        # version (None: the ensemble's classifier); a pipeline: PIPELINE_OUTPUTS and the pipeline model itself
        self.outputs = tuple(outputs) if outputs is not None else None
        self.version_model = version_model
        self.timeout_s = timeout_s
        self.cap = max(1, int(max_model_batch))  # never more per request, whatever the model says
        self.chunk = self.cap
        self.served_max_batch: int | None = None  # the served model's max_batch_size, once read
        self._client = TritonClient(url, protocol="grpc", timeout=timeout_s, max_batch_size=self.chunk)
        self._health_client = TritonClient(url, protocol="grpc", timeout=min(timeout_s, 2.0))
        self._pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="triton")
        self._version = ""
        self._version_checked = -1e9
        self._config_version: str | None = None  # the served version max_batch_size was read for
        self._lock = threading.Lock()
        self._config_lock = threading.Lock()

    @property
    def max_batch_size(self) -> int:
        """Most frames per Triton request: the served model's ``max_batch_size`` (capped), else the cap."""
        return self.chunk

    def refresh_config(self) -> int:
        """Read the served model's ``max_batch_size`` from Triton (``get_model_config``); returns the chunk size.

        A model without batching (``max_batch_size`` 0) takes one frame per request. Unknown (Triton down):
        the chunk size stays as it was."""
        try:
            cfg = self._health_client.model_config(self.model)
            served = int(cfg.get("max_batch_size", 0) or 0) if isinstance(cfg, dict) else 0
        except Exception as exc:  # noqa: BLE001 - Triton down: keep the last known size
            logger.debug("model config of %s not readable: %s", self.model, exc)
            return self.chunk
        chunk = max(1, min(self.cap, served if served > 0 else 1))
        with self._config_lock:
            if chunk != self.chunk or self.served_max_batch != served:
                logger.info("Triton model %s: max_batch_size %d -> requests of at most %d frame(s)", self.model,
                            served, chunk)
            self.served_max_batch = served
            self.chunk = chunk
            self._client.max_batch_size = chunk
        return chunk

    def _infer_one(self, frames: Sequence[bytes]) -> dict[str, "np.ndarray"]:
        if self.outputs is not None:
            return self._client.infer_frames(self.model, frames, outputs=self.outputs)
        return self._client.infer_frames(self.model, frames)

    def infer(self, frames: Sequence[bytes]) -> dict[str, "np.ndarray"]:
        """The ensemble's outputs for N encoded frames; ``InferenceUnavailable`` / ``InferenceRejected`` on failure."""
        import numpy as np

        if self.served_max_batch is None:
            self.refresh_config()
        n = len(frames)
        chunk = self.chunk
        try:
            if n <= chunk:
                return self._infer_one(frames)
            # each chunk in the caller's context: its Triton request carries the batch's traceparent (tasks.tracing)
            futures = [self._pool.submit(contextvars.copy_context().run, self._infer_one, frames[i:i + chunk])
                       for i in range(0, n, chunk)]
            parts, errors = [], []
            for f in futures:
                try:
                    parts.append(f.result())
                except Exception as exc:  # noqa: BLE001
                    errors.append(exc)
            if errors:
                # unavailability wins: the whole batch is retried; only all-permanent failures are bisected
                raise next((e for e in errors if not is_permanent(e)), errors[0])
        except Exception as exc:  # noqa: BLE001 - TritonError, or gRPC errors of several types
            if is_permanent(exc):
                if "batch" in str(exc).lower():  # e.g. "batch-size must be <= 64": the model changed under us
                    self.refresh_config()
                raise InferenceRejected(str(exc)) from exc
            # A fresh channel on the next call: gRPC's own reconnect backoff grows to minutes and
            # would delay the recovery long after Triton is back.
            self._client.close()
            raise InferenceUnavailable(str(exc)) from exc
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def ready(self) -> bool:
        ok = self._health_client.is_ready()
        if not ok:
            self._health_client.close()  # see infer(): reconnect at once next time
        return ok

    @property
    def version(self) -> str:
        """The last known served classifier version (no call)."""
        return self._version

    def model_version(self, max_age_s: float = 10.0) -> str:
        """The served classifier version ("" when unknown), refreshed at most every ``max_age_s``; for a
        pipeline (``version_model``) the served pipeline version: the newest ready version of that model."""
        from tasks.model.repo import classifier_name

        now = time.monotonic()
        if now - self._version_checked >= max_age_s:
            self._version_checked = now
            try:
                versions = self._health_client.ready_versions(self.version_model or classifier_name(self.model))
                self._version = str(max(versions)) if versions else ""
            except Exception as exc:  # noqa: BLE001 - unknown version is not worth failing a batch
                logger.debug("classifier version lookup failed: %s", exc)
            if self._version and self._version != self._config_version:  # a deploy: its limits may differ
                with self._lock:
                    if self._version != self._config_version:
                        self._config_version = self._version
                        self.refresh_config()
        return self._version

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for client in (self._client, self._health_client):
            close = getattr(client, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: BLE001
                    pass
