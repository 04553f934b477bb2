"""Fixtures for the fine-tuning tests: a tiny trainable RAG model over the tiny passages."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def make_model(rag_config, question_encoder_tokenizer, generator_tokenizer, indexed_dataset):
    """Build a fresh tiny RAG-Sequence (or RAG-Token) model, seeded, with a retriever over the tiny passages."""
    from ragkit import RagRetriever, RagSequenceForGeneration, RagTokenForGeneration, RagTokenizer
    from ragkit.retrieval.custom import CustomHFIndex

    def build(seed: int = 0, model_type: str = "rag_sequence", dropout: float = 0.0):
        config = type(rag_config).from_dict(rag_config.to_dict())
        config.max_combined_length = 96  # room for the passage and the whole question
        config.generator.init_std = 0.1  # a wider init than BART's 0.02 lets a 32-wide model learn in seconds
        config.generator.dropout = dropout
        retriever = RagRetriever(
            config,
            question_encoder_tokenizer,
            generator_tokenizer,
            index=CustomHFIndex(config.retrieval_vector_size, indexed_dataset),
        )
        torch.manual_seed(seed)
        model_class = RagSequenceForGeneration if model_type == "rag_sequence" else RagTokenForGeneration
        model = model_class(config=config, retriever=retriever)
        return model, RagTokenizer(question_encoder_tokenizer, generator_tokenizer)

    return build
