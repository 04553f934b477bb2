"""Helpers shared by the retrieval tests (imported by name: the tests folder is not a package)."""

from __future__ import annotations

import numpy as np

from ragkit.testing import TINY_PASSAGES

DIM = 32

QUESTIONS = ["where is paris?", "what is the capital of germany", "which river flows through rome", "danube"]


def make_indexed_dataset(embeddings: np.ndarray, index=None):
    """A fresh ``datasets.Dataset`` over TINY_PASSAGES with a faiss index (IndexFlatIP by default)."""
    import faiss
    from datasets import Dataset

    dataset = Dataset.from_dict(
        {
            "title": [title for title, _ in TINY_PASSAGES],
            "text": [text for _, text in TINY_PASSAGES],
            "embeddings": list(embeddings),
        }
    )
    dataset.add_faiss_index("embeddings", custom_index=index if index is not None else faiss.IndexFlatIP(DIM))
    return dataset
