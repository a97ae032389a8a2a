"""The vector store: the only module that talks to Qdrant.

Predictions (with their embeddings, sized by the model spec's ``embedding_dim``) are stored in the
collection ``predictions`` (cosine distance; ``MLPIPE_QDRANT_COLLECTION``); the point id is the frame id (a UUID), so
writing the same prediction twice leaves one point (idempotent upserts).

Where the points live (``QdrantSettings.from_env``):

* ``MLPIPE_QDRANT_URL`` set (``http://qdrant:6333``; ``MLPIPE_QDRANT_API_KEY``
  optional): a Qdrant server.
* otherwise local mode, ``MLPIPE_QDRANT_PATH`` (default
  ``$MLPIPE_HOME/qdrant``; ``:memory:`` for a throw-away store). Local mode
  allows one process per path (a second one fails with "already accessed by
  another instance"), persists each point with its own SQLite commit (~1k
  points/s on disk, ~15k/s in memory) and has no ``search()`` (use
  ``query_points``).

CLI: ``mlpipe vectors {count,get,similar} --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from tasks.contracts.errors import Transient

logger = logging.getLogger(__name__)

COLLECTION = "predictions"


class VectorStoreError(Transient, RuntimeError):
    """A Qdrant operation failed (the message says what to check; transient)."""


@dataclass(frozen=True)
class QdrantSettings:
    url: str = ""  # server URL; empty = local mode
    path: str = ""  # local mode: folder or ":memory:"
    api_key: str = field(default="", repr=False)
    collection: str = COLLECTION
    timeout: float = 10.0
    local_sync: str = "normal"  # "full": keep the library's fsync per point (MLPIPE_QDRANT_LOCAL_SYNC)

    @classmethod
    def from_env(cls, **overrides: Any) -> "QdrantSettings":
        """From ``load_settings().qdrant``; non-None ``overrides`` (CLI flags) win."""
        from tasks.config import load_settings

        cfg = load_settings()
        q = cfg.qdrant
        url, path = q.url, q.path
        if overrides.get("path") and not overrides.get("url"):
            url = ""  # an explicit local path wins over a server URL from the environment
        if not url and not path and not overrides.get("path"):
            path = cfg.qdrant_path
        values: dict[str, Any] = dict(url=url, path=path, api_key=q.api_key.get_secret_value(),
                                      collection=q.collection, local_sync=q.local_sync)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values.get("url"):
            values["path"] = ""
        return cls(**values)

    def describe(self) -> str:
        return f"server {self.url}" if self.url else f"local {self.path}"


@dataclass(frozen=True)
class PredictionPoint:
    """One prediction to index: ``frame_id`` (UUID string), the embedding and a JSON payload."""

    frame_id: str
    embedding: Sequence[float]
    payload: Mapping[str, Any]


def point_id(frame_id: str) -> str:
    """The point id for a frame id (canonical UUID form). Raises ValueError for non-UUIDs."""
    return str(uuid.UUID(str(frame_id)))


class VectorStore:
    """A Qdrant collection of predictions. ``with open_vectors() as vs: vs.upsert_predictions(...)``."""

    def __init__(self, settings: QdrantSettings) -> None:
        from qdrant_client import QdrantClient

        self.settings = settings
        try:
            if settings.url:
                self._client = QdrantClient(url=settings.url, api_key=settings.api_key or None,
                                            timeout=int(settings.timeout))
            elif settings.path == ":memory:":
                self._client = QdrantClient(location=":memory:")
            else:
                Path(settings.path).mkdir(parents=True, exist_ok=True)
                self._client = QdrantClient(path=settings.path)
        except (RuntimeError, OSError, ValueError) as exc:
            raise VectorStoreError(
                f"cannot open Qdrant ({settings.describe()}): {exc}. Local mode allows one process per path: "
                "stop the other user or give this one its own MLPIPE_QDRANT_PATH") from exc
        self.collection = settings.collection
        self._tuned = False
        # one store may serve several consumers of one process (local mode allows one process per path):
        # qdrant-client's local mode is not safe for concurrent calls
        self._lock = threading.RLock()

    def ensure_collection(self, size: int) -> bool:
        """Create the collection (cosine, ``size``-d: the model spec's ``embedding_dim``) if missing; True when
        created. An existing collection of another size is a ``VectorStoreError`` naming both sizes."""
        from qdrant_client import models

        if self._client.collection_exists(self.collection):
            have = self.vector_size()
            if have is not None and have != size:
                raise VectorStoreError(f"Qdrant collection {self.collection!r} ({self.settings.describe()}) holds "
                                       f"{have}-d vectors, this model's embeddings are {size}-d: give this model its "
                                       "own collection (MLPIPE_QDRANT_COLLECTION) or path (MLPIPE_QDRANT_PATH)")
            self._tune_local_storage()
            return False
        self._client.create_collection(
            self.collection, vectors_config=models.VectorParams(size=size, distance=models.Distance.COSINE))
        logger.info("created Qdrant collection %s (%d-d, cosine) in %s", self.collection, size,
                    self.settings.describe())
        self._tune_local_storage()
        return True

    def _tune_local_storage(self) -> None:
        """Local mode on disk: SQLite WAL + ``synchronous=NORMAL`` (best effort).

        qdrant-client commits every point on its own; with the default rollback
        journal each commit is an fsync (~100-1,000 points/s). In WAL mode a
        commit is a write to the WAL file: it survives a killed process (what
        the consumer's at-least-once promise needs) and only an OS crash may
        lose the last commits; throughput goes to ~4k points/s.
        ``MLPIPE_QDRANT_LOCAL_SYNC=full`` keeps the library's defaults.
        """
        if self.settings.url or self.settings.path == ":memory:" or self._tuned:
            return
        if self.settings.local_sync == "full":
            return
        try:
            collection = self._client._client.collections[self.collection]  # noqa: SLF001 - local mode only
            conn = collection.storage.storage
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._tuned = True
        except Exception as exc:  # noqa: BLE001 - internals of qdrant-client may change: keep defaults
            logger.debug("could not tune local Qdrant storage (%s); keeping fsync per point", exc)

    def upsert_predictions(self, points: Iterable[PredictionPoint]) -> int:
        """Upsert points (id = frame id) in one call, as one column batch; waits until they are stored. Returns
        the count. Thread-safe (several consumers of one process may share the store).

        The vectors are converted in one numpy call (not element by element) and the payloads are passed as they
        are (``prediction_point`` builds a fresh dict per point). In local mode on disk the whole call is one
        SQLite transaction (``_one_transaction``) instead of qdrant-client's commit per point."""
        import numpy as np
        from qdrant_client import models

        pts = points if isinstance(points, list) else list(points)
        if not pts:
            return 0
        ids = [point_id(p.frame_id) for p in pts]
        try:
            vectors = np.asarray([p.embedding for p in pts], dtype=np.float32).reshape(len(pts), -1).tolist()
        except ValueError:  # vectors of different sizes: Qdrant names the one that does not fit
            vectors = [[float(x) for x in p.embedding] for p in pts]
        payloads = [p.payload if isinstance(p.payload, dict) else dict(p.payload) for p in pts]
        try:
            with self._lock, self._one_transaction():
                self._client.upsert(self.collection, points=models.Batch(ids=ids, vectors=vectors, payloads=payloads),
                                    wait=True)
        except Exception as exc:  # noqa: BLE001 - qdrant-client raises several types
            raise VectorStoreError(f"upsert of {len(pts)} point(s) to {self.collection} "
                                   f"({self.settings.describe()}) failed: {exc}") from exc
        return len(pts)

    @contextlib.contextmanager
    def _one_transaction(self) -> Any:
        """Local mode on disk: the points of one upsert committed together.

        qdrant-client persists each point in its own ``with connection:`` block (a commit each: ~25 % of an
        upsert of 256 points, measured). Here its connection is swapped for one whose ``with`` does nothing,
        inside one real transaction: one commit per upsert, and a failure rolls the whole upsert back (it is
        retried whole; upserts are idempotent). Internals of qdrant-client: when they are not as expected the
        library's own commits stay. Callers hold ``_lock``."""
        persistence = None
        if not self.settings.url and self.settings.path != ":memory:":
            try:
                persistence = self._client._client.collections[self.collection].storage  # noqa: SLF001 - local
                conn = persistence.storage
                if not hasattr(conn, "execute") or isinstance(conn, _NoCommit):
                    persistence = None
            except Exception:  # noqa: BLE001 - internals may change: keep the library's behaviour
                persistence = None
        if persistence is None:
            yield
            return
        persistence.storage = _NoCommit(conn)
        try:
            with conn:  # commits on success, rolls back on an exception
                yield
        finally:
            persistence.storage = conn

    def vector_size(self) -> int | None:
        """The vector size of the existing collection (None when missing or not a single unnamed vector)."""
        if not self._client.collection_exists(self.collection):
            return None
        vectors = self._client.get_collection(self.collection).config.params.vectors
        return int(vectors.size) if hasattr(vectors, "size") else None

    def count(self) -> int:
        with self._lock:
            if not self._client.collection_exists(self.collection):
                return 0
            return int(self._client.count(self.collection, exact=True).count)

    def get(self, ids: Sequence[str], with_vectors: bool = False) -> list[dict[str, Any]]:
        """Points for the given frame ids (missing ones are left out): ``{"id", "payload"[, "vector"]}``."""
        with self._lock:
            if not ids or not self._client.collection_exists(self.collection):
                return []
            records = self._client.retrieve(self.collection, ids=[point_id(i) for i in ids], with_payload=True,
                                            with_vectors=with_vectors)
        out = []
        for r in records:
            item: dict[str, Any] = {"id": str(r.id), "payload": dict(r.payload or {})}
            if with_vectors:
                item["vector"] = list(r.vector) if r.vector is not None else None  # type: ignore[arg-type]
            out.append(item)
        return out

    def all_ids(self, batch: int = 1000) -> list[str]:
        """Every point id in the collection (for audits and tests)."""
        if not self._client.collection_exists(self.collection):
            return []
        ids: list[str] = []
        offset = None
        while True:
            with self._lock:
                records, offset = self._client.scroll(self.collection, limit=batch, offset=offset,
                                                      with_payload=False, with_vectors=False)
            ids.extend(str(r.id) for r in records)
            if offset is None:
                return ids

    def similar(self, vector: Sequence[float], limit: int = 5) -> list[dict[str, Any]]:
        """Nearest predictions to ``vector`` (``query_points``; local mode has no ``search``)."""
        with self._lock:
            res = self._client.query_points(self.collection, query=[float(x) for x in vector], limit=limit,
                                            with_payload=True)
        return [{"id": str(p.id), "score": float(p.score), "payload": dict(p.payload or {})} for p in res.points]

    def close(self) -> None:
        try:
            self._client.close()
        except Exception as exc:  # noqa: BLE001
            logger.debug("closing qdrant client: %s", exc)

    def __enter__(self) -> "VectorStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _NoCommit:
    """A sqlite3 connection whose ``with`` block neither commits nor rolls back (``VectorStore._one_transaction``
    owns the transaction); everything else is the connection's."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def __enter__(self) -> "_NoCommit":
        return self

    def __exit__(self, *exc: object) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def open_vectors(settings: QdrantSettings | None = None, create: bool = True, size: int | None = None,
                 **overrides: Any) -> VectorStore:
    """Open the prediction collection (settings from the environment unless given); ``create``: make it, of
    ``size``-d vectors (the model spec's ``embedding_dim``), when missing."""
    if create and size is None:
        raise ValueError("open_vectors(create=True) needs the vector size (the model spec's embedding_dim)")
    vs = VectorStore(settings or QdrantSettings.from_env(**overrides))
    if create:
        try:
            vs.ensure_collection(size)  # type: ignore[arg-type]
        except BaseException:
            vs.close()
            raise
    return vs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlpipe vectors",
                                     description="Inspect the Qdrant prediction collection "
                                                 "(MLPIPE_QDRANT_URL or MLPIPE_QDRANT_PATH).")
    parser.add_argument("--url", default=None, help="Qdrant server URL (overrides MLPIPE_QDRANT_URL)")
    parser.add_argument("--path", default=None, help="local-mode folder (overrides MLPIPE_QDRANT_PATH)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("count", help="number of points")
    g = sub.add_parser("get", help="points by frame id")
    g.add_argument("frame_ids", nargs="+")
    s = sub.add_parser("similar", help="nearest neighbours of a stored frame's embedding")
    s.add_argument("frame_id")
    s.add_argument("--limit", type=int, default=5)
    args = parser.parse_args(argv)
    from tasks.logs import setup_logging

    setup_logging(default_level="WARNING")
    try:
        with open_vectors(create=False, url=args.url, path=args.path) as vs:
            if args.cmd == "count":
                print(json.dumps({"collection": vs.collection, "count": vs.count()}))
            elif args.cmd == "get":
                print(json.dumps(vs.get(args.frame_ids), indent=2))
            else:
                found = vs.get([args.frame_id], with_vectors=True)
                if not found:
                    print(f"error: frame {args.frame_id} has no point in {vs.collection}", file=sys.stderr)
                    return 2
                print(json.dumps(vs.similar(found[0]["vector"], args.limit), indent=2))
    except (VectorStoreError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
