"""Training losses of the full models against Transformers' on the same weights, gradients included.

Each pair shares one question encoder and one generator, so the reference and ragkit differ only in
RAG's own code. Unlike the forward parity tests, these run with gradients enabled and compare:
the loss (1e-5 absolute), the gradients of every generator and question encoder parameter and of
``doc_scores`` (1e-4 relative + 1e-5 absolute, scaled by the tensor's largest gradient when above 1:
the losses sum in a different order and the generator runs on trimmed contexts). ragkit's models
use ragkit's retriever (a broken one fails here; nothing falls back to Transformers').

Contexts are padded to ``max_combined_length=96`` (the longest real one has 57 tokens), so ragkit's
generator runs on trimmed contexts and the reference's on 96 columns.
"""

from __future__ import annotations

import pytest
import torch

from rag_helpers import ANSWERS, build_pair, ragkit_retriever, reference_retriever
from ragkit.testing import tiny_rag_config

MAX_COMBINED_LENGTH = 96
LOSS_TOL = {"atol": 1e-5, "rtol": 1e-6}
GRAD_TOL = {"atol": 1e-5, "rtol": 1e-4}


@pytest.fixture(scope="module")
def padded_retrievers(question_encoder_tokenizer, generator_tokenizer, indexed_dataset):
    """(reference, ragkit) retrievers whose contexts are right-padded to 96 tokens."""
    config = tiny_rag_config("bart", max_combined_length=MAX_COMBINED_LENGTH)
    ours = ragkit_retriever(config, question_encoder_tokenizer, generator_tokenizer, indexed_dataset)
    assert ours is not None, "ragkit's RagRetriever or CustomHFIndex cannot be imported"
    ref = reference_retriever(config, question_encoder_tokenizer, generator_tokenizer, indexed_dataset)
    return {"bart": (ref, ours)}


@pytest.fixture(scope="module")
def padded_pairs(padded_retrievers):
    cache = {}

    def get(head):
        if head not in cache:
            cache[head] = build_pair(
                head, "bart", padded_retrievers, seed=11, max_combined_length=MAX_COMBINED_LENGTH
            )
        return cache[head]

    return get


@pytest.fixture(scope="module")
def generated_labels(generator_tokenizer):
    """Targets as ``generate`` and the QA batch encoder make them: decoder start, ``<s>``, answer, ``</s>``."""
    ids = generator_tokenizer(ANSWERS, return_tensors="pt", padding=True).input_ids
    start = torch.full((ids.shape[0], 1), generator_tokenizer.eos_token_id)  # BART's decoder start
    return torch.cat([start, ids], dim=1)


def _with_smoothing(model, epsilon):
    """The reference reads label smoothing from its config only."""
    model.config.label_smoothing = epsilon


def _loss_and_grads(pair, model, inputs, epsilon, **options):
    """Loss (reduced) and the gradients of all shared parameters (and of ``doc_scores`` when passed)."""
    pair.reference.zero_grad(set_to_none=True)
    pair.ours.zero_grad(set_to_none=True)
    inputs = dict(inputs)
    if "doc_scores" in inputs:
        inputs["doc_scores"] = inputs["doc_scores"].detach().clone().requires_grad_(True)
    if model is pair.reference:
        _with_smoothing(model, epsilon)
        try:
            out = model(**inputs, **options)
        finally:
            _with_smoothing(model, 0.0)
    else:
        out = model(**inputs, label_smoothing=epsilon, **options)
    loss = out.loss.sum()
    loss.backward()
    grads = {
        name: param.grad.clone()
        for name, param in model.named_parameters()
        if param.grad is not None and not name.startswith("rag.ctx_encoder")
    }
    if "doc_scores" in inputs:
        grads["doc_scores"] = inputs["doc_scores"].grad.clone()
    return loss.detach(), grads, out


def _assert_same_gradients(actual, expected):
    assert set(actual) == set(expected)
    for name, grad in expected.items():
        # Absolute tolerance relative to the tensor's largest gradient: sums over many positions round.
        atol = max(GRAD_TOL["atol"], GRAD_TOL["atol"] * float(grad.abs().max()))
        torch.testing.assert_close(
            actual[name], grad, atol=atol, rtol=GRAD_TOL["rtol"], msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("head", ["sequence", "token"])
def test_loss_and_gradients_with_retriever_match_reference(
    padded_pairs, questions, generated_labels, head, epsilon
):
    pair = padded_pairs(head)
    inputs = {
        "input_ids": questions.input_ids,
        "attention_mask": questions.attention_mask,
        "labels": generated_labels,
    }
    expected_loss, expected, _ = _loss_and_grads(pair, pair.reference, inputs, epsilon)
    loss, actual, _ = _loss_and_grads(pair, pair.ours, inputs, epsilon)
    torch.testing.assert_close(loss, expected_loss, **LOSS_TOL)
    assert any(name.startswith("rag.question_encoder") for name in expected), (
        "no gradient reached the question encoder"
    )
    _assert_same_gradients(actual, expected)


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("head", ["sequence", "token"])
def test_loss_and_gradients_with_doc_scores_match_reference(
    padded_pairs, questions, generated_labels, head, epsilon
):
    pair = padded_pairs(head)
    contexts = _contexts(pair, questions)
    inputs = {**contexts, "labels": generated_labels}
    expected_loss, expected, _ = _loss_and_grads(pair, pair.reference, inputs, epsilon)
    loss, actual, _ = _loss_and_grads(pair, pair.ours, inputs, epsilon)
    torch.testing.assert_close(loss, expected_loss, **LOSS_TOL)
    assert expected["doc_scores"].abs().sum() > 0
    _assert_same_gradients(actual, expected)


@pytest.mark.parametrize("head", ["sequence", "token"])
def test_sequence_loss_honours_exclude_bos_score_with_generated_targets(
    padded_pairs, questions, generated_labels, head
):
    pair = padded_pairs(head)
    inputs = {**_contexts(pair, questions), "labels": generated_labels}
    if head == "token":
        # RAG-Token has no exclude_bos_score; its loss scores the BOS token like any other.
        with torch.no_grad():
            torch.testing.assert_close(pair.ours(**inputs).loss, pair.reference(**inputs).loss, **LOSS_TOL)
        return
    losses = {}
    for exclude in (False, True):
        with torch.no_grad():
            expected = pair.reference(**inputs, exclude_bos_score=exclude).loss
            losses[exclude] = pair.ours(**inputs, exclude_bos_score=exclude).loss
        torch.testing.assert_close(losses[exclude], expected, **LOSS_TOL)
    # Leaving out BOS (always the second label here) removes a positive term from every row.
    assert (losses[False] - losses[True]).min() > 1e-3
    # get_nll directly, on the decoder inputs the forward pass scores.
    with torch.no_grad():
        out = pair.ours(**inputs)
        for exclude in (False, True):
            ours = pair.ours.get_nll(out.logits, out.doc_scores, generated_labels, exclude_bos_score=exclude)
            ref = pair.reference.get_nll(
                out.logits, out.doc_scores, generated_labels, exclude_bos_score=exclude
            )
            torch.testing.assert_close(ours, ref, **LOSS_TOL)
            torch.testing.assert_close(ours, losses[exclude], **LOSS_TOL)


@pytest.mark.parametrize("head", ["model", "sequence", "token"])
def test_generator_runs_on_trimmed_contexts_with_the_reference_outputs(padded_pairs, questions, labels, head):
    pair = padded_pairs("sequence" if head == "model" else head)
    model = pair.ours.rag if head == "model" else pair.ours
    reference = pair.reference.rag if head == "model" else pair.reference
    seen = []
    hook = pair.ours.generator.get_encoder().register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    kwargs = {
        "input_ids": questions.input_ids,
        "attention_mask": questions.attention_mask,
        "decoder_input_ids": labels,
        "output_retrieved": True,
        "use_cache": False,
    }
    try:
        with torch.no_grad():
            ours = model(**kwargs)
            ours_lengths = list(seen)  # the generator is shared: the reference's call is seen too
            expected = reference(**kwargs)
        mask = ours.context_attention_mask
        longest = int(mask.sum(1).max())
        assert longest < MAX_COMBINED_LENGTH and ours_lengths == [longest]
        # What forward returns keeps the reference's shapes, untrimmed.
        assert ours.context_input_ids.shape == (mask.shape[0], MAX_COMBINED_LENGTH)
        torch.testing.assert_close(ours.context_input_ids, expected.context_input_ids, atol=0, rtol=0)
        torch.testing.assert_close(
            ours.context_attention_mask, expected.context_attention_mask, atol=0, rtol=0
        )
        torch.testing.assert_close(ours.logits, expected.logits, atol=1e-5, rtol=0)
        hidden, ref_hidden = ours.generator_enc_last_hidden_state, expected.generator_enc_last_hidden_state
        assert hidden.shape == ref_hidden.shape
        real = mask.bool()
        torch.testing.assert_close(hidden[real], ref_hidden[real], atol=1e-5, rtol=0)
        # Hidden states and attentions asked for: the generator sees the whole contexts, as the reference's.
        seen.clear()
        with torch.no_grad():
            full = model(**kwargs, output_hidden_states=True)
        assert seen == [MAX_COMBINED_LENGTH]
        full_hidden = full.generator_enc_hidden_states
        # With the decoder cache returned too: its cross-attention keys cover the whole contexts.
        seen.clear()
        with torch.no_grad():
            cached = model(**{**kwargs, "use_cache": True})
        assert seen == [MAX_COMBINED_LENGTH] and cached.cache is not None
        torch.testing.assert_close(cached.logits, expected.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(full.generator_enc_last_hidden_state, ref_hidden, atol=1e-5, rtol=0)
        assert all(layer.shape[1] == MAX_COMBINED_LENGTH for layer in full_hidden)
    finally:
        hook.remove()


def _contexts(pair, questions):
    """Contexts (padded to 96) and doc scores from ragkit's retriever, computed outside the model."""
    with torch.no_grad():
        vectors = pair.ours.rag.encode_questions(questions.input_ids, questions.attention_mask)
    retrieved = pair.ours.rag.retrieve_contexts(questions.input_ids, vectors)
    assert retrieved.context_input_ids.shape[1] == MAX_COMBINED_LENGTH
    return {
        "context_input_ids": retrieved.context_input_ids,
        "context_attention_mask": retrieved.context_attention_mask,
        "doc_scores": retrieved.doc_scores,
    }


def test_marginalized_logits_have_the_reference_gradients(padded_pairs, questions, generated_labels):
    """RAG-Token ``do_marginalize`` under autograd (the training branch of ``marginalize``)."""
    pair = padded_pairs("token")
    inputs = {**_contexts(pair, questions), "decoder_input_ids": generated_labels, "do_marginalize": True}
    weights = torch.randn(
        generated_labels.shape[0],
        generated_labels.shape[1],
        pair.config.generator.vocab_size,
        generator=torch.Generator().manual_seed(0),
    )
    results = []
    for model in (pair.reference, pair.ours):
        model.zero_grad(set_to_none=True)
        doc_scores = inputs["doc_scores"].detach().clone().requires_grad_(True)
        out = model(**{**inputs, "doc_scores": doc_scores})
        (out.logits * weights).sum().backward()
        grads = {name: p.grad.clone() for name, p in model.generator.named_parameters() if p.grad is not None}
        results.append((out.logits.detach(), doc_scores.grad.clone(), grads))
    (ref_logits, ref_scores, ref_grads), (logits, scores, grads) = results
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert ref_scores.abs().sum() > 0
    torch.testing.assert_close(scores, ref_scores, **GRAD_TOL)
    _assert_same_gradients(grads, ref_grads)


@pytest.mark.parametrize("how", ["argument", "config"])
@pytest.mark.parametrize("head", ["model", "sequence", "token", "token-marginalized"])
def test_without_decoder_inputs_the_generator_reads_whole_contexts(padded_pairs, questions, head, how):
    """Without ``decoder_input_ids`` or ``labels`` BART makes its decoder inputs by shifting the contexts
    right: with ``use_cache=False`` (as an argument or in the config) the contexts must not be trimmed, or
    the logits come out shorter than the reference's (57 positions instead of 96)."""
    pair = padded_pairs("sequence" if head == "model" else head.split("-")[0])
    model = pair.ours.rag if head == "model" else pair.ours
    reference = pair.reference.rag if head == "model" else pair.reference
    kwargs = {"input_ids": questions.input_ids, "attention_mask": questions.attention_mask}
    if head == "token-marginalized":
        kwargs["do_marginalize"] = True
    if how == "argument":
        kwargs["use_cache"] = False
    configs = [model.config, reference.config]
    try:
        if how == "config":
            for config in configs:
                config.use_cache = False
        with torch.no_grad():
            ours = model(**kwargs)
            expected = reference(**kwargs)
    finally:
        for config in configs:
            config.use_cache = True
    rows = questions.input_ids.shape[0] * (1 if head == "token-marginalized" else pair.config.n_docs)
    assert expected.logits.shape == (rows, MAX_COMBINED_LENGTH, pair.config.generator.vocab_size)
    assert ours.logits.shape == expected.logits.shape
    assert ours.cache is None
    torch.testing.assert_close(ours.logits, expected.logits, atol=1e-5, rtol=0)
