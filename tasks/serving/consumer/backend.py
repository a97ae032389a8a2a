"""The inference backend the loop calls: its interface (``InferenceBackend``) and the Triton implementation.

``infer(images)`` returns the ensemble's outputs for uint8 ``[N, 28, 28]`` (``LABEL``, ``SCORE``,
``TOPK_LABELS``, ``TOPK_SCORES``, optionally ``EMBEDDING``; first axis N) or raises
``InferenceUnavailable``: the batch is then held and retried, never dropped. ``ready()`` may call
the server; ``version`` never does; ``model_version(max_age_s)`` refreshes it at most that often.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from tasks.contracts.serving import MAX_BATCH

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

logger = logging.getLogger(__name__)


class InferenceUnavailable(RuntimeError):
    """Triton could not answer (down, slow, model not loaded): retry later, never drop."""


@runtime_checkable
class InferenceBackend(Protocol):
    """What the consumer loop needs from an inference server."""

    def infer(self, images: "np.ndarray") -> "dict[str, np.ndarray]":
        """Outputs for uint8 ``[N, 28, 28]``; ``InferenceUnavailable`` on any failure."""
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
    to Triton). A micro-batch larger than the model's ``max_batch_size`` is
    split into chunks that are sent concurrently.
    """

    def __init__(self, url: str, model: str, timeout_s: float = 10.0, max_model_batch: int = MAX_BATCH,
                 concurrency: int = 4) -> None:
        from tasks.adapters.triton import TritonClient

        self.url = url
        self.model = model
        self.timeout_s = timeout_s
        self.chunk = max(1, int(max_model_batch))
        self._client = TritonClient(url, protocol="grpc", timeout=timeout_s, max_batch_size=self.chunk)
        self._health_client = TritonClient(url, protocol="grpc", timeout=min(timeout_s, 2.0))
        self._pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="triton")
        self._version = ""
        self._version_checked = -1e9

    def _infer_one(self, images: "np.ndarray") -> dict[str, "np.ndarray"]:
        return self._client.infer_images(self.model, images)

    def infer(self, images: "np.ndarray") -> dict[str, "np.ndarray"]:
        """Outputs for uint8 ``[N, 28, 28]``; ``InferenceUnavailable`` on any failure."""
        import numpy as np

        n = len(images)
        try:
            if n <= self.chunk:
                return self._infer_one(images)
            futures = [self._pool.submit(self._infer_one, images[i:i + self.chunk]) for i in range(0, n, self.chunk)]
            parts = [f.result() for f in futures]
        except Exception as exc:  # noqa: BLE001 - TritonError, or gRPC errors of several types
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
        """The served classifier version ("" when unknown), refreshed at most every ``max_age_s``."""
        from tasks.model.repo import classifier_name

        now = time.monotonic()
        if now - self._version_checked >= max_age_s:
            self._version_checked = now
            try:
                versions = self._health_client.ready_versions(classifier_name(self.model))
                self._version = str(max(versions)) if versions else ""
            except Exception as exc:  # noqa: BLE001 - unknown version is not worth failing a batch
                logger.debug("classifier version lookup failed: %s", exc)
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
