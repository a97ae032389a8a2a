"""The prediction collection is sized by the model spec's embedding, and a collection of another size is refused
naming both sizes (qdrant local mode on a temporary path)."""

from __future__ import annotations

import pytest

from tasks.adapters.qdrant import PredictionPoint, VectorStoreError, open_vectors


def test_the_collection_takes_the_models_embedding_size_and_refuses_another(tmp_path):
    path = str(tmp_path / "qdrant")
    with pytest.raises(ValueError, match="needs the vector size"):
        open_vectors(path=path)
    with open_vectors(path=path, size=32) as vs:
        assert vs.vector_size() == 32
        vs.upsert_predictions([PredictionPoint("6f1d3c1e-2b5e-4d8f-9c57-0d2a4a1f3b10", [0.1] * 32, {"label": 1})])
        assert vs.count() == 1
    with pytest.raises(VectorStoreError, match=r"holds 32-d vectors, this model's embeddings are 64-d.*"
                                               r"MLPIPE_QDRANT_COLLECTION"):
        open_vectors(path=path, size=64)
    with open_vectors(path=path, size=32) as vs:  # the refused open released the path
        assert vs.count() == 1
