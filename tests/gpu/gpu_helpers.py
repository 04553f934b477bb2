"""Helpers of the GPU tests and benchmarks: random-weight RAG configs, checkpoints and contexts."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModel, AutoModelForSeq2SeqLM, BartConfig, DPRConfig

from ragkit import RagConfig, RagTokenForGeneration

#: Width of the "mid" model: large enough for half-precision error to show, small enough to build in a second.
MID_WIDTH = 256
#: Generator vocabulary of the "mid" model.
MID_VOCAB = 1000


def _rag_config(question_encoder: DPRConfig, generator: BartConfig, rag_fields: dict) -> RagConfig:
    """A custom-index RAG config over the two parts with the generator's special token ids, then ``rag_fields``."""
    fields = dict(
        index_name="custom",
        pad_token_id=generator.pad_token_id,
        eos_token_id=generator.eos_token_id,
        bos_token_id=generator.bos_token_id,
        decoder_start_token_id=generator.decoder_start_token_id,
    )
    fields.update(rag_fields)
    return RagConfig.from_question_encoder_generator_configs(question_encoder, generator, **fields)


def mid_rag_config(**rag_fields) -> RagConfig:
    """DPR (2 layers, width 256) + BART (2+2 layers, width 256, vocab 1000)."""
    question_encoder = DPRConfig(
        vocab_size=MID_VOCAB,
        hidden_size=MID_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=4 * MID_WIDTH,
        max_position_embeddings=128,
    )
    generator = BartConfig(
        vocab_size=MID_VOCAB,
        d_model=MID_WIDTH,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=4 * MID_WIDTH,
        decoder_ffn_dim=4 * MID_WIDTH,
        max_position_embeddings=256,
        dropout=0.0,
        attention_dropout=0.0,
    )
    return _rag_config(
        question_encoder, generator, {"n_docs": 3, "retrieval_vector_size": MID_WIDTH, **rag_fields}
    )


def base_rag_config(**rag_fields) -> RagConfig:
    """DPR bert-base + BART-base shapes (about 250M parameters): weights dominate memory at small batch."""
    generator = BartConfig(
        d_model=768,
        encoder_layers=6,
        decoder_layers=6,
        encoder_attention_heads=12,
        decoder_attention_heads=12,
        encoder_ffn_dim=3072,
        decoder_ffn_dim=3072,
    )
    return _rag_config(DPRConfig(), generator, {"n_docs": 5, **rag_fields})


def write_random_checkpoint(directory: Path, config: RagConfig, seed: int = 0, std: float = 0.05) -> Path:
    """Save a RAG-Token checkpoint of ``config`` with seeded random weights (std ``std``, so outputs vary)."""
    torch.manual_seed(seed)
    model = RagTokenForGeneration(
        config=config,
        question_encoder=AutoModel.from_config(config.question_encoder),
        generator=AutoModelForSeq2SeqLM.from_config(config.generator),
    )
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, std)
    model.save_pretrained(directory)
    return directory


def random_contexts(
    config: RagConfig, batch_size: int, length: int, seed: int = 0, device: str = "cpu"
) -> dict:
    """Random ``context_input_ids``/``context_attention_mask`` `(batch * n_docs, length)` and ``doc_scores``."""
    generator = torch.Generator().manual_seed(seed)
    rows = batch_size * config.n_docs
    vocab = config.generator.vocab_size
    ids = torch.randint(4, vocab, (rows, length), generator=generator)
    ids[:, 0] = config.generator.bos_token_id
    ids[:, -1] = config.generator.eos_token_id
    return {
        "context_input_ids": ids.to(device),
        "context_attention_mask": torch.ones(rows, length, dtype=torch.long, device=device),
        "doc_scores": torch.randn(batch_size, config.n_docs, generator=generator).to(device),
    }
