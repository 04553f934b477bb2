"""Session-wide tiny fixtures: tokenizers, configs and an indexed passage set, all built offline."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from ragkit.testing import (
    tiny_indexed_dataset,
    tiny_passage_embeddings,
    tiny_rag_config,
    write_tiny_generator_tokenizer,
    write_tiny_question_encoder_tokenizer,
)

RETRIEVAL_DIM = 32

# Tiny models run fastest on one thread; more threads only contend with each other (and with faiss).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A session-wide directory for tokenizer files and saved checkpoints."""
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def question_encoder_tokenizer(tiny_dir):
    """DPR WordPiece tokenizer over a tiny vocabulary."""
    return write_tiny_question_encoder_tokenizer(tiny_dir / "question_encoder_tokenizer")


@pytest.fixture(scope="session")
def generator_tokenizer(tiny_dir):
    """BART byte-level BPE tokenizer (400 tokens)."""
    return write_tiny_generator_tokenizer(tiny_dir / "generator_tokenizer")


@pytest.fixture(scope="session")
def rag_config():
    """RAG config: tiny DPR (width 32) + tiny BART, 3 docs, custom index."""
    return tiny_rag_config("bart", hidden_size=RETRIEVAL_DIM)


@pytest.fixture(scope="session")
def rag_config_t5():
    """RAG config: tiny DPR (width 32) + tiny T5, 3 docs, custom index."""
    return tiny_rag_config("t5", hidden_size=RETRIEVAL_DIM)


@pytest.fixture(scope="session")
def passage_embeddings():
    """(n_passages, 32) float32 embeddings, seeded, one per TINY_PASSAGES entry."""
    return tiny_passage_embeddings(RETRIEVAL_DIM, seed=0)


@pytest.fixture(scope="session")
def indexed_dataset(passage_embeddings):
    """A ``datasets.Dataset`` (title, text, embeddings) with an exact inner-product faiss index."""
    return tiny_indexed_dataset(passage_embeddings)
