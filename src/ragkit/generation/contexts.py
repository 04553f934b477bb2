"""Question -> contexts: what both heads' ``generate`` decode from, retrieved once when not given."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from transformers import GenerationConfig, GenerationMixin

from ..errors import RagInputError

__all__ = [
    "pop_question_encoder_kwargs",
    "require_context_mask",
    "resolve_contexts",
    "retrieve_for_generate",
    "trim_context_padding",
    "trimmed",
]

# Keywords of a question encoder's forward that generation passes itself (or that are not inputs).
_NOT_QUESTION_INPUTS = frozenset(
    {
        "self",
        "input_ids",
        "attention_mask",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "kwargs",
    }
)


@functools.cache
def _generation_options() -> frozenset[str]:
    """Keywords that are ``generate`` options, never question encoder inputs, whatever the encoder's ``forward``
    names: every ``GenerationConfig`` field (``use_cache``, ``max_length``, ...), ``generate``'s own
    arguments and the decoder cache and prompt (BERT's ``forward`` names ``use_cache`` and ``cache``)."""
    named = set(GenerationConfig().to_dict()) | set(inspect.signature(GenerationMixin.generate).parameters)
    named |= {"cache", "past_key_values", "use_cache", "decoder_input_ids", "decoder_attention_mask"}
    return frozenset(named - {"self", "kwargs"})


def trim_context_padding(
    context_input_ids: torch.Tensor, context_attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the trailing columns of `(batch_size * n_docs, length)` contexts that are padding in every row.

    The retriever pads every context to ``max_combined_length`` as the reference does; the generator only
    needs the longest real context. Only trailing columns go, so positions of real tokens are unchanged and
    the generator's outputs at real positions are the same (masked keys contribute nothing).
    """
    if context_attention_mask.dim() != 2 or context_attention_mask.shape[1] == 0:
        return context_input_ids, context_attention_mask
    used = context_attention_mask.bool().any(dim=0)
    if bool(used[-1]):
        return context_input_ids, context_attention_mask
    length = int(used.nonzero().max()) + 1 if bool(used.any()) else 1
    return context_input_ids[:, :length], context_attention_mask[:, :length]


def pop_question_encoder_kwargs(question_encoder: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pops from ``kwargs`` the question tokenizer's further outputs the question encoder takes (``token_type_ids``).

    ``model.generate(**question_tokenizer(questions, return_tensors="pt"))`` then works with a BERT/DPR
    tokenizer: its ``token_type_ids`` reach the question encoder instead of the generator. Generation
    options stay in ``kwargs`` for the generator even where the encoder's ``forward`` names them too
    (``use_cache`` and ``cache`` of a plain BERT encoder).
    """
    try:
        accepted = set(inspect.signature(question_encoder.forward).parameters) - _NOT_QUESTION_INPUTS
    except (TypeError, ValueError):  # a forward without a signature: take the tokenizer's usual output
        accepted = {"token_type_ids"}
    accepted -= _generation_options()
    accepted.add("token_type_ids")  # a tokenizer output the generator never takes
    return {name: kwargs.pop(name) for name in list(kwargs) if name in accepted}


def require_context_mask(context_attention_mask: torch.Tensor | None) -> None:
    """Refuse given contexts without their mask: decoding would attend to their padding."""
    if context_attention_mask is None:
        raise RagInputError(
            "`context_attention_mask` must be passed with `context_input_ids`: pass the retriever's "
            "`context_attention_mask` (1 for real tokens, 0 for padding), or "
            "`torch.ones_like(context_input_ids)` if the contexts hold no padding."
        )


def trimmed(
    context_input_ids: torch.Tensor, context_attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Contexts without their trailing all-padding columns: the generator's encoder and cross-attention
    run on the longest real context, not on ``max_combined_length`` (same outputs at real positions)."""
    if context_attention_mask is None:
        return context_input_ids, None
    return trim_context_padding(context_input_ids, context_attention_mask)


def retrieve_for_generate(
    model: Any,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    n_docs: int,
    question_encoder_kwargs: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contexts `(batch_size * n_docs, length)`, their mask and doc scores `(batch_size, n_docs)` of questions
    given without contexts: the model's own encoding and retrieval (same pooling, devices and float32 doc
    scores as forward), for both heads' ``generate``."""
    if model.retriever is None:
        raise RagInputError(
            "No retriever is set: pass `context_input_ids`, `context_attention_mask` and `doc_scores`, "
            "or set one with `model.set_retriever(...)`."
        )
    if input_ids is None:
        raise RagInputError("Pass `input_ids` (the questions) or `context_input_ids` and `doc_scores`.")
    question_vectors = model.rag.encode_questions(
        input_ids, attention_mask, **(question_encoder_kwargs or {})
    )
    retrieved = model.rag.retrieve_contexts(input_ids, question_vectors, n_docs)
    return retrieved.context_input_ids, retrieved.context_attention_mask, retrieved.doc_scores


def resolve_contexts(
    model: Any,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    context_input_ids: torch.Tensor | None,
    context_attention_mask: torch.Tensor | None,
    doc_scores: torch.Tensor | None,
    n_docs: int,
    question_encoder_kwargs: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Retrieve (once) when no contexts are given; check them; return contexts, mask and doc scores.

    Given and retrieved contexts go through the checks of ``forward`` (``RagModel._check_contexts``):
    tensors of the right dtypes and shapes, ids within the generator's vocabulary and positions.

    Args:
        input_ids: `(batch_size, question_len)` questions, encoded and retrieved for without contexts.
        attention_mask: `(batch_size, question_len)` their mask.
        context_input_ids: `(batch_size * n_docs, context_len)` contexts, or None to retrieve.
        context_attention_mask: `(batch_size * n_docs, context_len)` their mask; required with
            ``context_input_ids``.
        doc_scores: `(batch_size, n_docs)`; required with ``context_input_ids``.
        question_encoder_kwargs: Further question encoder inputs (``token_type_ids``).

    Returns:
        Contexts, their mask (None where it is all ones) and the doc scores.

    Raises:
        RagInputError: Contexts without their mask or doc scores, or contexts the checks refuse.
    """
    if context_input_ids is None:
        context_input_ids, context_attention_mask, doc_scores = retrieve_for_generate(
            model, input_ids, attention_mask, n_docs, question_encoder_kwargs
        )
    else:
        require_context_mask(context_attention_mask)
        if doc_scores is None:
            raise RagInputError(
                "`doc_scores` of shape (batch_size, n_docs) is needed with `context_input_ids`: RAG-Sequence "
                "ranks hypotheses with the document scores (the retriever's output gives them)."
            )
    model.rag._check_contexts(
        doc_scores, context_input_ids, None, n_docs, context_attention_mask=context_attention_mask
    )
    # A mask of ones changes nothing but costs a mask in every attention call: drop it.
    if context_attention_mask is not None and bool(context_attention_mask.bool().all()):
        context_attention_mask = None
    return context_input_ids, context_attention_mask, doc_scores
