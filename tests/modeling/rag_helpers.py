"""Helpers for the model tests: reference/ragkit model pairs on shared tiny random weights.

Each pair shares one question encoder and one generator (the same modules), so any difference
between the two outputs comes from the RAG code itself. Weights are redrawn (seeded) so that
decoding varies from token to token instead of repeating one token.
"""

from __future__ import annotations

import torch
import transformers
from transformers import BartForConditionalGeneration, DPRQuestionEncoder, T5ForConditionalGeneration
from transformers.models.rag.retrieval_rag import CustomHFIndex

import ragkit.modeling_rag as rk
from ragkit.retrieval.custom import CustomHFIndex as RagkitCustomHFIndex
from ragkit.retrieval_rag import RagRetriever
from ragkit.testing import tiny_rag_config

QUESTIONS = ["How many people live in Paris?", "Which river flows through London?"]
ANSWERS = ["about 2 million", "the Thames"]
HEADS = {"model": "RagModel", "sequence": "RagSequenceForGeneration", "token": "RagTokenForGeneration"}


def perturb(module: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """Redraw weight matrices (seeded); unit-norm embedding rows so no token wins every step."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.dim() > 1:
                param.normal_(0.0, std, generator=generator)
                if "shared" in name or "embed_tokens" in name or "lm_head" in name:
                    param.div_(param.norm(dim=-1, keepdim=True))


def reference_retriever(config, question_encoder_tokenizer, generator_tokenizer, indexed_dataset):
    """transformers' RagRetriever over the tiny indexed passages."""
    return transformers.RagRetriever(
        transformers.RagConfig(**config.to_dict()),
        question_encoder_tokenizer=question_encoder_tokenizer,
        generator_tokenizer=generator_tokenizer,
        index=CustomHFIndex(config.retrieval_vector_size, indexed_dataset),
    )


def ragkit_retriever(config, question_encoder_tokenizer, generator_tokenizer, indexed_dataset):
    """ragkit's RagRetriever over the same passages, through ragkit's own index (never the reference's)."""
    return RagRetriever(
        config,
        question_encoder_tokenizer=question_encoder_tokenizer,
        generator_tokenizer=generator_tokenizer,
        index=RagkitCustomHFIndex(config.retrieval_vector_size, indexed_dataset),
    )


class Pair:
    """A reference model and a ragkit model sharing weights, with their retrievers."""

    def __init__(self, reference, ours, config, ref_retriever, our_retriever):
        self.reference = reference
        self.ours = ours
        self.config = config
        self.ref_retriever = ref_retriever
        self.our_retriever = our_retriever


def build_pair(head: str, generator_kind: str, retrievers: dict, seed: int = 0, **rag_fields) -> Pair:
    """Build (reference, ragkit) models of ``head`` ("model"/"sequence"/"token") over shared modules."""
    config = tiny_rag_config(generator_kind, hidden_size=32, **rag_fields)
    reference_config = transformers.RagConfig(**config.to_dict())
    torch.manual_seed(seed)
    question_encoder = DPRQuestionEncoder(reference_config.question_encoder).eval()
    generator_cls = BartForConditionalGeneration if generator_kind == "bart" else T5ForConditionalGeneration
    generator = generator_cls(reference_config.generator).eval()
    perturb(question_encoder, seed)
    perturb(generator, seed + 1)
    ref_retriever, our_retriever = retrievers[generator_kind]
    reference = getattr(transformers, HEADS[head])(
        config=reference_config,
        question_encoder=question_encoder,
        generator=generator,
        retriever=ref_retriever,
    ).eval()
    if generator_kind == "t5":
        # The reference reads config.generator.bos_token_id, which T5Config lacks in Transformers 5.
        reference.config.generator.bos_token_id = None
    ours = getattr(rk, HEADS[head])(
        config=config, question_encoder=question_encoder, generator=generator, retriever=our_retriever
    ).eval()
    return Pair(reference, ours, config, ref_retriever, our_retriever)


def retrieved_contexts(pair: Pair, questions, n_docs: int | None = None) -> dict:
    """Contexts and doc scores computed outside the model, as in the API reference's 'use retriever separately' example."""
    n_docs = n_docs or pair.config.n_docs
    with torch.no_grad():
        question_hidden_states = pair.reference.question_encoder(
            questions.input_ids, attention_mask=questions.attention_mask
        )[0]
    docs = pair.ref_retriever(
        questions.input_ids,
        question_hidden_states.numpy(),
        prefix=getattr(pair.reference.generator.config, "prefix", None),
        n_docs=n_docs,
        return_tensors="pt",
    )
    doc_scores = torch.bmm(
        question_hidden_states.unsqueeze(1), docs["retrieved_doc_embeds"].float().transpose(1, 2)
    ).squeeze(1)
    return {
        "context_input_ids": docs["context_input_ids"],
        "context_attention_mask": docs["context_attention_mask"],
        "doc_scores": doc_scores,
    }
