"""Session fixtures for the model tests, built through ``ragkit.testing`` (Transformers' reference side: rag_helpers.py)."""

from __future__ import annotations

import pytest
from rag_helpers import ANSWERS, QUESTIONS, Pair, build_pair, reference_retriever

from ragkit.testing import tiny_rag_config, tiny_retriever


@pytest.fixture(scope="session")
def retrievers(question_encoder_tokenizer, generator_tokenizer, indexed_dataset):
    """generator kind -> (reference retriever, ragkit's own retriever over the same passages and index)."""
    out = {}
    for kind in ("bart", "t5"):
        config = tiny_rag_config(kind, hidden_size=32)
        ref = reference_retriever(config, question_encoder_tokenizer, generator_tokenizer, indexed_dataset)
        ours = tiny_retriever(config, question_encoder_tokenizer, generator_tokenizer, indexed_dataset)
        out[kind] = (ref, ours)
    return out


@pytest.fixture(scope="session")
def pairs(retrievers):
    """Lazily built, cached pairs: ``pairs(head, generator_kind)``."""
    cache: dict = {}

    def get(head: str, generator_kind: str) -> Pair:
        key = (head, generator_kind)
        if key not in cache:
            cache[key] = build_pair(head, generator_kind, retrievers)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def questions(question_encoder_tokenizer):
    """Tokenized questions `(2, length)`."""
    return question_encoder_tokenizer(QUESTIONS, return_tensors="pt", padding=True)


@pytest.fixture(scope="session")
def labels(generator_tokenizer):
    """Targets `(2, length)` as the generator tokenizer makes them: '<s> answer </s>' then padding."""
    return generator_tokenizer(ANSWERS, return_tensors="pt", padding=True).input_ids
