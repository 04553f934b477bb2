"""Training paths: end-to-end retriever training, question encoder pooling, float32 marginalization."""

from __future__ import annotations

import pytest
import torch
import transformers

import ragkit.modeling_rag as rk
from rag_helpers import build_pair, ragkit_retriever, reference_retriever
from ragkit.testing import tiny_bart_config, tiny_rag_config


@pytest.fixture(scope="module")
def ctx_tokenizer(tiny_dir, question_encoder_tokenizer):
    """A DPR context encoder tokenizer over the tiny WordPiece vocabulary."""
    return transformers.DPRContextEncoderTokenizer(
        vocab=str(tiny_dir / "question_encoder_tokenizer" / "vocab.txt")
    )


@pytest.mark.parametrize("head", ["sequence", "token"])
def test_end_to_end_retriever_training_reaches_the_context_encoder(
    head, ctx_tokenizer, question_encoder_tokenizer, generator_tokenizer, indexed_dataset, questions, labels
):
    config = tiny_rag_config("bart")
    # Fresh retrievers: set_ctx_encoder_tokenizer changes what they return.
    ref_retriever = reference_retriever(
        config, question_encoder_tokenizer, generator_tokenizer, indexed_dataset
    )
    our_retriever = ragkit_retriever(config, question_encoder_tokenizer, generator_tokenizer, indexed_dataset)
    assert our_retriever is not None, "ragkit's RagRetriever or CustomHFIndex cannot be imported"
    ref_retriever.set_ctx_encoder_tokenizer(ctx_tokenizer)
    our_retriever.set_ctx_encoder_tokenizer(ctx_tokenizer)
    pair = build_pair(head, "bart", {"bart": (ref_retriever, our_retriever)}, seed=5)
    torch.manual_seed(5)
    ctx_encoder = transformers.DPRContextEncoder(config.question_encoder)
    pair.reference.set_context_encoder_for_training(ctx_encoder)
    pair.ours.set_context_encoder_for_training(ctx_encoder)
    pair.ours.train()

    inputs = {"input_ids": questions.input_ids, "attention_mask": questions.attention_mask, "labels": labels}
    with torch.no_grad():
        expected = pair.reference(**inputs)
    out = pair.ours(**inputs, reduce_loss=True)
    torch.testing.assert_close(out.doc_scores, expected.doc_scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, expected.loss.sum(), atol=1e-4, rtol=1e-6)
    out.loss.backward()
    ctx_grads = [p.grad for p in ctx_encoder.parameters() if p.grad is not None]
    assert ctx_grads and sum(g.abs().sum() for g in ctx_grads) > 0, "no gradient reached the context encoder"
    q_grads = [p.grad for p in pair.ours.question_encoder.parameters() if p.grad is not None]
    assert q_grads and sum(g.abs().sum() for g in q_grads) > 0, "no gradient reached the question encoder"
    pair.ours.zero_grad(set_to_none=True)
    ctx_encoder.zero_grad(set_to_none=True)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_plain_encoder_as_question_encoder(pooling, retrievers, questions, labels):
    bert_config = transformers.BertConfig(
        vocab_size=256, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37
    )
    config = rk.RagConfig.from_question_encoder_generator_configs(
        bert_config,
        tiny_bart_config(),
        n_docs=3,
        retrieval_vector_size=32,
        index_name="custom",
        max_combined_length=48,
        question_encoder_pooling=pooling,
        question_encoder_normalize=True,
    )
    torch.manual_seed(0)
    model = rk.RagSequenceForGeneration(config=config, retriever=retrievers["bart"][1]).eval()
    assert isinstance(model.question_encoder, transformers.BertModel)
    with torch.no_grad():
        out = model(
            input_ids=questions.input_ids,
            attention_mask=questions.attention_mask,
            labels=labels,
            output_retrieved=True,
        )
        hidden = model.question_encoder(questions.input_ids, attention_mask=questions.attention_mask)[0]
    if pooling == "mean":
        mask = questions.attention_mask.unsqueeze(-1).float()
        expected = (hidden * mask).sum(1) / mask.sum(1)
    else:
        expected = hidden[:, 0]
    expected = torch.nn.functional.normalize(expected, dim=-1)
    torch.testing.assert_close(out.question_encoder_last_hidden_state, expected, atol=1e-6, rtol=0)
    scores = torch.einsum("bd,bnd->bn", expected, out.retrieved_doc_embeds.float())
    torch.testing.assert_close(out.doc_scores, scores, atol=1e-5, rtol=0)
    assert torch.isfinite(out.loss).all()


def test_marginalization_runs_in_float32_for_half_precision_models(retrievers):
    pair = build_pair("token", "bart", retrievers, seed=7)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2 * 3, 4, 400, generator=generator).to(torch.bfloat16)
    doc_scores = torch.randn(2, 3, generator=generator).to(torch.bfloat16)
    marginal = pair.ours.marginalize(logits, doc_scores, n_docs=3)
    assert marginal.dtype == torch.float32
    # Same as marginalizing the upcast inputs: nothing was rounded to bf16 on the way.
    expected = pair.reference.marginalize(logits.float(), doc_scores.float(), n_docs=3)
    torch.testing.assert_close(marginal, expected, atol=0, rtol=0)
    # And the float32 path equals the reference exactly.
    torch.testing.assert_close(
        pair.ours.marginalize(logits.float(), doc_scores.float(), n_docs=3), expected, atol=0, rtol=0
    )
    target = torch.tensor([[0, 5, 6, 2], [0, 7, 2, 1]])
    nll = pair.ours.get_nll(logits, doc_scores, target, n_docs=3)
    assert nll.dtype == torch.float32
    torch.testing.assert_close(
        nll, pair.reference.get_nll(logits.float(), doc_scores.float(), target, n_docs=3), atol=1e-5, rtol=0
    )


def test_sequence_get_nll_in_half_precision(retrievers):
    pair = build_pair("sequence", "bart", retrievers, seed=8)
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2 * 3, 4, 400, generator=generator).to(torch.float16)
    doc_scores = torch.randn(2, 3, generator=generator).to(torch.float16)
    target = torch.tensor([[0, 5, 6, 2], [0, 7, 2, 1]])
    for options in ({}, {"exclude_bos_score": True, "epsilon": 0.1}):
        ours = pair.ours.get_nll(logits, doc_scores, target, n_docs=3, **options)
        assert ours.dtype == torch.float32
        expected = pair.reference.get_nll(logits.float(), doc_scores.float(), target, n_docs=3, **options)
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("cls", [rk.RagSequenceForGeneration, rk.RagTokenForGeneration])
def test_activation_checkpointing_gives_the_same_gradients(cls):
    torch.manual_seed(0)
    model = cls(config=tiny_rag_config("bart")).train()
    ids = torch.randint(5, 400, (6, 7), generator=torch.Generator().manual_seed(0))
    inputs = {
        "context_input_ids": ids,
        "context_attention_mask": torch.ones_like(ids),
        "doc_scores": torch.randn(2, 3),
        "labels": torch.tensor([[0, 5, 6, 2], [0, 7, 2, 1]]),
        "reduce_loss": True,
    }
    plain = model(**inputs).loss
    plain.backward()
    expected = model.generator.get_input_embeddings().weight.grad.clone()
    model.zero_grad(set_to_none=True)
    model.activation_checkpointing_enable()
    assert model.generator.get_encoder().layers[0].gradient_checkpointing
    checkpointed = model(**inputs).loss
    checkpointed.backward()
    torch.testing.assert_close(checkpointed, plain, atol=0, rtol=0)
    torch.testing.assert_close(
        model.generator.get_input_embeddings().weight.grad, expected, atol=1e-6, rtol=0
    )


def test_sequence_generate_delegates_to_ragkit_generation(monkeypatch, retrievers):
    import ragkit.generation

    calls = []

    def fake(model, **kwargs):
        calls.append((model, kwargs))
        return torch.zeros(1, 1, dtype=torch.long)

    monkeypatch.setattr(ragkit.generation, "rag_sequence_generate", fake)
    model = rk.RagSequenceForGeneration(config=tiny_rag_config("bart"))
    out = model.generate(
        input_ids=torch.tensor([[2, 3]]), num_beams=2, n_docs=2, decoding="fast", max_length=5
    )
    assert out.shape == (1, 1)
    (called_model, kwargs), *_ = calls
    assert called_model is model
    assert kwargs["num_beams"] == 2 and kwargs["n_docs"] == 2 and kwargs["decoding"] == "fast"
    assert kwargs["max_length"] == 5 and kwargs["do_deduplication"] is None
