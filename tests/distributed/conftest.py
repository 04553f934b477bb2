"""Fixtures for the distributed retrieval tests: the tiny passages saved to disk, a single-process retriever."""

from __future__ import annotations

import copy

import pytest

from ragkit.testing import tiny_retriever, write_tiny_custom_index


@pytest.fixture(scope="session")
def saved_passages(tmp_path_factory, passage_embeddings):
    """(passages_path, index_path): TINY_PASSAGES saved with ``save_to_disk`` and their exact faiss index."""
    return write_tiny_custom_index(tmp_path_factory.mktemp("distributed_index"), passage_embeddings)


@pytest.fixture
def disk_config(rag_config, saved_passages):
    """A private RAG config pointing at the saved passages and index (index_name="custom")."""
    config = copy.deepcopy(rag_config)
    config.index_name = "custom"
    config.passages_path, config.index_path = (str(path) for path in saved_passages)
    return config


@pytest.fixture
def single_process_retriever(rag_config, question_encoder_tokenizer, generator_tokenizer, indexed_dataset):
    """ragkit's ordinary RagRetriever over the exact in-memory index: the answers to match."""
    return tiny_retriever(rag_config, question_encoder_tokenizer, generator_tokenizer, indexed_dataset)
