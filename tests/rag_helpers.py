"""Helpers for the model tests: reference/ragkit model pairs on shared tiny random weights.

ragkit's side comes from :mod:`ragkit.testing` (``tiny_rag_model``, ``tiny_retriever``); this module
adds only Transformers' side, the reference, over the very same modules. Each pair shares one question
encoder and one generator, so any difference between the two outputs comes from the RAG code itself.
Weights are redrawn (seeded, :func:`ragkit.testing.redraw_weights`) so that decoding varies from token
to token instead of repeating one token.
"""

from __future__ import annotations

import torch
import transformers
from transformers.models.rag.retrieval_rag import CustomHFIndex

import ragkit.modeling_rag as rk
from ragkit.testing import redraw_weights, tiny_rag_config, tiny_rag_model, tiny_retriever

QUESTIONS = ["How many people live in Paris?", "Which river flows through London?"]
ANSWERS = ["about 2 million", "the Thames"]
HEADS = {"model": "RagModel", "sequence": "RagSequenceForGeneration", "token": "RagTokenForGeneration"}
#: Standard deviation of the redrawn weights of every pair.
WEIGHT_STD = 0.2


def perturb(module: torch.nn.Module, seed: int, std: float = WEIGHT_STD) -> None:
    """Redraw weight matrices (seeded); unit-norm embedding rows so no token wins every step."""
    redraw_weights(module, seed, std)


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
    return tiny_retriever(config, question_encoder_tokenizer, generator_tokenizer, indexed_dataset)


def reference_model(head: str, ours, retriever=None):
    """Transformers' RAG model of ``head`` over ``ours``' own question encoder and generator (shared modules)."""
    reference = getattr(transformers, HEADS[head])(
        config=transformers.RagConfig(**ours.config.to_dict()),
        question_encoder=ours.question_encoder,
        generator=ours.generator,
        retriever=retriever,
    ).eval()
    if ours.config.generator.model_type == "t5":
        # The reference reads config.generator.bos_token_id, which T5Config lacks in Transformers 5.
        reference.config.generator.bos_token_id = None
    return reference


class Pair:
    """A reference model and a ragkit model sharing weights, with their retrievers."""

    def __init__(self, reference, ours, config, ref_retriever, our_retriever):
        self.reference = reference
        self.ours = ours
        self.config = config
        self.ref_retriever = ref_retriever
        self.our_retriever = our_retriever


def build_pair(head: str, generator_kind: str, retrievers: dict, seed: int = 0, **rag_fields) -> Pair:
    """Build (reference, ragkit) models of ``head`` ("model"/"sequence"/"token") over shared modules.

    ``retrievers[generator_kind]`` is the (reference, ragkit) retriever pair the two models use.
    """
    config = tiny_rag_config(generator_kind, hidden_size=32, **rag_fields)
    ref_retriever, our_retriever = retrievers[generator_kind]
    ours = tiny_rag_model(
        config, our_retriever, getattr(rk, HEADS[head]), seed=seed, weight_std=WEIGHT_STD
    ).eval()
    reference = reference_model(head, ours, ref_retriever)
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


def padded_context_inputs(num_beams: int = 3, seed: int = 5, max_length: int = 8) -> dict:
    """RAG-Sequence generate arguments for 2 questions x 3 given contexts (one row padded), seeded."""
    draw = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 400, (6, 9), generator=draw)
    mask = torch.ones_like(ids)
    mask[2, -3:] = 0
    return dict(
        context_input_ids=ids,
        context_attention_mask=mask,
        doc_scores=torch.randn(2, 3, generator=draw),
        num_beams=num_beams,
        num_return_sequences=2,
        max_length=max_length,
    )
