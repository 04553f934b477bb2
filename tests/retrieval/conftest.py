"""Fixtures for the retrieval tests: fresh indexed datasets, a saved retriever directory, questions."""

from __future__ import annotations

import copy

import pytest
from retrieval_helpers import DIM, QUESTIONS

from ragkit.testing import tiny_question_vectors, write_tiny_custom_index, write_tiny_retriever_dir


@pytest.fixture
def fresh_config(rag_config):
    """A private copy of the session RAG config (retrievers mutate their config)."""
    return copy.deepcopy(rag_config)


@pytest.fixture(scope="module")
def queries():
    """(4, 32) float32 question vectors."""
    return tiny_question_vectors(len(QUESTIONS), DIM, seed=1)


@pytest.fixture(scope="module")
def question_ids(question_encoder_tokenizer):
    """(4, seq_len) numpy token ids of QUESTIONS."""
    return question_encoder_tokenizer(QUESTIONS, padding=True, return_tensors="np")["input_ids"]


@pytest.fixture(scope="session")
def retriever_dir(tmp_path_factory, rag_config, question_encoder_tokenizer, generator_tokenizer):
    """A directory with a RAG config and both tokenizers, as a checkpoint holds them."""
    return write_tiny_retriever_dir(
        tmp_path_factory.mktemp("retriever"), rag_config, question_encoder_tokenizer, generator_tokenizer
    )


@pytest.fixture(scope="session")
def saved_custom_index(tmp_path_factory, passage_embeddings):
    """(passages_path, index_path) of TINY_PASSAGES saved the way the reference documents."""
    return write_tiny_custom_index(tmp_path_factory.mktemp("custom_index"), passage_embeddings)
