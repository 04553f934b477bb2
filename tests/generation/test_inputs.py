"""Both heads' generate: the question tokenizer's whole output, counts out of range, and padded contexts.

Models are the shared reference/ragkit pairs (tiny DPR + BART, shared random weights, ragkit's retriever).
"""

from __future__ import annotations

import pytest
import torch

from rag_helpers import QUESTIONS, retrieved_contexts
from ragkit.errors import RagInputError

MAX_LENGTH = 8
HEADS = ["sequence", "token"]


def _question_encoder_calls(model):
    """Records every question-encoder call's keyword arguments (a forward pre-hook: a public seam)."""
    calls = []
    handle = model.rag.question_encoder.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(dict(kwargs)), with_kwargs=True
    )
    return calls, handle


@pytest.mark.parametrize("head", HEADS)
def test_generate_takes_the_question_tokenizers_whole_output(pairs, question_encoder_tokenizer, head):
    # model.generate(**tokenizer(questions, return_tensors="pt")): a DPR/BERT tokenizer also returns
    # token_type_ids, which go to the question encoder (Transformers rejects them as unused model_kwargs).
    pair = pairs(head, "bart")
    encoded = question_encoder_tokenizer(QUESTIONS, return_tensors="pt", padding=True)
    assert "token_type_ids" in encoded
    calls, handle = _question_encoder_calls(pair.ours)
    try:
        ones = torch.ones_like(encoded["token_type_ids"])
        got = pair.ours.generate(**{**encoded, "token_type_ids": ones}, num_beams=2, max_length=MAX_LENGTH)
    finally:
        handle.remove()
    assert got.shape[0] == len(QUESTIONS)
    assert len(calls) == 1 and torch.equal(calls[0]["token_type_ids"], ones)
    # Without token_type_ids the encoder takes its default (zeros): the same output as passing zeros.
    without = pair.ours.generate(
        input_ids=encoded["input_ids"],
        attention_mask=encoded["attention_mask"],
        num_beams=2,
        max_length=MAX_LENGTH,
    )
    assert torch.equal(pair.ours.generate(**encoded, num_beams=2, max_length=MAX_LENGTH), without)


def test_token_type_ids_change_the_retrieval_scores(pairs, question_encoder_tokenizer):
    # The token types reach the encoder's embeddings: other types, other question vectors, other doc scores
    # (seen in RAG-Token's marginalized step scores).
    pair = pairs("token", "bart")
    encoded = question_encoder_tokenizer(QUESTIONS, return_tensors="pt", padding=True)
    kwargs = dict(max_length=4, return_dict_in_generate=True, output_scores=True)
    zeros = pair.ours.generate(**encoded, **kwargs)
    ones = pair.ours.generate(
        **{**encoded, "token_type_ids": torch.ones_like(encoded["token_type_ids"])}, **kwargs
    )
    assert not torch.allclose(zeros.scores[0], ones.scores[0])


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize(
    "bad,name",
    [
        ({"num_beams": 0}, "num_beams"),
        ({"num_beams": -2}, "num_beams"),
        ({"num_return_sequences": 0}, "num_return_sequences"),
        ({"max_length": 0}, "max_length"),
        ({"max_length": -1}, "max_length"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"min_length": -1}, "min_length"),
        ({"n_docs": 0}, "n_docs"),
        ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences"),
        ({"num_beams": 2.0}, "num_beams"),
    ],
)
def test_counts_out_of_range_are_refused_naming_the_argument(pairs, questions, head, bad, name):
    pair = pairs(head, "bart")
    contexts = retrieved_contexts(pair, questions)
    if head == "sequence" and name == "num_return_sequences" and "num_beams" in bad:
        bad = {
            "num_beams": 1,
            "num_return_sequences": 4,
            "n_docs": 3,
        }  # RAG-Sequence: at most n_docs * num_beams
    kwargs = {"max_length": MAX_LENGTH, **contexts, **bad}
    with pytest.raises(RagInputError, match=name) as caught:
        pair.ours.generate(**kwargs)
    assert "at least" in str(caught.value) or "at most" in str(caught.value) or "between" in str(caught.value)


def _right_padded(contexts: dict, extra: int, pad: int) -> dict:
    """``contexts`` with ``extra`` trailing all-padding columns (as a retriever padding to a longer length)."""
    ids, mask = contexts["context_input_ids"], contexts["context_attention_mask"]
    return dict(
        contexts,
        context_input_ids=torch.cat([ids, torch.full((ids.shape[0], extra), pad, dtype=ids.dtype)], dim=1),
        context_attention_mask=torch.cat([mask, torch.zeros(mask.shape[0], extra, dtype=mask.dtype)], dim=1),
    )


def _encoder_widths(model):
    """Records the width of every input the generator's encoder runs on."""
    widths = []
    handle = model.rag.generator.get_encoder().register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(
            (kwargs.get("input_ids") if "input_ids" in kwargs else args[0]).shape[1]
        ),
        with_kwargs=True,
    )
    return widths, handle


@pytest.mark.parametrize("head", HEADS)
def test_heavily_padded_contexts_decode_as_the_reference_on_the_real_ones(pairs, questions, head):
    # Contexts padded far beyond their real length decode as the reference decodes the real contexts (for
    # RAG-Token the reference masks the padding too): the encoder runs on the real width only.
    pair = pairs(head, "bart")
    contexts = retrieved_contexts(pair, questions)
    real = contexts["context_input_ids"].shape[1]
    pad = pair.config.generator.pad_token_id
    padded = _right_padded(contexts, 250, pad)
    kwargs = dict(num_beams=3, num_return_sequences=2, max_length=MAX_LENGTH)
    with torch.no_grad():
        expected = pair.reference.generate(**contexts, **kwargs)
        if head == "token":
            assert torch.equal(pair.reference.generate(**padded, **kwargs), expected)
    widths, handle = _encoder_widths(pair.ours)
    try:
        got = pair.ours.generate(**padded, **kwargs)
    finally:
        handle.remove()
    assert torch.equal(got, expected)
    assert widths and max(widths) <= real  # trimmed: never the padded width
