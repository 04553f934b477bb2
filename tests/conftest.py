"""Session-wide tiny fixtures, all built offline: tokenizers, configs, an indexed passage set, reference/ragkit
model pairs on shared weights (the reference side: rag_helpers.py), and capital-city QA data."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from rag_helpers import ANSWERS, QUESTIONS, Pair, build_pair, reference_retriever
from ragkit.finetuning import QAExample
from ragkit.testing import (
    tiny_indexed_dataset,
    tiny_passage_embeddings,
    tiny_rag_config,
    tiny_retriever,
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


# Capital questions: the generator learns country -> capital from two phrasings and is tested on a
# third, unseen phrasing of the same facts.
CAPITALS = {
    "france": "Paris",
    "germany": "Berlin",
    "england": "London",
    "spain": "Madrid",
    "italy": "Rome",
    "austria": "Vienna",
}
TRAIN_TEMPLATES = ("what is the capital of {}?", "the capital of {} is which city?")
HELD_OUT_TEMPLATE = "capital city of {}?"


def capital_examples(templates) -> list[QAExample]:
    """One example per (template, country)."""
    return [QAExample(t.format(country), city) for t in templates for country, city in CAPITALS.items()]


@pytest.fixture
def capitals():
    """(country -> capital, training templates, held-out template)."""
    return CAPITALS, TRAIN_TEMPLATES, HELD_OUT_TEMPLATE


@pytest.fixture
def train_examples():
    return capital_examples(TRAIN_TEMPLATES)


@pytest.fixture
def held_out_examples():
    return capital_examples([HELD_OUT_TEMPLATE])
