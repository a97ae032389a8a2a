"""Batched upserts (qdrant local mode on a temporary path): one transaction per upsert survives a reopen with every
point, vector and payload; an upsert that fails leaves nothing behind; two threads may share one store."""

from __future__ import annotations

import threading
import uuid

import numpy as np
import pytest

from tasks.adapters.qdrant import PredictionPoint, VectorStoreError, open_vectors


def _points(n: int, seed: int, dim: int = 16) -> list[PredictionPoint]:
    rng = np.random.default_rng(seed)
    emb = rng.random((n, dim), dtype=np.float32) + 0.01
    return [PredictionPoint(str(uuid.UUID(int=seed * 100_000 + i)), emb[i], {"label": i % 10, "n": i})
            for i in range(n)]


def test_a_batched_upsert_is_stored_whole_and_idempotent(tmp_path):
    path = str(tmp_path / "qdrant")
    pts = _points(60, seed=1)
    with open_vectors(path=path, size=16) as vs:
        assert vs.upsert_predictions(pts) == 60
        assert vs.upsert_predictions(iter(pts[:30])) == 30  # again (a redelivery), from an iterator
        assert vs.upsert_predictions([]) == 0
    with open_vectors(path=path, create=False) as vs:  # what is on disk, not only in memory
        assert vs.count() == 60
        got = {p["id"]: p for p in vs.get([p.frame_id for p in pts[::7]], with_vectors=True)}
    for p in pts[::7]:
        stored = got[p.frame_id]
        assert stored["payload"] == dict(p.payload)
        want = np.asarray(p.embedding, dtype=np.float64)
        vec = np.asarray(stored["vector"], dtype=np.float64)
        assert np.allclose(vec / np.linalg.norm(vec), want / np.linalg.norm(want), atol=1e-6)


def test_a_failed_upsert_leaves_no_point_and_the_store_keeps_working(tmp_path):
    path = str(tmp_path / "qdrant")
    good = _points(10, seed=2)
    bad = good[:5] + [PredictionPoint(str(uuid.uuid4()), [0.5] * 3, {})]  # a 3-d vector in a 16-d collection
    with open_vectors(path=path, size=16) as vs:
        with pytest.raises(VectorStoreError, match="upsert of 6 point"):
            vs.upsert_predictions(bad)
        assert vs.count() == 0
        assert vs.upsert_predictions(good) == 10
    with open_vectors(path=path, create=False) as vs:
        assert vs.count() == 10


def test_two_threads_share_one_store(tmp_path):
    path = str(tmp_path / "qdrant")
    errors: list[BaseException] = []
    with open_vectors(path=path, size=16) as vs:
        def write(seed: int) -> None:
            try:
                for k in range(8):
                    vs.upsert_predictions(_points(25, seed=seed * 10 + k))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(s,)) for s in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        assert vs.count() == 2 * 8 * 25
    with open_vectors(path=path, create=False) as vs:
        assert len(set(vs.all_ids())) == 400
