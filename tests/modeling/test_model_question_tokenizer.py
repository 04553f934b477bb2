"""``model(**question_tokenizer(questions, return_tensors="pt"), labels=...)`` works, and token_type_ids reach
the question encoder (a BERT/DPR tokenizer returns them; Transformers' RAG drops them)."""

from __future__ import annotations

import pytest
import torch

import ragkit.modeling_rag as rk
from ragkit.testing import tiny_rag_config

QUESTIONS = ["who wrote the origin of species", "what is the capital of france"]
ANSWERS = ["charles darwin", "paris"]


@pytest.fixture(scope="module")
def setup(retrievers, question_encoder_tokenizer, generator_tokenizer):
    config = tiny_rag_config("bart", hidden_size=32)
    torch.manual_seed(0)
    base = rk.RagModel(config=config, retriever=retrievers["bart"][1]).eval()
    # Token-type embeddings start near zero; make type 1 clearly different so its effect is measurable.
    with torch.no_grad():
        base.question_encoder.question_encoder.bert_model.embeddings.token_type_embeddings.weight[1].add_(1.0)
    parts = dict(question_encoder=base.question_encoder, generator=base.generator, retriever=base.retriever)
    models = {
        "model": base,
        "sequence": rk.RagSequenceForGeneration(config=config, **parts).eval(),
        "token": rk.RagTokenForGeneration(config=config, **parts).eval(),
    }
    encoded = question_encoder_tokenizer(QUESTIONS, return_tensors="pt", padding=True)
    labels = generator_tokenizer(ANSWERS, return_tensors="pt", padding=True).input_ids
    return models, encoded, labels


def _run(model, head, labels, **inputs):
    with torch.no_grad():
        if head == "model":
            return model(**inputs, decoder_input_ids=labels)
        return model(**inputs, labels=labels)


@pytest.mark.parametrize("head", ["model", "sequence", "token"])
def test_tokenizer_output_is_accepted_and_token_types_reach_the_encoder(setup, head):
    models, encoded, labels = setup
    assert "token_type_ids" in encoded
    seen = []
    hook = models[head].question_encoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("token_type_ids")), with_kwargs=True
    )
    try:
        out = _run(models[head], head, labels, **encoded)
        ones = {**encoded, "token_type_ids": torch.ones_like(encoded["input_ids"])}
        out_ones = _run(models[head], head, labels, **ones)
    finally:
        hook.remove()
    assert torch.equal(seen[0], encoded["token_type_ids"]) and torch.equal(seen[1], ones["token_type_ids"])
    # The encoder used them: other token types give other question vectors, hence other document scores.
    assert not torch.allclose(out.doc_scores, out_ones.doc_scores)
    if head != "model":
        assert torch.isfinite(out.loss).all()


def test_token_type_ids_match_encode_questions(setup):
    models, encoded, labels = setup
    ones = torch.ones_like(encoded["input_ids"])
    with torch.no_grad():
        expected = models["model"].encode_questions(
            encoded["input_ids"], encoded["attention_mask"], token_type_ids=ones
        )
        out = models["token"](**{**encoded, "token_type_ids": ones}, labels=labels)
    torch.testing.assert_close(out.question_encoder_last_hidden_state, expected, atol=0, rtol=0)


def test_other_tokenizer_outputs_the_encoder_does_not_take_are_ignored(setup, question_encoder_tokenizer):
    """As in Transformers' RAG, extra keyword arguments the question encoder does not name are ignored."""
    models, _, labels = setup
    encoded = question_encoder_tokenizer(
        QUESTIONS, return_tensors="pt", padding=True, return_special_tokens_mask=True, return_length=True
    )
    with torch.no_grad():
        out = models["sequence"](**encoded, labels=labels)
        plain = models["sequence"](
            input_ids=encoded["input_ids"],
            attention_mask=encoded["attention_mask"],
            token_type_ids=encoded["token_type_ids"],
            labels=labels,
        )
    torch.testing.assert_close(out.loss, plain.loss, atol=0, rtol=0)
