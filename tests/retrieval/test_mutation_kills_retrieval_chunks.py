"""``retrieval_batch_size`` chunks: every question is searched, the last, partial chunk included."""

from __future__ import annotations

import numpy as np
import pytest

from ragkit.testing import tiny_question_vectors, tiny_rag_config, tiny_retriever


@pytest.mark.parametrize("n_questions, batch_size", [(4, 3), (7, 2), (5, 4)])
def test_partial_last_chunk_is_searched(n_questions, batch_size):
    config = tiny_rag_config(retrieval_batch_size=batch_size)
    retriever = tiny_retriever(config)
    assert retriever.batch_size == batch_size
    queries = tiny_question_vectors(n_questions, config.retrieval_vector_size, seed=2)
    embeds, ids, docs = retriever.retrieve(queries, 3)
    assert ids.shape == (n_questions, 3) and embeds.shape[:2] == (n_questions, 3) and len(docs) == n_questions
    # One search of all questions at once (no chunking) gives the same passages, row for row.
    retriever.batch_size = n_questions
    whole_embeds, whole_ids, _ = retriever.retrieve(queries, 3)
    np.testing.assert_array_equal(ids, whole_ids)
    np.testing.assert_array_equal(embeds, whole_embeds)
